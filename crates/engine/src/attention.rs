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
        // One task per (row, query, key/value head), for the query heads that share it. The
        // output is `[batch, len, heads, dim]`, so a task's heads are one contiguous run.
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
                let n = slots.len();
                let at = |s: u32| (base + s as usize) * dim;
                // scores[g * n + j]: head g against slot j, then its softmax weight. Keys in
                // eights: eight independent sums at a time.
                scores.clear();
                scores.resize(group * n, 0.0);
                for (g, per_slot) in scores.chunks_exact_mut(n.max(1)).enumerate() {
                    let (eights, rest) = slots.split_at(n / 8 * 8);
                    for (out, ss) in per_slot.chunks_exact_mut(8).zip(eights.chunks_exact(8)) {
                        let key = |k: usize| &keys[at(ss[k])..][..dim];
                        out.copy_from_slice(&dots::<8>(query(g), std::array::from_fn(key)));
                    }
                    for (out, &s) in per_slot[n / 8 * 8..].iter_mut().zip(rest) {
                        *out = dot(query(g), &keys[at(s)..][..dim]);
                    }
                }
                let mut sum = vec![0f32; group];
                for (per_slot, total) in scores.chunks_exact_mut(n.max(1)).zip(&mut sum) {
                    let max = lanes(per_slot, f32::NEG_INFINITY, f32::max)
                        .into_iter()
                        .fold(f32::NEG_INFINITY, f32::max);
                    per_slot
                        .iter_mut()
                        .for_each(|x| *x = exp_from_max(*x - max));
                    *total = lanes(per_slot, 0.0, |a, b| a + b).iter().sum();
                }
                for (j, &s) in slots.iter().enumerate() {
                    let value = &values[at(s)..][..dim];
                    for (g, o) in o.chunks_exact_mut(dim).enumerate() {
                        let weight = scores[g * n + j];
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

/// `x` folded by `f` into eight running lanes (lane `l` takes the values at `l` modulo 8, in
/// order), each lane starting from `init`: vector-wide, and the same order for any `x`.
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> [f32; 8] {
    let mut lanes = [init; 8];
    let (whole, rest) = x.split_at(x.len() / 8 * 8);
    for chunk in whole.chunks_exact(8) {
        for l in 0..8 {
            lanes[l] = f(lanes[l], chunk[l]);
        }
    }
    for (l, &v) in rest.iter().enumerate() {
        lanes[l] = f(lanes[l], v);
    }
    lanes
}

/// `e^x` for `x <= 0` (a score minus its row's largest) to about one ulp, in operations the
/// compiler turns into vector code (libm's `expf` is a call per value, and a query at a depth
/// of thousands of tokens takes thousands of them per head): `x = n ln 2 + r` with
/// `|r| <= ln 2 / 2`, a degree-7 polynomial for `e^r` (minimax coefficients as in Cephes'
/// `expf`), times `2^n` put into the exponent bits. `e^0` is exactly 1.
#[inline(always)]
fn exp_from_max(x: f32) -> f32 {
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // Below this e^x is under f32's smallest normal; it counts as nothing beside e^0 = 1.
    let x = x.max(-87.0);
    let n = x.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
    let r = n.mul_add(-LN2_LOW, n.mul_add(-LN2_HIGH, x));
    let mut p = 1.987_569_1e-4_f32;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        0.166_666_65,
        0.5,
    ] {
        p = p.mul_add(r, c);
    }
    let e_r = (p * r).mul_add(r, r) + 1.0;
    e_r * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// A dot product in a fixed order: eight running sums, then the remainder, then the lanes.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    dots(a, [b])[0]
}

/// `a`'s dot product with each of `bs`, each in [`dot`]'s order, side by side.
#[inline(always)]
fn dots<const K: usize>(a: &[f32], bs: [&[f32]; K]) -> [f32; K] {
    let whole = a.len() / 8 * 8;
    let mut lanes = [[0f32; 8]; K];
    for c in (0..whole).step_by(8) {
        let x = &a[c..c + 8];
        for (lanes, b) in lanes.iter_mut().zip(&bs) {
            let y = &b[c..c + 8];
            for l in 0..8 {
                lanes[l] = x[l].mul_add(y[l], lanes[l]);
            }
        }
    }
    std::array::from_fn(|k| {
        let mut rest = 0f32;
        for (x, y) in a[whole..].iter().zip(&bs[k][whole..]) {
            rest = x.mul_add(*y, rest);
        }
        lanes[k].iter().sum::<f32>() + rest
    })
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
    fn exp_is_within_two_ulp_of_f64() {
        assert_eq!(exp_from_max(0.0), 1.0);
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let got = exp_from_max(x) as f64;
            let ulp = f32::EPSILON as f64 * want;
            assert!((got - want).abs() <= 2.0 * ulp, "e^{x}: {got} vs {want}");
        }
        assert!(exp_from_max(-1e4) < 1e-37);
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
