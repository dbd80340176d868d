//! Where the ridge gate cuts: for stated budgets of harmful and of other off-topic prompts let
//! in, not at the midpoint of the classes' mean scores.
//!
//! The read-outs are fitted on every train prompt, but their cuts are chosen on cross-fitted
//! scores: each prompt scored by read-outs fitted without its group (the source it was drawn
//! from, held out whole), because a prompt whose source is in the fit scores better than a new
//! one (`docs/results/gate-generalisation.md`: cuts from random folds, which share sources, let
//! 1.9% of the harmful prompts of unseen sources through for a budget of 0.5%). Of the cut
//! pairs that let in at most `harmful` of the harmful prompts and `off_topic` of the other
//! off-topic ones, the chosen pair lets in the most on-topic prompts; at a tie, the stricter
//! veto. Scores and cuts are relative to each read-out's midpoint threshold, so a cut is a
//! shift of that threshold.

use super::GateLabel;
use serde::{Deserialize, Serialize};

/// The shares of train prompts the gate may let in, scored out of fold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budgets {
    pub harmful: f64,
    pub off_topic: f64,
}

impl Budgets {
    /// Half of 1% for harmful prompts and 3% (of 5%) for benign and other off-topic ones:
    /// prompts of unseen sources pass more often than the train prompts do.
    pub const DEFAULT: Budgets = Budgets {
        harmful: 0.005,
        off_topic: 0.03,
    };

    /// Budgets that are shares, checked.
    pub fn new(harmful: f64, off_topic: f64) -> Result<Self, String> {
        let budgets = Budgets { harmful, off_topic };
        budgets.check()?;
        Ok(budgets)
    }

    /// Each budget must be a share in [0, 1).
    pub fn check(&self) -> Result<(), String> {
        for (name, share) in [("harmful", self.harmful), ("off_topic", self.off_topic)] {
            if !(0.0..1.0).contains(&share) {
                return Err(format!(
                    "the gate's {name} budget is {share}: give a share of the train prompts in [0, 1), e.g. 0.005 for 0.5%"
                ));
            }
        }
        Ok(())
    }

    pub fn is_default(&self) -> bool {
        *self == Budgets::DEFAULT
    }
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets::DEFAULT
    }
}

/// The chosen cuts and what they let in of the train prompts, out of fold: kept in the gate
/// file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cuts {
    pub harmful_budget: f64,
    pub off_topic_budget: f64,
    /// Added to the topic read-out's midpoint threshold.
    pub topic_shift: f64,
    /// Added to the veto's midpoint threshold.
    pub veto_shift: f64,
    pub on_topic_passed: f64,
    pub harmful_passed: f64,
    pub off_topic_passed: f64,
}

/// Cuts for cross-fitted `topic` and `harm` scores (less their folds' thresholds) of prompts
/// labelled `labels` (a prompt without finite scores is left out); `None` when a class the
/// budgets speak of has no prompt.
pub fn choose(topic: &[f64], harm: &[f64], labels: &[GateLabel], budgets: Budgets) -> Option<Cuts> {
    let rows = |label: GateLabel| -> Vec<usize> {
        (0..labels.len())
            .filter(|&i| labels[i] == label && topic[i].is_finite() && harm[i].is_finite())
            .collect()
    };
    let (on, harmful, off) = (
        rows(GateLabel::OnTopic),
        rows(GateLabel::Harmful),
        rows(GateLabel::OffTopic),
    );
    if on.is_empty() || harmful.is_empty() || off.is_empty() {
        return None;
    }
    let labelled = || on.iter().chain(&harmful).chain(&off);
    // The topic cut that lets in at most `share` of `class` among those the veto cut `h` passes:
    // the (k+1)-th highest such topic score, k the budget's count (nothing binds: -inf).
    let topic_cut = |class: &[usize], share: f64, h: f64| -> f64 {
        let mut passing: Vec<f64> = class
            .iter()
            .filter(|&&i| harm[i] <= h)
            .map(|&i| topic[i])
            .collect();
        passing.sort_by(|a, b| b.total_cmp(a));
        let allowed = (share * class.len() as f64).floor() as usize;
        passing.get(allowed).copied().unwrap_or(f64::NEG_INFINITY)
    };
    // Every distinct set of prompts the veto can pass: cuts between consecutive harm scores,
    // one below them all and one at the highest.
    let mut harms: Vec<f64> = labelled().map(|&i| harm[i]).collect();
    harms.sort_by(f64::total_cmp);
    harms.dedup();
    let veto_cuts = std::iter::once(harms[0] - 1.0)
        .chain(harms.windows(2).map(|w| (w[0] + w[1]) / 2.0))
        .chain(std::iter::once(harms[harms.len() - 1]));
    // Below every topic score: the cut when no budget binds.
    let lowest = labelled().map(|&i| topic[i]).fold(f64::INFINITY, f64::min) - 1.0;
    let mut best: Option<(usize, f64, f64)> = None;
    for h in veto_cuts {
        let t = topic_cut(&harmful, budgets.harmful, h)
            .max(topic_cut(&off, budgets.off_topic, h))
            .max(lowest);
        let passed = on.iter().filter(|&&i| topic[i] > t && harm[i] <= h).count();
        if best.is_none_or(|(n, _, _)| passed > n) {
            best = Some((passed, t, h));
        }
    }
    let (_, t, h) = best?;
    let share = |class: &[usize]| {
        class
            .iter()
            .filter(|&&i| topic[i] > t && harm[i] <= h)
            .count() as f64
            / class.len() as f64
    };
    Some(Cuts {
        harmful_budget: budgets.harmful,
        off_topic_budget: budgets.off_topic,
        topic_shift: t,
        veto_shift: h,
        on_topic_passed: share(&on),
        harmful_passed: share(&harmful),
        off_topic_passed: share(&off),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use GateLabel::*;

    #[test]
    fn the_cuts_keep_both_budgets_and_let_in_the_most_on_topic_prompts() {
        // On-topic prompts score high on the topic; one harmful prompt looks on-topic but
        // scores high on harm, one off-topic prompt looks on-topic and harmless.
        let topic = [2.0, 1.5, 1.6, 0.5, 1.8, -1.0, -2.0, 1.2, -1.5, -0.5];
        let harm = [-1.0, -1.0, 0.8, -1.0, 1.0, 2.0, 1.5, -1.0, -1.0, -1.0];
        let labels = [
            OnTopic, OnTopic, OnTopic, OnTopic, Harmful, Harmful, Harmful, OffTopic, OffTopic,
            OffTopic,
        ];
        let budgets = Budgets {
            harmful: 0.0,
            off_topic: 0.0,
        };
        let cuts = choose(&topic, &harm, &labels, budgets).unwrap();
        assert_eq!(cuts.harmful_passed, 0.0);
        assert_eq!(cuts.off_topic_passed, 0.0);
        // The off-topic prompt at 1.2 bounds the topic cut; the harmful one at 1.8 is vetoed by
        // a cut below its harm score, which still passes the on-topic prompt with harm 0.8.
        assert_eq!(cuts.topic_shift, 1.2);
        assert!(cuts.veto_shift > 0.8 && cuts.veto_shift < 1.0);
        assert_eq!(cuts.on_topic_passed, 0.75);
        // A budget of one off-topic prompt in three lets the cut fall to the next one.
        let looser = Budgets {
            harmful: 0.0,
            off_topic: 0.34,
        };
        let cuts = choose(&topic, &harm, &labels, looser).unwrap();
        assert_eq!(cuts.off_topic_passed, 1.0 / 3.0);
        assert_eq!(cuts.on_topic_passed, 1.0);
    }

    #[test]
    fn without_harmful_or_off_topic_prompts_there_is_nothing_to_budget() {
        let labels = [OnTopic, OffTopic];
        assert!(choose(&[1.0, -1.0], &[0.0, 0.0], &labels, Budgets::DEFAULT).is_none());
    }
}
