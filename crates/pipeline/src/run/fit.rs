//! Stage 4: the topic gate, the steering vectors (MD, WRMD, WRMD with the safety direction
//! protected) and the per-point analysis, from the train activations and scores.

use super::methods::{Fitted, FittedVectors};
use super::train::Scores;
use super::Ctx;
use crate::analysis_report::write_report;
use crate::answers::answer_seed;
use crate::capture::CapturePosition;
use crate::fitting::{fit_points, mean_difference, FitOptions, Strata};
use crate::gate::corpus::draw;
use crate::gate::{FitSettings, Gate, GateLabel};
use crate::sets::source_names;
use anyhow::{bail, Context, Result};
use refusal_steer_data::activations::Activations;
use refusal_steer_data::Prompt;
use refusal_steer_judge::Thresholds;
use refusal_steer_steer::analysis::{analyze, AnalysisOptions};
use refusal_steer_steer::{Method, Ridge, SteeringVectors};
use std::collections::{BTreeMap, HashMap, HashSet};

/// (refused, answered, neither) train prompts per set.
pub type TrainClasses = BTreeMap<String, (usize, usize, usize)>;

/// What stage 4 makes.
pub struct Fit {
    pub vectors: FittedVectors,
    pub gate: Gate,
    pub train_classes: TrainClasses,
    /// Held-out AUC per point, per fitted file (by name).
    pub heldout_auc: BTreeMap<String, Vec<Option<f64>>>,
}

/// Stage 4. Everything steered is discarded first if its inputs changed (the folder's rule).
pub fn fit(
    ctx: &Ctx,
    acts: &Activations,
    train: &[Prompt],
    exclude: &HashSet<&str>,
    scores: &Scores,
    log: &mut dyn FnMut(&str),
) -> Result<Fit> {
    let gate = topic_gate(ctx, acts, train, exclude)?;
    let balance = ctx
        .config
        .balance_language
        .then(|| Strata::prompt_scripts(&acts.header.ids, train))
        .transpose()?;
    let inputs = serde_json::json!({
        "gate": gate,
        "scores": scores.records,
        "balance_language": ctx.config.balance_language,
        "kappa": ctx.config.kappa,
        "seed": ctx.config.seed,
        "direction": ctx.config.direction,
        "tune": ctx.config.tune,
    });
    ctx.folder
        .discard_steering_if_changed(&inputs.to_string(), log)?;
    let (vectors, train_classes) = fit_vectors(ctx, acts, &scores.confidence, balance, log)?;
    // For hand experiments with `--gate` (the gated recipes carry it themselves).
    super::folder::write_atomic(&ctx.folder.gate(), &serde_json::to_string(&gate)?)?;
    let heldout_auc = vectors
        .iter()
        .map(|(f, v)| {
            let fit = v.require_fit("held-out AUCs", "rerun `run` in a new folder")?;
            Ok((f.name().to_string(), fit.heldout_aucs()))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    analysis(ctx, acts, &scores.confidence, &vectors, log)?;
    log(&format!(
        "topic gate ({:?}) at points {:?}{} (held-out balanced accuracy {:.3}, AUC {:.3})",
        gate.method,
        gate.points,
        if gate.veto.is_some() {
            " with a harmful-request veto"
        } else {
            ""
        },
        gate.heldout_accuracy,
        gate.heldout_auc
    ));
    Ok(Fit {
        vectors,
        gate,
        train_classes,
        heldout_auc,
    })
}

/// Per-point analysis of the WRMD vectors against MD (held-out AUC, r, cosines,
/// dimensionality), on the prompts the vectors were fitted on.
fn analysis(
    ctx: &Ctx,
    acts: &Activations,
    confidence: &HashMap<String, f64>,
    vectors: &FittedVectors,
    log: &mut dyn FnMut(&str),
) -> Result<()> {
    let dir = ctx.folder.analysis();
    if dir.join("analysis.json").exists() {
        return Ok(());
    }
    let fitted_scores: HashMap<String, f64> = acts
        .header
        .ids
        .iter()
        .zip(&acts.header.sets)
        .filter(|(_, set)| {
            set.as_deref()
                .is_some_and(|s| ctx.config.direction.fit_roles().contains(&s))
        })
        .filter_map(|(id, _)| confidence.get(id).map(|&c| (id.clone(), c)))
        .collect();
    match analyze(
        acts,
        &fitted_scores,
        &vectors[&Fitted::Wrmd],
        Some(&vectors[&Fitted::Md]),
        &AnalysisOptions::default(),
    ) {
        Ok(analysis) => {
            write_report(&analysis, &dir)?;
        }
        // Too few prompts per class for its folds: the report says so, the run goes on.
        Err(e) => log(&format!("no per-point analysis: {e}")),
    }
    Ok(())
}

/// The topic gate: target (and contrast) train prompts are on the topic, benign ones off it,
/// safety ones off it and harmful (the veto's positives); with a gate corpus, its drawn
/// prompts too. Its cuts hold out one source at a time: a config source (a file, or the rows
/// of its filter) or a corpus source. The gate's prompts are read again when it pools otherwise
/// than the vectors' last prompt token or reads a corpus; `exclude` holds every prompt text the
/// run answers.
fn topic_gate(
    ctx: &Ctx,
    acts: &Activations,
    train: &[Prompt],
    exclude: &HashSet<&str>,
) -> Result<Gate> {
    let method = ctx.config.tune.gate;
    let position = method.pooling().capture_position();
    let data_dir = ctx.config.data_dir()?;
    let mut source = BTreeMap::new();
    for (role, set) in ctx.config.roles() {
        if role != "capability" {
            source.extend(source_names(&set.sources, &data_dir, role)?);
        }
    }
    let mut prompts: Vec<(Prompt, GateLabel, String)> = train
        .iter()
        .map(|p| {
            let label = match p.set.as_deref() {
                Some("target" | "contrast") => GateLabel::OnTopic,
                Some("benign") => GateLabel::OffTopic,
                Some("safety") => GateLabel::Harmful,
                _ => GateLabel::Unused,
            };
            let group = source.get(&p.id).cloned().unwrap_or_else(|| p.id.clone());
            (p.clone(), label, group)
        })
        .collect();
    if let Some(corpus) = &ctx.config.gate_corpus {
        let drawn = draw(corpus, &data_dir, ctx.config.seed, exclude)?;
        prompts.extend(drawn.into_iter().map(|d| (d.prompt, d.label, d.group)));
    }
    let labels: Vec<GateLabel> = prompts.iter().map(|(_, l, _)| *l).collect();
    let groups: Vec<String> = prompts.iter().map(|(_, _, g)| g.clone()).collect();
    let read;
    let acts = if position == CapturePosition::LastPrompt && ctx.config.gate_corpus.is_none() {
        acts
    } else {
        let records: Vec<Prompt> = prompts.into_iter().map(|(p, _, _)| p).collect();
        let ids: Vec<&str> = records.iter().map(|p| p.id.as_str()).collect();
        // Named by its prompt list, so another corpus draw never resumes this one's file.
        let list = answer_seed(0, &ids.join("\n"), 0);
        read = super::train::capture_activations(
            ctx,
            &records,
            position,
            &format!("gate-acts-{}-{list:016x}.safetensors", position.name()),
        )?;
        &read
    };
    let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
    Gate::fit(
        acts,
        &labels,
        &groups,
        &FitSettings {
            budgets: ctx.config.tune.gate_budgets,
            seed: ctx.config.seed,
            ..FitSettings::new(method, Ridge::Relative(ctx.config.kappa))
        },
    )
    .context("fitting the topic gate")
}

/// MD and WRMD on the target (and contrast) train prompts, and WRMD with the safety
/// direction (harmful minus benign train prompts) removed. Reuses saved vectors; refits one that
/// cannot be read or has no fit metadata (fitting is deterministic, so a file from an earlier
/// version comes back the same and the answers steered with it stay valid).
fn fit_vectors(
    ctx: &Ctx,
    acts: &Activations,
    confidence: &HashMap<String, f64>,
    balance: Option<Strata>,
    log: &mut dyn FnMut(&str),
) -> Result<(FittedVectors, TrainClasses)> {
    let h = &acts.header;
    let set_of = |i: usize| h.sets[i].as_deref().unwrap_or("");
    let fit_roles = ctx.config.direction.fit_roles();
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
    let rows_of =
        |role: &str| -> Vec<usize> { (0..h.ids.len()).filter(|&i| set_of(i) == role).collect() };
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
            ridge: Ridge::Relative(ctx.config.kappa),
            threshold,
            folds: harmful.len().min(benign.len()).clamp(2, 5),
            seed: ctx.config.seed,
            balance: balance.clone(),
        },
        &[],
        &mut |_| {},
    )
    .context("fitting the protected (harmful vs benign) direction")?;
    let mut out = BTreeMap::new();
    for fitted in Fitted::ALL {
        let path = ctx.folder.vectors(fitted);
        if path.exists() {
            match SteeringVectors::load(&path) {
                Ok(vectors) if vectors.fit.is_some() => {
                    out.insert(fitted, vectors);
                    continue;
                }
                Ok(_) => log(&format!(
                    "refitting {}: it has no fit metadata (an earlier version wrote it)",
                    path.display()
                )),
                Err(e) => log(&format!("refitting: {e}")),
            }
        }
        std::fs::create_dir_all(path.parent().expect("has a parent"))?;
        let options = FitOptions {
            method: match fitted {
                Fitted::Md => Method::Md,
                Fitted::Wrmd | Fitted::WrmdProtected => Method::Wrmd,
            },
            ridge: Ridge::Relative(ctx.config.kappa),
            threshold,
            folds,
            seed: ctx.config.seed,
            balance: balance.clone(),
        };
        let protect: Vec<&[f32]> = if fitted == Fitted::WrmdProtected {
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
        out.insert(fitted, v);
    }
    Ok((out, classes))
}
