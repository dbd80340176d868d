//! `refusal-steer run` end to end in miniature: the real SmolLM2, a handful of prompts per set,
//! short answers. A marker judge that calls letters "refusals" gives the small model two
//! classes to separate, so every stage runs: split, answer, judge, capture, fit (three
//! methods), tune, test, report; then a rerun after an interrupted stage.

mod miniature;

use miniature::{refusal_steer, write_data, CONFIG};
use std::path::Path;

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

#[test]
fn a_miniature_run_goes_end_to_end_and_resumes_after_an_interruption() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_data(&data);
    let config = dir.path().join("run.toml");
    std::fs::write(&config, CONFIG.replace("DATA", data.to_str().unwrap())).unwrap();
    let out = dir.path().join("run");
    let (config, out_s) = (config.to_str().unwrap(), out.to_str().unwrap());

    let first = refusal_steer(&["run", "--config", config, "--out", out_s]);
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&first.stdout);
    assert!(stdout.contains("| target (n=2) |"), "{stdout}");
    for file in [
        "split.json",
        "train-answers.jsonl",
        "train-scores.jsonl",
        "train-acts.safetensors",
        "vectors/md.safetensors",
        "vectors/wrmd.safetensors",
        "vectors/wrmd-protected.safetensors",
        "tuning.json",
        "report.json",
        "report.md",
        "separability.svg",
        "pca.svg",
        "refusal-vs-strength-wrmd.svg",
    ] {
        assert!(out.join(file).is_file(), "{file} missing; {stderr}");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["test"][0]["condition"], "baseline");
    assert_eq!(report["test"][0]["rates"]["target"]["n"], 2);
    let tuned = report["tuned"].as_array().unwrap();
    assert_eq!(tuned.len(), 6);
    // Ablation tries itself alone first, at every point past the embeddings.
    let ablation = &tuned[5];
    assert_eq!(ablation["method"], "ablation+gated");
    assert_eq!(ablation["mode"], "ablate-add");
    assert_eq!(ablation["trials"][0]["strength"], 0.0);
    let n_points = report["heldout_auc"]["wrmd"].as_array().unwrap().len();
    assert_eq!(
        ablation["points"],
        serde_json::json!((1..n_points).collect::<Vec<_>>())
    );
    // 4 + 4 + 2 + 2 train prompts, one answer each.
    assert_eq!(count_lines(&out.join("train-answers.jsonl")), 12);
    let split: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("split.json")).unwrap()).unwrap();
    assert_eq!(
        split["prompts"]["target"]["test"].as_array().unwrap().len(),
        2
    );

    // Every method that kept its limits has a recipe, and the recipe alone reproduces the
    // method's test answers exactly (gate, ablation and per-point strengths included).
    let target_test = out.join("target-test.jsonl");
    std::fs::write(
        &target_test,
        split["prompts"]["target"]["test"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.to_string() + "\n")
            .collect::<String>(),
    )
    .unwrap();
    let mut reproduced = 0;
    for evaluation in report["test"].as_array().unwrap().iter().skip(1) {
        let method = evaluation["condition"].as_str().unwrap();
        let strength = evaluation["strength"].as_f64().unwrap();
        let recipe = out.join(format!(
            "recipes/{}.steer.safetensors",
            method.replace('+', "-")
        ));
        assert!(recipe.is_file(), "{method} has no recipe");
        let again = out.join(format!("again-{method}.jsonl"));
        let generated = refusal_steer(&[
            "generate",
            "--model",
            "smollm2-135m-instruct",
            "--prompts",
            target_test.to_str().unwrap(),
            "--out",
            again.to_str().unwrap(),
            "--max-tokens",
            "12",
            "--batch",
            "4",
            "--recipe",
            recipe.to_str().unwrap(),
        ]);
        assert!(
            generated.status.success(),
            "{}",
            String::from_utf8_lossy(&generated.stderr)
        );
        let answers = |path: &Path| {
            let mut v: Vec<(String, String)> = std::fs::read_to_string(path)
                .unwrap()
                .lines()
                .map(|l| {
                    let a: serde_json::Value = serde_json::from_str(l).unwrap();
                    (a["id"].to_string(), a["answer"].to_string())
                })
                .collect();
            v.sort();
            v
        };
        let tested = out.join(format!(
            "test/{}/{strength:+.3}/target.jsonl",
            method.replace('+', "-")
        ));
        assert_eq!(answers(&again), answers(&tested), "{method}");
        reproduced += 1;
    }
    assert!(reproduced > 0, "no steered condition was tested: {stdout}");
    let report_md = std::fs::read_to_string(out.join("report.md")).unwrap();
    if report["recommended"].is_string() {
        assert!(out.join("recommended.steer.safetensors").is_file());
        assert!(report_md.contains("--recipe "), "{report_md}");
    }

    // Interrupt a stage: a torn last line in the train answers and a lost report. The rerun
    // rebuilds them without duplicating any answer, and lands on the same table.
    let answers = out.join("train-answers.jsonl");
    let text = std::fs::read_to_string(&answers).unwrap();
    let keep: Vec<&str> = text.lines().take(5).collect();
    std::fs::write(&answers, format!("{}\n{{\"id\": \"torn", keep.join("\n"))).unwrap();
    std::fs::remove_file(out.join("report.json")).unwrap();
    let second = refusal_steer(&["run", "--config", config, "--out", out_s]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(count_lines(&answers), 12);
    assert_eq!(String::from_utf8_lossy(&second.stdout), stdout);

    // Another ridge: the vectors and every steered answer are redone, not mixed with the old.
    let refit = dir.path().join("refit.toml");
    std::fs::write(
        &refit,
        CONFIG
            .replace("DATA", data.to_str().unwrap())
            .replace("kappa = 1.0", "kappa = 2.0"),
    )
    .unwrap();
    let third = refusal_steer(&["run", "--config", refit.to_str().unwrap(), "--out", out_s]);
    let stderr = String::from_utf8_lossy(&third.stderr);
    assert!(third.status.success(), "{stderr}");
    assert!(stderr.contains("refitting and re-tuning"), "{stderr}");
    let refitted =
        refusal_steer_steer::SteeringVectors::load(&out.join("vectors/wrmd.safetensors"));
    assert_eq!(
        refitted.unwrap().fit.unwrap().ridge,
        refusal_steer_steer::Ridge::Relative(2.0)
    );
    assert_eq!(count_lines(&answers), 12, "baseline answers are kept");

    // A different split in the same folder is refused, not mixed in.
    let other = dir.path().join("other.toml");
    std::fs::write(
        &other,
        CONFIG
            .replace("DATA", data.to_str().unwrap())
            .replace("seed = 0", "seed = 1"),
    )
    .unwrap();
    let mixed = refusal_steer(&["run", "--config", other.to_str().unwrap(), "--out", out_s]);
    assert!(!mixed.status.success());
    assert!(String::from_utf8_lossy(&mixed.stderr).contains("use a new --out folder"));

    // So is other decoding: the folder's answers were made without a repetition penalty.
    std::fs::write(
        &other,
        CONFIG.replace("DATA", data.to_str().unwrap()).replace(
            "max_tokens = 12",
            "max_tokens = 12\nrepetition_penalty = 1.1",
        ),
    )
    .unwrap();
    let mixed = refusal_steer(&["run", "--config", other.to_str().unwrap(), "--out", out_s]);
    let stderr = String::from_utf8_lossy(&mixed.stderr);
    assert!(!mixed.status.success());
    assert!(
        stderr.contains("repetition_penalty 1; this run asks for")
            && stderr.contains("repetition_penalty 1.1. Use a new --out folder"),
        "{stderr}"
    );
}

#[test]
fn bad_run_configs_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_data(&data);
    let out = dir.path().join("run");
    let check = |config: String, expected: &str| {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, config).unwrap();
        let result = refusal_steer(&[
            "run",
            "--config",
            path.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(!result.status.success());
        assert!(
            stderr.contains(expected),
            "expected '{expected}' in: {stderr}"
        );
    };
    let good = CONFIG.replace("DATA", data.to_str().unwrap());
    check(
        good.replace("[sets.benign]", "[sets.unknown]"),
        "unknown field `unknown`",
    );
    check(good.replace("letters.txt", "missing.txt"), "missing.txt");
    check(
        good.replace("max_tokens = 12", "max_tokens = 12\nrepetition_penalty = 0"),
        "repetition_penalty must be positive",
    );
    check(
        good.replace(
            "max_tokens = 12",
            "max_tokens = 12\nthinking = false\nmax_thinking_tokens = 64",
        ),
        "max_thinking_tokens is set but thinking = false",
    );
    check(
        good.replace(
            "train = 4\nvalidation = 2\ntest = 2",
            "train = 0\nvalidation = 2\ntest = 2",
        ),
        "\"target\" has an empty split",
    );
    check(
        good.replace(
            "train = 4\nvalidation = 2\ntest = 2",
            "train = 20\nvalidation = 2\ntest = 2",
        ),
        "\"target\" has 8 items, but its split asks for 24",
    );
}

/// `run --model DIR` on a checkpoint folder: the tiny random Qwen2 one, judged by a marker its
/// random answers sometimes hold, so both classes have prompts. Its recipes name the folder by
/// its manifest's sha256.
#[test]
fn a_miniature_run_on_a_checkpoint_folder() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    write_data(&data);
    std::fs::write(data.join("markers.json"), r#"{"markers": ["d"]}"#).unwrap();
    let folder = dir.path().join("tiny-qwen2");
    refusal_steer_engine::tiny::write_checkpoint(
        &folder,
        refusal_steer_engine::tiny::HfVariant::Qwen2,
    )
    .unwrap();
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        CONFIG
            .replace("DATA", data.to_str().unwrap())
            .replace("smollm2-135m-instruct", folder.to_str().unwrap()),
    )
    .unwrap();
    let out = dir.path().join("run");
    let result = refusal_steer(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let recipe =
        refusal_steer_pipeline::recipe::Recipe::load(&out.join("recipes/wrmd.steer.safetensors"))
            .unwrap();
    assert_eq!(
        recipe.model.sha256,
        refusal_steer_catalog::model_sha256(&folder).unwrap()
    );
}
