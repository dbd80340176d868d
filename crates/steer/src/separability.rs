//! How well a direction separates refusals from compliances: the numbers that rank layers
//! (METHOD.md section 4, "Layer choice").

use thiserror::Error;

use crate::fit::{fit_rows, Class, FitError, Method, Ridge, Samples};
use crate::linalg::{dot, norm};
use crate::rng::SplitMix64;

#[derive(Debug, Error)]
pub enum SeparabilityError {
    #[error("the vector has length {found} but the activations have dimension {d}; use a vector fitted on the same layer")]
    DimensionMismatch { found: usize, d: usize },
    #[error("the vector has norm 0 (or is not finite), so it defines no direction to project on")]
    DegenerateVector,
    #[error("{found} {what} given for {rows} rows; pass exactly one per row")]
    LengthMismatch {
        what: &'static str,
        found: usize,
        rows: usize,
    },
    #[error("{what} {index} is {value}; all values must be finite")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f64,
    },
    #[error("AUC needs at least 1 {class} row, found {found}")]
    MissingClass { class: Class, found: usize },
    #[error("Pearson r needs at least 2 rows, found {found}")]
    TooFewRows { found: usize },
    #[error("Pearson r is undefined because the {what} are constant")]
    Constant { what: &'static str },
    #[error("k-fold needs k >= 2, got {k}")]
    BadK { k: usize },
    #[error("{k}-fold needs at least {k} {class} rows (one per fold), found {found}; lower k or add {class} rows")]
    TooFewForFolds {
        k: usize,
        class: Class,
        found: usize,
    },
    #[error("fold {fold}: {source}")]
    Fit { fold: usize, source: FitError },
}

/// `x · v̂` for every row of `samples`.
pub fn projections(samples: &Samples<'_>, v: &[f32]) -> Result<Vec<f64>, SeparabilityError> {
    if v.len() != samples.dim() {
        return Err(SeparabilityError::DimensionMismatch {
            found: v.len(),
            d: samples.dim(),
        });
    }
    let norm = norm(v);
    if !(norm.is_finite() && norm > 0.0) {
        return Err(SeparabilityError::DegenerateVector);
    }
    Ok((0..samples.n_rows())
        .map(|i| dot(samples.row(i), v) / norm)
        .collect())
}

/// Area under the ROC curve of `projections` for Refusal (positive) against Compliance rows:
/// the probability that a random refusal row projects higher than a random compliance row,
/// ties counting 1/2. Unused rows are ignored.
pub fn auc(projections: &[f64], classes: &[Class]) -> Result<f64, SeparabilityError> {
    if classes.len() != projections.len() {
        return Err(SeparabilityError::LengthMismatch {
            what: "classes",
            found: classes.len(),
            rows: projections.len(),
        });
    }
    check_finite("projection", projections)?;
    let of = |class| -> Vec<f64> {
        projections
            .iter()
            .zip(classes)
            .filter(|(_, &c)| c == class)
            .map(|(&p, _)| p)
            .collect()
    };
    let (refusal, compliance) = (of(Class::Refusal), of(Class::Compliance));
    for (class, found) in [
        (Class::Refusal, refusal.len()),
        (Class::Compliance, compliance.len()),
    ] {
        if found == 0 {
            return Err(SeparabilityError::MissingClass { class, found });
        }
    }
    Ok(auc_of(&refusal, &compliance))
}

/// Mann-Whitney U from mid-ranks, `O(n log n)`. Both sides non-empty and finite.
fn auc_of(positive: &[f64], negative: &[f64]) -> f64 {
    let mut all: Vec<(f64, bool)> = positive
        .iter()
        .map(|&p| (p, true))
        .chain(negative.iter().map(|&p| (p, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut positive_rank_sum = 0.0;
    let mut start = 0;
    while start < all.len() {
        let end = start
            + all[start..]
                .iter()
                .take_while(|(p, _)| *p == all[start].0)
                .count();
        // Ranks start..end (1-based start+1..=end) share their mean: this is what makes a tie
        // count 1/2.
        let mid_rank = (start + 1 + end) as f64 / 2.0;
        positive_rank_sum +=
            mid_rank * all[start..end].iter().filter(|(_, is_pos)| *is_pos).count() as f64;
        start = end;
    }
    let (n_pos, n_neg) = (positive.len() as f64, negative.len() as f64);
    (positive_rank_sum - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg)
}

/// Pearson correlation of `projections` with a per-row score (e.g. the judge score `c`).
pub fn pearson(projections: &[f64], scores: &[f64]) -> Result<f64, SeparabilityError> {
    if scores.len() != projections.len() {
        return Err(SeparabilityError::LengthMismatch {
            what: "scores",
            found: scores.len(),
            rows: projections.len(),
        });
    }
    if projections.len() < 2 {
        return Err(SeparabilityError::TooFewRows {
            found: projections.len(),
        });
    }
    check_finite("projection", projections)?;
    check_finite("score", scores)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(projections), mean(scores));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (&x, &y) in projections.iter().zip(scores) {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    for (what, spread) in [("projections", sxx), ("scores", syy)] {
        if spread == 0.0 {
            return Err(SeparabilityError::Constant { what });
        }
    }
    Ok(sxy / (sxx * syy).sqrt())
}

fn check_finite(what: &'static str, values: &[f64]) -> Result<(), SeparabilityError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(SeparabilityError::NonFinite {
            what,
            index,
            value: values[index],
        }),
        None => Ok(()),
    }
}

/// The points from `first` on whose held-out AUC is within `margin` of the best among them, in
/// point order: the one rule for which points to steer or report as best.
pub fn best_points(heldout_auc: &[Option<f64>], first: usize, margin: f64) -> Vec<usize> {
    let candidates = || (first..heldout_auc.len()).filter_map(|p| Some((p, heldout_auc[p]?)));
    let best = candidates().map(|(_, auc)| auc).fold(f64::MIN, f64::max);
    candidates()
        .filter(|&(_, auc)| auc >= best - margin)
        .map(|(p, _)| p)
        .collect()
}

/// Held-out separability over `k` folds (means over folds).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOut {
    /// AUC of the projection on the vector.
    pub auc: f64,
    /// Balanced accuracy of the midpoint rule: a row is called refusal when its projection
    /// exceeds the midpoint of the two training classes' mean projections.
    pub midpoint_accuracy: f64,
}

/// Mean held-out AUC over `k` folds: fit on `k - 1` folds, score the held-out one. Folds are
/// stratified by class and assigned by a shuffle seeded with `seed`, so the same inputs always
/// give the same number. Unused rows take no part.
pub fn k_fold_auc(
    samples: &Samples<'_>,
    method: Method,
    ridge: Ridge,
    k: usize,
    seed: u64,
) -> Result<f64, SeparabilityError> {
    k_fold_heldout(samples, method, ridge, k, seed).map(|h| h.auc)
}

/// [`k_fold_auc`] and, on the same folds, the held-out accuracy of the midpoint rule.
pub fn k_fold_heldout(
    samples: &Samples<'_>,
    method: Method,
    ridge: Ridge,
    k: usize,
    seed: u64,
) -> Result<HeldOut, SeparabilityError> {
    if k < 2 {
        return Err(SeparabilityError::BadK { k });
    }
    let mut rng = SplitMix64::new(seed);
    let mut fold_of = vec![usize::MAX; samples.n_rows()];
    for class in [Class::Refusal, Class::Compliance] {
        let mut rows = samples.rows_of(class);
        if rows.len() < k {
            return Err(SeparabilityError::TooFewForFolds {
                k,
                class,
                found: rows.len(),
            });
        }
        rng.shuffle(&mut rows);
        for (position, row) in rows.into_iter().enumerate() {
            fold_of[row] = position % k;
        }
    }
    let classes = samples.classes();
    let rows_where = |class: Class, keep: &dyn Fn(usize) -> bool| -> Vec<usize> {
        (0..samples.n_rows())
            .filter(|&i| classes[i] == class && keep(fold_of[i]))
            .collect()
    };
    let (mut auc_total, mut accuracy_total) = (0.0, 0.0);
    for fold in 0..k {
        let train = |f: usize| f != fold;
        let fitted = fit_rows(
            samples,
            &rows_where(Class::Refusal, &train),
            &rows_where(Class::Compliance, &train),
            method,
            ridge,
        )
        .map_err(|source| SeparabilityError::Fit { fold, source })?;
        let projected = |class, keep: &dyn Fn(usize) -> bool| -> Vec<f64> {
            rows_where(class, keep)
                .into_iter()
                .map(|i| dot(samples.row(i), &fitted.vector))
                .collect()
        };
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let midpoint = (mean(&projected(Class::Refusal, &train))
            + mean(&projected(Class::Compliance, &train)))
            / 2.0;
        let (refused, answered) = (
            projected(Class::Refusal, &|f| f == fold),
            projected(Class::Compliance, &|f| f == fold),
        );
        auc_total += auc_of(&refused, &answered);
        let share = |v: &[f64], above: bool| {
            v.iter().filter(|&&x| (x > midpoint) == above).count() as f64 / v.len() as f64
        };
        accuracy_total += (share(&refused, true) + share(&answered, false)) / 2.0;
    }
    Ok(HeldOut {
        auc: auc_total / k as f64,
        midpoint_accuracy: accuracy_total / k as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{anisotropic_classes, isotropic_classes, noise_classes};

    const R: Class = Class::Refusal;
    const C: Class = Class::Compliance;

    #[test]
    fn best_points_start_where_asked_skip_missing_and_keep_the_margin() {
        let auc = [Some(1.0), Some(0.8), None, Some(0.9), Some(0.88), Some(0.7)];
        assert_eq!(best_points(&auc, 1, 0.02), vec![3, 4]);
        assert_eq!(best_points(&auc, 0, 0.02), vec![0]);
        assert_eq!(best_points(&auc, 4, 0.2), vec![4, 5]);
        assert!(best_points(&[None, None], 0, 0.1).is_empty());
    }

    #[test]
    fn auc_hand_cases() {
        assert_eq!(auc(&[3.0, 4.0, 1.0, 2.0], &[R, R, C, C]).unwrap(), 1.0);
        assert_eq!(auc(&[1.0, 2.0, 3.0, 4.0], &[R, R, C, C]).unwrap(), 0.0);
        assert_eq!(auc(&[5.0, 5.0, 5.0, 5.0], &[R, R, C, C]).unwrap(), 0.5);
        // One refusal above both compliances, one tied with one of them: (1 + 1 + 1 + 0.5) / 4.
        assert_eq!(auc(&[3.0, 2.0, 2.0, 1.0], &[R, R, C, C]).unwrap(), 0.875);
        // Unused rows do not count.
        assert_eq!(
            auc(&[3.0, 100.0, 1.0], &[R, Class::Unused, C]).unwrap(),
            1.0
        );
    }

    #[test]
    fn auc_errors() {
        assert!(matches!(
            auc(&[1.0, 2.0], &[R, R]),
            Err(SeparabilityError::MissingClass {
                class: Class::Compliance,
                found: 0
            })
        ));
        assert!(matches!(
            auc(&[1.0], &[R, C]),
            Err(SeparabilityError::LengthMismatch { .. })
        ));
        assert!(matches!(
            auc(&[f64::NAN, 1.0], &[R, C]),
            Err(SeparabilityError::NonFinite { index: 0, .. })
        ));
    }

    #[test]
    fn pearson_hand_cases() {
        let x = [1.0, 2.0, 3.0, 4.0];
        assert!((pearson(&x, &[2.0, 4.0, 6.0, 8.0]).unwrap() - 1.0).abs() < 1e-12);
        assert!((pearson(&x, &[1.0, 0.0, -1.0, -2.0]).unwrap() + 1.0).abs() < 1e-12);
        assert!(pearson(&x, &[1.0, -1.0, -1.0, 1.0]).unwrap().abs() < 1e-12);
        assert!(matches!(
            pearson(&x, &[1.0; 4]),
            Err(SeparabilityError::Constant { what: "scores" })
        ));
        assert!(matches!(
            pearson(&[1.0], &[1.0]),
            Err(SeparabilityError::TooFewRows { found: 1 })
        ));
    }

    #[test]
    fn projections_are_onto_the_unit_vector() {
        let x = [3.0, 4.0, 0.0, 1.0];
        let (classes, weights) = ([R, C], [1.0, 1.0]);
        let samples = Samples::new(&x, 2, &classes, &weights).unwrap();
        assert_eq!(projections(&samples, &[0.0, 2.0]).unwrap(), vec![4.0, 1.0]);
        assert!(matches!(
            projections(&samples, &[0.0, 0.0]),
            Err(SeparabilityError::DegenerateVector)
        ));
        assert!(matches!(
            projections(&samples, &[1.0]),
            Err(SeparabilityError::DimensionMismatch { .. })
        ));
    }

    #[test]
    fn k_fold_auc_is_high_on_separable_data() {
        let data = isotropic_classes(32, 100, 21);
        let samples = Samples::new(&data.x, data.d, &data.classes, &data.weights).unwrap();
        for method in Method::ALL {
            let auc = k_fold_auc(&samples, method, Ridge::Relative(0.1), 5, 7).unwrap();
            assert!(auc > 0.95, "{method}: held-out AUC {auc}");
        }
    }

    #[test]
    fn k_fold_auc_prefers_ridge_methods_under_anisotropic_noise() {
        // Strong noise off the signal axis drowns the MD projection; whitening recovers it.
        let data = anisotropic_classes(32, 100, 0, 21);
        let samples = Samples::new(&data.x, data.d, &data.classes, &data.weights).unwrap();
        let auc = |method| k_fold_auc(&samples, method, Ridge::Relative(0.1), 5, 7).unwrap();
        let (md, rmd) = (auc(Method::Md), auc(Method::Rmd));
        assert!(rmd > 0.95 && rmd > md + 0.2, "RMD {rmd} vs MD {md}");
    }

    #[test]
    fn k_fold_auc_is_near_chance_on_noise() {
        let data = noise_classes(16, 200, 22);
        let samples = Samples::new(&data.x, data.d, &data.classes, &data.weights).unwrap();
        for method in [Method::Md, Method::Rmd] {
            let auc = k_fold_auc(&samples, method, Ridge::Relative(0.1), 5, 7).unwrap();
            assert!((auc - 0.5).abs() < 0.07, "{method}: held-out AUC {auc}");
        }
    }

    #[test]
    fn the_midpoint_rule_is_right_on_separable_data_and_at_chance_on_noise() {
        let data = isotropic_classes(32, 100, 21);
        let samples = Samples::new(&data.x, data.d, &data.classes, &data.weights).unwrap();
        let h = k_fold_heldout(&samples, Method::Md, Ridge::Relative(0.1), 5, 7).unwrap();
        assert!(h.midpoint_accuracy > 0.95, "{h:?}");
        assert_eq!(
            h.auc,
            k_fold_auc(&samples, Method::Md, Ridge::Relative(0.1), 5, 7).unwrap()
        );
        let data = noise_classes(16, 200, 22);
        let samples = Samples::new(&data.x, data.d, &data.classes, &data.weights).unwrap();
        let h = k_fold_heldout(&samples, Method::Md, Ridge::Relative(0.1), 5, 7).unwrap();
        assert!((h.midpoint_accuracy - 0.5).abs() < 0.07, "{h:?}");
    }

    #[test]
    fn k_fold_auc_is_deterministic_and_checks_its_inputs() {
        let data = anisotropic_classes(8, 20, 0, 23);
        let samples = Samples::new(&data.x, data.d, &data.classes, &data.weights).unwrap();
        let run = |seed| k_fold_auc(&samples, Method::Rmd, Ridge::Relative(0.1), 4, seed).unwrap();
        assert_eq!(run(1), run(1));
        assert!(matches!(
            k_fold_auc(&samples, Method::Md, Ridge::Relative(0.1), 1, 0),
            Err(SeparabilityError::BadK { k: 1 })
        ));
        assert!(matches!(
            k_fold_auc(&samples, Method::Md, Ridge::Relative(0.1), 21, 0),
            Err(SeparabilityError::TooFewForFolds {
                k: 21,
                found: 20,
                ..
            })
        ));
        assert!(matches!(
            k_fold_auc(&samples, Method::Rmd, Ridge::Absolute(0.0), 4, 0),
            Err(SeparabilityError::Fit {
                fold: 0,
                source: FitError::NonPositiveRidge { .. }
            })
        ));
    }
}
