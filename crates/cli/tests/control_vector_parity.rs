//! Layer numbering against llama.cpp: vectors exported with `refusal-steer export` and applied
//! by llama.cpp's `--control-vector` (fixture made by
//! `scripts/reference/make_control_vector_fixture.sh`) steer Qwen2.5-Coder-0.5B the way our
//! `--steer` does at the same points, and not the way it does one block earlier or later.

use std::path::PathBuf;
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/control-vector")
}

fn steered(prompt: &str, points: &str, alpha: f64, max_tokens: u64) -> String {
    let vectors = fixtures().join("md-qwen2.5-coder-0.5b.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_refusal-steer"))
        .args([
            "--threads",
            "1",
            "generate",
            "--model",
            "qwen2.5-coder-0.5b-instruct",
            "--prompt",
            prompt,
        ])
        .args([
            "--max-tokens",
            &max_tokens.to_string(),
            "--steer",
            vectors.to_str().unwrap(),
        ])
        .args(["--layers", points, &format!("--alpha={alpha}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim_end_matches('\n')
        .to_string()
}

fn shift(points: &str, by: i64) -> String {
    points
        .split('-')
        .map(|p| (p.parse::<i64>().unwrap() + by).to_string())
        .collect::<Vec<_>>()
        .join("-")
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

#[test]
fn exported_control_vectors_steer_llama_cpp_at_the_same_blocks() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("llama-cpp-answers.json")).unwrap(),
    )
    .unwrap();
    let prompt = fixture["prompt"].as_str().unwrap();
    let max_tokens = fixture["max_tokens"].as_u64().unwrap();
    let mut agreement = [0usize; 3]; // shifted by -1, 0, +1
    let mut identical = 0;
    for config in fixture["configs"].as_array().unwrap() {
        let (points, alpha) = (
            config["points"].as_str().unwrap(),
            config["alpha"].as_f64().unwrap(),
        );
        let theirs = config["llama_cpp"].as_str().unwrap();
        for (slot, by) in [-1i64, 0, 1].into_iter().enumerate() {
            let ours = steered(prompt, &shift(points, by), alpha, max_tokens);
            agreement[slot] += common_prefix(&ours, theirs);
            if by == 0 {
                eprintln!(
                    "points {points} alpha {alpha}:\n  llama.cpp {theirs:?}\n  ours      {ours:?}"
                );
                identical += usize::from(ours == theirs);
            }
        }
    }
    eprintln!(
        "characters in common (shift -1, 0, +1): {agreement:?}; identical answers: {identical}"
    );
    assert!(
        identical >= 2,
        "only {identical} steered answers identical to llama.cpp's"
    );
    assert!(
        agreement[1] > agreement[0] && agreement[1] > agreement[2],
        "{agreement:?}"
    );
}
