//! `refusal-steer export` / `import`: steering vectors to and from llama.cpp control vectors.
//!
//! llama.cpp adds `direction.N` to the output of block N, which is our point N + 1; block 0's
//! output (our point 1) and the embeddings (point 0) cannot be steered there, and asking for
//! them is an error that names the point.

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_steer_pipeline::recipe::Recipe;
use refusal_steer_pipeline::steering::{format_points, parse_points};
use refusal_steer_steer::{export_control_vector, import_control_vector, SteeringVectors};
use std::path::PathBuf;

#[derive(Args)]
pub struct ExportArgs {
    /// Steering vectors from `fit` (with --alpha and --layers).
    #[arg(long, required_unless_present = "recipe", conflicts_with = "recipe")]
    vectors: Option<PathBuf>,
    /// Scale written into the file (llama.cpp's --control-vector-scaled can rescale it).
    #[arg(
        long,
        allow_negative_numbers = true,
        required_unless_present = "recipe"
    )]
    alpha: Option<f32>,
    /// Points to export: "12-20", "5,7,9" or "all" (point 1 cannot be represented).
    #[arg(long, default_value = "all", conflicts_with = "recipe")]
    layers: String,
    /// A recipe: its added vectors at their strengths are exported; what llama.cpp cannot
    /// carry (the topic gate, ablation) is named, not silently dropped.
    #[arg(long, conflicts_with = "alpha")]
    recipe: Option<PathBuf>,
    /// Multiplies every strength of the recipe.
    #[arg(
        long,
        requires = "recipe",
        default_value_t = 1.0,
        allow_negative_numbers = true
    )]
    recipe_scale: f32,
    /// Only llama-cpp is supported.
    #[arg(long, default_value = "llama-cpp", value_parser = ["llama-cpp"])]
    format: String,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
pub struct ImportArgs {
    /// A control-vector GGUF (ours, repeng's or llama.cpp cvector-generator's).
    #[arg(long)]
    control_vector: PathBuf,
    /// Blocks in the target model (the file does not say).
    #[arg(long)]
    n_layers: usize,
    #[arg(long)]
    out: PathBuf,
}

pub fn export(args: ExportArgs) -> Result<()> {
    let (vectors, alpha, points, source) = match (&args.recipe, &args.vectors, args.alpha) {
        (Some(path), _, _) => {
            let recipe = Recipe::load(path)?.scaled(args.recipe_scale);
            let (vectors, points) = added_part(&recipe)?;
            if let Some(gate) = &recipe.gate {
                eprintln!(
                    "llama.cpp cannot carry this recipe's topic gate (points {:?}): it steers every prompt",
                    gate.points
                );
            }
            if !recipe.ablate.is_empty() {
                eprintln!(
                    "llama.cpp cannot carry this recipe's ablation ({} directions at points {}): only the added vectors are exported",
                    recipe.ablate.len(),
                    format_points(&recipe.points())
                );
            }
            (vectors, 1.0, points, path)
        }
        (None, Some(path), Some(alpha)) => {
            let vectors = SteeringVectors::load(path)?;
            let points = parse_points(&args.layers, vectors.n_points - 1)?;
            (vectors, alpha, points, path)
        }
        _ => bail!("give --recipe FILE, or --vectors FILE with --alpha"),
    };
    let hint = vectors.metadata.get("model").cloned().unwrap_or_default();
    export_control_vector(&args.out, &vectors, alpha, &points, &hint).with_context(|| {
        format!(
            "exporting {} as a llama.cpp control vector",
            source.display()
        )
    })?;
    println!(
        "wrote {} (our points {points:?} as llama.cpp direction.{{point-1}})",
        args.out.display()
    );
    Ok(())
}

/// The recipe's added vectors at their strengths, one row per point (summed where a point has
/// several), and the points that have any.
fn added_part(recipe: &Recipe) -> Result<(SteeringVectors, Vec<usize>)> {
    let (n_points, d) = (recipe.model.n_points, recipe.model.d);
    let mut rows = vec![0f32; n_points * d];
    for a in &recipe.add {
        let row = &mut rows[a.point * d..(a.point + 1) * d];
        row.iter_mut()
            .zip(&a.vector)
            .for_each(|(r, &v)| *r += a.strength * v);
    }
    let mut points: Vec<usize> = recipe.add.iter().map(|a| a.point).collect();
    points.sort_unstable();
    points.dedup();
    if points.is_empty() {
        bail!("this recipe adds no vector (it only ablates): there is nothing llama.cpp can carry");
    }
    let metadata = [("model".to_string(), recipe.model.name.clone())].into();
    Ok((SteeringVectors::new(rows, n_points, d, metadata)?, points))
}

pub fn import(args: ImportArgs) -> Result<()> {
    let cv = import_control_vector(&args.control_vector)?;
    cv.to_steering_vectors(args.n_layers + 1)?.save(&args.out)?;
    println!(
        "wrote {} (points {:?})",
        args.out.display(),
        cv.directions.keys().collect::<Vec<_>>()
    );
    Ok(())
}
