//! The run's report: `report.md` (tables a researcher can paste), and SVG plots.

use crate::config::RunConfig;
use crate::evaluate::SetRate;
use crate::gate::GateMethod;
use crate::run::{RunFolder, RunReport, Stage, Tuned};
use crate::steering::{format_points, SteerMode};
use anyhow::Result;
use refusal_steer_data::activations::Activations;
use refusal_steer_data::Answer;
use refusal_steer_judge::{PromptClass, Thresholds};
use refusal_steer_plot::{self as plot, Chart, Series};
use refusal_steer_steer::linalg::{self, RankScale};
use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

/// A refusal rate with its interval, the marker list's rate, and how many of the refusals are
/// degenerate answers (loops the judge counts as refusals) or typed by the judge as deflection,
/// narrative or a switched language, so a reader can tell them apart; under a gate, how many
/// answers it let in.
fn cell(r: &SetRate) -> String {
    let notes = match r.notes() {
        t if t.is_empty() => t,
        t => format!("; {t}"),
    };
    format!(
        "{:.0}% [{:.0}, {:.0}] (patterns {:.0}%{notes})",
        100.0 * r.rate,
        100.0 * r.ci.0,
        100.0 * r.ci.1,
        100.0 * r.pattern_refusals as f64 / r.n.max(1) as f64
    )
}

/// The before/after table: one row per set, one column per condition.
pub fn table(report: &RunReport) -> String {
    let mut md = String::new();
    let names: Vec<&str> = report.test.iter().map(|e| e.condition.as_str()).collect();
    let _ = writeln!(
        md,
        "| test set (refusal rate, Wilson 95% CI) | {} |",
        names.join(" | ")
    );
    let _ = writeln!(md, "|---|{}", "---|".repeat(names.len()));
    for role in ["target", "safety", "benign"] {
        let n = report.test.first().map_or(0, |e| e.rates[role].n);
        let cells: Vec<String> = report.test.iter().map(|e| cell(&e.rates[role])).collect();
        let _ = writeln!(md, "| {role} (n={n}) | {} |", cells.join(" | "));
    }
    let cap: Vec<String> = report
        .test
        .iter()
        .map(|e| format!("{:.1}%", 100.0 * e.capability_accuracy))
        .collect();
    let _ = writeln!(
        md,
        "| capability accuracy (MMLU+ARC) | {} |",
        cap.join(" | ")
    );
    let kl: Vec<String> = report
        .test
        .iter()
        .map(|e| e.kl.map_or("-".into(), |k| format!("{k:.3}")))
        .collect();
    let _ = writeln!(
        md,
        "| next-token KL on answered benign prompts (nats) | {} |",
        kl.join(" | ")
    );
    let degenerate: Vec<String> = report
        .test
        .iter()
        .map(|e| {
            let (d, n) = e
                .rates
                .values()
                .fold((0, 0), |(d, n), r| (d + r.degenerate, n + r.n));
            format!("{d}/{n}")
        })
        .collect();
    let _ = writeln!(md, "| degenerate answers | {} |", degenerate.join(" | "));
    let strength: Vec<String> = report
        .test
        .iter()
        .map(|e| e.strength.map_or("-".into(), |s| format!("{s:+.3}")))
        .collect();
    let _ = writeln!(md, "| strength (norm-scaled) | {} |", strength.join(" | "));
    let infeasible: Vec<&str> = report
        .tuned
        .iter()
        .filter(|t| t.strength.is_none())
        .map(|t| t.method.as_str())
        .collect();
    if !infeasible.is_empty() {
        let _ = writeln!(
            md,
            "\nNot evaluated (no strength kept every limit on validation): {}.",
            infeasible.join(", ")
        );
    }
    md
}

fn tuning_section(tuned: &[Tuned]) -> String {
    let mut md = String::new();
    for t in tuned {
        let _ = writeln!(
            md,
            "- **{}**: points {} ({}); chosen strength {}",
            t.method,
            format_points(&t.points),
            match t.mode {
                SteerMode::Add => "strength added",
                SteerMode::Ablate => "direction ablated",
                SteerMode::AblateAdd => "directions ablated, then strength added",
            },
            t.strength
                .map_or("none kept every limit (not exported)".into(), |s| format!(
                    "{s:+.3}"
                ))
        );
        for trial in &t.trials {
            let rates = ["target", "safety", "benign"]
                .iter()
                .filter_map(|r| trial.rates.get(*r).map(|x| format!("{r} {}", x.percent())))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                md,
                "  - {:+.3}: KL {:.3}; {rates}{}",
                trial.strength,
                trial.kl,
                if trial.note.is_empty() {
                    String::new()
                } else {
                    format!(" — {}", trial.note)
                }
            );
        }
    }
    md
}

/// Writes report.md and the plots into `out`.
pub fn write(
    report: &RunReport,
    config: &RunConfig,
    out: &Path,
    acts: &Activations,
    scores: &HashMap<String, f64>,
) -> Result<()> {
    let mut md = String::new();
    let _ = writeln!(md, "# refusal-steer run: {}\n", report.model);
    let _ = writeln!(
        md,
        "Judge: `{}` (degenerate answers, and answers in another language than the question's, count as refusals); direction: {:?}. Strengths are norm-scaled: the fraction of the residual stream's mean norm added at each steered point (negative removes refusals).\n",
        report.judge, report.direction
    );
    let _ = writeln!(md, "## Test split\n\n{}", table(report));
    let _ = writeln!(md, "{}", recommendation(report, config, out));
    let gate_rule = match report.gate_method {
        GateMethod::Ridge => format!(
            "a class-balanced ridge classifier on the mean of the prompt's own tokens at points {:?}, on-topic (target, contrast) against off-topic (safety, benign) train prompts{}",
            report.gate_points,
            if report.gate_veto {
                ", with a veto fitted on safety against the other train prompts: a prompt it flags as harmful is never steered"
            } else {
                ""
            }
        ),
        GateMethod::Md => format!(
            "the last-token projection on the mean difference of on-topic (target, contrast) minus off-topic (safety, benign) train prompts at point {:?}",
            report.gate_points
        ),
        GateMethod::Rmd => format!(
            "the last-token projection on the ridge mean difference (whitened by the off-topic prompts' covariance) of on-topic (target, contrast) minus off-topic (safety, benign) train prompts at point {:?}",
            report.gate_points
        ),
    };
    let corpus = match &config.gate_corpus {
        Some(c) => format!(
            ", and up to {} prompts of each set of the gate corpus `{}` (on the topic: {}; harmful: {})",
            c.per_set,
            c.prompts,
            c.on.join(", "),
            c.harmful.join(", ")
        ),
        None => String::new(),
    };
    let cut = match &report.gate_cuts {
        Some(c) => format!(
            "cut to let in at most {:.1}% of harmful and {:.1}% of other off-topic prompts, judged on prompts scored by gates fitted without their source (there: {:.1}% of on-topic, {:.1}% of harmful and {:.1}% of other off-topic prompts let in)",
            100.0 * c.harmful_budget,
            100.0 * c.off_topic_budget,
            100.0 * c.on_topic_passed,
            100.0 * c.harmful_passed,
            100.0 * c.off_topic_passed
        ),
        None => "threshold at the midpoint of the two classes' mean scores".to_string(),
    };
    let _ = writeln!(
        md,
        "Methods ending in `+gated` steer only prompts that a topic gate lets through: {gate_rule}{corpus}, {cut} (held-out balanced accuracy {:.3}, AUC {:.3}; `refusal-steer gate-eval` measures a gate on sources it never saw). `ablation+gated` projects the span of the WRMD and MD directions out of the residual stream at every point (directional ablation, strength 0) and adds the strength along WRMD only if ablation alone is not enough.\n",
        report.gate_heldout_accuracy, report.gate_heldout_auc
    );
    let _ = writeln!(md, "## Train classes (refused, answered, neither)\n");
    for (role, (r, a, n)) in &report.train_classes {
        let _ = writeln!(md, "- {role}: {r}, {a}, {n}");
    }
    let _ = writeln!(md, "\n## Tuning on validation prompts\n");
    let base = ["target", "safety", "benign"]
        .iter()
        .map(|r| format!("{r} {:.0}%", 100.0 * report.validation_baseline[*r].rate))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(md, "Baseline: {base}\n\n{}", tuning_section(&report.tuned));
    let _ = writeln!(md, "## Timings (s)\n");
    for (stage, s) in &report.timings_s {
        let _ = writeln!(md, "- {stage}: {s:.0}");
    }
    let _ = writeln!(
        md,
        "\n## Example answers (test)\n\n{}",
        examples(report, out)
    );
    let _ = writeln!(
        md,
        "## Plots\n\n- refusal-vs-strength-*.svg: validation refusal rate per set as strength grows\n- separability.svg: held-out AUC per point, MD vs WRMD\n- judge-scores.svg: the judge's p(refusal) on target test answers, before and after\n- pca.svg: train activations at the best point, first two principal components, by class"
    );
    std::fs::write(out.join("report.md"), md)?;
    plots(report, out, acts, scores)
}

/// The recommended method and the command that answers as the run's test did: its recipe,
/// with the run's decoding.
fn recommendation(report: &RunReport, config: &RunConfig, out: &Path) -> String {
    let Some(t) = report
        .recommended
        .as_ref()
        .and_then(|m| report.tuned.iter().find(|t| &t.method == m))
    else {
        return "Recommended: none (no method kept every limit on validation and changed the target set's refusals there).\n".into();
    };
    let penalty = match config.repetition_penalty {
        1.0 => String::new(),
        p => format!(" --repetition-penalty {p}"),
    };
    format!(
        "Recommended: `{}` at strength {:+.3}, points {}. To chat with it (greedy, as the test answered):\n\n```\nrefusal-steer chat --model {} --recipe {} --max-tokens {}{penalty}\n```\n\nEvery method's recipe is in {}; `--recipe-scale` scales a recipe's strengths.\n",
        t.method,
        t.strength.unwrap_or(0.0),
        format_points(&t.points),
        report.model,
        RunFolder::at(out).recommended().display(),
        config.max_tokens,
        RunFolder::at(out).recipes().display(),
    )
}

/// The first answers per set, unsteered and with the recommended method.
fn examples(report: &RunReport, out: &Path) -> String {
    let Some(method) = &report.recommended else {
        return "No steered condition to compare.\n".into();
    };
    let strength_of = |cond: &str| {
        report
            .test
            .iter()
            .find(|e| e.condition == cond)
            .and_then(|e| e.strength)
    };
    let read = |cond: &str, role: &str| -> Vec<Answer> {
        std::fs::read_to_string(RunFolder::at(out).answers(
            Stage::Test,
            cond,
            strength_of(cond),
            role,
        ))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
    };
    let clip = |s: &str| {
        let s = s.replace('\n', " ");
        if s.chars().count() > 300 {
            format!("{}…", s.chars().take(300).collect::<String>())
        } else {
            s
        }
    };
    let mut md = String::new();
    for role in ["target", "safety", "benign"] {
        let after: HashMap<String, Answer> = read(method, role)
            .into_iter()
            .map(|a| (a.id.clone(), a))
            .collect();
        // The first two by id: a file holds answers in the order they finished.
        let mut baseline = read("baseline", role);
        baseline.sort_by(|a, b| a.id.cmp(&b.id));
        for a in baseline.iter().take(2) {
            let Some(b) = after.get(&a.id) else { continue };
            let _ = writeln!(
                md,
                "**{role}**: {}\n\n- baseline: {}\n- {method}: {}\n",
                clip(&a.prompt),
                clip(&a.answer),
                clip(&b.answer)
            );
        }
    }
    md
}

fn plots(
    report: &RunReport,
    out: &Path,
    acts: &Activations,
    scores: &HashMap<String, f64>,
) -> Result<()> {
    for t in &report.tuned {
        let series: Vec<Series> = ["target", "safety", "benign"]
            .iter()
            .map(|role| Series {
                name: role.to_string(),
                points: std::iter::once((0.0, report.validation_baseline[*role].rate))
                    .chain(
                        t.trials
                            .iter()
                            .filter_map(|x| x.rates.get(*role).map(|r| (x.strength.abs(), r.rate))),
                    )
                    .collect(),
            })
            .collect();
        plot::lines(
            &out.join(format!(
                "refusal-vs-strength-{}.svg",
                t.method.replace('+', "-")
            )),
            &Chart::new(
                format!("{}: validation refusal rate vs strength", t.method),
                "|strength| (fraction of residual norm)",
                "refusal rate",
            ),
            &series,
        )?;
    }
    let series: Vec<Series> = report
        .heldout_auc
        .iter()
        .filter(|(m, _)| !m.contains('+'))
        .map(|(m, auc)| Series {
            name: m.clone(),
            points: auc
                .iter()
                .enumerate()
                .skip(1)
                .filter_map(|(p, &a)| Some((p as f64, a?)))
                .collect(),
        })
        .collect();
    plot::lines(
        &out.join("separability.svg"),
        &Chart::new("held-out AUC per point", "point (block output)", "AUC"),
        &series,
    )?;
    let groups: Vec<(String, Vec<f64>)> = report
        .test
        .iter()
        .filter(|e| e.condition == "baseline" || Some(&e.condition) == report.recommended.as_ref())
        .map(|e| (e.condition.clone(), e.rates["target"].scores.clone()))
        .filter(|(_, s)| !s.is_empty())
        .collect();
    if !groups.is_empty() {
        plot::histogram(
            &out.join("judge-scores.svg"),
            &Chart::new(
                "judge p(refusal), target test answers",
                "p(refusal)",
                "answers",
            ),
            &groups,
            10,
            (0.0, 1.0),
        )?;
    }
    let best = report
        .heldout_auc
        .get("wrmd")
        .and_then(|auc| {
            (1..auc.len())
                .filter_map(|p| Some((p, auc[p]?)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(p, _)| p)
        })
        .unwrap_or(acts.header.n_points - 1);
    let coords = top_two_components(&acts.at_point(best), acts.header.d)?;
    let mut by_class: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
    for (i, id) in acts.header.ids.iter().enumerate() {
        let role = acts.header.sets[i].clone().unwrap_or_default();
        let class = match scores.get(id).map(|&c| Thresholds::default().classify(c)) {
            Some(PromptClass::Refusal) => "refused",
            Some(PromptClass::Compliance) => "answered",
            _ => "neither",
        };
        by_class
            .entry(format!("{role} {class}"))
            .or_default()
            .push(coords[i]);
    }
    let mut groups: Vec<(String, Vec<(f64, f64)>)> = by_class.into_iter().collect();
    groups.sort_by(|a, b| a.0.cmp(&b.0));
    plot::scatter(
        &out.join("pca.svg"),
        &Chart::new(format!("train activations at point {best}"), "PC1", "PC2"),
        &groups,
    )?;
    Ok(())
}

/// Coordinates of each row on the first two principal components of the centred rows (0 on
/// a component the rows do not have).
fn top_two_components(x: &[f32], d: usize) -> Result<Vec<(f64, f64)>> {
    let rows: Vec<usize> = (0..x.len() / d).collect();
    let mean = linalg::mean_of_rows(x, d, &rows);
    let centred = linalg::offsets(x, d, &rows, &mean);
    let found = linalg::principal_axes(centred.as_ref(), RankScale::Largest)
        .map_err(|e| anyhow::anyhow!("the chart's principal components: {e}"))?;
    let score = |row: usize, k: usize| {
        found.axes.get(k).map_or(0.0, |axis| {
            (0..d).map(|j| centred[(row, j)] * axis[j]).sum()
        })
    };
    Ok(rows.iter().map(|&r| (score(r, 0), score(r, 1))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::tests::ten_answers;

    #[test]
    fn a_cell_says_how_many_refusals_are_degenerate_answers() {
        assert_eq!(
            cell(&ten_answers(3, 2)),
            "30% [11, 60] (patterns 30%; 2 degenerate)"
        );
        assert_eq!(cell(&ten_answers(1, 0)), "10% [2, 40] (patterns 10%)");
        let gated = SetRate {
            gated_in: Some(4),
            ..ten_answers(1, 0)
        };
        assert_eq!(cell(&gated), "10% [2, 40] (patterns 10%; gate let in 4/10)");
        assert_eq!(gated.percent(), "10% (gate let in 4/10)");
        let typed = SetRate {
            gated_in: Some(4),
            ..ten_answers(3, 2)
        };
        assert_eq!(typed.percent(), "30% (2 degenerate; gate let in 4/10)");
    }

    #[test]
    fn the_first_component_follows_the_spread() {
        // Points along the x axis with a little y noise.
        let x: Vec<f32> = (0..10)
            .flat_map(|i| [i as f32, if i % 2 == 0 { 0.1 } else { -0.1 }, 0.0])
            .collect();
        let c = top_two_components(&x, 3).unwrap();
        let spread = |k: usize| {
            c.iter()
                .map(|p| if k == 0 { p.0 } else { p.1 }.powi(2))
                .sum::<f64>()
        };
        assert!(spread(0) > 100.0 * spread(1));
        // Monotone along the first component.
        let first: Vec<f64> = c.iter().map(|p| p.0).collect();
        let increasing = first.windows(2).all(|w| w[1] > w[0]);
        let decreasing = first.windows(2).all(|w| w[1] < w[0]);
        assert!(increasing || decreasing, "{first:?}");
    }
}
