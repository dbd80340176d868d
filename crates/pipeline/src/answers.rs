//! Answering prompts: chat formatting, batched generation, resumable JSONL output.

use crate::gate::Decision;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_engine::{
    Batcher, GenerateOptions, Interventions, Model, Sequence, SharedPrefix,
};
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
    /// Sequences generated at once.
    pub batch: usize,
    pub seed: u64,
    pub steering: Option<JobSteering>,
    /// The chat opening ([`Format::shared_prefix`]) every row copies; none for raw prompts.
    pub opening: Option<&'a SharedPrefix>,
}

/// Steering for some of a job's prompts.
pub struct JobSteering {
    pub interventions: Interventions,
    /// Per prompt, what a topic gate made of it (those it does not let in are not steered);
    /// `None`: every prompt is steered.
    pub gate: Option<Vec<Decision>>,
    /// Recorded with each answer, with the gate's decision where there is a gate.
    pub description: serde_json::Value,
}

impl JobSteering {
    fn steers(&self, prompt: usize) -> bool {
        self.gate.as_ref().is_none_or(|g| g[prompt].gated_in)
    }

    /// The answer record's `steering`: the description, and under a gate `gated_in` and the
    /// gate's scores (a prompt the gate keeps out is answered unsteered, and says so).
    fn record(&self, prompt: usize) -> serde_json::Value {
        let mut record = self.description.clone();
        if let (Some(gate), Some(fields)) = (&self.gate, record.as_object_mut()) {
            let decision = gate[prompt];
            fields.insert("gated_in".into(), decision.gated_in.into());
            fields.insert("gate".into(), serde_json::json!(decision));
        }
        record
    }
}

/// Generates the answers of `job` that `done` (id, sample) does not hold yet, handing each
/// to `sink` as soon as it is finished. Up to `job.batch` sequences run at once; a finished
/// one's place goes to the next waiting prompt at the next step.
pub fn answer(
    model: &Model,
    job: &AnswerJob,
    done: &HashSet<(String, usize)>,
    progress: &ProgressBar,
    sink: &mut dyn FnMut(Answer) -> Result<()>,
) -> Result<()> {
    anyhow::ensure!(
        job.samples > 0 && job.batch > 0,
        "samples and batch must be at least 1"
    );
    if let Some(gate) = job.steering.as_ref().and_then(|s| s.gate.as_ref()) {
        anyhow::ensure!(
            gate.len() == job.prompts.len(),
            "{} gate decisions for {} prompts",
            gate.len(),
            job.prompts.len()
        );
    }
    let steered = |i: usize| job.steering.as_ref().filter(|s| s.steers(i));
    let mut queue = Vec::new();
    for (i, p) in job.prompts.iter().enumerate() {
        let tokens = job
            .format
            .encode(model, &p.prompt)
            .with_context(|| format!("formatting prompt {}", p.id))?;
        for sample in 0..job.samples {
            if !done.contains(&(p.id.clone(), sample)) {
                let sequence = Sequence {
                    prompt: tokens.clone(),
                    seed: answer_seed(job.seed, &p.id, sample),
                    sampling: job.options.sampling,
                    max_new_tokens: job.options.max_new_tokens,
                    steering: steered(i).map(|s| s.interventions.clone()),
                    thinking: job.options.thinking.clone(),
                    ignore_eos: false,
                };
                queue.push(((i, sample), sequence));
            }
        }
    }
    progress.set_length(queue.len() as u64);
    let mut batcher = Batcher::new(model).with_shared_prefix(job.opening);
    batcher.run_queue(
        queue,
        job.batch,
        job.options.padding,
        &mut |(i, sample), out| {
            let p = &job.prompts[i];
            sink(Answer {
                id: p.id.clone(),
                sample,
                set: p.set.clone(),
                prompt: p.prompt.clone(),
                answer: model.tokenizer.decode(&out.tokens, false)?,
                n_tokens: out.tokens.len(),
                mean_logprob: out.mean_logprob(),
                finish_reason: out.finish.as_str().to_string(),
                steering: job.steering.as_ref().map(|s| s.record(i)),
            })?;
            progress.inc(1);
            Ok(())
        },
    )
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
