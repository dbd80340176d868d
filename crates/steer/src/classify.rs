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
    let weight = class_weights(positive, kappa)?;
    let mut mean = vec![0.0; p];
    for (i, w) in weight.iter().enumerate() {
        for (m, &x) in mean.iter_mut().zip(&rows[i * p..(i + 1) * p]) {
            *m += w * f64::from(x);
        }
    }
    // Xᵀ centred (p × n): faer is column-major, so each row is one contiguous column.
    let x_t = Mat::from_fn(p, n, |j, i| f64::from(rows[i * p + j]) - mean[j]);
    let gram = x_t.transpose() * &x_t;
    let alpha = dual(gram, positive, &weight, kappa, p)?;
    let w = &x_t * alpha;
    Ok((0..p).map(|j| w[(j, 0)]).collect())
}

/// Each row's weight `c_i`; refuses one class and a ridge that is not finite and positive.
fn class_weights(positive: &[bool], kappa: f64) -> Result<Vec<f64>, ClassifyError> {
    let n = positive.len();
    let n_pos = positive.iter().filter(|&&b| b).count();
    if n_pos == 0 || n_pos == n {
        return Err(ClassifyError::OneClass { positive: n_pos, n });
    }
    if !(kappa.is_finite() && kappa > 0.0) {
        return Err(ClassifyError::Ridge(kappa));
    }
    Ok(positive
        .iter()
        .map(|&b| 0.5 / if b { n_pos } else { n - n_pos } as f64)
        .collect())
}

/// `α` with `w = Xᵀ α`, from the rows' centred Gram matrix `X Xᵀ`: `(X Xᵀ + λ C⁻¹) α = t`.
fn dual(
    gram: Mat<f64>,
    positive: &[bool],
    weight: &[f64],
    kappa: f64,
    p: usize,
) -> Result<Mat<f64>, ClassifyError> {
    let n = positive.len();
    let spread: f64 = (0..n).map(|i| weight[i] * gram[(i, i)]).sum();
    let lambda = kappa * spread / p as f64;
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(ClassifyError::NoSpread);
    }
    let target_mean: f64 = positive
        .iter()
        .zip(weight)
        .map(|(&b, w)| w * if b { 1.0 } else { -1.0 })
        .sum();
    let targets = Mat::from_fn(n, 1, |i, _| {
        (if positive[i] { 1.0 } else { -1.0 }) - target_mean
    });
    let mut system = gram;
    for (i, w) in weight.iter().enumerate() {
        system[(i, i)] += lambda / w;
    }
    Ok(system
        .llt(Side::Lower)
        .map_err(|_| ClassifyError::Factorization(lambda))?
        .solve(&targets))
}

/// The Gram matrix of a fixed set of rows, for fitting [`balanced_ridge`] on many subsets of
/// them and scoring the others, as cross-validation does: each fit then costs one solve of its
/// own size instead of a product over the rows' width.
pub struct Gram {
    gram: Mat<f64>,
    p: usize,
}

impl Gram {
    /// `rows` is `[n, p]` row-major.
    pub fn new(rows: &[f32], p: usize) -> Result<Self, ClassifyError> {
        let n = rows.len().checked_div(p).unwrap_or(0);
        if p == 0 || rows.len() != n * p {
            return Err(ClassifyError::Shape {
                len: rows.len(),
                n,
                p,
            });
        }
        let x_t = Mat::from_fn(p, n, |j, i| f64::from(rows[i * p + j]));
        Ok(Self {
            gram: x_t.transpose() * &x_t,
            p,
        })
    }

    /// The scores `w · x` of rows `at`, for the `w` that [`balanced_ridge`] fits on rows `fit`
    /// labelled `positive` (equal up to rounding).
    pub fn scores(
        &self,
        fit: &[usize],
        positive: &[bool],
        kappa: f64,
        at: &[usize],
    ) -> Result<Vec<f64>, ClassifyError> {
        let weight = class_weights(positive, kappa)?;
        let g = |i: usize, j: usize| self.gram[(fit[i], fit[j])];
        let n = fit.len();
        // The rows' products with the class-balanced mean μ, and μ · μ.
        let with_mean: Vec<f64> = (0..n)
            .map(|i| (0..n).map(|j| weight[j] * g(i, j)).sum())
            .collect();
        let mean_mean: f64 = (0..n).map(|i| weight[i] * with_mean[i]).sum();
        let centred = Mat::from_fn(n, n, |i, j| {
            g(i, j) - with_mean[i] - with_mean[j] + mean_mean
        });
        let alpha = dual(centred, positive, &weight, kappa, self.p)?;
        let alpha_sum: f64 = (0..n).map(|j| alpha[(j, 0)]).sum();
        // w · x = Σ_j α_j (x_j - μ) · x.
        Ok(at
            .iter()
            .map(|&x| {
                let dot: f64 = (0..n).map(|j| alpha[(j, 0)] * self.gram[(fit[j], x)]).sum();
                let mean_dot: f64 = (0..n).map(|j| weight[j] * self.gram[(fit[j], x)]).sum();
                dot - alpha_sum * mean_dot
            })
            .collect())
    }
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

    /// Scores from the Gram matrix of all rows equal those of the weights fitted on a subset.
    #[test]
    fn gram_scores_equal_the_fitted_weights_scores() {
        let (n, p) = (30, 7);
        let rows: Vec<f32> = (0..n * p)
            .map(|k| {
                ((k * 7919 + 13) % 101) as f32 / 50.0 - 1.0
                    + if k % p == 0 && k / p < 12 { 1.5 } else { 0.0 }
            })
            .collect();
        let fit: Vec<usize> = (0..n).filter(|i| i % 4 != 1).collect();
        let positive: Vec<bool> = fit.iter().map(|&i| i < 12).collect();
        let subset: Vec<f32> = fit
            .iter()
            .flat_map(|&i| rows[i * p..(i + 1) * p].to_vec())
            .collect();
        let w = balanced_ridge(&subset, p, &positive, 0.3).unwrap();
        let all: Vec<usize> = (0..n).collect();
        let scores = Gram::new(&rows, p)
            .unwrap()
            .scores(&fit, &positive, 0.3, &all)
            .unwrap();
        for (i, s) in scores.iter().enumerate() {
            let direct: f64 = (0..p).map(|j| w[j] * f64::from(rows[i * p + j])).sum();
            assert!(
                (s - direct).abs() < 1e-9 * (1.0 + direct.abs()),
                "row {i}: {s} vs {direct}"
            );
        }
        assert!(Gram::new(&rows, 8).is_err());
    }
}
