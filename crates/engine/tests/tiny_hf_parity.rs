//! Hugging Face checkpoint folders of every class the reader knows (Llama 3 rope scaling,
//! Qwen2, Qwen3, Qwen3-MoE, Gemma 3) against transformers on the same folder
//! (`fixtures/transformers/tiny/`, made by `scripts/reference/make_tiny_hf_fixtures.py`), and
//! the same folders converted to GGUF by llama.cpp's own `convert_hf_to_gguf.py`
//! (`fixtures/llama.cpp/converted/`, f32 and Q8_0) against the same reference:
//! - the tokenizer gives transformers' ids for texts and for 20 chat prompts rendered by the
//!   model's chat template;
//! - the forward pass gives its logits at every position of three token sequences and of the
//!   chat prompts, the same top token everywhere, and the same greedy continuations (the Q8_0
//!   file: the same top token wherever transformers' margin is clear of its bound).
//!
//! The folder and the f32 file compute in f32 from the same bf16-exact weights, so only the
//! summation order differs: logits agree within 2e-5. `EXACT` still fails a Llama file
//! read without the row permutation or the rope factors, a Gemma file without `1 + w` or with
//! the window one token off (checked when this test was written).
//!
//! Q8_0 rounds the weights to 8 bits per block of 32 and, as llama.cpp does, the activations
//! too, at the same precision. Rounding the weights alone moves transformers' logits (of scale
//! 2.7 here) by `q8_0_weight_effect` at most (0.07-0.28, recorded with the fixture); the Q8_0
//! file's logits may differ by three times that at most and by that on average. A misread
//! file misses by the logits' own scale.

mod common;

use refusal_steer_engine::tiny::{write_checkpoint, HfVariant};
use refusal_steer_engine::Model;
use refusal_steer_tokenizer::Message;
use serde::Deserialize;
use std::path::{Path, PathBuf};

const EXACT: Bound = Bound {
    largest: 1e-3,
    mean: 1e-3,
};

#[derive(Deserialize)]
struct Fixture {
    sha256: String,
    tokens: Vec<Tokens>,
    cases: Vec<Case>,
    chats: Vec<Chat>,
    q8_0_weight_effect: f32,
}

#[derive(Deserialize)]
struct Tokens {
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Case {
    ids: Vec<u32>,
    top_ids: Vec<Vec<u32>>,
    top_logits: Vec<Vec<f32>>,
}

#[derive(Deserialize)]
struct Chat {
    prompt: String,
    ids: Vec<u32>,
    top_ids: Vec<Vec<u32>>,
    top_logits: Vec<Vec<f32>>,
    greedy: Vec<u32>,
}

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn fixture(variant: HfVariant) -> Fixture {
    let path = repo(&format!(
        "fixtures/transformers/tiny/logits-{}.json",
        variant.name()
    ));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// How far a model's logits may be from transformers'.
struct Bound {
    largest: f32,
    mean: f32,
}

/// |ours - transformers'| for the reference's top logits at every position, after checking
/// that the top token is the same (logits within `largest` can only swap two tokens whose
/// reference margin is under twice that).
fn logit_errors(
    what: &str,
    model: &Model,
    ids: &[u32],
    top_ids: &[Vec<u32>],
    top: &[Vec<f32>],
    bound: &Bound,
) -> Vec<f32> {
    let logits = common::logits_at_every_position(model, ids);
    let mut errors = Vec::new();
    for (pos, (ids, reference)) in top_ids.iter().zip(top).enumerate() {
        let ours = &logits[pos];
        let argmax = argmax(ours);
        let margin = reference[0] - reference[1];
        assert!(
            argmax == ids[0] as usize || margin < 2.0 * bound.largest,
            "{what}, position {pos}: top token {argmax} here, {} in transformers (margin {margin})",
            ids[0]
        );
        for (&id, &r) in ids.iter().zip(reference) {
            errors.push((ours[id as usize] - r).abs());
        }
    }
    errors
}

fn argmax(logits: &[f32]) -> usize {
    (0..logits.len())
        .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
        .unwrap()
}

fn greedy(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    let mut sequence = prompt.to_vec();
    for _ in 0..n {
        let logits = common::logits_at_every_position(model, &sequence);
        sequence.push(argmax(logits.last().unwrap()) as u32);
    }
    sequence.split_off(prompt.len())
}

/// Checks `model` against the fixture: tokens, logits within `bound`, and (when `exact`) the
/// greedy continuations.
fn check_model(what: &str, model: &Model, fixture: &Fixture, bound: &Bound, exact: bool) {
    for t in &fixture.tokens {
        assert_eq!(
            model.tokenizer.encode(&t.text, true, true),
            t.ids,
            "{what}: tokens of {:?}",
            t.text
        );
    }
    let mut errors = Vec::new();
    for case in &fixture.cases {
        let what = format!("{what}, sequence of {}", case.ids.len());
        errors.extend(logit_errors(
            &what,
            model,
            &case.ids,
            &case.top_ids,
            &case.top_logits,
            bound,
        ));
    }
    for chat in &fixture.chats {
        let text = model
            .template
            .render(&[Message::new("user", &chat.prompt)], true)
            .unwrap();
        let ids = model.tokenizer.encode(&text, true, true);
        assert_eq!(ids, chat.ids, "{what}: the chat prompt {:?}", chat.prompt);
        let what = format!("{what}, chat {:?}", chat.prompt);
        errors.extend(logit_errors(
            &what,
            model,
            &ids,
            &chat.top_ids,
            &chat.top_logits,
            bound,
        ));
        if exact {
            assert_eq!(
                greedy(model, &ids, chat.greedy.len()),
                chat.greedy,
                "{what}: greedy continuation"
            );
        }
    }
    let largest = errors.iter().copied().fold(0f32, f32::max);
    let mean = errors.iter().sum::<f32>() / errors.len() as f32;
    eprintln!("{what}: logits differ by {largest:.2e} at most, {mean:.2e} on average");
    assert!(
        largest < bound.largest && mean < bound.mean,
        "{what}: logits differ from transformers' by {largest} at most and {mean} on average, over {} and {}",
        bound.largest,
        bound.mean
    );
}

fn check(variant: HfVariant) {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let name = variant.name();
    let fixture = fixture(variant);
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join(format!("tiny-hf-{name}"));
    write_checkpoint(&folder, variant).unwrap();
    assert_eq!(
        refusal_steer_catalog::model_sha256(&folder).unwrap(),
        fixture.sha256,
        "the tiny {name} checkpoint is not the one transformers read: rerun scripts/reference/make_tiny_hf_fixtures.py"
    );
    check_model(
        &format!("{name} folder"),
        &Model::load(&folder).unwrap(),
        &fixture,
        &EXACT,
        true,
    );
    let converted = |outtype: &str| -> Model {
        let path = repo(&format!(
            "fixtures/llama.cpp/converted/tiny-{name}-{outtype}.gguf"
        ));
        Model::load(Path::new(&path)).unwrap()
    };
    check_model(
        &format!("{name} f32 GGUF"),
        &converted("f32"),
        &fixture,
        &EXACT,
        true,
    );
    let effect = fixture.q8_0_weight_effect;
    let q8_0 = Bound {
        largest: 3.0 * effect,
        mean: effect,
    };
    check_model(
        &format!("{name} Q8_0 GGUF"),
        &converted("q8_0"),
        &fixture,
        &q8_0,
        false,
    );
}

#[test]
fn tiny_llama3_checkpoint_and_its_gguf_match_transformers() {
    check(HfVariant::Llama3);
}

#[test]
fn tiny_qwen2_checkpoint_and_its_gguf_match_transformers() {
    check(HfVariant::Qwen2);
}

#[test]
fn tiny_qwen3_checkpoint_and_its_gguf_match_transformers() {
    check(HfVariant::Qwen3);
}

#[test]
fn tiny_gemma3_checkpoint_and_its_gguf_match_transformers() {
    check(HfVariant::Gemma3);
}

#[test]
fn tiny_qwen3moe_checkpoint_and_its_gguf_match_transformers() {
    check(HfVariant::Qwen3Moe);
}

#[test]
fn a_broken_folder_is_refused_with_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("tiny");
    write_checkpoint(&folder, HfVariant::Qwen2).unwrap();
    let config = folder.join("config.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    let outcome = || match Model::load(&folder) {
        Ok(_) => "loaded".to_string(),
        Err(e) => e.to_string(),
    };
    let load_with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut c = original.clone();
        edit(&mut c);
        std::fs::write(&config, c.to_string()).unwrap();
        outcome()
    };
    let moe = load_with(&|c| c["architectures"] = serde_json::json!(["MixtralForCausalLM"]));
    assert!(
        moe.contains("MixtralForCausalLM") && moe.contains("supported:"),
        "{moe}"
    );
    let scaling = load_with(&|c| c["rope_scaling"] = serde_json::json!({"rope_type": "yarn"}));
    assert!(
        scaling.contains("\"yarn\" of the full_attention layers is not supported"),
        "{scaling}"
    );
    let no_heads = load_with(&|c| {
        c.as_object_mut().unwrap().remove("num_attention_heads");
    });
    assert!(no_heads.contains("num_attention_heads"), "{no_heads}");
    let wrong_width = load_with(&|c| c["intermediate_size"] = serde_json::json!(96));
    assert!(
        wrong_width.contains("has shape [128, 64], but config.json makes it [96, 64]"),
        "{wrong_width}"
    );
    assert_eq!(load_with(&|_| {}), "loaded");

    let weights = folder.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let truncated = outcome();
    assert!(truncated.contains("safetensors"), "{truncated}");

    std::fs::rename(&weights, folder.join("shard-1.safetensors")).unwrap();
    let index = r#"{"weight_map": {"model.embed_tokens.weight": "shard-1.safetensors",
                                   "model.norm.weight": "shard-2.safetensors"}}"#;
    std::fs::write(folder.join("model.safetensors.index.json"), index).unwrap();
    let missing_shard = outcome();
    assert!(
        missing_shard.contains("shard-2.safetensors, which is missing"),
        "{missing_shard}"
    );
    std::fs::remove_file(folder.join("model.safetensors.index.json")).unwrap();
    let no_weights = outcome();
    assert!(no_weights.contains("model.safetensors"), "{no_weights}");
    std::fs::remove_file(&config).unwrap();
    let no_config = outcome();
    assert!(no_config.contains("config.json is missing"), "{no_config}");
}

/// llama.cpp reads `sliding_window_pattern` as a number (every n-th layer global) or as one
/// flag per layer; the tiny Gemma 3 file's converter wrote neither (llama.cpp's default, every
/// sixth layer global). The flags of that same pattern give the same logits to the bit, other
/// flags other logits, and a flag count that is not the layer count is refused.
#[test]
fn a_gemma3_pattern_given_as_one_flag_per_layer_reads_as_the_number() {
    use candle_core::quantized::gguf_file::{self, Content, Value};
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let source = repo("fixtures/llama.cpp/converted/tiny-gemma3-f32.gguf");
    let mut reader = std::fs::File::open(&source).unwrap();
    let content = Content::read(&mut reader).unwrap();
    let key = "gemma3.attention.sliding_window_pattern";
    assert!(!content.metadata.contains_key(key));
    let tensors: Vec<_> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let t = content
                .tensor(&mut reader, name, &candle_core::Device::Cpu)
                .unwrap();
            (name.clone(), t)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let with_flags = |flags: &[bool]| -> PathBuf {
        let mut metadata = content.metadata.clone();
        let array = flags.iter().map(|&f| Value::Bool(f)).collect();
        metadata.insert(key.to_string(), Value::Array(array));
        let path = dir.path().join(format!("flags-{}.gguf", flags.len()));
        let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &_)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
        gguf_file::write(
            &mut std::fs::File::create(&path).unwrap(),
            &metadata,
            &tensors,
        )
        .unwrap();
        path
    };
    // Longer than the window (4 tokens), so that windowed and global layers differ.
    let ids: Vec<u32> = (10..22).collect();
    let logits = |path: &Path| common::logits_at_every_position(&Model::load(path).unwrap(), &ids);
    let by_number = logits(&source);
    let sixth_global: Vec<bool> = (0..6).map(|l| l % 6 != 5).collect();
    assert_eq!(logits(&with_flags(&sixth_global)), by_number);
    let all_global = [false; 6];
    assert_ne!(logits(&with_flags(&all_global)), by_number);
    let message = Model::load(&with_flags(&[true; 5]))
        .err()
        .unwrap()
        .to_string();
    assert!(
        message.contains("5 sliding-window flags for 6 layers"),
        "{message}"
    );
}
