//! What a run measured and chose: the types `report.json` holds and the report is written from.

use crate::config::Direction;
use crate::evaluate::SetRate;
use crate::gate::budget::Cuts;
use crate::gate::GateMethod;
use crate::steering::SteerMode;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One strength tried on validation prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trial {
    /// Signed norm-scaled strength.
    pub strength: f64,
    pub kl: f64,
    /// Per set; empty when the KL limit stopped the trial before generating.
    pub rates: BTreeMap<String, SetRate>,
    pub feasible: bool,
    pub note: String,
}

/// What tuning chose for one method.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tuned {
    pub method: String,
    #[serde(default)]
    pub mode: SteerMode,
    pub points: Vec<usize>,
    pub trials: Vec<Trial>,
    /// The chosen signed strength; None when no strength kept every limit.
    pub strength: Option<f64>,
}

impl Tuned {
    /// The trial at the chosen strength.
    pub fn chosen(&self) -> Option<&Trial> {
        let s = self.strength?;
        self.trials.iter().find(|t| t.strength == s)
    }
}

/// One condition on the test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub condition: String,
    pub strength: Option<f64>,
    pub points: Vec<usize>,
    pub rates: BTreeMap<String, SetRate>,
    /// Mean next-token KL to the unsteered model on the benign test prompts it answers.
    pub kl: Option<f64>,
    pub capability_accuracy: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub model: String,
    pub judge: String,
    pub direction: Direction,
    pub train_classes: BTreeMap<String, (usize, usize, usize)>,
    pub heldout_auc: BTreeMap<String, Vec<Option<f64>>>,
    /// The topic gate of the gated methods: how it was fitted, the points it reads, whether it
    /// has a harmful-request veto, where it cuts, its held-out AUC and accuracy on the train
    /// prompts.
    pub gate_method: GateMethod,
    pub gate_points: Vec<usize>,
    pub gate_veto: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate_cuts: Option<Cuts>,
    pub gate_heldout_auc: f64,
    #[serde(default)]
    pub gate_heldout_accuracy: f64,
    pub validation_baseline: BTreeMap<String, SetRate>,
    pub tuned: Vec<Tuned>,
    pub test: Vec<Evaluation>,
    /// The method recommended for export: of those that kept every limit on validation, the
    /// one with the lowest target metric there, if lower than the baseline's.
    pub recommended: Option<String>,
    pub timings_s: BTreeMap<String, f64>,
}

/// The share of target answers that miss the run's aim: what tuning minimises.
pub fn target_metric(rates: &BTreeMap<String, SetRate>, direction: Direction) -> f64 {
    rates["target"].missed(direction)
}

/// The feasible method with the lowest validation target metric, if it is lower than the
/// unsteered model's: a strength too weak to change anything keeps every limit, but there is
/// nothing in it to recommend.
pub fn recommend(
    tuned: &[Tuned],
    validation_baseline: &BTreeMap<String, SetRate>,
    direction: Direction,
) -> Option<String> {
    let unsteered = target_metric(validation_baseline, direction);
    tuned
        .iter()
        .filter_map(|t| {
            Some((
                t.method.clone(),
                target_metric(&t.chosen()?.rates, direction),
            ))
        })
        .filter(|(_, metric)| *metric < unsteered)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(method, _)| method)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::tests::ten_answers;

    fn tuned(method: &str, strength: Option<f64>, target_refusals: usize) -> Tuned {
        Tuned {
            method: method.into(),
            mode: SteerMode::default(),
            points: vec![1],
            trials: vec![Trial {
                strength: 0.02,
                kl: 0.1,
                rates: BTreeMap::from([("target".into(), ten_answers(target_refusals, 0))]),
                feasible: strength.is_some(),
                note: String::new(),
            }],
            strength,
        }
    }

    #[test]
    fn only_a_feasible_strength_that_moves_the_target_is_recommended() {
        let baseline = BTreeMap::from([("target".to_string(), ten_answers(0, 0))]);
        // Inducing: the only feasible strength leaves the target as it was.
        let weak = [tuned("md+gated", Some(0.02), 0), tuned("md", None, 9)];
        assert_eq!(recommend(&weak, &baseline, Direction::Induce), None);
        let moved = [
            tuned("md+gated", Some(0.02), 0),
            tuned("wrmd+gated", Some(0.02), 6),
        ];
        assert_eq!(
            recommend(&moved, &baseline, Direction::Induce).as_deref(),
            Some("wrmd+gated")
        );
    }
}
