//! A tiny llama-family model with random weights, written as a real GGUF file (byte-level BPE
//! vocabulary, ChatML template), so tests and benchmarks exercise the real loading path
//! without downloading anything.

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
    let merges: Vec<String> = ["t h", "th e", "Ġ t", "Ġt he", "i n", "a n", "e r"]
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

/// Writes the tiny model to `path`.
pub fn write(path: &Path) -> Result<()> {
    let (tokens, merges, types) = vocabulary();
    let vocab = tokens.len();
    let head_dim = D_MODEL / N_HEADS;
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut seed = 1;
    let mut matrix = |name: String,
                      rows: usize,
                      cols: usize,
                      tensors: &mut Vec<(String, QTensor)>|
     -> Result<()> {
        seed += 1;
        let w = random(rows, cols, 1.0 / (cols as f64).sqrt() * 1.7, seed)?;
        tensors.push((name, QTensor::quantize(&w, GgmlDType::Q8_0)?));
        Ok(())
    };
    let norm = |name: String, tensors: &mut Vec<(String, QTensor)>| -> Result<()> {
        let w = Tensor::ones(D_MODEL, candle_core::DType::F32, &Device::Cpu)?;
        tensors.push((name, QTensor::quantize(&w, GgmlDType::F32)?));
        Ok(())
    };
    matrix("token_embd.weight".into(), vocab, D_MODEL, &mut tensors)?;
    for l in 0..N_LAYERS {
        norm(format!("blk.{l}.attn_norm.weight"), &mut tensors)?;
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
        norm(format!("blk.{l}.ffn_norm.weight"), &mut tensors)?;
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
    norm("output_norm.weight".into(), &mut tensors)?;

    let strings = |v: &[String]| Value::Array(v.iter().map(|s| Value::String(s.clone())).collect());
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String("llama".into())),
        ("llama.block_count", Value::U32(N_LAYERS as u32)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(D_MODEL as u32)),
        ("llama.feed_forward_length", Value::U32(FFN as u32)),
        ("llama.attention.head_count", Value::U32(N_HEADS as u32)),
        (
            "llama.attention.head_count_kv",
            Value::U32(N_KV_HEADS as u32),
        ),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("llama.rope.freq_base", Value::F32(10_000.0)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.pre", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.merges", strings(&merges)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.iter().map(|&t| Value::I32(t)).collect()),
        ),
        (
            "tokenizer.ggml.eos_token_id",
            Value::U32(
                tokens
                    .iter()
                    .position(|t| t == "<|im_end|>")
                    .expect("present") as u32,
            ),
        ),
        ("tokenizer.ggml.add_bos_token", Value::Bool(false)),
        ("tokenizer.chat_template", Value::String(CHATML.into())),
    ];
    let md: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
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
