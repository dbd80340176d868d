//! `--steer`: vectors added to (or projected out of) the residual stream while generating.
//!
//! Sign convention: a vector points from compliance to refusal (refusal mean minus compliance
//! mean), so a negative `--alpha` removes refusals and a positive one induces them.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use refusal_steer_engine::{Hooks, Model, Positions};
use refusal_steer_pipeline::gate::Gate;
use refusal_steer_pipeline::steering::{
    add_steering, parse_points, point_alphas, AlphaProfile, SteerMode, Steering,
};
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
    alpha: f64,
    /// uniform: alpha as given at every point; norm-scaled: alpha is the fraction of the
    /// residual stream's mean norm added at each point; or a JSON file with one factor per
    /// point (point 0 = embeddings) that multiplies alpha.
    #[arg(long, default_value = "uniform")]
    alpha_profile: String,
    #[arg(long, value_enum, default_value_t = ModeArg::Add)]
    mode: ModeArg,
    #[arg(long, value_enum, default_value_t = PositionsArg::All)]
    positions: PositionsArg,
    /// With --mode ablate or ablate-add: more vector files whose directions are projected out
    /// together with each --steer file's (the span of all of them is removed at each point).
    #[arg(long, requires = "steer")]
    ablate: Vec<PathBuf>,
    /// A topic gate (recommended-gate.json from `run`): only prompts it lets through are
    /// steered; the others are answered unsteered.
    #[arg(long, requires = "steer")]
    gate: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum ModeArg {
    /// Add alpha * v.
    Add,
    /// Remove the component along v (directional ablation); alpha is not used.
    Ablate,
    /// Remove the component along v, then add alpha * v.
    AblateAdd,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum PositionsArg {
    All,
    Prompt,
    Generated,
}

fn profile(spec: &str) -> Result<AlphaProfile> {
    Ok(match spec {
        "uniform" => AlphaProfile::Uniform,
        "norm-scaled" => AlphaProfile::NormScaled,
        path => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!(
                    "--alpha-profile is uniform, norm-scaled or a JSON file; cannot read '{path}'"
                )
            })?;
            let factors: Vec<f64> = serde_json::from_str(&text).with_context(|| {
                format!("{path}: an alpha profile file is a JSON list of numbers, one per point")
            })?;
            AlphaProfile::Factors(factors)
        }
    })
}

impl SteerArgs {
    /// The topic gate, if one was given.
    pub fn gate(&self, model: &Model) -> Result<Option<Gate>> {
        self.gate
            .as_ref()
            .map(|path| Gate::load(path, model))
            .transpose()
    }

    /// The interventions for `model`, and a description of them for the output records.
    pub fn hooks(&self, model: &Model) -> Result<(Hooks, Option<serde_json::Value>)> {
        let mut hooks = model.new_hooks();
        if self.steer.is_empty() {
            return Ok((hooks, None));
        }
        let points = parse_points(&self.layers, model.config.n_layers)?;
        let profile = profile(&self.alpha_profile)?;
        let mode = match self.mode {
            ModeArg::Add => SteerMode::Add,
            ModeArg::Ablate => SteerMode::Ablate,
            ModeArg::AblateAdd => SteerMode::AblateAdd,
        };
        let positions = match self.positions {
            PositionsArg::All => Positions::All,
            PositionsArg::Prompt => Positions::Prompt,
            PositionsArg::Generated => Positions::Generated,
        };
        if !self.ablate.is_empty() && mode == SteerMode::Add {
            anyhow::bail!("--ablate needs --mode ablate or ablate-add");
        }
        let ablate = self
            .ablate
            .iter()
            .map(|path| SteeringVectors::load(path))
            .collect::<Result<Vec<_>, _>>()?;
        let ablate_with: Vec<&SteeringVectors> = ablate.iter().collect();
        let mut alphas_per_file = Vec::new();
        for path in &self.steer {
            let vectors = SteeringVectors::load(path)?;
            let alphas = point_alphas(&vectors, self.alpha, &profile)
                .with_context(|| format!("strengths for {}", path.display()))?;
            let steering = Steering {
                vectors: &vectors,
                points: &points,
                alphas: &alphas,
                mode,
                positions: positions.clone(),
                ablate_with: &ablate_with,
            };
            add_steering(model, &mut hooks, &steering)
                .with_context(|| format!("{} does not fit this model", path.display()))?;
            alphas_per_file.push(points.iter().map(|&p| alphas[p]).collect::<Vec<_>>());
        }
        let description = serde_json::json!({
            "files": self.steer.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "points": points,
            "alpha": self.alpha,
            "alpha_profile": self.alpha_profile,
            "point_alphas": alphas_per_file,
            "mode": format!("{:?}", self.mode).to_lowercase(),
            "positions": format!("{:?}", self.positions).to_lowercase(),
            "ablate": self.ablate.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "gate": self.gate.as_ref().map(|p| p.display().to_string()),
        });
        Ok((hooks, Some(description)))
    }
}
