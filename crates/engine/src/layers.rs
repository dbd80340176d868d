//! Building blocks shared by the architectures. Each struct mirrors a group of GGUF tensors.

use crate::attention::attend;
use crate::kv_cache::{Chunk, KvCache, Visible};
use crate::model::Config;
use crate::quant::Matrix;
use crate::weights::Weights;
use crate::Result;
use candle_core::{Device, Tensor};

/// A projection `blk.N.<name>.weight` (quantized) with an optional `.bias`.
pub struct Linear {
    weight: Matrix,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn load(file: &mut dyn Weights, name: &str) -> Result<Self> {
        let weight = file.matrix(&format!("{name}.weight"))?;
        let bias_name = format!("{name}.bias");
        let bias = if file.has(&bias_name) {
            Some(file.vector(&bias_name)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.weight.forward(x)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(file: &mut dyn Weights, name: &str, eps: f32) -> Result<Self> {
        Ok(Self {
            weight: file.vector(&format!("{name}.weight"))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(
            &x.contiguous()?,
            &self.weight,
            self.eps,
        )?)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Rotates adjacent pairs (x0, x1), (x2, x3)...: llama.cpp's "normal" mode, used for llama
    /// (its GGUF converter permutes q/k so this matches the original model).
    Interleaved,
    /// Rotates (x_i, x_{i+d/2}): GPT-NeoX style, used by qwen2 and gemma3.
    Halves,
}

/// Rotary position embedding with precomputed cos/sin tables.
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    style: RopeStyle,
}

impl Rope {
    /// `freq_factors`, where the file gives them, divide each frequency (Llama 3's rope
    /// scaling): one per rotated pair, `head_dim / 2` (the loader checks).
    pub fn new(
        theta: f32,
        head_dim: usize,
        max_positions: usize,
        style: RopeStyle,
        freq_factors: Option<&[f32]>,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let factor = freq_factors.map_or(1.0, |f| f[i]);
                1.0 / theta.powf(2.0 * i as f32 / head_dim as f32) / factor
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (max_positions, half), &Device::Cpu)?,
            style,
        })
    }

    /// The tables gathered at each token's position: `[batch, len, head_dim / 2]` each.
    pub fn tables(&self, chunk: &Chunk) -> Result<(Tensor, Tensor)> {
        let ids = Tensor::from_slice(&chunk.positions, chunk.positions.len(), &Device::Cpu)?;
        let gather = |t: &Tensor| -> Result<Tensor> {
            Ok(t.index_select(&ids, 0)?
                .reshape((chunk.batch, chunk.len, ()))?)
        };
        Ok((gather(&self.cos)?, gather(&self.sin)?))
    }

    /// `x`: `[batch, heads, len, head_dim]`.
    pub fn apply(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        Ok(match self.style {
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, cos, sin)?,
            RopeStyle::Halves => candle_nn::rotary_emb::rope(&x, cos, sin)?,
        })
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Activation {
    Silu,
    /// GELU with the tanh approximation (gemma).
    GeluTanh,
}

/// Gated feed-forward: `down(act(gate(x)) * up(x))`.
pub struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    activation: Activation,
}

impl Mlp {
    pub fn load(file: &mut dyn Weights, prefix: &str, activation: Activation) -> Result<Self> {
        Ok(Self {
            gate: Linear::load(file, &format!("{prefix}.ffn_gate"))?,
            up: Linear::load(file, &format!("{prefix}.ffn_up"))?,
            down: Linear::load(file, &format!("{prefix}.ffn_down"))?,
            activation,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate.forward(x)?;
        let gate = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}

/// Everything a block needs about the current chunk, computed once per forward pass.
pub struct StepContext<'a> {
    pub chunk: &'a Chunk,
    pub cache: &'a mut KvCache,
    /// The slots each query attends to.
    pub visible: Visible,
    /// The same within the sliding window, for architectures that have one.
    pub window_visible: Option<Visible>,
    /// cos/sin per rope (an architecture may use two thetas).
    pub rope_tables: Vec<(Tensor, Tensor)>,
}

/// Multi-head attention with grouped key/value heads.
pub struct Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// Per-head RMS norms of queries and keys (gemma3).
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub scale: f64,
}

pub struct AttentionWiring<'a> {
    pub layer: usize,
    pub rope: &'a Rope,
    pub rope_table: usize,
    pub sliding: bool,
}

impl Attention {
    /// The block's attention at `prefix`, shaped by the model's config; `qk_norm` loads the
    /// per-head query/key norms (gemma3, qwen3). Scores are scaled by 1/sqrt(head_dim).
    pub fn load(file: &mut dyn Weights, prefix: &str, c: &Config, qk_norm: bool) -> Result<Self> {
        let (q_norm, k_norm) = if qk_norm {
            (
                Some(RmsNorm::load(
                    file,
                    &format!("{prefix}.attn_q_norm"),
                    c.rms_eps,
                )?),
                Some(RmsNorm::load(
                    file,
                    &format!("{prefix}.attn_k_norm"),
                    c.rms_eps,
                )?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q: Linear::load(file, &format!("{prefix}.attn_q"))?,
            k: Linear::load(file, &format!("{prefix}.attn_k"))?,
            v: Linear::load(file, &format!("{prefix}.attn_v"))?,
            o: Linear::load(file, &format!("{prefix}.attn_output"))?,
            q_norm,
            k_norm,
            n_heads: c.n_heads,
            n_kv_heads: c.n_kv_heads,
            head_dim: c.head_dim,
            scale: 1.0 / (c.head_dim as f64).sqrt(),
        })
    }

    /// `x`: `[batch, len, d]` -> `[batch, len, d]`.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &mut StepContext,
        wiring: AttentionWiring,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (h, kvh, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |y: Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, hd))?.transpose(1, 2)?)
        };
        let mut q = heads(self.q.forward(x)?, h)?;
        let mut k = heads(self.k.forward(x)?, kvh)?;
        let v = heads(self.v.forward(x)?, kvh)?;
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let (cos, sin) = &ctx.rope_tables[wiring.rope_table];
        let q = (wiring.rope.apply(&q, cos, sin)? * self.scale)?;
        let k = wiring.rope.apply(&k, cos, sin)?;
        ctx.cache.append(wiring.layer, ctx.chunk, &k, &v)?;
        let visible = match (wiring.sliding, &ctx.window_visible) {
            (true, Some(w)) => w,
            _ => &ctx.visible,
        };
        let out = attend(&q, ctx.cache, wiring.layer, kvh, visible)?;
        self.o.forward(&out)
    }
}

/// Log-probabilities of `logits`, computed in f64: what generation reports per chosen token and
/// what the local judge sums over a label's tokens.
pub fn log_softmax(logits: &[f32]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_sum = logits
        .iter()
        .map(|&l| (l as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    logits.iter().map(|&l| l as f64 - log_sum).collect()
}
