//! The probe's classifier and how its point, pooling and ridge are chosen.
//!
//! Ridge regression of ±1 (refusal of any type vs answer) and of the one-hot answer types on
//! centred features, solved in the dual (`n × n`) since there are fewer answers than
//! dimensions; the ridge is relative to the features' scale, `λ = κ · trace(XXᵀ)/d`, as for the
//! steering vectors. Cross-validation works on Gram matrices (one per candidate point and
//! pooling), centred per fold, so a fold costs one `n × n` factorisation per ridge.

use super::Pooling;
use crate::calibration::{best_cut, grouped_folds, Folds};
use crate::corpus::AnswerType;
use crate::{JudgeError, Result};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

/// Ridges (κ, relative) tried by [`select`].
pub const RIDGES: [f64; 4] = [0.01, 0.1, 1.0, 10.0];
/// The score is squashed to a probability with this slope: a ±1 target gives p 0.02 / 0.98.
const SCORE_SLOPE: f64 = 4.0;

pub fn p_refusal(score: f64) -> f64 {
    1.0 / (1.0 + (-SCORE_SLOPE * score).exp())
}

/// A fitted linear read-out: whether an answer is a refusal of any type, and which type.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearProbe {
    pub mean: Vec<f32>,
    /// Row 0: the refusal score; rows 1..: one per [`AnswerType::ALL`].
    pub weights: Vec<Vec<f32>>,
    pub biases: Vec<f64>,
}

impl LinearProbe {
    /// Fits on `rows` (each `[d]`) labelled `labels` with relative ridge `kappa`.
    pub fn fit(rows: &[&[f32]], labels: &[AnswerType], kappa: f64) -> Result<Self> {
        let (n, d) = (rows.len(), rows.first().map_or(0, |r| r.len()));
        if n < 2 || labels.len() != n || rows.iter().any(|r| r.len() != d) {
            return Err(JudgeError::Setup(format!(
                "a probe needs at least 2 rows of one width with a label each ({n} rows, {} labels)",
                labels.len()
            )));
        }
        let mean: Vec<f64> = (0..d)
            .map(|j| rows.iter().map(|r| f64::from(r[j])).sum::<f64>() / n as f64)
            .collect();
        // Xᵀ (d × n), centred: faer is column-major, so each answer is one contiguous column.
        let x_t = Mat::from_fn(d, n, |j, i| f64::from(rows[i][j]) - mean[j]);
        let targets: Vec<Vec<f64>> = std::iter::once(refusal_targets(labels))
            .chain(AnswerType::ALL.iter().map(|t| {
                labels
                    .iter()
                    .map(|l| if l == t { 1.0 } else { 0.0 })
                    .collect()
            }))
            .collect();
        let biases: Vec<f64> = targets
            .iter()
            .map(|y| y.iter().sum::<f64>() / n as f64)
            .collect();
        let y = Mat::from_fn(n, targets.len(), |i, k| targets[k][i] - biases[k]);
        let gram = x_t.transpose() * &x_t;
        let alpha = ridge_dual(&gram, d, kappa, &y)?;
        let w = &x_t * alpha;
        Ok(Self {
            mean: mean.iter().map(|&m| m as f32).collect(),
            weights: (0..targets.len())
                .map(|k| (0..d).map(|j| w[(j, k)] as f32).collect())
                .collect(),
            biases,
        })
    }

    fn output(&self, k: usize, x: &[f32]) -> f64 {
        self.weights[k]
            .iter()
            .zip(x.iter().zip(&self.mean))
            .map(|(w, (x, m))| f64::from(*w) * f64::from(x - m))
            .sum::<f64>()
            + self.biases[k]
    }

    /// The refusal score: positive for a refusal of any type.
    pub fn score(&self, x: &[f32]) -> f64 {
        self.output(0, x)
    }

    /// The most likely refusal type (the highest type score other than `answer`).
    pub fn refusal_type(&self, x: &[f32]) -> AnswerType {
        let mut best = (AnswerType::Refusal, f64::MIN);
        for (k, t) in AnswerType::ALL.iter().enumerate().skip(1) {
            let s = self.output(k + 1, x);
            if s > best.1 {
                best = (*t, s);
            }
        }
        best.0
    }
}

fn refusal_targets(labels: &[AnswerType]) -> Vec<f64> {
    labels
        .iter()
        .map(|l| if l.is_refusal() { 1.0 } else { -1.0 })
        .collect()
}

/// `(K + λI)⁻¹ Y` for a centred Gram matrix `K` of `d`-dimensional rows, `λ = κ·trace(K)/d`.
fn ridge_dual(gram: &Mat<f64>, d: usize, kappa: f64, y: &Mat<f64>) -> Result<Mat<f64>> {
    if !(kappa.is_finite() && kappa > 0.0) {
        return Err(JudgeError::Setup(format!(
            "the probe's ridge must be positive, got {kappa}"
        )));
    }
    let n = gram.nrows();
    let lambda = kappa * (0..n).map(|i| gram[(i, i)]).sum::<f64>() / d as f64;
    if !(lambda.is_finite() && lambda > 0.0) {
        return Err(JudgeError::Setup(
            "the probe's rows do not vary: nothing to fit".into(),
        ));
    }
    let mut system = gram.clone();
    for i in 0..n {
        system[(i, i)] += lambda;
    }
    let llt = system.llt(Side::Lower).map_err(|_| {
        JudgeError::Setup(format!("the probe's ridge system is singular (λ {lambda})"))
    })?;
    Ok(llt.solve(y))
}

/// Every item's features at every candidate point, both poolings: `rows(pooling, slot)[item]`.
pub struct FeatureBank<'a> {
    /// Candidate points, in the order of the slots.
    pub points: Vec<usize>,
    pub d: usize,
    /// `[pooling][item]`: `[points * d]` per item.
    pub rows: [Vec<&'a [f32]>; 2],
}

impl FeatureBank<'_> {
    fn candidates(&self) -> Vec<(Pooling, usize)> {
        Pooling::ALL
            .iter()
            .flat_map(|&p| (0..self.points.len()).map(move |slot| (p, slot)))
            .collect()
    }

    pub fn row(&self, pooling: Pooling, slot: usize, item: usize) -> &[f32] {
        let pool = match pooling {
            Pooling::Last => 0,
            Pooling::Mean => 1,
        };
        &self.rows[pool][item][slot * self.d..(slot + 1) * self.d]
    }

    /// The uncentred Gram matrix of all items at one candidate.
    fn gram(&self, pooling: Pooling, slot: usize) -> Mat<f64> {
        let n = self.rows[0].len();
        let x_t = Mat::from_fn(self.d, n, |j, i| f64::from(self.row(pooling, slot, i)[j]));
        x_t.transpose() * &x_t
    }
}

/// A point, pooling, ridge and decision cut, with the cross-validated kappa that chose them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub point: usize,
    pub pooling: Pooling,
    pub kappa: f64,
    /// A refusal scores above this. Not 0: out of sample the ridge's scores shrink toward the
    /// share of refusals in the fit rows, so with more refusals than answers a 0 cut calls
    /// most answers refusals.
    pub cut: f64,
    pub cv_kappa: f64,
}

/// How [`select`] searches: grouped inner folds, their seed, and the false-refusal budget
/// of the cut ([`best_cut`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Search {
    pub folds: usize,
    pub seed: u64,
    pub max_false_refusals: f64,
}

/// Refusal scores of `test` from a ridge fit on `train`, for every ridge in `ridges`, from the
/// uncentred Gram matrix of all items (centred here by the train rows' mean).
fn fold_scores(
    gram: &Mat<f64>,
    d: usize,
    y: &[f64],
    train: &[usize],
    test: &[usize],
    ridges: &[f64],
) -> Result<Vec<Vec<f64>>> {
    let m = train.len() as f64;
    // r_i = mean_j∈train K_ij, q = mean of K over train × train.
    let r: Vec<f64> = (0..gram.nrows())
        .map(|i| train.iter().map(|&j| gram[(i, j)]).sum::<f64>() / m)
        .collect();
    let q = train.iter().map(|&i| r[i]).sum::<f64>() / m;
    let centred = |i: usize, j: usize| gram[(i, j)] - r[i] - r[j] + q;
    let k_train = Mat::from_fn(train.len(), train.len(), |a, b| centred(train[a], train[b]));
    let y_mean = train.iter().map(|&i| y[i]).sum::<f64>() / m;
    let y_train = Mat::from_fn(train.len(), 1, |a, _| y[train[a]] - y_mean);
    ridges
        .iter()
        .map(|&kappa| {
            let alpha = ridge_dual(&k_train, d, kappa, &y_train)?;
            Ok(test
                .iter()
                .map(|&t| {
                    train
                        .iter()
                        .enumerate()
                        .map(|(a, &j)| centred(t, j) * alpha[(a, 0)])
                        .sum::<f64>()
                        + y_mean
                })
                .collect())
        })
        .collect()
}

/// Chooses the candidate point, pooling, ridge and cut with the best kappa of out-of-fold
/// predictions over `within` (grouped folds by `groups`), within the false-refusal budget.
pub fn select(
    bank: &FeatureBank,
    grams: &[Mat<f64>],
    labels: &[AnswerType],
    groups: &[&str],
    within: &[usize],
    search: Search,
) -> Result<Choice> {
    let y = refusal_targets(labels);
    let truth: Vec<bool> = labels.iter().map(|l| l.is_refusal()).collect();
    let inner_groups: Vec<&str> = within.iter().map(|&i| groups[i]).collect();
    let k = search.folds;
    let folds = grouped_folds(&inner_groups, k, search.seed);
    let mut best: Option<Choice> = None;
    for ((pooling, slot), gram) in bank.candidates().into_iter().zip(grams) {
        let mut held = vec![vec![0.0; labels.len()]; RIDGES.len()];
        for fold in 0..k {
            let (test, train): (Vec<usize>, Vec<usize>) =
                (0..within.len()).partition(|&a| folds[a] == fold);
            let (test, train): (Vec<usize>, Vec<usize>) = (
                test.iter().map(|&a| within[a]).collect(),
                train.iter().map(|&a| within[a]).collect(),
            );
            if test.is_empty() || train.len() < 2 {
                continue;
            }
            for (r, scores) in fold_scores(gram, bank.d, &y, &train, &test, &RIDGES)?
                .into_iter()
                .enumerate()
            {
                for (&t, s) in test.iter().zip(scores) {
                    held[r][t] = s;
                }
            }
        }
        let within_truth: Vec<bool> = within.iter().map(|&i| truth[i]).collect();
        for (r, held) in held.iter().enumerate() {
            let scores: Vec<f64> = within.iter().map(|&i| held[i]).collect();
            let (cut, agreement) = best_cut(&within_truth, &scores, search.max_false_refusals);
            if agreement.is_finite() && best.is_none_or(|b| agreement > b.cv_kappa) {
                best = Some(Choice {
                    point: bank.points[slot],
                    pooling,
                    kappa: RIDGES[r],
                    cut,
                    cv_kappa: agreement,
                });
            }
        }
    }
    best.ok_or_else(|| {
        JudgeError::Setup(
            "no probe candidate could be cross-validated: too few labelled answers of each kind"
                .into(),
        )
    })
}

/// Nested cross-validation: for each scored fold of `folds`, [`select`] on the items fitted
/// on (inner grouped folds), fit there and score the fold. Returns every scored item's
/// out-of-fold refusal score less its fold's cut (positive: refusal; 0 for items not scored)
/// and each outer fold's choice.
pub fn cross_validate(
    bank: &FeatureBank,
    labels: &[AnswerType],
    groups: &[&str],
    folds: &Folds,
    search: Search,
) -> Result<(Vec<f64>, Vec<Choice>)> {
    let grams: Vec<Mat<f64>> = bank
        .candidates()
        .into_iter()
        .map(|(pooling, slot)| bank.gram(pooling, slot))
        .collect();
    let y = refusal_targets(labels);
    let mut scores = vec![0.0; labels.len()];
    let mut choices = Vec::with_capacity(folds.k);
    for fold in 0..folds.k {
        let (test, train) = folds.split(fold);
        if test.is_empty() {
            continue;
        }
        let inner = Search {
            seed: search.seed + 1,
            ..search
        };
        let choice = select(bank, &grams, labels, groups, &train, inner)?;
        let slot = bank
            .points
            .iter()
            .position(|&p| p == choice.point)
            .expect("chosen among the bank's points");
        let candidate = bank
            .candidates()
            .iter()
            .position(|&c| c == (choice.pooling, slot))
            .expect("a candidate");
        let held = fold_scores(
            &grams[candidate],
            bank.d,
            &y,
            &train,
            &test,
            &[choice.kappa],
        )?;
        for (&t, s) in test.iter().zip(&held[0]) {
            scores[t] = s - choice.cut;
        }
        choices.push(choice);
    }
    Ok((scores, choices))
}

/// [`select`] over every item, for the probe that is kept.
pub fn select_all(
    bank: &FeatureBank,
    labels: &[AnswerType],
    groups: &[&str],
    search: Search,
) -> Result<Choice> {
    let grams: Vec<Mat<f64>> = bank
        .candidates()
        .into_iter()
        .map(|(pooling, slot)| bank.gram(pooling, slot))
        .collect();
    let all: Vec<usize> = (0..labels.len()).collect();
    select(bank, &grams, labels, groups, &all, search)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Rows `noise + label · direction` in d = 64 (fewer rows than dimensions); narratives
    /// also move along dimension 10.
    fn planted(n: usize, seed: u64) -> (Vec<Vec<f32>>, Vec<AnswerType>, Vec<f32>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let d = 64;
        let direction: Vec<f32> = (0..d).map(|j| if j < 4 { 0.5 } else { 0.0 }).collect();
        let mut rows = Vec::new();
        let mut labels = Vec::new();
        for i in 0..n {
            let label = [
                AnswerType::Answer,
                AnswerType::Narrative,
                AnswerType::Refusal,
            ][i % 3];
            let sign = if label.is_refusal() { 1.0 } else { -1.0 };
            let type_offset = if label == AnswerType::Narrative {
                2.0
            } else {
                0.0
            };
            rows.push(
                (0..d)
                    .map(|j| {
                        rng.gen_range(-1.0f32..1.0)
                            + sign * direction[j]
                            + if j == 10 { type_offset } else { 0.0 }
                    })
                    .collect(),
            );
            labels.push(label);
        }
        (rows, labels, direction)
    }

    #[test]
    fn the_probe_recovers_a_planted_direction_and_type() {
        let (rows, labels, direction) = planted(96, 1);
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let probe = LinearProbe::fit(&refs, &labels, 1.0).unwrap();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cos = probe.weights[0]
            .iter()
            .zip(&direction)
            .map(|(a, b)| a * b)
            .sum::<f32>()
            / (norm(&probe.weights[0]) * norm(&direction));
        assert!(cos > 0.7, "cosine with the planted direction {cos}");
        let (held, held_labels, _) = planted(60, 2);
        let correct = held
            .iter()
            .zip(&held_labels)
            .filter(|(x, l)| (probe.score(x) > 0.0) == l.is_refusal())
            .count();
        assert!(
            correct >= 54,
            "{correct}/60 held-out rows on the right side"
        );
        let typed = held
            .iter()
            .zip(&held_labels)
            .filter(|(x, l)| l.is_refusal() && probe.refusal_type(x) == **l)
            .count();
        assert!(typed >= 32, "{typed}/40 refusal types right");
    }

    #[test]
    fn the_dual_fold_scores_equal_a_primal_fit_on_the_train_rows() {
        let (rows, labels, _) = planted(30, 5);
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let bank = FeatureBank {
            points: vec![0],
            d: 64,
            rows: [refs.clone(), refs.clone()],
        };
        let gram = bank.gram(Pooling::Last, 0);
        let (train, test): (Vec<usize>, Vec<usize>) = (0..30).partition(|i| i % 4 != 0);
        let dual =
            fold_scores(&gram, 64, &refusal_targets(&labels), &train, &test, &[0.5]).unwrap();
        let train_rows: Vec<&[f32]> = train.iter().map(|&i| refs[i]).collect();
        let train_labels: Vec<AnswerType> = train.iter().map(|&i| labels[i]).collect();
        let primal = LinearProbe::fit(&train_rows, &train_labels, 0.5).unwrap();
        for (&t, s) in test.iter().zip(&dual[0]) {
            assert!(
                (primal.score(refs[t]) - s).abs() < 1e-4,
                "{} vs {s}",
                primal.score(refs[t])
            );
        }
    }

    #[test]
    fn selection_finds_the_point_that_holds_the_signal() {
        let (signal, labels, _) = planted(60, 7);
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        // Two points: noise at point 3, the planted rows at point 9.
        let rows: Vec<Vec<f32>> = signal
            .iter()
            .map(|s| {
                let noise: Vec<f32> = (0..64).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
                [noise, s.clone()].concat()
            })
            .collect();
        let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        let bank = FeatureBank {
            points: vec![3, 9],
            d: 64,
            rows: [refs.clone(), refs],
        };
        let groups: Vec<String> = (0..60).map(|i| format!("p{}", i / 2)).collect();
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        let search = Search {
            folds: 5,
            seed: 0,
            max_false_refusals: 1.0,
        };
        let choice = select_all(&bank, &labels, &groups, search).unwrap();
        assert_eq!(choice.point, 9);
        assert!(choice.cv_kappa > 0.6, "{choice:?}");
        let folds = Folds::grouped(&groups, 5, 0);
        let (scores, choices) = cross_validate(&bank, &labels, &groups, &folds, search).unwrap();
        assert_eq!(choices.len(), 5);
        let right = scores
            .iter()
            .zip(&labels)
            .filter(|(s, l)| (**s > 0.0) == l.is_refusal())
            .count();
        assert!(right >= 48, "{right}/60 out of fold");
    }
}
