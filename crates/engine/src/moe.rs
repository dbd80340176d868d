//! Routed experts (qwen3moe's feed-forward): a router scores every expert for each token, the
//! `used` best by softmax probability run on it, and their outputs are summed weighted by those
//! probabilities renormalised to sum to 1. Each expert is a SiLU-gated MLP.
//!
//! Tokens are grouped by expert, so each expert multiplies all of its tokens at once; a token's
//! experts are summed in the order of their rank, whatever shares its batch.

use crate::quant::Matrix;
use crate::weights::Weights;
use crate::Result;
use candle_core::{Device, Tensor};

struct Expert {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

pub struct Moe {
    router: Matrix,
    experts: Vec<Expert>,
    used: usize,
}

impl Moe {
    /// The experts of block `prefix` (`ffn_gate_inp`, `ffn_{gate,up,down}_exps`).
    pub fn load(file: &mut dyn Weights, prefix: &str, count: usize, used: usize) -> Result<Self> {
        let router = file.matrix(&format!("{prefix}.ffn_gate_inp.weight"))?;
        let mut each =
            |part: &str| file.experts(&format!("{prefix}.ffn_{part}_exps.weight"), count);
        let (gates, ups, downs) = (each("gate")?, each("up")?, each("down")?);
        let experts = gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .map(|((gate, up), down)| Expert { gate, up, down })
            .collect();
        Ok(Self {
            router,
            experts,
            used,
        })
    }

    /// `x`: `[batch, len, d]` -> `[batch, len, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d = dims[dims.len() - 1];
        let x = x.reshape(((), d))?.contiguous()?;
        let scores: Vec<Vec<f32>> = self.router.forward(&x)?.to_vec2()?;
        // Per expert: (token, rank, weight) of the tokens routed to it.
        let mut routed: Vec<Vec<(usize, usize, f32)>> = vec![Vec::new(); self.experts.len()];
        for (token, logits) in scores.iter().enumerate() {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let probs: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let chosen = &order[..self.used];
            let total: f32 = chosen.iter().map(|&e| probs[e]).sum();
            for (rank, &e) in chosen.iter().enumerate() {
                routed[e].push((token, rank, probs[e] / total));
            }
        }
        let n = scores.len();
        let mut parts = vec![vec![vec![0f32; d]; self.used]; n];
        for (expert, tokens) in self.experts.iter().zip(&routed) {
            if tokens.is_empty() {
                continue;
            }
            let ids: Vec<u32> = tokens.iter().map(|&(t, _, _)| t as u32).collect();
            let rows = x.index_select(&Tensor::new(ids.as_slice(), &Device::Cpu)?, 0)?;
            let gate = candle_nn::ops::silu(&expert.gate.forward(&rows)?)?;
            let out: Vec<Vec<f32>> = expert
                .down
                .forward(&(gate * expert.up.forward(&rows)?)?)?
                .to_vec2()?;
            for (&(token, rank, weight), row) in tokens.iter().zip(out) {
                parts[token][rank] = row.into_iter().map(|v| v * weight).collect();
            }
        }
        let summed: Vec<f32> = parts
            .into_iter()
            .flat_map(|ranks| {
                ranks
                    .into_iter()
                    .reduce(|a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect())
                    .unwrap_or_default()
            })
            .collect();
        Ok(Tensor::from_vec(summed, dims, &Device::Cpu)?)
    }
}

/// A block's feed-forward: one MLP, or routed experts.
pub enum FeedForward {
    Dense(crate::layers::Mlp),
    Experts(Moe),
}

impl FeedForward {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(mlp) => mlp.forward(x),
            Self::Experts(moe) => moe.forward(x),
        }
    }
}
