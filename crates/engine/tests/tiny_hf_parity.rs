//! Hugging Face checkpoint folders of every class the reader knows (Llama 3 rope scaling,
//! Qwen2, Qwen3, Qwen3-MoE, Gemma 3) against transformers on the same folder
//! (`fixtures/transformers/tiny/`, made by `scripts/reference/make_tiny_hf_fixtures.py`):
//! the tokenizer read from `tokenizer.json` gives transformers' ids, and the forward pass its
//! logits at every position of three token sequences.
//!
//! Both compute in f32 from the same bf16 and f32 weights, so only the summation order
//! differs: logits agree within 2e-5. `TOLERANCE` still fails a Llama file read without
//! the row permutation or the rope factors, a Gemma file without `1 + w` or with the window
//! one token off (checked when this test was written).

mod common;

use refusal_steer_engine::tiny::{write_checkpoint, HfVariant};
use refusal_steer_engine::Model;
use serde::Deserialize;
use std::path::PathBuf;

const TOLERANCE: f32 = 1e-3;

#[derive(Deserialize)]
struct Fixture {
    sha256: String,
    tokens: Vec<Tokens>,
    cases: Vec<Case>,
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

fn check(variant: HfVariant) {
    std::env::set_var("RAYON_NUM_THREADS", "1");
    let name = variant.name();
    let fixture: Fixture = serde_json::from_str(
        &std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!(
            "../../fixtures/transformers/tiny/logits-{name}.json"
        )))
        .unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join(format!("tiny-hf-{name}"));
    write_checkpoint(&folder, variant).unwrap();
    assert_eq!(
        refusal_steer_catalog::model_sha256(&folder).unwrap(),
        fixture.sha256,
        "the tiny {name} checkpoint is not the one transformers read: rerun scripts/reference/make_tiny_hf_fixtures.py"
    );
    let model = Model::load(&folder).unwrap();
    for t in &fixture.tokens {
        assert_eq!(
            model.tokenizer.encode(&t.text, true, true),
            t.ids,
            "{name}: tokens of {:?}",
            t.text
        );
    }
    for case in &fixture.cases {
        let logits = common::logits_at_every_position(&model, &case.ids);
        for (pos, (ids, reference)) in case.top_ids.iter().zip(&case.top_logits).enumerate() {
            for (&id, &r) in ids.iter().zip(reference) {
                let ours = logits[pos][id as usize];
                assert!(
                    (ours - r).abs() < TOLERANCE,
                    "{name}, sequence of {}, position {pos}: token {id} has logit {ours} here, {r} in transformers",
                    case.ids.len()
                );
            }
        }
    }
}

#[test]
fn tiny_llama3_checkpoint_matches_transformers() {
    check(HfVariant::Llama3);
}

#[test]
fn tiny_qwen2_checkpoint_matches_transformers() {
    check(HfVariant::Qwen2);
}

#[test]
fn tiny_qwen3_checkpoint_matches_transformers() {
    check(HfVariant::Qwen3);
}

#[test]
fn tiny_gemma3_checkpoint_matches_transformers() {
    check(HfVariant::Gemma3);
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

#[test]
fn tiny_qwen3moe_checkpoint_matches_transformers() {
    check(HfVariant::Qwen3Moe);
}
