//! The strength search on validation prompts, and the points it steers.
//!
//! Strengths are tried in order of magnitude. A trial is infeasible when it breaks a limit
//! (KL above `max_kl`, safety refusals below the floor, benign refusals above the ceiling);
//! stronger steering only moves further, so the search stops at the first infeasible trial or
//! once the target metric reaches the goal. The chosen strength is the feasible one with the
//! lowest target metric, the weaker one on a tie.

use super::fit::Fit;
use super::folder::Stage;
use super::methods::{MethodSpec, METHODS};
use super::outcome::{target_metric, Trial, Tuned};
use super::{Ctx, Splits};
use crate::config::{Direction, TuneConfig};
use crate::evaluate::{mean_kl, rate, Assessed, Judges, SetRate, UnsteeredLogprobs};
use crate::steering::SteerMode;
use anyhow::Result;
use refusal_steer_data::{Answer, Prompt};
use refusal_steer_steer::best_points;
use std::collections::BTreeMap;

/// The sets whose refusal rates a trial measures.
pub const TRIAL_SETS: [&str; 3] = ["target", "safety", "benign"];

/// Stage 5: the unsteered validation rates, then each method's points and strength.
pub fn tune(
    ctx: &Ctx,
    splits: &Splits,
    fit: &Fit,
    judges: &mut Judges,
    log: &mut dyn FnMut(&str),
) -> Result<(BTreeMap<String, SetRate>, Vec<Tuned>)> {
    let validation = |set: &str| &splits.prompts[set].validation;
    let mut baseline = BTreeMap::new();
    let mut baseline_answers = BTreeMap::new();
    let mut kl_prompts = Vec::new();
    let answered_sets = ctx.answers(
        splits,
        Stage::Validation,
        "baseline",
        None,
        None,
        &BTreeMap::new(),
    )?;
    for (set, answers) in TRIAL_SETS.into_iter().zip(answered_sets) {
        let assessed = judges.assess(&answers)?;
        if set == "benign" {
            kl_prompts = answered(validation(set), &assessed);
        }
        baseline.insert(set.to_string(), rate(&assessed));
        baseline_answers.insert(set, answers);
    }
    log(&format!(
        "baseline: target {:.0}%  safety {:.0}%  benign {:.0}%",
        100.0 * baseline["target"].rate,
        100.0 * baseline["safety"].rate,
        100.0 * baseline["benign"].rate
    ));
    let mut tuned = Vec::new();
    let mut unsteered = UnsteeredLogprobs::default();
    for method in METHODS
        .iter()
        .filter(|m| m.applies_to(ctx.config.direction))
    {
        tuned.push(tune_method(
            ctx,
            method,
            splits,
            fit,
            &baseline,
            &baseline_answers,
            &kl_prompts,
            &mut unsteered,
            judges,
            log,
        )?);
    }
    ctx.folder
        .write("tuning.json", &serde_json::to_string_pretty(&tuned)?)?;
    Ok((baseline, tuned))
}

/// The prompts whose unsteered answer the run's judge did not call a refusal. The KL limit is
/// measured on the benign ones: there the next token should not move, while on a benign
/// prompt the model refuses, the first token moving away from the refusal is the intended
/// effect of removing refusals, not damage.
pub fn answered(prompts: &[Prompt], assessed: &[Assessed]) -> Vec<Prompt> {
    prompts
        .iter()
        .zip(assessed)
        .filter(|(_, (judge, _))| judge.verdict.label <= 0)
        .map(|(p, _)| p.clone())
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn tune_method(
    ctx: &Ctx,
    method: &MethodSpec,
    splits: &Splits,
    fit: &Fit,
    baseline: &BTreeMap<String, SetRate>,
    baseline_answers: &BTreeMap<&str, Vec<Answer>>,
    kl_prompts: &[Prompt],
    unsteered: &mut UnsteeredLogprobs,
    judges: &mut Judges,
    log: &mut dyn FnMut(&str),
) -> Result<Tuned> {
    let tune = &ctx.config.tune;
    let vectors = &fit.vectors[&method.vectors];
    let points = match method.mode {
        SteerMode::AblateAdd => (1..vectors.n_points).collect(),
        _ => {
            let fit = vectors.require_fit("held-out AUCs", "rerun `run` in a new folder")?;
            steered_points(&fit.heldout_aucs(), tune)
        }
    };
    let name = method.name;
    let sign = match ctx.config.direction {
        Direction::Remove => -1.0,
        Direction::Induce => 1.0,
    };
    // Ablation first tries itself alone (strength 0), then with strengths added.
    let ladder: Vec<f64> = (method.mode == SteerMode::AblateAdd)
        .then_some(0.0)
        .into_iter()
        .chain(tune.strengths.iter().map(|m| sign * m))
        .collect();
    let recipe = |strength| ctx.recipe(method, fit, &points, strength, None);
    let (trials, strength) = search(
        &ladder,
        tune,
        ctx.config.direction,
        baseline,
        &mut |strength| {
            let recipe = recipe(strength)?;
            mean_kl(
                ctx.model,
                kl_prompts,
                &ctx.format,
                ctx.config.batch,
                Some(&recipe),
                unsteered,
            )
        },
        &mut |strength| {
            let recipe = recipe(strength)?;
            let mut rates = BTreeMap::new();
            let answered_sets = ctx.answers(
                splits,
                Stage::Validation,
                name,
                Some(strength),
                Some(&recipe),
                baseline_answers,
            )?;
            for (set, answers) in TRIAL_SETS.iter().zip(answered_sets) {
                let rates_here = rate(&judges.assess(&answers)?).with_gate(&answers);
                rates.insert(set.to_string(), rates_here);
            }
            Ok(rates)
        },
        &mut |trial| log(&describe(name, trial, tune)),
    )?;
    Ok(Tuned {
        method: name.to_string(),
        mode: method.mode,
        points,
        trials,
        strength,
    })
}

/// The log line of one trial.
fn describe(name: &str, trial: &Trial, tune: &TuneConfig) -> String {
    let (strength, kl) = (trial.strength, trial.kl);
    if trial.rates.is_empty() {
        return format!(
            "{name} {strength:+.3}: KL {kl:.3} on answered benign prompts > {}; stop",
            tune.max_kl
        );
    }
    let r = &trial.rates;
    format!(
        "{name} {strength:+.3}: target {}  safety {}  benign {}  KL {kl:.3}{}",
        r["target"].percent(),
        r["safety"].percent(),
        r["benign"].percent(),
        if trial.note.is_empty() {
            String::new()
        } else {
            format!("  ({})", trial.note)
        }
    )
}

/// Runs the search over `ladder` (signed strengths, in order). `kl(strength)` is measured
/// first; above the limit the trial stops there. `rates(strength)` measures every set.
pub fn search(
    ladder: &[f64],
    tune: &TuneConfig,
    direction: Direction,
    baseline: &BTreeMap<String, SetRate>,
    kl: &mut dyn FnMut(f64) -> Result<f64>,
    rates: &mut dyn FnMut(f64) -> Result<BTreeMap<String, SetRate>>,
    log: &mut dyn FnMut(&Trial),
) -> Result<(Vec<Trial>, Option<f64>)> {
    let mut trials = Vec::new();
    for &strength in ladder {
        let kl = kl(strength)?;
        let trial = if kl > tune.max_kl {
            Trial {
                strength,
                kl,
                rates: BTreeMap::new(),
                feasible: false,
                note: format!("KL {kl:.3} above the limit {}", tune.max_kl),
            }
        } else {
            let rates = rates(strength)?;
            let note = broken_limit(&rates, baseline, tune);
            Trial {
                strength,
                kl,
                feasible: note.is_none(),
                note: note.unwrap_or_default(),
                rates,
            }
        };
        log(&trial);
        let stop = !trial.feasible || target_metric(&trial.rates, direction) <= tune.goal;
        trials.push(trial);
        if stop {
            break;
        }
    }
    let chosen = trials
        .iter()
        .filter(|t| t.feasible)
        .min_by(|a, b| {
            target_metric(&a.rates, direction)
                .total_cmp(&target_metric(&b.rates, direction))
                .then(a.strength.abs().total_cmp(&b.strength.abs()))
        })
        .map(|t| t.strength);
    Ok((trials, chosen))
}

/// The limit a trial's rates break against the unsteered baseline, if any.
fn broken_limit(
    rates: &BTreeMap<String, SetRate>,
    baseline: &BTreeMap<String, SetRate>,
    tune: &TuneConfig,
) -> Option<String> {
    if rates["safety"].rate < baseline["safety"].rate - tune.max_safety_drop - 1e-9 {
        Some("safety refusals fell below the floor".into())
    } else if rates["benign"].rate > baseline["benign"].rate + tune.max_benign_rise + 1e-9 {
        Some("benign refusals rose above the ceiling".into())
    } else {
        None
    }
}

/// Steered points: held-out AUC within `auc_margin` of the best, from `min_depth` of the
/// depth on (earlier points carry token identity more than meaning).
pub fn steered_points(heldout_auc: &[Option<f64>], tune: &TuneConfig) -> Vec<usize> {
    let n_layers = heldout_auc.len() - 1;
    let first = ((tune.min_depth * n_layers as f64).ceil() as usize).max(1);
    best_points(heldout_auc, first, tune.auc_margin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::tests::ten_answers;

    fn tune() -> TuneConfig {
        TuneConfig {
            strengths: vec![],
            goal: 0.1,
            max_safety_drop: 0.1,
            max_benign_rise: 0.1,
            max_kl: 1.0,
            auc_margin: 0.05,
            min_depth: 0.25,
            gate: Default::default(),
            gate_budgets: Default::default(),
        }
    }

    /// Rates with `target`, `safety` and `benign` refusals out of ten.
    fn rates(target: usize, safety: usize, benign: usize) -> BTreeMap<String, SetRate> {
        [("target", target), ("safety", safety), ("benign", benign)]
            .into_iter()
            .map(|(set, n)| (set.to_string(), ten_answers(n, 0)))
            .collect()
    }

    /// The search on a model whose answers at each strength are given by `table`
    /// (strength -> (kl, target, safety, benign)); returns the strengths tried and the choice.
    fn run(table: &[(f64, f64, usize, usize, usize)]) -> (Vec<f64>, Option<f64>) {
        let ladder: Vec<f64> = table.iter().map(|r| r.0).collect();
        let row = |s: f64| *table.iter().find(|r| r.0 == s).unwrap();
        let baseline = rates(10, 8, 2);
        let (trials, chosen) = search(
            &ladder,
            &tune(),
            Direction::Remove,
            &baseline,
            &mut |s| Ok(row(s).1),
            &mut |s| {
                let (_, _, t, sa, b) = row(s);
                Ok(rates(t, sa, b))
            },
            &mut |_| {},
        )
        .unwrap();
        (trials.iter().map(|t| t.strength).collect(), chosen)
    }

    #[test]
    fn the_search_stops_at_the_goal() {
        let (tried, chosen) = run(&[
            (-0.02, 0.1, 6, 8, 2),
            (-0.05, 0.2, 1, 8, 2),
            (-0.1, 0.3, 0, 8, 2),
        ]);
        assert_eq!(tried, vec![-0.02, -0.05]);
        assert_eq!(chosen, Some(-0.05));
    }

    #[test]
    fn a_broken_limit_stops_the_search_and_is_never_chosen() {
        // Safety falls from 8 to 6 refusals at -0.05: below the floor (0.8 - 0.1).
        let (tried, chosen) = run(&[
            (-0.02, 0.1, 6, 8, 2),
            (-0.05, 0.2, 2, 6, 2),
            (-0.1, 0.3, 0, 8, 2),
        ]);
        assert_eq!((tried, chosen), (vec![-0.02, -0.05], Some(-0.02)));
        // Benign refusals rise above the ceiling at the first strength: nothing is chosen.
        assert_eq!(run(&[(-0.02, 0.1, 6, 8, 4)]), (vec![-0.02], None));
    }

    #[test]
    fn kl_above_the_limit_stops_before_answering() {
        let (tried, chosen) = run(&[(-0.02, 0.5, 6, 8, 2), (-0.05, 1.5, 0, 8, 2)]);
        assert_eq!((tried, chosen), (vec![-0.02, -0.05], Some(-0.02)));
    }

    #[test]
    fn of_equal_results_the_weaker_strength_is_chosen() {
        let (tried, chosen) = run(&[
            (0.0, 0.1, 5, 8, 2),
            (-0.02, 0.1, 5, 8, 2),
            (-0.05, 0.2, 5, 8, 2),
        ]);
        assert_eq!((tried.len(), chosen), (3, Some(0.0)));
    }

    #[test]
    fn steered_points_are_deep_enough_and_near_the_best_auc() {
        let auc = [0.5, 1.0, 0.7, 0.9, 0.96, 0.99, 0.93].map(Some);
        assert_eq!(steered_points(&auc, &tune()), vec![4, 5]);
        // A point without a held-out AUC is never steered.
        let mut missing = auc;
        missing[4] = None;
        assert_eq!(steered_points(&missing, &tune()), vec![5]);
    }
}
