//! A tiny llama-family model with random weights, written as a real GGUF file (byte-level BPE
//! vocabulary with a reasoning model's `<think>` markers, ChatML template), so tests and
//! benchmarks exercise the real loading path without downloading anything. [`Variant`]s add what other architectures carry (Qwen3's
//! query/key norms and wider heads, Llama 3's rope frequency factors, Qwen3-MoE's routed
//! experts), so the forward pass of
//! each can be checked against llama.cpp on a file both read (`fixtures/llama.cpp/tiny/`).

use crate::Result;
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::path::Path;

pub const N_LAYERS: usize = 3;
pub const D_MODEL: usize = 64;
const N_HEADS: usize = 4;
const N_KV_HEADS: usize = 2;
const FFN: usize = 128;
const EXPERTS: usize = 4;
const EXPERTS_USED: usize = 2;
const EXPERT_FFN: usize = 32;
const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// The 256 byte-level characters (GPT-2's table), then a few merges, then the special tokens.
fn vocabulary() -> (Vec<String>, Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = Vec::new();
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            b as char
        } else {
            next += 1;
            char::from_u32(next - 1).expect("valid")
        };
        tokens.push(c.to_string());
    }
    let merges: Vec<String> = ["t h", "th e", "Ġ t", "h e", "Ġt he", "i n", "a n", "e r"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![1i32; tokens.len()];
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(special.to_string());
        types.push(3);
    }
    // A reasoning model's markers, matched in text as Qwen3's are.
    for marker in ["<think>", "</think>"] {
        tokens.push(marker.to_string());
        types.push(4);
    }
    // Pad the vocabulary to a multiple of the quantization block.
    while !tokens.len().is_multiple_of(32) {
        tokens.push(format!("<unused{}>", tokens.len()));
        types.push(5);
    }
    (tokens, merges, types)
}

fn random(rows: usize, cols: usize, scale: f64, seed: u64) -> Result<Tensor> {
    // A fixed-seed generator so the model is the same file every time.
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let data: Vec<f32> = (0..rows * cols)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((state >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 2.0 * scale) as f32
        })
        .collect();
    Ok(Tensor::from_vec(data, (rows, cols), &Device::Cpu)?)
}

/// What the tiny file carries beyond the plain llama block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    Llama,
    /// `llama` with `rope_freqs.weight` (Llama 3.1's rope scaling) and linear rope scaling.
    Llama3,
    /// `qwen3`: per-head query/key RMS norms, heads twice as wide as `D_MODEL / N_HEADS`.
    Qwen3,
    /// `qwen3moe`: Qwen3 with `EXPERTS` routed experts, `EXPERTS_USED` per token.
    Qwen3Moe,
}

impl Variant {
    pub const ALL: [Self; 4] = [Self::Llama, Self::Llama3, Self::Qwen3, Self::Qwen3Moe];

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Llama3 => "llama3",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3moe",
        }
    }
}

/// Writes the tiny llama model to `path`.
pub fn write(path: &Path) -> Result<()> {
    write_variant(path, Variant::Llama)
}

/// Writes the tiny model of `variant` to `path` (the same bytes every time).
pub fn write_variant(path: &Path, variant: Variant) -> Result<()> {
    let (tokens, merges, types) = vocabulary();
    let vocab = tokens.len();
    let head_dim = match variant {
        Variant::Qwen3 | Variant::Qwen3Moe => 2 * D_MODEL / N_HEADS,
        _ => D_MODEL / N_HEADS,
    };
    let arch = match variant {
        Variant::Qwen3 => "qwen3",
        Variant::Qwen3Moe => "qwen3moe",
        _ => "llama",
    };
    let qwen3 = matches!(variant, Variant::Qwen3 | Variant::Qwen3Moe);
    // Routing turns a near-tie between experts into a different sum, so the experts' model
    // stays in f32: no 8-bit rounding of activations to flip a route between two engines.
    let matrix_type = match variant {
        Variant::Qwen3Moe => GgmlDType::F32,
        _ => GgmlDType::Q8_0,
    };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut seed = 1;
    let mut matrix = |name: String,
                      rows: usize,
                      cols: usize,
                      tensors: &mut Vec<(String, QTensor)>|
     -> Result<()> {
        seed += 1;
        let w = random(rows, cols, 1.0 / (cols as f64).sqrt() * 1.7, seed)?;
        tensors.push((name, QTensor::quantize(&w, matrix_type)?));
        Ok(())
    };
    let mut norm_seed = 1000;
    let mut norm = |name: String, len: usize, tensors: &mut Vec<(String, QTensor)>| -> Result<()> {
        // Weights near 1 where they are new, so a norm that is skipped or misplaced shows.
        let w = if variant == Variant::Llama {
            Tensor::ones(len, candle_core::DType::F32, &Device::Cpu)?
        } else {
            norm_seed += 1;
            (random(1, len, 0.5, norm_seed)?.flatten_all()? + 1.0)?
        };
        tensors.push((name, QTensor::quantize(&w, GgmlDType::F32)?));
        Ok(())
    };
    matrix("token_embd.weight".into(), vocab, D_MODEL, &mut tensors)?;
    for l in 0..N_LAYERS {
        norm(format!("blk.{l}.attn_norm.weight"), D_MODEL, &mut tensors)?;
        if qwen3 {
            norm(
                format!("blk.{l}.attn_q_norm.weight"),
                head_dim,
                &mut tensors,
            )?;
            norm(
                format!("blk.{l}.attn_k_norm.weight"),
                head_dim,
                &mut tensors,
            )?;
        }
        matrix(
            format!("blk.{l}.attn_q.weight"),
            N_HEADS * head_dim,
            D_MODEL,
            &mut tensors,
        )?;
        matrix(
            format!("blk.{l}.attn_k.weight"),
            N_KV_HEADS * head_dim,
            D_MODEL,
            &mut tensors,
        )?;
        matrix(
            format!("blk.{l}.attn_v.weight"),
            N_KV_HEADS * head_dim,
            D_MODEL,
            &mut tensors,
        )?;
        matrix(
            format!("blk.{l}.attn_output.weight"),
            D_MODEL,
            N_HEADS * head_dim,
            &mut tensors,
        )?;
        norm(format!("blk.{l}.ffn_norm.weight"), D_MODEL, &mut tensors)?;
        if variant == Variant::Qwen3Moe {
            // The router in f32, as converters keep it; a wide scale so routes differ.
            let router = random(EXPERTS, D_MODEL, 1.0, 700 + l as u64)?;
            tensors.push((
                format!("blk.{l}.ffn_gate_inp.weight"),
                QTensor::quantize(&router, GgmlDType::F32)?,
            ));
            for (part, rows, cols) in [
                ("gate", EXPERT_FFN, D_MODEL),
                ("up", EXPERT_FFN, D_MODEL),
                ("down", D_MODEL, EXPERT_FFN),
            ] {
                let w = random(
                    EXPERTS * rows,
                    cols,
                    1.7 / (cols as f64).sqrt(),
                    800 + l as u64,
                )?
                .reshape((EXPERTS, rows, cols))?;
                tensors.push((
                    format!("blk.{l}.ffn_{part}_exps.weight"),
                    QTensor::quantize(&w, matrix_type)?,
                ));
            }
            continue;
        }
        matrix(
            format!("blk.{l}.ffn_gate.weight"),
            FFN,
            D_MODEL,
            &mut tensors,
        )?;
        matrix(format!("blk.{l}.ffn_up.weight"), FFN, D_MODEL, &mut tensors)?;
        matrix(
            format!("blk.{l}.ffn_down.weight"),
            D_MODEL,
            FFN,
            &mut tensors,
        )?;
    }
    norm("output_norm.weight".into(), D_MODEL, &mut tensors)?;
    if variant == Variant::Llama3 {
        // Low frequencies slowed down, as Llama 3.1's long-context scaling does.
        let factors: Vec<f32> = (0..head_dim / 2)
            .map(|i| if i < head_dim / 4 { 1.0 } else { 8.0 })
            .collect();
        let w = Tensor::from_vec(factors, head_dim / 2, &Device::Cpu)?;
        tensors.push((
            "rope_freqs.weight".into(),
            QTensor::quantize(&w, GgmlDType::F32)?,
        ));
    }

    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let key = |k: &str| format!("{arch}.{k}");
    let mut metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), Value::U32(N_LAYERS as u32)),
        (key("context_length"), Value::U32(256)),
        (key("embedding_length"), Value::U32(D_MODEL as u32)),
        (key("feed_forward_length"), Value::U32(FFN as u32)),
        (key("attention.head_count"), Value::U32(N_HEADS as u32)),
        (
            key("attention.head_count_kv"),
            Value::U32(N_KV_HEADS as u32),
        ),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        // Llama 3's factors divide the slow frequencies: a low base makes them turn within
        // a short sequence, so a test sees them.
        (
            key("rope.freq_base"),
            Value::F32(if variant == Variant::Llama3 {
                100.0
            } else {
                10_000.0
            }),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("default".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        ("tokenizer.ggml.merges".into(), strings(&merges)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(
                tokens
                    .iter()
                    .position(|t| t == "<|im_end|>")
                    .expect("present") as u32,
            ),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(CHATML.into()),
        ),
    ];
    if qwen3 {
        metadata.push((key("attention.key_length"), Value::U32(head_dim as u32)));
        metadata.push((key("attention.value_length"), Value::U32(head_dim as u32)));
    }
    if variant == Variant::Llama3 {
        // Linear scaling on top of the factors: llama.cpp applies both.
        metadata.push((key("rope.scaling.type"), Value::String("linear".into())));
        metadata.push((key("rope.scaling.factor"), Value::F32(2.0)));
    }
    if variant == Variant::Qwen3Moe {
        metadata.push((key("expert_count"), Value::U32(EXPERTS as u32)));
        metadata.push((key("expert_used_count"), Value::U32(EXPERTS_USED as u32)));
        metadata.push((
            key("expert_feed_forward_length"),
            Value::U32(EXPERT_FFN as u32),
        ));
    }
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(|e| {
        crate::EngineError::BadFile {
            path: path.to_path_buf(),
            detail: format!("cannot create: {e}"),
        }
    })?);
    gguf_file::write(&mut file, &md, &ts)?;
    Ok(())
}

/// Tiny Hugging Face checkpoint folders, one per model class the folder reader knows, for
/// the transformers reference (`fixtures/transformers/tiny/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HfVariant {
    /// `LlamaForCausalLM` with Llama 3 rope scaling: rows permuted on load, factors computed.
    Llama3,
    /// `Qwen2ForCausalLM`: query/key/value biases.
    Qwen2,
    /// `Qwen3ForCausalLM`: per-head query/key norms, wide heads.
    Qwen3,
    /// `Gemma3ForCausalLM`: `1 + w` norms, sliding window, two rope bases, GELU.
    Gemma3,
    /// `Qwen3MoeForCausalLM`: Qwen3 with routed experts, one tensor per expert.
    Qwen3Moe,
}

impl HfVariant {
    pub const ALL: [Self; 5] = [
        Self::Llama3,
        Self::Qwen2,
        Self::Qwen3,
        Self::Gemma3,
        Self::Qwen3Moe,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama3 => "llama3",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
            Self::Qwen3Moe => "qwen3moe",
        }
    }
}

/// Writes the tiny checkpoint of `variant` into the folder `dir` (the same files every time):
/// matrices in bf16, norms and biases in f32, tied embeddings.
pub fn write_checkpoint(dir: &Path, variant: HfVariant) -> Result<()> {
    use serde_json::json;
    let (tokens, merges, types) = vocabulary();
    let vocab = tokens.len();
    let head_dim = match variant {
        HfVariant::Qwen3 | HfVariant::Qwen3Moe => 2 * D_MODEL / N_HEADS,
        _ => D_MODEL / N_HEADS,
    };
    let mut tensors: std::collections::HashMap<String, Tensor> = Default::default();
    let mut seed = 5000;
    let mut next = |rows: usize, cols: usize, scale: f64| {
        seed += 1;
        random(rows, cols, scale, seed)
    };
    let gemma = variant == HfVariant::Gemma3;
    // Gemma 3 as the real models: five windowed layers, then a global one. (A GGUF has no
    // key for the pattern that llama.cpp's converter writes; readers assume this one.)
    let n_layers = if gemma { 6 } else { N_LAYERS };
    let mut matrix = |tensors: &mut std::collections::HashMap<String, Tensor>,
                      name: String,
                      rows: usize,
                      cols: usize|
     -> Result<()> {
        let w = next(rows, cols, 1.0 / (cols as f64).sqrt() * 1.7)?;
        tensors.insert(name, w.to_dtype(candle_core::DType::BF16)?);
        Ok(())
    };
    let mut vector_seed = 9000;
    // Gemma's norms multiply by 1 + w: weights near 0 there, near 1 elsewhere.
    let mut vector = |tensors: &mut std::collections::HashMap<String, Tensor>,
                      name: String,
                      len: usize,
                      around: f64|
     -> Result<()> {
        vector_seed += 1;
        let w = (random(1, len, 0.5, vector_seed)?.flatten_all()? + around)?;
        tensors.insert(name, w);
        Ok(())
    };
    let norm_at = if gemma { 0.0 } else { 1.0 };
    matrix(
        &mut tensors,
        "model.embed_tokens.weight".into(),
        vocab,
        D_MODEL,
    )?;
    for l in 0..n_layers {
        let p = format!("model.layers.{l}");
        vector(
            &mut tensors,
            format!("{p}.input_layernorm.weight"),
            D_MODEL,
            norm_at,
        )?;
        for (proj, rows) in [
            ("q_proj", N_HEADS * head_dim),
            ("k_proj", N_KV_HEADS * head_dim),
            ("v_proj", N_KV_HEADS * head_dim),
        ] {
            matrix(
                &mut tensors,
                format!("{p}.self_attn.{proj}.weight"),
                rows,
                D_MODEL,
            )?;
            if variant == HfVariant::Qwen2 {
                vector(
                    &mut tensors,
                    format!("{p}.self_attn.{proj}.bias"),
                    rows,
                    0.0,
                )?;
            }
        }
        matrix(
            &mut tensors,
            format!("{p}.self_attn.o_proj.weight"),
            D_MODEL,
            N_HEADS * head_dim,
        )?;
        if matches!(
            variant,
            HfVariant::Qwen3 | HfVariant::Gemma3 | HfVariant::Qwen3Moe
        ) {
            vector(
                &mut tensors,
                format!("{p}.self_attn.q_norm.weight"),
                head_dim,
                norm_at,
            )?;
            vector(
                &mut tensors,
                format!("{p}.self_attn.k_norm.weight"),
                head_dim,
                norm_at,
            )?;
        }
        vector(
            &mut tensors,
            format!("{p}.post_attention_layernorm.weight"),
            D_MODEL,
            norm_at,
        )?;
        if gemma {
            vector(
                &mut tensors,
                format!("{p}.pre_feedforward_layernorm.weight"),
                D_MODEL,
                norm_at,
            )?;
            vector(
                &mut tensors,
                format!("{p}.post_feedforward_layernorm.weight"),
                D_MODEL,
                norm_at,
            )?;
        }
        if variant == HfVariant::Qwen3Moe {
            let router = random(EXPERTS, D_MODEL, 1.0, 700 + l as u64)?;
            tensors.insert(format!("{p}.mlp.gate.weight"), router);
            for e in 0..EXPERTS {
                let q = format!("{p}.mlp.experts.{e}");
                matrix(
                    &mut tensors,
                    format!("{q}.gate_proj.weight"),
                    EXPERT_FFN,
                    D_MODEL,
                )?;
                matrix(
                    &mut tensors,
                    format!("{q}.up_proj.weight"),
                    EXPERT_FFN,
                    D_MODEL,
                )?;
                matrix(
                    &mut tensors,
                    format!("{q}.down_proj.weight"),
                    D_MODEL,
                    EXPERT_FFN,
                )?;
            }
            continue;
        }
        matrix(
            &mut tensors,
            format!("{p}.mlp.gate_proj.weight"),
            FFN,
            D_MODEL,
        )?;
        matrix(
            &mut tensors,
            format!("{p}.mlp.up_proj.weight"),
            FFN,
            D_MODEL,
        )?;
        matrix(
            &mut tensors,
            format!("{p}.mlp.down_proj.weight"),
            D_MODEL,
            FFN,
        )?;
    }
    vector(&mut tensors, "model.norm.weight".into(), D_MODEL, norm_at)?;

    let mut config = json!({
        "hidden_size": D_MODEL,
        "intermediate_size": FFN,
        "num_hidden_layers": n_layers,
        "num_attention_heads": N_HEADS,
        "num_key_value_heads": N_KV_HEADS,
        "head_dim": head_dim,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    });
    let extra = match variant {
        HfVariant::Llama3 => json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            // A low base and a short original context put the 8 frequencies in all three of
            // the scaling's regimes (kept, divided, smoothed).
            "rope_theta": 100.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        }),
        HfVariant::Qwen2 => json!({
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
            "rope_theta": 10000.0, "use_sliding_window": false,
        }),
        HfVariant::Qwen3 => json!({
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_act": "silu",
            "rope_theta": 10000.0, "attention_bias": false,
        }),
        HfVariant::Qwen3Moe => json!({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_act": "silu", "rope_theta": 10000.0, "attention_bias": false,
            "num_experts": EXPERTS, "num_experts_per_tok": EXPERTS_USED,
            "moe_intermediate_size": EXPERT_FFN, "norm_topk_prob": true,
            "decoder_sparse_step": 1, "mlp_only_layers": [],
        }),
        HfVariant::Gemma3 => json!({
            "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": head_dim,
            "rope_theta": 10000.0, "rope_local_base_freq": 100.0, "sliding_window": 4,
            // As gemma-3-4b: linear scaling of the global layers' positions only.
            "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "layer_types": (0..n_layers)
                .map(|l| if l % 6 == 5 { "full_attention" } else { "sliding_attention" })
                .collect::<Vec<_>>(),
            "final_logit_softcapping": null, "attn_logit_softcapping": null,
        }),
    };
    for (k, v) in extra.as_object().expect("an object") {
        config[k] = v.clone();
    }

    // Every id in the vocabulary, the control and user-defined tokens also listed as added:
    // transformers renumbers added tokens that leave a hole in the vocabulary.
    let vocab_map: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<serde_json::Value> = tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types[*i], 3 | 4))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": types[i] == 3})
        })
        .collect();
    let split = refusal_steer_tokenizer::hf::split_regex(match variant {
        HfVariant::Llama3 => "llama3",
        _ => "qwen2",
    })
    .expect("a known pre-tokenizer");
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        ]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab_map, "merges": merges},
    });
    let tokenizer_config = json!({
        "bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": CHATML, "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });

    let io = |e: std::io::Error| crate::EngineError::BadCheckpoint {
        path: dir.to_path_buf(),
        detail: format!("cannot write: {e}"),
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("serialisable");
    std::fs::write(dir.join("config.json"), pretty(&config)).map_err(io)?;
    std::fs::write(dir.join("tokenizer.json"), pretty(&tokenizer)).map_err(io)?;
    std::fs::write(dir.join("tokenizer_config.json"), pretty(&tokenizer_config)).map_err(io)?;
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}
