//! `refusal-steer fit`: one steering vector per point from captured activations and labels
//! (judge scores or explicit labels), with each point's held-out separability.

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_steer_data::activations::Activations;
use refusal_steer_data::{read_prompts, record_id};
use refusal_steer_pipeline::fitting::{
    classes, fit_points, mean_difference, principal_directions_per_point, FitOptions, Strata,
};
use refusal_steer_steer::{Class, Method, Ridge};
use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub struct FitArgs {
    /// Activations from `capture`.
    #[arg(long)]
    acts: PathBuf,
    /// JSONL with, per prompt id, a judge score {"id", "c"} in [-1, 1] (>0 refusal) or a
    /// label {"id", "label": "refusal" | "compliance"}.
    #[arg(long)]
    labels: PathBuf,
    #[arg(long, default_value = "wrmd")]
    method: Method,
    /// Ridge relative to the layer's scale: lambda = kappa * trace(Sigma) / d.
    #[arg(long, default_value_t = 1.0, conflicts_with = "lambda")]
    kappa: f64,
    /// Ridge in absolute units (instead of --kappa).
    #[arg(long)]
    lambda: Option<f64>,
    /// |c| below this is neither class.
    #[arg(long, default_value_t = refusal_steer_data::CONFIDENCE_THRESHOLD)]
    threshold: f64,
    /// Folds for the held-out AUC of each point.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fit only on the prompts of these sets (comma-separated), e.g. "political,contrast".
    #[arg(long)]
    sets: Option<String>,
    /// Keep a behaviour still: remove from each point's vector the direction of set SET (its
    /// refused minus its answered prompts), or SET:CONTRAST (SET's mean minus CONTRAST's mean,
    /// e.g. harmful:harmless).
    #[arg(long, value_name = "SET[:CONTRAST]")]
    protect: Option<String>,
    /// Also protect the top K principal directions of the protected prompts measured from
    /// the other side's mean (the behaviour's subspace beyond its mean difference).
    #[arg(long, default_value_t = 0, requires = "protect", value_name = "K")]
    protect_pcs: usize,
    /// The prompts the activations were captured from (JSONL, as given to `capture`): the
    /// classes are then balanced by each prompt's language (its script), so refused English
    /// and answered Chinese prompts do not make the vector an English → Chinese one.
    #[arg(long, num_args = 1..)]
    prompts: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

/// Reads scores or labels into c per id.
pub(crate) fn read_labels(path: &Path) -> Result<HashMap<String, f64>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = HashMap::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        let v: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("{}: not valid JSON", at()))?;
        let Some(id) = record_id(v.get("id")) else {
            bail!("{}: missing \"id\" (a string or a number)", at())
        };
        let c = match (&v["c"], v["label"].as_str()) {
            (serde_json::Value::Number(c), _) => c.as_f64().filter(|c| (-1.0..=1.0).contains(c)),
            (_, Some("refusal")) => Some(1.0),
            (_, Some("compliance")) => Some(-1.0),
            _ => None,
        };
        let Some(c) = c else {
            bail!(
                "{}: needs \"c\" in [-1, 1] or \"label\": \"refusal\" | \"compliance\"",
                at()
            )
        };
        out.insert(id, c);
    }
    Ok(out)
}

/// Rows of the activations file whose set is `set`.
fn rows_of_set(acts: &Activations, set: &str) -> Result<Vec<usize>> {
    let rows: Vec<usize> = (0..acts.header.ids.len())
        .filter(|&i| acts.header.sets[i].as_deref() == Some(set))
        .collect();
    if rows.is_empty() {
        let mut known: Vec<&str> = acts
            .header
            .sets
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        known.sort_unstable();
        known.dedup();
        bail!("no prompts of set \"{set}\" in the activations; its sets are {known:?}");
    }
    Ok(rows)
}

pub fn run(args: FitArgs) -> Result<()> {
    let acts = Activations::load(&args.acts)?;
    let labels = read_labels(&args.labels)?;
    let h = &acts.header;
    let mut c: Vec<Option<f64>> = h.ids.iter().map(|id| labels.get(id).copied()).collect();
    if let Some(sets) = &args.sets {
        let keep: Vec<&str> = sets.split(',').map(str::trim).collect();
        for set in &keep {
            rows_of_set(&acts, set)?;
        }
        for (i, c) in c.iter_mut().enumerate() {
            if !h.sets[i].as_deref().is_some_and(|s| keep.contains(&s)) {
                *c = None;
            }
        }
    }
    let protect: Vec<Vec<f32>> = match &args.protect {
        None => Vec::new(),
        Some(spec) => {
            let (set, contrast) = match spec.split_once(':') {
                Some((s, c)) => (s, Some(c)),
                None => (spec.as_str(), None),
            };
            let rows = rows_of_set(&acts, set)?;
            let (a, b): (Vec<usize>, Vec<usize>) = match contrast {
                Some(contrast) => (rows, rows_of_set(&acts, contrast)?),
                // Without a contrast set: the set's own refused prompts minus its answered ones.
                None => {
                    let own: Vec<Option<f64>> = rows
                        .iter()
                        .map(|&i| labels.get(&h.ids[i]).copied())
                        .collect();
                    let classes = classes(&own, args.threshold);
                    let pick = |k: Class| {
                        rows.iter()
                            .zip(&classes)
                            .filter(|(_, &c)| c == k)
                            .map(|(&r, _)| r)
                            .collect()
                    };
                    (pick(Class::Refusal), pick(Class::Compliance))
                }
            };
            let mut directions =
                vec![mean_difference(&acts, &a, &b).with_context(|| format!("protecting {spec}"))?];
            directions.extend(
                principal_directions_per_point(&acts, &a, &b, args.protect_pcs)
                    .with_context(|| format!("protecting {spec}"))?,
            );
            directions
        }
    };
    let classes = classes(&c, args.threshold);
    let count = |k: Class| classes.iter().filter(|&&c| c == k).count();
    eprintln!(
        "{} refusal, {} compliance, {} unused prompts",
        count(Class::Refusal),
        count(Class::Compliance),
        count(Class::Unused)
    );
    let options = FitOptions {
        method: args.method,
        ridge: match args.lambda {
            Some(l) => Ridge::Absolute(l),
            None => Ridge::Relative(args.kappa),
        },
        threshold: args.threshold,
        folds: args.folds,
        seed: args.seed,
        balance: if args.prompts.is_empty() {
            None
        } else {
            let mut prompts = Vec::new();
            for path in &args.prompts {
                prompts.extend(read_prompts(path)?);
            }
            Some(Strata::prompt_scripts(&h.ids, &prompts)?)
        },
    };
    let mut vectors = fit_points(
        &acts,
        &c,
        &options,
        &protect.iter().map(Vec::as_slice).collect::<Vec<_>>(),
        &mut |m| eprintln!("{m}"),
    )?;
    if let Some(spec) = &args.protect {
        let pcs = match args.protect_pcs {
            0 => String::new(),
            k => format!(" and its top {k} principal directions"),
        };
        vectors
            .metadata
            .insert("protected".into(), format!("{spec}{pcs}"));
    }
    vectors.save(&args.out)?;
    let recommended = vectors
        .fit
        .as_ref()
        .map(|fit| fit.recommended_points())
        .unwrap_or_default();
    println!(
        "wrote {} (recommended points {recommended:?})",
        args.out.display()
    );
    Ok(())
}
