//! Intervention points on the residual stream.
//!
//! Points are numbered 0..=n_layers: point 0 is the token embeddings (before the first block),
//! point `l` is the output of block `l - 1` (after `l` blocks). llama.cpp's control vector
//! `direction.N`, added to the output of block N, therefore acts at our point N + 1.
//!
//! At each point an intervention can capture the residual stream, add `alpha * v`, or project
//! a direction out (`h <- h - scale * (h . u) u`, `u` the unit direction), each restricted to
//! chosen rows of the batch and chosen positions. Points with no intervention cost nothing.
//! A point's interventions run in plain loops over each chosen token's vector: a token's
//! result never depends on which other tokens share its batch.

use crate::attention::dot;
use crate::kv_cache::Chunk;
use crate::{EngineError, Result};
use candle_core::{Device, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub enum Rows {
    All,
    Only(Vec<usize>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Positions {
    All,
    /// Prompt tokens (prefill).
    Prompt,
    /// Generated tokens.
    Generated,
    /// The last prompt token of each row (where the model decides how to answer).
    LastPrompt,
    /// Token positions `start..end` within each row.
    Range(u32, u32),
}

impl Positions {
    /// Whether these positions may fall in a prompt's shared opening (the template's first
    /// tokens, which never include a row's last prompt token).
    pub fn reach_openings(&self) -> bool {
        !matches!(self, Positions::Generated | Positions::LastPrompt)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Capture,
    Add { vector: Vec<f32>, alpha: f32 },
    ProjectOut { direction: Vec<f32>, scale: f32 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Intervention {
    pub point: usize,
    pub action: Action,
    pub rows: Rows,
    pub positions: Positions,
}

/// One captured residual vector.
#[derive(Debug, Clone, PartialEq)]
pub struct Captured {
    pub point: usize,
    pub row: usize,
    pub position: u32,
    pub prompt: bool,
    pub values: Vec<f32>,
}

enum Prepared {
    Capture,
    /// `alpha * v`.
    Add(Vec<f32>),
    /// Unit direction and scale.
    ProjectOut(Vec<f32>, f32),
}

struct Active {
    prepared: Prepared,
    rows: Rows,
    positions: Positions,
}

/// The interventions of one forward pass or generation, grouped by point.
pub struct Hooks {
    d_model: usize,
    by_point: Vec<Vec<Active>>,
    captured: Vec<Captured>,
}

impl Hooks {
    /// No interventions, for a model with `n_layers` blocks and width `d_model`.
    pub fn new(n_layers: usize, d_model: usize) -> Self {
        Self {
            d_model,
            by_point: (0..=n_layers).map(|_| Vec::new()).collect(),
            captured: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_point.iter().all(Vec::is_empty)
    }

    pub fn add(&mut self, iv: Intervention) -> Result<()> {
        let bad = |msg: String| Err(EngineError::BadIntervention(msg));
        if iv.point >= self.by_point.len() {
            return bad(format!(
                "point {} does not exist; this model has points 0..={}",
                iv.point,
                self.by_point.len() - 1
            ));
        }
        if let Positions::Range(s, e) = iv.positions {
            if s >= e {
                return bad(format!("empty position range {s}..{e}"));
            }
        }
        let check = |v: &[f32]| -> Result<()> {
            if v.len() != self.d_model {
                return bad(format!(
                    "vector has {} dimensions, the model's residual stream has {}",
                    v.len(),
                    self.d_model
                ));
            }
            if v.iter().any(|x| !x.is_finite()) {
                return bad("vector contains NaN or infinity".into());
            }
            Ok(())
        };
        let prepared = match &iv.action {
            Action::Capture => Prepared::Capture,
            Action::Add { vector, alpha } => {
                check(vector)?;
                Prepared::Add(vector.iter().map(|x| x * alpha).collect())
            }
            Action::ProjectOut { direction, scale } => {
                check(direction)?;
                let norm = direction
                    .iter()
                    .map(|x| (*x as f64) * (*x as f64))
                    .sum::<f64>()
                    .sqrt();
                if norm == 0.0 {
                    return bad("cannot project out a zero direction".into());
                }
                let unit = direction
                    .iter()
                    .map(|x| (*x as f64 / norm) as f32)
                    .collect();
                Prepared::ProjectOut(unit, *scale)
            }
        };
        self.by_point[iv.point].push(Active {
            prepared,
            rows: iv.rows,
            positions: iv.positions,
        });
        Ok(())
    }

    /// Captures collected so far, in the order they were taken; clears the store.
    pub fn take_captured(&mut self) -> Vec<Captured> {
        std::mem::take(&mut self.captured)
    }

    pub(crate) fn is_active(&self, point: usize) -> bool {
        !self.by_point[point].is_empty()
    }

    /// The last point with an intervention, if any.
    pub(crate) fn last_active(&self) -> Option<usize> {
        self.by_point.iter().rposition(|p| !p.is_empty())
    }

    /// Applies the interventions at `point` to `h` (`[batch, chunk.len, d]`), in the order added.
    pub(crate) fn apply(&mut self, point: usize, h: Tensor, chunk: &Chunk) -> Result<Tensor> {
        let actives = &self.by_point[point];
        if actives.is_empty() {
            return Ok(h);
        }
        let shape = h.dims3()?;
        let d = shape.2;
        let mut data: Vec<f32> = h.flatten_all()?.to_vec1()?;
        for active in actives {
            let selected = selection(&active.rows, &active.positions, chunk);
            for slot in (0..selected.len()).filter(|&s| selected[s]) {
                let x = &mut data[slot * d..(slot + 1) * d];
                match &active.prepared {
                    Prepared::Capture => self.captured.push(Captured {
                        point,
                        row: slot / chunk.len,
                        position: chunk.positions[slot],
                        prompt: chunk.prompt,
                        values: x.to_vec(),
                    }),
                    Prepared::Add(v) => x.iter_mut().zip(v).for_each(|(x, v)| *x += v),
                    Prepared::ProjectOut(u, scale) => {
                        let coef = dot(x, u) * scale;
                        x.iter_mut().zip(u).for_each(|(x, u)| *x -= coef * u);
                    }
                }
            }
        }
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// Which slots of the chunk an intervention touches: real tokens in the chosen rows and positions.
fn selection(rows: &Rows, positions: &Positions, chunk: &Chunk) -> Vec<bool> {
    let mut out = vec![false; chunk.batch * chunk.len];
    for row in 0..chunk.batch {
        if let Rows::Only(only) = rows {
            if !only.contains(&row) {
                continue;
            }
        }
        let last = chunk.last_valid(row);
        for i in 0..chunk.len {
            let slot = chunk.slot(row, i);
            if !chunk.valid[slot] {
                continue;
            }
            let pos = chunk.positions[slot];
            out[slot] = match positions {
                Positions::All => true,
                Positions::Prompt => chunk.prompt,
                Positions::Generated => !chunk.prompt,
                Positions::LastPrompt => chunk.prompt && last == Some(i),
                Positions::Range(s, e) => (*s..*e).contains(&pos),
            };
        }
    }
    out
}
