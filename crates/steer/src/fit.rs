//! One layer's refusal direction from labelled activations (METHOD.md section 3).
//!
//! All methods point from compliance to refusal: adding `+alpha * v` pushes toward refusing.
//! Linear algebra runs in f64; the result is returned as f32 like the activations.
//! With strata ([`Samples::with_strata`]), every class mean and the ridge's covariance weigh
//! the rows so that each stratum has the same share of both classes (PCA's row pairing does not
//! see them).

mod samples;

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use faer::Mat;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::linalg;

pub use samples::Samples;

/// What the judge made of a row's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Refusal,
    Compliance,
    /// Neither (an uncertain judge score): ignored by every fit.
    Unused,
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Class::Refusal => "refusal",
            Class::Compliance => "compliance",
            Class::Unused => "unused",
        })
    }
}

/// How the direction is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Difference of means: `mean_R(x) - mean_C(x)`.
    Md,
    /// Ridge mean difference: `(Σ_C + λI)⁻¹ (μ_R - μ_C)`.
    Rmd,
    /// Weighted RMD: means and the covariance of C weighted by each row's confidence `u`.
    Wrmd,
    /// First principal direction of refusal-minus-compliance differences (repeng /
    /// llama.cpp cvector-generator style), unit length. With equal class counts the i-th
    /// refusal row is paired with the i-th compliance row, so pass contrastive pairs in order.
    Pca,
}

impl Method {
    pub const ALL: [Method; 4] = [Method::Md, Method::Rmd, Method::Wrmd, Method::Pca];

    fn name(self) -> &'static str {
        match self {
            Method::Md => "md",
            Method::Rmd => "rmd",
            Method::Wrmd => "wrmd",
            Method::Pca => "pca",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = FitError;

    /// Parses `md`, `rmd`, `wrmd` or `pca` (any case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Method::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| FitError::UnknownMethod(s.to_string()))
    }
}

/// The ridge `λ` of RMD and WRMD. MD and PCA ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ridge {
    /// `λ = κ · trace(Σ_C) / d`: the same κ means the same amount of shrinkage at every
    /// layer, whatever the layer's activation scale.
    Relative(f64),
    /// `λ` in the layer's own units.
    Absolute(f64),
}

/// A fitted direction (length `d`) and how it was obtained.
#[derive(Debug, Clone, PartialEq)]
pub struct FittedVector {
    pub vector: Vec<f32>,
    pub report: FitReport,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FitReport {
    pub method: Method,
    pub n_refusal: usize,
    pub n_compliance: usize,
    /// The absolute `λ` actually used (RMD and WRMD only).
    pub lambda: Option<f64>,
    /// Euclidean norm of the vector.
    pub norm: f64,
}

#[derive(Debug, Error)]
pub enum FitError {
    #[error("activations have dimension 0; each row needs at least one value")]
    ZeroDimension,
    #[error("activations hold {len} values, which is not a whole number of rows of width {d}; pass row-major (n, d) data with the right d")]
    RaggedActivations { len: usize, d: usize },
    #[error("{found} {what} given for {rows} activation rows; pass exactly one per row")]
    LengthMismatch {
        what: &'static str,
        found: usize,
        rows: usize,
    },
    #[error("activation at row {row}, column {column} is {value}; drop or recompute rows with NaN/Inf before fitting")]
    NonFiniteActivation {
        row: usize,
        column: usize,
        value: f32,
    },
    #[error("weight of row {row} is {value}; weights must be finite and >= 0 (use |c| of the judge score)")]
    BadWeight { row: usize, value: f64 },
    #[error("need at least 1 {class} row to fit a direction, found {found}; label more rows {class} or use other prompts")]
    TooFewRows { class: Class, found: usize },
    #[error("all {class} rows have weight 0, so their weighted mean is undefined; give at least one {class} row a weight > 0")]
    ZeroWeight { class: Class },
    #[error("ridge {ridge:?} is not allowed: RMD and WRMD need a finite value > 0")]
    NonPositiveRidge { ridge: Ridge },
    #[error("the compliance rows have no spread (trace of their covariance is 0), so a relative ridge gives lambda = 0; use Ridge::Absolute or more varied compliance rows")]
    NoSpread,
    #[error("the ridge system is not numerically positive definite at lambda = {lambda:e}; raise kappa (or the absolute lambda)")]
    Factorization { lambda: f64 },
    #[error("the SVD for PCA did not converge; check the activations for extreme values")]
    Eigen,
    #[error("unknown method {0:?}; expected one of md, rmd, wrmd, pca")]
    UnknownMethod(String),
}

/// Fits `method` on all Refusal and Compliance rows of `samples`.
pub fn fit(samples: &Samples<'_>, method: Method, ridge: Ridge) -> Result<FittedVector, FitError> {
    let refusal = samples.rows_of(Class::Refusal);
    let compliance = samples.rows_of(Class::Compliance);
    fit_rows(samples, &refusal, &compliance, method, ridge)
}

/// Fits on the given subsets of rows (what cross-validation needs, without copying activations).
pub(crate) fn fit_rows(
    samples: &Samples<'_>,
    refusal: &[usize],
    compliance: &[usize],
    method: Method,
    ridge: Ridge,
) -> Result<FittedVector, FitError> {
    for (class, rows) in [(Class::Refusal, refusal), (Class::Compliance, compliance)] {
        if rows.is_empty() {
            return Err(FitError::TooFewRows { class, found: 0 });
        }
    }
    let groups = Groups::new(samples, refusal, compliance);
    let (vector, lambda) = match method {
        Method::Md => (groups.mean_difference(Weighting::Uniform)?, None),
        Method::Rmd => {
            let (v, lambda) = groups.ridge_mean_difference(Weighting::Uniform, ridge)?;
            (v, Some(lambda))
        }
        Method::Wrmd => {
            let (v, lambda) = groups.ridge_mean_difference(Weighting::Confidence, ridge)?;
            (v, Some(lambda))
        }
        Method::Pca => (groups.principal_difference()?, None),
    };
    let report = FitReport {
        method,
        n_refusal: refusal.len(),
        n_compliance: compliance.len(),
        lambda,
        norm: vector.iter().map(|x| x * x).sum::<f64>().sqrt(),
    };
    Ok(FittedVector {
        vector: vector.iter().map(|&x| x as f32).collect(),
        report,
    })
}

#[derive(Clone, Copy)]
enum Weighting {
    Uniform = 0,
    /// Each row counts with its confidence `u` (WRMD).
    Confidence = 1,
}

/// The refusal and compliance rows of one fit.
struct Groups<'s, 'a> {
    samples: &'s Samples<'a>,
    refusal: &'s [usize],
    compliance: &'s [usize],
    /// Per row, the strata's balance factor, by [`Weighting`] (uniform, confidence).
    balance: [Vec<f64>; 2],
}

impl<'s, 'a> Groups<'s, 'a> {
    fn new(samples: &'s Samples<'a>, refusal: &'s [usize], compliance: &'s [usize]) -> Self {
        let balance = [Weighting::Uniform, Weighting::Confidence].map(|weighting| {
            balance_factors(samples, refusal, compliance, |row| {
                base_weight(samples, row, weighting)
            })
        });
        Self {
            samples,
            refusal,
            compliance,
            balance,
        }
    }

    fn weight(&self, row: usize, weighting: Weighting) -> f64 {
        base_weight(self.samples, row, weighting) * self.balance[weighting as usize][row]
    }

    /// Weighted mean of `rows` and their total weight.
    fn mean(
        &self,
        class: Class,
        rows: &[usize],
        weighting: Weighting,
    ) -> Result<(Vec<f64>, f64), FitError> {
        let mut sum = vec![0.0; self.samples.dim()];
        let mut total = 0.0;
        for &row in rows {
            let w = self.weight(row, weighting);
            total += w;
            for (s, &x) in sum.iter_mut().zip(self.samples.row(row)) {
                *s += w * f64::from(x);
            }
        }
        if total == 0.0 {
            return Err(FitError::ZeroWeight { class });
        }
        sum.iter_mut().for_each(|s| *s /= total);
        Ok((sum, total))
    }

    fn mean_difference(&self, weighting: Weighting) -> Result<Vec<f64>, FitError> {
        let (mu_r, _) = self.mean(Class::Refusal, self.refusal, weighting)?;
        let (mu_c, _) = self.mean(Class::Compliance, self.compliance, weighting)?;
        Ok(difference(&mu_r, &mu_c))
    }

    /// `(Σ_C + λI)⁻¹ (μ_R - μ_C)` and the `λ` used.
    fn ridge_mean_difference(
        &self,
        weighting: Weighting,
        ridge: Ridge,
    ) -> Result<(Vec<f64>, f64), FitError> {
        let (Ridge::Relative(k) | Ridge::Absolute(k)) = ridge;
        if !(k.is_finite() && k > 0.0) {
            return Err(FitError::NonPositiveRidge { ridge });
        }
        let (mu_r, _) = self.mean(Class::Refusal, self.refusal, weighting)?;
        let (mu_c, total) = self.mean(Class::Compliance, self.compliance, weighting)?;
        let z_t = self.scaled_deviations_transposed(&mu_c, total, weighting);
        let lambda = match ridge {
            Ridge::Absolute(lambda) => lambda,
            // trace(Σ_C) = trace(Zᵀ Z) = ‖Z‖²_F.
            Ridge::Relative(kappa) => kappa * z_t.squared_norm_l2() / self.samples.dim() as f64,
        };
        if !(lambda.is_finite() && lambda > 0.0) {
            return Err(FitError::NoSpread);
        }
        let v = linalg::ridge_solve(z_t.transpose(), lambda, &difference(&mu_r, &mu_c))?;
        Ok((v, lambda))
    }

    /// `Zᵀ` (`d × n`), where `Z` has rows `sqrt(u_i / Σu) (x_i - μ_C)` over the compliance rows
    /// of nonzero weight, so that `Zᵀ Z` is the (weighted, population) covariance `Σ_C`.
    /// Transposed because faer is column-major: each activation row becomes one contiguous
    /// column, read and written in order.
    fn scaled_deviations_transposed(
        &self,
        mu_c: &[f64],
        total: f64,
        weighting: Weighting,
    ) -> Mat<f64> {
        let rows: Vec<usize> = self
            .compliance
            .iter()
            .copied()
            .filter(|&r| self.weight(r, weighting) > 0.0)
            .collect();
        Mat::from_fn(self.samples.dim(), rows.len(), |j, i| {
            let row = rows[i];
            let scale = (self.weight(row, weighting) / total).sqrt();
            scale * (f64::from(self.samples.row(row)[j]) - mu_c[j])
        })
    }

    /// Top right-singular vector of the refusal-minus-compliance differences, pointing the way
    /// of the mean difference. Rows pair up by order when the classes have equal counts
    /// (contrastive pairs); otherwise each refusal row is taken against the compliance mean and
    /// the refusal mean against each compliance row.
    fn principal_difference(&self) -> Result<Vec<f64>, FitError> {
        let (mu_r, _) = self.mean(Class::Refusal, self.refusal, Weighting::Uniform)?;
        let (mu_c, _) = self.mean(Class::Compliance, self.compliance, Weighting::Uniform)?;
        let x = |row: usize, j: usize| f64::from(self.samples.row(row)[j]);
        let d = self.samples.dim();
        // Built transposed (d × m) for contiguous access, like the ridge's Zᵀ.
        let diffs_t = if self.refusal.len() == self.compliance.len() {
            let pairs: Vec<(usize, usize)> = self
                .refusal
                .iter()
                .copied()
                .zip(self.compliance.iter().copied())
                .collect();
            Mat::from_fn(d, pairs.len(), |j, i| x(pairs[i].0, j) - x(pairs[i].1, j))
        } else {
            let n_r = self.refusal.len();
            Mat::from_fn(d, n_r + self.compliance.len(), |j, i| {
                match i.checked_sub(n_r) {
                    None => x(self.refusal[i], j) - mu_c[j],
                    Some(c) => mu_r[j] - x(self.compliance[c], j),
                }
            })
        };
        let axes = linalg::principal_axes(diffs_t.transpose(), linalg::RankScale::Largest)
            .map_err(|_| FitError::Eigen)?;
        let mut v = axes.axes.into_iter().next().unwrap_or_else(|| vec![0.0; d]);
        let md = difference(&mu_r, &mu_c);
        if v.iter().zip(&md).map(|(a, b)| a * b).sum::<f64>() < 0.0 {
            v.iter_mut().for_each(|x| *x = -*x);
        }
        Ok(v)
    }
}

fn base_weight(samples: &Samples<'_>, row: usize, weighting: Weighting) -> f64 {
    match weighting {
        Weighting::Uniform => 1.0,
        Weighting::Confidence => samples.weights()[row],
    }
}

/// Per row, the factor that gives each stratum the same share of the refusal weight and of the
/// compliance weight: the mean of its two shares. A stratum that only one class has cannot be
/// balanced, so its rows get 0; without strata, or with no stratum in both classes, every
/// factor is 1 (with one stratum, exactly 1: the fit is the unbalanced one, bit for bit).
fn balance_factors(
    samples: &Samples<'_>,
    refusal: &[usize],
    compliance: &[usize],
    weight: impl Fn(usize) -> f64,
) -> Vec<f64> {
    let mut factors = vec![1.0; samples.n_rows()];
    let Some(strata) = samples.strata() else {
        return factors;
    };
    let totals = |rows: &[usize]| {
        let mut by_stratum = BTreeMap::<usize, f64>::new();
        for &row in rows {
            *by_stratum.entry(strata[row]).or_default() += weight(row);
        }
        by_stratum
    };
    let (w_r, w_c) = (totals(refusal), totals(compliance));
    let shared: Vec<usize> = w_r
        .iter()
        .filter(|&(s, &w)| w > 0.0 && w_c.get(s).is_some_and(|&w| w > 0.0))
        .map(|(&s, _)| s)
        .collect();
    if shared.is_empty() {
        return factors;
    }
    let total = |w: &BTreeMap<usize, f64>| shared.iter().map(|s| w[s]).sum::<f64>();
    let (t_r, t_c) = (total(&w_r), total(&w_c));
    for (rows, w, t) in [(refusal, &w_r, t_r), (compliance, &w_c, t_c)] {
        for &row in rows {
            let s = strata[row];
            factors[row] = if shared.contains(&s) {
                let target = (w_r[&s] / t_r + w_c[&s] / t_c) / 2.0;
                target / (w[&s] / t)
            } else {
                0.0
            };
        }
    }
    factors
}

fn difference(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x - y).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{angle_degrees, anisotropic_classes, isotropic_classes, Dataset};

    fn fit_dataset(data: &Dataset, method: Method, ridge: Ridge) -> FittedVector {
        let samples = Samples::new(&data.x, data.d, &data.classes, &data.weights).unwrap();
        fit(&samples, method, ridge).unwrap()
    }

    #[test]
    fn ridge_methods_recover_the_direction_better_than_md_under_anisotropic_noise() {
        let data = anisotropic_classes(64, 200, 0, 11);
        let md = angle_degrees(
            &fit_dataset(&data, Method::Md, Ridge::Relative(0.1)).vector,
            &data.direction,
        );
        let rmd = angle_degrees(
            &fit_dataset(&data, Method::Rmd, Ridge::Relative(0.1)).vector,
            &data.direction,
        );
        let wrmd = angle_degrees(
            &fit_dataset(&data, Method::Wrmd, Ridge::Relative(0.1)).vector,
            &data.direction,
        );
        assert!(
            md > 20.0,
            "MD should be pulled off by the noisy axes: {md:.1} deg"
        );
        assert!(rmd < md / 2.0, "RMD {rmd:.1} deg vs MD {md:.1} deg");
        assert!(wrmd < md / 2.0, "WRMD {wrmd:.1} deg vs MD {md:.1} deg");
    }

    #[test]
    fn wrmd_discounts_mislabelled_low_confidence_rows() {
        let data = anisotropic_classes(64, 200, 80, 12);
        let rmd = angle_degrees(
            &fit_dataset(&data, Method::Rmd, Ridge::Relative(0.1)).vector,
            &data.direction,
        );
        let wrmd = angle_degrees(
            &fit_dataset(&data, Method::Wrmd, Ridge::Relative(0.1)).vector,
            &data.direction,
        );
        assert!(
            wrmd + 10.0 < rmd,
            "WRMD {wrmd:.1} deg should beat RMD {rmd:.1} deg clearly"
        );
    }

    #[test]
    fn huge_relative_ridge_makes_rmd_parallel_to_md() {
        let data = anisotropic_classes(32, 50, 0, 13);
        let md = fit_dataset(&data, Method::Md, Ridge::Relative(1.0)).vector;
        let rmd = fit_dataset(&data, Method::Rmd, Ridge::Relative(1e8));
        let md_f64: Vec<f64> = md.iter().map(|&x| f64::from(x)).collect();
        assert!(angle_degrees(&rmd.vector, &md_f64).to_radians().cos() > 0.9999);
        // λ = κ · trace/d is reported and large; the vector shrinks as 1/λ.
        let lambda = rmd.report.lambda.unwrap();
        assert!(lambda > 1e7, "lambda {lambda}");
        assert!(rmd.report.norm < 1e-6);
    }

    #[test]
    fn absolute_ridge_is_used_as_given_and_both_solve_routes_give_the_same_fit() {
        // n_C = 30 < d = 40 takes the Woodbury route, n_C = 200 > d the direct one; doubling the
        // data by repeating rows keeps Σ_C and the means, so the answers must agree.
        let data = anisotropic_classes(40, 30, 0, 14);
        let mut doubled = data.clone();
        for _ in 0..6 {
            doubled.x.extend_from_slice(&data.x);
            doubled.classes.extend_from_slice(&data.classes);
            doubled.weights.extend_from_slice(&data.weights);
        }
        let few = fit_dataset(&data, Method::Wrmd, Ridge::Absolute(0.3));
        let many = fit_dataset(&doubled, Method::Wrmd, Ridge::Absolute(0.3));
        assert_eq!(few.report.lambda, Some(0.3));
        assert_eq!(many.report.n_compliance, 7 * 30);
        let diff: f64 = few
            .vector
            .iter()
            .zip(&many.vector)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum();
        assert!(diff.sqrt() / few.report.norm < 1e-5);
    }

    #[test]
    fn md_is_the_plain_difference_of_means() {
        let x = [1.0, 0.0, 3.0, 2.0, 0.0, 1.0, 5.0, 5.0];
        let classes = [
            Class::Refusal,
            Class::Refusal,
            Class::Compliance,
            Class::Unused,
        ];
        let weights = [1.0; 4];
        let samples = Samples::new(&x, 2, &classes, &weights).unwrap();
        let fitted = fit(&samples, Method::Md, Ridge::Relative(1.0)).unwrap();
        assert_eq!(fitted.vector, vec![2.0, 0.0]);
        assert_eq!(
            (fitted.report.n_refusal, fitted.report.n_compliance),
            (2, 1)
        );
        assert_eq!(fitted.report.lambda, None);
        assert_eq!(fitted.report.norm, 2.0);
    }

    #[test]
    fn pca_finds_the_difference_direction_pointing_to_refusal() {
        let data = isotropic_classes(16, 100, 15);
        // Rows are 100 refusals then 100 compliances: all of them pair up; dropping 20
        // compliances exercises the unpaired route.
        let mut unpaired = data.classes.clone();
        unpaired[180..].fill(Class::Unused);
        for classes in [&data.classes, &unpaired] {
            let samples = Samples::new(&data.x, data.d, classes, &data.weights).unwrap();
            let fitted = fit(&samples, Method::Pca, Ridge::Relative(1.0)).unwrap();
            assert!((fitted.report.norm - 1.0).abs() < 1e-9);
            // Under 90 degrees means it points from compliance to refusal.
            let angle = angle_degrees(&fitted.vector, &data.direction);
            assert!(angle < 15.0, "PCA is {angle:.1} deg off the true direction");
        }
    }

    #[test]
    fn errors_name_the_problem() {
        let x = [0.0f32; 6];
        let weights = [1.0; 3];
        let only_refusal = [Class::Refusal, Class::Refusal, Class::Unused];
        let samples = Samples::new(&x, 2, &only_refusal, &weights).unwrap();
        let err = fit(&samples, Method::Md, Ridge::Relative(1.0)).unwrap_err();
        assert!(matches!(
            err,
            FitError::TooFewRows {
                class: Class::Compliance,
                found: 0
            }
        ));
        assert!(err.to_string().contains("1 compliance row"), "{err}");

        let classes = [Class::Refusal, Class::Compliance, Class::Compliance];
        let samples = Samples::new(&x, 2, &classes, &weights).unwrap();
        for ridge in [
            Ridge::Absolute(0.0),
            Ridge::Relative(-1.0),
            Ridge::Absolute(f64::NAN),
        ] {
            assert!(matches!(
                fit(&samples, Method::Rmd, ridge),
                Err(FitError::NonPositiveRidge { .. })
            ));
        }
        // Identical compliance rows: no spread to scale a relative ridge by.
        assert!(matches!(
            fit(&samples, Method::Wrmd, Ridge::Relative(1.0)),
            Err(FitError::NoSpread)
        ));

        let zero_weights = [1.0, 0.0, 0.0];
        let samples = Samples::new(&x, 2, &classes, &zero_weights).unwrap();
        assert!(matches!(
            fit(&samples, Method::Wrmd, Ridge::Absolute(1.0)),
            Err(FitError::ZeroWeight {
                class: Class::Compliance
            })
        ));
        assert!(
            fit(&samples, Method::Rmd, Ridge::Absolute(1.0)).is_ok(),
            "RMD ignores weights"
        );
    }

    #[test]
    fn methods_parse_and_print() {
        for method in Method::ALL {
            assert_eq!(method.to_string().parse::<Method>().unwrap(), method);
        }
        assert_eq!("WRMD".parse::<Method>().unwrap(), Method::Wrmd);
        assert!("lda"
            .parse::<Method>()
            .unwrap_err()
            .to_string()
            .contains("md, rmd, wrmd, pca"));
    }

    /// Refusal along axis 0; a language offset along axis 1 that the classes are split along
    /// (most refusals stratum 0, most compliances stratum 1), as in a run whose refused topic
    /// prompts are English and whose answered ones Chinese.
    fn confounded(seed: u64) -> (Vec<f32>, Vec<Class>, Vec<f64>, Vec<usize>) {
        let d = 8;
        let mut rng = crate::rng::SplitMix64::new(seed);
        let (mut x, mut classes, mut weights, mut strata) = (vec![], vec![], vec![], vec![]);
        for (class, stratum, n) in [
            (Class::Refusal, 0, 18),
            (Class::Refusal, 1, 2),
            (Class::Compliance, 0, 5),
            (Class::Compliance, 1, 6),
        ] {
            for _ in 0..n {
                for j in 0..d {
                    let signal = match (j, class) {
                        (0, Class::Refusal) => 0.5,
                        (0, _) => -0.5,
                        (1, _) => 4.0 * stratum as f64,
                        _ => 0.0,
                    };
                    x.push((signal + 0.3 * (rng.next_f64() - 0.5)) as f32);
                }
                classes.push(class);
                weights.push(0.5 + 0.5 * rng.next_f64());
                strata.push(stratum);
            }
        }
        (x, classes, weights, strata)
    }

    #[test]
    fn balancing_strata_takes_a_confounded_offset_out_of_the_direction() {
        let (x, classes, weights, strata) = confounded(3);
        let truth = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let plain = Samples::new(&x, 8, &classes, &weights).unwrap();
        let balanced = plain.with_strata(&strata).unwrap();
        for method in [Method::Md, Method::Wrmd] {
            let angle = |samples: &Samples| {
                angle_degrees(
                    &fit(samples, method, Ridge::Relative(1.0)).unwrap().vector,
                    &truth,
                )
            };
            let (before, after) = (angle(&plain), angle(&balanced));
            // WRMD's ridge already discounts the offset (it is the compliance rows' largest
            // variance), MD not at all.
            let floor = if method == Method::Md { 45.0 } else { 8.0 };
            assert!(before > floor, "{method}: {before:.1} degrees unbalanced");
            assert!(
                after < before / 3.0,
                "{method}: {after:.1} degrees balanced"
            );
        }
        // One stratum: the unbalanced fit, bit for bit.
        let one = vec![7; strata.len()];
        let single = plain.with_strata(&one).unwrap();
        for method in Method::ALL {
            let fitted = |s: &Samples| fit(s, method, Ridge::Relative(1.0)).unwrap().vector;
            assert_eq!(fitted(&plain), fitted(&single), "{method}");
        }
        assert!(matches!(
            plain.with_strata(&strata[1..]),
            Err(FitError::LengthMismatch { what: "strata", .. })
        ));
    }
}
