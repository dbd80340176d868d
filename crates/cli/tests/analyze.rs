//! `analyze` end to end on the tiny random-weight model: capture -> fit (two methods) ->
//! analyze with a comparison file.

use std::path::Path;
use std::process::{Command, Output};

fn refusal_steer(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_refusal-steer"))
        .args(["--threads", "1"])
        .args(args)
        .output()
        .unwrap()
}

fn succeed(args: &[&str]) -> Output {
    let out = refusal_steer(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn capture_fit_and_analyze_write_a_consistent_report() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    refusal_steer_engine::tiny::write(Path::new(&p("tiny.gguf"))).unwrap();
    // Two prompt families the tiny model tells apart; one family is "refused".
    let (mut prompts, mut labels) = (String::new(), String::new());
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
    let (tiny, acts, scores) = (p("tiny.gguf"), p("acts.safetensors"), p("labels.jsonl"));
    succeed(&[
        "capture",
        "--model",
        &tiny,
        "--prompts",
        &p("prompts.jsonl"),
        "--out",
        &acts,
    ]);
    for method in ["md", "wrmd"] {
        succeed(&[
            "fit",
            "--acts",
            &acts,
            "--labels",
            &scores,
            "--method",
            method,
            "--folds",
            "3",
            "--out",
            &p(&format!("{method}.safetensors")),
        ]);
    }
    let report = p("report");
    let (md, wrmd) = (p("md.safetensors"), p("wrmd.safetensors"));
    succeed(&[
        "analyze",
        "--acts",
        &acts,
        "--scores",
        &scores,
        "--vectors",
        &md,
        "--compare",
        &wrmd,
        "--folds",
        "3",
        "--out",
        &report,
    ]);

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&report).join("analysis.json")).unwrap(),
    )
    .unwrap();
    let n_points = refusal_steer_engine::tiny::N_LAYERS + 1;
    let points = json["points"].as_array().unwrap();
    assert_eq!(points.len(), n_points);
    assert_eq!(
        (json["n_refusal"].as_u64(), json["n_compliance"].as_u64()),
        (Some(6), Some(6))
    );
    assert_eq!(json["method"], "md");
    assert_eq!(json["compare_method"], "wrmd, kappa 1");

    // Same method, folds and seed as `fit`: the held-out AUCs agree with the file's metadata.
    let vectors = refusal_steer_steer::SteeringVectors::load(Path::new(&md)).unwrap();
    let fit_aucs: Vec<f64> = vectors
        .fit
        .unwrap()
        .heldout_aucs()
        .into_iter()
        .map(Option::unwrap)
        .skip(1)
        .collect();
    for (point, fit_auc) in points.iter().skip(1).zip(&fit_aucs) {
        let auc = point["heldout_auc"].as_f64().unwrap();
        assert!((auc - fit_auc).abs() < 1e-9, "{auc} vs {fit_auc}");
        assert!(
            auc > 0.9,
            "the families separate after the embeddings: {auc}"
        );
        let compare = &point["compare"];
        let cosine = compare["cosine"].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&cosine));
        let surviving = compare["surviving_norm_fraction"].as_f64().unwrap();
        assert!(((1.0 - cosine * cosine).sqrt() - surviving).abs() < 1e-6);
        assert!(
            point["dimensionality"]["probe_auc_top_pcs"]
                .as_array()
                .unwrap()
                .len()
                > 1
        );
    }
    let best = json["best_points"][0].as_u64().unwrap();

    let markdown = std::fs::read_to_string(Path::new(&report).join("analysis.md")).unwrap();
    assert!(
        markdown.contains(&format!("highest at point {best}")),
        "{markdown}"
    );
    for name in [
        "auc_by_point.svg".to_string(),
        "norm_by_point.svg".into(),
        "cosine_adjacent.svg".into(),
        "compare_by_point.svg".into(),
        format!("dimensionality_point_{best}.svg"),
    ] {
        let svg = std::fs::read_to_string(Path::new(&report).join(&name)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
            "{name}"
        );
    }

    // Too few prompts per class for the folds: a clear error, no report.
    let failed = refusal_steer(&[
        "analyze",
        "--acts",
        &acts,
        "--scores",
        &scores,
        "--vectors",
        &md,
        "--folds",
        "7",
        "--out",
        &p("bad"),
    ]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("at least 7 refusal prompts"), "{stderr}");
    assert!(!Path::new(&p("bad")).exists());
}
