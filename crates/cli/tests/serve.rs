//! `refusal-steer serve` as a user starts it, spoken to by the official `openai` Python package
//! (installed by `.ci/run`): scripts/serve/openai_client.py checks chat, streaming, logprobs,
//! `n`, completions, a recipe chosen by model name, an error and the model list; then
//! scripts/serve/load.py keeps 8 clients streaming for 30 s and no request may fail.

use refusal_steer_engine::{tiny, Model};
use refusal_steer_pipeline::recipe::{ModelIdentity, Provenance};
use refusal_steer_pipeline::steering::{SteerMode, SteerPositions, Steering};
use refusal_steer_pipeline::Recipe;
use refusal_steer_steer::SteeringVectors;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Kills the server when the test ends, however it ends.
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_openai_python_client_works_against_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let model_path = dir.path().join("tiny.gguf");
    tiny::write(&model_path).unwrap();
    let model = Model::load(&model_path).unwrap();
    let (n_points, d) = (model.config.n_layers + 1, model.config.d_model);
    let values: Vec<f32> = (0..n_points * d).map(|i| (i % 7) as f32 - 3.0).collect();
    let vectors = SteeringVectors::new(values, n_points, d, Default::default()).unwrap();
    let mut alphas = vec![0.0; n_points];
    alphas[2] = 1.5;
    let recipe = Recipe::from_steering(
        &ModelIdentity::of(&model).unwrap(),
        &Steering {
            vectors: &vectors,
            points: &[2],
            alphas: &alphas,
            mode: SteerMode::Add,
            positions: SteerPositions::All,
            ablate_with: &[],
        },
        None,
        Provenance {
            method: "test".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let recipe_path = dir.path().join("push.steer.safetensors");
    recipe.save(&recipe_path).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_refusal-steer"))
        .args(["--threads", "1", "serve", "--port", "0", "--model"])
        .arg(&model_path)
        .arg("--recipe")
        .arg(format!("push={}", recipe_path.display()))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let server = Server(child);
    let mut line = String::new();
    BufReader::new(stderr).read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"));

    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/serve/openai_client.py"
    );
    let out = Command::new("python3")
        .arg(script)
        .arg(format!("http://{url}/v1"))
        .args(["tiny", "tiny+push"])
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["models"], serde_json::json!(["tiny", "tiny+push"]));

    // Under load (8 clients streaming, plain and steered mixed, for 30 s): no request fails.
    let load = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/serve/load.py");
    let out = Command::new("python3")
        .arg(load)
        .arg(format!("http://{url}/v1"))
        .args(["tiny,tiny+push", "--clients", "8", "--seconds", "30"])
        .args(["--max-tokens", "16"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["errors"], 0, "{report}");
    assert!(report["requests"].as_u64().unwrap() >= 8, "{report}");
    drop(server);
}
