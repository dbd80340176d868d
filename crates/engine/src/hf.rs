//! Hugging Face checkpoint folders: `config.json`, the weights in `model.safetensors` or shards
//! listed by `model.safetensors.index.json` (memory-mapped; bf16, f16 or f32, computed in
//! f32), and the tokenizer files (see `refusal_steer_tokenizer::hf`).
//!
//! The folder is read as llama.cpp's converter would have written it as GGUF, so the blocks
//! load it unchanged: tensors answer to GGUF names; Llama's query and key rows are permuted
//! for the interleaved rope the llama block uses; gemma's norm weights get the `1 + w` its
//! norms apply; Llama 3's rope scaling becomes the `rope_freqs` factors.

use crate::gemma3;
use crate::model::{Architecture, Config, Experts};
use crate::quant::Matrix;
use crate::weights::Weights;
use crate::{EngineError, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QMatMul;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;
use std::cell::OnceCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// Where the decoder's tensors sit under the folder's names, by model class.
const TEXT_PREFIXES: &[&str] = &["model.", "model.language_model.", "language_model.model."];
const HEADS: &[&str] = &["lm_head.weight", "language_model.lm_head.weight"];
/// transformers' names of the two kinds of attention layer.
const GLOBAL: &str = "full_attention";
const SLIDING: &str = "sliding_attention";

pub struct Checkpoint {
    dir: PathBuf,
    /// The text model's part of `config.json`.
    params: Json,
    architecture: Architecture,
    tensors: MmapedSafetensors,
    names: HashSet<String>,
    prefix: &'static str,
    head: Option<&'static str>,
    /// Read once: a tied output head shares it.
    embeddings: Option<Tensor>,
    /// Read once: every tensor's shape is checked against it.
    config: OnceCell<Config>,
}

fn bad(dir: &Path, detail: impl Into<String>) -> EngineError {
    EngineError::BadCheckpoint {
        path: dir.to_path_buf(),
        detail: detail.into(),
    }
}

fn read_text(dir: &Path, name: &str) -> Result<Option<String>> {
    let path = dir.join(name);
    if !path.is_file() {
        return Ok(None);
    }
    std::fs::read_to_string(&path)
        .map(Some)
        .map_err(|e| bad(dir, format!("cannot read {name}: {e}")))
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let text = read_text(dir, "config.json")?
            .ok_or_else(|| bad(dir, "config.json is missing: a checkpoint folder has config.json, the tokenizer files and *.safetensors"))?;
        let config: Json = serde_json::from_str(&text)
            .map_err(|e| bad(dir, format!("config.json is not valid JSON: {e}")))?;
        let class = config["architectures"][0].as_str().unwrap_or("");
        let architecture = match class {
            "LlamaForCausalLM" => Architecture::Llama,
            "Qwen2ForCausalLM" => Architecture::Qwen2,
            "Qwen3ForCausalLM" => Architecture::Qwen3,
            "Qwen3MoeForCausalLM" => Architecture::Qwen3Moe,
            "Gemma3ForCausalLM" | "Gemma3ForConditionalGeneration" => Architecture::Gemma3,
            other => {
                return Err(bad(dir, format!(
                    "config.json's architectures[0] is {other:?}; supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration (its text part)"
                )))
            }
        };
        let params = match config.get("text_config") {
            Some(text) if class == "Gemma3ForConditionalGeneration" => text.clone(),
            _ => config,
        };
        let shards = shard_files(dir)?;
        // SAFETY: the files are mapped read-only for the time of loading; every tensor is
        // copied out (converted to f32) before the mapping is dropped. A file rewritten while
        // it loads is outside what any reader can guard against.
        let tensors = unsafe { MmapedSafetensors::multi(&shards) }
            .map_err(|e| bad(dir, format!("reading the safetensors files: {e}")))?;
        let names: HashSet<String> = tensors.tensors().into_iter().map(|(n, _)| n).collect();
        let prefix = TEXT_PREFIXES
            .iter()
            .copied()
            .find(|p| names.contains(&format!("{p}embed_tokens.weight")))
            .ok_or_else(|| {
                bad(
                    dir,
                    "no embed_tokens.weight under model., model.language_model. or language_model.model.",
                )
            })?;
        let head = HEADS.iter().copied().find(|h| names.contains(*h));
        Ok(Self {
            dir: dir.to_path_buf(),
            params,
            architecture,
            tensors,
            names,
            prefix,
            head,
            embeddings: None,
            config: OnceCell::new(),
        })
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.params[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| bad(&self.dir, format!("config.json has no number {key:?}")))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match &self.params[key] {
            Json::Null => Ok(default),
            _ => self.usize(key),
        }
    }

    fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        match &self.params[key] {
            Json::Null => Ok(default),
            v => v
                .as_f64()
                .map(|v| v as f32)
                .ok_or_else(|| bad(&self.dir, format!("config.json's {key:?} is not a number"))),
        }
    }

    pub fn config(&self) -> Result<&Config> {
        if let Some(c) = self.config.get() {
            return Ok(c);
        }
        let c = self.read_config()?;
        Ok(self.config.get_or_init(|| c))
    }

    fn read_config(&self) -> Result<Config> {
        let n_heads = self.usize("num_attention_heads")?;
        let d_model = self.usize("hidden_size")?;
        let head_dim = self.usize_or("head_dim", d_model / n_heads)?;
        let n_layers = self.usize("num_hidden_layers")?;
        let vocab_size = self
            .tensors
            .get(&format!("{}embed_tokens.weight", self.prefix))
            .map_err(|e| bad(&self.dir, e.to_string()))?
            .shape()[0];
        self.check_rope_scaling()?;
        if self.params["use_sliding_window"].as_bool() == Some(true) {
            return Err(bad(
                &self.dir,
                "use_sliding_window is true, which only gemma3's blocks implement",
            ));
        }
        let sliding_window = match self.architecture {
            Architecture::Gemma3 => {
                let scalar = self.usize_or("query_pre_attn_scalar", head_dim)?;
                if scalar != head_dim {
                    return Err(bad(&self.dir, format!(
                        "query_pre_attn_scalar {scalar} differs from head_dim {head_dim}; the attention scales by 1/sqrt(head_dim)"
                    )));
                }
                let rope_theta = self.rope_theta(SLIDING, gemma3::SLIDING_ROPE_THETA)?;
                let size = self.usize_or("sliding_window", 0)?;
                match self.params["layer_types"].as_array() {
                    Some(types) => gemma3::windowed_layers(
                        size,
                        types.iter().map(|t| t.as_str() == Some(SLIDING)).collect(),
                        rope_theta,
                        n_layers,
                    )
                    .map_err(|e| bad(&self.dir, format!("layer_types: {e}")))?,
                    None => gemma3::sliding_window(
                        size,
                        self.usize_or("sliding_window_pattern", gemma3::SLIDING_PATTERN)?,
                        rope_theta,
                        n_layers,
                    ),
                }
            }
            _ => None,
        };
        let experts = match self.architecture {
            Architecture::Qwen3Moe => Some(self.experts_config(n_layers)?),
            _ => None,
        };
        Ok(Config {
            architecture: self.architecture,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads: self.usize_or("num_key_value_heads", n_heads)?,
            head_dim,
            vocab_size,
            context_length: self.usize("max_position_embeddings")?,
            rms_eps: self.f32_or("rms_norm_eps", 1e-6)?,
            rope_theta: self.rope_theta(GLOBAL, 10_000.0)?,
            rope_scale: match self.rope_scaling_type(GLOBAL).as_deref() {
                Some("linear") => self.f32_in_rope(GLOBAL, "factor")?,
                _ => 1.0,
            },
            sliding_window,
            experts,
        })
    }

    /// Qwen3-MoE's experts, in every layer and renormalised as llama.cpp runs them.
    fn experts_config(&self, n_layers: usize) -> Result<Experts> {
        let count = match self.params.get("num_experts") {
            Some(_) => self.usize("num_experts")?,
            None => self.usize("num_local_experts")?,
        };
        let sparse_everywhere = self.usize_or("decoder_sparse_step", 1)? == 1
            && self.params["mlp_only_layers"]
                .as_array()
                .is_none_or(|layers| layers.is_empty());
        if !sparse_everywhere {
            return Err(bad(&self.dir, format!(
                "decoder_sparse_step and mlp_only_layers give some of the {n_layers} layers a dense MLP; only experts in every layer are supported"
            )));
        }
        if self.params["norm_topk_prob"].as_bool() == Some(false) {
            return Err(bad(
                &self.dir,
                "norm_topk_prob is false; only renormalised top-k routing is supported",
            ));
        }
        Ok(Experts {
            count,
            used: self.usize("num_experts_per_tok")?,
        })
    }

    /// The rope settings of a layer type as one object (`rope_theta`, `rope_type` and the
    /// scaling's fields): transformers 5 writes `rope_parameters` (per layer type for gemma3),
    /// older versions `rope_theta` (gemma3's windowed layers: `rope_local_base_freq`) beside
    /// `rope_scaling`, which applies to the global layers only.
    fn rope(&self, layer_type: &str) -> Json {
        let p = &self.params;
        if let Some(rope) = p.get("rope_parameters").filter(|r| r.is_object()) {
            return match rope.get(layer_type) {
                Some(per_type) if per_type.is_object() => per_type.clone(),
                _ => rope.clone(),
            };
        }
        if layer_type == SLIDING {
            return serde_json::json!({ "rope_theta": p["rope_local_base_freq"] });
        }
        let mut rope = match &p["rope_scaling"] {
            Json::Object(o) => Json::Object(o.clone()),
            _ => serde_json::json!({}),
        };
        if rope.get("rope_type").is_none() {
            rope["rope_type"] = rope["type"].clone();
        }
        rope["rope_theta"] = p["rope_theta"].clone();
        rope
    }

    fn rope_theta(&self, layer_type: &str, default: f32) -> Result<f32> {
        match &self.rope(layer_type)["rope_theta"] {
            Json::Null => Ok(default),
            v => v.as_f64().map(|v| v as f32).ok_or_else(|| {
                bad(
                    &self.dir,
                    format!("the {layer_type} rope_theta {v} is not a number"),
                )
            }),
        }
    }

    fn f32_in_rope(&self, layer_type: &str, key: &str) -> Result<f32> {
        self.rope(layer_type)[key]
            .as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| {
                bad(
                    &self.dir,
                    format!("the {layer_type} rope scaling has no number {key:?}"),
                )
            })
    }

    fn rope_scaling_type(&self, layer_type: &str) -> Option<String> {
        self.rope(layer_type)["rope_type"]
            .as_str()
            .map(str::to_string)
    }

    fn check_rope_scaling(&self) -> Result<()> {
        for layer_type in [GLOBAL, SLIDING] {
            match (self.rope_scaling_type(layer_type).as_deref(), self.architecture) {
                (None | Some("default"), _)
                | (Some("llama3"), Architecture::Llama)
                | (Some("linear"), _)
                    if layer_type == GLOBAL => {}
                (None | Some("default"), _) => {}
                (Some(other), _) => {
                    return Err(bad(&self.dir, format!(
                        "rope scaling {other:?} of the {layer_type} layers is not supported for {} (supported: linear, llama3 on Llama; none on gemma's sliding layers)",
                        self.architecture.name()
                    )))
                }
            }
        }
        Ok(())
    }

    /// The tokenizer as GGUF metadata keys.
    pub fn tokenizer_metadata(&self) -> Result<HashMap<String, Value>> {
        let tokenizer = read_text(&self.dir, "tokenizer.json")?
            .ok_or_else(|| bad(&self.dir, "tokenizer.json is missing"))?;
        Ok(refusal_steer_tokenizer::hf::metadata(
            &tokenizer,
            read_text(&self.dir, "tokenizer_config.json")?.as_deref(),
            read_text(&self.dir, "chat_template.jinja")?.as_deref(),
        )?)
    }

    /// The folder's name for a GGUF tensor name.
    fn name_of(&self, gguf: &str) -> Option<String> {
        let p = self.prefix;
        match gguf {
            "token_embd.weight" => return Some(format!("{p}embed_tokens.weight")),
            "output_norm.weight" => return Some(format!("{p}norm.weight")),
            "output.weight" => return self.head.map(str::to_string),
            _ => {}
        }
        let rest = gguf.strip_prefix("blk.")?;
        let (layer, rest) = rest.split_once('.')?;
        let (part, kind) = rest.rsplit_once('.')?;
        let gemma = self.architecture == Architecture::Gemma3;
        let hf = match part {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "attn_q_norm" => "self_attn.q_norm",
            "attn_k_norm" => "self_attn.k_norm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            "ffn_gate_inp" => "mlp.gate",
            "ffn_norm" if gemma => "pre_feedforward_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            "post_attention_norm" => "post_attention_layernorm",
            "post_ffw_norm" => "post_feedforward_layernorm",
            _ => return None,
        };
        Some(format!("{p}layers.{layer}.{hf}.{kind}"))
    }

    /// A tensor by GGUF name, in f32 and the engine's conventions.
    fn tensor(&mut self, gguf: &str) -> Result<Tensor> {
        if gguf == "token_embd.weight" {
            if let Some(t) = &self.embeddings {
                return Ok(t.clone());
            }
        }
        let name = self
            .name_of(gguf)
            .filter(|n| self.names.contains(n))
            .ok_or_else(|| bad(&self.dir, format!("no tensor for {gguf}")))?;
        let t = self
            .tensors
            .load(&name, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(|e| bad(&self.dir, format!("tensor {name}: {e}")))?;
        if let Some(expected) = self.expected_shape(gguf)? {
            if t.dims() != expected.as_slice() {
                return Err(bad(
                    &self.dir,
                    format!(
                        "tensor {name} has shape {:?}, but config.json makes it {expected:?}",
                        t.dims()
                    ),
                ));
            }
        }
        let part = gguf.rsplit('.').nth(1).unwrap_or("");
        if self.architecture == Architecture::Llama && matches!(part, "attn_q" | "attn_k") {
            let c = self.config()?;
            let heads = if part == "attn_q" {
                c.n_heads
            } else {
                c.n_kv_heads
            };
            return interleave_rope_rows(&t, heads);
        }
        if self.architecture == Architecture::Gemma3 && part.ends_with("norm") {
            return Ok((t + 1.0)?);
        }
        if gguf == "token_embd.weight" {
            self.embeddings = Some(t.clone());
        }
        Ok(t)
    }

    /// The shape config.json gives a tensor (by GGUF name), where it gives one.
    fn expected_shape(&self, gguf: &str) -> Result<Option<Vec<usize>>> {
        let c = self.config()?;
        let d = c.d_model;
        let (q, kv) = (c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim);
        let ff = self.usize_or("intermediate_size", 0)?;
        let part = gguf.rsplit('.').nth(1).unwrap_or("");
        let matrix = match part {
            "token_embd" | "output" => Some((c.vocab_size, d)),
            "attn_q" => Some((q, d)),
            "attn_k" | "attn_v" => Some((kv, d)),
            "attn_output" => Some((d, q)),
            "ffn_gate" | "ffn_up" if ff > 0 => Some((ff, d)),
            "ffn_down" if ff > 0 => Some((d, ff)),
            "ffn_gate_inp" => c.experts.map(|e| (e.count, d)),
            "attn_norm" | "ffn_norm" | "output_norm" | "post_attention_norm" | "post_ffw_norm" => {
                return Ok(Some(vec![d]))
            }
            "attn_q_norm" | "attn_k_norm" => return Ok(Some(vec![c.head_dim])),
            _ => None,
        };
        Ok(matrix.map(|(rows, cols)| {
            if gguf.ends_with(".bias") {
                vec![rows]
            } else {
                vec![rows, cols]
            }
        }))
    }

    /// Llama 3's rope scaling as the per-frequency divisors llama.cpp's converter computes.
    fn rope_factors(&self) -> Result<Tensor> {
        let s = self.rope(GLOBAL);
        let num = |key: &str, default: f64| s[key].as_f64().unwrap_or(default);
        let factor = num("factor", 8.0);
        let low = num("low_freq_factor", 1.0);
        let high = num("high_freq_factor", 4.0);
        let old_context = num("original_max_position_embeddings", 8192.0);
        let c = self.config()?;
        let base = c.rope_theta as f64;
        let factors: Vec<f32> = (0..c.head_dim / 2)
            .map(|i| {
                let freq = 1.0 / base.powf(2.0 * i as f64 / c.head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < old_context / high {
                    1.0
                } else if wavelen > old_context / low {
                    factor as f32
                } else {
                    let smooth = (old_context / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect();
        Ok(Tensor::from_vec(factors, c.head_dim / 2, &Device::Cpu)?)
    }
}

/// The rows of a query or key projection (or its bias) reordered so that rotating adjacent
/// pairs equals the checkpoint's rotation of halves: per head, `[h, 2, d/2]` -> `[h, d/2, 2]`.
fn interleave_rope_rows(t: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let mut split = vec![heads, 2, rows / heads / 2];
    split.extend_from_slice(&dims[1..]);
    Ok(t.reshape(split)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// `model.safetensors`, or the shards an index names (each once, in order).
fn shard_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if let Some(index) = read_text(dir, "model.safetensors.index.json")? {
        let index: Json = serde_json::from_str(&index).map_err(|e| {
            bad(
                dir,
                format!("model.safetensors.index.json is not valid JSON: {e}"),
            )
        })?;
        let map = index["weight_map"]
            .as_object()
            .ok_or_else(|| bad(dir, "model.safetensors.index.json has no weight_map"))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for file in map.values() {
            let path = dir.join(file.as_str().unwrap_or_default());
            if !files.contains(&path) {
                if !path.is_file() {
                    return Err(bad(
                        dir,
                        format!("the index names {}, which is missing", path.display()),
                    ));
                }
                files.push(path);
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        Ok(vec![single])
    } else {
        Err(bad(
            dir,
            "neither model.safetensors nor model.safetensors.index.json is here",
        ))
    }
}

impl Weights for Checkpoint {
    fn origin(&self) -> &Path {
        &self.dir
    }

    fn has(&self, name: &str) -> bool {
        if name == "rope_freqs.weight" {
            return self.rope_scaling_type(GLOBAL).as_deref() == Some("llama3");
        }
        self.name_of(name).is_some_and(|n| self.names.contains(&n))
    }

    fn matrix(&mut self, name: &str) -> Result<Matrix> {
        Matrix::dense(self.tensor(name)?)
    }

    fn embedding(&mut self, name: &str) -> Result<QMatMul> {
        Ok(QMatMul::Tensor(self.tensor(name)?))
    }

    fn vector(&mut self, name: &str) -> Result<Tensor> {
        if name == "rope_freqs.weight" {
            return self.rope_factors();
        }
        self.tensor(name)
    }

    /// `blk.N.ffn_gate_exps.weight` is `layers.N.mlp.experts.E.gate_proj.weight` for each E.
    fn experts(&mut self, name: &str, count: usize) -> Result<Vec<Matrix>> {
        let parsed = name.strip_prefix("blk.").and_then(|rest| {
            let (layer, rest) = rest.split_once('.')?;
            let part = rest.strip_prefix("ffn_")?.strip_suffix("_exps.weight")?;
            Some((layer, part))
        });
        let Some((layer, part)) = parsed else {
            return Err(bad(&self.dir, format!("no experts for {name}")));
        };
        (0..count)
            .map(|e| {
                let hf = format!(
                    "{}layers.{layer}.mlp.experts.{e}.{part}_proj.weight",
                    self.prefix
                );
                let t = self
                    .tensors
                    .load(&hf, &Device::Cpu)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .map_err(|err| bad(&self.dir, format!("tensor {hf}: {err}")))?;
                Matrix::dense(t)
            })
            .collect()
    }
}
