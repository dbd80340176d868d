//! The key/value cache of a batch, and the bookkeeping that makes padded batches exact: which
//! cache slots hold real tokens, and each token's position within its own row.
//!
//! Every row of a batch shares the same slots (the cache is rectangular); padding slots are
//! never attended to, and positions count only a row's real tokens, so a padded row computes
//! exactly what it would compute alone. Keys and values are written in place into buffers
//! allocated once per cache, and read there by attention; a running batch moves its rows into
//! a new cache ([`KvCache::gather`]) only when rows join or leave.

use crate::{EngineError, Result};
use candle_core::{Device, Layout, Storage, Tensor};

/// The new slots of one forward call.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub batch: usize,
    /// Number of new slots per row.
    pub len: usize,
    /// Index of the first new slot.
    pub start: usize,
    /// `[batch * len]`: whether each new slot holds a real token.
    pub valid: Vec<bool>,
    /// `[batch * len]`: position of each new token within its row (0 for padding).
    pub positions: Vec<u32>,
    /// Whether these tokens are prompt tokens (prefill) or generated ones.
    pub prompt: bool,
}

impl Chunk {
    pub fn slot(&self, row: usize, i: usize) -> usize {
        row * self.len + i
    }

    /// Index within the chunk of each row's last real token.
    pub fn last_valid(&self, row: usize) -> Option<usize> {
        (0..self.len).rev().find(|&i| self.valid[self.slot(row, i)])
    }
}

pub struct KvCache {
    batch: usize,
    capacity: usize,
    len: usize,
    /// Per layer: keys and values `[batch, kv_heads, capacity, head_dim]`, allocated on first use.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// `[batch * capacity]`
    valid: Vec<bool>,
    /// `[batch * capacity]`
    positions: Vec<u32>,
    next_position: Vec<u32>,
}

impl KvCache {
    pub fn new(batch: usize, capacity: usize, n_layers: usize) -> Self {
        Self {
            batch,
            capacity,
            len: 0,
            layers: vec![None; n_layers],
            valid: vec![false; batch * capacity],
            positions: vec![0; batch * capacity],
            next_position: vec![0; batch],
        }
    }

    /// A cache of one row per prefix whose first `len` slots hold row 0 of that prefix (its
    /// first `len` tokens, no padding): prompts that open with the same tokens compute them
    /// once. Keys and values of a token depend only on the tokens before it (and on the
    /// steering it ran under), so the copies are exactly what each row would have computed.
    pub fn from_prefixes(prefixes: &[&KvCache], len: usize, capacity: usize) -> Result<Self> {
        let Some(first) = prefixes.first() else {
            return Err(EngineError::Batch("no prefix to copy rows from".into()));
        };
        for prefix in prefixes {
            if len > prefix.len || len > capacity || !prefix.valid[..len].iter().all(|&v| v) {
                return Err(EngineError::Batch(format!(
                    "cannot share {len} prefix slots from a cache of {} (row 0 must be all real tokens) into {capacity} slots",
                    prefix.len
                )));
            }
        }
        let batch = prefixes.len();
        let mut cache = Self::new(batch, capacity, first.layers.len());
        for (layer, dst) in cache.layers.iter_mut().enumerate() {
            let mut keys = Vec::with_capacity(batch);
            let mut values = Vec::with_capacity(batch);
            for prefix in prefixes {
                let Some((k, v)) = &prefix.layers[layer] else {
                    return Err(EngineError::Batch(
                        "the prefix cache has a layer without keys and values; run the prefix first"
                            .into(),
                    ));
                };
                keys.push(k.narrow(0, 0, 1)?.narrow(2, 0, len)?);
                values.push(v.narrow(0, 0, 1)?.narrow(2, 0, len)?);
            }
            let spread = |rows: &[Tensor]| -> Result<Tensor> {
                let rows = Tensor::cat(rows, 0)?;
                let (_, heads, _, dim) = rows.dims4()?;
                let full =
                    Tensor::zeros((batch, heads, capacity, dim), rows.dtype(), &Device::Cpu)?;
                full.slice_set(&rows.contiguous()?, 2, 0)?;
                Ok(full)
            };
            *dst = Some((spread(&keys)?, spread(&values)?));
        }
        for row in 0..batch {
            for i in 0..len {
                cache.valid[row * capacity + i] = true;
                cache.positions[row * capacity + i] = first.positions[i];
            }
            cache.next_position[row] = len as u32;
        }
        cache.len = len;
        Ok(cache)
    }

    /// A cache of the chosen rows of several caches, in order: each part's rows keep their
    /// slots, aligned so every row's last slot is the new cache's last, and slots no kept row
    /// uses are dropped. Attention sees slots only through validity and positions, so every
    /// row computes what it computed before; this is how a running batch admits and retires
    /// sequences.
    pub fn gather(parts: &[(&KvCache, &[usize])], capacity: usize) -> Result<Self> {
        let n_layers = parts.first().map_or(0, |(c, _)| c.layers.len());
        let batch: usize = parts.iter().map(|(_, rows)| rows.len()).sum();
        // The span a row uses: from its first real slot to its cache's end.
        let span = |c: &KvCache, row: usize| -> usize {
            let slots = &c.valid[row * c.capacity..row * c.capacity + c.len];
            slots
                .iter()
                .position(|&v| v)
                .map_or(0, |first| c.len - first)
        };
        let len = parts
            .iter()
            .flat_map(|(c, rows)| rows.iter().map(|&r| span(c, r)))
            .max()
            .unwrap_or(0);
        if len > capacity {
            return Err(EngineError::Batch(format!(
                "gathered rows need {len} slots, more than the {capacity} asked for"
            )));
        }
        let mut out = Self::new(batch, capacity, n_layers);
        out.len = len;
        let mut row_out = 0;
        for (c, rows) in parts {
            if c.layers.len() != n_layers {
                return Err(EngineError::Batch(
                    "cannot gather caches of models with different depths".into(),
                ));
            }
            for &r in rows.iter() {
                if r >= c.batch {
                    return Err(EngineError::Batch(format!(
                        "row {r} of a cache of {} rows",
                        c.batch
                    )));
                }
                // The last `kept` slots of the row go to the last `kept` slots of the new one.
                let kept = len.min(c.len);
                for i in 0..kept {
                    let src = r * c.capacity + c.len - kept + i;
                    let dst = row_out * capacity + len - kept + i;
                    out.valid[dst] = c.valid[src];
                    out.positions[dst] = c.positions[src];
                }
                out.next_position[row_out] = c.next_position[r];
                row_out += 1;
            }
        }
        for layer in 0..n_layers {
            let mut keys = Vec::with_capacity(batch);
            let mut values = Vec::with_capacity(batch);
            for (c, rows) in parts {
                let Some((k, v)) = &c.layers[layer] else {
                    return Err(EngineError::Batch(format!(
                        "layer {layer} has no keys and values: the pass that filled this cache \
                         stopped early (Logits::None) and cannot be continued"
                    )));
                };
                let kept = len.min(c.len);
                for &r in rows.iter() {
                    let place = |t: &Tensor| -> Result<Tensor> {
                        let (_, heads, _, dim) = t.dims4()?;
                        let own = t.narrow(0, r, 1)?.narrow(2, c.len - kept, kept)?;
                        let row =
                            Tensor::zeros((1, heads, capacity, dim), t.dtype(), &Device::Cpu)?;
                        row.slice_set(&own.contiguous()?, 2, len - kept)?;
                        Ok(row)
                    };
                    keys.push(place(k)?);
                    values.push(place(v)?);
                }
            }
            if batch > 0 {
                out.layers[layer] = Some((Tensor::cat(&keys, 0)?, Tensor::cat(&values, 0)?));
            }
        }
        Ok(out)
    }

    /// Rows in this cache.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Slots in use (the same for every row).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots each row can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Number of real tokens seen so far in `row`.
    pub fn row_len(&self, row: usize) -> u32 {
        self.next_position[row]
    }

    /// Reserves `len` new slots per row; `valid[row * len + i]` says which hold real tokens.
    pub fn begin(&self, valid: Vec<bool>, len: usize, prompt: bool) -> Result<Chunk> {
        if valid.len() != self.batch * len {
            return Err(EngineError::Batch(format!(
                "{} validity flags for a batch of {} x {len}",
                valid.len(),
                self.batch
            )));
        }
        if self.len + len > self.capacity {
            return Err(EngineError::Batch(format!(
                "cache of {} slots cannot take {len} more after {}",
                self.capacity, self.len
            )));
        }
        let mut positions = vec![0; valid.len()];
        for row in 0..self.batch {
            let mut next = self.next_position[row];
            for i in 0..len {
                if valid[row * len + i] {
                    positions[row * len + i] = next;
                    next += 1;
                }
            }
        }
        Ok(Chunk {
            batch: self.batch,
            len,
            start: self.len,
            valid,
            positions,
            prompt,
        })
    }

    /// Records the chunk's slots once every layer has written its keys and values.
    pub fn commit(&mut self, chunk: &Chunk) {
        for row in 0..self.batch {
            for i in 0..chunk.len {
                let src = chunk.slot(row, i);
                let dst = row * self.capacity + chunk.start + i;
                self.valid[dst] = chunk.valid[src];
                self.positions[dst] = chunk.positions[src];
                if chunk.valid[src] {
                    self.next_position[row] = chunk.positions[src] + 1;
                }
            }
        }
        self.len = chunk.start + chunk.len;
    }

    /// Writes this chunk's keys and values `[batch, kv_heads, chunk.len, head_dim]` for `layer`
    /// into their slots.
    pub fn append(&mut self, layer: usize, chunk: &Chunk, k: &Tensor, v: &Tensor) -> Result<()> {
        if self.layers[layer].is_none() {
            if chunk.start > 0 {
                return Err(EngineError::Batch(format!(
                    "layer {layer} has no keys and values for the {} earlier slots: the pass \
                     that ran them stopped early (Logits::None) and cannot be continued",
                    chunk.start
                )));
            }
            let (b, h, _, d) = k.dims4()?;
            let zeros = || Tensor::zeros((b, h, self.capacity, d), k.dtype(), &Device::Cpu);
            self.layers[layer] = Some((zeros()?, zeros()?));
        }
        let (ck, cv) = self.layers[layer].as_ref().expect("allocated above");
        ck.slice_set(&k.contiguous()?, 2, chunk.start)?;
        cv.slice_set(&v.contiguous()?, 2, chunk.start)?;
        Ok(())
    }

    /// Calls `read` with `layer`'s keys and values, each `[batch, kv_heads, capacity, head_dim]`
    /// row-major, read in place.
    pub fn read_layer<R>(&self, layer: usize, read: impl FnOnce(&[f32], &[f32]) -> R) -> Result<R> {
        let Some((k, v)) = &self.layers[layer] else {
            return Err(EngineError::Batch(format!(
                "layer {layer} has no keys and values yet"
            )));
        };
        let (k_storage, k_layout) = k.storage_and_layout();
        let (v_storage, v_layout) = v.storage_and_layout();
        Ok(read(
            as_f32(&k_storage, k_layout)?,
            as_f32(&v_storage, v_layout)?,
        ))
    }

    /// Which slots each query of `chunk` attends to: the real slots of its own row up to its
    /// own, within `window` positions if given. A row's positions grow with its real slots, so
    /// each query sees one run of them; a padding query sees only its own slot, which keeps its
    /// (ignored) output finite.
    pub fn visible(&self, chunk: &Chunk, window: Option<usize>) -> Visible {
        let mut slots = Vec::with_capacity(self.batch);
        let mut keys = Vec::with_capacity(self.batch * chunk.len);
        for row in 0..self.batch {
            let mut real: Vec<(u32, u32)> = Vec::new();
            for j in 0..chunk.start {
                let s = row * self.capacity + j;
                if self.valid[s] {
                    real.push((j as u32, self.positions[s]));
                }
            }
            for i in 0..chunk.len {
                let s = chunk.slot(row, i);
                if chunk.valid[s] {
                    real.push(((chunk.start + i) as u32, chunk.positions[s]));
                }
            }
            for i in 0..chunk.len {
                let s = chunk.slot(row, i);
                let own = (chunk.start + i) as u32;
                if !chunk.valid[s] {
                    keys.push(Keys::Own(own));
                    continue;
                }
                let qpos = chunk.positions[s];
                let end = real.partition_point(|&(slot, _)| slot <= own);
                let start = window.map_or(0, |w| {
                    real[..end].partition_point(|&(_, kpos)| qpos - kpos >= w as u32)
                });
                keys.push(Keys::Run(start, end));
            }
            slots.push(real.into_iter().map(|(slot, _)| slot).collect());
        }
        Visible {
            slots,
            keys,
            queries: chunk.len,
        }
    }
}

/// The slots a query attends to, as [`KvCache::visible`] finds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Keys {
    /// Real slots `start..end` of its row, in slot order.
    Run(usize, usize),
    /// A padding query: its own slot only.
    Own(u32),
}

/// A contiguous f32 CPU tensor's data.
fn as_f32<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(cpu), Some((start, end))) => Ok(&cpu.as_slice::<f32>()?[start..end]),
        _ => Err(EngineError::Batch(
            "the key/value cache is not a contiguous f32 buffer on the CPU".into(),
        )),
    }
}

/// For each row, its real slots in order, and for each query of a chunk, the ones it sees.
#[derive(Debug, Clone)]
pub struct Visible {
    slots: Vec<Vec<u32>>,
    /// `[batch * queries]`
    keys: Vec<Keys>,
    queries: usize,
}

impl Visible {
    /// The slots query `i` of `row` attends to, in slot order.
    pub fn slots(&self, row: usize, i: usize) -> &[u32] {
        match &self.keys[row * self.queries + i] {
            Keys::Run(start, end) => &self.slots[row][*start..*end],
            Keys::Own(slot) => std::slice::from_ref(slot),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_skip_padding_and_continue_across_chunks() {
        let mut cache = KvCache::new(2, 8, 1);
        // Row 0 is left-padded by two slots.
        let chunk = cache
            .begin(vec![false, false, true, true, true, true], 3, true)
            .unwrap();
        assert_eq!(chunk.positions, vec![0, 0, 0, 0, 1, 2]);
        assert_eq!(chunk.last_valid(0), Some(2));
        cache.commit(&chunk);
        let next = cache.begin(vec![true, true], 1, false).unwrap();
        assert_eq!(next.positions, vec![1, 3]);
        assert_eq!((cache.row_len(0), cache.row_len(1)), (1, 3));
    }

    #[test]
    fn queries_see_their_rows_real_earlier_slots_within_the_window() {
        let mut cache = KvCache::new(2, 6, 1);
        // Row 0 is left-padded by one slot; row 1 by two.
        let chunk = cache
            .begin(
                vec![false, true, true, true, false, false, true, true],
                4,
                true,
            )
            .unwrap();
        let v = cache.visible(&chunk, None);
        assert_eq!(v.slots(0, 0), &[0]); // a padding query sees itself only
        assert_eq!(v.slots(0, 1), &[1]);
        assert_eq!(v.slots(0, 3), &[1, 2, 3]);
        assert_eq!(v.slots(1, 1), &[1]);
        assert_eq!(v.slots(1, 3), &[2, 3]);
        let w = cache.visible(&chunk, Some(2));
        assert_eq!(w.slots(0, 3), &[2, 3]);
        assert_eq!(w.slots(1, 2), &[2]);
        // A decode step sees the committed slots as well as its own.
        cache.commit(&chunk);
        let step = cache.begin(vec![true, true], 1, false).unwrap();
        assert_eq!(cache.visible(&step, None).slots(0, 0), &[1, 2, 3, 4]);
        assert_eq!(cache.visible(&step, None).slots(1, 0), &[2, 3, 4]);
        assert_eq!(cache.visible(&step, Some(3)).slots(0, 0), &[2, 3, 4]);
    }

    #[test]
    fn gathered_rows_keep_their_slots_aligned_at_the_end() {
        let mut long = KvCache::new(2, 6, 1);
        let chunk = long.begin(vec![true; 8], 4, true).unwrap();
        let k = Tensor::arange(0f32, 16., &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 4, 2))
            .unwrap();
        long.append(0, &chunk, &k, &k).unwrap();
        long.commit(&chunk);
        let mut short = KvCache::new(1, 2, 1);
        let chunk = short.begin(vec![true, true], 2, true).unwrap();
        let k = Tensor::new(&[[[[-1f32, -1.], [-2., -2.]]]], &Device::Cpu).unwrap();
        short.append(0, &chunk, &k, &k).unwrap();
        short.commit(&chunk);
        let g = KvCache::gather(&[(&long, &[1]), (&short, &[0])], 5).unwrap();
        assert_eq!((g.batch(), g.len(), g.capacity()), (2, 4, 5));
        assert_eq!(&g.valid[..5], &[true, true, true, true, false]);
        assert_eq!(&g.valid[5..], &[false, false, true, true, false]);
        assert_eq!(&g.positions[7..9], &[0, 1]);
        assert_eq!((g.row_len(0), g.row_len(1)), (4, 2));
        let (keys, _) = g.layers[0].as_ref().unwrap();
        let keys: Vec<f32> = keys.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(&keys[..8], &[8., 9., 10., 11., 12., 13., 14., 15.]);
        assert_eq!(&keys[10..18], &[0., 0., 0., 0., -1., -1., -2., -2.]);
        // Slots no kept row uses are dropped: the short row alone needs two.
        let alone = KvCache::gather(&[(&g, &[1])], 2).unwrap();
        assert_eq!((alone.len(), alone.row_len(0)), (2, 2));
        assert!(KvCache::gather(&[(&g, &[0])], 3).is_err());
    }

    #[test]
    fn overflowing_the_cache_is_an_error() {
        let cache = KvCache::new(1, 2, 1);
        assert!(cache.begin(vec![true; 3], 3, true).is_err());
    }
}
