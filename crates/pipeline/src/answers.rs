//! Answering prompts: chat formatting, batched generation, resumable JSONL output.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_engine::{generate, Flow, GenerateOptions, Hooks, Model, Request, SharedPrefix};
use std::collections::HashSet;

/// How a prompt becomes the model's input text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Format {
    /// System message (the model's template decides where it goes).
    pub system: Option<String>,
    /// Send the prompt as it is, without the chat template.
    pub raw: bool,
}

impl Format {
    /// The prompt's tokens as the model will see them: chat-formatted unless `raw`.
    pub fn encode(&self, model: &Model, prompt: &str) -> Result<Vec<u32>> {
        let text = if self.raw {
            prompt.to_string()
        } else {
            model.template.prompt(self.system.as_deref(), prompt)?
        };
        Ok(encode_with_bos(model, &text))
    }

    /// The opening every prompt formatted this way shares (the chat template's system turn
    /// and user header), run once for passes that reuse it.
    pub fn shared_prefix(&self, model: &Model) -> Result<Option<SharedPrefix>> {
        let (a, b) = (self.encode(model, "?")?, self.encode(model, "x")?);
        Ok(SharedPrefix::common(model, &a, &b)?)
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
pub fn answer_seed(seed: u64, id: &str, sample: usize) -> u64 {
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

/// What to generate and how.
pub struct AnswerJob<'a> {
    pub prompts: &'a [Prompt],
    pub format: &'a Format,
    pub options: &'a GenerateOptions,
    /// Answers per prompt.
    pub samples: usize,
    pub batch: usize,
    pub seed: u64,
    /// Recorded with each answer (the steering applied, if any).
    pub steering: Option<serde_json::Value>,
}

/// Generates the answers of `job` that `done` (id, sample) does not hold yet, handing each
/// to `sink` as soon as its batch finishes.
pub fn answer(
    model: &Model,
    job: &AnswerJob,
    done: &HashSet<(String, usize)>,
    hooks: &mut Hooks,
    progress: &ProgressBar,
    sink: &mut dyn FnMut(Answer) -> Result<()>,
) -> Result<()> {
    anyhow::ensure!(
        job.samples > 0 && job.batch > 0,
        "samples and batch must be at least 1"
    );
    let mut jobs = Vec::new();
    for (i, p) in job.prompts.iter().enumerate() {
        let tokens = job
            .format
            .encode(model, &p.prompt)
            .with_context(|| format!("formatting prompt {}", p.id))?;
        for sample in 0..job.samples {
            if !done.contains(&(p.id.clone(), sample)) {
                jobs.push((i, sample, tokens.clone()));
            }
        }
    }
    // Similar lengths together waste less work on padding.
    jobs.sort_by_key(|(_, _, tokens)| tokens.len());
    progress.set_length(jobs.len() as u64);
    for batch in jobs.chunks(job.batch) {
        let requests: Vec<Request> = batch
            .iter()
            .map(|(i, sample, tokens)| Request {
                prompt: tokens.clone(),
                seed: answer_seed(job.seed, &job.prompts[*i].id, *sample),
            })
            .collect();
        let outputs = generate(model, &requests, job.options, hooks, &mut |_| {
            Flow::Continue
        })?;
        for ((i, sample, _), out) in batch.iter().zip(outputs) {
            let p = &job.prompts[*i];
            sink(Answer {
                id: p.id.clone(),
                sample: *sample,
                set: p.set.clone(),
                prompt: p.prompt.clone(),
                answer: model.tokenizer.decode(&out.tokens, false)?,
                n_tokens: out.tokens.len(),
                mean_logprob: out.mean_logprob(),
                finish_reason: out.finish.as_str().to_string(),
                steering: job.steering.clone(),
            })?;
            progress.inc(1);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_seeds_differ_by_id_and_sample_and_repeat() {
        assert_eq!(answer_seed(1, "a", 0), answer_seed(1, "a", 0));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(1, "a", 1));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(1, "a", 0x100));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(1, "b", 0));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(2, "a", 0));
    }
}
