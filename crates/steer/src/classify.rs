//! A class-balanced ridge classifier: least squares onto ±1 targets with each class weighing
//! half, so a class of few rows counts as much as a class of many. Solved in the dual
//! (`n × n`), since the rows (several points' residual vectors side by side) are wider than
//! they are many.

use faer::prelude::*;
use faer::{Mat, Side};

/// Why a classifier could not be fitted.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ClassifyError {
    #[error("{len} values are not {n} rows of width {p}; pass row-major (n, p) data")]
    Shape { len: usize, n: usize, p: usize },
    #[error(
        "a classifier needs rows of both classes ({positive} positive of {n}); label rows of each"
    )]
    OneClass { positive: usize, n: usize },
    #[error("the ridge must be finite and > 0, got {0}")]
    Ridge(f64),
    #[error(
        "the rows do not vary (or hold NaN), so there is nothing to fit; check the activations"
    )]
    NoSpread,
    #[error(
        "the ridge system is not numerically positive definite at lambda = {0:e}; raise kappa"
    )]
    Factorization(f64),
}

/// The weights `w` whose score `w · x` is high for `positive` rows: minimises
/// `Σ_i c_i (t_i - (x_i - μ) · w)² + λ |w|²` with `t = ±1`, `c_i = 1 / (2 · size of i's
/// class)` and `μ` the class-balanced mean; `λ = κ · Σ_i c_i |x_i - μ|² / p` (relative, as
/// [`crate::Ridge::Relative`]). `rows` is `[n, p]` row-major. The score's offset is left to
/// the caller's threshold.
pub fn balanced_ridge(
    rows: &[f32],
    p: usize,
    positive: &[bool],
    kappa: f64,
) -> Result<Vec<f64>, ClassifyError> {
    let n = positive.len();
    if p == 0 || rows.len() != n * p {
        return Err(ClassifyError::Shape {
            len: rows.len(),
            n,
            p,
        });
    }
    let n_pos = positive.iter().filter(|&&b| b).count();
    if n_pos == 0 || n_pos == n {
        return Err(ClassifyError::OneClass { positive: n_pos, n });
    }
    if !(kappa.is_finite() && kappa > 0.0) {
        return Err(ClassifyError::Ridge(kappa));
    }
    let weight: Vec<f64> = positive
        .iter()
        .map(|&b| 0.5 / if b { n_pos } else { n - n_pos } as f64)
        .collect();
    let mut mean = vec![0.0; p];
    for (i, w) in weight.iter().enumerate() {
        for (m, &x) in mean.iter_mut().zip(&rows[i * p..(i + 1) * p]) {
            *m += w * f64::from(x);
        }
    }
    // Xᵀ centred (p × n): faer is column-major, so each row is one contiguous column.
    let x_t = Mat::from_fn(p, n, |j, i| f64::from(rows[i * p + j]) - mean[j]);
    let gram = x_t.transpose() * &x_t;
    let spread: f64 = (0..n).map(|i| weight[i] * gram[(i, i)]).sum();
    let lambda = kappa * spread / p as f64;
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(ClassifyError::NoSpread);
    }
    let target_mean: f64 = positive
        .iter()
        .zip(&weight)
        .map(|(&b, w)| w * if b { 1.0 } else { -1.0 })
        .sum();
    let targets = Mat::from_fn(n, 1, |i, _| {
        (if positive[i] { 1.0 } else { -1.0 }) - target_mean
    });
    // w = Xᵀ α with (X Xᵀ + λ C⁻¹) α = t.
    let mut system = gram;
    for (i, w) in weight.iter().enumerate() {
        system[(i, i)] += lambda / w;
    }
    let alpha = system
        .llt(Side::Lower)
        .map_err(|_| ClassifyError::Factorization(lambda))?
        .solve(&targets);
    let w = &x_t * alpha;
    Ok((0..p).map(|j| w[(j, 0)]).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Positives sit higher along one axis than negatives; a second axis is noise shared by
    /// both. The classifier puts its weight on the first and scores every row on its side.
    #[test]
    fn the_classifier_weighs_the_separating_axis_and_balances_unequal_classes() {
        let mut rows = Vec::new();
        let mut positive = Vec::new();
        for i in 0..40 {
            let pos = i < 5;
            let noise = ((i * 7919) % 13) as f32 - 6.0;
            rows.extend([if pos { 2.0 } else { -1.0 } + 0.01 * noise, noise]);
            positive.push(pos);
        }
        let w = balanced_ridge(&rows, 2, &positive, 1e-3).unwrap();
        assert!(w[0] > 10.0 * w[1].abs(), "{w:?}");
        let scores: Vec<f64> = rows
            .chunks(2)
            .map(|r| f64::from(r[0]) * w[0] + f64::from(r[1]) * w[1])
            .collect();
        let lowest_positive = scores[..5].iter().cloned().fold(f64::MAX, f64::min);
        let highest_negative = scores[5..].iter().cloned().fold(f64::MIN, f64::max);
        assert!(lowest_positive > highest_negative);
        assert!(balanced_ridge(&rows, 2, &[true; 40], 1.0).is_err());
        assert!(balanced_ridge(&rows, 3, &positive, 1.0).is_err());
    }
}
