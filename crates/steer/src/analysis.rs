//! Per-point analysis of a steering-vector file against labelled activations (METHOD.md
//! sections 4-5, "Analysis"): held-out separability, norms, angles between points and between
//! vector files, and how many dimensions carry the refusal signal.
//!
//! Every separability number is held out: the rows with a score are split into seeded,
//! class-stratified folds (the same folds as [`k_fold_auc`](crate::k_fold_auc) with the same
//! seed), a vector is refit on the training folds with the file's own method, and only the
//! held-out fold is scored. Numbers that cannot be computed at a point (an embedding layer with
//! no spread, a zero vector) are `None`, with the reason in the point's `notes`. The files and
//! charts are written by `refusal_steer_pipeline::analysis_report`.

use std::collections::HashMap;

use faer::Mat;
use refusal_steer_data::activations::Activations;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fit::{fit_rows, Class, FitError, Method, Ridge, Samples};
use crate::rng::SplitMix64;
use crate::separability::{auc, pearson, projections};
use crate::vectors::{SteeringVectors, VectorFileError};

/// A point counts among the best when its held-out AUC is within this of the best one
/// (the rule `fit` uses for its recommended points).
pub const BEST_POINT_MARGIN: f64 = 0.02;

#[derive(Debug, Clone, PartialEq)]
pub struct AnalysisOptions {
    /// Folds of the held-out split (>= 2).
    pub folds: usize,
    /// Seed of the fold assignment.
    pub seed: u64,
    /// A score `c` with `|c| <= threshold` is neither refusal nor compliance (as in `fit`).
    pub threshold: f64,
}

impl Default for AnalysisOptions {
    fn default() -> Self {
        Self {
            folds: 5,
            seed: 0,
            threshold: refusal_steer_data::CONFIDENCE_THRESHOLD,
        }
    }
}

/// How a vector file was fitted, so the held-out folds refit it the same way.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitSettings {
    pub method: Method,
    pub ridge: Ridge,
}

impl FitSettings {
    /// Reads the `method` and `ridge` metadata that `fit` writes. A file that does not name its
    /// method (an imported llama.cpp control vector) is treated as MD; a ridge method without a
    /// `ridge` entry gets `fit`'s default, κ = 1.
    pub fn from_metadata(vectors: &SteeringVectors) -> Result<Self, AnalysisError> {
        let bad = |key: &'static str, value: &str, detail: String| AnalysisError::BadMetadata {
            key,
            value: value.to_string(),
            detail,
        };
        let method = match vectors.metadata.get("method") {
            None => Method::Md,
            Some(m) => m
                .parse()
                .map_err(|e: FitError| bad("method", m, e.to_string()))?,
        };
        let ridge = match vectors.metadata.get("ridge") {
            None => Ridge::Relative(1.0),
            Some(text) => parse_ridge(text).ok_or_else(|| {
                bad(
                    "ridge",
                    text,
                    "expected Relative(kappa) or Absolute(lambda)".into(),
                )
            })?,
        };
        Ok(Self { method, ridge })
    }

    /// For reports: "wrmd, kappa 1" or "md".
    pub fn describe(&self) -> String {
        match (self.method, self.ridge) {
            (Method::Rmd | Method::Wrmd, Ridge::Relative(kappa)) => {
                format!("{}, kappa {kappa}", self.method)
            }
            (Method::Rmd | Method::Wrmd, Ridge::Absolute(lambda)) => {
                format!("{}, lambda {lambda}", self.method)
            }
            _ => self.method.to_string(),
        }
    }
}

/// Parses the `Debug` form `fit` stores: `Relative(1.0)` or `Absolute(0.5)`.
fn parse_ridge(text: &str) -> Option<Ridge> {
    let value = |prefix: &str| -> Option<f64> {
        text.trim()
            .strip_prefix(prefix)?
            .strip_suffix(')')?
            .trim()
            .parse()
            .ok()
    };
    value("Relative(")
        .map(Ridge::Relative)
        .or_else(|| value("Absolute(").map(Ridge::Absolute))
}

#[derive(Debug, Error)]
pub enum AnalysisError {
    #[error("a held-out split needs at least 2 folds, got {0}")]
    BadFolds(usize),
    #[error("threshold {0} must be finite and in [0, 1)")]
    BadThreshold(f64),
    #[error("{which} vectors do not fit the activations: {source}")]
    Dimensions {
        which: &'static str,
        source: VectorFileError,
    },
    #[error("the score of prompt {id:?} is {value}; scores must be finite")]
    NonFiniteScore { id: String, value: f64 },
    #[error("a {folds}-fold analysis needs at least {folds} {class} prompts (one per fold), found {found}; score more prompts or lower the folds")]
    TooFewForFolds {
        folds: usize,
        class: Class,
        found: usize,
    },
    #[error("vector file metadata {key} = {value:?} is not understood: {detail}")]
    BadMetadata {
        key: &'static str,
        value: String,
        detail: String,
    },
    #[error("point {point}: {source}")]
    Samples { point: usize, source: FitError },
}

/// Everything measured, per point, serialisable as the report's JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub model: Option<String>,
    pub n_points: usize,
    pub d: usize,
    pub n_refusal: usize,
    pub n_compliance: usize,
    /// Scored, but within the threshold: used for Pearson r only.
    pub n_neutral: usize,
    /// No score at all: left out.
    pub n_unscored: usize,
    pub folds: usize,
    pub seed: u64,
    pub threshold: f64,
    /// The method of the vector file, e.g. "wrmd, kappa 1".
    pub method: String,
    /// The method of the comparison file, when one was given.
    pub compare_method: Option<String>,
    pub points: Vec<PointAnalysis>,
    /// Points after the embeddings whose held-out AUC is within [`BEST_POINT_MARGIN`] of the
    /// best, best first (by held-out AUC, then held-out r).
    pub best_points: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointAnalysis {
    pub point: usize,
    /// Mean over folds of the held-out AUC (refusal vs compliance) of `x · v̂`.
    pub heldout_auc: Option<f64>,
    /// Mean over folds of the held-out Pearson r of `x · v̂` with the score, over every scored
    /// row (neutral ones included).
    pub heldout_pearson: Option<f64>,
    /// AUC of the file's own vector over all rows: in-sample when it was fitted on them.
    pub file_auc: Option<f64>,
    /// Euclidean norm of the file's vector.
    pub norm: f64,
    /// Cosine between this point's vector and the previous point's.
    pub cosine_to_previous: Option<f64>,
    /// `(Σ v_i²)² / Σ v_i⁴`: 1 for a one-hot vector, d for a uniform one.
    pub participation_ratio: Option<f64>,
    pub dimensionality: Option<Dimensionality>,
    pub compare: Option<ComparePoint>,
    /// Why a number above is missing.
    pub notes: Vec<String>,
}

/// A value at rank `k` (k principal components, or k coordinates).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AtRank {
    pub k: usize,
    pub value: f64,
}

/// How many dimensions carry the refusal signal at one point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dimensionality {
    /// Fraction of `‖μ_R − μ_C‖²` in the top-k principal components of the pooled, centred
    /// refusal and compliance activations.
    pub mean_difference_in_top_pcs: Vec<AtRank>,
    /// Fewest principal components holding 90% of `‖μ_R − μ_C‖²`.
    pub pcs_for_90_percent: usize,
    /// Participation ratio of `μ_R − μ_C` over the principal components.
    pub mean_difference_pc_participation: f64,
    /// Held-out AUC of the fold's vector keeping only its k largest coordinates (by `|v_i|`).
    pub probe_auc_top_coordinates: Vec<AtRank>,
    /// Held-out AUC of the fold's vector projected on the training folds' top-k components.
    pub probe_auc_top_pcs: Vec<AtRank>,
}

/// This point's vector against the comparison file's (another method, or a protected direction).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ComparePoint {
    pub norm: f64,
    pub cosine: Option<f64>,
    /// `‖v − (v·ŵ)ŵ‖ / ‖v‖`: how much of this file's vector survives projecting out the
    /// comparison direction.
    pub surviving_norm_fraction: Option<f64>,
    /// Held-out AUC when refitting with the comparison file's method on these activations.
    pub heldout_auc: Option<f64>,
    /// AUC of the comparison file's own vector on these activations.
    pub file_auc: Option<f64>,
}

/// [`analyze_with_progress`] without progress reports.
pub fn analyze(
    acts: &Activations,
    scores: &HashMap<String, f64>,
    vectors: &SteeringVectors,
    compare: Option<&SteeringVectors>,
    options: &AnalysisOptions,
) -> Result<Analysis, AnalysisError> {
    analyze_with_progress(acts, scores, vectors, compare, options, &mut |_| {})
}

/// Analyses every point of `vectors` on `acts`, with `scores` the judge score `c` in [-1, 1]
/// (or ±1 labels) per prompt id; `on_point_done(point)` is called as each point finishes.
pub fn analyze_with_progress(
    acts: &Activations,
    scores: &HashMap<String, f64>,
    vectors: &SteeringVectors,
    compare: Option<&SteeringVectors>,
    options: &AnalysisOptions,
    on_point_done: &mut dyn FnMut(usize),
) -> Result<Analysis, AnalysisError> {
    if options.folds < 2 {
        return Err(AnalysisError::BadFolds(options.folds));
    }
    if !(options.threshold.is_finite() && (0.0..1.0).contains(&options.threshold)) {
        return Err(AnalysisError::BadThreshold(options.threshold));
    }
    let (n_points, d) = (acts.header.n_points, acts.header.d);
    let settings = FitSettings::from_metadata(vectors)?;
    vectors
        .check_dims(n_points, d)
        .map_err(|source| AnalysisError::Dimensions {
            which: "the",
            source,
        })?;
    let compare = match compare {
        Some(other) => {
            other
                .check_dims(n_points, d)
                .map_err(|source| AnalysisError::Dimensions {
                    which: "the comparison",
                    source,
                })?;
            Some((other, FitSettings::from_metadata(other)?))
        }
        None => None,
    };
    let labels = Labels::new(&acts.header.ids, scores, options)?;

    let mut points = Vec::with_capacity(n_points);
    for point in 0..n_points {
        let x = acts.at_point(point);
        let samples = Samples::new(&x, d, &labels.classes, &labels.weights)
            .map_err(|source| AnalysisError::Samples { point, source })?;
        let vector = vectors.point(point).expect("dimensions checked");
        let previous = point.checked_sub(1).and_then(|p| vectors.point(p));
        let mut analysis = analyse_point(&samples, &labels, point, vector, previous, settings);
        if let Some((other, other_settings)) = compare {
            let w = other.point(point).expect("dimensions checked");
            analysis.compare = Some(compare_point(
                &samples,
                &labels,
                vector,
                w,
                other_settings,
                &mut analysis.notes,
            ));
        }
        points.push(analysis);
        on_point_done(point);
    }

    let best_points = best_points(&points);
    Ok(Analysis {
        model: acts.header.metadata.get("model").cloned(),
        n_points,
        d,
        n_refusal: labels.count(Class::Refusal),
        n_compliance: labels.count(Class::Compliance),
        n_neutral: labels.scores.iter().flatten().count()
            - labels.count(Class::Refusal)
            - labels.count(Class::Compliance),
        n_unscored: labels.scores.iter().filter(|s| s.is_none()).count(),
        folds: options.folds,
        seed: options.seed,
        threshold: options.threshold,
        method: settings.describe(),
        compare_method: compare.map(|(_, s)| s.describe()),
        points,
        best_points,
    })
}

/// Per-row classes, weights, scores and folds, shared by every point.
struct Labels {
    classes: Vec<Class>,
    weights: Vec<f64>,
    scores: Vec<Option<f64>>,
    /// The fold of each scored row; `None` for unscored rows.
    fold_of: Vec<Option<usize>>,
    folds: usize,
}

impl Labels {
    fn new(
        ids: &[String],
        scores: &HashMap<String, f64>,
        options: &AnalysisOptions,
    ) -> Result<Self, AnalysisError> {
        let mut classes = Vec::with_capacity(ids.len());
        let mut row_scores = Vec::with_capacity(ids.len());
        for id in ids {
            let score = scores.get(id).copied();
            if let Some(value) = score.filter(|c| !c.is_finite()) {
                return Err(AnalysisError::NonFiniteScore {
                    id: id.clone(),
                    value,
                });
            }
            classes.push(match score {
                Some(c) if c > options.threshold => Class::Refusal,
                Some(c) if c < -options.threshold => Class::Compliance,
                _ => Class::Unused,
            });
            row_scores.push(score);
        }
        // The same stratified assignment as `k_fold_auc`, so its numbers and ours agree; the
        // neutral rows (Pearson only) are dealt out afterwards with the same generator.
        let mut rng = SplitMix64::new(options.seed);
        let mut fold_of = vec![None; ids.len()];
        let neutral = (0..ids.len())
            .filter(|&i| classes[i] == Class::Unused && row_scores[i].is_some())
            .collect();
        for (class, mut rows) in [
            (Class::Refusal, rows_of(&classes, Class::Refusal)),
            (Class::Compliance, rows_of(&classes, Class::Compliance)),
            (Class::Unused, neutral),
        ] {
            if class != Class::Unused && rows.len() < options.folds {
                return Err(AnalysisError::TooFewForFolds {
                    folds: options.folds,
                    class,
                    found: rows.len(),
                });
            }
            rng.shuffle(&mut rows);
            for (position, row) in rows.into_iter().enumerate() {
                fold_of[row] = Some(position % options.folds);
            }
        }
        Ok(Self {
            weights: row_scores.iter().map(|s| s.map_or(0.0, f64::abs)).collect(),
            classes,
            scores: row_scores,
            fold_of,
            folds: options.folds,
        })
    }

    fn count(&self, class: Class) -> usize {
        self.classes.iter().filter(|&&c| c == class).count()
    }

    /// Rows of `class` in fold `fold` (`held_out`) or in every other fold.
    fn rows(&self, class: Class, fold: usize, held_out: bool) -> Vec<usize> {
        (0..self.classes.len())
            .filter(|&i| self.classes[i] == class && self.fold_of[i].is_some())
            .filter(|&i| (self.fold_of[i] == Some(fold)) == held_out)
            .collect()
    }

    /// Held-out rows of fold `fold` that have a score, of any class.
    fn scored_rows(&self, fold: usize) -> Vec<usize> {
        (0..self.classes.len())
            .filter(|&i| self.fold_of[i] == Some(fold))
            .collect()
    }
}

fn rows_of(classes: &[Class], class: Class) -> Vec<usize> {
    (0..classes.len())
        .filter(|&i| classes[i] == class)
        .collect()
}

fn analyse_point(
    samples: &Samples<'_>,
    labels: &Labels,
    point: usize,
    vector: &[f32],
    previous: Option<&[f32]>,
    settings: FitSettings,
) -> PointAnalysis {
    let mut notes = Vec::new();
    let norm = norm(vector);
    let held_out = match cross_validate(samples, labels, settings, true) {
        Ok(h) => Some(h),
        Err(note) => {
            notes.push(note);
            None
        }
    };
    let dimensionality = held_out
        .as_ref()
        .and_then(|h| match mean_difference_spectrum(samples) {
            Ok(spectrum) => Some(Dimensionality {
                probe_auc_top_coordinates: h.coordinate_probe.clone(),
                probe_auc_top_pcs: h.pc_probe.clone(),
                ..spectrum
            }),
            Err(note) => {
                notes.push(note);
                None
            }
        });
    if norm == 0.0 {
        notes.push("the file's vector is zero here".into());
    }
    PointAnalysis {
        point,
        heldout_auc: held_out.as_ref().map(|h| h.auc),
        heldout_pearson: held_out.as_ref().and_then(|h| h.pearson),
        file_auc: file_auc(samples, vector),
        norm,
        cosine_to_previous: previous.and_then(|p| cosine(vector, p)),
        participation_ratio: participation_ratio(vector),
        dimensionality,
        compare: None,
        notes,
    }
}

fn compare_point(
    samples: &Samples<'_>,
    labels: &Labels,
    v: &[f32],
    w: &[f32],
    settings: FitSettings,
    notes: &mut Vec<String>,
) -> ComparePoint {
    let heldout_auc = match cross_validate(samples, labels, settings, false) {
        Ok(h) => Some(h.auc),
        Err(note) => {
            notes.push(format!("comparison: {note}"));
            None
        }
    };
    ComparePoint {
        norm: norm(w),
        cosine: cosine(v, w),
        surviving_norm_fraction: surviving_fraction(v, w),
        heldout_auc,
        file_auc: file_auc(samples, w),
    }
}

/// Mean held-out numbers over the folds.
struct HeldOut {
    auc: f64,
    pearson: Option<f64>,
    coordinate_probe: Vec<AtRank>,
    pc_probe: Vec<AtRank>,
}

/// Refits on each fold's training rows and scores the held-out ones; with `probes`, also the
/// restricted-vector probes. An error is the note to report.
fn cross_validate(
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
        auc_sum += score(&|row| dot(row, &v))?;

        let scored = labels.scored_rows(fold);
        let projected: Vec<f64> = scored.iter().map(|&i| dot(samples.row(i), &v)).collect();
        let targets: Vec<f64> = scored.iter().filter_map(|&i| labels.scores[i]).collect();
        // Undefined when the fold's vector is zero or its scores are all equal: skip the fold.
        if let Ok(r) = pearson(&projected, &targets) {
            pearson_sum += r;
            pearson_folds += 1;
        }

        if probes {
            for (sum, &k) in coordinate_sums.iter_mut().zip(&coordinate_ranks) {
                let restricted = top_coordinates(&v, k);
                *sum += score(&|row| dot(row, &restricted))?;
            }
            let axes = principal_axes(samples, &[train_r, train_c].concat())?;
            // Coefficients of v on each axis; the projection on the top k is their prefix.
            let coefficients: Vec<f64> = (0..axes.ncols())
                .map(|j| (0..d).map(|i| axes[(i, j)] * v[i]).sum())
                .collect();
            for (sum, &k) in pc_sums.iter_mut().zip(&pc_ranks) {
                let restricted: Vec<f64> = (0..d)
                    .map(|i| {
                        (0..k.min(axes.ncols()))
                            .map(|j| coefficients[j] * axes[(i, j)])
                            .sum()
                    })
                    .collect();
                *sum += score(&|row| dot(row, &restricted))?;
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
fn ranks_up_to(max: usize) -> Vec<usize> {
    let mut ranks: Vec<usize> = std::iter::successors(Some(1usize), |k| k.checked_mul(2))
        .take_while(|&k| k < max)
        .collect();
    if max > 0 {
        ranks.push(max);
    }
    ranks
}

/// `v` with all but its `k` largest-magnitude coordinates set to 0.
fn top_coordinates(v: &[f64], k: usize) -> Vec<f64> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].abs().total_cmp(&v[a].abs()));
    let mut kept = vec![0.0; v.len()];
    for &i in order.iter().take(k) {
        kept[i] = v[i];
    }
    kept
}

/// Unit principal axes (as columns, largest variance first) of `rows` centred on their mean,
/// keeping only axes of nonzero variance.
fn principal_axes(samples: &Samples<'_>, rows: &[usize]) -> Result<Mat<f64>, String> {
    let d = samples.dim();
    let mut mean = vec![0.0; d];
    for &r in rows {
        for (m, &x) in mean.iter_mut().zip(samples.row(r)) {
            *m += f64::from(x);
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows.len().max(1) as f64);
    let centred = Mat::from_fn(rows.len(), d, |i, j| {
        f64::from(samples.row(rows[i])[j]) - mean[j]
    });
    let svd = centred
        .thin_svd()
        .map_err(|e| format!("principal components: the SVD did not converge ({e:?})"))?;
    let singular = svd.S().column_vector();
    let largest = singular.iter().copied().fold(0.0, f64::max);
    // numpy's matrix_rank tolerance: below it a "component" is rounding noise.
    let tolerance = largest * rows.len().max(d) as f64 * f64::EPSILON;
    let rank = singular.iter().take_while(|&&s| s > tolerance).count();
    Ok(svd.V().subcols(0, rank).to_owned())
}

/// The mean-difference spectrum over all refusal and compliance rows (probes left empty).
fn mean_difference_spectrum(samples: &Samples<'_>) -> Result<Dimensionality, String> {
    let refusal = rows_of(samples.classes(), Class::Refusal);
    let compliance = rows_of(samples.classes(), Class::Compliance);
    let mean_of = |rows: &[usize]| -> Vec<f64> {
        let mut m = vec![0.0; samples.dim()];
        for &r in rows {
            for (a, &x) in m.iter_mut().zip(samples.row(r)) {
                *a += f64::from(x) / rows.len() as f64;
            }
        }
        m
    };
    let (mu_r, mu_c) = (mean_of(&refusal), mean_of(&compliance));
    let difference: Vec<f64> = mu_r.iter().zip(&mu_c).map(|(a, b)| a - b).collect();
    let total: f64 = difference.iter().map(|x| x * x).sum();
    if total == 0.0 {
        return Err("the class means are equal, so there is no spectrum to measure".into());
    }
    let axes = principal_axes(samples, &[refusal, compliance].concat())?;
    if axes.ncols() == 0 {
        return Err(
            "the activations do not vary here, so they have no principal components".into(),
        );
    }
    let squared: Vec<f64> = (0..axes.ncols())
        .map(|j| {
            let c: f64 = (0..samples.dim())
                .map(|i| axes[(i, j)] * difference[i])
                .sum();
            c * c
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
        mean_difference_in_top_pcs: ranks_up_to(axes.ncols())
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

fn file_auc(samples: &Samples<'_>, v: &[f32]) -> Option<f64> {
    let p = projections(samples, v).ok()?;
    auc(&p, samples.classes()).ok()
}

/// Ranked by held-out AUC, ties (AUC saturates at 1 on easy data) broken by held-out r.
fn best_points(points: &[PointAnalysis]) -> Vec<usize> {
    let mut ranked: Vec<(usize, f64, f64)> = points
        .iter()
        .skip(1) // the embeddings carry no prompt-specific signal at the last token
        .filter_map(|p| {
            Some((
                p.point,
                p.heldout_auc?,
                p.heldout_pearson.unwrap_or(f64::MIN),
            ))
        })
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(b.2.total_cmp(&a.2)));
    let best = ranked.first().map_or(0.0, |b| b.1);
    ranked
        .into_iter()
        .take_while(|&(_, auc, _)| auc >= best - BEST_POINT_MARGIN)
        .map(|(p, _, _)| p)
        .collect()
}

fn dot(row: &[f32], v: &[f64]) -> f64 {
    row.iter().zip(v).map(|(&x, &w)| f64::from(x) * w).sum()
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

/// `None` when either vector is zero.
fn cosine(a: &[f32], b: &[f32]) -> Option<f64> {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum();
    let denominator = norm(a) * norm(b);
    (denominator > 0.0).then(|| (dot / denominator).clamp(-1.0, 1.0))
}

/// `‖v − (v·ŵ)ŵ‖ / ‖v‖`; `None` when either vector is zero.
fn surviving_fraction(v: &[f32], w: &[f32]) -> Option<f64> {
    let (norm_v, norm_w) = (norm(v), norm(w));
    if norm_v == 0.0 || norm_w == 0.0 {
        return None;
    }
    let along: f64 = v
        .iter()
        .zip(w)
        .map(|(&x, &y)| f64::from(x) * f64::from(y))
        .sum::<f64>()
        / (norm_w * norm_w);
    let residual: f64 = v
        .iter()
        .zip(w)
        .map(|(&x, &y)| (f64::from(x) - along * f64::from(y)).powi(2))
        .sum();
    Some(residual.sqrt() / norm_v)
}

/// `(Σ v_i²)² / Σ v_i⁴`, the effective number of coordinates `v` spreads over; `None` for 0.
fn participation_ratio(v: &[f32]) -> Option<f64> {
    let squares: Vec<f64> = v.iter().map(|&x| f64::from(x).powi(2)).collect();
    participation_of_squares(&squares)
}

fn participation_of_squares(squares: &[f64]) -> Option<f64> {
    let sum: f64 = squares.iter().sum();
    let sum_of_squares: f64 = squares.iter().map(|s| s * s).sum();
    (sum_of_squares > 0.0).then(|| sum * sum / sum_of_squares)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::{isotropic_classes, noise_classes, Dataset};
    use crate::{fit, Samples};
    use refusal_steer_data::activations::ActivationsHeader;
    use std::collections::BTreeMap;

    /// Two points: 0 is pure noise, 1 carries a planted direction, for the same prompts.
    fn planted() -> (Activations, HashMap<String, f64>, Dataset) {
        let d = 24;
        let signal = isotropic_classes(d, 60, 31);
        let noise = noise_classes(d, 60, 32);
        // noise_classes alternates the labels; give its rows the signal set's labels instead.
        let n = signal.classes.len();
        let mut data = Vec::with_capacity(n * 2 * d);
        for i in 0..n {
            data.extend_from_slice(&noise.x[i * d..(i + 1) * d]);
            data.extend_from_slice(&signal.x[i * d..(i + 1) * d]);
        }
        let ids: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        let scores = ids
            .iter()
            .zip(&signal.classes)
            .map(|(id, c)| (id.clone(), if *c == Class::Refusal { 0.8 } else { -0.7 }))
            .collect();
        let acts = Activations {
            header: ActivationsHeader {
                n_points: 2,
                d,
                ids,
                sets: vec![None; n],
                metadata: BTreeMap::new(),
            },
            data,
        };
        (acts, scores, signal)
    }

    /// MD vectors fitted on all rows at every point, as `fit` would write them.
    fn md_vectors(acts: &Activations, scores: &HashMap<String, f64>) -> SteeringVectors {
        let h = &acts.header;
        let classes: Vec<Class> = h
            .ids
            .iter()
            .map(|id| {
                if scores[id] > 0.0 {
                    Class::Refusal
                } else {
                    Class::Compliance
                }
            })
            .collect();
        let weights = vec![1.0; classes.len()];
        let mut all = Vec::new();
        for p in 0..h.n_points {
            let x = acts.at_point(p);
            let samples = Samples::new(&x, h.d, &classes, &weights).unwrap();
            all.extend(
                fit(&samples, Method::Md, Ridge::Relative(1.0))
                    .unwrap()
                    .vector,
            );
        }
        let metadata = BTreeMap::from([("method".to_string(), "md".to_string())]);
        SteeringVectors::new(all, h.n_points, h.d, metadata).unwrap()
    }

    #[test]
    fn planted_point_separates_and_noise_point_does_not() {
        let (acts, scores, signal) = planted();
        let vectors = md_vectors(&acts, &scores);
        let analysis =
            analyze(&acts, &scores, &vectors, None, &AnalysisOptions::default()).unwrap();
        let (noise, planted) = (&analysis.points[0], &analysis.points[1]);
        let planted_auc = planted.heldout_auc.unwrap();
        let noise_auc = noise.heldout_auc.unwrap();
        assert!(planted_auc > 0.98, "planted point AUC {planted_auc}");
        assert!(
            (noise_auc - 0.5).abs() < 0.15,
            "noise point AUC {noise_auc}"
        );
        assert!(planted.heldout_pearson.unwrap() > 0.8);
        assert_eq!(analysis.best_points, vec![1]);
        assert_eq!((analysis.n_refusal, analysis.n_compliance), (60, 60));

        // The file's vector at the planted point lies along the planted direction.
        let planted_vector = vectors.point(1).unwrap();
        let direction: Vec<f32> = signal.direction.iter().map(|&x| x as f32).collect();
        assert!(cosine(planted_vector, &direction).unwrap() > 0.9);

        // The mean difference is the planted direction, so the top components hold most of it
        // and a probe on a handful of components already separates.
        let dims = planted.dimensionality.as_ref().unwrap();
        let last = dims.mean_difference_in_top_pcs.last().unwrap();
        assert!((last.value - 1.0).abs() < 1e-9, "{last:?}");
        assert!(dims.mean_difference_in_top_pcs[0].value > 0.5, "{dims:?}");
        assert!(dims.pcs_for_90_percent <= 8, "{dims:?}");
        assert!(dims.probe_auc_top_pcs[0].value > 0.95, "{dims:?}");
        let full = dims.probe_auc_top_coordinates.last().unwrap();
        assert_eq!(full.k, 24);
        assert!((full.value - planted_auc).abs() < 1e-12);
    }

    #[test]
    fn heldout_auc_matches_k_fold_auc_with_the_same_seed() {
        let (acts, scores, _) = planted();
        let vectors = md_vectors(&acts, &scores);
        let options = AnalysisOptions {
            folds: 4,
            seed: 9,
            threshold: 0.1,
        };
        let analysis = analyze(&acts, &scores, &vectors, None, &options).unwrap();
        let classes: Vec<Class> = acts
            .header
            .ids
            .iter()
            .map(|id| {
                if scores[id] > 0.0 {
                    Class::Refusal
                } else {
                    Class::Compliance
                }
            })
            .collect();
        let weights: Vec<f64> = acts.header.ids.iter().map(|id| scores[id].abs()).collect();
        for p in 0..2 {
            let x = acts.at_point(p);
            let samples = Samples::new(&x, acts.header.d, &classes, &weights).unwrap();
            let expected =
                crate::k_fold_auc(&samples, Method::Md, Ridge::Relative(1.0), 4, 9).unwrap();
            assert_eq!(analysis.points[p].heldout_auc, Some(expected));
        }
    }

    #[test]
    fn comparing_a_file_with_itself() {
        let (acts, scores, _) = planted();
        let vectors = md_vectors(&acts, &scores);
        let analysis = analyze(
            &acts,
            &scores,
            &vectors,
            Some(&vectors),
            &AnalysisOptions::default(),
        )
        .unwrap();
        for p in &analysis.points {
            let compare = p.compare.as_ref().unwrap();
            assert!((compare.cosine.unwrap() - 1.0).abs() < 1e-9);
            assert!(compare.surviving_norm_fraction.unwrap() < 1e-6);
            assert_eq!(compare.heldout_auc, p.heldout_auc);
            assert_eq!(compare.file_auc, p.file_auc);
        }
        assert_eq!(analysis.compare_method.as_deref(), Some("md"));
    }

    #[test]
    fn participation_ratio_cosine_and_surviving_fraction() {
        let d = 16;
        let mut one_hot = vec![0.0f32; d];
        one_hot[3] = -2.5;
        assert!((participation_ratio(&one_hot).unwrap() - 1.0).abs() < 1e-12);
        let uniform = vec![0.3f32; d];
        assert!((participation_ratio(&uniform).unwrap() - d as f64).abs() < 1e-9);
        assert_eq!(participation_ratio(&vec![0.0; d]), None);

        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0]).unwrap()).abs() < 1e-12);
        assert!((cosine(&[1.0, 1.0], &[-3.0, -3.0]).unwrap() + 1.0).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), None);
        // v = (3, 4) minus its part along (1, 0) leaves (0, 4): 4/5 of its norm survives.
        assert!((surviving_fraction(&[3.0, 4.0], &[2.0, 0.0]).unwrap() - 0.8).abs() < 1e-12);
        assert_eq!(surviving_fraction(&[3.0, 4.0], &[0.0, 0.0]), None);
    }

    #[test]
    fn best_points_break_auc_ties_by_pearson_and_skip_the_embeddings() {
        let point = |point, auc: Option<f64>, r| PointAnalysis {
            point,
            heldout_auc: auc,
            heldout_pearson: Some(r),
            file_auc: None,
            norm: 1.0,
            cosine_to_previous: None,
            participation_ratio: None,
            dimensionality: None,
            compare: None,
            notes: Vec::new(),
        };
        let points = [
            point(0, Some(1.0), 0.99),
            point(1, Some(1.0), 0.7),
            point(2, None, 0.0),
            point(3, Some(0.97), 0.99),
            point(4, Some(1.0), 0.9),
            point(5, Some(0.99), 0.5),
        ];
        assert_eq!(best_points(&points), vec![4, 1, 5]);
    }

    #[test]
    fn ranks_and_top_coordinates() {
        assert_eq!(ranks_up_to(0), Vec::<usize>::new());
        assert_eq!(ranks_up_to(1), vec![1]);
        assert_eq!(ranks_up_to(8), vec![1, 2, 4, 8]);
        assert_eq!(ranks_up_to(10), vec![1, 2, 4, 8, 10]);
        assert_eq!(
            top_coordinates(&[0.1, -3.0, 2.0, 0.5], 2),
            vec![0.0, -3.0, 2.0, 0.0]
        );
    }

    #[test]
    fn fit_settings_come_from_the_metadata() {
        let with = |pairs: &[(&str, &str)]| {
            let metadata = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            SteeringVectors::new(vec![1.0], 1, 1, metadata).unwrap()
        };
        let settings = |pairs: &[(&str, &str)]| FitSettings::from_metadata(&with(pairs));
        assert_eq!(
            settings(&[]).unwrap(),
            FitSettings {
                method: Method::Md,
                ridge: Ridge::Relative(1.0)
            }
        );
        let wrmd = settings(&[("method", "wrmd"), ("ridge", "Relative(0.25)")]).unwrap();
        assert_eq!(wrmd.ridge, Ridge::Relative(0.25));
        assert_eq!(wrmd.describe(), "wrmd, kappa 0.25");
        let rmd = settings(&[("method", "rmd"), ("ridge", "Absolute(3.0)")]).unwrap();
        assert_eq!(rmd.ridge, Ridge::Absolute(3.0));
        assert!(matches!(
            settings(&[("method", "svm")]),
            Err(AnalysisError::BadMetadata { key: "method", .. })
        ));
        assert!(matches!(
            settings(&[("method", "rmd"), ("ridge", "Relative(big)")]),
            Err(AnalysisError::BadMetadata { key: "ridge", .. })
        ));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let (acts, scores, _) = planted();
        let vectors = md_vectors(&acts, &scores);
        let run = |scores: &HashMap<String, f64>, vectors: &SteeringVectors, folds: usize| {
            let options = AnalysisOptions {
                folds,
                ..AnalysisOptions::default()
            };
            analyze(&acts, scores, vectors, None, &options)
        };
        assert!(matches!(
            run(&scores, &vectors, 1),
            Err(AnalysisError::BadFolds(1))
        ));
        assert!(matches!(
            run(&scores, &vectors, 61),
            Err(AnalysisError::TooFewForFolds { found: 60, .. })
        ));
        let mut nan = scores.clone();
        nan.insert("p3".into(), f64::NAN);
        assert!(matches!(
            run(&nan, &vectors, 5),
            Err(AnalysisError::NonFiniteScore { .. })
        ));
        let wrong = SteeringVectors::new(vec![1.0; 3 * 24], 3, 24, BTreeMap::new()).unwrap();
        let err = run(&scores, &wrong, 5).unwrap_err();
        assert!(matches!(err, AnalysisError::Dimensions { .. }), "{err}");
        // Only a few prompts scored: the rest are counted as unscored and left out.
        let few: HashMap<String, f64> = scores
            .iter()
            .filter(|(id, _)| id[1..].parse::<usize>().unwrap() % 3 == 0)
            .map(|(id, c)| (id.clone(), *c))
            .collect();
        let analysis = run(&few, &vectors, 5).unwrap();
        assert_eq!(analysis.n_unscored, 80);
        assert_eq!(analysis.n_refusal + analysis.n_compliance, 40);
    }
}
