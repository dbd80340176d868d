//! Gemma 3 decoder. Differences from llama: embeddings scaled by sqrt(d); RMS norms after
//! attention and after the MLP as well as before; per-head RMS norms on queries and keys;
//! GELU (tanh) MLP; five of every six layers attend within a sliding window and use their own
//! rope base. The GGUF converter has already folded gemma's `1 + w` into the norm weights.
//!
//! Block: h = x + post_attention_norm(attn(attn_norm(x))),
//!        out = h + post_ffw_norm(mlp(ffn_norm(h))).

use crate::layers::{
    Activation, Attention, AttentionWiring, Mlp, RmsNorm, Rope, RopeStyle, StepContext,
};
use crate::model::{Block, Config, Decoder, SlidingWindow};
use crate::weights::Weights;
use crate::Result;
use candle_core::Tensor;

/// Rope base of the sliding-window layers when the file does not give one.
pub const SLIDING_ROPE_THETA: f32 = 10_000.0;
/// Every sixth layer is global when the file does not give a pattern.
pub const SLIDING_PATTERN: usize = 6;

/// The window of a file that gives its size (0: none) and pattern: of every `pattern` layers
/// the last attends globally (0: all windowed).
pub fn sliding_window(
    size: usize,
    pattern: usize,
    rope_theta: f32,
    n_layers: usize,
) -> Option<SlidingWindow> {
    let layers = (0..n_layers)
        .map(|i| pattern == 0 || i % pattern < pattern - 1)
        .collect();
    windowed_layers(size, layers, rope_theta, n_layers).expect("one flag per layer")
}

/// The window of a file that names the windowed layers one by one (GGUF's array form of the
/// pattern, Hugging Face's `layer_types`); `Err` says how the count is wrong.
pub fn windowed_layers(
    size: usize,
    layers: Vec<bool>,
    rope_theta: f32,
    n_layers: usize,
) -> std::result::Result<Option<SlidingWindow>, String> {
    if layers.len() != n_layers {
        return Err(format!(
            "{} sliding-window flags for {n_layers} layers",
            layers.len()
        ));
    }
    Ok((size > 0).then_some(SlidingWindow {
        size,
        layers,
        rope_theta,
    }))
}

pub struct Gemma3Block {
    attn_norm: RmsNorm,
    attn: Attention,
    post_attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: Mlp,
    post_ffw_norm: RmsNorm,
    sliding: bool,
}

impl Block for Gemma3Block {
    fn forward(
        &self,
        x: &Tensor,
        layer: usize,
        ctx: &mut StepContext,
        ropes: &[Rope],
    ) -> Result<Tensor> {
        // ropes[0]: global layers, ropes[1]: sliding-window layers.
        let rope_table = usize::from(self.sliding);
        let wiring = AttentionWiring {
            layer,
            rope: &ropes[rope_table],
            rope_table,
            sliding: self.sliding,
        };
        let attn = self
            .attn
            .forward(&self.attn_norm.forward(x)?, ctx, wiring)?;
        let h = (x + self.post_attention_norm.forward(&attn)?)?;
        let mlp = self.mlp.forward(&self.ffn_norm.forward(&h)?)?;
        Ok((&h + self.post_ffw_norm.forward(&mlp)?)?)
    }
}

pub fn load(file: &mut dyn Weights, c: &Config) -> Result<Decoder> {
    let window = c.sliding_window.as_ref();
    let global_scale = vec![c.rope_scale; c.head_dim / 2];
    let mut blocks: Vec<Box<dyn Block>> = Vec::with_capacity(c.n_layers);
    for i in 0..c.n_layers {
        let p = format!("blk.{i}");
        blocks.push(Box::new(Gemma3Block {
            attn_norm: RmsNorm::load(file, &format!("{p}.attn_norm"), c.rms_eps)?,
            attn: Attention::load(file, &p, c, true)?,
            post_attention_norm: RmsNorm::load(
                file,
                &format!("{p}.post_attention_norm"),
                c.rms_eps,
            )?,
            ffn_norm: RmsNorm::load(file, &format!("{p}.ffn_norm"), c.rms_eps)?,
            mlp: Mlp::load(file, &p, Activation::GeluTanh)?,
            post_ffw_norm: RmsNorm::load(file, &format!("{p}.post_ffw_norm"), c.rms_eps)?,
            sliding: window.is_some_and(|w| w.layers[i]),
        }));
    }
    Ok(Decoder {
        embed: file.embedding("token_embd.weight")?,
        embed_scale: Some((c.d_model as f64).sqrt()),
        blocks,
        norm: RmsNorm::load(file, "output_norm", c.rms_eps)?,
        lm_head: file.output_head()?,
        ropes: vec![
            Rope::new(
                c.rope_theta,
                c.head_dim,
                c.context_length,
                RopeStyle::Halves,
                (c.rope_scale != 1.0).then_some(global_scale.as_slice()),
            )?,
            Rope::new(
                window.map_or(SLIDING_ROPE_THETA, |w| w.rope_theta),
                c.head_dim,
                c.context_length,
                RopeStyle::Halves,
                None,
            )?,
        ],
        window: window.map(|w| w.size),
    })
}
