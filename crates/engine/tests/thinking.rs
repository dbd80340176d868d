//! A reasoning budget: past `max_tokens` tokens of reasoning the close is written in, and the
//! answer after it has its own `max_new_tokens`; a row that never reasons is left alone.

mod common;

use refusal_steer_engine::{
    Batcher, EngineError, FinishReason, Generation, Model, Padding, Sampling, Sequence,
    ThinkingBudget,
};

fn run(model: &Model, prompt: &str, max_new: usize, budget: Option<&ThinkingBudget>) -> Generation {
    let sequence = Sequence {
        prompt: model.tokenizer.encode(prompt, false, true),
        seed: 0,
        sampling: Sampling::GREEDY,
        max_new_tokens: max_new,
        steering: None,
        thinking: budget.cloned(),
        ignore_eos: false,
    };
    let mut out = None;
    Batcher::new(model)
        .run_queue(vec![(0, sequence)], 1, Padding::Left, &mut |_, g| {
            out = Some(g);
            Ok::<(), EngineError>(())
        })
        .unwrap();
    out.unwrap()
}

#[test]
fn spent_reasoning_is_closed_and_the_answer_keeps_its_own_budget() {
    let (_dir, model) = common::model();
    let budget = ThinkingBudget::new(&model, 3).unwrap();
    let close = model.tokenizer.encode("\n</think>\n\n", false, true);
    let end = model.tokenizer.token_to_id("</think>").unwrap();
    assert!(close.contains(&end));

    let prompt = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n<think>\n";
    let out = run(&model, prompt, 4, Some(&budget));
    let reasoned = &out.tokens[..3];
    assert!(
        !reasoned.contains(&end),
        "the tiny model closed its reasoning by itself"
    );
    assert_eq!(out.tokens[3..3 + close.len()], close[..]);
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(out.tokens.len(), 3 + close.len() + 4);

    // Without a budget the same reasoning runs into max_new_tokens.
    let unbudgeted = run(&model, prompt, 4, None);
    assert_eq!(unbudgeted.tokens.len(), 4);
    assert_eq!(unbudgeted.tokens[..3], out.tokens[..3]);

    // A row that never opens its reasoning is not touched.
    let plain = "<|im_start|>user\nthe cat<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(
        run(&model, plain, 6, Some(&budget)).tokens,
        run(&model, plain, 6, None).tokens
    );
}
