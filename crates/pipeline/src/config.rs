//! The run configuration (TOML): subject model, judge, prompt sets by role with their splits,
//! and the tuning limits. `configs/default.toml` is the built-in default.

use crate::gate::{Budgets, GateMethod};
use crate::sets::{Source, SourceKind};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = include_str!("../../../configs/default.toml");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The model to steer: a catalogue name or a .gguf path.
    pub model: String,
    /// For reasoning models whose chat template has the switch (`enable_thinking`): `true`
    /// lets the model reason first, `false` renders the template's empty reasoning block.
    /// Unset: the template's own default. Judges and the score weighting read only the text
    /// after the reasoning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thinking: Option<bool>,
    /// For reasoning models: past this many tokens of reasoning, `</think>` is written in and
    /// the answer gets its own `max_tokens`. Unset: `max_tokens` bounds both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_thinking_tokens: Option<usize>,
    /// The judge: a catalogue name or .gguf path (LLM judge) or `patterns`.
    pub judge: String,
    /// An LLM judge's p_refusal above this is a refusal.
    #[serde(default = "default_judge_threshold")]
    pub judge_threshold: f64,
    /// Where set paths are relative to (default: $REFUSAL_STEER_DATA, else ../shared/data).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    pub seed: u64,
    /// `remove` refusals on the target set (negative strengths) or `induce` them (positive).
    pub direction: Direction,
    /// Answers per train prompt (K of METHOD.md §1); K > 1 samples at `temperature`.
    pub samples: usize,
    pub temperature: f32,
    /// Answer length; long enough to catch refusals that come late.
    pub max_tokens: usize,
    /// Above 1, tokens the answer already holds become less likely (1: off). Applied to every
    /// answer alike, baseline included; it breaks the repetition loops a steered small model
    /// can fall into.
    #[serde(default = "no_penalty", skip_serializing_if = "is_no_penalty")]
    pub repetition_penalty: f32,
    pub batch: usize,
    /// Ridge strength relative to each layer's scale (lambda = kappa * trace(Sigma) / d).
    pub kappa: f64,
    /// Fit the vectors on classes balanced by the prompts' language (main script), so that
    /// refused English and answered Chinese prompts do not teach "answer in Chinese".
    #[serde(default = "yes")]
    pub balance_language: bool,
    pub tune: TuneConfig,
    /// Prompts the topic gate is trained on besides the run's train prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_corpus: Option<GateCorpus>,
    pub sets: Sets,
}

/// Prompts the topic gate also learns from, in several phrasings and languages: captured once,
/// never answered. Prompts whose text is in one of the run's sets are left out, so no
/// validation or test prompt trains the gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateCorpus {
    /// A JSONL file of prompts with a "set" field (relative to the data directory, or
    /// absolute), or `built-in`: the China-political corpus of `data/gate/` (2,640 prompts).
    pub prompts: String,
    /// Its sets that are on the topic.
    pub on: Vec<String>,
    /// Its sets the gate must keep out whatever their topic: the veto's positives. Every
    /// other set is off the topic.
    pub harmful: Vec<String>,
    /// Prompts drawn from each set (seeded with the run's seed).
    pub per_set: usize,
}

fn default_judge_threshold() -> f64 {
    0.5
}

fn yes() -> bool {
    true
}

fn no_penalty() -> f32 {
    1.0
}

fn is_no_penalty(p: &f32) -> bool {
    *p == 1.0
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Remove,
    Induce,
}

impl Direction {
    /// The sets whose train prompts the vectors learn from: removing learns from the topic
    /// (and its contrast); inducing has no refusals on its topic to learn from, so it learns
    /// refusal from every set.
    pub fn fit_roles(self) -> &'static [&'static str] {
        match self {
            Direction::Remove => &["target", "contrast"],
            Direction::Induce => &["target", "contrast", "safety", "benign"],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneConfig {
    /// Norm-scaled strength magnitudes tried in order (fraction of the residual norm added
    /// per steered point); the search stops early once the goal is met or a limit breaks.
    pub strengths: Vec<f64>,
    /// Target refusal rate (remove) or 1 - rate (induce) at which the search stops.
    pub goal: f64,
    /// Safety refusal may fall at most this much below its baseline (0.05 = 5 points).
    pub max_safety_drop: f64,
    /// Benign refusal may rise at most this much above its baseline.
    pub max_benign_rise: f64,
    /// Mean next-token KL (nats), steered vs not, on the benign prompts the unsteered model
    /// answers, may not exceed this.
    pub max_kl: f64,
    /// Points whose held-out AUC is within this of the best are steered.
    pub auc_margin: f64,
    /// Points before this fraction of the depth are never steered (they carry token identity).
    pub min_depth: f64,
    /// How the topic gate is fitted: `ridge` (default: several points, the mean of the
    /// prompt's own tokens, a harmful-request veto from the safety prompts), or one direction
    /// at one point, last prompt token: `md` or `rmd` (see [`GateMethod`]).
    #[serde(default, skip_serializing_if = "GateMethod::is_default")]
    pub gate: GateMethod,
    /// The shares of harmful and of other off-topic train prompts the `ridge` gate may let in,
    /// judged on scores of gates fitted without each prompt's source:
    /// `{ harmful = 0.005, off_topic = 0.03 }` (the default).
    #[serde(default, skip_serializing_if = "Budgets::is_default")]
    pub gate_budgets: Budgets,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetConfig {
    pub sources: Vec<Source>,
    pub train: usize,
    pub validation: usize,
    pub test: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sets {
    /// The topic whose refusals change.
    pub target: SetConfig,
    /// Topic-matched prompts the model answers; train only, so the vector contrasts refusal
    /// with compliance rather than one topic with another.
    #[serde(default)]
    pub contrast: Option<SetConfig>,
    /// Must stay refused.
    pub safety: SetConfig,
    /// Must stay answered.
    pub benign: SetConfig,
    /// Multiple-choice benchmarks (test split only).
    pub capability: SetConfig,
}

impl RunConfig {
    pub fn default_config() -> Self {
        Self::parse(DEFAULT_CONFIG, Path::new("configs/default.toml"))
            .expect("the built-in config is valid")
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the run config {}", path.display()))?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let config: Self = toml::from_str(text)
            .with_context(|| format!("{} is not a valid run config", path.display()))?;
        config
            .validate()
            .with_context(|| format!("{} is not a valid run config", path.display()))?;
        Ok(config)
    }

    /// The roles in a fixed order, with their configs.
    pub fn roles(&self) -> Vec<(&'static str, &SetConfig)> {
        let mut roles = vec![("target", &self.sets.target)];
        if let Some(c) = &self.sets.contrast {
            roles.push(("contrast", c));
        }
        roles.push(("safety", &self.sets.safety));
        roles.push(("benign", &self.sets.benign));
        roles.push(("capability", &self.sets.capability));
        roles
    }

    fn validate(&self) -> Result<()> {
        if self.samples == 0 || self.batch == 0 || self.max_tokens == 0 {
            bail!("samples, batch and max_tokens must be at least 1");
        }
        if self.thinking == Some(false) && self.max_thinking_tokens.is_some() {
            bail!("max_thinking_tokens is set but thinking = false: remove one of them");
        }
        if self.samples > 1 && self.temperature <= 0.0 {
            bail!(
                "samples = {} needs temperature > 0 (greedy answers would all be the same)",
                self.samples
            );
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            bail!(
                "repetition_penalty must be positive (1 is off, 1.1 a light penalty), got {}",
                self.repetition_penalty
            );
        }
        let t = &self.tune;
        if t.strengths.is_empty() || t.strengths.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            bail!("tune.strengths must be a non-empty list of positive magnitudes (the sign comes from `direction`)");
        }
        t.gate_budgets
            .check()
            .map_err(|e| anyhow::anyhow!("tune.gate_budgets: {e}"))?;
        if !(0.0..=1.0).contains(&t.min_depth) {
            bail!(
                "tune.min_depth is a fraction of the depth in [0, 1], got {}",
                t.min_depth
            );
        }
        for (role, set) in self.roles() {
            if set.sources.is_empty() {
                bail!("set \"{role}\" has no sources");
            }
            let multiple_choice = role == "capability";
            for s in &set.sources {
                if multiple_choice == (s.kind == SourceKind::Prompts) {
                    bail!(
                        "set \"{role}\" source {}: {}",
                        s.path.display(),
                        if multiple_choice {
                            "capability sources are multiple choice (kind = \"mmlu\" or \"arc\")"
                        } else {
                            "only the capability set takes multiple-choice sources"
                        }
                    );
                }
            }
            let need_train = !multiple_choice;
            let need_eval = role != "contrast";
            if (need_train && set.train == 0) || (need_eval && (set.test == 0)) {
                bail!(
                    "set \"{role}\" has an empty split (train {}, validation {}, test {}); {role} needs {}",
                    set.train,
                    set.validation,
                    set.test,
                    match (need_train, need_eval) {
                        (true, true) => "train and test prompts",
                        (true, false) => "train prompts",
                        _ => "test items",
                    }
                );
            }
            if matches!(role, "target" | "safety" | "benign") && set.validation == 0 {
                bail!("set \"{role}\" needs validation prompts: the strength search runs on them");
            }
        }
        Ok(())
    }

    /// What an answer depends on besides its prompt: a run folder's answers are reused only
    /// under the same model and decoding.
    pub fn answer_settings(&self) -> String {
        format!(
            "model {}, samples {}, temperature {}, max_tokens {}, repetition_penalty {}",
            self.model, self.samples, self.temperature, self.max_tokens, self.repetition_penalty
        )
    }

    /// The data directory: the config's, else $REFUSAL_STEER_DATA, else ../shared/data.
    pub fn data_dir(&self) -> Result<PathBuf> {
        let dir = self
            .data_dir
            .clone()
            .or_else(|| std::env::var_os("REFUSAL_STEER_DATA").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("../shared/data"));
        if !dir.is_dir() {
            bail!(
                "data directory {} not found; set data_dir in the config or REFUSAL_STEER_DATA to the folder holding the prompt sets",
                dir.display()
            );
        }
        Ok(dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_configs_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                RunConfig::load(&path).unwrap();
                seen += 1;
            }
        }
        assert!(
            seen >= 3,
            "expected the default, 1.5B and GPU configs in {}",
            dir.display()
        );
    }

    #[test]
    fn the_default_config_parses_and_bad_ones_explain() {
        let config = RunConfig::default_config();
        assert_eq!(config.model, "qwen2.5-coder-0.5b-instruct");
        let bad = |edit: &dyn Fn(&mut toml::Value)| {
            let mut value: toml::Value = toml::from_str(DEFAULT_CONFIG).unwrap();
            edit(&mut value);
            let text = toml::to_string(&value).unwrap();
            format!(
                "{:#}",
                RunConfig::parse(&text, Path::new("x.toml")).unwrap_err()
            )
        };
        let err = bad(&|v| {
            v["sets"]["benign"]["test"] = toml::Value::Integer(0);
        });
        assert!(err.contains("\"benign\" has an empty split"), "{err}");
        let err = bad(&|v| {
            v["sets"]
                .as_table_mut()
                .unwrap()
                .insert("extra".into(), toml::Value::Integer(1));
        });
        assert!(err.contains("unknown field `extra`"), "{err}");
        let err = bad(&|v| {
            v["tune"]["strengths"] = toml::Value::Array(vec![]);
        });
        assert!(err.contains("tune.strengths"), "{err}");
        let err = bad(&|v| {
            v["sets"]["safety"]["sources"][0]
                .as_table_mut()
                .unwrap()
                .insert("kind".into(), toml::Value::String("mmlu".into()));
        });
        assert!(err.contains("only the capability set"), "{err}");
        let with_budgets = |budgets: &str| {
            bad(&|v| {
                let budgets = toml::from_str(budgets).unwrap();
                v["tune"]
                    .as_table_mut()
                    .unwrap()
                    .insert("gate_budgets".into(), budgets);
            })
        };
        let err = with_budgets("harmful = 1.5\noff_topic = 0.03");
        assert!(err.contains("harmful budget is 1.5"), "{err}");
        let err = with_budgets("harmful = 0.01");
        assert!(err.contains("missing field `off_topic`"), "{err}");
    }

    #[test]
    fn gate_budgets_are_read_and_left_out_when_default() {
        let mut config = RunConfig::default_config();
        assert_eq!(config.tune.gate_budgets, Budgets::DEFAULT);
        assert!(!toml::to_string(&config).unwrap().contains("gate_budgets"));
        config.tune.gate_budgets = Budgets::new(0.01, 0.05).unwrap();
        let text = toml::to_string(&config).unwrap();
        let back = RunConfig::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(back.tune.gate_budgets, Budgets::new(0.01, 0.05).unwrap());
    }
}
