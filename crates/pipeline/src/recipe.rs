//! The steering recipe: one file that says how to steer one model, and applying it.
//!
//! A recipe is resolved: the vectors added at each point with their strengths, the
//! orthonormal directions projected out at each point, the positions, the topic gate, and the
//! model it was made for. Applying it does no arithmetic but `strength * scale`, so a recipe
//! gives exactly the answers of the run or the flags that made it.
//!
//! At each point, ascending, the ablation directions are projected out first, then the added
//! vectors are added, both in file order.
//!
//! File (`*.steer.safetensors`):
//! - `add` F32 `[k, d]` and `add_strengths` F32 `[k]`: row i is added at point
//!   `add_points[i]` of the header, scaled by its strength (the sign convention of
//!   [`crate::steering`]: negative removes refusals);
//! - `ablate` F32 `[m, d]`: row i is projected out at point `ablate_points[i]`; the rows of one
//!   point are orthonormal;
//! - `gate_topic` F32 `[g, d]` when the recipe is gated: the topic read-out's weights over the
//!   pooled vectors at the gate's `g` points; `gate_veto` F32 `[g, d]` when the gate has a
//!   harmful-request veto;
//! - metadata `recipe`: the JSON [`RecipeHeader`] (versioned; points, model identity, the
//!   gate's method (which says how it pools), points and thresholds, provenance). Absent tensors are empty
//!   lists.

use crate::answers::Format;
use crate::gate::budget::Cuts;
use crate::gate::{Decision, Gate, GateMethod, Readout};
use crate::steering::{SteerMode, SteerPositions, Steering};
use anyhow::{bail, Context, Result};
use refusal_steer_engine::{Action, Hooks, Intervention, Interventions, Model, Rows, SharedPrefix};
use refusal_steer_steer::linalg;
use refusal_steer_steer::protect::orthonormal_basis;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The recipe format this build writes and reads.
pub const RECIPE_VERSION: u32 = 2;

/// The model a recipe was made for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelIdentity {
    /// The model file's name, for messages.
    pub name: String,
    pub sha256: String,
    /// Residual-stream points: blocks + 1 (point 0 is the embeddings).
    pub n_points: usize,
    pub d: usize,
}

impl ModelIdentity {
    /// The identity of a loaded model (hashes its file unless the catalogue knows it).
    pub fn of(model: &Model) -> Result<Self> {
        let sha256 = refusal_steer_catalog::model_sha256(&model.path)
            .with_context(|| format!("hashing {}", model.path.display()))?;
        Ok(Self {
            name: model
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            sha256,
            n_points: model.config.n_layers + 1,
            d: model.config.d_model,
        })
    }
}

/// How a recipe was made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    /// The method ("wrmd+gated", or "flags" for a recipe written from hand-given options).
    pub method: String,
    /// Where it came from: the run folder, or the options it was written from.
    pub source: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<String>,
    /// sha256 of the run's config.toml.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// What validation measured at the chosen strength: refusal rate per set, KL.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub validation: BTreeMap<String, f64>,
}

/// The topic gate's header entry; its read-outs' weights are tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct GateHeader {
    method: GateMethod,
    points: Vec<usize>,
    topic_threshold: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    veto_threshold: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cuts: Option<Cuts>,
    heldout_auc: f64,
    heldout_accuracy: f64,
}

/// The recipe file's JSON header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeHeader {
    pub version: u32,
    pub model: ModelIdentity,
    pub mode: SteerMode,
    pub positions: SteerPositions,
    pub add_points: Vec<usize>,
    pub ablate_points: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    gate: Option<GateHeader>,
    pub made_by: Provenance,
}

/// A vector added at one point.
#[derive(Debug, Clone, PartialEq)]
pub struct Added {
    pub point: usize,
    pub vector: Vec<f32>,
    pub strength: f32,
}

/// A unit direction projected out at one point.
#[derive(Debug, Clone, PartialEq)]
pub struct Ablated {
    pub point: usize,
    pub direction: Vec<f32>,
}

/// Everything needed to steer one model; see the module docs.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub model: ModelIdentity,
    pub mode: SteerMode,
    pub positions: SteerPositions,
    pub add: Vec<Added>,
    pub ablate: Vec<Ablated>,
    /// Only prompts the gate lets through are steered.
    pub gate: Option<Gate>,
    pub made_by: Provenance,
}

impl Recipe {
    /// Resolves `steering` (and an optional gate) into a recipe for the model `model`.
    pub fn from_steering(
        model: &ModelIdentity,
        steering: &Steering,
        gate: Option<&Gate>,
        made_by: Provenance,
    ) -> Result<Self> {
        let vectors = steering.vectors;
        for v in std::iter::once(vectors).chain(steering.ablate_with.iter().copied()) {
            v.check_dims(model.n_points, model.d)?;
        }
        let mut points = steering.points.to_vec();
        points.sort_unstable();
        points.dedup();
        let (mut add, mut ablate) = (Vec::new(), Vec::new());
        for &point in &points {
            let v = vectors
                .point(point)
                .ok_or_else(|| anyhow::anyhow!("point {point} is outside the steering vectors"))?;
            if matches!(steering.mode, SteerMode::Ablate | SteerMode::AblateAdd) {
                let mut directions = vec![v];
                directions.extend(steering.ablate_with.iter().map(|o| {
                    o.point(point)
                        .expect("every file has the model's points (checked)")
                }));
                // Projecting out an orthonormal basis one direction at a time removes exactly
                // the span; the raw directions one after another would not when they overlap.
                ablate.extend(orthonormal_basis(&directions).into_iter().map(|b| Ablated {
                    point,
                    direction: b.iter().map(|&x| x as f32).collect(),
                }));
            }
            if matches!(steering.mode, SteerMode::Add | SteerMode::AblateAdd) {
                add.push(Added {
                    point,
                    vector: v.to_vec(),
                    strength: steering.alphas[point] as f32,
                });
            }
        }
        let recipe = Self {
            model: model.clone(),
            mode: steering.mode,
            positions: steering.positions,
            add,
            ablate,
            gate: gate.cloned(),
            made_by,
        };
        recipe.validate().map_err(anyhow::Error::msg)?;
        Ok(recipe)
    }

    /// Every strength multiplied by `scale` (ablation is not a strength and stays).
    pub fn scaled(mut self, scale: f32) -> Self {
        for a in &mut self.add {
            a.strength *= scale;
        }
        self
    }

    /// Errors unless `model` is the model this recipe was made for.
    pub fn check_model(&self, model: &Model) -> Result<()> {
        self.check_dims(model)?;
        let have = ModelIdentity::of(model)?;
        if have.sha256 != self.model.sha256 {
            bail!(
                "this recipe was made for {} (sha256 {}), but the model is {} (sha256 {}): use a recipe made on this model",
                self.model.name,
                short(&self.model.sha256),
                have.name,
                short(&have.sha256)
            );
        }
        Ok(())
    }

    fn check_dims(&self, model: &Model) -> Result<()> {
        let (n_points, d) = (model.config.n_layers + 1, model.config.d_model);
        if (self.model.n_points, self.model.d) != (n_points, d) {
            bail!(
                "this recipe was made for {} ({} points of dimension {}), but the model has {n_points} points of dimension {d}: use a recipe made on this model",
                self.model.name,
                self.model.n_points,
                self.model.d
            );
        }
        Ok(())
    }

    /// The steering of one sequence, checked against `model` (the gate is applied by the
    /// caller, with [`Recipe::steered`]).
    pub fn interventions(&self, model: &Model) -> Result<Interventions> {
        self.check_dims(model)?;
        let mut all = Vec::new();
        for point in self.points() {
            let mut add = |action| {
                all.push(Intervention {
                    point,
                    action,
                    rows: Rows::All,
                    positions: self.positions.engine(),
                })
            };
            for a in self.ablate.iter().filter(|a| a.point == point) {
                add(Action::ProjectOut {
                    direction: a.direction.clone(),
                    scale: 1.0,
                });
            }
            for a in self.add.iter().filter(|a| a.point == point) {
                add(Action::Add {
                    vector: a.vector.clone(),
                    alpha: a.strength,
                });
            }
        }
        model.hooks_with(&all)?;
        Ok(Interventions::from(all))
    }

    /// The steering hooks for every row of a batch, for passes without generation.
    pub fn hooks(&self, model: &Model) -> Result<Hooks> {
        Ok(model.hooks_with(&self.interventions(model)?)?)
    }

    /// Which of `prompts` this recipe steers: those its gate lets through, or all
    /// (`opening` as in [`Gate::select`]).
    pub fn steered(
        &self,
        model: &Model,
        format: &Format,
        opening: Option<&SharedPrefix>,
        prompts: &[String],
        batch: usize,
    ) -> Result<Vec<bool>> {
        Ok(
            match self.gate_decisions(model, format, opening, prompts, batch)? {
                Some(decisions) => decisions.iter().map(|d| d.gated_in).collect(),
                None => vec![true; prompts.len()],
            },
        )
    }

    /// What the recipe's gate makes of each prompt; `None` for an ungated recipe.
    pub fn gate_decisions(
        &self,
        model: &Model,
        format: &Format,
        opening: Option<&SharedPrefix>,
        prompts: &[String],
        batch: usize,
    ) -> Result<Option<Vec<Decision>>> {
        self.gate
            .as_ref()
            .map(|gate| gate.select(model, format, opening, prompts, batch))
            .transpose()
    }

    /// The points steered, ascending.
    pub fn points(&self) -> Vec<usize> {
        let mut points: Vec<usize> = self
            .add
            .iter()
            .map(|a| a.point)
            .chain(self.ablate.iter().map(|a| a.point))
            .collect();
        points.sort_unstable();
        points.dedup();
        points
    }

    /// What an answer record says of the steering it was made under.
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({
            "method": self.made_by.method,
            "mode": self.mode,
            "points": self.add.iter().map(|a| a.point).collect::<Vec<_>>(),
            "alphas": self.add.iter().map(|a| a.strength).collect::<Vec<_>>(),
            "ablated": self.ablate.len(),
            "gated": self.gate.is_some(),
        })
    }

    /// Checks every invariant of the module docs; the reason names what is wrong.
    fn validate(&self) -> Result<(), String> {
        let (n_points, d) = (self.model.n_points, self.model.d);
        if n_points == 0 || d == 0 {
            return Err(format!(
                "the model identity says {n_points} points of dimension {d}"
            ));
        }
        let check_row = |what: &str, point: usize, row: &[f32]| {
            if point >= n_points {
                return Err(format!(
                    "{what} at point {point}, but the model has points 0..{n_points}"
                ));
            }
            if row.len() != d {
                return Err(format!(
                    "{what} at point {point} has {} dimensions, the model {d}",
                    row.len()
                ));
            }
            match row.iter().position(|x| !x.is_finite()) {
                Some(i) => Err(format!(
                    "{what} at point {point} holds {} at index {i}",
                    row[i]
                )),
                None => Ok(()),
            }
        };
        for a in &self.add {
            check_row("the added vector", a.point, &a.vector)?;
            if !a.strength.is_finite() {
                return Err(format!(
                    "the strength at point {} is {}",
                    a.point, a.strength
                ));
            }
        }
        for a in &self.ablate {
            check_row("the ablated direction", a.point, &a.direction)?;
        }
        for (i, a) in self.ablate.iter().enumerate() {
            for b in &self.ablate[..=i] {
                if b.point != a.point {
                    continue;
                }
                let dot = linalg::dot(&a.direction, &b.direction);
                let want = if std::ptr::eq(a, b) { 1.0 } else { 0.0 };
                if (dot - want).abs() > 1e-3 {
                    return Err(format!(
                        "the ablated directions at point {} are not orthonormal (a dot product of {dot:.4} where {want} belongs)",
                        a.point
                    ));
                }
            }
        }
        let (adds, ablates) = (!self.add.is_empty(), !self.ablate.is_empty());
        match self.mode {
            SteerMode::Add if ablates => {
                return Err("mode add, but the recipe ablates directions".into())
            }
            SteerMode::Ablate if adds => {
                return Err("mode ablate, but the recipe adds vectors".into())
            }
            _ => {}
        }
        if let Some(gate) = &self.gate {
            gate.check(self.model.n_points - 1, self.model.d)?;
        }
        Ok(())
    }

    /// Writes the recipe (through a temporary file, so a kill leaves no torn recipe).
    pub fn save(&self, path: &Path) -> Result<()> {
        self.validate()
            .map_err(|reason| anyhow::anyhow!("not saving an invalid recipe: {reason}"))?;
        let header = RecipeHeader {
            version: RECIPE_VERSION,
            model: self.model.clone(),
            mode: self.mode,
            positions: self.positions,
            add_points: self.add.iter().map(|a| a.point).collect(),
            ablate_points: self.ablate.iter().map(|a| a.point).collect(),
            gate: self.gate.as_ref().map(|g| GateHeader {
                method: g.method,
                points: g.points.clone(),
                topic_threshold: g.topic.threshold,
                veto_threshold: g.veto.as_ref().map(|v| v.threshold),
                cuts: g.cuts.clone(),
                heldout_auc: g.heldout_auc,
                heldout_accuracy: g.heldout_accuracy,
            }),
            made_by: self.made_by.clone(),
        };
        let f32s = |rows: &mut dyn Iterator<Item = &f32>| -> Vec<u8> {
            rows.flat_map(|x| x.to_le_bytes()).collect()
        };
        let d = self.model.d;
        let mut tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        if !self.add.is_empty() {
            let k = self.add.len();
            let rows = f32s(&mut self.add.iter().flat_map(|a| &a.vector));
            tensors.push(("add", Dtype::F32, vec![k, d], rows));
            let strengths = f32s(&mut self.add.iter().map(|a| &a.strength));
            tensors.push(("add_strengths", Dtype::F32, vec![k], strengths));
        }
        if !self.ablate.is_empty() {
            let rows = f32s(&mut self.ablate.iter().flat_map(|a| &a.direction));
            tensors.push(("ablate", Dtype::F32, vec![self.ablate.len(), d], rows));
        }
        if let Some(gate) = &self.gate {
            let g = gate.points.len();
            let topic = f32s(&mut gate.topic.weights.iter());
            tensors.push(("gate_topic", Dtype::F32, vec![g, d], topic));
            if let Some(veto) = &gate.veto {
                let veto = f32s(&mut veto.weights.iter());
                tensors.push(("gate_veto", Dtype::F32, vec![g, d], veto));
            }
        }
        let views = tensors
            .iter()
            .map(|(name, dtype, shape, bytes)| {
                Ok((*name, TensorView::new(*dtype, shape.clone(), bytes)?))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let metadata = HashMap::from([("recipe".to_string(), serde_json::to_string(&header)?)]);
        let bytes = safetensors::serialize(views, Some(metadata))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Reads a recipe written by [`Recipe::save`]; a damaged or hand-edited one is refused with
    /// what is wrong.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading the recipe {}", path.display()))?;
        Self::from_bytes(&bytes).map_err(|reason| {
            anyhow::anyhow!(
                "{} is not a usable recipe: {reason} (`run` writes recipes as recipes/<method>.steer.safetensors)",
                path.display()
            )
        })
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let tensors = SafeTensors::deserialize(bytes)
            .map_err(|e| format!("not a valid safetensors file ({e})"))?;
        let (_, meta) =
            SafeTensors::read_metadata(bytes).map_err(|e| format!("unreadable header ({e})"))?;
        let header_text = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("recipe"))
            .ok_or("no 'recipe' header")?;
        let version: serde_json::Value = serde_json::from_str(header_text)
            .map_err(|e| format!("the recipe header does not read ({e})"))?;
        if version["version"] != RECIPE_VERSION {
            return Err(format!(
                "recipe format version {} is not {RECIPE_VERSION}, the one this build reads (a recipe of version 1 has the single-direction gate: rerun `run` to rebuild it)",
                version["version"]
            ));
        }
        let header: RecipeHeader = serde_json::from_str(header_text)
            .map_err(|e| format!("the recipe header does not read ({e})"))?;
        let d = header.model.d;
        let read = |name: &str, dtype: Dtype, shape: &[usize]| -> Result<Vec<u8>, String> {
            if shape.iter().product::<usize>() == 0 {
                return match tensors.tensor(name) {
                    Ok(_) => Err(format!(
                        "tensor '{name}' is there, but the header lists no rows for it"
                    )),
                    Err(_) => Ok(Vec::new()),
                };
            }
            let t = tensors
                .tensor(name)
                .map_err(|_| format!("tensor '{name}' is missing (the header lists {shape:?})"))?;
            if t.dtype() != dtype || t.shape() != shape {
                return Err(format!(
                    "tensor '{name}' is {:?} {:?}, the header says {dtype:?} {shape:?}",
                    t.dtype(),
                    t.shape()
                ));
            }
            Ok(t.data().to_vec())
        };
        let f32s = |b: Vec<u8>| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let k = header.add_points.len();
        let vectors = f32s(read("add", Dtype::F32, &[k, d])?);
        let strengths = f32s(read("add_strengths", Dtype::F32, &[k])?);
        let add = header
            .add_points
            .iter()
            .enumerate()
            .map(|(i, &point)| Added {
                point,
                vector: vectors[i * d..(i + 1) * d].to_vec(),
                strength: strengths[i],
            })
            .collect();
        let m = header.ablate_points.len();
        let directions = f32s(read("ablate", Dtype::F32, &[m, d])?);
        let ablate = header
            .ablate_points
            .iter()
            .enumerate()
            .map(|(i, &point)| Ablated {
                point,
                direction: directions[i * d..(i + 1) * d].to_vec(),
            })
            .collect();
        let gate = match &header.gate {
            Some(g) => {
                let shape = [g.points.len(), d];
                let veto = match g.veto_threshold {
                    Some(threshold) => Some(Readout {
                        weights: f32s(read("gate_veto", Dtype::F32, &shape)?),
                        threshold,
                    }),
                    None => None,
                };
                Some(Gate {
                    method: g.method,
                    points: g.points.clone(),
                    topic: Readout {
                        weights: f32s(read("gate_topic", Dtype::F32, &shape)?),
                        threshold: g.topic_threshold,
                    },
                    veto,
                    cuts: g.cuts.clone(),
                    heldout_auc: g.heldout_auc,
                    heldout_accuracy: g.heldout_accuracy,
                    read: Default::default(),
                })
            }
            None => None,
        };
        let recipe = Self {
            model: header.model,
            mode: header.mode,
            positions: header.positions,
            add,
            ablate,
            gate,
            made_by: header.made_by,
        };
        recipe.validate()?;
        Ok(recipe)
    }
}

/// The hooks of `recipe`, or none installed when unsteered.
pub fn hooks_for(model: &Model, recipe: Option<&Recipe>) -> Result<Hooks> {
    match recipe {
        Some(r) => r.hooks(model),
        None => Ok(model.new_hooks()),
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use refusal_steer_steer::SteeringVectors;

    fn identity() -> ModelIdentity {
        ModelIdentity {
            name: "m.gguf".into(),
            sha256: "ab".repeat(32),
            n_points: 3,
            d: 2,
        }
    }

    fn recipe(mode: SteerMode, gated: bool) -> Recipe {
        let v = SteeringVectors::new(vec![0.0, 0.0, 1.0, 1.0, 3.0, 4.0], 3, 2, Default::default())
            .unwrap();
        let other = SteeringVectors::new(vec![0.0; 6], 3, 2, Default::default()).unwrap();
        let gate = Gate {
            method: GateMethod::Ridge,
            points: vec![1, 2],
            topic: Readout {
                weights: vec![0.6, 0.8, -0.1, 0.3],
                threshold: 0.1 + 0.2,
            },
            veto: Some(Readout {
                weights: vec![1.0, 0.0, 0.5, 0.5],
                threshold: -0.7,
            }),
            cuts: Some(Cuts {
                harmful_budget: 0.005,
                off_topic_budget: 0.03,
                topic_shift: 0.2,
                veto_shift: -0.1,
                on_topic_passed: 0.9,
                harmful_passed: 0.0,
                off_topic_passed: 0.02,
            }),
            heldout_auc: 0.9,
            heldout_accuracy: 0.8,
            read: Default::default(),
        };
        Recipe::from_steering(
            &identity(),
            &Steering {
                vectors: &v,
                points: &[2, 1],
                alphas: &[0.0, -0.5, 0.25],
                mode,
                positions: SteerPositions::All,
                ablate_with: &[&other],
            },
            gated.then_some(&gate),
            Provenance {
                method: "test".into(),
                source: "a test".into(),
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn a_recipe_reads_back_exactly_and_resolves_its_strengths() {
        let dir = tempfile::tempdir().unwrap();
        for (mode, gated) in [
            (SteerMode::Add, true),
            (SteerMode::Ablate, false),
            (SteerMode::AblateAdd, true),
        ] {
            let r = recipe(mode, gated);
            let path = dir.path().join("r.steer.safetensors");
            r.save(&path).unwrap();
            assert_eq!(Recipe::load(&path).unwrap(), r, "{mode:?}");
        }
        let r = recipe(SteerMode::AblateAdd, true);
        assert_eq!(r.points(), vec![1, 2]);
        assert_eq!(
            r.add
                .iter()
                .map(|a| (a.point, a.strength))
                .collect::<Vec<_>>(),
            vec![(1, -0.5), (2, 0.25)]
        );
        // The other file is zero: its direction adds nothing to the span.
        assert_eq!(r.ablate.len(), 2);
        assert_eq!(r.ablate[1].direction, vec![0.6, 0.8]);
        assert_eq!(r.clone().scaled(2.0).add[0].strength, -1.0);
        assert_eq!(r.gate.unwrap().topic.threshold, 0.1 + 0.2);
    }

    /// Rewrites a saved recipe's header or tensors by hand and loads it.
    fn edited(
        edit: impl FnOnce(&mut serde_json::Value, &mut BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>),
    ) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.steer.safetensors");
        recipe(SteerMode::AblateAdd, true).save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
            .collect();
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let mut header: serde_json::Value =
            serde_json::from_str(&meta.metadata().as_ref().unwrap()["recipe"]).unwrap();
        edit(&mut header, &mut tensors);
        let views: Vec<(String, TensorView)> = tensors
            .iter()
            .map(|(n, (dt, s, b))| (n.clone(), TensorView::new(*dt, s.clone(), b).unwrap()))
            .collect();
        let meta = HashMap::from([("recipe".to_string(), header.to_string())]);
        std::fs::write(&path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
        Recipe::load(&path).unwrap_err().to_string()
    }

    #[test]
    fn damaged_or_hand_edited_recipes_are_refused_with_what_is_wrong() {
        let nan = edited(|_, t| {
            t.get_mut("add").unwrap().2[..4].copy_from_slice(&f32::NAN.to_le_bytes())
        });
        assert!(
            nan.contains("the added vector at point 1 holds NaN"),
            "{nan}"
        );
        let wrong_d = edited(|h, _| h["model"]["d"] = 3.into());
        assert!(wrong_d.contains("the header says F32 [2, 3]"), "{wrong_d}");
        let missing = edited(|_, t| {
            t.remove("ablate");
        });
        assert!(missing.contains("tensor 'ablate' is missing"), "{missing}");
        let point = edited(|h, _| h["add_points"][1] = 7.into());
        assert!(
            point.contains("at point 7, but the model has points 0..3"),
            "{point}"
        );
        let version = edited(|h, _| h["version"] = 9.into());
        assert!(version.contains("version 9 is not 2"), "{version}");
        let veto = edited(|_, t| {
            t.remove("gate_veto");
        });
        assert!(veto.contains("tensor 'gate_veto' is missing"), "{veto}");
        let gate_points = edited(|h, _| h["gate"]["points"] = serde_json::json!([1, 2, 9]));
        assert!(
            gate_points.contains("the header says F32 [3, 2]"),
            "{gate_points}"
        );
        let unknown = edited(|h, _| h["alpha_profile"] = "norm-scaled".into());
        assert!(
            unknown.contains("unknown field `alpha_profile`"),
            "{unknown}"
        );
        let skewed =
            edited(|_, t| t.get_mut("ablate").unwrap().2[..4].copy_from_slice(&2f32.to_le_bytes()));
        assert!(skewed.contains("not orthonormal"), "{skewed}");
        let mode = edited(|h, _| h["mode"] = "add".into());
        assert!(mode.contains("mode add, but the recipe ablates"), "{mode}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.steer.safetensors");
        std::fs::write(&junk, b"not a recipe").unwrap();
        let err = Recipe::load(&junk).unwrap_err().to_string();
        assert!(err.contains("not a valid safetensors file"), "{err}");
    }

    #[test]
    fn a_recipe_applies_only_to_its_own_model() {
        let (_dir, model) = crate::testing::tiny_model();
        let mut r = recipe(SteerMode::Add, false);
        let err = r.hooks(&model).err().unwrap().to_string();
        assert!(err.contains("use a recipe made on this model"), "{err}");
        r.model = ModelIdentity {
            sha256: "0".repeat(64),
            ..ModelIdentity::of(&model).unwrap()
        };
        let err = r.check_model(&model).unwrap_err().to_string();
        assert!(err.contains("sha256 000000000000"), "{err}");
    }
}
