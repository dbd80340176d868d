//! `--recipe` or `--steer`: vectors added to (or projected out of) the residual stream while
//! generating. The hand flags build the same [`Recipe`] a recipe file holds, so both apply
//! steering one way.
//!
//! Sign convention: a vector points from compliance to refusal (refusal mean minus compliance
//! mean), so a negative `--alpha` removes refusals and a positive one induces them.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use refusal_steer_engine::Model;
use refusal_steer_pipeline::gate::Gate;
use refusal_steer_pipeline::recipe::{ModelIdentity, Provenance, Recipe};
use refusal_steer_pipeline::steering::{
    parse_points, point_alphas, AlphaProfile, SteerMode, SteerPositions, Steering,
};
use refusal_steer_steer::SteeringVectors;
use std::path::PathBuf;

#[derive(Args, Clone)]
pub struct SteerArgs {
    /// A steering recipe (`recommended.steer.safetensors` or `recipes/*.steer.safetensors`
    /// from `run`): vectors, points, strengths, ablation and gate in one file, for the model it
    /// was made on. The flags below build the same thing by hand.
    #[arg(long, conflicts_with_all = ["steer", "layers", "alpha", "alpha_profile", "mode", "positions"])]
    recipe: Option<PathBuf>,
    /// Multiplies every strength of the recipe (1 as made; 0 leaves only its ablation).
    #[arg(
        long,
        requires = "recipe",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    recipe_scale: f32,
    /// A steering-vector file (safetensors from `fit`).
    #[arg(long)]
    steer: Option<PathBuf>,
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
    /// together with --steer's (the span of all of them is removed at each point).
    #[arg(long, requires = "steer")]
    ablate: Vec<PathBuf>,
    /// A topic gate (vectors/gate.json of a run): only prompts it lets through are steered;
    /// the others are answered unsteered.
    #[arg(long, requires = "steer")]
    gate: Option<PathBuf>,
    /// Write the steering these flags describe as a recipe file (for `--recipe`).
    #[arg(long, requires = "steer")]
    save_recipe: Option<PathBuf>,
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
    /// The steering asked for (None: unsteered), checked against `model`, and a description
    /// of it for the output records.
    pub fn recipe(&self, model: &Model) -> Result<Option<(Recipe, serde_json::Value)>> {
        if let Some(path) = &self.recipe {
            let recipe = Recipe::load(path)?;
            recipe
                .check_model(model)
                .with_context(|| format!("{} does not fit this model", path.display()))?;
            let recipe = recipe.scaled(self.recipe_scale);
            let mut description = recipe.describe();
            description["recipe"] = path.display().to_string().into();
            description["scale"] = self.recipe_scale.into();
            return Ok(Some((recipe, description)));
        }
        let Some(path) = &self.steer else {
            return Ok(None);
        };
        let points = parse_points(&self.layers, model.config.n_layers)?;
        let mode = match self.mode {
            ModeArg::Add => SteerMode::Add,
            ModeArg::Ablate => SteerMode::Ablate,
            ModeArg::AblateAdd => SteerMode::AblateAdd,
        };
        if !self.ablate.is_empty() && mode == SteerMode::Add {
            anyhow::bail!("--ablate needs --mode ablate or ablate-add");
        }
        let ablate = self
            .ablate
            .iter()
            .map(|path| SteeringVectors::load(path))
            .collect::<Result<Vec<_>, _>>()?;
        let vectors = SteeringVectors::load(path)?;
        let alphas = point_alphas(&vectors, self.alpha, &profile(&self.alpha_profile)?)
            .with_context(|| format!("strengths for {}", path.display()))?;
        let gate = self
            .gate
            .as_ref()
            .map(|path| Gate::load(path, model))
            .transpose()?;
        let description = serde_json::json!({
            "files": [path.display().to_string()],
            "points": points,
            "alpha": self.alpha,
            "alpha_profile": self.alpha_profile,
            "mode": format!("{:?}", self.mode).to_lowercase(),
            "positions": format!("{:?}", self.positions).to_lowercase(),
            "ablate": self.ablate.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "gate": self.gate.as_ref().map(|p| p.display().to_string()),
        });
        let steering = Steering {
            vectors: &vectors,
            points: &points,
            alphas: &alphas,
            mode,
            positions: match self.positions {
                PositionsArg::All => SteerPositions::All,
                PositionsArg::Prompt => SteerPositions::Prompt,
                PositionsArg::Generated => SteerPositions::Generated,
            },
            ablate_with: &ablate.iter().collect::<Vec<_>>(),
        };
        let made_by = Provenance {
            method: "flags".into(),
            source: description.to_string(),
            ..Default::default()
        };
        let recipe = Recipe::from_steering(
            &ModelIdentity::of(model)?,
            &steering,
            gate.as_ref(),
            made_by,
        )
        .with_context(|| format!("{} does not fit this model", path.display()))?;
        if let Some(out) = &self.save_recipe {
            recipe.save(out)?;
            eprintln!("wrote the recipe {}", out.display());
        }
        let mut description = description;
        description["point_alphas"] = recipe.describe()["alphas"].clone();
        Ok(Some((recipe, description)))
    }
}
