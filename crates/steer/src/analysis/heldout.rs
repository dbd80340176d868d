//! Held-out numbers of one point: refits on the training folds, scored on the held-out one,
//! and the dimensionality probes.

use super::labels::{rows_of, Labels};
use super::{participation_of_squares, AtRank, Dimensionality, FitSettings};
use crate::fit::{fit_rows, Class, Samples};
use crate::linalg::{self, dot_f64, RankScale};
use crate::separability::{auc, pearson};

/// Mean held-out numbers over the folds.
pub(super) struct HeldOut {
    pub(super) auc: f64,
    pub(super) pearson: Option<f64>,
    pub(super) coordinate_probe: Vec<AtRank>,
    pub(super) pc_probe: Vec<AtRank>,
}

/// Refits on each fold's training rows and scores the held-out ones; with `probes`, also the
/// restricted-vector probes. An error is the note to report.
pub(super) fn cross_validate(
    samples: &Samples<'_>,
    labels: &Labels,
    settings: FitSettings,
    probes: bool,
) -> Result<HeldOut, String> {
    let k = labels.folds;
    let d = samples.dim();
    let coordinate_ranks = ranks_up_to(d);
    // Every fold's training set has at least this many rows, so at most one fewer components.
    let smallest_train = (0..k)
        .map(|fold| {
            labels.rows(Class::Refusal, fold, false).len()
                + labels.rows(Class::Compliance, fold, false).len()
        })
        .min()
        .unwrap_or(0);
    let pc_ranks = ranks_up_to(d.min(smallest_train.saturating_sub(1)));
    let mut auc_sum = 0.0;
    let (mut pearson_sum, mut pearson_folds) = (0.0, 0);
    let mut coordinate_sums = vec![0.0; coordinate_ranks.len()];
    let mut pc_sums = vec![0.0; pc_ranks.len()];
    for fold in 0..k {
        let train_r = labels.rows(Class::Refusal, fold, false);
        let train_c = labels.rows(Class::Compliance, fold, false);
        let fitted = fit_rows(samples, &train_r, &train_c, settings.method, settings.ridge)
            .map_err(|e| format!("held-out fit, fold {fold}: {e}"))?;
        let v: Vec<f64> = fitted.vector.iter().map(|&x| f64::from(x)).collect();
        let test: Vec<usize> = [
            labels.rows(Class::Refusal, fold, true),
            labels.rows(Class::Compliance, fold, true),
        ]
        .concat();
        let test_classes: Vec<Class> = test.iter().map(|&i| labels.classes[i]).collect();
        let score = |projection: &dyn Fn(&[f32]) -> f64| -> Result<f64, String> {
            let p: Vec<f64> = test.iter().map(|&i| projection(samples.row(i))).collect();
            auc(&p, &test_classes).map_err(|e| format!("held-out AUC, fold {fold}: {e}"))
        };
        auc_sum += score(&|row| dot_f64(row, &v))?;

        let scored = labels.scored_rows(fold);
        let projected: Vec<f64> = scored
            .iter()
            .map(|&i| dot_f64(samples.row(i), &v))
            .collect();
        let targets: Vec<f64> = scored.iter().filter_map(|&i| labels.scores[i]).collect();
        // Undefined when the fold's vector is zero or its scores are all equal: skip the fold.
        if let Ok(r) = pearson(&projected, &targets) {
            pearson_sum += r;
            pearson_folds += 1;
        }

        if probes {
            for (sum, &k) in coordinate_sums.iter_mut().zip(&coordinate_ranks) {
                let restricted = top_coordinates(&v, k);
                *sum += score(&|row| dot_f64(row, &restricted))?;
            }
            let axes = principal_axes(samples, &[train_r, train_c].concat())?;
            // Coefficients of v on each axis; the projection on the top k is their prefix.
            let coefficients: Vec<f64> = axes
                .iter()
                .map(|axis| axis.iter().zip(&v).map(|(a, b)| a * b).sum())
                .collect();
            for (sum, &k) in pc_sums.iter_mut().zip(&pc_ranks) {
                let restricted: Vec<f64> = (0..d)
                    .map(|i| {
                        (0..k.min(axes.len()))
                            .map(|j| coefficients[j] * axes[j][i])
                            .sum()
                    })
                    .collect();
                *sum += score(&|row| dot_f64(row, &restricted))?;
            }
        }
    }
    let mean = |ranks: &[usize], sums: &[f64]| -> Vec<AtRank> {
        ranks
            .iter()
            .zip(sums)
            .map(|(&k, &s)| AtRank {
                k,
                value: s / labels.folds as f64,
            })
            .collect()
    };
    Ok(HeldOut {
        auc: auc_sum / k as f64,
        pearson: (pearson_folds > 0).then(|| pearson_sum / pearson_folds as f64),
        coordinate_probe: mean(&coordinate_ranks, &coordinate_sums),
        pc_probe: mean(&pc_ranks, &pc_sums),
    })
}

/// 1, 2, 4, ... below `max`, then `max` itself; empty when `max` is 0.
pub(super) fn ranks_up_to(max: usize) -> Vec<usize> {
    let mut ranks: Vec<usize> = std::iter::successors(Some(1usize), |k| k.checked_mul(2))
        .take_while(|&k| k < max)
        .collect();
    if max > 0 {
        ranks.push(max);
    }
    ranks
}

/// `v` with all but its `k` largest-magnitude coordinates set to 0.
pub(super) fn top_coordinates(v: &[f64], k: usize) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].abs().total_cmp(&v[a].abs()));
    let mut kept = vec![0.0; v.len()];
    for &i in order.iter().take(k) {
        kept[i] = v[i];
    }
    kept
}

/// Unit principal axes (largest variance first) of `rows` centred on their mean, keeping only
/// axes of nonzero variance.
fn principal_axes(samples: &Samples<'_>, rows: &[usize]) -> Result<Vec<Vec<f64>>, String> {
    let (x, d) = (samples.data(), samples.dim());
    let mean = linalg::mean_of_rows(x, d, rows);
    linalg::principal_axes(
        linalg::offsets(x, d, rows, &mean).as_ref(),
        RankScale::Largest,
    )
    .map(|found| found.axes)
    .map_err(|e| format!("principal components: {e}"))
}

/// The mean-difference spectrum over all refusal and compliance rows (probes left empty).
pub(super) fn mean_difference_spectrum(samples: &Samples<'_>) -> Result<Dimensionality, String> {
    let refusal = rows_of(samples.classes(), Class::Refusal);
    let compliance = rows_of(samples.classes(), Class::Compliance);
    let mean_of = |rows: &[usize]| linalg::mean_of_rows(samples.data(), samples.dim(), rows);
    let (mu_r, mu_c) = (mean_of(&refusal), mean_of(&compliance));
    let difference: Vec<f64> = mu_r.iter().zip(&mu_c).map(|(a, b)| a - b).collect();
    let total: f64 = difference.iter().map(|x| x * x).sum();
    if total == 0.0 {
        return Err("the class means are equal, so there is no spectrum to measure".into());
    }
    let axes = principal_axes(samples, &[refusal, compliance].concat())?;
    if axes.is_empty() {
        return Err(
            "the activations do not vary here, so they have no principal components".into(),
        );
    }
    let squared: Vec<f64> = axes
        .iter()
        .map(|axis| {
            axis.iter()
                .zip(&difference)
                .map(|(a, b)| a * b)
                .sum::<f64>()
                .powi(2)
        })
        .collect();
    let cumulative: Vec<f64> = squared
        .iter()
        .scan(0.0, |acc, s| {
            *acc += s / total;
            Some(*acc)
        })
        .collect();
    let pcs_for_90_percent = cumulative
        .iter()
        .position(|&f| f >= 0.9)
        .map_or(cumulative.len(), |i| i + 1);
    Ok(Dimensionality {
        mean_difference_in_top_pcs: ranks_up_to(axes.len())
            .into_iter()
            .map(|k| AtRank {
                k,
                value: cumulative[k - 1],
            })
            .collect(),
        pcs_for_90_percent,
        mean_difference_pc_participation: participation_of_squares(&squared).unwrap_or(0.0),
        probe_auc_top_coordinates: Vec::new(),
        probe_auc_top_pcs: Vec::new(),
    })
}
