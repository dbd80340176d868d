//! Building a judge from what a user names: `patterns[:SET|FILE.json]` (marker lists),
//! `probe[:FILE]` (a probe judge), a catalogue name or `.gguf` path (a local LLM judge), or an
//! OpenAI-compatible server; each in the modes that fit it.

use crate::local::{JudgePrompt, DEFAULT_ANSWER_PREFIX, DEFAULT_THRESHOLD};
use crate::{
    Judge, LocalJudge, MarkerSet, PatternJudge, Probe, ProbeJudge, RemoteConfig, RemoteJudge,
    Scoring,
};
use anyhow::{bail, Context, Result};
use refusal_steer_catalog as catalog;
use refusal_steer_engine::Model;
use std::path::{Path, PathBuf};

/// The default judge: the probe judge, which agrees with the labelled corpus best in
/// cross-validation, for one prefill of its 1.5B reader per answer
/// (docs/results/judge-calibration.md).
pub const DEFAULT_JUDGE: &str = "probe";

/// The probe `--judge probe` means.
pub const DEFAULT_PROBE: &str = "qwen2.5-coder-1.5b";

/// How a judge decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The LLM's probability of "refusal" vs "not refusal" at the verdict (one forward pass).
    VerdictProb,
    /// The paper's: the LLM reasons, then writes <answer>refusal|not refusal</answer>.
    Sampled,
    /// Marker strings.
    Patterns,
    /// A probe judge's linear read-out of its judge model's residual stream.
    Probe,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::VerdictProb => "verdict-prob",
            Mode::Sampled => "sampled",
            Mode::Patterns => "patterns",
            Mode::Probe => "probe",
        }
    }
}

/// One judge to build: where it runs and how it decides.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// A judge name (see the module docs), or None for the server.
    pub spec: Option<String>,
    pub mode: Mode,
}

impl Plan {
    pub fn describe(&self) -> String {
        format!(
            "{} in mode {}",
            self.spec.as_deref().unwrap_or("--judge-url"),
            self.mode.name()
        )
    }
}

/// An OpenAI-compatible judge server.
#[derive(Debug, Clone)]
pub struct Server {
    pub url: String,
    /// The model name the server serves.
    pub model: Option<String>,
    pub concurrency: usize,
    pub timeout: std::time::Duration,
    pub retries: u32,
}

/// How judges are built.
#[derive(Debug, Clone)]
pub struct JudgeOptions {
    /// Answers per forward pass of a local LLM judge.
    pub batch: usize,
    /// Instruction template with {question} and {answer} (default: ours).
    pub instruction: Option<PathBuf>,
    /// Text that opens the judge's reply before the label, with `instruction`.
    pub answer_prefix: Option<String>,
    /// An LLM judge's p_refusal above this is a refusal.
    pub threshold: f64,
    /// Tokens the judge may write in sampled mode.
    pub max_tokens: usize,
    pub server: Option<Server>,
}

fn is_pattern_spec(spec: &str) -> bool {
    spec.strip_prefix("patterns")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(':'))
}

/// The mode a judge name is run in when it has only one.
fn only_mode(spec: &str) -> Option<Mode> {
    if is_pattern_spec(spec) {
        Some(Mode::Patterns)
    } else if spec == "probe" || spec.starts_with("probe:") {
        Some(Mode::Probe)
    } else {
        None
    }
}

/// Every (judge, mode) to run: each of `judges` (and the server, if any; the default judge
/// when nothing is named) in each of `modes` that fits it.
pub fn plans(judges: &[String], modes: &[Mode], server: bool) -> Result<Vec<Plan>> {
    let mut specs: Vec<Option<String>> = judges.iter().cloned().map(Some).collect();
    if server {
        specs.push(None);
    } else if specs.is_empty() {
        specs.push(Some(DEFAULT_JUDGE.to_string()));
    }
    let mut plans = Vec::new();
    for spec in specs {
        let only = spec.as_deref().and_then(only_mode);
        let fitting: Vec<Mode> = if modes.is_empty() {
            vec![only.unwrap_or(Mode::VerdictProb)]
        } else {
            modes
                .iter()
                .copied()
                .filter(|&m| match only {
                    Some(o) => m == o,
                    None => !matches!(m, Mode::Patterns | Mode::Probe),
                })
                .collect()
        };
        let name = spec.clone().unwrap_or_else(|| "--judge-url".into());
        if fitting.is_empty() {
            match only {
                Some(Mode::Patterns) => bail!("the --mode given needs an LLM judge, but --judge {name} is a pattern list (add --mode patterns to run it as one)"),
                Some(_) => bail!("--judge {name} is a probe judge, which runs in mode probe only"),
                None => bail!("--mode patterns needs --judge patterns[:SET] and --mode probe --judge probe:FILE, not {name}"),
            }
        }
        plans.extend(fitting.into_iter().map(|mode| Plan {
            spec: spec.clone(),
            mode,
        }));
    }
    Ok(plans)
}

/// Loads a catalogue name or `.gguf` path, fetching a catalogue model if it is not cached.
fn load_model(spec: &str) -> Result<(Model, PathBuf)> {
    let path = catalog::resolve(spec, &mut |msg| eprintln!("{msg}"))?;
    let model = Model::load(&path).with_context(|| format!("loading {}", path.display()))?;
    Ok((model, path))
}

/// The judge `plan` names, built as `options` say.
pub fn build(plan: &Plan, options: &JudgeOptions) -> Result<Box<dyn Judge>> {
    if options.batch == 0 {
        bail!("--batch must be at least 1");
    }
    let scoring = match plan.mode {
        Mode::VerdictProb => Scoring::VerdictProb,
        Mode::Sampled => Scoring::Sampled {
            max_tokens: options.max_tokens,
        },
        Mode::Probe => {
            let name = plan
                .spec
                .as_deref()
                .and_then(|s| s.strip_prefix("probe:"))
                .unwrap_or(DEFAULT_PROBE);
            let probe = match Probe::built_in_names().contains(&name) {
                true => Probe::built_in(name)?,
                false => Probe::load(Path::new(name))?,
            };
            let (model, path) = load_model(&probe.header.judge_model)?;
            let sha = catalog::model_sha256(&path)
                .with_context(|| format!("hashing {}", path.display()))?;
            let reader = LocalJudge::new(
                model,
                JudgePrompt::default(),
                Scoring::VerdictProb,
                options.batch,
                DEFAULT_THRESHOLD,
            )?;
            return Ok(Box::new(ProbeJudge::new(
                reader,
                &sha,
                probe,
                name.to_string(),
            )?));
        }
        Mode::Patterns => {
            let spec = plan.spec.as_deref().unwrap_or("patterns");
            let set = match spec
                .strip_prefix("patterns")
                .and_then(|s| s.strip_prefix(':'))
            {
                None => MarkerSet::built_in("refusal-direction")?,
                Some(name) if MarkerSet::built_in_names().contains(&name) => {
                    MarkerSet::built_in(name)?
                }
                Some(path) => MarkerSet::from_file(Path::new(path))?,
            };
            return Ok(Box::new(PatternJudge::new(set)));
        }
    };
    let prompt = match (&options.instruction, plan.mode) {
        (None, Mode::Sampled) => JudgePrompt::default_sampled(),
        (None, _) => JudgePrompt::default(),
        (Some(file), mode) => JudgePrompt::new(
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
            options.answer_prefix.clone().unwrap_or_else(|| match mode {
                Mode::Sampled => String::new(),
                _ => DEFAULT_ANSWER_PREFIX.to_string(),
            }),
        )?,
    };
    Ok(match (&plan.spec, &options.server) {
        (Some(spec), _) => {
            let (model, _) = load_model(spec)?;
            Box::new(LocalJudge::new(
                model,
                prompt,
                scoring,
                options.batch,
                options.threshold,
            )?)
        }
        (None, Some(server)) => {
            let Some(model) = &server.model else {
                bail!("--judge-url needs --judge-model, the model name the server serves");
            };
            let mut config = RemoteConfig::new(&server.url, model);
            config.concurrency = server.concurrency;
            config.timeout = server.timeout;
            config.retries = server.retries;
            Box::new(RemoteJudge::new(
                config,
                prompt,
                scoring,
                options.threshold,
            )?)
        }
        (None, None) => bail!("a judge plan without a judge name needs a server (--judge-url)"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_judge_runs_in_the_modes_that_fit_it() {
        let names = |p: &[Plan]| p.iter().map(Plan::describe).collect::<Vec<_>>();
        assert_eq!(
            names(&plans(&[], &[], false).unwrap()),
            vec![format!("{DEFAULT_JUDGE} in mode probe")]
        );
        let judges = ["m.gguf".to_string(), "probe".to_string()];
        assert_eq!(
            names(
                &plans(
                    &judges,
                    &[Mode::VerdictProb, Mode::Probe, Mode::Sampled],
                    true
                )
                .unwrap()
            ),
            vec![
                "m.gguf in mode verdict-prob",
                "m.gguf in mode sampled",
                "probe in mode probe",
                "--judge-url in mode verdict-prob",
                "--judge-url in mode sampled",
            ]
        );
        let err = plans(&["patterns".into()], &[Mode::Sampled], false).unwrap_err();
        assert!(err.to_string().contains("is a pattern list"), "{err}");
    }
}
