//! `--steer`: vectors added to (or projected out of) the residual stream while generating.
//!
//! Sign convention: a vector points from compliance to refusal (refusal mean minus compliance
//! mean), so a negative `--alpha` removes refusals and a positive one induces them.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use refusal_steer_engine::{Action, Hooks, Intervention, Model, Positions, Rows};
use refusal_steer_steer::SteeringVectors;
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct SteerArgs {
    /// Steering-vector file(s) (safetensors from `fit`); several are applied together.
    #[arg(long)]
    steer: Vec<PathBuf>,
    /// Points to steer: "12-20", "5,7,9" or "all" (point p is the output of block p-1).
    #[arg(long, default_value = "all")]
    layers: String,
    /// Strength: h <- h + alpha * v. Negative removes refusals, positive induces them.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    alpha: f32,
    #[arg(long, value_enum, default_value_t = SteerMode::Add)]
    mode: SteerMode,
    #[arg(long, value_enum, default_value_t = SteerPositions::All)]
    positions: SteerPositions,
}

#[derive(Clone, Copy, Default, ValueEnum, Debug)]
enum SteerMode {
    /// Add alpha * v.
    #[default]
    Add,
    /// Remove the component along v (directional ablation); alpha is not used.
    Ablate,
    /// Remove the component along v, then add alpha * v.
    AblateAdd,
}

#[derive(Clone, Copy, Default, ValueEnum, Debug)]
enum SteerPositions {
    #[default]
    All,
    Prompt,
    Generated,
}

/// Parses "all", "3", "12-20", "1,4-6" into sorted points within `0..=max`.
pub fn parse_points(spec: &str, max: usize) -> Result<Vec<usize>> {
    if spec.trim() == "all" {
        return Ok((1..=max).collect());
    }
    let mut points = Vec::new();
    for part in spec.split(',').map(str::trim) {
        let bad = || format!("bad layer list '{spec}': use forms like 12-20, 5,7,9 or all");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (
                a.trim().parse::<usize>().with_context(bad)?,
                b.trim().parse::<usize>().with_context(bad)?,
            ),
            None => {
                let p = part.parse::<usize>().with_context(bad)?;
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

impl SteerArgs {
    /// The interventions for `model`, and a description of them for the output records.
    pub fn hooks(&self, model: &Model) -> Result<(Hooks, Option<serde_json::Value>)> {
        let mut hooks = model.new_hooks();
        if self.steer.is_empty() {
            return Ok((hooks, None));
        }
        let (n_points, d) = (model.config.n_layers + 1, model.config.d_model);
        let points = parse_points(&self.layers, model.config.n_layers)?;
        let positions = match self.positions {
            SteerPositions::All => Positions::All,
            SteerPositions::Prompt => Positions::Prompt,
            SteerPositions::Generated => Positions::Generated,
        };
        for path in &self.steer {
            let vectors = SteeringVectors::load(path)?;
            vectors
                .check_dims(n_points, d)
                .with_context(|| format!("{} does not fit this model", path.display()))?;
            for &p in &points {
                let v = vectors.point(p).expect("checked dims").to_vec();
                let mut add = |action| {
                    hooks.add(Intervention {
                        point: p,
                        action,
                        rows: Rows::All,
                        positions: positions.clone(),
                    })
                };
                if matches!(self.mode, SteerMode::Ablate | SteerMode::AblateAdd)
                    && v.iter().any(|&x| x != 0.0)
                {
                    add(Action::ProjectOut {
                        direction: v.clone(),
                        scale: 1.0,
                    })?;
                }
                if matches!(self.mode, SteerMode::Add | SteerMode::AblateAdd) {
                    add(Action::Add {
                        vector: v,
                        alpha: self.alpha,
                    })?;
                }
            }
        }
        let description = serde_json::json!({
            "files": self.steer.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "points": points,
            "alpha": self.alpha,
            "mode": format!("{:?}", self.mode).to_lowercase(),
            "positions": format!("{:?}", self.positions).to_lowercase(),
        });
        Ok((hooks, Some(description)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_lists_parse_and_bad_ones_explain() {
        assert_eq!(parse_points("all", 3).unwrap(), vec![1, 2, 3]);
        assert_eq!(parse_points("2-4, 1,3", 10).unwrap(), vec![1, 2, 3, 4]);
        assert!(parse_points("4-2", 10).is_err());
        assert!(parse_points("12", 10)
            .unwrap_err()
            .to_string()
            .contains("outside 0..=10"));
        assert!(parse_points("x", 10)
            .unwrap_err()
            .to_string()
            .contains("use forms like"));
    }
}
