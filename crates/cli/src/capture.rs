//! `refusal-steer capture`: the residual stream at every point for each prompt, formatted
//! with the same chat template generation uses, written to an activations file.

use crate::generate::FormatArgs;
use crate::ModelArg;
use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use refusal_steer_data::lock::OutputLock;
use refusal_steer_data::{read_prompts, Answer, JsonlAppender};
use refusal_steer_pipeline::capture::{capture, CaptureJob, CapturePosition};
use std::collections::HashSet;
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
    /// Answers from `generate` (needed by --position mean-answer; the first sample is used).
    #[arg(long)]
    answers: Option<PathBuf>,
    #[command(flatten)]
    format: FormatArgs,
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Position {
    /// The last token of the formatted prompt (after the assistant header).
    LastPrompt,
    /// The mean over all prompt tokens.
    MeanPrompt,
    /// The mean over the prompt's own tokens, after the chat template's shared opening.
    MeanUser,
    /// The mean over the answer's tokens, read after the prompt (needs --answers).
    MeanAnswer,
}

pub fn run(args: CaptureArgs) -> Result<()> {
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
    let answers = match &args.answers {
        Some(path) => Some(JsonlAppender::open::<Answer>(path)?.1),
        None => None,
    };
    let position = match args.position {
        Position::LastPrompt => CapturePosition::LastPrompt,
        Position::MeanPrompt => CapturePosition::MeanPrompt,
        Position::MeanUser => CapturePosition::MeanUser,
        Position::MeanAnswer => CapturePosition::MeanAnswer,
    };
    let _lock = OutputLock::acquire(&args.out)?;
    let model = args.model.load()?;
    let progress = ProgressBar::new(prompts.len() as u64);
    progress.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} prompts  {elapsed} elapsed, ETA {eta}",
    )?);
    let job = CaptureJob {
        prompts: &prompts,
        format: &args.format.format(),
        position,
        answers: answers.as_deref(),
        batch: args.batch,
    };
    capture(&model, &job, &args.out, &progress)?;
    progress.finish();
    Ok(())
}
