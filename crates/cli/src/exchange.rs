//! `refusal-steer export` / `import`: steering vectors to and from llama.cpp control vectors.
//!
//! llama.cpp adds `direction.N` to the output of block N, which is our point N + 1; block 0's
//! output (our point 1) and the embeddings (point 0) cannot be steered there, and asking for
//! them is an error that names the point.

use anyhow::{Context, Result};
use clap::Args;
use refusal_steer_pipeline::steering::parse_points;
use refusal_steer_steer::{export_control_vector, import_control_vector, SteeringVectors};
use std::path::PathBuf;

#[derive(Args)]
pub struct ExportArgs {
    #[arg(long)]
    vectors: PathBuf,
    /// Scale written into the file (llama.cpp's --control-vector-scaled can rescale it).
    #[arg(long, allow_negative_numbers = true)]
    alpha: f32,
    /// Points to export: "12-20", "5,7,9" or "all" (point 1 cannot be represented).
    #[arg(long, default_value = "all")]
    layers: String,
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
    let vectors = SteeringVectors::load(&args.vectors)?;
    let points = parse_points(&args.layers, vectors.n_points - 1)?;
    let hint = vectors.metadata.get("model").cloned().unwrap_or_default();
    export_control_vector(&args.out, &vectors, args.alpha, &points, &hint).with_context(|| {
        format!(
            "exporting {} as a llama.cpp control vector",
            args.vectors.display()
        )
    })?;
    println!(
        "wrote {} (our points {points:?} as llama.cpp direction.{{point-1}})",
        args.out.display()
    );
    Ok(())
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
