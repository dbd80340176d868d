//! Protected directions: remove from a target vector its components along directions whose
//! behaviour must not move (e.g. the harmful-request refusal direction), so steering the target
//! topic leaves that behaviour alone.

use crate::linalg;

/// An orthonormal basis (Gram-Schmidt, in f64) of the span of `directions`; zero or
/// (numerically) dependent directions add nothing.
pub fn orthonormal_basis(directions: &[&[f32]]) -> Vec<Vec<f64>> {
    let mut basis: Vec<Vec<f64>> = Vec::new();
    for dir in directions {
        let mut u: Vec<f64> = dir.iter().map(|&x| f64::from(x)).collect();
        for b in &basis {
            let dot: f64 = u.iter().zip(b).map(|(x, y)| x * y).sum();
            u.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
        }
        let norm = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        let scale = dir.iter().map(|&x| f64::from(x).abs()).fold(0.0, f64::max);
        // A direction that is (numerically) inside the span so far adds nothing.
        if norm > 1e-9 * scale.max(f64::MIN_POSITIVE) && norm > 0.0 {
            u.iter_mut().for_each(|x| *x /= norm);
            basis.push(u);
        }
    }
    basis
}

/// `vector` minus its projection on the span of `directions`. Computed in f64.
pub fn project_out_span(vector: &[f32], directions: &[&[f32]]) -> Vec<f32> {
    let mut v: Vec<f64> = vector.iter().map(|&x| f64::from(x)).collect();
    for b in &orthonormal_basis(directions) {
        let dot: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
        v.iter_mut().zip(b).for_each(|(x, y)| *x -= dot * y);
    }
    v.into_iter().map(|x| x as f32).collect()
}

/// The top `k` principal directions of rows `a` of `x` (`[n, d]`, row-major) measured from the
/// mean of rows `b`: the leading right singular vectors of the matrix of `x_i - mean_b`, unit
/// length, largest first. The protected behaviour's subspace beyond its mean difference (the
/// first direction is close to the mean difference when that dominates). Fewer than `k` when
/// the offsets have lower rank.
pub fn principal_directions(
    x: &[f32],
    d: usize,
    a: &[usize],
    b: &[usize],
    k: usize,
) -> Result<Vec<Vec<f32>>, String> {
    if a.is_empty() || b.is_empty() {
        return Err(format!(
            "principal directions need rows on both sides ({} and {} found)",
            a.len(),
            b.len()
        ));
    }
    let mean_b = linalg::mean_of_rows(x, d, b);
    // The rank tolerance is taken relative to the rows themselves rather than to the offsets:
    // offsets that are rounding noise of the rows (rows that all agree) are no direction.
    let scale = a
        .iter()
        .map(|&i| linalg::norm(&x[i * d..(i + 1) * d]).powi(2))
        .sum::<f64>()
        .sqrt();
    let found = linalg::principal_axes(
        linalg::offsets(x, d, a, &mean_b).as_ref(),
        linalg::RankScale::Given(scale),
    )
    .map_err(|e| format!("the protected offsets: {e}"))?;
    Ok(found
        .axes
        .into_iter()
        .take(k)
        .map(|axis| axis.into_iter().map(|v| v as f32).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::{cosine, norm};

    #[test]
    fn the_result_is_orthogonal_to_every_protected_direction() {
        let v = [3.0, 4.0, 5.0, 1.0];
        let p1 = [1.0, 1.0, 0.0, 0.0];
        let p2 = [1.0, 0.0, 1.0, 0.0];
        let out = project_out_span(&v, &[&p1, &p2]);
        assert!(cosine(&out, &p1).unwrap().abs() < 1e-6);
        assert!(cosine(&out, &p2).unwrap().abs() < 1e-6);
        // What is orthogonal to both protected directions is untouched.
        let free = [1.0, -1.0, -1.0, 0.0];
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        assert!((dot(&out, &free) - dot(&v, &free)).abs() < 1e-5);
        assert!((out[3] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn principal_directions_span_the_offsets_largest_first() {
        // Rows a = mean_b + 3 e0 * s_i + 1 e1 * t_i with s, t of equal spread: e0 first, then
        // e1, and no third direction (rank 2).
        let d = 4;
        let mut x = Vec::new();
        for (s, t) in [(1.0, 1.0), (-1.0, 1.0), (1.0, -1.0), (-1.0, -1.0)] {
            x.extend([10.0 + 3.0 * s, 5.0 + t, 0.0, 2.0]);
        }
        x.extend([10.0, 5.0, 0.0, 2.0]);
        x.extend([10.0, 5.0, 0.0, 2.0]);
        let found = principal_directions(&x, d, &[0, 1, 2, 3], &[4, 5], 3).unwrap();
        assert_eq!(found.len(), 2);
        assert!((found[0][0].abs() - 1.0).abs() < 1e-6, "{:?}", found[0]);
        assert!((found[1][1].abs() - 1.0).abs() < 1e-6, "{:?}", found[1]);
        let out = project_out_span(&[1.0, 1.0, 1.0, 1.0], &[&found[0], &found[1]]);
        assert!(out[0].abs() < 1e-6 && out[1].abs() < 1e-6 && (out[2] - 1.0).abs() < 1e-6);
        assert!(principal_directions(&x, d, &[], &[4], 1).is_err());
    }

    #[test]
    fn dependent_or_zero_directions_change_nothing_more() {
        let v = [1.0, 2.0, 3.0];
        let p = [0.0, 1.0, 0.0];
        let once = project_out_span(&v, &[&p]);
        let again = project_out_span(&v, &[&p, &[0.0, 2.0, 0.0], &[0.0; 3]]);
        assert_eq!(once, again);
        assert_eq!(once, vec![1.0, 0.0, 3.0]);
        assert!((norm(&project_out_span(&v, &[])) - norm(&v)).abs() < 1e-9);
    }
}
