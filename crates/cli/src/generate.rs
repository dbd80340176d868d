//! `refusal-steer generate`: answers for a prompt file (or one prompt), batched and resumable.

use crate::steering::SteerArgs;
use crate::ModelArg;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use refusal_steer_data::lock::OutputLock;
use refusal_steer_data::{read_prompts, Prompt};
use refusal_steer_engine::{GenerateOptions, Model, Padding, Sampling, ThinkingBudget};
use refusal_steer_pipeline::answers::Format;
use refusal_steer_pipeline::generator::Generator;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    /// JSONL file with one {"id", "prompt"} object per line.
    #[arg(long, conflicts_with = "prompt", required_unless_present = "prompt")]
    prompts: Option<PathBuf>,
    /// A single prompt (its answer is printed unless --out is given).
    #[arg(long)]
    prompt: Option<String>,
    /// Output JSONL; rerunning with the same file skips finished (id, sample) pairs.
    #[arg(long, required_unless_present = "prompt")]
    out: Option<PathBuf>,
    #[command(flatten)]
    pub decoding: DecodingArgs,
    /// Answers per prompt.
    #[arg(long, default_value_t = 1)]
    samples: usize,
    /// Answers generated at once (continuous batching: a finished one's row goes to the next).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[command(flatten)]
    steering: SteerArgs,
}

/// How a prompt becomes the model's input text.
#[derive(Args, Clone)]
pub struct FormatArgs {
    /// System message (the model's template decides where it goes).
    #[arg(long)]
    pub system: Option<String>,
    /// Send the prompt as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
}

impl FormatArgs {
    pub fn format(&self) -> Format {
        Format {
            system: self.system.clone(),
            raw: self.raw,
        }
    }
}

#[derive(Args, Clone)]
pub struct DecodingArgs {
    #[command(flatten)]
    pub format: FormatArgs,
    /// The answer's budget (after the reasoning, for a reasoning model).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// For reasoning models (`<think>` … `</think>`): past this many tokens of reasoning,
    /// `</think>` is written in and the answer gets its own --max-tokens. Unset: no limit but
    /// --max-tokens, reasoning included.
    #[arg(long)]
    pub max_thinking_tokens: Option<usize>,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Above 1, makes tokens the answer already holds less likely (1 is off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl DecodingArgs {
    /// The options for `model` (the thinking budget needs its vocabulary).
    pub fn options(&self, model: &Model) -> Result<GenerateOptions> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if self.temperature < 0.0 || !self.temperature.is_finite() {
            bail!(
                "--temperature must be 0 (greedy) or positive, got {}",
                self.temperature
            );
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            bail!(
                "--repetition-penalty must be positive (1 is off), got {}",
                self.repetition_penalty
            );
        }
        Ok(GenerateOptions {
            max_new_tokens: self.max_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                repetition_penalty: self.repetition_penalty,
            },
            padding: Padding::Left,
            thinking: self
                .max_thinking_tokens
                .map(|n| ThinkingBudget::new(model, n))
                .transpose()
                .context("--max-thinking-tokens")?,
        })
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    let prompts = match (&args.prompts, &args.prompt) {
        (Some(path), _) => read_prompts(path)?,
        (None, Some(p)) => vec![Prompt {
            id: "prompt".into(),
            prompt: p.clone(),
            set: None,
        }],
        (None, None) => bail!("give --prompts FILE or --prompt TEXT"),
    };
    if args.samples == 0 || args.batch == 0 {
        bail!("--samples and --batch must be at least 1");
    }
    // Two processes appending to one file would duplicate its answers.
    let _lock = args.out.as_deref().map(OutputLock::acquire).transpose()?;
    let model = args.model.load()?;
    let options = args.decoding.options(&model)?;
    let recipe = args.steering.recipe(&model)?;
    let generator = Generator {
        recipe: recipe.as_ref().map(|(recipe, _)| recipe),
        format: args.decoding.format.format(),
        options,
        batch: args.batch,
        seed: args.decoding.seed,
        description: recipe.as_ref().map(|(_, description)| description.clone()),
        ..Generator::new(&model)
    };
    let progress = match &args.out {
        Some(_) => {
            let bar = ProgressBar::new(0);
            bar.set_style(ProgressStyle::with_template(
                "{bar:40} {pos}/{len} answers  {elapsed} elapsed, ETA {eta}  {msg}",
            )?);
            bar
        }
        None => ProgressBar::hidden(),
    };
    let mut printed: HashMap<String, Vec<String>> = HashMap::new();
    let mut in_file = 0;
    match &args.out {
        Some(path) => {
            in_file = generator
                .answer_to_file(&prompts, args.samples, path, &progress)?
                .len()
        }
        None => generator.answer_each(
            &prompts,
            args.samples,
            &HashSet::new(),
            &progress,
            &mut |a| {
                printed.entry(a.id).or_default().push(a.answer);
                Ok(())
            },
        )?,
    }
    progress.finish_and_clear();
    match &args.out {
        Some(path) => eprintln!("{in_file} answers in {}", path.display()),
        None => {
            for p in &prompts {
                for answer in printed.remove(&p.id).unwrap_or_default() {
                    println!("{answer}");
                }
            }
        }
    }
    Ok(())
}
