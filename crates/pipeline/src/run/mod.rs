//! `run`: the whole method on one model. Splits the sets, answers and judges the train
//! prompts, captures and fits (MD, WRMD, WRMD with the safety direction protected), chooses
//! points and strength per method on validation prompts, evaluates on test prompts, and
//! writes the report and one recipe per method. Every stage keeps its files in the run folder
//! ([`RunFolder`]) and reuses them, so a killed run continues where it stopped.

mod fit;
mod folder;
mod methods;
mod outcome;
mod test;
mod train;
mod tune;

pub use folder::RunFolder;
pub(crate) use folder::Stage;
pub use outcome::{Evaluation, RunReport, Trial, Tuned};

use crate::answers::Format;
use crate::capture::CapturePosition;
use crate::config::RunConfig;
use crate::evaluate::{answers_for, Judges};
use crate::recipe::{ModelIdentity, Provenance, Recipe};
use crate::sets::{load_choices, load_prompts, split, Choice, Split};
use anyhow::{bail, Context, Result};
use fit::Fit;
use indicatif::{ProgressBar, ProgressStyle};
use methods::MethodSpec;
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_engine::{GenerateOptions, Model, Padding, Sampling, ThinkingBudget};
use refusal_steer_judge::{Judge, VerdictCache};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The prompts of every role, split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Splits {
    pub prompts: BTreeMap<String, Split<Prompt>>,
    pub capability: Split<Choice>,
}

/// Everything a run needs besides its config.
pub struct Runner<'a> {
    pub config: &'a RunConfig,
    /// Created (and locked) before the model is loaded, so a second run on it stops at once.
    pub folder: &'a RunFolder,
    pub model: &'a Model,
    pub judge: &'a mut dyn Judge,
    pub patterns: &'a mut dyn Judge,
    pub log: &'a mut dyn FnMut(&str),
}

impl Runner<'_> {
    /// Runs every stage (reusing finished ones) and writes the report.
    pub fn run(&mut self) -> Result<RunReport> {
        let folder = self.folder;
        let mut timings = folder.timings();
        let splits = make_splits(self.config, folder)?;
        check_answer_settings(self.config, folder)?;
        folder.write("config.toml", &toml::to_string(self.config)?)?;
        let ctx = Ctx {
            config: self.config,
            model: self.model,
            format: Format::default(),
            made_for: ModelIdentity::of(self.model)?,
            thinking: self
                .config
                .max_thinking_tokens
                .map(|n| ThinkingBudget::new(self.model, n))
                .transpose()?,
            made_by: Provenance {
                source: folder.root().display().to_string(),
                judge: Some(self.config.judge.clone()),
                config_sha256: Some(refusal_steer_catalog::sha256_file(
                    &folder.file("config.toml"),
                )?),
                ..Default::default()
            },
            folder,
        };
        let (mut llm_cache, mut pattern_cache) = (
            VerdictCache::open(&ctx.folder.file("verdicts.jsonl"))?,
            VerdictCache::in_memory(),
        );
        let mut judges = Judges {
            llm: &mut *self.judge,
            llm_cache: &mut llm_cache,
            patterns: &mut *self.patterns,
            pattern_cache: &mut pattern_cache,
        };
        let log = &mut *self.log;
        let train: Vec<Prompt> = splits
            .prompts
            .values()
            .flat_map(|s| s.train.iter().cloned())
            .collect();

        log("stage 1/6: answering the train prompts (baseline)");
        let answers = train::answer(&ctx, &train)?;
        timings.lap("train answers")?;
        log("stage 2/6: judging the train answers");
        let scores = train::judge(&ctx, &train, &answers, &mut judges)?;
        timings.lap("judge train")?;
        log("stage 3/6: capturing activations");
        let acts = train::capture_activations(
            &ctx,
            &train,
            CapturePosition::LastPrompt,
            "train-acts.safetensors",
        )?;
        timings.lap("capture")?;
        log("stage 4/6: fitting vectors");
        let answered: HashSet<&str> = splits
            .prompts
            .values()
            .flat_map(|s| s.train.iter().chain(&s.validation).chain(&s.test))
            .map(|p| p.prompt.as_str())
            .collect();
        let fit = fit::fit(&ctx, &acts, &train, &answered, &scores, log)?;
        timings.lap("fit")?;
        log("stage 5/6: choosing points and strengths on validation prompts");
        let (validation_baseline, tuned) = tune::tune(&ctx, &splits, &fit, &mut judges, log)?;
        timings.lap("tune")?;
        log("stage 6/6: evaluating on the test prompts");
        let (test, recipes) = test::test(&ctx, &splits, &fit, &tuned, &mut judges, log)?;
        timings.lap("test")?;

        let recommended = outcome::recommend(&tuned, &validation_baseline, self.config.direction);
        test::write_recipes(&ctx, &recipes, recommended.as_deref())?;
        let report = RunReport {
            model: self.config.model.clone(),
            judge: self.config.judge.clone(),
            direction: self.config.direction,
            train_classes: fit.train_classes,
            heldout_auc: fit.heldout_auc,
            gate_method: fit.gate.method,
            gate_points: fit.gate.points.clone(),
            gate_veto: fit.gate.veto.is_some(),
            gate_cuts: fit.gate.cuts.clone(),
            gate_heldout_auc: fit.gate.heldout_auc,
            gate_heldout_accuracy: fit.gate.heldout_accuracy,
            validation_baseline,
            tuned,
            test,
            recommended,
            timings_s: timings.totals,
        };
        ctx.folder
            .write("report.json", &serde_json::to_string_pretty(&report)?)?;
        crate::report::write(
            &report,
            self.config,
            folder.root(),
            &acts,
            &scores.confidence,
        )?;
        Ok(report)
    }
}

/// What every stage reads: the config, the folder, the model, and how prompts and recipes
/// are made.
struct Ctx<'a> {
    config: &'a RunConfig,
    folder: &'a RunFolder,
    model: &'a Model,
    format: Format,
    made_for: ModelIdentity,
    /// The provenance of every recipe this run makes, but the method and its numbers.
    made_by: Provenance,
    thinking: Option<ThinkingBudget>,
}

impl Ctx<'_> {
    fn options(&self, temperature: f32) -> GenerateOptions {
        GenerateOptions {
            max_new_tokens: self.config.max_tokens,
            sampling: Sampling {
                temperature,
                top_p: 1.0,
                top_k: 0,
                repetition_penalty: self.config.repetition_penalty,
            },
            padding: Padding::Left,
            thinking: self.thinking.clone(),
        }
    }

    /// Greedy answers to the trial sets' `stage` prompts ([`tune::TRIAL_SETS`], in that
    /// order) under `recipe`, each set in its file of `condition` at `strength` (resumable), in
    /// prompt order, the sets sharing the batch. The prompts a gated recipe keeps out are
    /// copied from `baseline` (the unsteered answers by set) instead of generated again.
    fn answers(
        &self,
        splits: &Splits,
        stage: Stage,
        condition: &str,
        strength: Option<f64>,
        recipe: Option<&Recipe>,
        baseline: &BTreeMap<&str, Vec<Answer>>,
    ) -> Result<Vec<Vec<Answer>>> {
        let paths: Vec<PathBuf> = tune::TRIAL_SETS
            .iter()
            .map(|set| self.folder.answers(stage, condition, strength, set))
            .collect();
        for path in &paths {
            std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        }
        let groups: Vec<(&[Prompt], &Path)> = tune::TRIAL_SETS
            .iter()
            .zip(&paths)
            .map(|(set, path)| {
                let split = &splits.prompts[*set];
                let prompts = match stage {
                    Stage::Validation => &split.validation,
                    Stage::Test => &split.test,
                };
                (prompts.as_slice(), path.as_path())
            })
            .collect();
        let unsteered: Vec<Answer> = baseline.values().flatten().cloned().collect();
        let progress = bar(0, "answers");
        let answers = answers_for(
            self.model,
            &groups,
            &self.format,
            &self.options(0.0),
            self.config.batch,
            self.config.seed,
            recipe,
            Some(&unsteered),
            &progress,
        )?;
        progress.finish_and_clear();
        Ok(answers)
    }

    /// `method` at `strength` as a recipe; with `tuned`, its provenance carries what
    /// validation measured at that strength.
    fn recipe(
        &self,
        method: &MethodSpec,
        fit: &Fit,
        points: &[usize],
        strength: f64,
        tuned: Option<&Tuned>,
    ) -> Result<Recipe> {
        let mut validation: BTreeMap<String, f64> = BTreeMap::new();
        if let Some(trial) = tuned.and_then(Tuned::chosen) {
            validation.extend(
                trial
                    .rates
                    .iter()
                    .map(|(set, r)| (format!("{set}_refusal_rate"), r.rate)),
            );
            validation.insert("kl".into(), trial.kl);
            validation.insert("strength".into(), strength);
        }
        let made_by = Provenance {
            method: method.name.to_string(),
            validation,
            ..self.made_by.clone()
        };
        method.recipe(
            &fit.vectors,
            points,
            strength,
            &fit.gate,
            &self.made_for,
            made_by,
        )
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{bar:30}} {{pos}}/{{len}} {what}  {{elapsed}} elapsed, ETA {{eta}}"
        ))
        .expect("a valid template"),
    );
    bar
}

/// Reads the sets and splits them; a run folder keeps its split, and a changed config that
/// would change it is an error rather than a silent mix of two runs.
fn make_splits(config: &RunConfig, folder: &RunFolder) -> Result<Splits> {
    let data_dir = config.data_dir()?;
    let mut prompts = BTreeMap::new();
    let mut capability = None;
    for (i, (role, set)) in config.roles().into_iter().enumerate() {
        let seed = config.seed.wrapping_add(i as u64);
        let sizes = [set.train, set.validation, set.test];
        if role == "capability" {
            let mut items = Vec::new();
            for s in &set.sources {
                items.extend(load_choices(s, &data_dir, seed)?);
            }
            capability = Some(split(&items, sizes, seed, role)?);
        } else {
            let mut items = Vec::new();
            for s in &set.sources {
                items.extend(load_prompts(s, &data_dir, role, seed)?);
            }
            prompts.insert(role.to_string(), split(&items, sizes, seed, role)?);
        }
    }
    let splits = Splits {
        prompts,
        capability: capability.expect("capability is a role"),
    };
    let path = folder.file("split.json");
    if path.exists() {
        let old: Splits = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is damaged; remove it", path.display()))?;
        if old != splits {
            bail!(
                "{} was made with another config (its split differs); use a new --out folder",
                folder.root().display()
            );
        }
    } else {
        folder.write("split.json", &serde_json::to_string_pretty(&splits)?)?;
    }
    Ok(splits)
}

/// A resumed run reuses every answer in its folder, so the model and decoding must be the
/// ones those answers were made with (the folder's config.toml).
fn check_answer_settings(config: &RunConfig, folder: &RunFolder) -> Result<()> {
    let path = folder.file("config.toml");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let old = RunConfig::parse(&text, &path)?;
    if old.answer_settings() != config.answer_settings() {
        bail!(
            "{} holds answers made with {}; this run asks for {}. Use a new --out folder (or the same settings to resume)",
            folder.root().display(),
            old.answer_settings(),
            config.answer_settings()
        );
    }
    Ok(())
}
