//! `refusal-steer judge` and `score`: verdicts per answer and refusal confidence per prompt,
//! and the judge setup `run` and `calibrate` share.

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use refusal_steer_data::lock::OutputLock;
use refusal_steer_data::{Answer, JsonlAppender};
use refusal_steer_judge::factory::{self, JudgeOptions, Mode, Plan, Server};
use refusal_steer_judge::{
    aggregate, assess, Assessment, Judge, PromptClass, Thresholds, VerdictCache, VerdictKind,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModeArg {
    /// The LLM's probability of "refusal" vs "not refusal" at the verdict (one forward pass).
    VerdictProb,
    /// The paper's: the LLM reasons, then writes <answer>refusal|not refusal</answer>.
    Sampled,
    /// Marker strings.
    Patterns,
    /// A probe judge's linear read-out of its judge model's residual stream.
    Probe,
}

impl From<ModeArg> for Mode {
    fn from(mode: ModeArg) -> Self {
        match mode {
            ModeArg::VerdictProb => Mode::VerdictProb,
            ModeArg::Sampled => Mode::Sampled,
            ModeArg::Patterns => Mode::Patterns,
            ModeArg::Probe => Mode::Probe,
        }
    }
}

/// Which judge, and how it is set up.
#[derive(Args, Clone)]
pub struct JudgeSetup {
    /// How to judge: a catalogue name or .gguf path (an LLM judge), `patterns` (the
    /// refusal_direction markers), `patterns:jailbreakbench`, `patterns:FILE.json`, `probe`
    /// (the built-in probe judge, reading with Qwen2.5-Coder-1.5B), `probe:qwen2.5-coder-0.5b`
    /// (the built-in one on the 0.5B) or `probe:FILE` (default: probe, unless --judge-url is
    /// given).
    #[arg(long = "judge", num_args = 1..)]
    judges: Vec<String>,
    /// How LLM judges decide (default verdict-prob); `calibrate` runs each judge in every
    /// listed mode that fits it.
    #[arg(long = "mode", value_enum, num_args = 1..)]
    modes: Vec<ModeArg>,
    /// Answers per forward pass of a local LLM judge.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Instruction template for an LLM judge, with {question} and {answer} placeholders
    /// (default: ours, covering the twelve refusal types, with the verdict line of the mode).
    #[arg(long)]
    instruction: Option<PathBuf>,
    /// Text that opens the judge's reply, right before the label, with --instruction
    /// (default: "Verdict:" for verdict-prob, nothing for sampled).
    #[arg(long)]
    answer_prefix: Option<String>,
    /// An LLM judge's p_refusal above this is a refusal (`calibrate` suggests one).
    #[arg(long, default_value_t = refusal_steer_judge::local::DEFAULT_THRESHOLD)]
    threshold: f64,
    /// Judge on an OpenAI-compatible server, e.g. http://host:8000/v1 (API key from
    /// REFUSAL_STEER_JUDGE_API_KEY or OPENAI_API_KEY).
    #[arg(long)]
    judge_url: Option<String>,
    /// The model name the --judge-url server serves.
    #[arg(long, requires = "judge_url")]
    judge_model: Option<String>,
    /// Requests to the judge server in flight at once.
    #[arg(long, default_value_t = 8)]
    judge_concurrency: usize,
    /// Seconds one request to the judge server may take.
    #[arg(long, default_value_t = 120)]
    judge_timeout: u64,
    /// Retries of a request that failed with 429, 5xx or a network error (exponential
    /// backoff from 1 s).
    #[arg(long, default_value_t = 4)]
    judge_retries: u32,
    /// Tokens the judge may write in sampled mode (its reasoning and verdict).
    #[arg(long, default_value_t = 384)]
    judge_max_tokens: usize,
}

impl JudgeSetup {
    /// Every (judge, mode) to run: each judge in each listed mode that fits it.
    pub(crate) fn plans(&self) -> Result<Vec<Plan>> {
        let modes: Vec<Mode> = self.modes.iter().map(|&m| m.into()).collect();
        factory::plans(&self.judges, &modes, self.judge_url.is_some())
    }

    pub(crate) fn build(&self, plan: &Plan) -> Result<Box<dyn Judge>> {
        let server = self.judge_url.as_ref().map(|url| Server {
            url: url.clone(),
            model: self.judge_model.clone(),
            concurrency: self.judge_concurrency,
            timeout: std::time::Duration::from_secs(self.judge_timeout),
            retries: self.judge_retries,
        });
        let options = JudgeOptions {
            batch: self.batch,
            instruction: self.instruction.clone(),
            answer_prefix: self.answer_prefix.clone(),
            threshold: self.threshold,
            max_tokens: self.judge_max_tokens,
            server,
        };
        factory::build(plan, &options)
    }

    /// Answers handed to the judge at a time: a remote judge keeps all its connections busy.
    pub(crate) fn chunk_size(&self, plan: &Plan) -> usize {
        match plan.spec {
            None => self.judge_concurrency.max(1) * 4,
            Some(_) => self.batch,
        }
    }
}

impl JudgeSetup {
    /// No judge named: neither --judge nor --judge-url.
    pub(crate) fn is_empty(&self) -> bool {
        self.judges.is_empty() && self.judge_url.is_none()
    }

    /// Answers per forward pass of a local judge.
    pub(crate) fn batch(&self) -> usize {
        self.batch
    }

    /// The one judge of a `run`: --judge-url, else --judge, else the config's `default`
    /// (with the config's threshold unless --threshold moved it). Returns its spec and itself.
    pub fn build_for_run(
        &self,
        default: &str,
        default_threshold: f64,
    ) -> Result<(String, Box<dyn Judge>)> {
        if self.judges.len() > 1 || self.modes.len() > 1 {
            bail!("run takes one judge and one mode");
        }
        let mut setup = self.clone();
        if setup.judges.is_empty() && setup.judge_url.is_none() {
            setup.judges.push(default.to_string());
        }
        if setup.threshold == refusal_steer_judge::local::DEFAULT_THRESHOLD {
            setup.threshold = default_threshold;
        }
        let plans = setup.plans()?;
        let plan = &plans[0];
        let spec = plan.spec.clone().unwrap_or_else(|| {
            format!(
                "{} at {}",
                setup.judge_model.clone().unwrap_or_default(),
                setup.judge_url.clone().unwrap_or_default()
            )
        });
        Ok((spec, setup.build(plan)?))
    }
}

/// Judges `items` in batches with a progress bar.
pub(crate) fn assess_all(
    judge: &mut dyn Judge,
    cache: &mut VerdictCache,
    items: &[(&str, &str)],
    batch: usize,
    mut on_batch: impl FnMut(usize, &[Assessment]) -> Result<()>,
) -> Result<()> {
    let progress = ProgressBar::new(items.len() as u64);
    progress.set_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} answers  {elapsed} elapsed, ETA {eta}",
    )?);
    for (n, chunk) in items.chunks(batch).enumerate() {
        let assessed = assess(judge, cache, chunk)?;
        on_batch(n * batch, &assessed)?;
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok(())
}

/// Reads complete JSONL records without touching the file: another stage may still be
/// appending to it, so a last line without its newline is left out, not cut off.
fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path, what: &str) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading {}; expected {what}", path.display()))?;
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    let mut records = Vec::new();
    for (n, line) in complete.lines().enumerate() {
        if !line.trim().is_empty() {
            records.push(
                serde_json::from_str(line).with_context(|| {
                    format!("{}:{}: not a line of {what}", path.display(), n + 1)
                })?,
            );
        }
    }
    if records.is_empty() {
        bail!("{}: no records; expected {what}", path.display());
    }
    Ok(records)
}

const ANSWERS: &str = "`refusal-steer generate` output";
const VERDICTS: &str = "`refusal-steer judge` output";

#[derive(Args)]
pub struct JudgeArgs {
    /// Answers from `generate` (JSONL).
    #[arg(long)]
    answers: PathBuf,
    /// One verdict per answer (JSONL); rerunning skips answers already judged.
    #[arg(long)]
    out: PathBuf,
    /// Verdict cache keyed by (judge, mode, prompt, answer) (default: OUT with .cache.jsonl).
    #[arg(long)]
    cache: Option<PathBuf>,
    #[command(flatten)]
    setup: JudgeSetup,
}

/// One line of the verdicts file.
#[derive(Serialize, Deserialize)]
struct VerdictLine {
    id: String,
    sample: usize,
    /// +1 refusal (degenerate answers included), -1 not a refusal, 0 unparsable.
    label: i8,
    p_refusal: Option<f64>,
    /// The refusal's type, when the judge tells types apart (the probe judge does).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<VerdictKind>,
    /// `empty`, `loop` or `garbage` when the answer is not a real answer.
    degenerate: Option<String>,
    judge: String,
    mode: String,
}

pub fn run(args: JudgeArgs) -> Result<()> {
    let [plan] = args.setup.plans()?.try_into().map_err(|plans: Vec<Plan>| {
        anyhow::anyhow!(
            "judge takes one judge in one mode, got {}; `calibrate` compares several",
            plans
                .iter()
                .map(Plan::describe)
                .collect::<Vec<_>>()
                .join(", ")
        )
    })?;
    let answers: Vec<Answer> = read_jsonl(&args.answers, ANSWERS)?;
    let _lock = OutputLock::acquire(&args.out)?;
    let (mut out, done) = JsonlAppender::open::<VerdictLine>(&args.out)?;
    let done: HashSet<(String, usize)> = done.into_iter().map(|v| (v.id, v.sample)).collect();
    let mut todo: Vec<&Answer> = answers
        .iter()
        .filter(|a| !done.contains(&(a.id.clone(), a.sample)))
        .collect();
    if todo.is_empty() {
        eprintln!("all {} answers are already judged", answers.len());
        return Ok(());
    }
    // Similar lengths together waste less work on padding.
    todo.sort_by_key(|a| a.prompt.len() + a.answer.len());
    let cache_path = args
        .cache
        .unwrap_or_else(|| args.out.with_extension("cache.jsonl"));
    let mut cache = VerdictCache::open(&cache_path)?;
    let mut judge = args.setup.build(&plan)?;
    let (id, mode) = (judge.id(), judge.mode().to_string());
    let items: Vec<(&str, &str)> = todo
        .iter()
        .map(|a| (a.prompt.as_str(), a.answer.as_str()))
        .collect();
    assess_all(
        judge.as_mut(),
        &mut cache,
        &items,
        args.setup.chunk_size(&plan),
        |start, assessed| {
            for (answer, a) in todo[start..].iter().zip(assessed) {
                out.append(&VerdictLine {
                    id: answer.id.clone(),
                    sample: answer.sample,
                    label: a.verdict.label,
                    p_refusal: a.verdict.p_refusal,
                    kind: a.verdict.kind,
                    degenerate: a.degenerate.map(|d| d.as_str().to_string()),
                    judge: id.clone(),
                    mode: mode.clone(),
                })?;
            }
            Ok(())
        },
    )?;
    eprintln!(
        "judged {} answers with {id} -> {}",
        todo.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct ScoreArgs {
    /// Verdicts from `judge`.
    #[arg(long)]
    verdicts: PathBuf,
    /// The answers that were judged (for each answer's mean log-probability).
    #[arg(long)]
    answers: PathBuf,
    /// One line per prompt: {"id", "set", "c", "class", "n"} (readable by `fit --labels`).
    #[arg(long)]
    out: PathBuf,
    /// c above this is a refusal.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    refusal_threshold: f64,
    /// c below this is a compliance.
    #[arg(long, default_value_t = -0.1, allow_negative_numbers = true)]
    compliance_threshold: f64,
}

#[derive(Serialize)]
struct ScoreLine<'a> {
    id: &'a str,
    set: Option<&'a str>,
    c: f64,
    class: PromptClass,
    /// Answers aggregated.
    n: usize,
}

pub fn score(args: ScoreArgs) -> Result<()> {
    if args.compliance_threshold > args.refusal_threshold {
        bail!("--compliance-threshold must not exceed --refusal-threshold");
    }
    let thresholds = Thresholds {
        refusal: args.refusal_threshold,
        compliance: args.compliance_threshold,
    };
    let answers: Vec<Answer> = read_jsonl(&args.answers, ANSWERS)?;
    let verdicts: Vec<VerdictLine> = read_jsonl(&args.verdicts, VERDICTS)?;
    let labels: HashMap<(&str, usize), i8> = verdicts
        .iter()
        .map(|v| ((v.id.as_str(), v.sample), v.label))
        .collect();
    let missing = answers
        .iter()
        .filter(|a| !labels.contains_key(&(a.id.as_str(), a.sample)))
        .count();
    if missing > 0 {
        bail!(
            "{missing} of {} answers have no verdict in {}; run `refusal-steer judge` on {} first",
            answers.len(),
            args.verdicts.display(),
            args.answers.display()
        );
    }
    // Prompts in the order they first appear in the answers file.
    let mut order: Vec<&str> = Vec::new();
    let mut by_prompt: HashMap<&str, Vec<&Answer>> = HashMap::new();
    for a in &answers {
        by_prompt
            .entry(a.id.as_str())
            .or_insert_with(|| {
                order.push(a.id.as_str());
                Vec::new()
            })
            .push(a);
    }
    let mut text = String::new();
    let mut counts: HashMap<PromptClass, usize> = HashMap::new();
    for id in order {
        let group = &by_prompt[id];
        let samples: Vec<(i8, f64)> = group
            .iter()
            .map(|a| {
                (
                    labels[&(a.id.as_str(), a.sample)],
                    f64::from(a.mean_logprob),
                )
            })
            .collect();
        let s = aggregate(&samples, &thresholds).with_context(|| format!("prompt {id}"))?;
        *counts.entry(s.class).or_default() += 1;
        text.push_str(&serde_json::to_string(&ScoreLine {
            id,
            set: group[0].set.as_deref(),
            c: s.c,
            class: s.class,
            n: group.len(),
        })?);
        text.push('\n');
    }
    std::fs::write(&args.out, text).with_context(|| format!("writing {}", args.out.display()))?;
    let count = |c| counts.get(&c).copied().unwrap_or(0);
    eprintln!(
        "{} refusal, {} compliance, {} neutral prompts -> {}",
        count(PromptClass::Refusal),
        count(PromptClass::Compliance),
        count(PromptClass::Neutral),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::{run, Cli};
    use clap::Parser;
    use std::path::Path;

    fn refusal_steer(args: &[&str]) -> anyhow::Result<()> {
        let mut argv = vec!["refusal-steer"];
        argv.extend_from_slice(args);
        run(Cli::try_parse_from(argv)?.command)
    }

    fn lines(path: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Two refused and two answered prompts, two samples each (one refused prompt has a
    /// compliant second sample with a lower log-probability).
    fn write_answers(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let prompts = dir.join("prompts.jsonl");
        let answers = dir.join("answers.jsonl");
        let mut p = String::new();
        let mut a = String::new();
        let cases = [
            (
                "r1",
                "the cat",
                ["I'm sorry, I cannot help.", "I cannot do that."],
            ),
            (
                "r2",
                "in an hour",
                ["As an AI I must decline.", "Sure: in an hour there."],
            ),
            (
                "c1",
                "the end",
                ["The end is near, they said.", "It ends at noon."],
            ),
            (
                "c2",
                "an hat",
                ["A hat is worn on the head.", "Hats keep the sun off."],
            ),
        ];
        for (id, prompt, outs) in cases {
            p.push_str(&serde_json::json!({"id": id, "prompt": prompt, "set": "s"}).to_string());
            p.push('\n');
            for (sample, answer) in outs.iter().enumerate() {
                let line = serde_json::json!({
                    "id": id, "sample": sample, "set": "s", "prompt": prompt, "answer": answer,
                    "n_tokens": 5, "mean_logprob": -0.5 - sample as f64, "finish_reason": "stop",
                });
                a.push_str(&line.to_string());
                a.push('\n');
            }
        }
        std::fs::write(&prompts, p).unwrap();
        std::fs::write(&answers, a).unwrap();
        (prompts, answers)
    }

    #[test]
    fn judge_score_and_fit_work_end_to_end_and_rerun_for_free() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
        let dir = tempfile::tempdir().unwrap();
        let d = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
        let model = d("tiny.gguf");
        refusal_steer_engine::tiny::write(Path::new(&model)).unwrap();
        let (prompts, answers) = write_answers(dir.path());
        // A line `generate` is still writing: judged later, never cut off.
        let torn = r#"{"id": "late", "sam"#;
        let mut text = std::fs::read_to_string(&answers).unwrap();
        text.push_str(torn);
        std::fs::write(&answers, &text).unwrap();
        let answers = answers.to_string_lossy().into_owned();

        // The LLM judge runs through the CLI and writes a probability per answer (a short
        // instruction: the tiny model's context is 256 byte-level tokens).
        let llm = d("llm.jsonl");
        let instruction = d("instruction.txt");
        std::fs::write(&instruction, "Q: {question}\nA: {answer}\nRefusal?").unwrap();
        refusal_steer(&[
            "judge",
            "--answers",
            &answers,
            "--out",
            &llm,
            "--judge",
            &model,
            "--batch",
            "3",
            "--instruction",
            &instruction,
        ])
        .unwrap();
        let verdicts = lines(Path::new(&llm));
        assert_eq!(verdicts.len(), 8);
        // The three short refusals are refusals without a call to the judge.
        let short: Vec<&serde_json::Value> = verdicts
            .iter()
            .filter(|v| v["p_refusal"].is_null())
            .collect();
        assert_eq!(short.len(), 3, "{verdicts:?}");
        assert!(short
            .iter()
            .all(|v| v["label"] == 1 && v["kind"] == "refusal"));
        for v in &verdicts {
            if let Some(p) = v["p_refusal"].as_f64() {
                assert!((0.0..=1.0).contains(&p), "{v}");
            }
            assert_eq!(v["mode"], "verdict-prob");
        }
        assert!(Path::new(&d("llm.cache.jsonl")).is_file());
        assert_eq!(std::fs::read_to_string(&answers).unwrap(), text);

        // Patterns: deterministic labels, so the scores can be checked.
        let verdicts = d("verdicts.jsonl");
        let judge = [
            "judge",
            "--answers",
            &answers,
            "--out",
            &verdicts,
            "--judge",
            "patterns",
        ];
        refusal_steer(&judge).unwrap();
        let first = std::fs::read_to_string(&verdicts).unwrap();
        refusal_steer(&judge).unwrap();
        assert_eq!(std::fs::read_to_string(&verdicts).unwrap(), first);
        let scores = d("scores.jsonl");
        refusal_steer(&[
            "score",
            "--verdicts",
            &verdicts,
            "--answers",
            &answers,
            "--out",
            &scores,
        ])
        .unwrap();
        let scores = lines(Path::new(&scores));
        let c: Vec<(String, f64, String)> = scores
            .iter()
            .map(|s| {
                (
                    s["id"].as_str().unwrap().to_string(),
                    s["c"].as_f64().unwrap(),
                    s["class"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        // r2: weights e^-0.5 : e^-1.5 on (+1, -1): c = tanh(0.5).
        assert_eq!(c[0], ("r1".into(), 1.0, "refusal".into()));
        assert_eq!(c[1].0, "r2");
        assert!((c[1].1 - 0.5f64.tanh()).abs() < 1e-6, "{}", c[1].1);
        assert_eq!(c[2], ("c1".into(), -1.0, "compliance".into()));

        // `fit` reads the scores as labels.
        let acts = d("acts.safetensors");
        refusal_steer(&[
            "capture",
            "--model",
            &model,
            "--prompts",
            prompts.to_str().unwrap(),
            "--out",
            &acts,
        ])
        .unwrap();
        refusal_steer(&[
            "fit",
            "--acts",
            &acts,
            "--labels",
            &d("scores.jsonl"),
            "--method",
            "md",
            "--folds",
            "2",
            "--out",
            &d("v.safetensors"),
        ])
        .unwrap();
        assert!(Path::new(&d("v.safetensors")).is_file());
    }

    #[test]
    fn bad_judge_setups_and_missing_verdicts_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let (_, answers) = write_answers(dir.path());
        let answers = answers.to_string_lossy().into_owned();
        let out = dir.path().join("v.jsonl").to_string_lossy().into_owned();
        let err = refusal_steer(&[
            "judge",
            "--answers",
            &answers,
            "--out",
            &out,
            "--judge",
            "patterns",
            "--mode",
            "verdict-prob",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("needs an LLM judge"), "{err}");
        let stranger = r#"{"id":"zz","sample":0,"label":1,"p_refusal":null,"degenerate":null,"judge":"j","mode":"patterns"}"#;
        std::fs::write(&out, format!("{stranger}\n")).unwrap();
        let err = refusal_steer(&[
            "score",
            "--verdicts",
            &out,
            "--answers",
            &answers,
            "--out",
            &out,
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("8 of 8 answers have no verdict"),
            "{err}"
        );
        let err = refusal_steer(&[
            "judge",
            "--answers",
            "/nonexistent.jsonl",
            "--out",
            &out,
            "--judge",
            "patterns",
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("No such file"), "{err:#}");
    }
}
