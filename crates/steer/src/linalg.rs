//! The dense operations that fitting, analysis, protection, the gate and the report share, one
//! definition each, in f64: dot products, norms and cosines of f32 vectors, means of rows,
//! principal axes (one thin SVD, with numpy's rank tolerance) and the ridge solve.

use faer::prelude::*;
use faer::{Mat, MatRef, Side};

use crate::fit::FitError;

/// `Σ a_i b_i` in f64.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum()
}

/// `Σ a_i b_i` of an f32 row and an f64 direction.
pub fn dot_f64(row: &[f32], v: &[f64]) -> f64 {
    row.iter().zip(v).map(|(&x, &w)| f64::from(x) * w).sum()
}

/// Euclidean norm in f64.
pub fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

/// Cosine similarity; `None` when either vector is zero.
pub fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    let denominator = norm(a) * norm(b);
    (denominator > 0.0).then(|| (dot(a, b) / denominator).clamp(-1.0, 1.0))
}

/// The mean of rows `rows` of `x` (`[n, d]`, row-major); zeros for no rows.
pub fn mean_of_rows(x: &[f32], d: usize, rows: &[usize]) -> Vec<f64> {
    let mut mean = vec![0.0; d];
    for &r in rows {
        for (m, &v) in mean.iter_mut().zip(&x[r * d..(r + 1) * d]) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows.len().max(1) as f64);
    mean
}

/// The matrix whose row `i` is `x[rows[i]] - origin`.
pub fn offsets(x: &[f32], d: usize, rows: &[usize], origin: &[f64]) -> Mat<f64> {
    Mat::from_fn(rows.len(), d, |i, j| {
        f64::from(x[rows[i] * d + j]) - origin[j]
    })
}

/// What a singular value must exceed to count: numpy's `matrix_rank` tolerance,
/// `scale · max(n, d) · ε`, below which a direction is rounding noise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankScale {
    /// `scale` is the largest singular value.
    Largest,
    /// A scale the caller knows better (e.g. the norm of the rows before they were offset, so
    /// offsets that are rounding noise of identical rows count for nothing).
    Given(f64),
}

/// The principal axes of a matrix of rows: its right singular vectors, unit length, largest
/// singular value first, only those above the rank tolerance.
#[derive(Debug, Clone, PartialEq)]
pub struct PrincipalAxes {
    pub singular_values: Vec<f64>,
    /// `axes[j]` has length `d`.
    pub axes: Vec<Vec<f64>>,
}

/// The principal axes of `rows` (`n × d`), from one thin SVD.
pub fn principal_axes(rows: MatRef<'_, f64>, scale: RankScale) -> Result<PrincipalAxes, String> {
    let svd = rows.thin_svd().map_err(|e| {
        format!("the SVD did not converge ({e:?}); check the activations for extreme values")
    })?;
    let singular = svd.S().column_vector();
    let scale = match scale {
        RankScale::Largest => singular.iter().copied().fold(0.0, f64::max),
        RankScale::Given(scale) => scale,
    };
    let tolerance = scale * rows.nrows().max(rows.ncols()) as f64 * f64::EPSILON;
    let rank = singular.iter().take_while(|&&s| s > tolerance).count();
    Ok(PrincipalAxes {
        singular_values: singular.iter().take(rank).copied().collect(),
        axes: (0..rank)
            .map(|j| svd.V().col(j).iter().copied().collect())
            .collect(),
    })
}

/// Solves `(Zᵀ Z + λ I) v = b` for `Z` of shape `(n, d)`, choosing the cheaper of two exact
/// routes so the cost follows the smaller of `n` and `d`.
pub(crate) fn ridge_solve(
    z: MatRef<'_, f64>,
    lambda: f64,
    b: &[f64],
) -> Result<Vec<f64>, FitError> {
    if z.nrows() < z.ncols() {
        solve_woodbury(z, lambda, b)
    } else {
        solve_direct(z, lambda, b)
    }
}

/// Woodbury: `(Zᵀ Z + λ I)⁻¹ b = (b - Zᵀ (Z Zᵀ + λ I)⁻¹ Z b) / λ`, an `n × n` factorisation.
fn solve_woodbury(z: MatRef<'_, f64>, lambda: f64, b: &[f64]) -> Result<Vec<f64>, FitError> {
    let b = Col::from_fn(b.len(), |j| b[j]);
    let mut gram = z * z.transpose();
    add_to_diagonal(&mut gram, lambda);
    let llt = gram
        .llt(Side::Lower)
        .map_err(|_| FitError::Factorization { lambda })?;
    let y = llt.solve(z * &b);
    let v = &b - z.transpose() * &y;
    Ok(v.iter().map(|x| x / lambda).collect())
}

/// Direct: Cholesky of the `d × d` matrix `Zᵀ Z + λ I`.
fn solve_direct(z: MatRef<'_, f64>, lambda: f64, b: &[f64]) -> Result<Vec<f64>, FitError> {
    let b = Col::from_fn(b.len(), |j| b[j]);
    let mut scatter = z.transpose() * z;
    add_to_diagonal(&mut scatter, lambda);
    let llt = scatter
        .llt(Side::Lower)
        .map_err(|_| FitError::Factorization { lambda })?;
    Ok(llt.solve(&b).iter().copied().collect())
}

fn add_to_diagonal(m: &mut Mat<f64>, value: f64) {
    for i in 0..m.nrows() {
        m[(i, i)] += value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random_matrix(n: usize, d: usize, seed: u64) -> (Mat<f64>, Vec<f64>) {
        let mut rng = SplitMix64::new(seed);
        let z = Mat::from_fn(n, d, |_, _| rng.gaussian());
        let b = (0..d).map(|_| rng.gaussian()).collect();
        (z, b)
    }

    fn relative_difference(a: &[f64], b: &[f64]) -> f64 {
        let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let norm: f64 = b.iter().map(|y| y * y).sum();
        (diff / norm).sqrt()
    }

    #[test]
    fn woodbury_and_direct_agree_with_fewer_rows_than_columns() {
        let (z, b) = random_matrix(20, 50, 1);
        for lambda in [1e-3, 0.5, 30.0] {
            let woodbury = solve_woodbury(z.as_ref(), lambda, &b).unwrap();
            let direct = solve_direct(z.as_ref(), lambda, &b).unwrap();
            assert!(
                relative_difference(&woodbury, &direct) < 1e-6,
                "lambda {lambda}"
            );
        }
    }

    #[test]
    fn woodbury_and_direct_agree_with_more_rows_than_columns() {
        let (z, b) = random_matrix(80, 30, 2);
        for lambda in [1e-3, 0.5, 30.0] {
            let woodbury = solve_woodbury(z.as_ref(), lambda, &b).unwrap();
            let direct = solve_direct(z.as_ref(), lambda, &b).unwrap();
            assert!(
                relative_difference(&woodbury, &direct) < 1e-6,
                "lambda {lambda}"
            );
        }
    }

    #[test]
    fn ridge_solve_satisfies_the_system() {
        for (n, d) in [(10, 40), (40, 10)] {
            let (z, b) = random_matrix(n, d, 3);
            let v = ridge_solve(z.as_ref(), 0.7, &b).unwrap();
            let v_col = Col::from_fn(d, |j| v[j]);
            let lhs = z.transpose() * (&z * &v_col) + &v_col * Scale(0.7);
            let lhs: Vec<f64> = lhs.iter().copied().collect();
            assert!(relative_difference(&lhs, &b) < 1e-10, "n {n}, d {d}");
        }
    }

    #[test]
    fn principal_axes_find_the_spread_largest_first_and_drop_noise() {
        // Rows spread 3 along e0 and 1 along e1, nothing along e2: rank 2, e0 first.
        let rows = Mat::from_fn(4, 3, |i, j| {
            let (s, t) = [(1.0, 1.0), (-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0)][i];
            [3.0 * s, t, 0.0][j]
        });
        let found = principal_axes(rows.as_ref(), RankScale::Largest).unwrap();
        assert_eq!(found.axes.len(), 2);
        assert!((found.singular_values[0] - 6.0).abs() < 1e-9);
        assert!((found.axes[0][0].abs() - 1.0).abs() < 1e-9);
        assert!((found.axes[1][1].abs() - 1.0).abs() < 1e-9);
        let zero = principal_axes(Mat::<f64>::zeros(3, 4).as_ref(), RankScale::Largest).unwrap();
        assert!(zero.axes.is_empty());
        // Offsets far below the given scale are noise.
        let tiny = Mat::from_fn(2, 2, |i, _| if i == 0 { 1e-20 } else { -1e-20 });
        assert!(principal_axes(tiny.as_ref(), RankScale::Given(1.0))
            .unwrap()
            .axes
            .is_empty());
    }

    #[test]
    fn dot_norm_cosine_and_means() {
        assert_eq!(dot(&[1.0, 2.0], &[3.0, 4.0]), 11.0);
        assert_eq!(dot_f64(&[1.0, 2.0], &[0.5, 0.25]), 1.0);
        assert_eq!(norm(&[3.0, 4.0]), 5.0);
        assert!((cosine(&[1.0, 2.0], &[2.0, 4.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((cosine(&[1.0, 2.0], &[-1.0, -2.0]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), None);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(mean_of_rows(&x, 2, &[0, 2]), vec![3.0, 4.0]);
        assert_eq!(offsets(&x, 2, &[1], &[1.0, 1.0])[(0, 1)], 3.0);
    }
}
