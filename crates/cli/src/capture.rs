//! `refusal-steer capture`: the residual stream at every point for each prompt, formatted
//! with the same chat template generation uses, written to an activations file.

use crate::generate::FormatArgs;
use crate::ModelArg;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use refusal_steer_data::activations::{ActivationsHeader, ActivationsWriter};
use refusal_steer_data::read_prompts;
use refusal_steer_engine::{prefill, Action, Intervention, Padding, Positions, Rows};
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

#[derive(Args)]
pub struct CaptureArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Prompt files (JSONL); a prompt's set is its "set" field, else its file's name.
    #[arg(long, required = true, num_args = 1..)]
    prompts: Vec<PathBuf>,
    /// Output activations file (safetensors `[prompts, points, d]`); rerun to resume.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = Position::LastPrompt)]
    position: Position,
    #[command(flatten)]
    format: FormatArgs,
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Position {
    /// The last token of the formatted prompt (after the assistant header): where the model
    /// decides how to answer.
    LastPrompt,
    /// The mean over all prompt tokens.
    MeanPrompt,
}

pub fn run(args: CaptureArgs) -> Result<()> {
    if args.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let mut prompts = Vec::new();
    let mut seen = HashSet::new();
    for path in &args.prompts {
        let set = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        for mut p in read_prompts(path)? {
            if !seen.insert(p.id.clone()) {
                bail!(
                    "prompt id \"{}\" appears twice across the prompt files; ids must be unique",
                    p.id
                );
            }
            p.set = p.set.or_else(|| set.clone());
            prompts.push(p);
        }
    }
    let model = args.model.load()?;
    let (n_points, d) = (model.config.n_layers + 1, model.config.d_model);
    let sha = refusal_steer_catalog::sha256_file(&model.path)
        .with_context(|| format!("hashing {}", model.path.display()))?;
    let header = ActivationsHeader {
        n_points,
        d,
        ids: prompts.iter().map(|p| p.id.clone()).collect(),
        sets: prompts.iter().map(|p| p.set.clone()).collect(),
        metadata: BTreeMap::from([
            ("model".into(), model.path.display().to_string()),
            ("model_sha256".into(), sha),
            ("position".into(), format!("{:?}", args.position)),
            ("format".into(), args.format.describe()),
            (
                "points".into(),
                "0 = embeddings, p = output of block p-1".into(),
            ),
        ]),
    };
    let mut writer = ActivationsWriter::open(&args.out, header)?;
    let start = writer.rows_done();
    if start == prompts.len() {
        eprintln!(
            "{} is complete ({} prompts)",
            args.out.display(),
            prompts.len()
        );
        return Ok(());
    }
    let progress = ProgressBar::new(prompts.len() as u64);
    progress.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} prompts  {elapsed} elapsed, ETA {eta}",
    )?);
    progress.set_position(start as u64);
    let positions = match args.position {
        Position::LastPrompt => Positions::LastPrompt,
        Position::MeanPrompt => Positions::Prompt,
    };
    for batch in prompts[start..].chunks(args.batch) {
        let tokens: Vec<Vec<u32>> = batch
            .iter()
            .map(|p| args.format.encode(&model, &p.prompt))
            .collect::<Result<_>>()?;
        let mut hooks = model.new_hooks();
        for point in 0..n_points {
            hooks.add(Intervention {
                point,
                action: Action::Capture,
                rows: Rows::All,
                positions: positions.clone(),
            })?;
        }
        let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
        prefill(&model, &refs, Padding::Left, 0, &mut hooks)?;
        // Sum what was captured per (row, point); the mean divides by the count.
        let mut sums = vec![vec![0f64; n_points * d]; batch.len()];
        let mut counts = vec![vec![0usize; n_points]; batch.len()];
        for c in hooks.take_captured() {
            let sum = &mut sums[c.row][c.point * d..(c.point + 1) * d];
            for (s, v) in sum.iter_mut().zip(&c.values) {
                *s += *v as f64;
            }
            counts[c.row][c.point] += 1;
        }
        for (row, sum) in sums.iter().enumerate() {
            let mean: Vec<f32> = sum
                .iter()
                .enumerate()
                .map(|(i, s)| (*s / counts[row][i / d].max(1) as f64) as f32)
                .collect();
            writer.push_row(&mean)?;
            progress.inc(1);
        }
    }
    progress.finish();
    Ok(())
}
