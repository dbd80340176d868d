//! `refusal-steer fit`: one steering vector per point from captured activations and labels
//! (judge scores or explicit labels), with each point's held-out separability.

use anyhow::{bail, Context, Result};
use clap::Args;
use refusal_steer_data::activations::Activations;
use refusal_steer_data::record_id;
use refusal_steer_steer::{
    fit, k_fold_auc, Class, FitError, Method, Ridge, Samples, SteeringVectors,
};
use std::collections::{BTreeMap, HashMap};
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
    #[arg(long, default_value_t = 0.1)]
    threshold: f64,
    /// Folds for the held-out AUC of each point.
    #[arg(long, default_value_t = 5)]
    folds: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
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

pub fn run(args: FitArgs) -> Result<()> {
    let acts = Activations::load(&args.acts)?;
    let labels = read_labels(&args.labels)?;
    let h = &acts.header;
    let classes: Vec<Class> = h
        .ids
        .iter()
        .map(|id| match labels.get(id) {
            Some(&c) if c > args.threshold => Class::Refusal,
            Some(&c) if c < -args.threshold => Class::Compliance,
            _ => Class::Unused,
        })
        .collect();
    let weights: Vec<f64> = h
        .ids
        .iter()
        .map(|id| labels.get(id).map_or(0.0, |c| c.abs()))
        .collect();
    let count = |k: Class| classes.iter().filter(|&&c| c == k).count();
    eprintln!(
        "{} refusal, {} compliance, {} unused prompts",
        count(Class::Refusal),
        count(Class::Compliance),
        count(Class::Unused)
    );
    let ridge = match args.lambda {
        Some(l) => Ridge::Absolute(l),
        None => Ridge::Relative(args.kappa),
    };
    let mut vectors = vec![0f32; h.n_points * h.d];
    let (mut norms, mut aucs, mut lambdas) = (Vec::new(), Vec::new(), Vec::new());
    for point in 0..h.n_points {
        let x = acts.at_point(point);
        let samples = Samples::new(&x, h.d, &classes, &weights)?;
        let fitted = match fit(&samples, args.method, ridge) {
            Ok(f) => f,
            // Every prompt ends with the same template token, so at the embeddings (and only
            // there) the compliant activations can be identical: no direction to find.
            Err(FitError::NoSpread) => {
                eprintln!("point {point:>3}: compliant activations are all equal; zero vector");
                norms.push(0.0);
                lambdas.push(None);
                aucs.push(0.5);
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("fitting point {point}")),
        };
        vectors[point * h.d..(point + 1) * h.d].copy_from_slice(&fitted.vector);
        norms.push(fitted.report.norm);
        lambdas.push(fitted.report.lambda);
        aucs.push(
            k_fold_auc(&samples, args.method, ridge, args.folds, args.seed)
                .with_context(|| format!("held-out AUC at point {point}"))?,
        );
        eprintln!(
            "point {point:>3}: norm {:>10.4}  held-out AUC {:.3}",
            fitted.report.norm, aucs[point]
        );
    }
    // Recommend the points that separate best on held-out prompts: within 0.02 of the best.
    let best = aucs.iter().copied().fold(f64::MIN, f64::max);
    let recommended: Vec<usize> = (1..h.n_points)
        .filter(|&p| aucs[p] >= best - 0.02)
        .collect();
    let mut metadata = BTreeMap::from([
        ("method".to_string(), args.method.to_string()),
        ("ridge".to_string(), format!("{ridge:?}")),
        (
            "lambda_per_point".to_string(),
            serde_json::to_string(&lambdas)?,
        ),
        ("norm_per_point".to_string(), serde_json::to_string(&norms)?),
        (
            "heldout_auc_per_point".to_string(),
            serde_json::to_string(&aucs)?,
        ),
        (
            "recommended_points".to_string(),
            serde_json::to_string(&recommended)?,
        ),
        ("n_refusal".to_string(), count(Class::Refusal).to_string()),
        (
            "n_compliance".to_string(),
            count(Class::Compliance).to_string(),
        ),
        (
            "sign".to_string(),
            "compliance -> refusal: negative alpha removes refusals".to_string(),
        ),
    ]);
    for key in ["model", "model_sha256", "position", "format"] {
        if let Some(v) = h.metadata.get(key) {
            metadata.insert(key.to_string(), v.clone());
        }
    }
    SteeringVectors::new(vectors, h.n_points, h.d, metadata)?.save(&args.out)?;
    println!(
        "wrote {} (recommended points {:?})",
        args.out.display(),
        recommended
    );
    Ok(())
}
