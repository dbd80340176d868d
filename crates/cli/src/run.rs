//! `refusal-steer run`: the whole method in one command (see the pipeline crate's `run`).

use crate::judge::JudgeSetup;
use crate::load_model;
use anyhow::Result;
use clap::Args;
use refusal_steer_judge::{MarkerSet, PatternJudge};
use refusal_steer_pipeline::config::{Direction, RunConfig};
use refusal_steer_pipeline::report::table;
use refusal_steer_pipeline::run::{RunFolder, Runner};
use std::path::PathBuf;

#[derive(Args)]
pub struct RunArgs {
    /// Run config (TOML); default: configs/default.toml, built in.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The model to steer (overrides the config's).
    #[arg(long)]
    model: Option<String>,
    /// Reasoning on or off, for models whose chat template has the switch (overrides the
    /// config's `thinking`).
    #[arg(long, value_parser = crate::on_off)]
    thinking: Option<bool>,
    /// Induce refusals on the target set instead of removing them (positive strengths; the
    /// vector learns refusal from every train set). See configs/induce.toml.
    #[arg(long)]
    induce: bool,
    /// The run folder; rerun with the same folder to continue a stopped run.
    #[arg(long, default_value = "runs/default")]
    out: PathBuf,
    #[command(flatten)]
    judge: JudgeSetup,
}

pub fn run(args: RunArgs) -> Result<()> {
    let mut config = match &args.config {
        Some(path) => RunConfig::load(path)?,
        None => RunConfig::default_config(),
    };
    if args.induce {
        config.direction = Direction::Induce;
    }
    if args.thinking.is_some() {
        config.thinking = args.thinking;
    }
    if let Some(model) = &args.model {
        config.model = model.clone();
    }
    let (spec, mut judge) = args
        .judge
        .build_for_run(&config.judge, config.judge_threshold)?;
    config.judge = spec;
    let folder = RunFolder::create(&args.out)?;
    let model = load_model(&config.model, config.thinking)?;
    let mut patterns = PatternJudge::new(MarkerSet::built_in("refusal-direction+zh")?);
    eprintln!(
        "run folder {} (rerun the same command to continue after a stop)",
        args.out.display()
    );
    let report = Runner {
        config: &config,
        folder: &folder,
        model: &model,
        judge: judge.as_mut(),
        patterns: &mut patterns,
        log: &mut |msg| eprintln!("{msg}"),
    }
    .run()?;
    println!("{}", table(&report));
    println!("report: {}", args.out.join("report.md").display());
    Ok(())
}
