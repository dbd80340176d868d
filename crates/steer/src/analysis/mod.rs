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

use refusal_steer_data::activations::Activations;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::fit::{Class, FitError, Method, Ridge, Samples};
use crate::fit_metadata::describe;
pub use crate::fit_metadata::BEST_POINT_MARGIN;
use crate::linalg::{cosine, dot, norm};
use crate::separability::{self, auc, projections};
use crate::vectors::{SteeringVectors, VectorFileError};

mod heldout;
mod labels;

use heldout::{cross_validate, mean_difference_spectrum};
use labels::Labels;

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
    /// The file's own method and ridge. A file without fit metadata (an imported llama.cpp
    /// control vector) is treated as MD.
    pub fn of(vectors: &SteeringVectors) -> Self {
        vectors.fit.as_ref().map_or(
            Self {
                method: Method::Md,
                ridge: Ridge::Relative(1.0),
            },
            |fit| Self {
                method: fit.method,
                ridge: fit.ridge,
            },
        )
    }

    /// For reports: "wrmd, kappa 1" or "md".
    pub fn describe(&self) -> String {
        describe(self.method, self.ridge)
    }
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
    let settings = FitSettings::of(vectors);
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
            Some((other, FitSettings::of(other)))
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

fn file_auc(samples: &Samples<'_>, v: &[f32]) -> Option<f64> {
    let p = projections(samples, v).ok()?;
    auc(&p, samples.classes()).ok()
}

/// The best points after the embeddings (the embeddings carry no prompt-specific signal at the
/// last token), best first: by held-out AUC, ties (AUC saturates at 1 on easy data) broken by
/// held-out r.
fn best_points(points: &[PointAnalysis]) -> Vec<usize> {
    let aucs: Vec<Option<f64>> = points.iter().map(|p| p.heldout_auc).collect();
    let mut best = separability::best_points(&aucs, 1, BEST_POINT_MARGIN);
    let key = |p: usize| {
        (
            aucs[p].unwrap_or(f64::MIN),
            points[p].heldout_pearson.unwrap_or(f64::MIN),
        )
    };
    best.sort_by(|&a, &b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0).then(kb.1.total_cmp(&ka.1))
    });
    best
}

/// `‖v − (v·ŵ)ŵ‖ / ‖v‖`; `None` when either vector is zero.
fn surviving_fraction(v: &[f32], w: &[f32]) -> Option<f64> {
    let (norm_v, norm_w) = (norm(v), norm(w));
    if norm_v == 0.0 || norm_w == 0.0 {
        return None;
    }
    let along = dot(v, w) / (norm_w * norm_w);
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

pub(super) fn participation_of_squares(squares: &[f64]) -> Option<f64> {
    let sum: f64 = squares.iter().sum();
    let sum_of_squares: f64 = squares.iter().map(|s| s * s).sum();
    (sum_of_squares > 0.0).then(|| sum * sum / sum_of_squares)
}

#[cfg(test)]
mod tests;
