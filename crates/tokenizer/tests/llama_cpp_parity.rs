//! Token ids must equal llama.cpp's (`llama_tokenize`) on the recorded strings, for every model
//! family. Fixtures: `fixtures/llama.cpp/tokenize-<family>*.jsonl`, made by
//! `scripts/reference/make_fixtures.py`. The models are fetched by the catalogue if missing.

use candle_core::quantized::gguf_file::Content;
use refusal_steer_tokenizer::Tokenizer;
use std::path::PathBuf;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/llama.cpp")
}

fn tokenizer(model: &str) -> Tokenizer {
    let path =
        refusal_steer_catalog::resolve(model, &mut |m| eprintln!("{m}")).expect("model available");
    let mut reader = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let content = Content::read(&mut reader).unwrap();
    Tokenizer::from_gguf_metadata(&content.metadata).unwrap()
}

#[derive(serde::Deserialize)]
struct Case {
    text: String,
    ids: Vec<u32>,
}

fn check(model: &str, family: &str) {
    let tok = tokenizer(model);
    let mut total = 0;
    let mut failures = Vec::new();
    for (file, add_special) in [
        (format!("tokenize-{family}.jsonl"), false),
        (format!("tokenize-{family}-bos.jsonl"), true),
    ] {
        let text = std::fs::read_to_string(fixtures().join(&file))
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let case: Case = serde_json::from_str(line).unwrap();
            total += 1;
            let ours = tok.encode(&case.text, add_special, true);
            if ours != case.ids {
                failures.push(format!(
                    "{file}: {:?}\n  llama.cpp {:?}\n  ours      {:?}",
                    case.text, case.ids, ours
                ));
            }
        }
    }
    assert!(total >= 60, "only {total} cases for {family}");
    assert!(
        failures.is_empty(),
        "{} of {total} differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_matches_llama_cpp() {
    check("smollm2-135m-instruct", "llama");
}

#[test]
fn qwen2_matches_llama_cpp() {
    check("qwen2.5-coder-0.5b-instruct", "qwen2");
}

#[test]
fn gemma3_matches_llama_cpp() {
    check("gemma-3-270m", "gemma3");
}
