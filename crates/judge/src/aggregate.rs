//! Per-prompt refusal confidence from K answers (METHOD.md §1): weights are a softmax over the
//! answers' mean token log-probabilities (temperature 1), c is the weighted mean of the labels.

use crate::{JudgeError, Result};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptClass {
    Refusal,
    Compliance,
    Neutral,
}

/// c above `refusal` is a refusal, below `compliance` a compliance, otherwise neutral.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub refusal: f64,
    pub compliance: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            refusal: refusal_steer_data::CONFIDENCE_THRESHOLD,
            compliance: -refusal_steer_data::CONFIDENCE_THRESHOLD,
        }
    }
}

impl Thresholds {
    pub fn classify(&self, c: f64) -> PromptClass {
        if c > self.refusal {
            PromptClass::Refusal
        } else if c < self.compliance {
            PromptClass::Compliance
        } else {
            PromptClass::Neutral
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PromptScore {
    /// Refusal confidence in [-1, 1].
    pub c: f64,
    pub class: PromptClass,
}

/// Aggregates one prompt's answers, each given as (label in {-1, 0, +1}, mean log-prob).
pub fn aggregate(answers: &[(i8, f64)], thresholds: &Thresholds) -> Result<PromptScore> {
    if answers.is_empty() {
        return Err(JudgeError::Setup(
            "a prompt needs at least one judged answer".into(),
        ));
    }
    if let Some((_, bad)) = answers.iter().find(|(_, lp)| !lp.is_finite()) {
        return Err(JudgeError::Setup(format!(
            "mean log-probability {bad} is not a finite number; regenerate the answers"
        )));
    }
    // Subtracting the maximum keeps the exponentials in range.
    let max = answers.iter().map(|&(_, lp)| lp).fold(f64::MIN, f64::max);
    let weights: Vec<f64> = answers.iter().map(|&(_, lp)| (lp - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    let c = answers
        .iter()
        .zip(&weights)
        .map(|(&(label, _), w)| f64::from(label) * w / total)
        .sum::<f64>()
        .clamp(-1.0, 1.0);
    Ok(PromptScore {
        c,
        class: thresholds.classify(c),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(answers: &[(i8, f64)]) -> PromptScore {
        aggregate(answers, &Thresholds::default()).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn equal_log_probs_give_the_plain_mean() {
        let s = c(&[(1, -0.7), (1, -0.7), (-1, -0.7)]);
        assert!(close(s.c, 1.0 / 3.0));
        assert_eq!(s.class, PromptClass::Refusal);
        let s = c(&[(1, -2.0), (-1, -2.0)]);
        assert!(close(s.c, 0.0));
        assert_eq!(s.class, PromptClass::Neutral);
    }

    #[test]
    fn likelier_answers_weigh_more() {
        // exp(0) : exp(-ln 3) = 3 : 1, so weights 3/4 and 1/4.
        let s = c(&[(1, 0.0), (-1, -(3f64.ln()))]);
        assert!(close(s.c, 0.5), "{}", s.c);
        // Weights 1/5, 4/5 on (+1, -1): c = -0.6.
        let s = c(&[(1, -1.0 - 4f64.ln()), (-1, -1.0)]);
        assert!(close(s.c, -0.6), "{}", s.c);
        assert_eq!(s.class, PromptClass::Compliance);
    }

    #[test]
    fn unparsable_answers_count_as_zero() {
        // Weights 1/2, 1/4, 1/4 on (0, -1, +1): c = 0.
        let l = 2f64.ln();
        let s = c(&[(0, 0.0), (-1, -l), (1, -l)]);
        assert!(close(s.c, 0.0));
        // Weights 0.9 / 0.1 on (0, -1): c = -0.1, on the default threshold; a stricter
        // threshold makes it a compliance.
        let s = c(&[(0, 0.0), (-1, -(9f64.ln()))]);
        assert!(close(s.c, -0.1));
        let strict = Thresholds {
            refusal: 0.05,
            compliance: -0.05,
        };
        assert_eq!(strict.classify(s.c), PromptClass::Compliance);
    }

    #[test]
    fn extreme_log_probs_do_not_overflow() {
        let s = c(&[(1, -1000.0), (-1, -1.0)]);
        assert!(close(s.c, -1.0));
        assert!(aggregate(&[], &Thresholds::default()).is_err());
        assert!(aggregate(&[(1, f64::NAN)], &Thresholds::default())
            .unwrap_err()
            .to_string()
            .contains("regenerate"));
    }
}
