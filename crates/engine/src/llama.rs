//! Llama-family decoder (SmolLM2, Llama 3), Qwen2, Qwen3 and Qwen3-MoE: one block. Qwen2 has
//! biases on the q/k/v projections (loaded when the file has them); Qwen3 has none but
//! RMS-normalises each query and key head before rope; both rotate halves. Qwen3-MoE is Qwen3
//! with routed experts in place of the MLP (`moe.rs`). Llama 3.1+ files carry
//! `rope_freqs.weight`, the per-frequency divisors of its long-context rope scaling; linear
//! scaling divides every frequency alike.
//!
//! Block: x + attn(attn_norm(x)), then x + ffn(ffn_norm(x)).

use crate::layers::{
    Activation, Attention, AttentionWiring, Mlp, RmsNorm, Rope, RopeStyle, StepContext,
};
use crate::model::{Architecture, Block, Config, Decoder};
use crate::moe::{FeedForward, Moe};
use crate::weights::Weights;
use crate::{EngineError, Result};
use candle_core::Tensor;

pub struct LlamaBlock {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    ffn: FeedForward,
}

impl Block for LlamaBlock {
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        ctx: &mut StepContext,
        ropes: &[Rope],
    ) -> Result<Tensor> {
        let wiring = AttentionWiring {
            layer,
            rope: &ropes[0],
            rope_table: 0,
            sliding: false,
        };
        let x = (x + self
            .attn
            .forward(&self.attn_norm.forward(x)?, ctx, wiring)?)?;
        Ok((&x + self.ffn.forward(&self.ffn_norm.forward(&x)?)?)?)
    }
}

pub fn load(file: &mut dyn Weights, c: &Config) -> Result<Decoder> {
    let style = match c.architecture {
        Architecture::Llama => RopeStyle::Interleaved,
        _ => RopeStyle::Halves,
    };
    let mut freq_factors = if file.has("rope_freqs.weight") {
        let factors = file.vector("rope_freqs.weight")?.to_vec1::<f32>()?;
        if factors.len() != c.head_dim / 2 {
            return Err(EngineError::BadFile {
                path: file.origin().to_path_buf(),
                detail: format!(
                    "rope_freqs.weight has {} factors but each head rotates {} pairs",
                    factors.len(),
                    c.head_dim / 2
                ),
            });
        }
        Some(factors)
    } else {
        None
    };
    if c.rope_scale != 1.0 {
        let factors = freq_factors.unwrap_or_else(|| vec![1.0; c.head_dim / 2]);
        freq_factors = Some(factors.iter().map(|f| f * c.rope_scale).collect());
    }
    let mut blocks: Vec<Box<dyn Block>> = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let p = format!("blk.{i}");
        blocks.push(Box::new(LlamaBlock {
            attn_norm: RmsNorm::load(file, &format!("{p}.attn_norm"), c.rms_eps)?,
            attn: Attention::load(
                file,
                &p,
                c,
                matches!(c.architecture, Architecture::Qwen3 | Architecture::Qwen3Moe),
            )?,
            ffn_norm: RmsNorm::load(file, &format!("{p}.ffn_norm"), c.rms_eps)?,
            ffn: match c.experts {
                Some(e) => FeedForward::Experts(Moe::load(file, &p, e.count, e.used)?),
                None => FeedForward::Dense(Mlp::load(file, &p, Activation::Silu)?),
            },
        }));
    }
    Ok(Decoder {
        embed: file.embedding("token_embd.weight")?,
        embed_scale: None,
        blocks,
        norm: RmsNorm::load(file, "output_norm", c.rms_eps)?,
        lm_head: file.output_head()?,
        ropes: vec![Rope::new(
            c.rope_theta,
            c.head_dim,
            c.context_length,
            style,
            freq_factors.as_deref(),
        )?],
        window: None,
    })
}
