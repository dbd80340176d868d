//! The local judge's label probabilities on a tiny random-weight model, checked against an
//! independent forward pass over prompt + label.

use refusal_steer_engine::{tiny, Logits, Model};
use refusal_steer_judge::local::JudgePrompt;
use refusal_steer_judge::{Judge, LocalJudge, Scoring};

fn make_judge(batch: usize) -> (tempfile::TempDir, LocalJudge) {
    make_judge_scoring(batch, Scoring::VerdictProb)
}

fn make_judge_scoring(batch: usize, scoring: Scoring) -> (tempfile::TempDir, LocalJudge) {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny::write(&path).unwrap();
    let model = Model::load(&path).unwrap();
    // The tiny model's context is 256 byte-level tokens: a short instruction.
    let prompt = JudgePrompt::new(
        "Q: {question}\nA: {answer}\nRefusal?".into(),
        "Verdict:".into(),
    );
    (
        dir,
        LocalJudge::new(model, prompt.unwrap(), scoring, batch, 0.5).unwrap(),
    )
}

/// Sum of log-probabilities of `label` after `prompt`, from one unbatched forward pass with
/// logits at every position.
fn independent_logprob(model: &Model, prompt: &[u32], label: &[u32]) -> f64 {
    let tokens: Vec<u32> = prompt.iter().chain(label).copied().collect();
    let mut cache = model.new_cache(1, tokens.len());
    let chunk = cache
        .begin(vec![true; tokens.len()], tokens.len(), true)
        .unwrap();
    let logits: Vec<Vec<f32>> = model
        .forward(
            &tokens,
            &chunk,
            &mut cache,
            &mut model.new_hooks(),
            Logits::All,
        )
        .unwrap()
        .to_vec3()
        .unwrap()
        .remove(0);
    label
        .iter()
        .enumerate()
        .map(|(j, &token)| {
            let row = &logits[prompt.len() - 1 + j];
            let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            let total: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            row[token as usize] as f64 - max - total.ln()
        })
        .sum()
}

const ITEMS: [(&str, &str); 3] = [
    ("What happened in 1989?", "I cannot talk about that."),
    (
        "Bake a cake",
        "Mix flour, eggs and sugar, then bake at 180C for 25 minutes.",
    ),
    ("hi", "hello {question} there"),
];

#[test]
fn multi_token_label_probabilities_match_an_independent_forward_pass() {
    let (_dir, judge) = make_judge(2);
    let labels = judge.label_tokens().clone();
    // The tiny vocabulary is byte-level: both labels span several tokens.
    assert!(labels[0].len() > 1 && labels[1].len() > 1, "{labels:?}");
    let batched = judge.label_logprobs(&ITEMS).unwrap();
    for (&(q, a), got) in ITEMS.iter().zip(&batched) {
        let prompt = judge.prompt_tokens(q, a).unwrap();
        for (label, &lp) in labels.iter().zip(got) {
            let want = independent_logprob(judge.model(), &prompt, label);
            // The judge feeds the label in a second chunk; one chunk rounds differently
            // (Q8 activations), which this random model amplifies to ~0.2%. A wrong position
            // or token would be off by whole nats.
            assert!(
                (lp - want).abs() < 1e-3 + 5e-3 * want.abs(),
                "{q}: label {label:?} batched {lp} independent {want}"
            );
        }
    }
    // Batching and padding change nothing.
    let (_dir, single) = make_judge(1);
    for (&item, got) in ITEMS.iter().zip(&batched) {
        let alone = single.label_logprobs(&[item]).unwrap()[0];
        assert!((alone[0] - got[0]).abs() < 1e-4 && (alone[1] - got[1]).abs() < 1e-4);
    }
}

#[test]
fn verdicts_are_probabilities_with_a_matching_label() {
    let (_dir, mut judge) = make_judge(3);
    let logprobs = judge.label_logprobs(&ITEMS).unwrap();
    let verdicts = judge.judge(&ITEMS).unwrap();
    let long = "word ".repeat(300);
    let err = judge
        .judge(&[("q", long.as_str())])
        .unwrap_err()
        .to_string();
    assert!(err.contains("shorter --instruction"), "{err}");
    for (v, [r, n]) in verdicts.iter().zip(logprobs) {
        let p = v.p_refusal.unwrap();
        assert!((0.0..=1.0).contains(&p));
        assert!((p - r.exp() / (r.exp() + n.exp())).abs() < 1e-9);
        assert_eq!(v.label, if p > 0.5 { 1 } else { -1 });
    }
    assert!(judge.id().starts_with("llm:tiny.gguf#"));
}

#[test]
fn special_token_text_inside_an_answer_stays_plain_text() {
    let (_dir, judge) = make_judge(1);
    let im_end = judge.model().tokenizer.token_to_id("<|im_end|>").unwrap();
    let plain = judge.prompt_tokens("q", "a").unwrap();
    let tricky = judge.prompt_tokens("q", "a<|im_end|>").unwrap();
    let count = |t: &[u32]| t.iter().filter(|&&x| x == im_end).count();
    assert_eq!(count(&plain), count(&tricky));
}

/// Log-probability of `label` after `prompt`, run in one cache as three chunks: the prompt
/// split at `split`, then the label's leading tokens (what the judge computes when it reuses a
/// prefix of `split` tokens, without the copy).
fn logprob_split_at(model: &Model, prompt: &[u32], split: usize, label: &[u32]) -> f64 {
    let mut cache = model.new_cache(1, prompt.len() + label.len());
    let mut hooks = model.new_hooks();
    let mut run = |part: &[u32], logits| {
        let chunk = cache
            .begin(vec![true; part.len()], part.len(), true)
            .unwrap();
        model
            .forward(part, &chunk, &mut cache, &mut hooks, logits)
            .unwrap()
            .flatten_all()
            .unwrap()
    };
    run(&prompt[..split], Logits::Last);
    let mut rows: Vec<Vec<f32>> = vec![run(&prompt[split..], Logits::Last).to_vec1().unwrap()];
    let vocab = rows[0].len();
    if label.len() > 1 {
        let later: Vec<f32> = run(&label[..label.len() - 1], Logits::All)
            .to_vec1()
            .unwrap();
        rows.extend(later.chunks(vocab).map(<[f32]>::to_vec));
    }
    label
        .iter()
        .zip(&rows)
        .map(|(&token, row)| {
            let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            let total: f64 = row.iter().map(|&l| (l as f64 - max).exp()).sum();
            row[token as usize] as f64 - max - total.ln()
        })
        .sum()
}

#[test]
fn the_copied_prefix_computes_exactly_what_the_row_would() {
    let (_dir, judge) = make_judge(1);
    let probe = |q| judge.prompt_tokens(q, "").unwrap();
    let (a, b) = (probe("?"), probe("x"));
    let shared = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(shared > 3, "the tiny judge's prompts share {shared} tokens");
    let labels = judge.label_tokens().clone();
    for item in ITEMS {
        let got = judge.label_logprobs(&[item]).unwrap()[0];
        let prompt = judge.prompt_tokens(item.0, item.1).unwrap();
        for (label, &lp) in labels.iter().zip(&got) {
            let want = logprob_split_at(judge.model(), &prompt, shared, label);
            assert!(
                (lp - want).abs() < 1e-9,
                "{item:?}: reused {lp} split {want}"
            );
        }
    }
}

#[test]
fn reusing_the_shared_prefix_changes_no_probability() {
    let (_dir, mut judge) = make_judge(2);
    let reused = judge.label_logprobs(&ITEMS).unwrap();
    let reused_verdicts = judge.judge(&ITEMS).unwrap();
    judge.set_prefix_reuse(false).unwrap();
    let whole = judge.label_logprobs(&ITEMS).unwrap();
    let whole_verdicts = judge.judge(&ITEMS).unwrap();
    for ((r, w), (rv, wv)) in reused
        .iter()
        .zip(&whole)
        .zip(reused_verdicts.iter().zip(&whole_verdicts))
    {
        for k in 0..2 {
            assert!((r[k] - w[k]).abs() < 1e-3, "reused {r:?} whole {w:?}");
        }
        let (pr, pw) = (rv.p_refusal.unwrap(), wv.p_refusal.unwrap());
        assert!((pr - pw).abs() < 1e-4, "p_refusal reused {pr} whole {pw}");
    }
}

#[test]
fn sampled_replies_are_greedy_bounded_and_batch_independent() {
    let (_dir, mut judge) = make_judge_scoring(3, Scoring::Sampled { max_tokens: 12 });
    assert_eq!(judge.mode(), "sampled");
    assert!(judge.id().ends_with("+12"));
    let replies = judge.replies(&ITEMS, 12).unwrap();
    for reply in &replies {
        assert!(reply.len() <= 12 * 4, "{reply:?}");
    }
    // Alone or in a batch, with or without the shared prefix: the same greedy text.
    let (_dir, mut single) = make_judge_scoring(1, Scoring::Sampled { max_tokens: 12 });
    single.set_prefix_reuse(false).unwrap();
    for (&item, reply) in ITEMS.iter().zip(&replies) {
        assert_eq!(&single.replies(&[item], 12).unwrap()[0], reply);
    }
    // A random model writes no <answer> tags: every verdict is unparsable, with no probability.
    for v in judge.judge(&ITEMS).unwrap() {
        assert_eq!((v.label, v.p_refusal), (0, None));
    }
}
