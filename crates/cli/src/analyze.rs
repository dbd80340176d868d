//! `refusal-steer analyze`: per point, the held-out separability, norm, angles and
//! dimensionality of a vector file, written as `analysis.json`, `analysis.md` and SVG charts.

use crate::fit::read_labels;
use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use refusal_steer_data::activations::Activations;
use refusal_steer_pipeline::analysis_report::write_report;
use refusal_steer_steer::analysis::{analyze_with_progress, AnalysisOptions};
use refusal_steer_steer::SteeringVectors;
use std::path::PathBuf;

#[derive(Args)]
pub struct AnalyzeArgs {
    /// Activations from `capture`.
    #[arg(long)]
    acts: PathBuf,
    /// JSONL with, per prompt id, a judge score {"id", "c"} or a label {"id", "label"}, as for
    /// `fit --labels`. Prompts without one are left out.
    #[arg(long, alias = "labels")]
    scores: PathBuf,
    /// The vector file to analyse; its held-out folds are refit with its own method.
    #[arg(long)]
    vectors: PathBuf,
    /// A second vector file to compare with, point by point: another method, or a protected
    /// direction (how much of the first survives projecting it out).
    #[arg(long)]
    compare: Option<PathBuf>,
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// |c| at or below this is neither class.
    #[arg(long, default_value_t = 0.1)]
    threshold: f64,
    /// Folder for analysis.json, analysis.md and the charts.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: AnalyzeArgs) -> Result<()> {
    let acts = Activations::load(&args.acts)?;
    let scores = read_labels(&args.scores)?;
    let vectors = SteeringVectors::load(&args.vectors)?;
    let compare = args
        .compare
        .as_deref()
        .map(SteeringVectors::load)
        .transpose()?;
    let options = AnalysisOptions {
        folds: args.folds,
        seed: args.seed,
        threshold: args.threshold,
    };
    let progress = ProgressBar::new(acts.header.n_points as u64);
    progress.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} points  {elapsed} elapsed, ETA {eta}",
    )?);
    let analysis = analyze_with_progress(
        &acts,
        &scores,
        &vectors,
        compare.as_ref(),
        &options,
        &mut |_| progress.inc(1),
    )
    .with_context(|| format!("analysing {}", args.vectors.display()))?;
    progress.finish_and_clear();
    let written = write_report(&analysis, &args.out)?;
    for p in &analysis.points {
        eprintln!(
            "point {:>3}: held-out AUC {}  norm {:>10.4}",
            p.point,
            p.heldout_auc.map_or("  –  ".into(), |a| format!("{a:.3}")),
            p.norm
        );
    }
    println!(
        "best points {:?}; wrote {}",
        analysis.best_points,
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
