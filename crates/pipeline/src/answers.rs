//! Answering prompts: chat formatting, batched generation, resumable JSONL output.

use crate::gate::Decision;
use anyhow::{Context, Result};
use indicatif::ProgressBar;
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_engine::{
    Batcher, GenerateOptions, Interventions, Model, Sequence, SharedPrefix,
};
use std::collections::{HashMap, HashSet};

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
    /// Answers of the unsteered model to these prompts with the same format, options and seed
    /// (a run's baseline). A prompt the gate keeps out takes its answer from here instead of
    /// being generated again: batch invariance makes the two the same, to the bit.
    pub unsteered: Option<&'a [Answer]>,
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
    let unsteered: HashMap<(&str, usize), &Answer> = job
        .unsteered
        .unwrap_or_default()
        .iter()
        .map(|a| ((a.id.as_str(), a.sample), a))
        .collect();
    let mut queue = Vec::new();
    for (i, p) in job.prompts.iter().enumerate() {
        let tokens = job
            .format
            .encode(model, &p.prompt)
            .with_context(|| format!("formatting prompt {}", p.id))?;
        for sample in 0..job.samples {
            if done.contains(&(p.id.clone(), sample)) {
                continue;
            }
            let kept_out = job.steering.as_ref().filter(|s| !s.steers(i));
            let known = unsteered
                .get(&(p.id.as_str(), sample))
                .filter(|a| a.prompt == p.prompt);
            if let (Some(s), Some(&known)) = (kept_out, known) {
                sink(Answer {
                    set: p.set.clone(),
                    steering: Some(s.record(i)),
                    ..known.clone()
                })?;
                continue;
            }
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
    use refusal_steer_engine::{tiny, Action, Intervention, Padding, Positions, Rows, Sampling};
    use std::sync::Arc;

    #[test]
    fn prompts_the_gate_keeps_out_are_copied_from_the_unsteered_answers() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let (_dir, model) = crate::testing::tiny_model();
        let prompts: Vec<Prompt> = ["one two", "three", "four five six"]
            .iter()
            .enumerate()
            .map(|(i, p)| Prompt {
                id: format!("p{i}"),
                prompt: p.to_string(),
                set: Some("s".into()),
            })
            .collect();
        let options = GenerateOptions {
            max_new_tokens: 6,
            sampling: Sampling {
                temperature: 0.8,
                top_p: 1.0,
                top_k: 0,
                repetition_penalty: 1.0,
            },
            padding: Padding::Left,
            thinking: None,
        };
        let run = |steering: Option<JobSteering>, unsteered: Option<&[Answer]>| {
            let format = Format::default();
            let opening = format.shared_prefix(&model).unwrap();
            let job = AnswerJob {
                prompts: &prompts,
                format: &format,
                options: &options,
                samples: 2,
                batch: 3,
                seed: 7,
                steering,
                opening: opening.as_ref(),
                unsteered,
            };
            let mut out = Vec::new();
            answer(
                &model,
                &job,
                &HashSet::new(),
                &ProgressBar::hidden(),
                &mut |a| {
                    out.push(a);
                    Ok(())
                },
            )
            .unwrap();
            out.sort_by(|a, b| (&a.id, a.sample).cmp(&(&b.id, b.sample)));
            out
        };
        let decision = |gated_in| Decision {
            gated_in,
            topic: if gated_in { 1.0 } else { -1.0 },
            harm: None,
        };
        let steering = || JobSteering {
            interventions: Arc::from(vec![Intervention {
                point: 2,
                action: Action::Add {
                    vector: vec![1.0; tiny::D_MODEL],
                    alpha: 4.0,
                },
                rows: Rows::All,
                positions: Positions::All,
            }]),
            gate: Some(vec![decision(false), decision(true), decision(false)]),
            description: serde_json::json!({"method": "test"}),
        };
        let baseline = run(None, None);
        let generated = run(Some(steering()), None);
        // Generated anew, a kept-out prompt's answers are the unsteered ones to the bit: what
        // makes copying them right.
        for (g, b) in generated.iter().zip(&baseline) {
            if g.id != "p1" {
                assert_eq!((&g.answer, g.mean_logprob), (&b.answer, b.mean_logprob));
            }
        }
        // With the unsteered answers given, kept-out prompts are copied from them (a planted
        // text shows it), marked as kept out; the prompt the gate lets in is generated.
        let mut planted = baseline.clone();
        planted[4].answer = "copied".into();
        let copied = run(Some(steering()), Some(&planted));
        for (c, g) in copied.iter().zip(&generated) {
            assert_eq!(c.steering, g.steering, "{} {}", c.id, c.sample);
            let want = if (c.id.as_str(), c.sample) == ("p2", 0) {
                "copied"
            } else {
                g.answer.as_str()
            };
            assert_eq!(c.answer, want, "{} {}", c.id, c.sample);
        }
        assert_eq!(copied[0].steering.as_ref().unwrap()["gated_in"], false);
    }

    #[test]
    fn answer_seeds_differ_by_id_and_sample_and_repeat() {
        assert_eq!(answer_seed(1, "a", 0), answer_seed(1, "a", 0));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(1, "a", 1));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(1, "a", 0x100));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(1, "b", 0));
        assert_ne!(answer_seed(1, "a", 0), answer_seed(2, "a", 0));
    }
}
