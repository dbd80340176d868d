//! The two dense problems behind the fits, in f64: the ridge solve and the top singular vector.

use faer::prelude::*;
use faer::{Mat, MatRef, Side};

use super::FitError;

/// Solves `(Zᵀ Z + λ I) v = b` for `Z` of shape `(n, d)`, choosing the cheaper of two exact
/// routes so the cost follows the smaller of `n` and `d`.
pub(super) fn ridge_solve(
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

/// The unit right-singular vector of `a` for its largest singular value, from the
/// eigendecomposition of the smaller Gram matrix (`a aᵀ` or `aᵀ a`). All zeros when `a` is 0.
/// Its sign is arbitrary; the caller aligns it.
pub(super) fn top_right_singular_vector(a: MatRef<'_, f64>) -> Result<Vec<f64>, FitError> {
    let d = a.ncols();
    let v: Col<f64> = if a.nrows() < d {
        let eigen = (a * a.transpose())
            .self_adjoint_eigen(Side::Lower)
            .map_err(|_| FitError::Eigen)?;
        // Eigenvalues come in nondecreasing order: the last column belongs to the largest.
        let u = eigen.U().col(a.nrows() - 1);
        a.transpose() * u
    } else {
        let eigen = (a.transpose() * a)
            .self_adjoint_eigen(Side::Lower)
            .map_err(|_| FitError::Eigen)?;
        eigen.U().col(d - 1).to_owned()
    };
    let norm = v.norm_l2();
    if norm == 0.0 || a.norm_l2() == 0.0 {
        return Ok(vec![0.0; d]);
    }
    Ok(v.iter().map(|x| x / norm).collect())
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
    fn top_singular_vector_matches_on_both_routes() {
        // A rank-one matrix plus small noise: the top right-singular vector is the rank-one
        // direction, and both the wide and the tall route must find it.
        let direction: Vec<f64> = (0..12).map(|j| (j as f64 + 1.0).sin()).collect();
        let norm = direction.iter().map(|x| x * x).sum::<f64>().sqrt();
        for n in [5, 40] {
            let mut rng = SplitMix64::new(n as u64);
            let a = Mat::from_fn(n, 12, |i, j| {
                (i as f64 + 1.0) * direction[j] + 0.01 * rng.gaussian()
            });
            let v = top_right_singular_vector(a.as_ref()).unwrap();
            let cosine: f64 = v.iter().zip(&direction).map(|(x, y)| x * y).sum::<f64>() / norm;
            assert!(cosine.abs() > 0.9999, "n {n}: cosine {cosine}");
        }
        assert_eq!(
            top_right_singular_vector(Mat::<f64>::zeros(3, 4).as_ref()).unwrap(),
            vec![0.0; 4]
        );
    }
}
