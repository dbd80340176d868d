//! Answering prompts under a recipe: the one call a library user needs.
//!
//! ```no_run
//! use refusal_steer_engine::Model;
//! use refusal_steer_pipeline::{Generator, Recipe};
//!
//! # fn main() -> anyhow::Result<()> {
//! let model = Model::load("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf".as_ref())?;
//! let recipe = Recipe::load("runs/default/recommended.steer.safetensors".as_ref())?;
//! let steered = Generator::new(&model).with_recipe(&recipe)?;
//! for answer in steered.answer(&["What happened in Beijing in June 1989?"])? {
//!     println!("{answer}");
//! }
//! # Ok(())
//! # }
//! ```
//!
//! A gated recipe steers only the prompts its gate lets through; the others are answered by
//! the unsteered model, in the same call.

use crate::answers::{answer, AnswerJob, Format, JobSteering};
use crate::recipe::Recipe;
use anyhow::Result;
use indicatif::ProgressBar;
use refusal_steer_data::{Answer, JsonlAppender, Prompt};
use refusal_steer_engine::{GenerateOptions, Model, Padding, Sampling};
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// A model, optionally steered by a recipe, and how it answers.
pub struct Generator<'a> {
    pub model: &'a Model,
    pub recipe: Option<&'a Recipe>,
    pub format: Format,
    pub options: GenerateOptions,
    /// Sequences generated at once.
    pub batch: usize,
    /// The seed each answer's own seed is derived from (with its prompt id and sample).
    pub seed: u64,
    /// Recorded with each steered answer; the recipe's own description unless set.
    pub description: Option<serde_json::Value>,
    /// The unsteered answers to the same prompts with the same format, options and seed: the
    /// prompts the recipe's gate keeps out are answered from here, not generated again
    /// ([`AnswerJob::unsteered`]).
    pub unsteered: Option<&'a [Answer]>,
}

impl<'a> Generator<'a> {
    /// Greedy answers of up to 256 tokens in the model's chat template, unsteered.
    pub fn new(model: &'a Model) -> Self {
        Self {
            model,
            recipe: None,
            format: Format::default(),
            options: GenerateOptions {
                max_new_tokens: 256,
                sampling: Sampling {
                    temperature: 0.0,
                    top_p: 1.0,
                    top_k: 0,
                    repetition_penalty: 1.0,
                },
                padding: Padding::Left,
                thinking: None,
            },
            batch: 8,
            seed: 0,
            description: None,
            unsteered: None,
        }
    }

    /// Steers with `recipe`, after checking it was made for this model.
    pub fn with_recipe(mut self, recipe: &'a Recipe) -> Result<Self> {
        recipe.check_model(self.model)?;
        self.recipe = Some(recipe);
        Ok(self)
    }

    /// One answer per prompt, in order.
    pub fn answer(&self, prompts: &[&str]) -> Result<Vec<String>> {
        let records: Vec<Prompt> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| Prompt {
                id: i.to_string(),
                prompt: p.to_string(),
                set: None,
            })
            .collect();
        let mut answers = vec![String::new(); prompts.len()];
        let progress = ProgressBar::hidden();
        self.answer_each(&records, 1, &HashSet::new(), &progress, &mut |a| {
            answers[a.id.parse::<usize>().expect("ids are indices")] = a.answer;
            Ok(())
        })?;
        Ok(answers)
    }

    /// `samples` answers per prompt, those `done` does not hold yet, each handed to `sink` as
    /// it is finished; the prompts the recipe steers and the others share the batch.
    pub fn answer_each(
        &self,
        prompts: &[Prompt],
        samples: usize,
        done: &HashSet<(String, usize)>,
        progress: &ProgressBar,
        sink: &mut dyn FnMut(Answer) -> Result<()>,
    ) -> Result<()> {
        let opening = self.format.shared_prefix(self.model)?;
        let steering = match self.recipe {
            Some(recipe) => {
                let texts: Vec<String> = prompts.iter().map(|p| p.prompt.clone()).collect();
                Some(JobSteering {
                    interventions: recipe.interventions(self.model)?,
                    gate: recipe.gate_decisions(
                        self.model,
                        &self.format,
                        opening.as_ref(),
                        &texts,
                        self.batch,
                    )?,
                    description: self
                        .description
                        .clone()
                        .unwrap_or_else(|| recipe.describe()),
                })
            }
            None => None,
        };
        let job = AnswerJob {
            prompts,
            format: &self.format,
            options: &self.options,
            samples,
            batch: self.batch,
            seed: self.seed,
            steering,
            opening: opening.as_ref().filter(|_| !self.format.raw),
            unsteered: self.unsteered,
        };
        answer(self.model, &job, done, progress, sink)
    }

    /// [`Generator::answer_each`] into a resumable JSONL file: answers already in `path` are
    /// kept and skipped, so a killed process loses at most the answers it was generating.
    /// Returns every answer in the file.
    pub fn answer_to_file(
        &self,
        prompts: &[Prompt],
        samples: usize,
        path: &Path,
        progress: &ProgressBar,
    ) -> Result<Vec<Answer>> {
        let mut all = self.answer_to_files(&[(prompts, path)], samples, progress)?;
        Ok(all.pop().expect("one group, one file"))
    }

    /// [`Generator::answer_to_file`] for several groups of prompts at once, each into its own
    /// file: the groups share the batch, so a row that finishes in one group makes room for
    /// the next prompt of any group. A prompt id may appear in one group only. Returns every
    /// answer in each file, in group order.
    pub fn answer_to_files(
        &self,
        groups: &[(&[Prompt], &Path)],
        samples: usize,
        progress: &ProgressBar,
    ) -> Result<Vec<Vec<Answer>>> {
        let mut group_of: HashMap<&str, usize> = HashMap::new();
        let mut prompts = Vec::new();
        let mut done = HashSet::new();
        let (mut writers, mut all) = (Vec::new(), Vec::new());
        for (g, (group, path)) in groups.iter().enumerate() {
            for p in *group {
                if let Some(other) = group_of.insert(&p.id, g).filter(|&other| other != g) {
                    anyhow::bail!(
                        "prompt id {} is in two groups ({} and {}): ids must be unique across \
                         the files answered together",
                        p.id,
                        groups[other].1.display(),
                        path.display()
                    );
                }
            }
            prompts.extend_from_slice(group);
            let (writer, answers) = JsonlAppender::open::<Answer>(path)?;
            // Only this group's answers count as done here (a stray line of another group's
            // prompt would otherwise keep that prompt from being answered in its own file).
            done.extend(
                answers
                    .iter()
                    .filter(|a| group_of.get(a.id.as_str()) == Some(&g))
                    .map(|a| (a.id.clone(), a.sample)),
            );
            writers.push(writer);
            all.push(answers);
        }
        self.answer_each(&prompts, samples, &done, progress, &mut |a| {
            let g = group_of[a.id.as_str()];
            writers[g].append(&a)?;
            all[g].push(a);
            Ok(())
        })?;
        Ok(all)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompts(set: &str, texts: &[&str]) -> Vec<Prompt> {
        texts
            .iter()
            .enumerate()
            .map(|(i, p)| Prompt {
                id: format!("{set}/{i}"),
                prompt: p.to_string(),
                set: Some(set.into()),
            })
            .collect()
    }

    #[test]
    fn groups_answered_together_equal_each_answered_alone_and_resume() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let (dir, model) = crate::testing::tiny_model();
        let mut generator = Generator::new(&model);
        generator.options.max_new_tokens = 5;
        generator.batch = 2;
        let a = prompts("a", &["one two", "three", "four five six"]);
        let b = prompts("b", &["seven", "eight nine"]);
        let file = |name: &str| dir.path().join(name);
        let alone: Vec<Vec<Answer>> = [(&a, "a-alone"), (&b, "b-alone")]
            .iter()
            .map(|(p, name)| {
                generator
                    .answer_to_file(p, 1, &file(name), &ProgressBar::hidden())
                    .unwrap()
            })
            .collect();
        // Half of group a already answered, as a killed run leaves it: only the rest is made.
        let mut writer = JsonlAppender::open::<Answer>(&file("a.jsonl")).unwrap().0;
        writer.append(&alone[0][1]).unwrap();
        drop(writer);
        let together = generator
            .answer_to_files(
                &[(&a, &file("a.jsonl")), (&b, &file("b.jsonl"))],
                1,
                &ProgressBar::hidden(),
            )
            .unwrap();
        let texts = |answers: &[Answer]| {
            let mut t: Vec<(String, String)> = answers
                .iter()
                .map(|x| (x.id.clone(), x.answer.clone()))
                .collect();
            t.sort();
            t
        };
        for (g, name) in ["a.jsonl", "b.jsonl"].iter().enumerate() {
            assert_eq!(texts(&together[g]), texts(&alone[g]), "group {g}");
            let (_, on_disk) = JsonlAppender::open::<Answer>(&file(name)).unwrap();
            assert_eq!(texts(&on_disk), texts(&alone[g]), "{name}");
        }

        let clash = generator.answer_to_files(
            &[(&a, &file("x.jsonl")), (&a[..1], &file("y.jsonl"))],
            1,
            &ProgressBar::hidden(),
        );
        let message = clash.unwrap_err().to_string();
        assert!(message.contains("a/0 is in two groups"), "{message}");
    }
}
