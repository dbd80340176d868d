//! Conditional steering (beyond the paper, after CAST, Lee et al. 2024): steer a prompt only
//! when its activation says it is on the target topic, so requests off the topic (harmful or
//! benign) keep their behaviour.
//!
//! A gate reads a prompt's residual stream at one or more points, pooled one way (the last
//! prompt token, or the mean over the prompt's own tokens), and scores the pooled vectors, side
//! by side, with a linear read-out: the prompt is steered when the topic score passes its
//! threshold and, where the gate has a harmful-request veto, the veto's score does not pass
//! its own. The veto is a second read-out fitted on harmful against every other labelled
//! prompt at the same points: a prompt it flags is never gated in, whatever its topic score.
//! The ridge gate's two thresholds are cut for stated budgets of harmful and other off-topic
//! prompts let in, on scores of gates fitted without each prompt's source ([`budget`]); the
//! single-direction gates cut at the midpoint of the classes' mean scores.
//!
//! Methods: `md` and `rmd` are one direction at the one point where its midpoint rule is most
//! often right on held-out train prompts, read at the last prompt token; `ridge` is a
//! class-balanced ridge classifier over the mean of the prompt's own tokens at several points
//! (`docs/results/gate-generalisation.md` measures why: on prompts of sources and phrasings it
//! never saw, the single-point gate lets through fewer on-topic and more harmful prompts).

pub mod budget;
pub mod corpus;
pub mod eval;

use crate::answers::Format;
use crate::capture::{by_length, capture_pooled, CapturePosition};
use anyhow::{bail, Context, Result};
pub use budget::Budgets;
use budget::Cuts;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use refusal_steer_data::activations::Activations;
use refusal_steer_engine::{Model, SharedPrefix};
use refusal_steer_steer::classify::{balanced_ridge, Gram};
use refusal_steer_steer::linalg::{dot, norm};
use refusal_steer_steer::{auc, fit, k_fold_heldout, Class, HeldOut, Method, Ridge, Samples};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// How the topic read-out is fitted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GateMethod {
    /// Class-balanced ridge classifier over the mean of the prompt's own tokens at several
    /// points, with a harmful-request veto where harmful train prompts are given.
    #[default]
    Ridge,
    /// Mean difference at one point, last prompt token: lets more on-topic prompts through.
    Md,
    /// Ridge mean difference, whitened by the off-topic prompts' covariance, at one point, last
    /// prompt token: discounts the axes along which off-topic prompts vary anyway, so fewer
    /// look-alike questions on neighbouring subjects get through, at some cost in on-topic
    /// prompts (scripts/gate_topics: on Qwen2.5-Coder-1.5B, a math gate lets 9 of 148
    /// held-out physics/chemistry/economics questions through instead of 45, and 38 of 55 math
    /// questions instead of 48).
    Rmd,
}

impl GateMethod {
    /// Left out of configs, so the default stays implicit.
    pub fn is_default(&self) -> bool {
        *self == GateMethod::default()
    }

    /// Where the method reads a prompt.
    pub fn pooling(self) -> Pooling {
        match self {
            GateMethod::Ridge => Pooling::MeanUser,
            GateMethod::Md | GateMethod::Rmd => Pooling::LastPrompt,
        }
    }
}

/// Which tokens' residual vectors make a prompt's vector at a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pooling {
    /// The last token of the formatted prompt.
    LastPrompt,
    /// The mean over the prompt's own tokens (after the chat template's shared opening).
    MeanUser,
}

impl Pooling {
    /// The capture that records what this pooling reads.
    pub fn capture_position(self) -> CapturePosition {
        match self {
            Pooling::LastPrompt => CapturePosition::LastPrompt,
            Pooling::MeanUser => CapturePosition::MeanUser,
        }
    }
}

/// What a train prompt is to the gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateLabel {
    OnTopic,
    OffTopic,
    /// Off the topic, and a request the model must keep refusing: the veto's positives.
    Harmful,
    Unused,
}

/// A linear score over the pooled vectors at the gate's points, side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readout {
    /// `[points × d]`, in the order of the gate's points.
    pub weights: Vec<f32>,
    /// A score above this passes.
    pub threshold: f64,
}

impl Readout {
    pub fn score(&self, features: &[f32]) -> f64 {
        dot(&self.weights, features)
    }
}

/// What the gate made of one prompt; answer records carry it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Decision {
    pub gated_in: bool,
    /// The topic score less its threshold: above 0 is on the topic.
    pub topic: f64,
    /// The harm score less the veto's threshold, where the gate has a veto: above 0 is vetoed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub harm: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    /// How it was fitted, and so how it reads a prompt ([`GateMethod::pooling`]).
    pub method: GateMethod,
    pub points: Vec<usize>,
    pub topic: Readout,
    /// A prompt whose harm score passes this is never steered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub veto: Option<Readout>,
    /// Where the ridge gate's cuts were moved from the midpoints, for what budgets, and what
    /// they let in of its train prompts out of fold ([`budget`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuts: Option<Cuts>,
    /// Held-out AUC of the topic score on the train prompts (k folds).
    pub heldout_auc: f64,
    /// Held-out balanced accuracy of the topic rule (score and midpoint threshold) on the
    /// train prompts.
    pub heldout_accuracy: f64,
    /// The prompts it has read.
    #[serde(skip)]
    pub read: ReadPrompts,
}

/// The pooled vectors of prompts a gate has read, by what makes them (pooling, points, the
/// prompt's tokens; the model is the one the gate was fitted on): shared by every clone of the
/// gate, so the conditions of a run, which all carry the run's gate, read each prompt once.
/// Never part of a gate's equality or file.
#[derive(Clone, Default)]
pub struct ReadPrompts(Arc<Mutex<HashMap<ReadKey, Vec<f32>>>>);

/// How a prompt was read: the pooling, the points, the prompt's tokens.
type ReadKey = (Pooling, Vec<usize>, Vec<u32>);

/// Prompts held at most: a server reading new prompts forever starts afresh past this.
const READ_PROMPTS_HELD: usize = 2048;

impl ReadPrompts {
    fn get(&self, pooling: Pooling, points: &[usize], tokens: &[u32]) -> Option<Vec<f32>> {
        let held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&(pooling, points.to_vec(), tokens.to_vec()))
            .cloned()
    }

    fn put(&self, pooling: Pooling, points: &[usize], tokens: &[u32], features: &[f32]) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if held.len() >= READ_PROMPTS_HELD {
            held.clear();
        }
        held.insert(
            (pooling, points.to_vec(), tokens.to_vec()),
            features.to_vec(),
        );
    }
}

impl PartialEq for ReadPrompts {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for ReadPrompts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.lock().map_or(0, |h| h.len());
        write!(f, "ReadPrompts({held} held)")
    }
}

/// How a gate is fitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitSettings {
    pub method: GateMethod,
    /// The ridge of the `rmd` and `ridge` gates (`ridge` takes a relative one).
    pub ridge: Ridge,
    /// Where the ridge gate cuts.
    pub budgets: Budgets,
    /// Folds of the held-out estimate.
    pub folds: usize,
    pub seed: u64,
}

impl FitSettings {
    /// `method` with `ridge`, the default budgets, 5 folds and seed 0.
    pub fn new(method: GateMethod, ridge: Ridge) -> Self {
        FitSettings {
            method,
            ridge,
            budgets: Budgets::DEFAULT,
            folds: 5,
            seed: 0,
        }
    }
}

impl Gate {
    /// Fits the gate on train activations captured with `settings.method.pooling()`
    /// (`labels[i]` and `groups[i]`, the source it was drawn from, for row i); the ridge gate's
    /// cuts hold out whole groups.
    pub fn fit(
        acts: &Activations,
        labels: &[GateLabel],
        groups: &[&str],
        settings: &FitSettings,
    ) -> Result<Self> {
        let (on, off) = check_inputs(acts, labels, groups, settings.method)?;
        let folds = settings.folds.min(on).min(off).max(2);
        let (ridge, seed) = (settings.ridge, settings.seed);
        match settings.method {
            method @ (GateMethod::Md | GateMethod::Rmd) => {
                one_point(acts, labels, method, ridge, folds, seed)
            }
            GateMethod::Ridge => {
                let kappa = relative(ridge)?;
                let mut gate = several_points(acts, labels, groups, kappa, settings.budgets)?;
                (gate.heldout_auc, gate.heldout_accuracy) =
                    heldout(acts, labels, &gate.points, kappa, folds, seed)?;
                Ok(gate)
            }
        }
    }

    /// [`Gate::fit`] without the held-out estimate of the ridge gate (its held-out numbers are
    /// NaN): for a caller that measures the gate on prompts of its own.
    pub(crate) fn fit_unmeasured(
        acts: &Activations,
        labels: &[GateLabel],
        groups: &[&str],
        settings: &FitSettings,
    ) -> Result<Self> {
        match settings.method {
            GateMethod::Ridge => {
                check_inputs(acts, labels, groups, settings.method)?;
                let kappa = relative(settings.ridge)?;
                several_points(acts, labels, groups, kappa, settings.budgets)
            }
            GateMethod::Md | GateMethod::Rmd => Self::fit(acts, labels, groups, settings),
        }
    }

    /// The points the ridge gate reads on a model of `n_layers` blocks: seven, evenly spread
    /// between an eighth and seven eighths of the depth.
    pub fn ridge_points(n_layers: usize) -> Vec<usize> {
        let mut points: Vec<usize> = (1..=7).map(|i| (i * n_layers / 8).max(1)).collect();
        points.dedup();
        points
    }

    /// The pooled vectors of activation row `row` at the gate's points, side by side.
    pub fn features(&self, acts: &Activations, row: usize) -> Vec<f32> {
        features_at(acts, &self.points, row)
    }

    /// What the gate makes of a prompt with these features.
    pub fn decide(&self, features: &[f32]) -> Decision {
        let topic = self.topic.score(features) - self.topic.threshold;
        let harm = self.veto.as_ref().map(|v| v.score(features) - v.threshold);
        Decision {
            gated_in: topic > 0.0 && harm.is_none_or(|h| h <= 0.0),
            topic,
            harm,
        }
    }

    /// Whether a prompt with these features is steered.
    pub fn admits(&self, features: &[f32]) -> bool {
        self.decide(features).gated_in
    }

    /// Reads a gate that `run` saved (vectors/gate.json) and checks that it fits `model`.
    pub fn load(path: &Path, model: &Model) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the topic gate {}", path.display()))?;
        let gate: Gate = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a topic gate of this version (the vectors/gate.json that `run` writes; rerun `run` to rebuild an older one)",
                path.display()
            )
        })?;
        gate.check(model.config.n_layers, model.config.d_model)
            .map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))?;
        Ok(gate)
    }

    /// Why this gate cannot read a model of `n_layers` blocks and width `d`, if it cannot.
    pub fn check(&self, n_layers: usize, d: usize) -> Result<(), String> {
        if self.points.is_empty() || self.points.iter().any(|&p| p > n_layers) {
            return Err(format!(
                "the gate reads points {:?}, but the model has points 0..={n_layers}: use a gate fitted on this model",
                self.points
            ));
        }
        let width = self.points.len() * d;
        for (name, readout) in
            std::iter::once(("topic", &self.topic)).chain(self.veto.iter().map(|v| ("veto", v)))
        {
            if readout.weights.len() != width {
                return Err(format!(
                    "the gate's {name} read-out has {} weights, but {} points of a {d}-wide model need {width}: use a gate fitted on this model",
                    readout.weights.len(),
                    self.points.len()
                ));
            }
            if !readout.threshold.is_finite() || readout.weights.iter().any(|x| !x.is_finite()) {
                return Err(format!(
                    "the gate's {name} read-out holds a NaN or infinite value"
                ));
            }
        }
        Ok(())
    }

    /// What the gate makes of each prompt: one unsteered prefill per batch, which copies
    /// `opening` (the format's [`Format::shared_prefix`], run once by the caller) instead of
    /// computing it. A prompt read before, by this gate or a clone of it, is not read again.
    pub fn select(
        &self,
        model: &Model,
        format: &Format,
        opening: Option<&SharedPrefix>,
        prompts: &[String],
        batch: usize,
    ) -> Result<Vec<Decision>> {
        let pooling = self.method.pooling();
        let tokens: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| format.encode(model, p))
            .collect::<Result<_>>()?;
        let mut features: Vec<Option<Vec<f32>>> = tokens
            .iter()
            .map(|t| self.read.get(pooling, &self.points, t))
            .collect();
        let unread: Vec<usize> = (0..tokens.len())
            .filter(|&i| features[i].is_none())
            .collect();
        let lengths: Vec<usize> = unread.iter().map(|&i| tokens[i].len()).collect();
        let pooled = by_length(&lengths, batch, |members| {
            let rows: Vec<(&[u32], u32)> = members
                .iter()
                .map(|&m| (tokens[unread[m]].as_slice(), 0))
                .collect();
            capture_pooled(
                model,
                &rows,
                &self.points,
                pooling.capture_position(),
                opening,
            )
        })?;
        for (&i, pooled) in unread.iter().zip(pooled) {
            self.read.put(pooling, &self.points, &tokens[i], &pooled);
            features[i] = Some(pooled);
        }
        Ok(features
            .iter()
            .map(|f| self.decide(f.as_deref().expect("every prompt read")))
            .collect())
    }
}

/// Refuses activations of another pooling and too few prompts; returns the counts on and off
/// the topic.
fn check_inputs(
    acts: &Activations,
    labels: &[GateLabel],
    groups: &[&str],
    method: GateMethod,
) -> Result<(usize, usize)> {
    let captured = acts.header.metadata.get("position").map(String::as_str);
    let wanted = method.pooling().capture_position().name();
    if captured.is_some_and(|c| c != wanted) {
        bail!(
            "the {method:?} gate reads prompts at {wanted}, but these activations were captured at {}: capture with --position {wanted}",
            captured.unwrap_or_default()
        );
    }
    if labels.len() != acts.header.ids.len() || groups.len() != labels.len() {
        bail!(
            "{} gate labels and {} groups for {} prompts",
            labels.len(),
            groups.len(),
            acts.header.ids.len()
        );
    }
    let on = labels.iter().filter(|&&l| l == GateLabel::OnTopic).count();
    let off = labels
        .iter()
        .filter(|&&l| matches!(l, GateLabel::OffTopic | GateLabel::Harmful))
        .count();
    if on < 2 || off < 2 {
        bail!("a topic gate needs at least 2 prompts on and off the topic ({on} and {off})");
    }
    Ok((on, off))
}

fn features_at(acts: &Activations, points: &[usize], row: usize) -> Vec<f32> {
    let (p, d) = (acts.header.n_points, acts.header.d);
    let base = row * p * d;
    points
        .iter()
        .flat_map(|&point| {
            acts.data[base + point * d..base + (point + 1) * d]
                .iter()
                .copied()
        })
        .collect()
}

fn classes_of(labels: &[GateLabel], positive: impl Fn(GateLabel) -> Option<bool>) -> Vec<Class> {
    labels
        .iter()
        .map(|&l| match positive(l) {
            Some(true) => Class::Refusal,
            Some(false) => Class::Compliance,
            None => Class::Unused,
        })
        .collect()
}

fn topic_class(label: GateLabel) -> Option<bool> {
    match label {
        GateLabel::OnTopic => Some(true),
        GateLabel::OffTopic | GateLabel::Harmful => Some(false),
        GateLabel::Unused => None,
    }
}

/// `md` / `rmd`: one unit direction at the point where its midpoint rule is most often right
/// on held-out prompts (AUC breaks ties: AUC alone only ranks, and with few prompts many
/// points rank perfectly while their midpoints still cut through one class).
fn one_point(
    acts: &Activations,
    labels: &[GateLabel],
    method: GateMethod,
    ridge: Ridge,
    folds: usize,
    seed: u64,
) -> Result<Gate> {
    let classes = classes_of(labels, topic_class);
    let weights = vec![1.0; classes.len()];
    let steer_method = if method == GateMethod::Rmd {
        Method::Rmd
    } else {
        Method::Md
    };
    let d = acts.header.d;
    let mut best: Option<(usize, HeldOut)> = None;
    for point in 1..acts.header.n_points {
        let x = acts.at_point(point);
        let samples = Samples::new(&x, d, &classes, &weights)?;
        let h = k_fold_heldout(&samples, steer_method, ridge, folds, seed)?;
        let better = |b: &HeldOut| (h.midpoint_accuracy, h.auc) > (b.midpoint_accuracy, b.auc);
        if best.as_ref().is_none_or(|(_, b)| better(b)) {
            best = Some((point, h));
        }
    }
    let (point, heldout) = best.expect("a model has at least one block");
    let x = acts.at_point(point);
    let samples = Samples::new(&x, d, &classes, &weights)?;
    let v = fit(&samples, steer_method, ridge)?.vector;
    let length = norm(&v).max(f64::MIN_POSITIVE);
    let direction: Vec<f32> = v.iter().map(|&x| (f64::from(x) / length) as f32).collect();
    let scores: Vec<f64> = x.chunks_exact(d).map(|row| dot(row, &direction)).collect();
    let positive: Vec<Option<bool>> = labels.iter().map(|&l| topic_class(l)).collect();
    Ok(Gate {
        method,
        points: vec![point],
        topic: Readout {
            weights: direction,
            threshold: midpoint(&scores, &positive),
        },
        veto: None,
        cuts: None,
        heldout_auc: heldout.auc,
        heldout_accuracy: heldout.midpoint_accuracy,
        read: ReadPrompts::default(),
    })
}

/// The midpoint between the mean scores of the positive and the negative rows.
fn midpoint(scores: &[f64], positive: &[Option<bool>]) -> f64 {
    let mean_of = |class: bool| {
        let (sum, n) = scores
            .iter()
            .zip(positive)
            .filter(|(_, p)| **p == Some(class))
            .fold((0.0, 0usize), |(s, n), (x, _)| (s + x, n + 1));
        sum / n.max(1) as f64
    };
    (mean_of(true) + mean_of(false)) / 2.0
}

/// A ridge read-out over `points` fitted on the rows where `positive` is known: each point's
/// vectors scaled to unit mean square first (so no layer outweighs another by its scale, the
/// scale then folded into the weights), the threshold at the midpoint of the two classes'
/// mean scores.
fn ridge_readout(
    acts: &Activations,
    points: &[usize],
    positive: &[Option<bool>],
    kappa: f64,
) -> Result<Readout> {
    let d = acts.header.d;
    let rows: Vec<usize> = (0..positive.len())
        .filter(|&i| positive[i].is_some())
        .collect();
    let features: Vec<Vec<f32>> = rows.iter().map(|&i| features_at(acts, points, i)).collect();
    let (scaled, scale) = unit_mean_square(&features, points.len(), d);
    let labels: Vec<bool> = rows.iter().map(|&i| positive[i] == Some(true)).collect();
    let w = balanced_ridge(&scaled, points.len() * d, &labels, kappa)?;
    let weights: Vec<f32> = w
        .iter()
        .enumerate()
        .map(|(j, &w)| (w / scale[j / d]) as f32)
        .collect();
    let scores: Vec<f64> = features.iter().map(|f| dot(&weights, f)).collect();
    let row_positive: Vec<Option<bool>> = labels.iter().map(|&b| Some(b)).collect();
    Ok(Readout {
        threshold: midpoint(&scores, &row_positive),
        weights,
    })
}

/// The rows side by side (`[n, points × d]`), each point's vectors divided by their root mean
/// square over the rows; and those scales.
fn unit_mean_square(features: &[Vec<f32>], points: usize, d: usize) -> (Vec<f32>, Vec<f64>) {
    let scale: Vec<f64> = (0..points)
        .map(|slot| {
            let square: f64 = features
                .iter()
                .map(|f| norm(&f[slot * d..(slot + 1) * d]).powi(2))
                .sum();
            (square / features.len() as f64)
                .sqrt()
                .max(f64::MIN_POSITIVE)
        })
        .collect();
    let scaled: Vec<f32> = features
        .iter()
        .flat_map(|f| {
            f.iter()
                .enumerate()
                .map(|(j, &x)| (f64::from(x) / scale[j / d]) as f32)
        })
        .collect();
    (scaled, scale)
}

fn relative(ridge: Ridge) -> Result<f64> {
    match ridge {
        Ridge::Relative(kappa) => Ok(kappa),
        Ridge::Absolute(_) => bail!("the ridge gate takes a relative ridge (kappa)"),
    }
}

/// `ridge`: the topic read-out over several points, and the veto when there are harmful rows
/// (its negatives: every other labelled row, on the topic or not, so that it learns harm, not
/// the topic's absence), cut for `budgets` where the rows allow it. Held-out numbers are left
/// NaN for the caller.
fn several_points(
    acts: &Activations,
    labels: &[GateLabel],
    groups: &[&str],
    kappa: f64,
    budgets: Budgets,
) -> Result<Gate> {
    let points = Gate::ridge_points(acts.header.n_points - 1);
    let (mut topic, mut veto) = readouts(acts, labels, &points, kappa)?;
    let cuts = match &veto {
        Some(_) => cross_fitted(acts, labels, groups, &points, kappa)?
            .and_then(|(t, h)| budget::choose(&t, &h, labels, budgets)),
        None => None,
    };
    if let (Some(cuts), Some(veto)) = (&cuts, &mut veto) {
        topic.threshold += cuts.topic_shift;
        veto.threshold += cuts.veto_shift;
    }
    Ok(Gate {
        method: GateMethod::Ridge,
        points,
        topic,
        veto,
        cuts,
        heldout_auc: f64::NAN,
        heldout_accuracy: f64::NAN,
        read: ReadPrompts::default(),
    })
}

/// The topic read-out and, with at least two harmful rows, the veto, at their midpoints.
fn readouts(
    acts: &Activations,
    labels: &[GateLabel],
    points: &[usize],
    kappa: f64,
) -> Result<(Readout, Option<Readout>)> {
    let positive: Vec<Option<bool>> = labels.iter().map(|&l| topic_class(l)).collect();
    let topic = ridge_readout(acts, points, &positive, kappa)?;
    let harmful: Vec<Option<bool>> = labels
        .iter()
        .map(|&l| match l {
            GateLabel::Harmful => Some(true),
            GateLabel::OnTopic | GateLabel::OffTopic => Some(false),
            GateLabel::Unused => None,
        })
        .collect();
    let n_harmful = labels.iter().filter(|&&l| l == GateLabel::Harmful).count();
    let veto = if n_harmful >= 2 {
        Some(ridge_readout(acts, points, &harmful, kappa)?)
    } else {
        None
    };
    Ok((topic, veto))
}

/// Every labelled row's topic and harm scores less their thresholds, from read-outs fitted
/// without the row's group (NaN for unused rows, and for a group without which a class has no
/// rows left). `None` with fewer than two groups. The read-outs are those of
/// [`ridge_readout`], but each point is scaled over all labelled rows rather than the fit's,
/// so that one Gram matrix serves every fit.
fn cross_fitted(
    acts: &Activations,
    labels: &[GateLabel],
    groups: &[&str],
    points: &[usize],
    kappa: f64,
) -> Result<Option<(Vec<f64>, Vec<f64>)>> {
    let rows: Vec<usize> = (0..labels.len())
        .filter(|&i| labels[i] != GateLabel::Unused)
        .collect();
    let names: BTreeSet<&str> = rows.iter().map(|&i| groups[i]).collect();
    if names.len() < 2 {
        return Ok(None);
    }
    let d = acts.header.d;
    let features: Vec<Vec<f32>> = rows.iter().map(|&i| features_at(acts, points, i)).collect();
    let (scaled, _) = unit_mean_square(&features, points.len(), d);
    let gram = Gram::new(&scaled, points.len() * d)?;
    let (mut topic, mut harm) = (vec![f64::NAN; labels.len()], vec![f64::NAN; labels.len()]);
    for name in names {
        let (held, fit): (Vec<usize>, Vec<usize>) =
            (0..rows.len()).partition(|&k| groups[rows[k]] == name);
        let count = |label| fit.iter().filter(|&&k| labels[rows[k]] == label).count();
        if count(GateLabel::OnTopic) == 0
            || count(GateLabel::OffTopic) == 0
            || count(GateLabel::Harmful) < 2
        {
            continue;
        }
        let scored: Vec<usize> = fit.iter().chain(&held).copied().collect();
        // The topic read-out's positives are the on-topic rows, the veto's the harmful ones.
        for (positive_label, out) in [
            (GateLabel::OnTopic, &mut topic),
            (GateLabel::Harmful, &mut harm),
        ] {
            let positive: Vec<bool> = fit
                .iter()
                .map(|&k| labels[rows[k]] == positive_label)
                .collect();
            let scores = gram.scores(&fit, &positive, kappa, &scored)?;
            let sides: Vec<Option<bool>> = positive.iter().map(|&b| Some(b)).collect();
            let threshold = midpoint(&scores[..fit.len()], &sides);
            for (&k, score) in held.iter().zip(&scores[fit.len()..]) {
                out[rows[k]] = score - threshold;
            }
        }
    }
    Ok(Some((topic, harm)))
}

/// The topic read-out's held-out AUC and balanced accuracy over `folds` folds stratified by
/// class (seeded), each fold scored by a read-out fitted on the others.
fn heldout(
    acts: &Activations,
    labels: &[GateLabel],
    points: &[usize],
    kappa: f64,
    folds: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    let positive: Vec<Option<bool>> = labels.iter().map(|&l| topic_class(l)).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut fold_of = vec![usize::MAX; labels.len()];
    for class in [true, false] {
        let mut rows: Vec<usize> = (0..labels.len())
            .filter(|&i| positive[i] == Some(class))
            .collect();
        rows.shuffle(&mut rng);
        for (position, row) in rows.into_iter().enumerate() {
            fold_of[row] = position % folds;
        }
    }
    let (mut auc_total, mut accuracy_total) = (0.0, 0.0);
    for fold in 0..folds {
        let fit_rows: Vec<Option<bool>> = (0..labels.len())
            .map(|i| {
                if fold_of[i] == fold {
                    None
                } else {
                    positive[i]
                }
            })
            .collect();
        let readout = ridge_readout(acts, points, &fit_rows, kappa)?;
        let held: Vec<usize> = (0..labels.len()).filter(|&i| fold_of[i] == fold).collect();
        let scores: Vec<f64> = held
            .iter()
            .map(|&i| readout.score(&features_at(acts, points, i)))
            .collect();
        let classes: Vec<Class> = held
            .iter()
            .map(|&i| match positive[i] {
                Some(true) => Class::Refusal,
                _ => Class::Compliance,
            })
            .collect();
        auc_total += auc(&scores, &classes)?;
        let share_right = |class: Class| {
            let (right, all) = scores
                .iter()
                .zip(&classes)
                .filter(|(_, c)| **c == class)
                .fold((0usize, 0usize), |(r, a), (s, _)| {
                    let said_on = *s > readout.threshold;
                    (r + usize::from(said_on == (class == Class::Refusal)), a + 1)
                });
            right as f64 / all.max(1) as f64
        };
        accuracy_total += (share_right(Class::Refusal) + share_right(Class::Compliance)) / 2.0;
    }
    Ok((auc_total / folds as f64, accuracy_total / folds as f64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fitting::tests::planted;
    use refusal_steer_data::Prompt;

    /// Every prompt its own group.
    fn alone(acts: &Activations) -> Vec<&str> {
        acts.header.ids.iter().map(String::as_str).collect()
    }

    fn labels(on: impl Fn(usize) -> bool, n: usize) -> Vec<GateLabel> {
        (0..n)
            .map(|i| {
                if on(i) {
                    GateLabel::OnTopic
                } else {
                    GateLabel::OffTopic
                }
            })
            .collect()
    }

    #[test]
    fn the_gate_finds_the_point_where_the_topic_is_written_and_splits_at_the_midpoint() {
        let d = 12;
        let topic: Vec<f32> = (0..d).map(|j| if j == 5 { 1.0 } else { 0.0 }).collect();
        let acts = planted(30, d, &topic, 5.0, 3);
        let gate = Gate::fit(
            &acts,
            &labels(|i| i < 15, 30),
            &alone(&acts),
            &FitSettings::new(GateMethod::Md, Ridge::Relative(1.0)),
        )
        .unwrap();
        assert_eq!(gate.points, vec![2]);
        assert!(gate.heldout_auc > 0.99);
        assert!(gate.topic.weights[5] > 0.9);
        // Every train row lands on its side of the threshold.
        for i in 0..30 {
            assert_eq!(gate.admits(&gate.features(&acts, i)), i < 15, "row {i}");
        }
        let err = Gate::fit(
            &acts,
            &[GateLabel::OnTopic; 30],
            &alone(&acts),
            &FitSettings::new(GateMethod::Md, Ridge::Relative(1.0)),
        )
        .unwrap_err();
        assert!(err.to_string().contains("on and off the topic"), "{err}");
    }

    /// Activations `[n, 9 points, d]` from a function of (row, point, dimension).
    fn acts_from(n: usize, d: usize, value: impl Fn(usize, usize, usize) -> f32) -> Activations {
        let n_points = 9;
        let data = (0..n)
            .flat_map(|i| (0..n_points).flat_map(move |p| (0..d).map(move |j| (i, p, j))))
            .map(|(i, p, j)| value(i, p, j))
            .collect();
        Activations {
            header: refusal_steer_data::activations::ActivationsHeader {
                n_points,
                d,
                ids: (0..n).map(|i| format!("p{i}")).collect(),
                sets: vec![None; n],
                metadata: Default::default(),
            },
            data,
        }
    }

    /// Noise in [-0.5, 0.5) from (row, point, dimension).
    fn noise(i: usize, p: usize, j: usize) -> f32 {
        ((i * 7919 + p * 104_729 + j * 1_299_709) % 1000) as f32 / 1000.0 - 0.5
    }

    /// Rows whose topic is written along axis 0 and harm along axis 1 at every point but the
    /// embedding, `signal(i)` = (topic, harm), plus `spread` times the noise.
    fn topic_and_harm(
        n: usize,
        d: usize,
        spread: f32,
        signal: impl Fn(usize) -> (f32, f32),
    ) -> Activations {
        acts_from(n, d, |i, p, j| {
            let (topic, harm) = signal(i);
            let value = match j {
                0 => topic,
                1 => harm,
                _ => 0.0,
            };
            if p == 0 {
                0.0
            } else {
                value + spread * noise(i, p, j)
            }
        })
    }

    /// Rows from `n` on are unused; before it, role 0 is on the topic, 1 benign, others harmful.
    fn by_role(rows: usize, n: usize, role: impl Fn(usize) -> usize) -> Vec<GateLabel> {
        (0..rows)
            .map(|i| match (i >= n, role(i)) {
                (true, _) => GateLabel::Unused,
                (false, 0) => GateLabel::OnTopic,
                (false, 1) => GateLabel::OffTopic,
                _ => GateLabel::Harmful,
            })
            .collect()
    }

    /// The topic is written along axis 0 at every point; each phrasing moves the rows along a
    /// nuisance axis of its own (1, 2, 3), on and off the topic alike, by much more than the
    /// topic does. Fitted on two phrasings, the ridge gate still sorts a third it never saw.
    #[test]
    fn a_planted_topic_is_gated_across_a_phrasing_the_gate_never_saw() {
        let (n, d) = (90, 8);
        let phrasing = |i: usize| i % 3;
        let on = |i: usize| (i / 3).is_multiple_of(2);
        let acts = acts_from(n, d, |i, p, j| {
            let topic = if j == 0 && on(i) { 1.0 } else { 0.0 };
            let nuisance = if j == 1 + phrasing(i) { 6.0 } else { 0.0 };
            if p == 0 {
                0.0
            } else {
                topic + nuisance + 0.3 * noise(i, p, j)
            }
        });
        let labels: Vec<GateLabel> = (0..n)
            .map(|i| match (phrasing(i), on(i)) {
                (2, _) => GateLabel::Unused,
                (_, true) => GateLabel::OnTopic,
                (_, false) => GateLabel::OffTopic,
            })
            .collect();
        let gate = Gate::fit(
            &acts,
            &labels,
            &alone(&acts),
            &FitSettings::new(GateMethod::Ridge, Ridge::Relative(0.1)),
        )
        .unwrap();
        assert_eq!(gate.method.pooling(), Pooling::MeanUser);
        assert_eq!(gate.points, Gate::ridge_points(8));
        assert!(gate.veto.is_none(), "no harmful rows, no veto");
        assert!(gate.heldout_accuracy > 0.95, "{}", gate.heldout_accuracy);
        for i in (0..n).filter(|&i| phrasing(i) == 2) {
            assert_eq!(gate.admits(&gate.features(&acts, i)), on(i), "row {i}");
        }
    }

    /// A prompt on the topic that the harm read-out flags is not gated in, however high its
    /// topic score: harm is axis 1, the topic axis 0, and the test rows carry both.
    /// Harmful prompts come from four sources; one of them leans toward the topic and is less
    /// than half as harmful as the others. At the midpoints a new prompt like it gets in; cut
    /// for the budgets on scores from gates fitted without each source, it is kept out, and
    /// every on-topic prompt still gets in.
    #[test]
    fn cuts_chosen_with_whole_sources_held_out_keep_a_look_alike_harmful_source_out() {
        let n = 120;
        // 0 on the topic, 1 benign, 2-5 harmful sources (5 leans toward the topic); rows n and
        // n + 1, unused in the fit, are a new look-alike and a new on-topic prompt.
        let role = |i: usize| match i.cmp(&n) {
            std::cmp::Ordering::Less => i % 6,
            std::cmp::Ordering::Equal => 5,
            std::cmp::Ordering::Greater => 0,
        };
        let signal = |i: usize| match role(i) {
            0 => (1.0, 0.0),
            1 => (0.0, 0.0),
            5 => (0.8, 0.3),
            _ => (0.0, 1.0),
        };
        let acts = topic_and_harm(n + 2, 4, 0.1, signal);
        let labels = by_role(n + 2, n, role);
        // Two sources each of on-topic and benign prompts, one per harmful role.
        let sources: Vec<String> = (0..n + 2)
            .map(|i| match role(i) {
                0 | 1 => format!("source{}{}", role(i), (i / 6) % 2),
                r => format!("source{r}"),
            })
            .collect();
        let groups: Vec<&str> = sources.iter().map(String::as_str).collect();
        let gate = Gate::fit(
            &acts,
            &labels,
            &groups,
            &FitSettings::new(GateMethod::Ridge, Ridge::Relative(0.1)),
        )
        .unwrap();
        let cuts = gate
            .cuts
            .as_ref()
            .expect("harmful and benign rows give cuts");
        assert!(cuts.harmful_passed <= Budgets::DEFAULT.harmful);
        let (look_alike, on_topic) = (gate.features(&acts, n), gate.features(&acts, n + 1));
        let veto = gate.veto.as_ref().unwrap();
        let at_midpoints = gate.topic.score(&look_alike) > gate.topic.threshold - cuts.topic_shift
            && veto.score(&look_alike) <= veto.threshold - cuts.veto_shift;
        assert!(at_midpoints, "the midpoints let the look-alike in");
        assert!(!gate.admits(&look_alike), "the cuts keep it out");
        assert!(gate.admits(&on_topic));
        for i in (0..n).filter(|&i| role(i) == 0) {
            assert!(gate.admits(&gate.features(&acts, i)), "on-topic row {i}");
        }
        // Other budgets are the ones cut for, and recorded.
        let budgets = Budgets::new(0.2, 0.1).unwrap();
        let loose = Gate::fit(
            &acts,
            &labels,
            &groups,
            &FitSettings {
                budgets,
                ..FitSettings::new(GateMethod::Ridge, Ridge::Relative(0.1))
            },
        )
        .unwrap();
        let cuts = loose.cuts.expect("cuts");
        assert_eq!(
            (cuts.harmful_budget, cuts.off_topic_budget),
            (budgets.harmful, budgets.off_topic)
        );
        assert!(cuts.harmful_passed <= budgets.harmful);
    }

    #[test]
    fn the_harmful_veto_overrides_a_high_topic_score() {
        let (n, d) = (60, 6);
        let role = |i: usize| i % 3; // 0 on the topic, 1 benign, 2 harmful
        let acts = topic_and_harm(n + 2, d, 0.2, |i| match (i >= n, role(i)) {
            (true, _) => (1.5, if i == n { 1.5 } else { 0.0 }),
            (false, 0) => (1.0, 0.0),
            (false, 1) => (0.0, 0.0),
            (false, _) => (0.0, 1.0),
        });
        let labels = by_role(n + 2, n, role);
        let gate = Gate::fit(
            &acts,
            &labels,
            &alone(&acts),
            &FitSettings::new(GateMethod::Ridge, Ridge::Relative(0.1)),
        )
        .unwrap();
        let veto = gate.veto.as_ref().expect("harmful rows give a veto");
        let (harmful, clean) = (gate.features(&acts, n), gate.features(&acts, n + 1));
        assert!(
            gate.topic.score(&harmful) > gate.topic.threshold,
            "the topic read-out passes it"
        );
        assert!(veto.score(&harmful) > veto.threshold);
        assert!(!gate.admits(&harmful), "the veto keeps it out");
        assert!(gate.admits(&clean), "the same topic without harm gets in");
        for i in 0..n {
            assert_eq!(
                gate.admits(&gate.features(&acts, i)),
                role(i) == 0,
                "row {i}"
            );
        }
    }

    /// The gate a run fits from captured activations decides in generation (`select`, one
    /// prefill through the gate's points) exactly as it did on the captured features.
    #[test]
    fn the_gate_decides_on_live_prompts_as_on_their_captured_activations() {
        use crate::capture::{capture, CaptureJob};
        use indicatif::ProgressBar;
        let (dir, model) = crate::testing::tiny_model();
        let texts = [
            "the cat sat",
            "an hour there",
            "the mat",
            "in an hour",
            "a cat on a mat",
            "there the",
            "sat in the hour",
            "an an an",
            "mat cat",
            "the the cat sat",
        ];
        let prompts: Vec<Prompt> = texts
            .iter()
            .enumerate()
            .map(|(i, t)| Prompt {
                id: i.to_string(),
                prompt: t.to_string(),
                set: None,
            })
            .collect();
        let format = Format::default();
        let out = dir.path().join("acts.safetensors");
        let job = CaptureJob {
            prompts: &prompts,
            format: &format,
            position: CapturePosition::MeanUser,
            answers: None,
            batch: 4,
        };
        capture(&model, &job, &out, &ProgressBar::hidden()).unwrap();
        let acts = Activations::load(&out).unwrap();
        let gate = Gate::fit(
            &acts,
            &labels(|i| i % 2 == 0, 10),
            &alone(&acts),
            &FitSettings {
                folds: 2,
                ..FitSettings::new(GateMethod::Ridge, Ridge::Relative(1.0))
            },
        )
        .unwrap();
        let texts: Vec<String> = texts.iter().map(|t| t.to_string()).collect();
        let opening = format.shared_prefix(&model).unwrap();
        let live = gate
            .select(&model, &format, opening.as_ref(), &texts, 3)
            .unwrap();
        for (i, decision) in live.iter().enumerate() {
            let captured = gate.decide(&gate.features(&acts, i));
            assert_eq!(decision.gated_in, captured.gated_in, "prompt {i}");
            assert!(
                (decision.topic - captured.topic).abs() < 1e-3 * (1.0 + captured.topic.abs()),
                "prompt {i}: {decision:?} vs {captured:?}"
            );
        }
        // A prompt read once is not read again, by the gate or any clone: a planted read shows it.
        let tokens = format.encode(&model, &texts[0]).unwrap();
        let planted = vec![0.25; gate.points.len() * model.config.d_model];
        gate.read
            .put(gate.method.pooling(), &gate.points, &tokens, &planted);
        let again = gate
            .clone()
            .select(&model, &format, opening.as_ref(), &texts, 4)
            .unwrap();
        assert_eq!(again[0], gate.decide(&planted));
        assert_ne!(again[0], live[0]);
        assert_eq!(&again[1..], &live[1..]);
    }

    #[test]
    fn a_gate_of_another_model_or_pooling_is_refused() {
        let acts = acts_from(20, 4, |i, p, j| {
            if p > 0 && j == 0 && i < 10 {
                1.0
            } else {
                noise(i, p, j)
            }
        });
        let gate = Gate::fit(
            &acts,
            &labels(|i| i < 10, 20),
            &alone(&acts),
            &FitSettings {
                folds: 3,
                ..FitSettings::new(GateMethod::Ridge, Ridge::Relative(1.0))
            },
        )
        .unwrap();
        assert_eq!(gate.check(8, 4), Ok(()));
        let wider = gate.check(8, 5).unwrap_err();
        assert!(wider.contains("fitted on this model"), "{wider}");
        let shallower = gate.check(4, 4).unwrap_err();
        assert!(shallower.contains("points 0..=4"), "{shallower}");
        let mut last = acts;
        last.header
            .metadata
            .insert("position".into(), "last-prompt".into());
        let err = Gate::fit(
            &last,
            &labels(|i| i < 10, 20),
            &alone(&last),
            &FitSettings {
                folds: 3,
                ..FitSettings::new(GateMethod::Ridge, Ridge::Relative(1.0))
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("--position mean-user"), "{err}");
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
        let labels: Vec<GateLabel> = (0..n)
            .map(|i| match (i < n / 2, i % 2 == 0) {
                (false, _) => GateLabel::Unused,
                (true, true) => GateLabel::OnTopic,
                (true, false) => GateLabel::OffTopic,
            })
            .collect();
        let off_passed = |method| {
            let gate = Gate::fit(
                &acts,
                &labels,
                &alone(&acts),
                &FitSettings::new(method, Ridge::Relative(0.01)),
            )
            .unwrap();
            assert_eq!(gate.method, method);
            let passed = |on: bool| {
                (n / 2..n)
                    .filter(|&i| (i % 2 == 0) == on)
                    .filter(|&i| gate.admits(&gate.features(&acts, i)))
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
