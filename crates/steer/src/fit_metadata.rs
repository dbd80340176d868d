//! What fitting a vector file measured, typed: how it was fitted and, per point, the vector's
//! norm, the residual stream's scale, the held-out AUC and what protection removed.
//!
//! Stored once, as JSON under the `fit` key of the vector file's safetensors header
//! ([`crate::vectors`]); unknown fields are refused, so a file from another version says so
//! instead of being half-read. Vectors that were not fitted here (a llama.cpp control vector, a
//! recipe's added part) have none.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::fit::{Method, Ridge};
use crate::separability::best_points;

/// A point is among the best when its held-out AUC is within this of the best one.
pub const BEST_POINT_MARGIN: f64 = 0.02;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitMetadata {
    pub method: Method,
    /// The ridge of RMD and WRMD (recorded for every method; MD and PCA ignore it).
    pub ridge: Ridge,
    /// Rows fitted as refusals and as compliances.
    pub n_refusal: usize,
    pub n_compliance: usize,
    /// One per point, point 0 (the embeddings) first.
    pub points: Vec<PointFit>,
    /// Strata the classes were balanced over (`None`: not balanced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
}

/// How a fit balanced its classes over strata ([`crate::Samples::with_strata`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balance {
    /// What a stratum is, e.g. "prompt script".
    pub by: String,
    /// Per stratum, its refusal and compliance rows. A stratum with rows in one class only
    /// is left out of the fit (nothing to balance it against).
    pub rows: BTreeMap<String, [usize; 2]>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointFit {
    /// Euclidean norm of the stored vector.
    pub norm: f64,
    /// Mean norm of the residual stream here over the fitted rows: what a norm-scaled strength
    /// is a fraction of.
    pub residual_norm: f64,
    /// The ridge's λ in this point's units (`None` for MD and PCA, and where nothing was fitted).
    pub lambda: Option<f64>,
    /// k-fold held-out AUC; `None` when a fold was too small to fit.
    pub heldout_auc: Option<f64>,
    /// With protected directions removed: what that did.
    pub protected: Option<Protection>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protection {
    /// Cosine of the vector as fitted with the first protected direction.
    pub cosine: f64,
    /// The fraction of the vector's norm left after projecting out the protected span.
    pub surviving_fraction: f64,
}

impl FitMetadata {
    /// Held-out AUC per point (`None` where it could not be measured).
    pub fn heldout_aucs(&self) -> Vec<Option<f64>> {
        self.points.iter().map(|p| p.heldout_auc).collect()
    }

    /// The points after the embeddings within [`BEST_POINT_MARGIN`] of the best held-out AUC.
    pub fn recommended_points(&self) -> Vec<usize> {
        best_points(&self.heldout_aucs(), 1, BEST_POINT_MARGIN)
    }

    /// For reports: "wrmd, kappa 1" or "md".
    pub fn describe(&self) -> String {
        describe(self.method, self.ridge)
    }
}

/// "wrmd, kappa 1", "rmd, lambda 0.5" or "md": a method with the ridge where it has one.
pub fn describe(method: Method, ridge: Ridge) -> String {
    match (method, ridge) {
        (Method::Rmd | Method::Wrmd, Ridge::Relative(kappa)) => format!("{method}, kappa {kappa}"),
        (Method::Rmd | Method::Wrmd, Ridge::Absolute(lambda)) => {
            format!("{method}, lambda {lambda}")
        }
        _ => method.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> FitMetadata {
        let point = |auc: Option<f64>| PointFit {
            norm: 1.0,
            residual_norm: 10.0,
            lambda: Some(0.5),
            heldout_auc: auc,
            protected: None,
        };
        FitMetadata {
            method: Method::Wrmd,
            ridge: Ridge::Relative(1.0),
            n_refusal: 3,
            n_compliance: 4,
            points: vec![
                point(Some(1.0)),
                point(Some(0.9)),
                point(None),
                point(Some(0.885)),
            ],
            balance: Some(Balance {
                by: "prompt script".into(),
                rows: BTreeMap::from([("Latin".into(), [3, 2]), ("Mandarin".into(), [0, 2])]),
            }),
        }
    }

    #[test]
    fn round_trips_as_json_and_refuses_unknown_fields() {
        let fit = example();
        let text = serde_json::to_string(&fit).unwrap();
        assert!(
            text.contains(r#""method":"wrmd","ridge":{"relative":1.0}"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<FitMetadata>(&text).unwrap(), fit);
        let extra = text.replacen('{', r#"{"kappa":1,"#, 1);
        let err = serde_json::from_str::<FitMetadata>(&extra).unwrap_err();
        assert!(err.to_string().contains("unknown field `kappa`"), "{err}");
    }

    #[test]
    fn recommended_points_skip_the_embeddings_and_keep_the_margin() {
        assert_eq!(example().recommended_points(), vec![1, 3]);
        assert_eq!(example().describe(), "wrmd, kappa 1");
        assert_eq!(
            describe(Method::Rmd, Ridge::Absolute(0.5)),
            "rmd, lambda 0.5"
        );
        assert_eq!(describe(Method::Md, Ridge::Relative(1.0)), "md");
    }
}
