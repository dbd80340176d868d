//! `refusal-steer generate`: answers for a prompt file (or one prompt), batched and resumable.

use crate::steering::SteerArgs;
use crate::ModelArg;
use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use refusal_steer_data::{read_prompts, Answer, JsonlAppender, Prompt};
use refusal_steer_engine::{generate, GenerateOptions, Model, Padding, Request, Sampling};
use std::collections::HashSet;
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
    /// Prompts run together in one batch.
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
    /// The prompt's tokens as the model will see them: chat-formatted unless `--raw`.
    pub fn encode(&self, model: &Model, prompt: &str) -> Result<Vec<u32>> {
        let text = if self.raw {
            prompt.to_string()
        } else {
            model.template.prompt(self.system.as_deref(), prompt)?
        };
        Ok(encode_with_bos(model, &text))
    }

    /// How prompts were formatted, for the metadata of derived files.
    pub fn describe(&self) -> String {
        match (self.raw, &self.system) {
            (true, _) => "raw".into(),
            (false, None) => "chat".into(),
            (false, Some(s)) => format!("chat, system: {s}"),
        }
    }
}

#[derive(Args, Clone)]
pub struct DecodingArgs {
    #[command(flatten)]
    pub format: FormatArgs,
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl DecodingArgs {
    pub fn options(&self) -> Result<GenerateOptions> {
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {}", self.top_p);
        }
        if self.temperature < 0.0 || !self.temperature.is_finite() {
            bail!(
                "--temperature must be 0 (greedy) or positive, got {}",
                self.temperature
            );
        }
        Ok(GenerateOptions {
            max_new_tokens: self.max_tokens,
            sampling: Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
            },
            padding: Padding::Left,
        })
    }
}

/// Tokenizes a rendered prompt, adding BOS only when the template has not already written it.
pub fn encode_with_bos(model: &Model, text: &str) -> Vec<u32> {
    let t = &model.tokenizer;
    let has_bos = t
        .bos
        .and_then(|b| t.piece(b).ok())
        .is_some_and(|bos| text.starts_with(bos));
    t.encode(text, !has_bos, true)
}

/// FNV-1a over the run seed, prompt id and sample: each answer's own reproducible seed.
fn answer_seed(seed: u64, id: &str, sample: usize) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in seed
        .to_le_bytes()
        .iter()
        .chain(id.as_bytes())
        .chain(&(sample as u64).to_le_bytes())
    {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.samples == 0 || args.batch == 0 {
        bail!("--samples and --batch must be at least 1");
    }
    let options = args.decoding.options()?;
    let prompts = match (&args.prompts, &args.prompt) {
        (Some(path), _) => read_prompts(path)?,
        (None, Some(p)) => vec![Prompt {
            id: "prompt".into(),
            prompt: p.clone(),
            set: None,
        }],
        (None, None) => bail!("give --prompts FILE or --prompt TEXT"),
    };
    let (mut writer, done) = match &args.out {
        Some(path) => {
            let (w, old) = JsonlAppender::open::<Answer>(path)?;
            (
                Some(w),
                old.into_iter()
                    .map(|a| (a.id, a.sample))
                    .collect::<HashSet<_>>(),
            )
        }
        None => (None, HashSet::new()),
    };
    let model = args.model.load()?;
    // Steering hooks hold no per-batch state, so one set serves every batch.
    let (mut hooks, steering) = args.steering.hooks(&model)?;
    let mut jobs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let tokens = args
            .decoding
            .format
            .encode(&model, &p.prompt)
            .with_context(|| format!("formatting prompt {}", p.id))?;
        for sample in 0..args.samples {
            if !done.contains(&(p.id.clone(), sample)) {
                jobs.push((i, sample, tokens.clone()));
            }
        }
    }
    if jobs.is_empty() {
        eprintln!(
            "all {} answers are already in the output",
            prompts.len() * args.samples
        );
        return Ok(());
    }
    // Similar lengths together waste less work on padding.
    jobs.sort_by_key(|(_, _, tokens)| tokens.len());
    let progress = if writer.is_some() {
        ProgressBar::new(jobs.len() as u64)
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} answers  {elapsed} elapsed, ETA {eta}  {msg}",
    )?);
    for batch in jobs.chunks(args.batch) {
        let requests: Vec<Request> = batch
            .iter()
            .map(|(i, sample, tokens)| Request {
                prompt: tokens.clone(),
                seed: answer_seed(args.decoding.seed, &prompts[*i].id, *sample),
            })
            .collect();
        let outputs = generate(&model, &requests, &options, &mut hooks, &mut |_, _| {})?;
        for ((i, sample, _), out) in batch.iter().zip(outputs) {
            let p = &prompts[*i];
            let answer = Answer {
                id: p.id.clone(),
                sample: *sample,
                set: p.set.clone(),
                prompt: p.prompt.clone(),
                answer: model.tokenizer.decode(&out.tokens, false)?,
                n_tokens: out.tokens.len(),
                mean_logprob: out.mean_logprob(),
                finish_reason: out.finish.as_str().to_string(),
                steering: steering.clone(),
            };
            match &mut writer {
                Some(w) => w.append(&answer)?,
                None => println!("{}", answer.answer),
            }
            progress.inc(1);
        }
    }
    progress.finish_with_message("done");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_seeds_differ_by_id_and_sample_and_repeat() {
        assert_eq!(answer_seed(1, "a", 0), answer_seed(1, "a", 0));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(1, "a", 1));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(1, "b", 0));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(2, "a", 0));
    }
}
