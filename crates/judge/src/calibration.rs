//! Agreement of a judge with human labels: accuracy, Cohen's kappa with a seeded bootstrap
//! 95% interval, the confusion matrices and ROC-AUC of the graded score.

use crate::{Assessment, JudgeError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;
use std::io::BufRead;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GoldLabel {
    Refusal,
    /// Engages but evades or sanitises: a refusal for binary use (METHOD.md §1).
    Partial,
    Compliance,
}

impl GoldLabel {
    pub fn is_refusal(self) -> bool {
        self != Self::Compliance
    }
}

/// One hand-labelled answer (`../shared/gold/labelled-answers.jsonl`).
#[derive(Debug, Clone, Deserialize)]
pub struct GoldItem {
    #[serde(default)]
    pub model: String,
    pub id: String,
    #[serde(default)]
    pub set: Option<String>,
    pub prompt: String,
    pub answer: String,
    pub label: GoldLabel,
}

pub fn read_gold(path: &Path) -> Result<Vec<GoldItem>> {
    let bad = |detail: String| JudgeError::BadFile {
        path: path.to_path_buf(),
        detail,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut items = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| bad(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let item = serde_json::from_str(&line).map_err(|e| {
            bad(format!(
                "line {}: {e}; expected {{\"id\", \"prompt\", \"answer\", \"label\": \"refusal\" | \"partial\" | \"compliance\"}}",
                n + 1
            ))
        })?;
        items.push(item);
    }
    if items.is_empty() {
        return Err(bad("no labelled answers".into()));
    }
    Ok(items)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub n: usize,
    pub accuracy: f64,
    pub kappa: f64,
    /// 2.5% and 97.5% percentiles of kappa over bootstrap resamples of the items.
    pub kappa_ci: (f64, f64),
    /// Rows: gold refusal (partial included), gold compliance; columns: judge refusal, not.
    pub confusion: [[usize; 2]; 2],
    /// Rows: gold refusal, partial, compliance; columns: judge refusal, not.
    pub three_class: [[usize; 2]; 3],
    /// ROC-AUC of the graded score against gold refusal (NaN when one class is absent).
    pub auc: f64,
    /// Verdicts with label 0 (counted as "not refusal" above).
    pub unparsable: usize,
    pub degenerate: usize,
    /// The cut on the graded score with the best kappa on these items, with that kappa
    /// (in-sample, so optimistic): what `--threshold` to try for a judge whose scores rank
    /// well but sit on one side of 1/2.
    pub best_cut: (f64, f64),
}

/// Compares `assessments` with `gold`, item by item.
pub fn compare(gold: &[GoldLabel], assessments: &[Assessment], seed: u64) -> Report {
    let truth: Vec<bool> = gold.iter().map(|g| g.is_refusal()).collect();
    let said: Vec<bool> = assessments.iter().map(|a| a.verdict.label > 0).collect();
    let scores: Vec<f64> = assessments.iter().map(|a| a.verdict.graded()).collect();
    let mut confusion = [[0; 2]; 2];
    let mut three_class = [[0; 2]; 3];
    for ((g, &t), &s) in gold.iter().zip(&truth).zip(&said) {
        confusion[usize::from(!t)][usize::from(!s)] += 1;
        let row = match g {
            GoldLabel::Refusal => 0,
            GoldLabel::Partial => 1,
            GoldLabel::Compliance => 2,
        };
        three_class[row][usize::from(!s)] += 1;
    }
    let n = truth.len();
    let all: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut resampled: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let pick: Vec<usize> = (0..n).map(|_| rng.gen_range(0..n)).collect();
            kappa(&truth, &said, &pick)
        })
        .filter(|k| k.is_finite())
        .collect();
    resampled.sort_by(f64::total_cmp);
    let percentile = |q: f64| {
        if resampled.is_empty() {
            f64::NAN
        } else {
            resampled[((q * (resampled.len() - 1) as f64).round()) as usize]
        }
    };
    Report {
        n,
        accuracy: truth.iter().zip(&said).filter(|(t, s)| t == s).count() as f64 / n as f64,
        kappa: kappa(&truth, &said, &all),
        kappa_ci: (percentile(0.025), percentile(0.975)),
        confusion,
        three_class,
        auc: roc_auc(&truth, &scores),
        unparsable: assessments.iter().filter(|a| a.verdict.label == 0).count(),
        degenerate: assessments
            .iter()
            .filter(|a| a.degenerate.is_some())
            .count(),
        best_cut: best_cut(&truth, &scores),
    }
}

/// The midpoint between neighbouring distinct scores that gives the highest kappa.
pub fn best_cut(truth: &[bool], scores: &[f64]) -> (f64, f64) {
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.dedup();
    let all: Vec<usize> = (0..truth.len()).collect();
    let mut best = (f64::NAN, f64::NAN);
    for pair in sorted.windows(2) {
        let cut = (pair[0] + pair[1]) / 2.0;
        let said: Vec<bool> = scores.iter().map(|&s| s > cut).collect();
        let k = kappa(truth, &said, &all);
        if k.is_finite() && (best.1.is_nan() || k > best.1) {
            best = (cut, k);
        }
    }
    best
}

const BOOTSTRAP_RESAMPLES: usize = 2000;

/// Cohen's kappa of two binary raters over the items `pick` (NaN when chance agreement is 1).
pub fn kappa(a: &[bool], b: &[bool], pick: &[usize]) -> f64 {
    let n = pick.len() as f64;
    let agree = pick.iter().filter(|&&i| a[i] == b[i]).count() as f64 / n;
    let a_yes = pick.iter().filter(|&&i| a[i]).count() as f64 / n;
    let b_yes = pick.iter().filter(|&&i| b[i]).count() as f64 / n;
    let chance = a_yes * b_yes + (1.0 - a_yes) * (1.0 - b_yes);
    if chance >= 1.0 {
        f64::NAN
    } else {
        (agree - chance) / (1.0 - chance)
    }
}

/// Probability that a random positive scores above a random negative (ties count half).
pub fn roc_auc(positive: &[bool], scores: &[f64]) -> f64 {
    let (mut wins, mut pairs) = (0.0, 0.0);
    for (i, &pi) in positive.iter().enumerate() {
        for (j, &pj) in positive.iter().enumerate() {
            if pi && !pj {
                pairs += 1.0;
                wins += match scores[i].partial_cmp(&scores[j]) {
                    Some(std::cmp::Ordering::Greater) => 1.0,
                    Some(std::cmp::Ordering::Equal) => 0.5,
                    _ => 0.0,
                };
            }
        }
    }
    if pairs == 0.0 {
        f64::NAN
    } else {
        wins / pairs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Verdict;

    fn assessed(label: i8, p: Option<f64>) -> Assessment {
        Assessment {
            verdict: Verdict {
                label,
                p_refusal: p,
            },
            degenerate: None,
        }
    }

    #[test]
    fn kappa_matches_a_hand_computed_table() {
        // 2x2 table a=20 b=5 c=10 d=15 (n=50): po = 0.7, pe = 0.5*0.6 + 0.5*0.4 = 0.5,
        // kappa = 0.4.
        let mut a = Vec::new();
        let mut b = Vec::new();
        for (x, y, count) in [
            (true, true, 20),
            (true, false, 5),
            (false, true, 10),
            (false, false, 15),
        ] {
            for _ in 0..count {
                a.push(x);
                b.push(y);
            }
        }
        let all: Vec<usize> = (0..50).collect();
        assert!((kappa(&a, &b, &all) - 0.4).abs() < 1e-12);
        assert!(kappa(&[true, true], &[true, true], &[0, 1]).is_nan());
    }

    #[test]
    fn auc_counts_pairs_and_ties() {
        assert_eq!(roc_auc(&[true, false], &[0.9, 0.1]), 1.0);
        assert_eq!(roc_auc(&[true, false], &[0.1, 0.9]), 0.0);
        // Pairs (p0,n) wins, (p1,n) tie: (1 + 0.5) / 2.
        assert_eq!(roc_auc(&[true, true, false], &[0.9, 0.5, 0.5]), 0.75);
    }

    #[test]
    fn the_report_counts_partial_as_refusal_and_is_seeded() {
        use GoldLabel::*;
        let gold = [
            Refusal, Partial, Compliance, Compliance, Refusal, Compliance,
        ];
        let judged = [
            assessed(1, Some(0.9)),
            assessed(-1, Some(0.4)),
            assessed(-1, Some(0.2)),
            assessed(1, Some(0.6)),
            assessed(1, None),
            assessed(0, Some(0.5)),
        ];
        let r = compare(&gold, &judged, 7);
        assert_eq!(r.confusion, [[2, 1], [1, 2]]);
        assert_eq!(r.three_class, [[2, 0], [0, 1], [1, 2]]);
        assert!((r.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert_eq!(r.unparsable, 1);
        // Positives 0.9, 0.4, 1.0 (label only) vs negatives 0.2, 0.6, 0.5: 7 of 9 pairs.
        assert!((r.auc - 7.0 / 9.0).abs() < 1e-12);
        assert!(r.kappa_ci.0 <= r.kappa && r.kappa <= r.kappa_ci.1);
        assert_eq!(r, compare(&gold, &judged, 7));
        // Cutting between 0.6 and 0.9 leaves one error (the partial at 0.4); any other cut
        // leaves two or more.
        assert!((r.best_cut.0 - 0.75).abs() < 1e-12, "{:?}", r.best_cut);
    }
}
