//! Conditional steering (beyond the paper, after CAST, Lee et al. 2024): steer a prompt only
//! when its activation says it is on the target topic. A topic direction is fitted at one
//! point (on-topic minus off-topic train prompts, at the point where this rule is most often
//! right on held-out train prompts); a prompt whose last-token projection on it passes the
//! threshold is steered, others are left alone, so requests off the topic (harmful or benign)
//! keep their behaviour.

use crate::answers::Format;
use anyhow::{bail, Context, Result};
use refusal_steer_data::activations::Activations;
use refusal_steer_data::Prompt;
use refusal_steer_engine::{
    prefill, Action, Intervention, Logits, Model, Padding, Positions, Rows,
};
use refusal_steer_steer::linalg::{dot, norm};
use refusal_steer_steer::{fit, k_fold_heldout, Class, HeldOut, Method, Ridge, Samples};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the topic direction is fitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateMethod {
    /// Mean difference: lets more on-topic prompts through.
    #[default]
    Md,
    /// Ridge mean difference, whitened by the off-topic prompts' covariance: discounts the
    /// axes along which off-topic prompts vary anyway, so fewer look-alike questions on
    /// neighbouring subjects get through, at some cost in on-topic prompts
    /// (scripts/gate_topics: on Qwen2.5-Coder-1.5B, a math gate lets 9 of 148 held-out
    /// physics/chemistry/economics questions through instead of 45, and 38 of 55 math
    /// questions instead of 48).
    Rmd,
}

impl GateMethod {
    /// Left out of saved gates and configs, so files from before the choice stay as they were.
    pub fn is_md(&self) -> bool {
        *self == GateMethod::Md
    }

    fn method(self) -> Method {
        match self {
            GateMethod::Md => Method::Md,
            GateMethod::Rmd => Method::Rmd,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// How `direction` was fitted.
    #[serde(default, skip_serializing_if = "GateMethod::is_md")]
    pub method: GateMethod,
    pub point: usize,
    /// Unit topic direction at `point`.
    pub direction: Vec<f32>,
    /// Prompts whose projection exceeds this are steered.
    pub threshold: f64,
    /// Held-out AUC of the direction at `point` on the train prompts.
    pub heldout_auc: f64,
    /// Held-out balanced accuracy of the gate's own rule (direction and midpoint threshold)
    /// at `point` on the train prompts: what chooses the point.
    #[serde(default)]
    pub heldout_accuracy: f64,
}

impl Gate {
    /// Fits the gate on train activations: `on_topic[i]` says whether row i is on the topic
    /// (None: left out). `ridge` is used by [`GateMethod::Rmd`].
    pub fn fit(
        acts: &Activations,
        on_topic: &[Option<bool>],
        method: GateMethod,
        ridge: Ridge,
        folds: usize,
        seed: u64,
    ) -> Result<Self> {
        let classes: Vec<Class> = on_topic
            .iter()
            .map(|t| match t {
                Some(true) => Class::Refusal,
                Some(false) => Class::Compliance,
                None => Class::Unused,
            })
            .collect();
        let weights = vec![1.0; classes.len()];
        let (on, off) = (
            classes.iter().filter(|&&c| c == Class::Refusal).count(),
            classes.iter().filter(|&&c| c == Class::Compliance).count(),
        );
        if on < 2 || off < 2 {
            bail!("a topic gate needs at least 2 prompts on and off the topic ({on} and {off})");
        }
        let folds = folds.min(on).min(off).max(2);
        let d = acts.header.d;
        // The point where the gate's own decision (midpoint threshold) is most often right on
        // held-out prompts; AUC breaks ties. AUC alone only ranks, and with few prompts many
        // points rank perfectly while their midpoints still cut through one class.
        let mut best: Option<(usize, HeldOut)> = None;
        for point in 1..acts.header.n_points {
            let x = acts.at_point(point);
            let samples = Samples::new(&x, d, &classes, &weights)?;
            let h = k_fold_heldout(&samples, method.method(), ridge, folds, seed)?;
            let better = |b: &HeldOut| (h.midpoint_accuracy, h.auc) > (b.midpoint_accuracy, b.auc);
            if best.as_ref().is_none_or(|(_, b)| better(b)) {
                best = Some((point, h));
            }
        }
        let (point, heldout) = best.expect("a model has at least one block");
        let x = acts.at_point(point);
        let samples = Samples::new(&x, d, &classes, &weights)?;
        let v = fit(&samples, method.method(), ridge)?.vector;
        let norm = norm(&v).max(f64::MIN_POSITIVE);
        let direction: Vec<f32> = v.iter().map(|&x| (f64::from(x) / norm) as f32).collect();
        // The midpoint between the two groups' mean projections.
        let mean_of = |class: Class| {
            let rows: Vec<usize> = (0..classes.len())
                .filter(|&i| classes[i] == class)
                .collect();
            rows.iter()
                .map(|&i| dot(&x[i * d..(i + 1) * d], &direction))
                .sum::<f64>()
                / rows.len() as f64
        };
        let threshold = (mean_of(Class::Refusal) + mean_of(Class::Compliance)) / 2.0;
        Ok(Self {
            method,
            point,
            direction,
            threshold,
            heldout_auc: heldout.auc,
            heldout_accuracy: heldout.midpoint_accuracy,
        })
    }

    /// Reads a gate that `run` saved (vectors/gate.json) and checks that it fits `model`.
    pub fn load(path: &Path, model: &Model) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the topic gate {}", path.display()))?;
        let gate: Gate = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a topic gate (the vectors/gate.json that `run` writes)",
                path.display()
            )
        })?;
        let (n_layers, d) = (model.config.n_layers, model.config.d_model);
        if gate.point > n_layers || gate.direction.len() != d {
            bail!(
                "{}: the gate reads point {} with {} dimensions, but this model has points 0..={n_layers} of {d} dimensions: use the gate of a run on this model",
                path.display(),
                gate.point,
                gate.direction.len()
            );
        }
        if !gate.threshold.is_finite() || gate.direction.iter().any(|x| !x.is_finite()) {
            bail!("{}: the gate holds a NaN or infinite value", path.display());
        }
        Ok(gate)
    }

    /// Which prompts pass the gate (one unsteered prefill per batch, through the gate's point
    /// only, the chat template's opening run once).
    pub fn select(
        &self,
        model: &Model,
        format: &Format,
        prompts: &[String],
        batch: usize,
    ) -> Result<Vec<bool>> {
        let prefix = format.shared_prefix(model)?;
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(batch.max(1)) {
            let tokens: Vec<Vec<u32>> = chunk
                .iter()
                .map(|p| format.encode(model, p))
                .collect::<Result<_>>()?;
            let mut hooks = model.new_hooks();
            hooks.add(Intervention {
                point: self.point,
                action: Action::Capture,
                rows: Rows::All,
                positions: Positions::LastPrompt,
            })?;
            let refs: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
            match &prefix {
                Some(prefix) => prefix.prefill(model, &refs, 0, &mut hooks, Logits::None)?,
                None => prefill(model, &refs, Padding::Left, 0, &mut hooks, Logits::None)?,
            };
            let mut pass = vec![false; chunk.len()];
            for c in hooks.take_captured() {
                pass[c.row] = dot(&c.values, &self.direction) > self.threshold;
            }
            out.extend(pass);
        }
        Ok(out)
    }

    /// [`Gate::select`] for prompt records.
    pub fn select_prompts(
        &self,
        model: &Model,
        format: &Format,
        prompts: &[Prompt],
        batch: usize,
    ) -> Result<Vec<bool>> {
        let texts: Vec<String> = prompts.iter().map(|p| p.prompt.clone()).collect();
        self.select(model, format, &texts, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fitting::tests::planted;

    #[test]
    fn the_gate_finds_the_point_where_the_topic_is_written_and_splits_at_the_midpoint() {
        let d = 12;
        let topic: Vec<f32> = (0..d).map(|j| if j == 5 { 1.0 } else { 0.0 }).collect();
        let acts = planted(30, d, &topic, 5.0, 3);
        let on_topic: Vec<Option<bool>> = (0..30).map(|i| Some(i < 15)).collect();
        let gate = Gate::fit(&acts, &on_topic, GateMethod::Md, Ridge::Relative(1.0), 5, 0).unwrap();
        assert_eq!(gate.point, 2);
        assert!(gate.heldout_auc > 0.99);
        assert!(gate.direction[5] > 0.9);
        // Every train row lands on its side of the threshold.
        let x = acts.at_point(2);
        for (i, row) in x.chunks_exact(d).enumerate() {
            assert_eq!(
                dot(row, &gate.direction) > gate.threshold,
                i < 15,
                "row {i}"
            );
        }
        let err = Gate::fit(
            &acts,
            &[Some(true); 30],
            GateMethod::Md,
            Ridge::Relative(1.0),
            5,
            0,
        )
        .unwrap_err();
        assert!(err.to_string().contains("on and off the topic"), "{err}");
    }

    /// On-topic rows differ a little along a quiet axis and more along one where off-topic rows
    /// spread widely (look-alike questions on neighbouring subjects): the mean difference
    /// follows the loud axis and lets wide off-topic rows through; RMD discounts it.
    #[test]
    fn the_ridge_gate_keeps_out_off_topic_rows_that_spread_along_the_topic() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let (d, n) = (6, 200);
        let mut rng = StdRng::seed_from_u64(1);
        let mut data = Vec::new();
        for i in 0..n {
            let on = i % 2 == 0;
            for point in 0..2 {
                for j in 0..d {
                    let noise: f32 = rng.gen_range(-0.1..0.1);
                    let x = match (point, j, on) {
                        (0, _, _) => 0.0,
                        (_, 0, true) => 1.0 + noise,
                        (_, 1, true) => 5.0 + noise,
                        (_, 1, false) => rng.gen_range(-15.0..15.0),
                        _ => noise,
                    };
                    data.push(x);
                }
            }
        }
        let ids: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
        let acts = Activations {
            header: refusal_steer_data::activations::ActivationsHeader {
                n_points: 2,
                d,
                ids,
                sets: vec![None; n],
                metadata: Default::default(),
            },
            data,
        };
        // Fitted on the first half, judged on the second.
        let on_topic: Vec<Option<bool>> =
            (0..n).map(|i| (i < n / 2).then_some(i % 2 == 0)).collect();
        let off_passed = |method| {
            let gate = Gate::fit(&acts, &on_topic, method, Ridge::Relative(0.01), 5, 0).unwrap();
            assert_eq!(gate.method, method);
            let x = acts.at_point(1);
            let passed = |on: bool| {
                (n / 2..n)
                    .filter(|&i| (i % 2 == 0) == on)
                    .filter(|&i| dot(&x[i * d..(i + 1) * d], &gate.direction) > gate.threshold)
                    .count()
            };
            assert_eq!(
                passed(true),
                n / 4,
                "{method:?} lets every on-topic row through"
            );
            passed(false)
        };
        let (md, rmd) = (off_passed(GateMethod::Md), off_passed(GateMethod::Rmd));
        assert!(md >= 10, "MD lets {md} of 50 off-topic rows through");
        assert_eq!(rmd, 0, "RMD lets {rmd} of 50 off-topic rows through");
    }
}
