//! Scaled dot-product attention over the key/value cache, read in place.
//!
//! Invariant: a query's output depends only on its own row's real slots, visited in slot order
//! with one fixed order of operations, so padding, the batch a row shares and where its slots
//! sit in the cache change no bit of it (matrix kernels over padded rows would group their sums
//! by alignment, and did). Each query: scores against the slots it sees, the softmax's
//! exponentials from the largest score, the values summed in slot order, divided once.

use crate::kv_cache::{KvCache, Visible};
use crate::Result;
use candle_core::{Device, Tensor};
use rayon::prelude::*;

/// `q`: `[batch, heads, len, head_dim]`, already scaled; query head `h` reads key/value head
/// `h / (heads / kv_heads)`. Returns `[batch, len, heads * head_dim]`.
pub fn attend(
    q: &Tensor,
    cache: &KvCache,
    layer: usize,
    kv_heads: usize,
    visible: &Visible,
) -> Result<Tensor> {
    let (batch, heads, len, dim) = q.dims4()?;
    let group = heads / kv_heads;
    let capacity = cache.capacity();
    let q: Vec<f32> = q.flatten_all()?.to_vec1()?;
    let mut out = vec![0f32; batch * len * heads * dim];
    cache.read_layer(layer, |keys, values| {
        // One task per (row, query, key/value head), for the query heads that share it: each
        // key and value is loaded once for all of them. The output is `[batch, len, heads,
        // dim]`, so a task's heads are one contiguous run.
        out.par_chunks_mut(group * dim).enumerate().for_each_init(
            Vec::new,
            |scores, (index, o)| {
                let kv_head = index % kv_heads;
                let i = (index / kv_heads) % len;
                let row = index / (kv_heads * len);
                let query = |g: usize| {
                    let head = kv_head * group + g;
                    &q[((row * heads + head) * len + i) * dim..][..dim]
                };
                let base = (row * kv_heads + kv_head) * capacity;
                let slots = visible.slots(row, i);
                // scores[j * group + g]: head g against slot j.
                scores.clear();
                for &s in slots {
                    let at = (base + s as usize) * dim;
                    let key = &keys[at..at + dim];
                    scores.extend((0..group).map(|g| dot(query(g), key)));
                }
                let mut max = vec![f32::NEG_INFINITY; group];
                for per_slot in scores.chunks_exact(group) {
                    for (m, &x) in max.iter_mut().zip(per_slot) {
                        *m = m.max(x);
                    }
                }
                let mut sum = vec![0f32; group];
                for (&s, per_slot) in slots.iter().zip(scores.chunks_exact(group)) {
                    let at = (base + s as usize) * dim;
                    let value = &values[at..at + dim];
                    for (g, o) in o.chunks_exact_mut(dim).enumerate() {
                        let weight = (per_slot[g] - max[g]).exp();
                        sum[g] += weight;
                        for (o, &v) in o.iter_mut().zip(value) {
                            *o += weight * v;
                        }
                    }
                }
                for (o, total) in o.chunks_exact_mut(dim).zip(sum) {
                    for o in o.iter_mut() {
                        *o /= total;
                    }
                }
            },
        );
    })?;
    Ok(Tensor::from_vec(
        out,
        (batch, len, heads * dim),
        &Device::Cpu,
    )?)
}

/// A dot product in a fixed order: eight running sums, then the remainder, then the lanes.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            lanes[l] = x[l].mul_add(y[l], lanes[l]);
        }
    }
    let mut rest = 0f32;
    for (x, y) in a_rest.iter().zip(b_rest) {
        rest = x.mul_add(*y, rest);
    }
    lanes.iter().sum::<f32>() + rest
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv_cache::KvCache;

    /// Attention as textbook matrices, in f64, for one row seeing `slots`.
    fn reference(q: &[f32], k: &[Vec<f32>], v: &[Vec<f32>], slots: &[usize]) -> Vec<f64> {
        let scores: Vec<f64> = slots
            .iter()
            .map(|&s| {
                q.iter()
                    .zip(&k[s])
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum()
            })
            .collect();
        let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = weights.iter().sum();
        (0..q.len())
            .map(|d| {
                slots
                    .iter()
                    .zip(&weights)
                    .map(|(&s, w)| w * v[s][d] as f64)
                    .sum::<f64>()
                    / total
            })
            .collect()
    }

    /// A tensor's data cut into rows of `dim`.
    fn rows(t: &Tensor, dim: usize) -> Vec<Vec<f32>> {
        let data: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        data.chunks(dim).map(<[f32]>::to_vec).collect()
    }

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0) - 1.0)
            .collect()
    }

    #[test]
    fn matches_the_textbook_formula_and_ignores_padding() {
        // One kv head shared by two query heads, head_dim 12 (not a multiple of 8); row 1 is
        // left-padded by two slots, so its queries must see only slots 2 and 3.
        let (batch, heads, kv_heads, len, dim) = (2, 2, 1, 4, 12);
        let mut cache = KvCache::new(batch, len, 1);
        let valid = vec![true, true, true, true, false, false, true, true];
        let chunk = cache.begin(valid, len, true).unwrap();
        let shape = (batch, kv_heads, len, dim);
        let k = Tensor::from_vec(values(batch * len * dim, 1), shape, &Device::Cpu).unwrap();
        let v = Tensor::from_vec(values(batch * len * dim, 2), shape, &Device::Cpu).unwrap();
        cache.append(0, &chunk, &k, &v).unwrap();
        let q_data = values(batch * heads * len * dim, 3);
        let q = Tensor::from_vec(q_data.clone(), (batch, heads, len, dim), &Device::Cpu).unwrap();
        let visible = cache.visible(&chunk, None);
        let out: Vec<f32> = attend(&q, &cache, 0, kv_heads, &visible)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (k_rows, v_rows) = (rows(&k, dim), rows(&v, dim));
        for row in 0..batch {
            for i in 0..len {
                let real = row == 0 || i >= 2;
                if !real {
                    continue;
                }
                let first = if row == 0 { 0 } else { 2 };
                let slots: Vec<usize> = (first..=i).map(|s| row * len + s).collect();
                for head in 0..heads {
                    let query = &q_data[((row * heads + head) * len + i) * dim..][..dim];
                    let want = reference(query, &k_rows, &v_rows, &slots);
                    let got = &out[((row * len + i) * heads + head) * dim..][..dim];
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (*g as f64 - w).abs() < 1e-5,
                            "row {row} query {i} head {head}"
                        );
                    }
                }
            }
        }
    }
}
