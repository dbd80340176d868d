//! The rows' classes, weights, scores and seeded folds, shared by every point.

use std::collections::HashMap;

use super::{AnalysisError, AnalysisOptions};
use crate::fit::Class;
use crate::rng::SplitMix64;

/// Per-row classes, weights, scores and folds, shared by every point.
pub(super) struct Labels {
    pub(super) classes: Vec<Class>,
    pub(super) weights: Vec<f64>,
    pub(super) scores: Vec<Option<f64>>,
    /// The fold of each scored row; `None` for unscored rows.
    pub(super) fold_of: Vec<Option<usize>>,
    pub(super) folds: usize,
}

impl Labels {
    pub(super) fn new(
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

    pub(super) fn count(&self, class: Class) -> usize {
        self.classes.iter().filter(|&&c| c == class).count()
    }

    /// Rows of `class` in fold `fold` (`held_out`) or in every other fold.
    pub(super) fn rows(&self, class: Class, fold: usize, held_out: bool) -> Vec<usize> {
        (0..self.classes.len())
            .filter(|&i| self.classes[i] == class && self.fold_of[i].is_some())
            .filter(|&i| (self.fold_of[i] == Some(fold)) == held_out)
            .collect()
    }

    /// Held-out rows of fold `fold` that have a score, of any class.
    pub(super) fn scored_rows(&self, fold: usize) -> Vec<usize> {
        (0..self.classes.len())
            .filter(|&i| self.fold_of[i] == Some(fold))
            .collect()
    }
}

pub(super) fn rows_of(classes: &[Class], class: Class) -> Vec<usize> {
    (0..classes.len())
        .filter(|&i| classes[i] == class)
        .collect()
}
