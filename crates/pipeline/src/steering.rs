//! Steering during generation: per-point strengths and the hooks that apply them.
//!
//! Sign convention: a vector points from compliance to refusal (refusal mean minus compliance
//! mean), so a negative strength removes refusals and a positive one induces them.

use anyhow::{bail, Result};
use refusal_steer_engine::Positions;
use refusal_steer_steer::linalg::norm;
use refusal_steer_steer::SteeringVectors;
use serde::{Deserialize, Serialize};

/// How vectors change the residual stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SteerMode {
    /// h <- h + alpha * v.
    #[default]
    Add,
    /// Remove the component along v (directional ablation); alpha is not used.
    Ablate,
    /// Remove the component along v, then add alpha * v.
    AblateAdd,
}

/// Which token positions are steered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SteerPositions {
    #[default]
    All,
    /// Prompt tokens only (prefill).
    Prompt,
    /// Generated tokens only.
    Generated,
}

impl SteerPositions {
    pub fn engine(self) -> Positions {
        match self {
            SteerPositions::All => Positions::All,
            SteerPositions::Prompt => Positions::Prompt,
            SteerPositions::Generated => Positions::Generated,
        }
    }
}

/// How one strength becomes a strength per point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlphaProfile {
    /// alpha at every steered point, applied to the vector as fitted.
    Uniform,
    /// alpha is a fraction of the residual stream's typical norm at each point: the added
    /// vector alpha_p * v_p has norm |alpha| * mean ||h_p||. Vector norms differ many-fold
    /// across points and methods; this makes one strength mean the same push everywhere.
    NormScaled,
    /// alpha multiplies a given factor per point (`points` long; from a JSON file).
    Factors(Vec<f64>),
}

/// The strength at each point (length `n_points`) for `alpha` under `profile`.
pub fn point_alphas(
    vectors: &SteeringVectors,
    alpha: f64,
    profile: &AlphaProfile,
) -> Result<Vec<f64>> {
    Ok(match profile {
        AlphaProfile::Uniform => vec![alpha; vectors.n_points],
        AlphaProfile::NormScaled => {
            let fit = vectors.require_fit(
                "residual norms for a norm-scaled strength",
                "use --alpha-profile uniform",
            )?;
            (0..vectors.n_points)
                .map(|p| {
                    let v = vectors.point(p).expect("p < n_points");
                    let norm = norm(v);
                    if norm > 0.0 {
                        alpha * fit.points[p].residual_norm / norm
                    } else {
                        0.0
                    }
                })
                .collect()
        }
        AlphaProfile::Factors(factors) => {
            if factors.len() != vectors.n_points {
                bail!(
                    "the alpha profile has {} factors, but the vectors have {} points (one per point, point 0 = embeddings)",
                    factors.len(),
                    vectors.n_points
                );
            }
            factors.iter().map(|f| alpha * f).collect()
        }
    })
}

/// One vector file applied at chosen points, before it is resolved into a
/// [`crate::recipe::Recipe`].
#[derive(Debug, Clone)]
pub struct Steering<'a> {
    pub vectors: &'a SteeringVectors,
    pub points: &'a [usize],
    /// Strength per point (from [`point_alphas`]).
    pub alphas: &'a [f64],
    pub mode: SteerMode,
    pub positions: SteerPositions,
    /// In the ablation modes, more vector files whose directions are projected out together
    /// with this one's: the span of all of them is removed at each steered point.
    pub ablate_with: &'a [&'a SteeringVectors],
}

/// Parses "all", "3", "12-20", "1,4-6" into sorted points within `0..=max` ("all" is every
/// block output, 1..=max).
pub fn parse_points(spec: &str, max: usize) -> Result<Vec<usize>> {
    if spec.trim() == "all" {
        return Ok((1..=max).collect());
    }
    let mut points = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let bad = || anyhow::anyhow!("bad layer list '{spec}': use forms like 12-20, 5,7,9 or all");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<usize>().map_err(|_| bad())?,
                b.trim().parse::<usize>().map_err(|_| bad())?,
            ),
            None => {
                let p = part.parse::<usize>().map_err(|_| bad())?;
                (p, p)
            }
        };
        if a > b || b > max {
            bail!("layer range '{part}' is outside 0..={max} for this model");
        }
        points.extend(a..=b);
    }
    points.sort_unstable();
    points.dedup();
    Ok(points)
}

/// The shortest `--layers` text for `points` (sorted, distinct): runs become ranges.
pub fn format_points(points: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < points.len() {
        let mut j = i;
        while j + 1 < points.len() && points[j + 1] == points[j] + 1 {
            j += 1;
        }
        parts.push(if j > i {
            format!("{}-{}", points[i], points[j])
        } else {
            points[i].to_string()
        });
        i = j + 1;
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;
    use refusal_steer_steer::{FitMetadata, Method, PointFit, Ridge};
    use std::collections::BTreeMap;

    #[test]
    fn point_lists_parse_and_bad_ones_explain() {
        assert_eq!(parse_points("all", 3).unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_points("2-4, 1,3", 10).unwrap(), vec![1, 2, 3, 4]);
        assert!(parse_points("4-2", 10).is_err());
        for points in [vec![5], vec![1, 2, 3, 7, 9, 10], vec![0, 2, 4]] {
            assert_eq!(parse_points(&format_points(&points), 10).unwrap(), points);
        }
        assert_eq!(format_points(&[18, 19, 21, 22, 23]), "18-19,21-23");
        assert!(parse_points("12", 10)
            .unwrap_err()
            .to_string()
            .contains("outside 0..=10"));
        assert!(parse_points("x", 10)
            .unwrap_err()
            .to_string()
            .contains("use forms like"));
    }

    fn vectors() -> SteeringVectors {
        let point = |norm, residual_norm| PointFit {
            norm,
            residual_norm,
            lambda: None,
            heldout_auc: None,
            protected: None,
        };
        let fit = FitMetadata {
            method: Method::Md,
            ridge: Ridge::Relative(1.0),
            n_refusal: 1,
            n_compliance: 1,
            balance: None,
            points: vec![point(0.0, 10.0), point(2.0, 100.0), point(5.0, 50.0)],
        };
        // Norms 0, 2 and 5.
        SteeringVectors::new(vec![0.0, 0.0, 2.0, 0.0, 3.0, 4.0], 3, 2, BTreeMap::new())
            .unwrap()
            .with_fit(fit)
            .unwrap()
    }

    #[test]
    fn norm_scaled_strengths_push_every_point_by_the_same_fraction_of_its_residual() {
        let v = vectors();
        let alphas = point_alphas(&v, -0.1, &AlphaProfile::NormScaled).unwrap();
        assert_eq!(alphas[0], 0.0);
        // |alpha_p| * ||v_p|| == 0.1 * residual_p.
        assert!((alphas[1] * 2.0 + 10.0).abs() < 1e-9);
        assert!((alphas[2] * 5.0 + 5.0).abs() < 1e-9);
        assert_eq!(
            point_alphas(&v, 2.0, &AlphaProfile::Uniform).unwrap(),
            vec![2.0; 3]
        );
        assert_eq!(
            point_alphas(&v, 2.0, &AlphaProfile::Factors(vec![0.0, 1.0, 0.5])).unwrap(),
            vec![0.0, 2.0, 1.0]
        );
        assert!(point_alphas(&v, 2.0, &AlphaProfile::Factors(vec![1.0]))
            .unwrap_err()
            .to_string()
            .contains("one per point"));
    }

    #[test]
    fn ablating_with_another_file_removes_the_span_of_both_directions() {
        use refusal_steer_engine::{
            prefill, tiny, Action, Intervention, Logits, Padding, Positions, Rows,
        };
        let (_dir, model) = crate::testing::tiny_model();
        let (points, d) = (tiny::N_LAYERS + 1, tiny::D_MODEL);
        // Two overlapping directions per point (cosine 0.5 at every point).
        let a: Vec<f32> = (0..points * d).map(|i| f32::from(i % d == 0)).collect();
        let b: Vec<f32> = (0..points * d)
            .map(|i| f32::from(i % d == 0) + f32::from(i % d == 1) * 3f32.sqrt())
            .collect();
        let a = SteeringVectors::new(a, points, d, BTreeMap::new()).unwrap();
        let b = SteeringVectors::new(b, points, d, BTreeMap::new()).unwrap();
        let recipe = crate::recipe::Recipe::from_steering(
            &crate::recipe::ModelIdentity::of(&model).unwrap(),
            &Steering {
                vectors: &a,
                points: &[2],
                alphas: &[0.0; 4],
                mode: SteerMode::Ablate,
                positions: SteerPositions::All,
                ablate_with: &[&b],
            },
            None,
            Default::default(),
        )
        .unwrap();
        let mut hooks = recipe.hooks(&model).unwrap();
        hooks
            .add(Intervention {
                point: 2,
                action: Action::Capture,
                rows: Rows::All,
                positions: Positions::All,
            })
            .unwrap();
        prefill(
            &model,
            &[&[1, 2, 3, 4]],
            Padding::Left,
            0,
            &mut hooks,
            Logits::Last,
        )
        .unwrap();
        let captured = hooks.take_captured();
        assert_eq!(captured.len(), 4);
        for c in captured {
            // Both coordinates spanned by the two directions are gone.
            assert!(
                c.values[0].abs() < 1e-5 && c.values[1].abs() < 1e-5,
                "{:?}",
                &c.values[..4]
            );
            assert!(c.values[2..].iter().any(|&x| x.abs() > 1e-3));
        }
    }

    #[test]
    fn norm_scaled_needs_the_residual_scale_in_the_file() {
        let v = SteeringVectors::new(vec![1.0; 4], 2, 2, BTreeMap::new()).unwrap();
        let err = point_alphas(&v, 1.0, &AlphaProfile::NormScaled).unwrap_err();
        assert!(err.to_string().contains("refit"), "{err}");
    }
}
