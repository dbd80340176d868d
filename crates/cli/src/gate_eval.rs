//! `refusal-steer gate-eval`: the topic gate measured on a labelled prompt corpus
//! (`data/gate/prompts.jsonl`), each source held out in turn; pass rates per set, source and
//! language with Wilson intervals.

use crate::ModelArg;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use refusal_steer_data::activations::Activations;
use refusal_steer_data::lock::OutputLock;
use refusal_steer_data::{read_prompts, Prompt};
use refusal_steer_pipeline::answers::Format;
use refusal_steer_pipeline::capture::{capture, CaptureJob};
use refusal_steer_pipeline::gate::eval::{
    leave_one_source_out, markdown, pass_rates, read_corpus, Roles,
};
use refusal_steer_pipeline::gate::{Budgets, FitSettings, GateMethod};
use refusal_steer_steer::Ridge;
use std::path::PathBuf;

#[derive(Args)]
pub struct GateEvalArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The gate corpus: JSONL lines with "id", "prompt", "set", "source" and "lang"
    /// (data/gate/prompts.jsonl; data/gate/make_prompts.py builds it).
    #[arg(long)]
    prompts: PathBuf,
    /// Where the corpus's activations are kept (captured on the first call at the method's
    /// pooling; rerun to resume).
    #[arg(long)]
    acts: PathBuf,
    #[arg(long, value_enum, default_value_t = Method::Ridge)]
    method: Method,
    /// Relative ridge of the `ridge` and `rmd` gates.
    #[arg(long, default_value_t = 1.0)]
    kappa: f64,
    /// Sets the gate lets in.
    #[arg(long, value_delimiter = ',', default_value = "china,contrast")]
    on: Vec<String>,
    /// Sets it must keep out: the veto's positives. Every other set is off the topic.
    #[arg(long, value_delimiter = ',', default_value = "harmful")]
    harmful: Vec<String>,
    /// The share of harmful train prompts the ridge gate may let in, out of fold.
    #[arg(long, default_value_t = Budgets::DEFAULT.harmful)]
    harmful_budget: f64,
    /// The share of other off-topic train prompts the ridge gate may let in, out of fold.
    #[arg(long, default_value_t = Budgets::DEFAULT.off_topic)]
    off_topic_budget: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the rates and what the held-out gate made of each prompt as JSON.
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

#[derive(Clone, Copy, ValueEnum, Debug)]
enum Method {
    Ridge,
    Md,
    Rmd,
}

pub fn run(args: GateEvalArgs) -> Result<()> {
    let method = match args.method {
        Method::Ridge => GateMethod::Ridge,
        Method::Md => GateMethod::Md,
        Method::Rmd => GateMethod::Rmd,
    };
    let settings = FitSettings {
        budgets: Budgets::new(args.harmful_budget, args.off_topic_budget)
            .map_err(anyhow::Error::msg)?,
        seed: args.seed,
        ..FitSettings::new(method, Ridge::Relative(args.kappa))
    };
    let corpus = read_corpus(&args.prompts)?;
    let prompts: Vec<Prompt> = read_prompts(&args.prompts)?;
    let position = method.pooling().capture_position();
    {
        let _lock = OutputLock::acquire(&args.acts)?;
        let model = args.model.load()?;
        let progress = ProgressBar::new(prompts.len() as u64);
        progress.set_style(ProgressStyle::with_template(
            "capturing {bar:40} {pos}/{len} prompts  {elapsed} elapsed, ETA {eta}",
        )?);
        let job = CaptureJob {
            prompts: &prompts,
            format: &Format::default(),
            position,
            answers: None,
            batch: args.batch,
        };
        capture(&model, &job, &args.acts, &progress)?;
        progress.finish_and_clear();
    }
    let acts = Activations::load(&args.acts)?;
    let roles = Roles {
        on: args.on,
        harmful: args.harmful,
    };
    let decisions = leave_one_source_out(&acts, &corpus, &roles, &settings, &mut |line| {
        eprintln!("{line}")
    })?;
    let passed: Vec<bool> = decisions.iter().map(|d| d.gated_in).collect();
    let rates = pass_rates(&corpus, &passed);
    print!("{}", markdown(&rates));
    if let Some(out) = &args.out {
        let per_prompt: Vec<serde_json::Value> = corpus
            .iter()
            .zip(&decisions)
            .map(|(p, d)| serde_json::json!({"id": p.id, "set": p.set, "source": p.source, "lang": p.lang, "gate": d}))
            .collect();
        let json = serde_json::json!({
            "method": method,
            "kappa": args.kappa,
            "budgets": settings.budgets,
            "on": roles.on,
            "harmful": roles.harmful,
            "rates": rates,
            "prompts": per_prompt,
        });
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}
