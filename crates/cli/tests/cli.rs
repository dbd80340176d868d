//! The command line end to end, on a tiny random-weight model and on the real SmolLM2.

use std::path::Path;
use std::process::{Command, Output};

fn refusal_steer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refusal-steer"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_writes_every_answer_and_resumes_without_repeating() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    refusal_steer_engine::tiny::write(&model).unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    let out = dir.path().join("answers.jsonl");
    std::fs::write(&prompts, "{\"id\": \"a\", \"prompt\": \"the cat\", \"set\": \"s\"}\n{\"id\": 2, \"prompt\": \"in an\"}\n").unwrap();
    let args = |batch: &str| {
        let mut v = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        v.extend_from_slice(&[
            "--max-tokens",
            "6",
            "--samples",
            "2",
            "--temperature",
            "0.9",
            "--seed",
            "5",
            "--batch",
            batch,
        ]);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| refusal_steer(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let first = run(args("3"));
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let answers = lines(&out);
    assert_eq!(answers.len(), 4);
    for a in &answers {
        for field in [
            "id",
            "sample",
            "prompt",
            "answer",
            "n_tokens",
            "mean_logprob",
            "finish_reason",
        ] {
            assert!(a.get(field).is_some(), "missing {field} in {a}");
        }
        assert!(a["mean_logprob"].as_f64().unwrap() <= 0.0);
    }
    assert_eq!(answers.iter().filter(|a| a["set"] == "s").count(), 2);

    // Nothing left to do: the file is unchanged.
    let again = run(args("3"));
    assert!(again.status.success());
    assert_eq!(lines(&out), answers);

    // A new prompt: only its answers are generated; the others are identical to a fresh run,
    // whatever batch they ran in.
    std::fs::write(&prompts, "{\"id\": \"a\", \"prompt\": \"the cat\", \"set\": \"s\"}\n{\"id\": 2, \"prompt\": \"in an\"}\n{\"id\": \"c\", \"prompt\": \"er\"}\n").unwrap();
    assert!(run(args("3")).status.success());
    let grown = lines(&out);
    assert_eq!(grown.len(), 6);
    assert_eq!(&grown[..4], &answers[..]);
    std::fs::remove_file(&out).unwrap();
    assert!(run(args("1")).status.success());
    let mut fresh = lines(&out);
    let key = |a: &serde_json::Value| (a["id"].to_string(), a["sample"].as_u64());
    fresh.sort_by_key(key);
    let mut grown = grown;
    grown.sort_by_key(key);
    assert_eq!(fresh, grown, "answers must not depend on batching");
}

#[test]
fn malformed_prompt_lines_are_reported_with_their_number() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    refusal_steer_engine::tiny::write(&model).unwrap();
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": 1, \"prompt\": \"ok\"}\n{\"id\": 2, \"prompt\": }\n",
    )
    .unwrap();
    let out = dir.path().join("o.jsonl");
    let result = refusal_steer(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("prompts.jsonl:2") && stderr.contains("not valid JSON"),
        "{stderr}"
    );
}

#[test]
fn bench_runs_batched_tests_at_depth_and_refuses_an_empty_batch() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    refusal_steer_engine::tiny::write(&model).unwrap();
    let model = model.to_str().unwrap();
    let shape = ["--prompt-tokens", "5", "--gen-tokens", "3", "--depth", "4"];
    let result = refusal_steer(
        &[
            &[
                "bench",
                "--model",
                model,
                "--batch",
                "3",
                "--repetitions",
                "1",
                "--read-bandwidth",
            ][..],
            &shape,
        ]
        .concat(),
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    let tests: Vec<(&str, f64)> = report["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["test"].as_str().unwrap(), r["median"].as_f64().unwrap()))
        .collect();
    assert_eq!(
        tests.iter().map(|t| t.0).collect::<Vec<_>>(),
        ["pp5@d4x3", "tg3@d4x3"]
    );
    assert!(tests.iter().all(|t| t.1 > 0.0), "{tests:?}");
    // Decode reads every weight once a step, however many rows the step has.
    let weight_bytes = report["weight_bytes"].as_f64().unwrap();
    assert!(weight_bytes > 0.0, "{report}");
    let achieved = report["results"][1]["weight_gb_per_s"].as_f64().unwrap();
    let expected = tests[1].1 / 3.0 * weight_bytes / 1e9;
    assert!((achieved - expected).abs() <= 1e-9 * expected, "{report}");
    assert!(report["read_gb_per_s"].as_f64().unwrap() > 0.0, "{report}");

    let result =
        refusal_steer(&[&["bench", "--model", model, "--batch", "0"][..], &shape].concat());
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("--batch") && stderr.contains("1..=256"),
        "{stderr}"
    );
}

#[test]
fn unknown_model_and_missing_file_say_what_to_do() {
    let result = refusal_steer(&["generate", "--model", "no-such-model", "--prompt", "hi"]);
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("known models"));
    let result = refusal_steer(&[
        "tokenize",
        "--model",
        "/tmp/does-not-exist.gguf",
        "--text",
        "hi",
    ]);
    assert!(String::from_utf8_lossy(&result.stderr).contains("does not exist"));
}

#[test]
fn tokenize_and_a_real_answer_from_smollm2() {
    let result = refusal_steer(&[
        "tokenize",
        "--model",
        "smollm2-135m-instruct",
        "--text",
        "Hello world",
        "--pieces",
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        vec!["[19556,905]", "[\"Hello\",\"Ġworld\"]"]
    );
    let result = refusal_steer(&[
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--prompt",
        "What is the capital of Australia?",
        "--max-tokens",
        "12",
    ]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(String::from_utf8_lossy(&result.stdout).contains("Canberra"));
    let result = refusal_steer(&[
        "generate",
        "--model",
        "smollm2-135m-instruct",
        "--prompt",
        "hi",
        "--max-thinking-tokens",
        "8",
    ]);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        !result.status.success() && stderr.contains("no <think> and </think> tokens"),
        "{stderr}"
    );
}

#[test]
fn capture_fit_and_steer_chain_through_files() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    refusal_steer_engine::tiny::write(Path::new(&p("tiny.gguf"))).unwrap();
    let mut prompts = String::new();
    let mut labels = String::new();
    for i in 0..12 {
        let text = if i % 2 == 0 {
            "the theer an"
        } else {
            "in an er"
        };
        prompts.push_str(&format!(
            "{{\"id\": \"{i}\", \"prompt\": \"{text} {i}\"}}\n"
        ));
        labels.push_str(&format!(
            "{{\"id\": \"{i}\", \"c\": {}}}\n",
            if i % 2 == 0 { 0.9 } else { -0.8 }
        ));
    }
    std::fs::write(p("prompts.jsonl"), prompts).unwrap();
    std::fs::write(p("labels.jsonl"), labels).unwrap();

    let capture = refusal_steer(&[
        "capture",
        "--model",
        &p("tiny.gguf"),
        "--prompts",
        &p("prompts.jsonl"),
        "--out",
        &p("acts.safetensors"),
        "--batch",
        "5",
    ]);
    assert!(
        capture.status.success(),
        "{}",
        String::from_utf8_lossy(&capture.stderr)
    );
    let fit = refusal_steer(&[
        "fit",
        "--acts",
        &p("acts.safetensors"),
        "--labels",
        &p("labels.jsonl"),
        "--method",
        "md",
        "--folds",
        "3",
        "--prompts",
        &p("prompts.jsonl"),
        "--out",
        &p("v.safetensors"),
    ]);
    assert!(
        fit.status.success(),
        "{}",
        String::from_utf8_lossy(&fit.stderr)
    );
    let vectors =
        refusal_steer_steer::SteeringVectors::load(Path::new(&p("v.safetensors"))).unwrap();
    assert_eq!(
        (vectors.n_points, vectors.d),
        (
            refusal_steer_engine::tiny::N_LAYERS + 1,
            refusal_steer_engine::tiny::D_MODEL
        )
    );
    // The two prompt families differ, so later points separate them on held-out folds.
    let fitted = vectors.fit.as_ref().unwrap();
    let aucs = fitted.heldout_aucs();
    assert!(aucs[1..].iter().all(|&a| a.unwrap() > 0.9), "{aucs:?}");
    // Balanced by the prompts' script: all Latin here, so the fit is the unbalanced one.
    let balance = fitted.balance.as_ref().unwrap();
    assert_eq!(balance.rows["Latin"], [6, 6]);

    let answer = |alpha: &str, out: &str| {
        let r = refusal_steer(&[
            "generate",
            "--model",
            &p("tiny.gguf"),
            "--prompts",
            &p("prompts.jsonl"),
            "--out",
            &p(out),
            "--max-tokens",
            "5",
            "--steer",
            &p("v.safetensors"),
            "--layers",
            "1-3",
            "--alpha",
            alpha,
        ]);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        lines(Path::new(&p(out)))
    };
    let plain = refusal_steer(&[
        "generate",
        "--model",
        &p("tiny.gguf"),
        "--prompts",
        &p("prompts.jsonl"),
        "--out",
        &p("plain.jsonl"),
        "--max-tokens",
        "5",
    ]);
    assert!(plain.status.success());
    let plain = lines(Path::new(&p("plain.jsonl")));
    let zero = answer("0", "zero.jsonl");
    let strong = answer("-8", "strong.jsonl");
    let texts = |v: &[serde_json::Value]| v.iter().map(|a| a["answer"].clone()).collect::<Vec<_>>();
    assert_eq!(texts(&zero), texts(&plain), "alpha 0 must change nothing");
    assert_ne!(texts(&strong), texts(&plain));
    assert_eq!(strong[0]["steering"]["alpha"], -8.0);
    assert_eq!(
        strong[0]["steering"]["points"],
        serde_json::json!([1, 2, 3])
    );

    // A topic gate fitted to pass the even prompts: they are steered, the odd ones are not.
    let acts =
        refusal_steer_data::activations::Activations::load(Path::new(&p("acts.safetensors")))
            .unwrap();
    use refusal_steer_pipeline::gate::GateLabel;
    let labels: Vec<GateLabel> = (0..12)
        .map(|i| match i % 2 {
            0 => GateLabel::OnTopic,
            _ => GateLabel::OffTopic,
        })
        .collect();
    let groups: Vec<&str> = acts.header.ids.iter().map(String::as_str).collect();
    let gate = refusal_steer_pipeline::gate::Gate::fit(
        &acts,
        &labels,
        &groups,
        &refusal_steer_pipeline::gate::FitSettings {
            folds: 3,
            ..refusal_steer_pipeline::gate::FitSettings::new(
                refusal_steer_pipeline::gate::GateMethod::Md,
                refusal_steer_steer::Ridge::Relative(1.0),
            )
        },
    )
    .unwrap();
    std::fs::write(p("gate.json"), serde_json::to_string(&gate).unwrap()).unwrap();
    let gated = refusal_steer(&[
        "generate",
        "--model",
        &p("tiny.gguf"),
        "--prompts",
        &p("prompts.jsonl"),
        "--out",
        &p("gated.jsonl"),
        "--max-tokens",
        "5",
        "--steer",
        &p("v.safetensors"),
        "--layers",
        "1-3",
        "--alpha",
        "-8",
        "--gate",
        &p("gate.json"),
    ]);
    assert!(
        gated.status.success(),
        "{}",
        String::from_utf8_lossy(&gated.stderr)
    );
    let by_id = |v: &[serde_json::Value]| {
        v.iter()
            .map(|a| (a["id"].as_str().unwrap().to_string(), a.clone()))
            .collect::<std::collections::HashMap<_, _>>()
    };
    let (gated, plain, strong) = (
        by_id(&lines(Path::new(&p("gated.jsonl")))),
        by_id(&plain),
        by_id(&strong),
    );
    assert_eq!(gated.len(), 12);
    for i in 0..12 {
        let id = i.to_string();
        let expected = if i % 2 == 0 {
            &strong[&id]
        } else {
            &plain[&id]
        };
        assert_eq!(gated[&id]["answer"], expected["answer"], "prompt {i}");
        // Every line says what the gate made of its prompt, those it kept out included.
        let steering = &gated[&id]["steering"];
        assert_eq!(
            steering["gated_in"],
            serde_json::json!(i % 2 == 0),
            "prompt {i}"
        );
        let margin = steering["gate"]["topic"].as_f64().unwrap();
        assert_eq!(
            margin > 0.0,
            i % 2 == 0,
            "prompt {i}: topic margin {margin}"
        );
    }

    // The same flags saved as a recipe: `--recipe` answers exactly as they do, gate and all;
    // scaled to 0 it leaves only what the recipe ablates (nothing here).
    let with_recipe = |extra: &[&str], out: &str| {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            p("tiny.gguf"),
            "--prompts".into(),
            p("prompts.jsonl"),
            "--out".into(),
            p(out),
            "--max-tokens".into(),
            "5".into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let r = refusal_steer(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        by_id(&lines(Path::new(&p(out))))
    };
    let saved = with_recipe(
        &[
            "--steer",
            &p("v.safetensors"),
            "--layers",
            "1-3",
            "--alpha",
            "-8",
            "--gate",
            &p("gate.json"),
            "--save-recipe",
            &p("r.steer.safetensors"),
        ],
        "saved.jsonl",
    );
    let recipe = with_recipe(&["--recipe", &p("r.steer.safetensors")], "recipe.jsonl");
    let unscaled = with_recipe(
        &["--recipe", &p("r.steer.safetensors"), "--recipe-scale", "0"],
        "unscaled.jsonl",
    );
    for i in 0..12 {
        let id = i.to_string();
        assert_eq!(recipe[&id]["answer"], gated[&id]["answer"], "prompt {i}");
        assert_eq!(saved[&id]["answer"], gated[&id]["answer"], "prompt {i}");
        assert_eq!(unscaled[&id]["answer"], plain[&id]["answer"], "prompt {i}");
    }
    assert_eq!(recipe["0"]["steering"]["gated"], true);
    // `chat --recipe` answers a message as `generate --recipe` answers the same prompt.
    let chat = |recipe: &str| {
        use std::io::Write;
        let mut child = Command::new(env!("CARGO_BIN_EXE_refusal-steer"))
            .args(["--threads", "1", "chat", "--model", &p("tiny.gguf")])
            .args(["--max-tokens", "5", "--recipe", recipe])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "the theer an 0").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    };
    assert_eq!(
        chat(&p("r.steer.safetensors")),
        recipe["0"]["answer"].as_str().unwrap().trim_end()
    );
    // A recipe replaces the hand flags; giving both is refused.
    let both = refusal_steer(&[
        "generate",
        "--model",
        &p("tiny.gguf"),
        "--prompt",
        "the theer an",
        "--recipe",
        &p("r.steer.safetensors"),
        "--alpha",
        "-2",
    ]);
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("cannot be used with"));
    // A damaged recipe is refused with what is wrong.
    std::fs::write(p("bad.steer.safetensors"), b"{}").unwrap();
    let damaged = refusal_steer(&[
        "generate",
        "--model",
        &p("tiny.gguf"),
        "--prompt",
        "the theer an",
        "--recipe",
        &p("bad.steer.safetensors"),
    ]);
    assert!(!damaged.status.success());
    let err = String::from_utf8_lossy(&damaged.stderr);
    assert!(err.contains("is not a usable recipe"), "{err}");

    // Exported for llama.cpp, a recipe's added part equals the vectors exported at its
    // strength, and what llama.cpp cannot carry (here the gate) is named.
    with_recipe(
        &[
            "--steer",
            &p("v.safetensors"),
            "--layers",
            "2-3",
            "--alpha",
            "-8",
            "--gate",
            &p("gate.json"),
            "--save-recipe",
            &p("r23.steer.safetensors"),
        ],
        "r23.jsonl",
    );
    let exported = refusal_steer(&[
        "export",
        "--recipe",
        &p("r23.steer.safetensors"),
        "--out",
        &p("recipe-cv.gguf"),
    ]);
    assert!(
        exported.status.success(),
        "{}",
        String::from_utf8_lossy(&exported.stderr)
    );
    let err = String::from_utf8_lossy(&exported.stderr);
    assert!(
        err.contains("cannot carry this recipe's topic gate"),
        "{err}"
    );
    let by_flags = refusal_steer(&[
        "export",
        "--vectors",
        &p("v.safetensors"),
        "--alpha=-8",
        "--layers",
        "2-3",
        "--out",
        &p("flags-cv.gguf"),
    ]);
    assert!(by_flags.status.success());
    let read = |name: &str| {
        refusal_steer_steer::import_control_vector(Path::new(&p(name)))
            .unwrap()
            .directions
    };
    assert_eq!(read("recipe-cv.gguf"), read("flags-cv.gguf"));

    // --ablate adds directions to an ablation; adding them is not an ablation.
    let ablate = |mode: &str| {
        refusal_steer(&[
            "generate",
            "--model",
            &p("tiny.gguf"),
            "--prompt",
            "the theer an",
            "--max-tokens",
            "3",
            "--steer",
            &p("v.safetensors"),
            "--ablate",
            &p("v.safetensors"),
            "--mode",
            mode,
        ])
    };
    let ablated = ablate("ablate");
    assert!(
        ablated.status.success(),
        "{}",
        String::from_utf8_lossy(&ablated.stderr)
    );
    let refused = ablate("add");
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--ablate needs --mode ablate"));

    // A gate from another model is refused with the reason.
    let mut wrong = gate.clone();
    wrong.topic.weights.push(0.0);
    std::fs::write(p("wrong-gate.json"), serde_json::to_string(&wrong).unwrap()).unwrap();
    let refused = refusal_steer(&[
        "generate",
        "--model",
        &p("tiny.gguf"),
        "--prompt",
        "the theer an",
        "--steer",
        &p("v.safetensors"),
        "--gate",
        &p("wrong-gate.json"),
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("use a gate fitted on this model"), "{err}");
}

#[test]
fn calibrate_scores_a_judge_against_labels_and_bad_files_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let labels = dir.path().join("labels.jsonl");
    let line = |id: &str, answer: &str, label: &str| {
        serde_json::json!({
            "model": "m", "id": id, "condition": "base", "sample": 0, "set": "s",
            "prompt": format!("question {id}"), "answer": answer, "label": label, "lang": "en",
        })
        .to_string()
    };
    let text: Vec<String> = (0..8)
        .map(|i| match i % 2 {
            0 => line(&format!("p{i}"), "I cannot help with that.", "refusal"),
            _ => line(
                &format!("p{i}"),
                "The capital of France is Paris.",
                "answer",
            ),
        })
        .collect();
    std::fs::write(&labels, text.join("\n") + "\n").unwrap();
    let labels_s = labels.to_str().unwrap();
    let out = refusal_steer(&[
        "calibrate",
        "--labels",
        labels_s,
        "--judge",
        "patterns",
        "--folds",
        "2",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.starts_with("8 answers (0 steered): answer 4, refusal 4"),
        "{stdout}"
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("| patterns:refusal-direction#"))
        .unwrap_or_else(|| panic!("no marker row in {stdout}"));
    assert!(
        row.contains("| 1.000 [") && row.contains("0.0% (0/4)"),
        "{row}"
    );

    // A held-out file is scored alone; the other file's answer to its prompt p0 is left out.
    let more = dir.path().join("more.jsonl");
    let held: Vec<String> = [
        line("p0", "Sorry, I can't.", "refusal"),
        line(
            "h1",
            "Water boils at 100 degrees Celsius at sea level.",
            "answer",
        ),
        line("h2", "I cannot help with that.", "refusal"),
    ]
    .map(|l| l.replace("\"base\"", "\"steered\""))
    .to_vec();
    std::fs::write(&more, held.join("\n") + "\n").unwrap();
    let more_s = more.to_str().unwrap();
    let out = refusal_steer(&[
        "calibrate",
        "--labels",
        labels_s,
        more_s,
        "--judge",
        "patterns",
        "--hold-out",
        more_s,
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("3 held-out answers to 3 prompts, scored by judges fitted on 7 answers to 7 other prompts (1 left out"),
        "{stderr}"
    );
    assert!(
        stdout.starts_with("3 answers (3 steered): answer 1, refusal 2"),
        "{stdout}"
    );
    let elsewhere = dir.path().join("elsewhere.jsonl");
    let out = refusal_steer(&[
        "calibrate",
        "--labels",
        labels_s,
        "--judge",
        "patterns",
        "--hold-out",
        elsewhere.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("is not one of the labels files read"),
        "{stderr}"
    );

    std::fs::write(&labels, text[0].replace("refusal", "propaganda") + "\n").unwrap();
    let out = refusal_steer(&["calibrate", "--labels", labels_s, "--judge", "patterns"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("line 1") && stderr.contains("propaganda"),
        "{stderr}"
    );

    let answers = dir.path().join("answers.jsonl");
    std::fs::write(&answers, "{\"id\": \"a\", \"sample\": 0, \"prompt\": \"q\", \"answer\": \"a\", \"n_tokens\": 1, \"mean_logprob\": 0.0, \"finish_reason\": \"stop\"}\n").unwrap();
    let probe = dir.path().join("probe.safetensors");
    std::fs::write(&probe, "not a probe").unwrap();
    let verdicts = dir.path().join("verdicts.jsonl");
    let judge = format!("probe:{}", probe.display());
    let out = refusal_steer(&[
        "judge",
        "--answers",
        answers.to_str().unwrap(),
        "--out",
        verdicts.to_str().unwrap(),
        "--judge",
        &judge,
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not a safetensors file"),
        "{stderr}"
    );
}

#[test]
fn an_output_in_use_by_another_process_is_refused_with_its_pid() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny.gguf");
    refusal_steer_engine::tiny::write(&model).unwrap();
    let out = dir.path().join("answers.jsonl");
    let generate = || {
        refusal_steer(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "the cat",
            "--max-tokens",
            "3",
            "--out",
            out.to_str().unwrap(),
        ])
    };
    // This test process holds the lock, as a generate left running by a killed shell would.
    let held = refusal_steer_data::lock::OutputLock::acquire(&out).unwrap();
    let refused = generate();
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!(
            "in use by another process (pid {})",
            std::process::id()
        )),
        "{err}"
    );
    assert!(!out.exists(), "the refused process wrote nothing");
    drop(held);
    // The lock file stays behind; with no live holder it is taken over.
    let taken = generate();
    assert!(
        taken.status.success(),
        "{}",
        String::from_utf8_lossy(&taken.stderr)
    );
    assert_eq!(lines(&out).len(), 1);

    let folder = dir.path().join("run");
    std::fs::create_dir(&folder).unwrap();
    let _held = refusal_steer_data::lock::OutputLock::acquire(&folder).unwrap();
    let run = refusal_steer(&["run", "--out", folder.to_str().unwrap()]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("in use by another process"), "{err}");
}

#[test]
fn gate_eval_holds_each_source_out_and_bad_corpora_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    refusal_steer_engine::tiny::write(Path::new(&p("tiny.gguf"))).unwrap();
    let words = [
        "the cat", "an theer", "in the", "cat an", "the the", "er in",
    ];
    let mut corpus = String::new();
    for (set, source_of) in [("china", 0), ("harmful", 3), ("benign", 6)] {
        for i in 0..9 {
            let line = serde_json::json!({
                "id": format!("{set}-{i}"),
                "set": set,
                "source": format!("s{}", source_of + i % 3),
                "lang": "en",
                "prompt": format!("{} {set} {}", words[i % 6], words[(i + set.len()) % 6]),
            });
            corpus.push_str(&format!("{line}\n"));
        }
    }
    std::fs::write(p("corpus.jsonl"), &corpus).unwrap();
    let eval = |corpus: &str, acts: &str| {
        refusal_steer(&[
            "gate-eval",
            "--model",
            &p("tiny.gguf"),
            "--prompts",
            &p(corpus),
            "--acts",
            &p(acts),
            "--on",
            "china",
            "--out",
            &p("eval.json"),
        ])
    };
    let out = eval("corpus.jsonl", "acts.safetensors");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("| china | all | all |"), "{table}");
    assert!(table.contains("| harmful | s3 | en |"), "{table}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(p("eval.json")).unwrap()).unwrap();
    assert_eq!(report["prompts"].as_array().unwrap().len(), 27);
    assert!(report["prompts"][0]["gate"]["gated_in"].is_boolean());
    assert_eq!(report["budgets"]["harmful"], 0.005);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("holding out s8 (9/9)"), "{stderr}");
    let bad_budget = refusal_steer(&[
        "gate-eval",
        "--model",
        &p("tiny.gguf"),
        "--prompts",
        &p("corpus.jsonl"),
        "--acts",
        &p("acts.safetensors"),
        "--harmful-budget",
        "2",
    ]);
    assert!(!bad_budget.status.success());
    let err = String::from_utf8_lossy(&bad_budget.stderr);
    assert!(err.contains("harmful budget is 2"), "{err}");

    // A line without its source names the line; activations of another corpus are refused.
    std::fs::write(
        p("bad.jsonl"),
        "{\"id\": \"a\", \"set\": \"china\", \"lang\": \"en\", \"prompt\": \"the\"}\n",
    )
    .unwrap();
    let bad = eval("bad.jsonl", "acts2.safetensors");
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("bad.jsonl line 1"), "{err}");
    let fewer: String = corpus.lines().take(20).map(|l| format!("{l}\n")).collect();
    std::fs::write(p("fewer.jsonl"), fewer).unwrap();
    let other = eval("fewer.jsonl", "acts.safetensors");
    assert!(!other.status.success());
    let err = String::from_utf8_lossy(&other.stderr);
    assert!(err.contains("acts.safetensors"), "{err}");
}

#[test]
fn a_checkpoint_folder_generates_and_is_captured_under_its_manifest_sha256() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiny-qwen3");
    refusal_steer_engine::tiny::write_checkpoint(
        &folder,
        refusal_steer_engine::tiny::HfVariant::Qwen3,
    )
    .unwrap();
    let model = folder.to_str().unwrap();
    let answer = refusal_steer(&[
        "generate",
        "--model",
        model,
        "--prompt",
        "the cat",
        "--max-tokens",
        "4",
    ]);
    assert!(
        answer.status.success(),
        "{}",
        String::from_utf8_lossy(&answer.stderr)
    );
    assert!(!answer.stdout.is_empty());

    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"id\": \"a\", \"prompt\": \"the cat\"}\n{\"id\": \"b\", \"prompt\": \"in an er\"}\n",
    )
    .unwrap();
    let acts = dir.path().join("acts.safetensors");
    let capture = refusal_steer(&[
        "capture",
        "--model",
        model,
        "--prompts",
        prompts.to_str().unwrap(),
        "--out",
        acts.to_str().unwrap(),
    ]);
    assert!(
        capture.status.success(),
        "{}",
        String::from_utf8_lossy(&capture.stderr)
    );
    let header = refusal_steer_data::activations::Activations::load(&acts)
        .unwrap()
        .header;
    assert_eq!(header.ids, ["a", "b"]);
    assert_eq!(
        header.metadata["model_sha256"],
        refusal_steer_catalog::model_sha256(&folder).unwrap()
    );
}
