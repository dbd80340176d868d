//! Intervention points on a tiny random-weight model: what they capture, that they change
//! exactly what they are told to and nothing else, and that batching changes nothing.

use refusal_steer_engine::{
    generate, prefill, tiny, Action, FinishReason, Flow, GenerateOptions, Intervention, Logits,
    Model, Padding, Positions, Request, Rows, Sampling, SharedPrefix,
};

mod common;
use common::model;

const PROMPTS: [&str; 3] = ["the cat sat", "in an hour there", "a"];

/// Runs one padded prefill over `prompts` and returns the logits of every row's last token.
fn last_logits(
    model: &Model,
    prompts: &[&str],
    hooks: &mut refusal_steer_engine::Hooks,
) -> Vec<Vec<f32>> {
    let encoded: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| model.tokenizer.encode(p, false, true))
        .collect();
    let len = encoded.iter().map(Vec::len).max().unwrap();
    let mut tokens = vec![0; prompts.len() * len];
    let mut valid = vec![false; prompts.len() * len];
    for (r, e) in encoded.iter().enumerate() {
        let offset = len - e.len();
        for (i, &t) in e.iter().enumerate() {
            tokens[r * len + offset + i] = t;
            valid[r * len + offset + i] = true;
        }
    }
    let mut cache = model.new_cache(prompts.len(), len);
    let chunk = cache.begin(valid, len, true).unwrap();
    model
        .forward(&tokens, &chunk, &mut cache, hooks, Logits::Last)
        .unwrap()
        .to_vec2()
        .unwrap()
}

fn steering(model: &Model) -> Vec<f32> {
    (0..model.config.d_model)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0)
        .collect()
}

#[test]
fn add_with_zero_alpha_changes_nothing() {
    let (_d, model) = model();
    let plain = last_logits(&model, &PROMPTS, &mut model.new_hooks());
    let mut hooks = model.new_hooks();
    for point in 0..=model.config.n_layers {
        let iv = Intervention {
            point,
            action: Action::Add {
                vector: steering(&model),
                alpha: 0.0,
            },
            rows: Rows::All,
            positions: Positions::All,
        };
        hooks.add(iv).unwrap();
    }
    assert_eq!(last_logits(&model, &PROMPTS, &mut hooks), plain);
}

#[test]
fn hooks_on_one_row_leave_the_other_rows_bit_identical() {
    let (_d, model) = model();
    let plain = last_logits(&model, &PROMPTS, &mut model.new_hooks());
    let mut hooks = model.new_hooks();
    let iv = Intervention {
        point: 1,
        action: Action::Add {
            vector: steering(&model),
            alpha: 2.0,
        },
        rows: Rows::Only(vec![1]),
        positions: Positions::All,
    };
    hooks.add(iv).unwrap();
    let steered = last_logits(&model, &PROMPTS, &mut hooks);
    assert_eq!(steered[0], plain[0]);
    assert_eq!(steered[2], plain[2]);
    assert_ne!(steered[1], plain[1]);
}

#[test]
fn project_out_leaves_no_component_along_the_direction() {
    let (_d, model) = model();
    let u = steering(&model);
    let mut hooks = model.new_hooks();
    hooks
        .add(Intervention {
            point: 2,
            action: Action::ProjectOut {
                direction: u.clone(),
                scale: 1.0,
            },
            rows: Rows::All,
            positions: Positions::All,
        })
        .unwrap();
    hooks
        .add(Intervention {
            point: 2,
            action: Action::Capture,
            rows: Rows::All,
            positions: Positions::All,
        })
        .unwrap();
    last_logits(&model, &PROMPTS, &mut hooks);
    let norm_u: f32 = u.iter().map(|x| x * x).sum::<f32>().sqrt();
    let captured = hooks.take_captured();
    assert_eq!(
        captured.len(),
        PROMPTS
            .iter()
            .map(|p| model.tokenizer.encode(p, false, true).len())
            .sum::<usize>()
    );
    for c in captured {
        let norm_h: f32 = c.values.iter().map(|x| x * x).sum::<f32>().sqrt();
        let dot: f32 = c.values.iter().zip(&u).map(|(a, b)| a * b).sum();
        assert!(
            dot.abs() / (norm_h * norm_u) < 1e-5,
            "cosine {} after projection",
            dot / (norm_h * norm_u)
        );
    }
}

#[test]
fn capture_at_the_last_point_is_what_the_head_reads() {
    // Adding v at point l must shift the captured stream at point l by exactly v, and the
    // capture at the last point, fed through the model's head, must give the model's logits.
    let (_d, model) = model();
    let n = model.config.n_layers;
    let v = steering(&model);
    let mut hooks = model.new_hooks();
    hooks
        .add(Intervention {
            point: n,
            action: Action::Capture,
            rows: Rows::All,
            positions: Positions::LastPrompt,
        })
        .unwrap();
    hooks
        .add(Intervention {
            point: n,
            action: Action::Add {
                vector: v.clone(),
                alpha: 1.0,
            },
            rows: Rows::All,
            positions: Positions::All,
        })
        .unwrap();
    hooks
        .add(Intervention {
            point: n,
            action: Action::Capture,
            rows: Rows::All,
            positions: Positions::LastPrompt,
        })
        .unwrap();
    let logits = last_logits(&model, &PROMPTS, &mut hooks);
    let captured = hooks.take_captured();
    assert_eq!(captured.len(), 2 * PROMPTS.len());
    let (before, after) = captured.split_at(PROMPTS.len());
    for (b, a) in before.iter().zip(after) {
        assert_eq!(b.row, a.row);
        for ((x, y), d) in b.values.iter().zip(&a.values).zip(&v) {
            assert!((y - x - d).abs() < 1e-5);
        }
    }
    for a in after {
        let head = model.logits_from_hidden(&a.values).unwrap();
        let diff = head
            .iter()
            .zip(&logits[a.row])
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff < 1e-4,
            "row {}: head of the captured stream differs by {diff}",
            a.row
        );
    }
}

#[test]
fn generated_positions_leave_the_prompt_untouched() {
    let (_d, model) = model();
    let plain = last_logits(&model, &PROMPTS, &mut model.new_hooks());
    let mut hooks = model.new_hooks();
    let iv = Intervention {
        point: 1,
        action: Action::Add {
            vector: steering(&model),
            alpha: 3.0,
        },
        rows: Rows::All,
        positions: Positions::Generated,
    };
    hooks.add(iv).unwrap();
    assert_eq!(last_logits(&model, &PROMPTS, &mut hooks), plain);
}

#[test]
fn batched_generation_equals_one_at_a_time() {
    let (_d, model) = model();
    for padding in [Padding::Left, Padding::Right] {
        for sampling in [
            Sampling::GREEDY,
            Sampling {
                temperature: 0.8,
                top_p: 0.95,
                top_k: 40,
                repetition_penalty: 1.1,
            },
        ] {
            let options = GenerateOptions {
                max_new_tokens: 12,
                sampling,
                padding,
                thinking: None,
            };
            let requests: Vec<Request> = PROMPTS
                .iter()
                .enumerate()
                .map(|(i, p)| Request {
                    prompt: model.tokenizer.encode(p, false, true),
                    seed: i as u64,
                })
                .collect();
            let batched =
                generate(&model, &requests, &options, None, &mut |_| Flow::Continue).unwrap();
            for (r, request) in requests.iter().enumerate() {
                let alone = generate(
                    &model,
                    std::slice::from_ref(request),
                    &options,
                    None,
                    &mut |_| Flow::Continue,
                )
                .unwrap();
                assert_eq!(
                    alone[0].tokens, batched[r].tokens,
                    "row {r}, {padding:?}, {sampling:?}"
                );
            }
        }
    }
}

#[test]
fn bad_interventions_are_rejected_with_reasons() {
    let (_d, model) = model();
    let mut hooks = model.new_hooks();
    let err = hooks
        .add(Intervention {
            point: 99,
            action: Action::Capture,
            rows: Rows::All,
            positions: Positions::All,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("point 99 does not exist"), "{err}");
    let err = hooks
        .add(Intervention {
            point: 1,
            action: Action::Add {
                vector: vec![1.0; 3],
                alpha: 1.0,
            },
            rows: Rows::All,
            positions: Positions::All,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("3 dimensions"), "{err}");
    let err = hooks
        .add(Intervention {
            point: 1,
            action: Action::ProjectOut {
                direction: vec![0.0; model.config.d_model],
                scale: 1.0,
            },
            rows: Rows::All,
            positions: Positions::All,
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("zero direction"), "{err}");
}

#[test]
fn halting_a_row_ends_it_and_leaves_the_others_alone() {
    let (_d, model) = model();
    let options = GenerateOptions {
        max_new_tokens: 10,
        sampling: Sampling::GREEDY,
        padding: Padding::Left,
        thinking: None,
    };
    let requests: Vec<Request> = PROMPTS[..2]
        .iter()
        .map(|p| Request {
            prompt: model.tokenizer.encode(p, false, true),
            seed: 0,
        })
        .collect();
    let run = |on_token: &mut dyn FnMut(refusal_steer_engine::Sampled<'_>) -> Flow| {
        generate(&model, &requests, &options, None, on_token).unwrap()
    };
    let free = run(&mut |_| Flow::Continue);
    let mut seen = [0usize; 2];
    let halted = run(&mut |s| {
        seen[s.row] += 1;
        assert_eq!(s.logits.len(), model.config.vocab_size);
        if s.row == 0 && seen[0] == 3 {
            Flow::Halt
        } else {
            Flow::Continue
        }
    });
    assert_eq!(halted[0].tokens, free[0].tokens[..3]);
    assert_eq!(halted[0].finish, FinishReason::Halted);
    assert_eq!(halted[1], free[1]);
    assert_eq!(seen, [3, free[1].tokens.len()]);
}

#[test]
fn context_overflow_is_a_clear_error() {
    let (_d, model) = model();
    let options = GenerateOptions {
        max_new_tokens: 1000,
        sampling: Sampling::GREEDY,
        padding: Padding::Left,
        thinking: None,
    };
    let request = Request {
        prompt: model.tokenizer.encode("the", false, true),
        seed: 0,
    };
    let err = generate(&model, &[request], &options, None, &mut |_| Flow::Continue)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("exceeds the model's context of 256 tokens"),
        "{err}"
    );
}

#[test]
fn truncated_and_foreign_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.gguf");
    tiny::write(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Model::load(&path)
        .err()
        .expect("truncated file must not load")
        .to_string();
    assert!(err.contains("not a usable GGUF model"), "{err}");
    std::fs::write(&path, b"definitely not gguf").unwrap();
    assert!(Model::load(&path).is_err());
}

/// Captures at the last prompt token of every row at `points`, through `run`.
fn captured_at(
    model: &Model,
    points: &[usize],
    run: impl FnOnce(&mut refusal_steer_engine::Hooks),
) -> Vec<(usize, usize, Vec<f32>)> {
    let mut hooks = model.new_hooks();
    for &point in points {
        hooks
            .add(Intervention {
                point,
                action: Action::Capture,
                rows: Rows::All,
                positions: Positions::LastPrompt,
            })
            .unwrap();
    }
    run(&mut hooks);
    let mut out: Vec<_> = hooks
        .take_captured()
        .into_iter()
        .map(|c| (c.point, c.row, c.values))
        .collect();
    out.sort_by_key(|(point, row, _)| (*point, *row));
    out
}

fn encoded(model: &Model, prompts: &[&str]) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| model.tokenizer.encode(p, false, true))
        .collect()
}

#[test]
fn a_pass_without_logits_stops_after_the_last_hook_and_cannot_be_continued() {
    let (_d, model) = model();
    let tokens = encoded(&model, &PROMPTS);
    let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    let full = captured_at(&model, &[1], |hooks| {
        prefill(&model, &refs, Padding::Left, 0, hooks, Logits::Last).unwrap();
    });
    let mut cache = None;
    let early = captured_at(&model, &[1], |hooks| {
        let (c, logits) = prefill(&model, &refs, Padding::Left, 1, hooks, Logits::None).unwrap();
        assert_eq!(logits.dims(), &[PROMPTS.len(), 0]);
        cache = Some(c);
    });
    assert_eq!(early, full);
    assert_eq!(early.len(), PROMPTS.len());
    // The blocks after point 1 never ran: continuing is refused, not silently wrong.
    let mut cache = cache.unwrap();
    let chunk = cache.begin(vec![true; PROMPTS.len()], 1, false).unwrap();
    let err = model
        .forward(
            &vec![1; PROMPTS.len()],
            &chunk,
            &mut cache,
            &mut model.new_hooks(),
            Logits::Last,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("stopped early"), "{err}");
}

#[test]
fn a_shared_prefix_run_once_gives_what_running_prompts_whole_gives() {
    let (_d, model) = model();
    let opening = "in an hour";
    let prompts = ["in an hour the cat sat", "in an hour there", "in an hour a"];
    let tokens = encoded(&model, &prompts);
    let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
    let (a, b) = (encoded(&model, &[opening])[0].clone(), tokens[0].clone());
    let prefix = SharedPrefix::common(&model, &a, &b).unwrap().unwrap();
    let points: Vec<usize> = (0..=model.config.n_layers).collect();
    let mut logits = (None, None);
    let whole = captured_at(&model, &points, |hooks| {
        logits.0 = Some(
            prefill(&model, &refs, Padding::Left, 0, hooks, Logits::Last)
                .unwrap()
                .1,
        );
    });
    let shared = captured_at(&model, &points, |hooks| {
        logits.1 = Some(
            prefix
                .prefill(&model, &refs, 0, hooks, Logits::Last)
                .unwrap()
                .1,
        );
    });
    assert_eq!(whole.len(), shared.len());
    for ((point, row, w), (_, _, s)) in whole.iter().zip(&shared) {
        for (x, y) in w.iter().zip(s) {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + x.abs()),
                "point {point} row {row}: {x} vs {y}"
            );
        }
    }
    let (w, s): (Vec<Vec<f32>>, Vec<Vec<f32>>) = (
        logits.0.unwrap().to_vec2().unwrap(),
        logits.1.unwrap().to_vec2().unwrap(),
    );
    for (w, s) in w.iter().flatten().zip(s.iter().flatten()) {
        assert!((w - s).abs() <= 1e-4 * (1.0 + w.abs()), "{w} vs {s}");
    }
    // A prompt that is all opening still runs its last token itself.
    let short = [a.as_slice()];
    let (_, l) = prefix
        .prefill(&model, &short, 0, &mut model.new_hooks(), Logits::Last)
        .unwrap();
    assert_eq!(l.dims(), &[1, model.config.vocab_size]);
}
