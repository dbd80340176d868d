//! Agreement of a judge with the labelled corpus ([`crate::corpus`]): Cohen's kappa with a
//! seeded bootstrap 95% interval, recall per refusal type, the false-refusal rate on answers
//! and ROC-AUC; and the folds, grouped by prompt, that every fitted judge is cross-validated on
//! ([`Folds`]): k folds over the whole corpus, or held-out files scored by judges fitted on the
//! rest.

use crate::corpus::AnswerType;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// What one item is to a fitted judge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Scored in this fold, fitted on in the others.
    Scored(usize),
    /// Fitted on in every fold, never scored.
    FitOnly,
    /// Neither (it shares a prompt with a held-out item).
    Unused,
}

/// Which items a fitted judge is scored on and which it is fitted on.
///
/// Invariant: no group (prompt) is both scored in a fold and fitted on for that fold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folds {
    pub roles: Vec<Role>,
    /// Folds scored, `0..k`.
    pub k: usize,
}

impl Folds {
    /// Grouped `k`-fold cross-validation over every item ([`grouped_folds`]).
    pub fn grouped(groups: &[&str], k: usize, seed: u64) -> Self {
        Self {
            roles: grouped_folds(groups, k, seed)
                .into_iter()
                .map(Role::Scored)
                .collect(),
            k,
        }
    }

    /// One fold of the `held_out` items, scored by judges fitted on the others, less those
    /// that share a prompt with a held-out item.
    pub fn held_out(groups: &[&str], held_out: &[bool]) -> Self {
        let held: std::collections::HashSet<&str> = groups
            .iter()
            .zip(held_out)
            .filter(|(_, h)| **h)
            .map(|(g, _)| *g)
            .collect();
        let role = |(g, h): (&&str, &bool)| match (*h, held.contains(g)) {
            (true, _) => Role::Scored(0),
            (false, true) => Role::Unused,
            (false, false) => Role::FitOnly,
        };
        Self {
            roles: groups.iter().zip(held_out).map(role).collect(),
            k: 1,
        }
    }

    /// Items scored in `fold` and items fitted on for it, in item order.
    pub fn split(&self, fold: usize) -> (Vec<usize>, Vec<usize>) {
        let (mut scored, mut fitted) = (Vec::new(), Vec::new());
        for (i, role) in self.roles.iter().enumerate() {
            match role {
                Role::Scored(f) if *f == fold => scored.push(i),
                Role::Scored(_) | Role::FitOnly => fitted.push(i),
                Role::Unused => {}
            }
        }
        (scored, fitted)
    }

    /// Every scored item, in item order.
    pub fn scored(&self) -> Vec<usize> {
        (0..self.roles.len())
            .filter(|&i| matches!(self.roles[i], Role::Scored(_)))
            .collect()
    }
}

/// Fold of each item: items of one group (prompt) share a fold; groups are dealt to `k`
/// folds in a seeded random order, so folds differ in size by at most one group.
pub fn grouped_folds(groups: &[&str], k: usize, seed: u64) -> Vec<usize> {
    let mut unique: Vec<&str> = groups.to_vec();
    unique.sort_unstable();
    unique.dedup();
    unique.shuffle(&mut StdRng::seed_from_u64(seed));
    let fold_of: std::collections::HashMap<&str, usize> = unique
        .iter()
        .enumerate()
        .map(|(i, g)| (*g, i % k.max(1)))
        .collect();
    groups.iter().map(|g| fold_of[g]).collect()
}

#[derive(Debug, Clone, PartialEq)]
pub struct Agreement {
    pub n: usize,
    pub kappa: f64,
    /// 2.5% and 97.5% percentiles of kappa over bootstrap resamples of the items.
    pub kappa_ci: (f64, f64),
    /// ROC-AUC of the graded score against refusal of any type (NaN when a class is absent).
    pub auc: f64,
    /// Per refusal type: (type, called refusals, labelled so).
    pub recall: Vec<(AnswerType, usize, usize)>,
    /// (answers called refusals, answers).
    pub false_refusals: (usize, usize),
}

impl Agreement {
    pub fn false_refusal_rate(&self) -> f64 {
        self.false_refusals.0 as f64 / self.false_refusals.1.max(1) as f64
    }
}

/// How far `said` (refusal or not, per item) agrees with `labels`; `scores` are the graded
/// refusal scores for the AUC.
pub fn agreement(labels: &[AnswerType], said: &[bool], scores: &[f64], seed: u64) -> Agreement {
    let truth: Vec<bool> = labels.iter().map(|l| l.is_refusal()).collect();
    let n = truth.len();
    let all: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut resampled: Vec<f64> = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let pick: Vec<usize> = (0..n).map(|_| rng.gen_range(0..n)).collect();
            kappa(&truth, said, &pick)
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
    let count = |t: AnswerType, want: bool| {
        labels
            .iter()
            .zip(said)
            .filter(|(l, s)| **l == t && **s == want)
            .count()
    };
    let total = |t: AnswerType| labels.iter().filter(|l| **l == t).count();
    Agreement {
        n,
        kappa: kappa(&truth, said, &all),
        kappa_ci: (percentile(0.025), percentile(0.975)),
        auc: roc_auc(&truth, scores),
        recall: AnswerType::ALL[1..]
            .iter()
            .map(|&t| (t, count(t, true), total(t)))
            .collect(),
        false_refusals: (count(AnswerType::Answer, true), total(AnswerType::Answer)),
    }
}

/// The midpoint between neighbouring distinct scores that gives the highest kappa among the
/// cuts that call at most `max_false_refusals` of the answered items (`truth` false) refusals.
/// Kappa alone, on a corpus mostly of refusals, buys a little recall with many false
/// refusals; a run reads over-refusal on benign prompts through the same judge.
pub fn best_cut(truth: &[bool], scores: &[f64], max_false_refusals: f64) -> (f64, f64) {
    let mut sorted = scores.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.dedup();
    let all: Vec<usize> = (0..truth.len()).collect();
    let answered = truth.iter().filter(|&&t| !t).count().max(1) as f64;
    let mut best = (f64::NAN, f64::NAN);
    for pair in sorted.windows(2) {
        let cut = (pair[0] + pair[1]) / 2.0;
        let said: Vec<bool> = scores.iter().map(|&s| s > cut).collect();
        let false_refusals = said.iter().zip(truth).filter(|(s, t)| **s && !**t).count();
        if false_refusals as f64 / answered > max_false_refusals {
            continue;
        }
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

    #[test]
    fn the_cut_keeps_false_refusals_within_the_budget() {
        // Eight refusals, then ten answers, two of them scoring as high as refusals.
        let scores = [
            0.3, 0.45, 0.53, 0.6, 0.7, 0.8, 0.9, 0.95, 0.0, 0.05, 0.1, 0.1, 0.15, 0.15, 0.2, 0.25,
            0.5, 0.55,
        ];
        let truth: Vec<bool> = (0..scores.len()).map(|i| i < 8).collect();
        let false_refusals =
            |cut: f64| scores[8..].iter().filter(|&&s| s > cut).count() as f64 / 10.0;
        let (free, k_free) = best_cut(&truth, &scores, 1.0);
        let (tight, k_tight) = best_cut(&truth, &scores, 0.0);
        assert!(false_refusals(tight) == 0.0, "cut {tight}");
        assert!(
            false_refusals(free) > 0.0 && k_free > k_tight,
            "{free} {k_free} {k_tight}"
        );
        let (mid, _) = best_cut(&truth, &scores, 0.1);
        assert!(false_refusals(mid) <= 0.1 && mid < tight, "{mid}");
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
    fn agreement_counts_recall_per_type_and_false_refusals() {
        use AnswerType::*;
        let labels = [Refusal, Narrative, Narrative, Answer, Answer, Deflection];
        let said = [true, true, false, true, false, true];
        let scores = [0.9, 0.8, 0.3, 0.6, 0.1, 0.7];
        let a = agreement(&labels, &said, &scores, 7);
        assert_eq!(a.recall[0], (Refusal, 1, 1));
        assert_eq!(a.recall[1], (Deflection, 1, 1));
        assert_eq!(a.recall[2], (Narrative, 1, 2));
        assert_eq!(a.recall[3], (Degenerate, 0, 0));
        assert_eq!(a.false_refusals, (1, 2));
        assert!(a.kappa_ci.0 <= a.kappa && a.kappa <= a.kappa_ci.1);
        assert_eq!(a, agreement(&labels, &said, &scores, 7));
    }

    #[test]
    fn grouped_folds_never_split_a_prompt() {
        let groups: Vec<String> = (0..60).map(|i| format!("p{}", i % 17)).collect();
        let refs: Vec<&str> = groups.iter().map(String::as_str).collect();
        let folds = grouped_folds(&refs, 5, 3);
        for (g, f) in refs.iter().zip(&folds) {
            for (h, e) in refs.iter().zip(&folds) {
                if g == h {
                    assert_eq!(f, e, "prompt {g} in two folds");
                }
            }
        }
        let used: std::collections::BTreeSet<usize> = folds.iter().copied().collect();
        assert_eq!(used.len(), 5);
        assert_eq!(folds, grouped_folds(&refs, 5, 3));
        assert_ne!(folds, grouped_folds(&refs, 5, 4));
    }

    #[test]
    fn held_out_items_are_scored_by_judges_fitted_on_other_prompts_only() {
        let groups = ["a", "b", "a", "c", "d", "c"];
        let held = [true, false, false, false, false, true];
        let folds = Folds::held_out(&groups, &held);
        let (scored, fitted) = folds.split(0);
        assert_eq!(scored, vec![0, 5]);
        // Items 2 ("a") and 3 ("c") share a prompt with a held-out item: never fitted on.
        assert_eq!(fitted, vec![1, 4]);
        assert_eq!(folds.scored(), vec![0, 5]);
        let all = Folds::grouped(&groups, 2, 0);
        for fold in 0..2 {
            let (scored, fitted) = all.split(fold);
            assert_eq!(scored.len() + fitted.len(), groups.len());
            for &s in &scored {
                assert!(fitted.iter().all(|&f| groups[f] != groups[s]));
            }
        }
    }
}
