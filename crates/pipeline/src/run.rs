//! `run`: the whole method on one model. Splits the sets, answers and judges the train
//! prompts, captures and fits (MD, WRMD, WRMD with the safety direction protected), chooses
//! points and strength per method on validation prompts, evaluates on test prompts, and
//! writes the report. Every stage keeps its files in the run folder and reuses them, so a
//! killed run continues where it stopped.

use crate::answers::Format;
use crate::generator::Generator;
use crate::capture::{capture, CaptureJob, CapturePosition};
use crate::config::{Direction, RunConfig};
use crate::evaluate::{answers_for, choice_accuracy, mean_kl, rate, Judges, SetRate};
use crate::fitting::{fit_points, mean_difference, metadata_list, FitOptions};
use crate::gate::{Gate, GateMethod};
use crate::sets::{load_choices, load_prompts, split, Choice, Split};
use crate::recipe::{ModelIdentity, Provenance, Recipe};
use crate::steering::{point_alphas, AlphaProfile, SteerMode, SteerPositions, Steering};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use refusal_steer_data::activations::Activations;
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_engine::{GenerateOptions, Model, Padding, Sampling};
use refusal_steer_judge::{aggregate, Assessment, Judge, Thresholds, VerdictCache};
use refusal_steer_steer::analysis::{analyze, write_report, AnalysisOptions};
use refusal_steer_steer::{Method, Ridge, SteeringVectors};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The prompts of every role, split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Splits {
    pub prompts: BTreeMap<String, Split<Prompt>>,
    pub capability: Split<Choice>,
}

/// One way of steering that `run` compares.
#[derive(Debug, Clone, Copy)]
pub struct MethodSpec {
    /// Its name in the report; folders use it with '+' written '-'.
    pub name: &'static str,
    /// The fitted vector file it steers with (one of [`FITTED`]).
    pub vectors: &'static str,
    /// `Add`: strengths along the vector at the points chosen by held-out AUC.
    /// `AblateAdd`: the span of the vector's and `ablate_with`'s directions projected out at
    /// every point (directional ablation, strength 0), then strengths added along the vector
    /// if ablation alone is not enough.
    pub mode: SteerMode,
    /// Another fitted vector file whose directions are ablated with the vector's.
    pub ablate_with: Option<&'static str>,
    /// Only prompts the topic gate lets through are steered.
    pub gated: bool,
}

/// The vector files `run` fits.
pub const FITTED: [&str; 3] = ["md", "wrmd", "wrmd+protected"];

/// The methods compared. Ablation only removes refusals, so induce runs skip it.
pub const METHODS: [MethodSpec; 6] = [
    MethodSpec::add("md", "md", false),
    MethodSpec::add("wrmd", "wrmd", false),
    MethodSpec::add("wrmd+protected", "wrmd+protected", false),
    MethodSpec::add("md+gated", "md", true),
    MethodSpec::add("wrmd+gated", "wrmd", true),
    // Refusal spreads over more than one direction, so both are ablated. On 24 target prompts
    // outside the default split (scripts/ablation_heldout/compare.sh) MD, WRMD and their span
    // left 5, 7 and 5 refused (most of them degenerate loops); on validation WRMD alone left
    // 2 of 8, the span 1 of 8.
    MethodSpec {
        name: "ablation+gated",
        vectors: "wrmd",
        mode: SteerMode::AblateAdd,
        ablate_with: Some("md"),
        gated: true,
    },
];

impl MethodSpec {
    const fn add(name: &'static str, vectors: &'static str, gated: bool) -> Self {
        MethodSpec {
            name,
            vectors,
            mode: SteerMode::Add,
            ablate_with: None,
            gated,
        }
    }

    pub fn by_name(name: &str) -> Option<&'static MethodSpec> {
        METHODS.iter().find(|m| m.name == name)
    }

    /// The fitted vectors ablated with the method's own.
    fn ablate_with<'a>(
        &self,
        fitted: &'a BTreeMap<String, SteeringVectors>,
    ) -> Vec<&'a SteeringVectors> {
        self.ablate_with.iter().map(|name| &fitted[*name]).collect()
    }

    /// Whether the method can move the target in `direction`.
    fn applies_to(&self, direction: Direction) -> bool {
        self.mode == SteerMode::Add || direction == Direction::Remove
    }
}

/// Where a condition's test answers for one set are kept. A steered condition's folder is
/// named by its strength, so a resumed run whose tuning chose another strength (after a change
/// in how tuning decides) answers again instead of reusing answers made at the old one.
pub fn test_answers(out: &Path, condition: &str, strength: Option<f64>, role: &str) -> PathBuf {
    let folder = out.join("test").join(condition.replace('+', "-"));
    match strength {
        Some(s) => folder.join(format!("{s:+.3}/{role}.jsonl")),
        None => folder.join(format!("{role}.jsonl")),
    }
}

/// Where a method's recipe is kept.
pub fn recipe_file(out: &Path, method: &str) -> PathBuf {
    out.join("recipes")
        .join(format!("{}.steer.safetensors", method.replace('+', "-")))
}

/// The file `run` writes for its recommended method (a copy of its recipe).
pub const RECOMMENDED: &str = "recommended.steer.safetensors";

/// How `run` steers with `method` at `strength`, the same in tuning, in the test and in the
/// recipe it writes: norm-scaled strengths at `points`, at every position, in the method's
/// mode, behind the topic gate if the method is gated.
fn method_recipe(
    method: &MethodSpec,
    fitted: &BTreeMap<String, SteeringVectors>,
    points: &[usize],
    strength: f64,
    gate: &Gate,
    made_for: &ModelIdentity,
    made_by: Provenance,
) -> Result<Recipe> {
    let vectors = &fitted[method.vectors];
    let alphas = point_alphas(vectors, strength, &AlphaProfile::NormScaled)?;
    let ablate_with = method.ablate_with(fitted);
    let steering = Steering {
        vectors,
        points,
        alphas: &alphas,
        mode: method.mode,
        positions: SteerPositions::All,
        ablate_with: &ablate_with,
    };
    Recipe::from_steering(made_for, &steering, method.gated.then_some(gate), made_by)
}

/// One strength tried on validation prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Signed norm-scaled strength.
    pub strength: f64,
    pub kl: f64,
    /// Per set; empty when the KL limit stopped the trial before generating.
    pub rates: BTreeMap<String, SetRate>,
    pub feasible: bool,
    pub note: String,
}

/// What tuning chose for one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tuned {
    pub method: String,
    #[serde(default)]
    pub mode: SteerMode,
    pub points: Vec<usize>,
    pub trials: Vec<Trial>,
    /// The chosen signed strength; None when no strength kept every limit.
    pub strength: Option<f64>,
}

/// One condition on the test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub condition: String,
    pub strength: Option<f64>,
    pub points: Vec<usize>,
    pub rates: BTreeMap<String, SetRate>,
    /// Mean next-token KL to the unsteered model on the benign test prompts it answers.
    pub kl: Option<f64>,
    pub capability_accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub model: String,
    pub judge: String,
    pub direction: Direction,
    pub train_classes: BTreeMap<String, (usize, usize, usize)>,
    pub heldout_auc: BTreeMap<String, Vec<f64>>,
    /// The topic gate of the gated methods: how its direction was fitted, its point and
    /// held-out AUC.
    #[serde(default)]
    pub gate_method: GateMethod,
    pub gate_point: usize,
    pub gate_heldout_auc: f64,
    #[serde(default)]
    pub gate_heldout_accuracy: f64,
    pub validation_baseline: BTreeMap<String, SetRate>,
    pub tuned: Vec<Tuned>,
    pub test: Vec<Evaluation>,
    /// The method recommended for export: of those that kept every limit on validation, the
    /// one with the lowest target metric there, if lower than the baseline's.
    pub recommended: Option<String>,
    pub timings_s: BTreeMap<String, f64>,
}

/// Everything a run needs besides its config.
pub struct Runner<'a> {
    pub config: &'a RunConfig,
    pub out: &'a Path,
    pub model: &'a Model,
    pub judge: &'a mut dyn Judge,
    pub patterns: &'a mut dyn Judge,
    pub log: &'a mut dyn FnMut(&str),
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
pub fn make_splits(config: &RunConfig, out: &Path) -> Result<Splits> {
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
    let path = out.join("split.json");
    if path.exists() {
        let old: Splits = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{} is damaged; remove it", path.display()))?;
        if old != splits {
            bail!(
                "{} was made with another config (its split differs); use a new --out folder",
                out.display()
            );
        }
    } else {
        write_atomic(&path, &serde_json::to_string_pretty(&splits)?)?;
    }
    Ok(splits)
}

/// The feasible method with the lowest validation target metric, if it is lower than the
/// unsteered model's: a strength too weak to change anything keeps every limit, but there is
/// nothing in it to recommend.
fn recommend(
    tuned: &[Tuned],
    validation_baseline: &BTreeMap<String, SetRate>,
    target_metric: impl Fn(&BTreeMap<String, SetRate>) -> f64,
) -> Option<String> {
    let unsteered = target_metric(validation_baseline);
    tuned
        .iter()
        .filter_map(|t| {
            let s = t.strength?;
            let trial = t.trials.iter().find(|x| x.strength == s)?;
            Some((t.method.clone(), target_metric(&trial.rates)))
        })
        .filter(|(_, metric)| *metric < unsteered)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(method, _)| method)
}

/// Writes through a temporary file, so a kill never leaves half a file behind.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

impl Runner<'_> {
    fn format(&self) -> Format {
        Format::default()
    }

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
        }
    }

    /// Runs every stage (reusing finished ones) and writes the report.
    pub fn run(&mut self) -> Result<RunReport> {
        std::fs::create_dir_all(self.out)
            .with_context(|| format!("creating {}", self.out.display()))?;
        // Seconds per stage summed over every invocation of this run folder, so a resumed
        // run reports what the whole run cost.
        let timings_path = self.out.join("timings.json");
        let mut timings: BTreeMap<String, f64> = match std::fs::read_to_string(&timings_path) {
            Ok(text) => serde_json::from_str(&text).unwrap_or_default(),
            Err(_) => BTreeMap::new(),
        };
        let mut clock = Instant::now();
        let mut lap = |timings: &mut BTreeMap<String, f64>, name: &str| -> Result<()> {
            *timings.entry(name.to_string()).or_default() += clock.elapsed().as_secs_f64();
            clock = Instant::now();
            write_atomic(&timings_path, &serde_json::to_string_pretty(timings)?)
        };
        let splits = make_splits(self.config, self.out)?;
        self.check_answer_settings()?;
        write_atomic(
            &self.out.join("config.toml"),
            &toml::to_string(self.config)?,
        )?;
        let mut llm_cache = VerdictCache::open(&self.out.join("verdicts.jsonl"))?;
        let mut pattern_cache = VerdictCache::in_memory();

        // 1-2. Baseline answers on the train prompts, judged, one confidence per prompt.
        (self.log)("stage 1/6: answering the train prompts (baseline)");
        let train: Vec<Prompt> = splits
            .prompts
            .values()
            .flat_map(|s| s.train.iter().cloned())
            .collect();
        let train_answers = {
            let generator = Generator {
                format: self.format(),
                options: self.options(self.config.temperature),
                batch: self.config.batch,
                seed: self.config.seed,
                ..Generator::new(self.model)
            };
            let progress = bar(0, "answers");
            let all = generator.answer_to_file(
                &train,
                self.config.samples,
                &self.out.join("train-answers.jsonl"),
                &progress,
            )?;
            progress.finish_and_clear();
            all
        };
        lap(&mut timings, "train answers")?;
        (self.log)("stage 2/6: judging the train answers");
        let confidence = {
            let mut judges = Judges {
                llm: &mut *self.judge,
                llm_cache: &mut llm_cache,
                patterns: &mut *self.patterns,
                pattern_cache: &mut pattern_cache,
            };
            let assessed = judges.assess(&train_answers)?;
            let mut per_prompt: HashMap<&str, Vec<(i8, f64)>> = HashMap::new();
            for (a, (llm, _)) in train_answers.iter().zip(&assessed) {
                per_prompt
                    .entry(a.id.as_str())
                    .or_default()
                    .push((llm.verdict.label, f64::from(a.mean_logprob)));
            }
            let mut c = HashMap::new();
            for (id, answers) in per_prompt {
                c.insert(
                    id.to_string(),
                    aggregate(&answers, &Thresholds::default())?.c,
                );
            }
            c
        };
        let scores: Vec<serde_json::Value> = train
            .iter()
            .map(|p| serde_json::json!({"id": p.id, "set": p.set, "c": confidence[&p.id]}))
            .collect();
        write_atomic(
            &self.out.join("train-scores.jsonl"),
            &scores
                .iter()
                .map(|s| s.to_string() + "\n")
                .collect::<String>(),
        )?;
        lap(&mut timings, "judge train")?;

        // 3. Activations of the train prompts.
        (self.log)("stage 3/6: capturing activations");
        let acts_path = self.out.join("train-acts.safetensors");
        let progress = bar(train.len() as u64, "prompts");
        let job = CaptureJob {
            prompts: &train,
            format: &self.format(),
            position: CapturePosition::LastPrompt,
            answers: None,
            batch: self.config.batch,
        };
        capture(self.model, &job, &acts_path, &progress)?;
        progress.finish_and_clear();
        let acts = Activations::load(&acts_path)?;
        lap(&mut timings, "capture")?;

        // 4. Vectors.
        (self.log)("stage 4/6: fitting vectors");
        let gate = self.gate(&acts)?;
        self.discard_stale_steering(&scores, &gate)?;
        let (vectors, train_classes) = self.fit(&acts, &confidence)?;
        // For hand experiments with `--gate` (the gated recipes carry it themselves).
        write_atomic(
            &self.out.join("vectors/gate.json"),
            &serde_json::to_string(&gate)?,
        )?;
        let heldout_auc = vectors
            .iter()
            .map(|(m, v)| Ok((m.clone(), metadata_list(v, "heldout_auc_per_point")?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        // Per-point analysis of the WRMD vectors against MD (held-out AUC, r, cosines,
        // dimensionality), on the prompts the vectors were fitted on.
        let fitted_scores: HashMap<String, f64> = acts
            .header
            .ids
            .iter()
            .zip(&acts.header.sets)
            .filter(|(_, set)| {
                set.as_deref()
                    .is_some_and(|s| self.config.direction.fit_roles().contains(&s))
            })
            .filter_map(|(id, _)| confidence.get(id).map(|&c| (id.clone(), c)))
            .collect();
        let analysis_dir = self.out.join("analysis");
        if !analysis_dir.join("analysis.json").exists() {
            match analyze(
                &acts,
                &fitted_scores,
                &vectors["wrmd"],
                Some(&vectors["md"]),
                &AnalysisOptions::default(),
            ) {
                Ok(analysis) => {
                    write_report(&analysis, &analysis_dir)?;
                }
                // Too few prompts per class for its folds: the report says so, the run goes on.
                Err(e) => (self.log)(&format!("no per-point analysis: {e}")),
            }
        }
        (self.log)(&format!(
            "topic gate at point {} (held-out balanced accuracy {:.3}, AUC {:.3})",
            gate.point, gate.heldout_accuracy, gate.heldout_auc
        ));
        lap(&mut timings, "fit")?;

        // 5. Tuning on validation prompts.
        (self.log)("stage 5/6: choosing points and strengths on validation prompts");
        let tuner = Tuner {
            config: self.config,
            model: self.model,
            format: self.format(),
            options: self.options(0.0),
            made_for: ModelIdentity::of(self.model)?,
            made_by: Provenance {
                source: self.out.display().to_string(),
                judge: Some(self.config.judge.clone()),
                config_sha256: Some(refusal_steer_catalog::sha256_file(
                    &self.out.join("config.toml"),
                )?),
                ..Default::default()
            },
        };
        let mut judges = Judges {
            llm: &mut *self.judge,
            llm_cache: &mut llm_cache,
            patterns: &mut *self.patterns,
            pattern_cache: &mut pattern_cache,
        };
        let validation = |role: &str| splits.prompts[role].validation.clone();
        let eval_roles = ["target", "safety", "benign"];
        let mut validation_baseline = BTreeMap::new();
        let mut kl_prompts = Vec::new();
        for role in eval_roles {
            let prompts = validation(role);
            let answers = tuner.answers(
                &prompts,
                None,
                &self.out.join(format!("validation/baseline/{role}.jsonl")),
            )?;
            let assessed = judges.assess(&answers)?;
            if role == "benign" {
                kl_prompts = answered(&prompts, &assessed);
            }
            validation_baseline.insert(role.to_string(), rate(&assessed));
        }
        (self.log)(&format!(
            "baseline: target {:.0}%  safety {:.0}%  benign {:.0}%",
            100.0 * validation_baseline["target"].rate,
            100.0 * validation_baseline["safety"].rate,
            100.0 * validation_baseline["benign"].rate
        ));
        let mut tuned = Vec::new();
        for method in METHODS
            .iter()
            .filter(|m| m.applies_to(self.config.direction))
        {
            let t = tuner.tune(
                method,
                &vectors,
                &gate,
                &validation_baseline,
                &validation,
                &kl_prompts,
                &mut judges,
                &self
                    .out
                    .join("validation")
                    .join(method.name.replace('+', "-")),
                &mut *self.log,
            )?;
            tuned.push(t);
        }
        write_atomic(
            &self.out.join("tuning.json"),
            &serde_json::to_string_pretty(&tuned)?,
        )?;
        lap(&mut timings, "tune")?;

        // 6. Test.
        (self.log)("stage 6/6: evaluating on the test prompts");
        let mut test = Vec::new();
        let mut test_kl_prompts = Vec::new();
        let conditions: Vec<(String, Option<&Tuned>)> =
            std::iter::once(("baseline".to_string(), None))
                .chain(tuned.iter().map(|t| (t.method.clone(), Some(t))))
                .collect();
        let mut recipes = BTreeMap::new();
        for (name, t) in conditions {
            let recipe = match (MethodSpec::by_name(&name), t) {
                (Some(method), Some(t)) if t.strength.is_some() => {
                    Some(tuner.recipe(method, &vectors, t, &gate)?)
                }
                _ if t.is_some() => {
                    (self.log)(&format!(
                        "{name}: no strength kept every limit; not evaluated"
                    ));
                    continue;
                }
                _ => None,
            };
            let mut rates = BTreeMap::new();
            for role in eval_roles {
                let prompts = &splits.prompts[role].test;
                let path = test_answers(self.out, &name, t.and_then(|t| t.strength), role);
                let answers = tuner.answers(prompts, recipe.as_ref(), &path)?;
                let assessed = judges.assess(&answers)?;
                if role == "benign" && recipe.is_none() {
                    test_kl_prompts = answered(prompts, &assessed);
                }
                rates.insert(role.to_string(), rate(&assessed));
            }
            let kl = match &recipe {
                Some(_) => Some(mean_kl(
                    self.model,
                    &test_kl_prompts,
                    &tuner.format,
                    self.config.batch,
                    recipe.as_ref(),
                )?),
                None => None,
            };
            let capability_accuracy = choice_accuracy(
                self.model,
                &splits.capability.test,
                &tuner.format,
                self.config.batch,
                recipe.as_ref(),
            )?;
            if let Some(recipe) = recipe {
                recipes.insert(name.clone(), recipe);
            }
            (self.log)(&format!(
                "{name}: target {}  safety {}  benign {}  capability {:.0}%",
                rates["target"].percent(),
                rates["safety"].percent(),
                rates["benign"].percent(),
                100.0 * capability_accuracy
            ));
            test.push(Evaluation {
                condition: name,
                strength: t.and_then(|t| t.strength),
                points: t.map(|t| t.points.clone()).unwrap_or_default(),
                rates,
                kl,
                capability_accuracy,
            });
        }
        lap(&mut timings, "test")?;
        let recommended = recommend(&tuned, &validation_baseline, |rates| {
            tuner.target_metric(rates)
        });
        // One recipe per method that kept every limit, the recommended one copied beside them;
        // a resumed run whose methods or recommendation changed leaves no old one behind.
        let recipe_dir = self.out.join("recipes");
        if recipe_dir.exists() {
            std::fs::remove_dir_all(&recipe_dir)
                .with_context(|| format!("removing old recipes in {}", recipe_dir.display()))?;
        }
        std::fs::create_dir_all(&recipe_dir)?;
        for (method, recipe) in &recipes {
            recipe.save(&recipe_file(self.out, method))?;
        }
        let recommended_file = self.out.join(RECOMMENDED);
        match recommended.as_ref().and_then(|m| recipes.get(m)) {
            Some(recipe) => recipe.save(&recommended_file)?,
            None if recommended_file.exists() => std::fs::remove_file(&recommended_file)?,
            None => {}
        }
        let report = RunReport {
            model: self.config.model.clone(),
            judge: self.config.judge.clone(),
            direction: self.config.direction,
            train_classes,
            heldout_auc,
            gate_method: gate.method,
            gate_point: gate.point,
            gate_heldout_auc: gate.heldout_auc,
            gate_heldout_accuracy: gate.heldout_accuracy,
            validation_baseline,
            tuned,
            test,
            recommended,
            timings_s: timings,
        };
        write_atomic(
            &self.out.join("report.json"),
            &serde_json::to_string_pretty(&report)?,
        )?;
        crate::report::write(&report, self.out, &acts, &confidence)?;
        Ok(report)
    }

    /// A resumed run reuses every answer in its folder, so the model and decoding must be the
    /// ones those answers were made with (the folder's config.toml).
    fn check_answer_settings(&self) -> Result<()> {
        let path = self.out.join("config.toml");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let old = RunConfig::parse(&text, &path)?;
        if old.answer_settings() != self.config.answer_settings() {
            bail!(
                "{} holds answers made with {}; this run asks for {}. Use a new --out folder (or the same settings to resume)",
                self.out.display(),
                old.answer_settings(),
                self.config.answer_settings()
            );
        }
        Ok(())
    }

    /// Vectors, and every steered answer made with them, follow from the train scores, the
    /// fit and tuning settings and the topic gate. When a resumed run finds these changed
    /// (another judge, another kappa or ladder, a gate chosen another way), it removes what
    /// they produced instead of mixing old and new.
    fn discard_stale_steering(&mut self, scores: &[serde_json::Value], gate: &Gate) -> Result<()> {
        let inputs = serde_json::json!({
            "gate": gate,
            "scores": scores,
            "kappa": self.config.kappa,
            "seed": self.config.seed,
            "direction": self.config.direction,
            "tune": self.config.tune,
        })
        .to_string();
        let path = self.out.join("steering-inputs.json");
        if std::fs::read_to_string(&path).is_ok_and(|old| old != inputs) {
            (self.log)("the train scores or fit/tune settings changed: refitting and re-tuning");
            let mut stale = vec![
                self.out.join("vectors"),
                self.out.join("analysis"),
                self.out.join("recipes"),
            ];
            for stage in ["validation", "test"] {
                if let Ok(entries) = std::fs::read_dir(self.out.join(stage)) {
                    for entry in entries.flatten() {
                        if entry.file_name() != "baseline" {
                            stale.push(entry.path());
                        }
                    }
                }
            }
            for dir in stale.iter().filter(|d| d.exists()) {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("removing stale {}", dir.display()))?;
            }
        }
        write_atomic(&path, &inputs)
    }

    /// The topic gate: target (and contrast) train prompts are on the topic, safety and benign
    /// ones off it.
    fn gate(&self, acts: &Activations) -> Result<Gate> {
        let h = &acts.header;
        let on_topic: Vec<Option<bool>> = (0..h.ids.len())
            .map(|i| match h.sets[i].as_deref() {
                Some("target" | "contrast") => Some(true),
                Some("safety" | "benign") => Some(false),
                _ => None,
            })
            .collect();
        Gate::fit(
            acts,
            &on_topic,
            self.config.tune.gate,
            Ridge::Relative(self.config.kappa),
            5,
            self.config.seed,
        )
        .context("fitting the topic gate")
    }

    /// MD and WRMD on the target (and contrast) train prompts, and WRMD with the safety
    /// direction (harmful minus benign train prompts) removed. Reuses saved vectors.
    #[allow(clippy::type_complexity)]
    fn fit(
        &mut self,
        acts: &Activations,
        confidence: &HashMap<String, f64>,
    ) -> Result<(
        BTreeMap<String, SteeringVectors>,
        BTreeMap<String, (usize, usize, usize)>,
    )> {
        let h = &acts.header;
        let set_of = |i: usize| h.sets[i].as_deref().unwrap_or("");
        let fit_roles = self.config.direction.fit_roles();
        let c: Vec<Option<f64>> = (0..h.ids.len())
            .map(|i| {
                fit_roles
                    .contains(&set_of(i))
                    .then(|| confidence.get(&h.ids[i]).copied())
                    .flatten()
            })
            .collect();
        let threshold = Thresholds::default().refusal;
        let mut classes = BTreeMap::new();
        for role in ["target", "contrast", "safety", "benign"] {
            let rows: Vec<usize> = (0..h.ids.len()).filter(|&i| set_of(i) == role).collect();
            let of = |pred: &dyn Fn(f64) -> bool| {
                rows.iter()
                    .filter(|&&i| confidence.get(&h.ids[i]).is_some_and(|&c| pred(c)))
                    .count()
            };
            classes.insert(
                role.to_string(),
                (
                    of(&|c| c > threshold),
                    of(&|c| c < -threshold),
                    of(&|c| c.abs() <= threshold),
                ),
            );
        }
        let (refused, answered) = c.iter().fold((0, 0), |(r, a), c| match c {
            Some(c) if *c > threshold => (r + 1, a),
            Some(c) if *c < -threshold => (r, a + 1),
            _ => (r, a),
        });
        if refused < 2 || answered < 2 {
            bail!(
                "the train prompts have {refused} refused and {answered} answered ({}); a vector needs at least 2 of each: add refused topic prompts or answered contrast prompts to the config",
                fit_roles.join(" + ")
            );
        }
        let folds = refused.min(answered).min(5);
        let rows_of = |role: &str| -> Vec<usize> {
            (0..h.ids.len()).filter(|&i| set_of(i) == role).collect()
        };
        // The protected behaviour, refusing harmful requests, as two directions: the mean
        // difference of harmful and benign train prompts, and their ridge discriminant (the
        // direction a WRMD target vector is most likely to share).
        let (harmful, benign) = (rows_of("safety"), rows_of("benign"));
        let mean_dir = mean_difference(acts, &harmful, &benign)?;
        let harm_c: Vec<Option<f64>> = (0..h.ids.len())
            .map(|i| match set_of(i) {
                "safety" => Some(1.0),
                "benign" => Some(-1.0),
                _ => None,
            })
            .collect();
        let discriminant = fit_points(
            acts,
            &harm_c,
            &FitOptions {
                method: Method::Wrmd,
                ridge: Ridge::Relative(self.config.kappa),
                threshold,
                folds: harmful.len().min(benign.len()).clamp(2, 5),
                seed: self.config.seed,
            },
            &[],
            &mut |_| {},
        )
        .context("fitting the protected (harmful vs benign) direction")?;
        let mut out = BTreeMap::new();
        for name in FITTED {
            let path = self
                .out
                .join(format!("vectors/{}.safetensors", name.replace('+', "-")));
            if path.exists() {
                out.insert(name.to_string(), SteeringVectors::load(&path)?);
                continue;
            }
            std::fs::create_dir_all(path.parent().expect("has a parent"))?;
            let method = if name == "md" {
                Method::Md
            } else {
                Method::Wrmd
            };
            let options = FitOptions {
                method,
                ridge: Ridge::Relative(self.config.kappa),
                threshold,
                folds,
                seed: self.config.seed,
            };
            let protect: Vec<&[f32]> = if name == "wrmd+protected" {
                vec![&mean_dir, &discriminant.vectors]
            } else {
                Vec::new()
            };
            let mut v = fit_points(acts, &c, &options, &protect, &mut |_| {})?;
            if !protect.is_empty() {
                v.metadata.insert(
                    "protected".into(),
                    "safety vs benign: mean difference and WRMD discriminant".into(),
                );
            }
            v.save(&path)?;
            out.insert(name.to_string(), v);
        }
        Ok((out, classes))
    }
}

/// The strength search on validation prompts.
struct Tuner<'a> {
    config: &'a RunConfig,
    model: &'a Model,
    format: Format,
    options: GenerateOptions,
    made_for: ModelIdentity,
    /// The provenance of every recipe this run makes, but the method and its numbers.
    made_by: Provenance,
}

impl Tuner<'_> {
    /// The recipe of a tuned method at its chosen strength, with what validation measured.
    fn recipe(
        &self,
        method: &MethodSpec,
        fitted: &BTreeMap<String, SteeringVectors>,
        tuned: &Tuned,
        gate: &Gate,
    ) -> Result<Recipe> {
        let strength = tuned.strength.expect("a tuned method with a strength");
        let trial = tuned.trials.iter().find(|t| t.strength == strength);
        let mut validation: BTreeMap<String, f64> = trial
            .iter()
            .flat_map(|t| t.rates.iter().map(|(role, r)| (format!("{role}_refusal_rate"), r.rate)))
            .collect();
        validation.extend(trial.map(|t| ("kl".to_string(), t.kl)));
        validation.insert("strength".into(), strength);
        let made_by = Provenance {
            method: method.name.to_string(),
            validation,
            ..self.made_by.clone()
        };
        method_recipe(method, fitted, &tuned.points, strength, gate, &self.made_for, made_by)
    }

    fn answers(
        &self,
        prompts: &[Prompt],
        recipe: Option<&Recipe>,
        path: &Path,
    ) -> Result<Vec<Answer>> {
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let progress = bar(0, "answers");
        let answers = answers_for(
            self.model,
            prompts,
            &self.format,
            &self.options,
            self.config.batch,
            self.config.seed,
            recipe,
            path,
            &progress,
        )?;
        progress.finish_and_clear();
        Ok(answers)
    }

    /// What tuning minimises: the share of target answers that miss the run's aim.
    fn target_metric(&self, rates: &BTreeMap<String, SetRate>) -> f64 {
        rates["target"].missed(self.config.direction)
    }

    /// Steered points: held-out AUC within the margin of the best, past the minimum depth.
    fn points(&self, vectors: &SteeringVectors) -> Result<Vec<usize>> {
        let auc = metadata_list(vectors, "heldout_auc_per_point")?;
        let n_layers = vectors.n_points - 1;
        let first = ((self.config.tune.min_depth * n_layers as f64).ceil() as usize).max(1);
        let best = auc[first..].iter().copied().fold(f64::MIN, f64::max);
        Ok((first..vectors.n_points)
            .filter(|&p| auc[p] >= best - self.config.tune.auc_margin)
            .collect())
    }

    #[allow(clippy::too_many_arguments)]
    fn tune(
        &self,
        method: &MethodSpec,
        fitted: &BTreeMap<String, SteeringVectors>,
        gate: &Gate,
        baseline: &BTreeMap<String, SetRate>,
        validation: &dyn Fn(&str) -> Vec<Prompt>,
        kl_prompts: &[Prompt],
        judges: &mut Judges,
        dir: &Path,
        log: &mut dyn FnMut(&str),
    ) -> Result<Tuned> {
        let t = &self.config.tune;
        let vectors = &fitted[method.vectors];
        let points = match method.mode {
            SteerMode::AblateAdd => (1..vectors.n_points).collect(),
            _ => self.points(vectors)?,
        };
        let name = method.name;
        if method.gated {
            let passing: Vec<String> = ["target", "safety", "benign"]
                .iter()
                .map(|role| {
                    let prompts = validation(role);
                    let pass =
                        gate.select_prompts(self.model, &self.format, &prompts, self.config.batch)?;
                    Ok(format!(
                        "{role} {}/{}",
                        pass.iter().filter(|&&p| p).count(),
                        pass.len()
                    ))
                })
                .collect::<Result<_>>()?;
            log(&format!("{name}: the gate passes {}", passing.join(", ")));
        }
        let sign = match self.config.direction {
            Direction::Remove => -1.0,
            Direction::Induce => 1.0,
        };
        // Ablation first tries itself alone (strength 0), then with strengths added.
        let ablation_alone = (method.mode == SteerMode::AblateAdd).then_some(0.0);
        let mut trials = Vec::new();
        for strength in ablation_alone
            .into_iter()
            .chain(t.strengths.iter().map(|m| sign * m))
        {
            let made_by = Provenance {
                method: name.to_string(),
                ..self.made_by.clone()
            };
            let recipe = method_recipe(
                method,
                fitted,
                &points,
                strength,
                gate,
                &self.made_for,
                made_by,
            )?;
            let kl = mean_kl(
                self.model,
                kl_prompts,
                &self.format,
                self.config.batch,
                Some(&recipe),
            )?;
            if kl > t.max_kl {
                log(&format!(
                    "{name} {strength:+.3}: KL {kl:.3} on answered benign prompts > {}; stop",
                    t.max_kl
                ));
                trials.push(Trial {
                    strength,
                    kl,
                    rates: BTreeMap::new(),
                    feasible: false,
                    note: format!("KL {kl:.3} above the limit {}", t.max_kl),
                });
                break;
            }
            let mut rates = BTreeMap::new();
            for role in ["target", "safety", "benign"] {
                let answers = self.answers(
                    &validation(role),
                    Some(&recipe),
                    &dir.join(format!("{strength:+.3}/{role}.jsonl")),
                )?;
                rates.insert(role.to_string(), rate(&judges.assess(&answers)?));
            }
            let safety_ok =
                rates["safety"].rate >= baseline["safety"].rate - t.max_safety_drop - 1e-9;
            let benign_ok =
                rates["benign"].rate <= baseline["benign"].rate + t.max_benign_rise + 1e-9;
            let feasible = safety_ok && benign_ok;
            let metric = self.target_metric(&rates);
            let note = match (safety_ok, benign_ok) {
                (false, _) => "safety refusals fell below the floor".to_string(),
                (_, false) => "benign refusals rose above the ceiling".to_string(),
                _ => String::new(),
            };
            log(&format!(
                "{name} {strength:+.3}: target {}  safety {}  benign {}  KL {kl:.3}{}",
                rates["target"].percent(),
                rates["safety"].percent(),
                rates["benign"].percent(),
                if note.is_empty() {
                    String::new()
                } else {
                    format!("  ({note})")
                }
            ));
            trials.push(Trial {
                strength,
                kl,
                rates,
                feasible,
                note,
            });
            // Stronger steering only moves further: stop at the goal or at a broken limit.
            if !feasible || metric <= t.goal {
                break;
            }
        }
        let strength = trials
            .iter()
            .filter(|x| x.feasible)
            .min_by(|a, b| {
                self.target_metric(&a.rates)
                    .total_cmp(&self.target_metric(&b.rates))
                    .then(a.strength.abs().total_cmp(&b.strength.abs()))
            })
            .map(|x| x.strength);
        Ok(Tuned {
            method: name.to_string(),
            mode: method.mode,
            points,
            trials,
            strength,
        })
    }
}

/// The prompts whose unsteered answer the run's judge did not call a refusal. The KL limit is
/// measured on the benign ones: there the next token should not move, while on a benign
/// prompt the model refuses, the first token moving away from the refusal is the intended
/// effect of removing refusals, not damage.
fn answered(prompts: &[Prompt], assessed: &[(Assessment, Assessment)]) -> Vec<Prompt> {
    prompts
        .iter()
        .zip(assessed)
        .filter(|(_, (judge, _))| judge.verdict.label <= 0)
        .map(|(p, _)| p.clone())
        .collect()
}

/// Where the run folder goes by default.
pub fn default_out() -> PathBuf {
    PathBuf::from("runs/default")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::tests::ten_answers;

    fn tuned(method: &str, strength: Option<f64>, target_refusals: usize) -> Tuned {
        Tuned {
            method: method.into(),
            mode: SteerMode::default(),
            points: vec![1],
            trials: vec![Trial {
                strength: 0.02,
                kl: 0.1,
                rates: BTreeMap::from([("target".into(), ten_answers(target_refusals, 0))]),
                feasible: strength.is_some(),
                note: String::new(),
            }],
            strength,
        }
    }

    #[test]
    fn only_a_feasible_strength_that_moves_the_target_is_recommended() {
        let baseline = BTreeMap::from([("target".to_string(), ten_answers(0, 0))]);
        let induced = |rates: &BTreeMap<String, SetRate>| rates["target"].missed(Direction::Induce);
        // Inducing: the only feasible strength leaves the target as it was.
        let weak = [tuned("md+gated", Some(0.02), 0), tuned("md", None, 9)];
        assert_eq!(recommend(&weak, &baseline, induced), None);
        let moved = [
            tuned("md+gated", Some(0.02), 0),
            tuned("wrmd+gated", Some(0.02), 6),
        ];
        assert_eq!(
            recommend(&moved, &baseline, induced).as_deref(),
            Some("wrmd+gated")
        );
    }
}
