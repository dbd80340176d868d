//! The probe judge end to end on a tiny random-weight model: the residual features it reads
//! carry a planted difference between "refused" and "answered" answers, cross-validation
//! finds it, and a saved probe judges new answers through the `Judge` interface.

use refusal_steer_engine::{tiny, Model};
use refusal_steer_judge::calibration::Folds;
use refusal_steer_judge::corpus::AnswerType;
use refusal_steer_judge::local::JudgePrompt;
use refusal_steer_judge::probe::{
    cross_validate, read_residuals, select_all, FeatureBank, LinearProbe, Probe, ProbeHeader,
    Search, PROBE_VERSION,
};
use refusal_steer_judge::{Judge, LocalJudge, ProbeJudge, Scoring};
use std::collections::BTreeMap;

fn reader(path: &std::path::Path) -> LocalJudge {
    let model = Model::load(path).unwrap();
    // The tiny model's context is 256 byte-level tokens: a short instruction.
    let prompt = JudgePrompt::new("Q: {question}\nA: {answer}\n".into(), "Verdict:".into());
    LocalJudge::new(model, prompt.unwrap(), Scoring::VerdictProb, 4, 0.5).unwrap()
}

/// Answers of a few words; the "refused" ones carry the planted words "no sir".
fn items(n: usize, seed: usize) -> (Vec<(String, String)>, Vec<AnswerType>) {
    let words = ["cat", "mat", "hour", "sat", "an", "there", "in"];
    (0..n)
        .map(|i| {
            let k = i + seed;
            let body: Vec<&str> = (0..4)
                .map(|j| words[(k * 3 + j * 5) % words.len()])
                .collect();
            let refused = k.is_multiple_of(2);
            let answer = if refused {
                format!("no sir {}", body.join(" "))
            } else {
                body.join(" ")
            };
            let label = if refused {
                AnswerType::Refusal
            } else {
                AnswerType::Answer
            };
            ((format!("question {k}"), answer), label)
        })
        .unzip()
}

#[test]
fn the_probe_finds_a_planted_difference_and_judges_new_answers_with_it() {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny::write(&path).unwrap();
    let judge = reader(&path);
    let (texts, labels) = items(40, 0);
    let pairs: Vec<(&str, &str)> = texts
        .iter()
        .map(|(q, a)| (q.as_str(), a.as_str()))
        .collect();
    let points: Vec<usize> = (1..=tiny::N_LAYERS).collect();
    let residuals = read_residuals(&judge, &pairs, &points).unwrap();
    // Batching does not change what is read.
    let alone = read_residuals(&judge, &pairs[..1], &points).unwrap();
    for (a, b) in alone[0].mean.iter().zip(&residuals[0].mean) {
        assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{a} vs {b}");
    }
    let bank = FeatureBank {
        points: points.clone(),
        d: tiny::D_MODEL,
        rows: [
            residuals.iter().map(|r| r.last.as_slice()).collect(),
            residuals.iter().map(|r| r.mean.as_slice()).collect(),
        ],
    };
    let groups: Vec<String> = (0..40).map(|i| format!("q{}", i / 2)).collect();
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    let folds = Folds::grouped(&groups, 4, 0);
    let search = Search {
        folds: 4,
        seed: 0,
        max_false_refusals: 1.0,
    };
    let (scores, _) = cross_validate(&bank, &labels, &groups, &folds, search).unwrap();
    let right = scores
        .iter()
        .zip(&labels)
        .filter(|(s, l)| (**s > 0.0) == l.is_refusal())
        .count();
    assert!(right >= 36, "{right}/40 right out of fold");

    let choice = select_all(&bank, &labels, &groups, search).unwrap();
    let slot = points.iter().position(|&p| p == choice.point).unwrap();
    let rows: Vec<&[f32]> = (0..40).map(|i| bank.row(choice.pooling, slot, i)).collect();
    let sha = "12".repeat(32);
    let probe = Probe {
        header: ProbeHeader {
            version: PROBE_VERSION,
            judge_model: path.display().to_string(),
            judge_sha256: sha.clone(),
            instruction: judge.prompt_fingerprint(),
            point: choice.point,
            pooling: choice.pooling,
            d: tiny::D_MODEL,
            kappa: choice.kappa,
            provenance: BTreeMap::new(),
        },
        linear: LinearProbe::fit(&rows, &labels, choice.kappa).unwrap(),
    };
    let file = dir.path().join("probe.safetensors");
    probe.save(&file).unwrap();
    let loaded = Probe::load(&file).unwrap();

    let err = ProbeJudge::new(reader(&path), &"34".repeat(32), loaded.clone(), "p".into())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("was fitted on the judge model"), "{err}");
    let mut wide = loaded.clone();
    wide.header.d = 32;
    let err = ProbeJudge::new(reader(&path), &sha, wide, "p".into())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("width 32"), "{err}");

    let mut probe_judge = ProbeJudge::new(reader(&path), &sha, loaded, "p".into()).unwrap();
    let (new_texts, new_labels) = items(20, 101);
    let new_pairs: Vec<(&str, &str)> = new_texts
        .iter()
        .map(|(q, a)| (q.as_str(), a.as_str()))
        .collect();
    let verdicts = probe_judge.judge(&new_pairs).unwrap();
    let right = verdicts
        .iter()
        .zip(&new_labels)
        .filter(|(v, l)| (v.label > 0) == l.is_refusal())
        .count();
    assert!(right >= 18, "{right}/20 new answers right");
    assert_eq!(probe_judge.mode(), "probe");
    // An empty answer is read like any other, without a crash.
    probe_judge.judge(&[("question", "")]).unwrap();
}
