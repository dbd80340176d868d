//! Continuous batching on a tiny random-weight model: sequences that join a running batch at
//! any step, with their own steering and sampling, generate exactly what they generate alone.

use refusal_steer_engine::{
    generate, Action, Batcher, FinishReason, Flow, GenerateOptions, Generation, Intervention,
    Interventions, Model, Padding, Positions, Request, Rows, Sampling, Sequence, SharedPrefix,
};
use std::collections::BTreeMap;
use std::sync::Arc;

mod common;
use common::model;

fn steering(model: &Model, point: usize, positions: Positions) -> Interventions {
    let vector = (0..model.config.d_model)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0)
        .collect();
    Arc::from(vec![Intervention {
        point,
        action: Action::Add { vector, alpha: 2.0 },
        rows: Rows::All,
        positions,
    }])
}

const SAMPLED: Sampling = Sampling {
    temperature: 0.8,
    top_p: 0.95,
    top_k: 40,
    repetition_penalty: 1.1,
};

/// Six sequences that differ in prompt, steering, sampling and budget.
fn sequences(model: &Model) -> Vec<Sequence> {
    // Sequences 1 and 4, steered at every position, share the opening of 0 and 3.
    let prompts = [
        "the cat sat",
        "the cat in an hour there",
        "a",
        "the cat and the dog",
        "the cat an",
        "there",
    ];
    let everywhere = steering(model, 1, Positions::All);
    let generated = steering(model, 2, Positions::Generated);
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| Sequence {
            prompt: model.tokenizer.encode(p, false, true),
            seed: i as u64,
            sampling: if i % 2 == 0 {
                Sampling::GREEDY
            } else {
                SAMPLED
            },
            max_new_tokens: [12, 5, 9, 1, 14, 7][i],
            steering: match i % 3 {
                0 => None,
                1 => Some(everywhere.clone()),
                _ => Some(generated.clone()),
            },
            thinking: None,
            ignore_eos: false,
        })
        .collect()
}

fn alone(model: &Model, s: &Sequence) -> Generation {
    let options = GenerateOptions {
        max_new_tokens: s.max_new_tokens,
        sampling: s.sampling,
        padding: Padding::Left,
        thinking: None,
    };
    let request = Request {
        prompt: s.prompt.clone(),
        seed: s.seed,
    };
    generate(
        model,
        &[request],
        &options,
        s.steering.as_ref(),
        &mut |_| Flow::Continue,
    )
    .unwrap()
    .remove(0)
}

#[test]
fn sequences_joining_at_any_step_generate_what_they_generate_alone() {
    let (_d, model) = model();
    let all = sequences(&model);
    let expected: Vec<Generation> = all.iter().map(|s| alone(&model, s)).collect();
    // Join two at once, then one per step, then the last after some rows have finished.
    let joins: BTreeMap<usize, Vec<usize>> =
        [(0, vec![0, 1]), (1, vec![2]), (2, vec![3]), (6, vec![4, 5])].into();
    for prefix in [false, true] {
        let shared = if prefix {
            SharedPrefix::common(&model, &all[0].prompt, &all[3].prompt).unwrap()
        } else {
            None
        };
        assert_eq!(shared.is_some(), prefix, "the prompts share an opening");
        let mut batcher = Batcher::new(&model).with_shared_prefix(shared.as_ref());
        let mut got: BTreeMap<usize, Generation> = BTreeMap::new();
        let mut streamed: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        let mut step = 0;
        while got.len() < all.len() {
            if let Some(join) = joins.get(&step) {
                let admitted = join.iter().map(|&i| (i, all[i].clone())).collect();
                batcher.admit(admitted, Padding::Left).unwrap();
            }
            let finished = batcher
                .step(&mut |&i, seen| {
                    streamed.entry(i).or_default().push(seen.token);
                    Flow::Continue
                })
                .unwrap();
            got.extend(finished);
            assert!(batcher.len() <= all.len());
            step += 1;
        }
        for (i, e) in expected.iter().enumerate() {
            assert_eq!(&got[&i], e, "sequence {i}, shared prefix {prefix}");
            assert_eq!(streamed.get(&i).cloned().unwrap_or_default(), e.tokens);
        }
    }
}

#[test]
fn a_finished_row_leaves_at_once_and_a_halted_one_keeps_its_tokens() {
    let (_d, model) = model();
    let all = sequences(&model);
    let mut batcher = Batcher::new(&model);
    batcher
        .admit(
            vec![(0, all[0].clone()), (3, all[3].clone())],
            Padding::Left,
        )
        .unwrap();
    // Sequence 3 may write one token: it leaves with the first step (unless the model ends
    // it sooner), while 0 runs on until halted at its third token.
    let first = batcher.step(&mut |_, _| Flow::Continue).unwrap();
    assert_eq!(first.iter().map(|(k, _)| *k).collect::<Vec<_>>(), vec![3]);
    assert_eq!(batcher.len(), 1);
    let mut finished = Vec::new();
    let mut seen = 0;
    while !batcher.is_empty() {
        finished.extend(
            batcher
                .step(&mut |_, _| {
                    seen += 1;
                    if seen == 2 {
                        Flow::Halt
                    } else {
                        Flow::Continue
                    }
                })
                .unwrap(),
        );
    }
    let (key, g) = &finished[0];
    assert_eq!(*key, 0);
    let free = alone(&model, &all[0]);
    assert!(
        free.tokens.len() >= 3,
        "the test needs a sequence that runs past its third token"
    );
    assert_eq!(g.finish, FinishReason::Halted);
    assert_eq!(g.tokens, free.tokens[..3]);
}

#[test]
fn ignore_eos_runs_the_whole_budget_past_the_end_token() {
    let (_d, model) = model();
    // A sampled sequence with a long budget that the model ends early on its own.
    let stopping = (0..64u64)
        .map(|seed| Sequence {
            seed,
            max_new_tokens: 40,
            sampling: SAMPLED,
            steering: None,
            ..sequences(&model)[0].clone()
        })
        .find(|s| alone(&model, s).finish == FinishReason::Stop)
        .expect("the tiny model ends some sampled answer before 40 tokens");
    let ended = alone(&model, &stopping);
    let mut got = None;
    let ignoring = Sequence {
        ignore_eos: true,
        ..stopping
    };
    Batcher::new(&model)
        .run_queue(vec![(0, ignoring)], 1, Padding::Left, &mut |_, g| {
            got = Some(g);
            Ok::<(), refusal_steer_engine::EngineError>(())
        })
        .unwrap();
    let got = got.unwrap();
    assert_eq!(got.finish, FinishReason::Length);
    assert_eq!(got.tokens.len(), 40);
    assert_eq!(got.tokens[..ended.tokens.len()], ended.tokens);
    assert_eq!(Some(got.tokens[ended.tokens.len()]), ended.stop_token);
}

#[test]
fn bad_sequences_are_refused_and_the_batch_goes_on() {
    let (_d, model) = model();
    let all = sequences(&model);
    let mut batcher = Batcher::new(&model);
    batcher
        .admit(vec![(0, all[0].clone())], Padding::Left)
        .unwrap();
    let mut restricted = steering(&model, 1, Positions::All).to_vec();
    restricted[0].rows = Rows::Only(vec![0]);
    let bad = [
        Sequence {
            prompt: Vec::new(),
            ..all[1].clone()
        },
        Sequence {
            max_new_tokens: 10_000,
            ..all[1].clone()
        },
        Sequence {
            steering: Some(Arc::from(restricted)),
            ..all[1].clone()
        },
    ];
    let reasons = [
        "prompt is empty",
        "exceeds the model's context",
        "its own row",
    ];
    for (s, reason) in bad.into_iter().zip(reasons) {
        let err = batcher
            .admit(vec![(1, all[1].clone()), (9, s)], Padding::Left)
            .unwrap_err()
            .to_string();
        assert!(err.contains(reason), "{err}");
        assert_eq!(batcher.len(), 1, "nothing of a refused admission joins");
    }
    let mut done = Vec::new();
    while !batcher.is_empty() {
        done.extend(batcher.step(&mut |_, _| Flow::Continue).unwrap());
    }
    assert_eq!(done, vec![(0, alone(&model, &all[0]))]);
}
