//! A loaded model: tokenizer, chat template and the decoder, with one forward pass for all
//! architectures. Each architecture contributes its block (see `llama.rs`, `gemma3.rs`).

use crate::gguf::GgufFile;
use crate::hf::Checkpoint;
use crate::hooks::{Hooks, Intervention};
use crate::kv_cache::{Chunk, KvCache};
use crate::layers::{RmsNorm, Rope, StepContext};
use crate::quant::Matrix;
use crate::weights::{Counted, Weights};
use crate::{gemma3, llama, EngineError, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Tensor};
use refusal_steer_tokenizer::{ChatTemplate, Tokenizer};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
    Qwen3Moe,
    Gemma3,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "llama, qwen2, qwen3, qwen3moe, gemma3";

    pub fn from_gguf(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Self::Llama),
            "qwen2" => Ok(Self::Qwen2),
            "qwen3" => Ok(Self::Qwen3),
            "qwen3moe" => Ok(Self::Qwen3Moe),
            "gemma3" => Ok(Self::Gemma3),
            other => Err(EngineError::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Qwen3Moe => "qwen3moe",
            Self::Gemma3 => "gemma3",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub architecture: Architecture,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rms_eps: f32,
    pub rope_theta: f32,
    /// Linear rope scaling: positions are divided by this (1: none). Gemma 3's sliding-window
    /// layers do not scale.
    pub rope_scale: f32,
    /// Layers that attend within a sliding window (gemma3).
    pub sliding_window: Option<SlidingWindow>,
    /// Routed experts in place of each block's MLP (qwen3moe).
    pub experts: Option<Experts>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Experts {
    pub count: usize,
    /// Experts each token runs on.
    pub used: usize,
}

#[derive(Debug, Clone)]
pub struct SlidingWindow {
    /// Tokens each query sees, itself included.
    pub size: usize,
    /// Per layer: whether it uses the window (the others attend globally).
    pub layers: Vec<bool>,
    /// The windowed layers' own rope base.
    pub rope_theta: f32,
}

impl Config {
    fn from_gguf(file: &GgufFile, architecture: Architecture) -> Result<Self> {
        let a = architecture.name();
        let n_heads = file.usize(&format!("{a}.attention.head_count"))?;
        let d_model = file.usize(&format!("{a}.embedding_length"))?;
        let n_layers = file.usize(&format!("{a}.block_count"))?;
        let sliding_window = match architecture {
            Architecture::Gemma3 => {
                let size = file.usize_or("gemma3.attention.sliding_window", 0)?;
                let theta = file.f32_or("gemma3.rope.freq_base_swa", gemma3::SLIDING_ROPE_THETA)?;
                let pattern = "gemma3.attention.sliding_window_pattern";
                // llama.cpp reads the pattern as a number (every n-th layer global) or as one
                // flag per layer.
                match file.bools(pattern)? {
                    Some(layers) => gemma3::windowed_layers(size, layers, theta, n_layers)
                        .map_err(|detail| EngineError::BadFile {
                            path: file.path.clone(),
                            detail: format!("metadata key '{pattern}': {detail}"),
                        })?,
                    None => gemma3::sliding_window(
                        size,
                        file.usize_or(pattern, gemma3::SLIDING_PATTERN)?,
                        theta,
                        n_layers,
                    ),
                }
            }
            _ => None,
        };
        let experts = match architecture {
            Architecture::Qwen3Moe => Some(Experts {
                count: file.usize(&format!("{a}.expert_count"))?,
                used: file.usize(&format!("{a}.expert_used_count"))?,
            }),
            _ => None,
        };
        let vocab_size = match file.content.tensor_infos.get("token_embd.weight") {
            Some(info) => info.shape.dims()[0],
            None => {
                return Err(EngineError::BadFile {
                    path: file.path.clone(),
                    detail: "tensor 'token_embd.weight' is missing".into(),
                })
            }
        };
        Ok(Self {
            architecture,
            n_layers,
            d_model,
            n_heads,
            n_kv_heads: file.usize_or(&format!("{a}.attention.head_count_kv"), n_heads)?,
            head_dim: file.usize_or(&format!("{a}.attention.key_length"), d_model / n_heads)?,
            vocab_size,
            context_length: file.usize(&format!("{a}.context_length"))?,
            rms_eps: file.f32(&format!("{a}.attention.layer_norm_rms_epsilon"))?,
            rope_theta: file.f32_or(&format!("{a}.rope.freq_base"), 10_000.0)?,
            rope_scale: linear_rope_scale(file, a)?,
            sliding_window,
            experts,
        })
    }
}

/// The tokenizer of a GGUF file or checkpoint folder, without loading its weights.
pub fn read_tokenizer(path: &Path) -> Result<Tokenizer> {
    Ok(if path.is_dir() {
        Tokenizer::from_gguf_metadata(&Checkpoint::open(path)?.tokenizer_metadata()?)?
    } else {
        Tokenizer::from_gguf_metadata(GgufFile::open(path)?.metadata())?
    })
}

fn tokenizer_and_template(md: &HashMap<String, Value>) -> Result<(Tokenizer, ChatTemplate)> {
    let tokenizer = Tokenizer::from_gguf_metadata(md)?;
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.piece(i).ok())
            .unwrap_or("")
            .to_string()
    };
    let template = ChatTemplate::from_gguf_metadata(
        md,
        &token_text(tokenizer.bos),
        &token_text(tokenizer.eos),
    )?;
    Ok((tokenizer, template))
}

/// The factor of a file's linear rope scaling, read as llama.cpp reads it: the type defaults
/// to linear, the factor (`rope.scaling.factor`, or the older `rope.scale_linear`) to none.
fn linear_rope_scale(file: &GgufFile, a: &str) -> Result<f32> {
    let kind = format!("{a}.rope.scaling.type");
    match file
        .metadata()
        .contains_key(&kind)
        .then(|| file.string(&kind))
        .transpose()?
    {
        None | Some("linear") => {}
        Some("none") => return Ok(1.0),
        Some(other) => {
            return Err(EngineError::BadFile {
                path: file.path.clone(),
                detail: format!("rope scaling '{other}' is not supported (supported: linear)"),
            })
        }
    }
    let factor = file.f32_or(
        &format!("{a}.rope.scaling.factor"),
        file.f32_or(&format!("{a}.rope.scale_linear"), 0.0)?,
    )?;
    Ok(if factor == 0.0 { 1.0 } else { factor })
}

/// One decoder block: residual stream in, residual stream out.
pub trait Block: Send + Sync {
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        ctx: &mut StepContext,
        ropes: &[Rope],
    ) -> Result<Tensor>;
}

/// What an architecture provides beyond its blocks.
pub struct Decoder {
    pub embed: QMatMul,
    /// Multiplies the embeddings (gemma scales them by sqrt(d)).
    pub embed_scale: Option<f64>,
    pub blocks: Vec<Box<dyn Block>>,
    pub norm: RmsNorm,
    pub lm_head: Matrix,
    pub ropes: Vec<Rope>,
    /// Sliding attention window, for architectures whose blocks use one.
    pub window: Option<usize>,
}

/// Which positions need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last real token of each row: `[batch, vocab]` (what generation needs).
    Last,
    /// Every slot: `[batch, len, vocab]`.
    All,
    /// None, for passes that only read hooks: the pass stops after the last point with a
    /// hook and returns an empty `[batch, 0]`. Layers after that point get no keys and
    /// values, so the cache cannot be continued.
    None,
}

pub struct Model {
    pub config: Config,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    pub path: PathBuf,
    /// Bytes of all weight matrices as multiplied (the token embeddings, looked up, not
    /// counted unless the output head is tied to them): what one decode step reads, all
    /// experts of a mixture counted.
    pub matrix_bytes: usize,
    decoder: Decoder,
}

impl Model {
    /// Loads a GGUF file, or a Hugging Face checkpoint folder (see [`crate::hf`]).
    pub fn load(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let mut checkpoint = Checkpoint::open(path)?;
            let config = checkpoint.config()?.clone();
            let (tokenizer, template) = tokenizer_and_template(&checkpoint.tokenizer_metadata()?)?;
            return Self::assemble(path, config, tokenizer, template, &mut checkpoint);
        }
        let mut file = GgufFile::open(path)?;
        let architecture = Architecture::from_gguf(&file.architecture()?)?;
        let config = Config::from_gguf(&file, architecture)?;
        let (tokenizer, template) = tokenizer_and_template(file.metadata())?;
        Self::assemble(path, config, tokenizer, template, &mut file)
    }

    fn assemble(
        path: &Path,
        config: Config,
        tokenizer: Tokenizer,
        template: ChatTemplate,
        weights: &mut dyn Weights,
    ) -> Result<Self> {
        if tokenizer.vocab_size() < config.vocab_size {
            return Err(EngineError::BadFile {
                path: path.to_path_buf(),
                detail: format!(
                    "tokenizer has {} tokens but the embedding has {} rows",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            });
        }
        let mut counted = Counted::new(weights);
        let decoder = match config.architecture {
            Architecture::Llama
            | Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Qwen3Moe => llama::load(&mut counted, &config)?,
            Architecture::Gemma3 => gemma3::load(&mut counted, &config)?,
        };
        Ok(Self {
            config,
            tokenizer,
            template,
            path: path.to_path_buf(),
            matrix_bytes: counted.matrix_bytes,
            decoder,
        })
    }

    /// A new cache for `batch` rows and up to `capacity` tokens per row.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(batch, capacity, self.config.n_layers)
    }

    /// Hooks sized for this model.
    pub fn new_hooks(&self) -> Hooks {
        Hooks::new(self.config.n_layers, self.config.d_model)
    }

    /// Hooks holding `interventions`, checked against this model.
    pub fn hooks_with(&self, interventions: &[Intervention]) -> Result<Hooks> {
        let mut hooks = self.new_hooks();
        for iv in interventions {
            hooks.add(iv.clone())?;
        }
        Ok(hooks)
    }

    /// Runs `tokens` (`[batch * chunk.len]`, row-major; padding slots may hold any id) through
    /// the model, appending to `cache`, applying `hooks`, and returns logits (f32).
    pub fn forward(
        &self,
        tokens: &[u32],
        chunk: &Chunk,
        cache: &mut KvCache,
        hooks: &mut Hooks,
        logits: Logits,
    ) -> Result<Tensor> {
        // Run the whole pass on a thread-pool worker: parallel kernels called from a worker
        // share its pool directly, while calls from outside the pool would each hand work to
        // the pool and sleep until it is done (one round trip per matrix, most of the time
        // of a decode step on a small model).
        let mut result = None;
        rayon::scope(|_| {
            result = Some(self.forward_on_worker(tokens, chunk, cache, hooks, logits))
        });
        result.expect("the scope ran its body")
    }

    fn forward_on_worker(
        &self,
        tokens: &[u32],
        chunk: &Chunk,
        cache: &mut KvCache,
        hooks: &mut Hooks,
        logits: Logits,
    ) -> Result<Tensor> {
        let (b, t) = (chunk.batch, chunk.len);
        if let Some(&bad) = tokens
            .iter()
            .find(|&&id| id as usize >= self.config.vocab_size)
        {
            return Err(EngineError::Batch(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        let ids = Tensor::from_slice(tokens, (b, t), &Device::Cpu)?;
        let d = &self.decoder;
        let mut x = d.embed.embedding(&ids)?;
        if let Some(s) = d.embed_scale {
            x = (x * s)?;
        }
        if hooks.is_active(0) {
            x = hooks.apply(0, x, chunk)?;
        }
        let mut ctx = StepContext {
            chunk,
            visible: cache.visible(chunk, None),
            window_visible: d.window.map(|w| cache.visible(chunk, Some(w))),
            rope_tables: d
                .ropes
                .iter()
                .map(|r| r.tables(chunk))
                .collect::<Result<_>>()?,
            cache,
        };
        let n_blocks = match logits {
            Logits::None => hooks.last_active().unwrap_or(0),
            Logits::Last | Logits::All => d.blocks.len(),
        };
        for (layer, block) in d.blocks.iter().enumerate().take(n_blocks) {
            x = block.forward(&x, layer, &mut ctx, &d.ropes)?;
            if hooks.is_active(layer + 1) {
                x = hooks.apply(layer + 1, x, chunk)?;
            }
        }
        ctx.cache.commit(chunk);
        let x = match logits {
            Logits::None => return Ok(Tensor::zeros((b, 0), DType::F32, &Device::Cpu)?),
            Logits::All => x,
            Logits::Last => {
                let last: Vec<u32> = (0..b)
                    .map(|r| (r * t + chunk.last_valid(r).unwrap_or(t - 1)) as u32)
                    .collect();
                let idx = Tensor::from_vec(last, b, &Device::Cpu)?;
                x.reshape((b * t, ()))?.index_select(&idx, 0)?
            }
        };
        self.head(&x)
    }

    /// Final norm and output projection: residual stream `[.., d]` to logits `[.., vocab]`.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        self.decoder.lm_head.forward(&self.decoder.norm.forward(x)?)
    }

    /// Logits for one residual-stream vector taken at the last point (after the last block).
    pub fn logits_from_hidden(&self, hidden: &[f32]) -> Result<Vec<f32>> {
        let x = Tensor::from_slice(hidden, (1, hidden.len()), &Device::Cpu)?;
        Ok(self.head(&x)?.flatten_all()?.to_vec1()?)
    }
}
