//! Matrix-vector and matrix-matrix kernels for the quantization types of the catalogue's
//! files: Q5_0 (most of Qwen2.5-0.5B's and Gemma 3's weights), Q4_1 (SmolLM2's), Q8_0
//! (Qwen2.5-0.5B's output head), Q4_K and Q6_K (most of Qwen2.5-1.5B's). A K type's
//! superblock of 256 values is eight blocks of 32 with a scale each (Q6_K: one per 16
//! values, so a block's halves are scaled apart).
//!
//! At load the weights are repacked into tiles of [`TILE`] output rows (16 where the build
//! target has AVX-512 with VNNI, else 8): for each block of 32 columns, the tile's bytes are
//! laid out so that one vector integer product multiplies four consecutive columns of all the
//! tile's rows by the same four activation bytes, and the block's row scales sit in one
//! register. Nothing is summed across lanes: the tile's outputs build up side by side, which
//! is what makes this faster than a dot product per row. A K type keeps its blocks' scales
//! (and Q4_K its mins) as the file's small integers, a byte a row, and one f32 `d` (and
//! `-dmin`) per superblock and row, so that a decode step reads about as many bytes as the
//! file holds (Q4_K 0.59 bytes a weight, Q6_K 0.83).
//!
//! Activations are quantized to 8 bits as llama.cpp does for each weight type: one f16 scale
//! per block of 32 (Q8_0 for Q5_0 and Q8_0 weights, Q8_1 for Q4_1), or one f32 scale per 256
//! (Q8_K for the K types). Each block's (or half block's) dot product runs exactly in
//! integers; every output is then `sum_b (s_b * (d_w * d_a)) * int_dot_b` (`s_b` 1 but for
//! the K types) accumulated in one fused multiply-add chain in block order, and for Q4_1
//! `sum_b m_b * s_b` in a second chain (Q4_K: per superblock, `-dmin d_a` times the integer
//! sum of its blocks' mins times activation sums), however many activation rows a pass
//! takes. Batching therefore cannot change a row's bits.

use crate::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
/// Output rows per tile: one vector register holds a 32-bit sum for each.
#[cfg(wide_tiles)]
const TILE: usize = 16;
#[cfg(not(wide_tiles))]
const TILE: usize = 8;
/// Tiles per parallel task: enough work to amortise scheduling.
const TILES_PER_TASK: usize = 4;
/// Activation rows that every tile of a task meets before the next ones are read: a run of
/// them (up to ~350 KB of quantized blocks for Qwen2.5's widest matrix) stays in a core's L2.
const ACTS_PER_RUN: usize = 64;
/// Activation rows per pass over a tile: each weight vector is unpacked once for all of them.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
const ACTS_PER_PASS: usize = 4;
/// Values from which quantizing the activations and gathering the output are split between
/// threads: a decode step's few rows are not worth it.
const PARALLEL_FROM_VALUES: usize = 32 * 1024;
/// Output rows per parallel task of a float matrix.
const DENSE_RUN: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// f16 d, u32 high bits, 16 bytes of low nibbles: w = (q - 16) * d.
    Q5_0,
    /// f16 d, f16 m, 16 bytes of nibbles: w = q * d + m.
    Q4_1,
    /// f16 d, 32 signed bytes: w = q * d.
    Q8_0,
    /// Superblock of 256: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of
    /// nibbles (block 2k in the low nibbles of bytes 32k.., block 2k+1 in the high ones):
    /// w = d * scale_b * q - dmin * min_b.
    Q4K,
    /// Superblock of 256: 128 bytes of low nibbles, 64 bytes of high bit pairs, 16 signed
    /// scales (one per 16 values), f16 d: w = d * scale * (q - 32).
    Q6K,
}

impl Kind {
    /// Blocks of 32 per unit of a GGUF file (a block, or a K type's superblock).
    const fn unit_blocks(self) -> usize {
        match self {
            Kind::Q5_0 | Kind::Q4_1 | Kind::Q8_0 => 1,
            Kind::Q4K | Kind::Q6K => 8,
        }
    }

    /// Bytes of one unit in a GGUF file.
    fn unit_bytes(self) -> usize {
        match self {
            Kind::Q5_0 => 22,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
            Kind::Q4K => 144,
            Kind::Q6K => 210,
        }
    }

    /// What is added to each weight to store it as an unsigned number (Q8_0 stays signed).
    const fn bias(self) -> i32 {
        match self {
            Kind::Q5_0 => 16,
            Kind::Q6K => 32,
            Kind::Q4_1 | Kind::Q8_0 | Kind::Q4K => 0,
        }
    }

    /// Two columns' worth of nibbles per byte, unsigned (the bits above them apart); else
    /// (Q8_0) one signed byte per column.
    const fn nibbles(self) -> bool {
        !matches!(self, Kind::Q8_0)
    }

    /// Bits of each stored weight above its nibble, kept as bit planes after the nibbles:
    /// Q5_0's fifth, Q6_K's fifth and sixth.
    const fn high_bits(self) -> usize {
        match self {
            Kind::Q5_0 => 1,
            Kind::Q6K => 2,
            Kind::Q4_1 | Kind::Q8_0 | Kind::Q4K => 0,
        }
    }

    /// A block's two halves have scales of their own (Q6_K's).
    const fn split(self) -> bool {
        matches!(self, Kind::Q6K)
    }

    /// Offsets follow the scales.
    const fn offsets(self) -> bool {
        matches!(self, Kind::Q4_1 | Kind::Q4K)
    }

    /// Superblocks (the K types): their blocks' scales and mins are kept as the file's small
    /// integers, one byte a row, with one f32 factor per superblock and row.
    const fn superblocks(self) -> bool {
        self.unit_blocks() > 1
    }

    /// Q6_K's scales are signed; Q4_K's unsigned.
    const fn signed_scales(self) -> bool {
        matches!(self, Kind::Q6K)
    }

    /// Vectors of weight bytes per tile and block.
    const fn weight_vectors(self) -> usize {
        if self.nibbles() {
            4
        } else {
            8
        }
    }

    /// Vectors per tile and block: the nibbles (or bytes) and one per bit plane above them.
    const fn block_vectors(self) -> usize {
        self.weight_vectors() + self.high_bits()
    }

    /// Scales per block and row.
    const fn block_scales(self) -> usize {
        1 + self.split() as usize
    }

    /// Where a unit's scales sit among its vectors: after its blocks.
    const fn scales_vector(self) -> usize {
        self.unit_blocks() * self.block_vectors()
    }

    /// Where the offsets (K types: the mins) sit: after the scales (a K type's one byte
    /// each, four to a row and vector; else one f32 vector).
    const fn offsets_vector(self) -> usize {
        self.scales_vector()
            + if self.superblocks() {
                self.unit_blocks() * self.block_scales() / 4
            } else {
                1
            }
    }

    /// Where a K type's f32 factors `d` and `-dmin` sit: after the mins.
    const fn factors_vector(self) -> usize {
        self.offsets_vector()
            + if !self.offsets() {
                0
            } else if self.superblocks() {
                self.unit_blocks() / 4
            } else {
                1
            }
    }

    /// Vectors per tile and unit.
    const fn unit_vectors(self) -> usize {
        self.factors_vector()
            + if self.superblocks() {
                1 + self.offsets() as usize
            } else {
                0
            }
    }
}

/// One vector register's bytes, aligned for vector loads.
#[derive(Clone, Copy)]
#[cfg_attr(wide_tiles, repr(C, align(64)))]
#[cfg_attr(not(wide_tiles), repr(C, align(32)))]
struct Vector([u8; 4 * TILE]);

/// A weight matrix used by a projection: our kernels where candle's are slow, candle's otherwise.
pub enum Matrix {
    Own(QuantMatrix),
    /// A float matrix in runs of output rows, multiplied in parallel: candle multiplies a few
    /// activation rows by a whole matrix on one thread.
    Dense(Vec<Tensor>),
    Candle(QMatMul),
}

impl Matrix {
    pub fn new(t: QTensor) -> Result<Self> {
        Ok(match QuantMatrix::from_qtensor(&t)? {
            Some(m) => Matrix::Own(m),
            None => Matrix::Candle(QMatMul::from_qtensor(t)?),
        })
    }

    /// A float matrix `[out, in]`, multiplied in f32.
    pub fn dense(t: Tensor) -> Result<Self> {
        let out = t.dim(0)?;
        let runs = (0..out)
            .step_by(DENSE_RUN)
            .map(|first| {
                Ok(t.narrow(0, first, DENSE_RUN.min(out - first))?
                    .contiguous()?)
            })
            .collect::<Result<_>>()?;
        Ok(Matrix::Dense(runs))
    }

    /// Bytes of the weights as multiplied: what a decode step reads.
    pub fn bytes(&self) -> usize {
        let dense = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            Matrix::Own(m) => m.tiles.len() * std::mem::size_of::<Vector>(),
            Matrix::Dense(runs) => runs.iter().map(dense).sum(),
            Matrix::Candle(QMatMul::QTensor(t)) => t.storage_size_in_bytes(),
            Matrix::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => dense(t),
        }
    }

    /// `x`: `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Matrix::Own(m) => m.forward(x),
            Matrix::Dense(runs) => {
                let parts: Vec<Tensor> = runs
                    .par_iter()
                    .map(|w| Ok(QMatMul::Tensor(w.clone()).forward(x)?))
                    .collect::<Result<_>>()?;
                Ok(Tensor::cat(&parts, x.rank() - 1)?)
            }
            Matrix::Candle(matmul) => Ok(matmul.forward(x)?),
        }
    }
}

/// A Q5_0, Q4_1, Q8_0, Q4_K or Q6_K weight matrix `[rows, cols]` (one row per output),
/// repacked in tiles.
///
/// Tile `t` holds rows `TILE t..TILE (t + 1)` (the last one padded with zero rows); for each
/// unit of the file (a block of 32 columns, or a K type's superblock of eight) it has
/// `unit_vectors()` vectors: first each block's `block_vectors()`. Nibble kinds: vector `v`
/// (0..4) holds, at byte `4r + j`, column `4v + j` of row `r` in its low nibble and column
/// `16 + 4v + j` in its high nibble, as the unsigned `q + bias`; the bits above the nibble
/// (Q5_0's fifth, Q6_K's fifth and sixth) follow, a vector each: eight words of `4 TILE` bits,
/// word `g` with bit `4r + j` for column `4g + j`. Byte kinds (Q8_0): vector `g` (0..8) holds
/// column `4g + j` of row `r` at byte `4r + j`, signed. Then the scales: for Q5_0, Q4_1 and
/// Q8_0 the rows' `d` as f32, and for Q4_1 their offsets `m`. A K type's scale `s` of the unit
/// (block `k`, or its half `h`: `2k + h`) is the byte at `TILE s + r` from the scales' first
/// vector; Q4_K's min of block `k` the byte at `2 TILE (k / 2) + 2r + k % 2` from the offsets'
/// first (so two blocks' mins are one pair of 16-bit numbers a row); then the rows' `d` and,
/// for Q4_K, `-dmin` as f32: `w = d * s * q - dmin * min`.
pub struct QuantMatrix {
    kind: Kind,
    rows: usize,
    cols: usize,
    tiles: Vec<Vector>,
}

/// One block of 8-bit activations: `x ~= d * q`, `sums` those of `q`'s first and last 16
/// values, `s = d * sum(q)` (rounded to f16 for Q4_1 as llama.cpp's Q8_1 stores it). For a K
/// type, the second block of each pair holds in `pair_sums` the two blocks' `sum(q)` as the
/// low and high 16 bits (each within ±32·127), ready for Q4_K's mins.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct BlockQ8 {
    q: [i8; BLOCK],
    sums: [i32; 2],
    d: f32,
    s: f32,
    pair_sums: i32,
}

impl QuantMatrix {
    /// The matrix, if its type is one this module handles.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q5_0 => Kind::Q5_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            GgmlDType::Q4K => Kind::Q4K,
            GgmlDType::Q6K => Kind::Q6K,
            _ => return Ok(None),
        };
        let (rows, cols) = t.shape().dims2()?;
        Ok(Some(Self::repack(kind, rows, cols, &t.data()?)))
    }

    fn repack(kind: Kind, rows: usize, cols: usize, packed: &[u8]) -> Self {
        let units = cols / BLOCK / kind.unit_blocks();
        let per_unit = kind.unit_vectors();
        let mut tiles = vec![Vector([0; 4 * TILE]); rows.div_ceil(TILE) * units * per_unit];
        for (row, bytes) in packed.chunks_exact(units * kind.unit_bytes()).enumerate() {
            let r = row % TILE;
            for (index, unit) in bytes.chunks_exact(kind.unit_bytes()).enumerate() {
                let at = ((row / TILE) * units + index) * per_unit;
                let tile = &mut tiles[at..at + per_unit];
                let (d, m) = unit_factors(kind, unit);
                for k in 0..kind.unit_blocks() {
                    let (q, scales, min) = decode_block(kind, unit, k);
                    let block = &mut tile[k * kind.block_vectors()..];
                    let u = q.map(|v| v + kind.bias());
                    if kind.nibbles() {
                        for col in 0..BLOCK / 2 {
                            let low = (u[col] & 0x0F) as u8;
                            let high = (u[col + BLOCK / 2] & 0x0F) as u8;
                            block[col / 4].0[4 * r + col % 4] = low | high << 4;
                        }
                    } else {
                        for (col, &v) in u.iter().enumerate() {
                            block[col / 4].0[4 * r + col % 4] = v as i8 as u8;
                        }
                    }
                    for plane in 0..kind.high_bits() {
                        for (col, &v) in u.iter().enumerate() {
                            let bit = (col / 4) * 4 * TILE + 4 * r + col % 4;
                            block[kind.weight_vectors() + plane].0[bit / 8] |=
                                ((v >> (4 + plane)) as u8 & 1) << (bit % 8);
                        }
                    }
                    if kind.superblocks() {
                        for (h, &s) in scales[..kind.block_scales()].iter().enumerate() {
                            let s_at = TILE * (kind.block_scales() * k + h) + r;
                            put_byte(&mut tile[kind.scales_vector()..], s_at, s as u8);
                        }
                        if kind.offsets() {
                            let m_at = 2 * TILE * (k / 2) + 2 * r + k % 2;
                            put_byte(&mut tile[kind.offsets_vector()..], m_at, min as u8);
                        }
                    }
                }
                let mut put = |vector: usize, value: f32| {
                    tile[vector].0[4 * r..4 * r + 4].copy_from_slice(&value.to_le_bytes())
                };
                let (d_vector, m_vector) = if kind.superblocks() {
                    (kind.factors_vector(), kind.factors_vector() + 1)
                } else {
                    (kind.scales_vector(), kind.offsets_vector())
                };
                put(d_vector, d);
                if kind.offsets() {
                    put(m_vector, m);
                }
            }
        }
        Self {
            kind,
            rows,
            cols,
            tiles,
        }
    }

    /// `x`: `[.., cols]` -> `[.., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let m = x.elem_count() / self.cols;
        let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let activations = quantize(&input, self.kind);
        let out = self.product_of_kind(&activations, m);
        *out_dims.last_mut().expect("at least one dim") = self.rows;
        Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
    }

    /// The vectors of tile `t`.
    fn tile(&self, t: usize) -> &[Vector] {
        let len = self.cols / BLOCK / self.kind.unit_blocks() * self.kind.unit_vectors();
        &self.tiles[t * len..(t + 1) * len]
    }

    /// Runs `task(tile, activation rows, put)` for every tile, in parallel over runs of tiles,
    /// where `put(row, sums)` stores one activation row's `TILE` outputs, and gathers them into
    /// `[m, rows]`. A task hands its activation rows over in runs of [`ACTS_PER_RUN`], each met
    /// by all its tiles.
    fn by_tiles<T>(&self, m: usize, task: T) -> Vec<f32>
    where
        T: Fn(&[Vector], std::ops::Range<usize>, &mut dyn FnMut(usize, [f32; TILE])) + Sync,
    {
        let tiles = self.rows.div_ceil(TILE);
        let parts: Vec<Vec<f32>> = (0..tiles)
            .into_par_iter()
            .step_by(TILES_PER_TASK)
            .map(|first| {
                let last = (first + TILES_PER_TASK).min(tiles);
                let width = (last - first) * TILE;
                let mut part = vec![0f32; m * width];
                for run in (0..m).step_by(ACTS_PER_RUN) {
                    for t in first..last {
                        let at = (t - first) * TILE;
                        task(
                            self.tile(t),
                            run..(run + ACTS_PER_RUN).min(m),
                            &mut |r, sums| {
                                part[r * width + at..r * width + at + TILE].copy_from_slice(&sums)
                            },
                        );
                    }
                }
                part
            })
            .collect();
        let mut out = vec![0f32; m * self.rows];
        out.par_chunks_mut(self.rows.max(1))
            .with_min_len(PARALLEL_FROM_VALUES.div_ceil(self.rows.max(1)))
            .enumerate()
            .for_each(|(r, row)| {
                for (task, part) in parts.iter().enumerate() {
                    let first = task * TILES_PER_TASK * TILE;
                    let width = part.len() / m;
                    let valid = width.min(self.rows - first);
                    row[first..first + valid].copy_from_slice(&part[r * width..r * width + valid]);
                }
            });
        out
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    fn product_of_kind(&self, acts: &[BlockQ8], m: usize) -> Vec<f32> {
        if simd::prefetch_pays() {
            self.product_prefetching::<true>(acts, m)
        } else {
            self.product_prefetching::<false>(acts, m)
        }
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    fn product_prefetching<const PREFETCH: bool>(&self, acts: &[BlockQ8], m: usize) -> Vec<f32> {
        match self.kind {
            Kind::Q5_0 => self.product::<simd::Q5_0, PREFETCH>(acts, m),
            Kind::Q4_1 => self.product::<simd::Q4_1, PREFETCH>(acts, m),
            Kind::Q8_0 => self.product::<simd::Q8_0, PREFETCH>(acts, m),
            Kind::Q4K => self.product::<simd::Q4K, PREFETCH>(acts, m),
            Kind::Q6K => self.product::<simd::Q6K, PREFETCH>(acts, m),
        }
    }

    #[cfg(not(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    )))]
    fn product_of_kind(&self, acts: &[BlockQ8], m: usize) -> Vec<f32> {
        self.product_scalar(acts, m)
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    fn product<F: simd::Format, const PREFETCH: bool>(
        &self,
        acts: &[BlockQ8],
        m: usize,
    ) -> Vec<f32> {
        let blocks = self.cols / BLOCK;
        assert_eq!(acts.len(), m * blocks);
        let act = |r: usize| &acts[r * blocks..(r + 1) * blocks];
        self.by_tiles(m, |tile, rows, put| {
            let mut r = rows.start;
            while r < rows.end {
                let n = (rows.end - r).min(ACTS_PER_PASS);
                match n {
                    4 => {
                        let sums =
                            simd::tile::<F, 4, PREFETCH>(tile, std::array::from_fn(|i| act(r + i)));
                        sums.into_iter()
                            .enumerate()
                            .for_each(|(i, s)| put(r + i, s));
                    }
                    3 => {
                        let sums =
                            simd::tile::<F, 3, PREFETCH>(tile, std::array::from_fn(|i| act(r + i)));
                        sums.into_iter()
                            .enumerate()
                            .for_each(|(i, s)| put(r + i, s));
                    }
                    2 => {
                        let sums =
                            simd::tile::<F, 2, PREFETCH>(tile, std::array::from_fn(|i| act(r + i)));
                        sums.into_iter()
                            .enumerate()
                            .for_each(|(i, s)| put(r + i, s));
                    }
                    _ => put(r, simd::tile::<F, 1, PREFETCH>(tile, [act(r)])[0]),
                }
                r += n;
            }
        })
    }

    /// The portable kernel (and the reference the SIMD kernels are tested against).
    #[cfg_attr(
        all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ),
        allow(dead_code)
    )]
    fn product_scalar(&self, acts: &[BlockQ8], m: usize) -> Vec<f32> {
        let kind = self.kind;
        let unit_blocks = kind.unit_blocks();
        let blocks = self.cols / BLOCK;
        let f32_at =
            |v: &Vector, r: usize| f32::from_le_bytes(v.0[4 * r..4 * r + 4].try_into().unwrap());
        self.by_tiles(m, |tile, rows, put| {
            for a_row in rows {
                let mut sums = [0f32; TILE];
                for (r, sum) in sums.iter_mut().enumerate() {
                    let mut total = 0f32;
                    let mut offsets = 0f32;
                    for (index, v) in tile.chunks_exact(kind.unit_vectors()).enumerate() {
                        let first = a_row * blocks + index * unit_blocks;
                        let unit_acts = &acts[first..first + unit_blocks];
                        // A K type's superblock: its `d` times the activations' scale.
                        let d_da = if kind.superblocks() {
                            f32_at(&v[kind.factors_vector()], r) * unit_acts[0].d
                        } else {
                            0.0
                        };
                        let mut mins = 0i32;
                        for (k, a) in unit_acts.iter().enumerate() {
                            let block = &v[k * kind.block_vectors()..];
                            let weight = |col: usize| -> i32 {
                                let at = 4 * r + col % 4;
                                if !kind.nibbles() {
                                    return block[col / 4].0[at] as i8 as i32 - kind.bias();
                                }
                                let byte = block[col % 16 / 4].0[at];
                                let mut u = (if col < 16 { byte & 0x0F } else { byte >> 4 }) as i32;
                                for plane in 0..kind.high_bits() {
                                    let bit = (col / 4) * 4 * TILE + at;
                                    let bits = block[kind.weight_vectors() + plane].0[bit / 8];
                                    u |= (((bits >> (bit % 8)) & 1) as i32) << (4 + plane);
                                }
                                u - kind.bias()
                            };
                            let dot = |cols: std::ops::Range<usize>| {
                                cols.map(|col| weight(col) * a.q[col] as i32).sum::<i32>() as f32
                            };
                            let width = BLOCK / kind.block_scales();
                            for h in 0..kind.block_scales() {
                                let factor = if kind.superblocks() {
                                    let s_at = TILE * (kind.block_scales() * k + h) + r;
                                    let s = byte_at(&v[kind.scales_vector()..], s_at);
                                    let s = if kind.signed_scales() {
                                        s as i8 as f32
                                    } else {
                                        s as f32
                                    };
                                    s * d_da
                                } else {
                                    f32_at(&v[kind.scales_vector()], r) * a.d
                                };
                                total = dot(h * width..(h + 1) * width).mul_add(factor, total);
                            }
                            if kind.offsets() && kind.superblocks() {
                                let m_at = 2 * TILE * (k / 2) + 2 * r + k % 2;
                                let min = byte_at(&v[kind.offsets_vector()..], m_at) as i32;
                                mins += min * (a.sums[0] + a.sums[1]);
                            } else if kind.offsets() {
                                let m = f32_at(&v[kind.offsets_vector()], r);
                                offsets = m.mul_add(a.s, offsets);
                            }
                        }
                        if kind.offsets() && kind.superblocks() {
                            let m_da = f32_at(&v[kind.factors_vector() + 1], r) * unit_acts[0].d;
                            offsets = (mins as f32).mul_add(m_da, offsets);
                        }
                    }
                    *sum = total + offsets;
                }
                put(a_row, sums);
            }
        })
    }
}

/// 8-bit quantization of a row of activations, as llama.cpp quantizes them for the weights'
/// type: one scale per block of 32 rounded to f16 (Q8_0, Q8_1), or one f32 scale per unit of
/// 256 (Q8_K).
fn quantize(x: &[f32], kind: Kind) -> Vec<BlockQ8> {
    let unit = kind.unit_blocks() * BLOCK;
    let mut blocks: Vec<BlockQ8> = x
        .par_chunks(unit)
        .with_min_len(PARALLEL_FROM_VALUES / unit)
        .flat_map_iter(|x| quantize_unit(x, kind))
        .collect();
    if kind.superblocks() {
        for pair in blocks.chunks_exact_mut(2) {
            let sum = |b: &BlockQ8| (b.sums[0] + b.sums[1]) as u16 as u32;
            pair[1].pair_sums = (sum(&pair[0]) | sum(&pair[1]) << 16) as i32;
        }
    }
    blocks
}

fn quantize_unit(x: &[f32], kind: Kind) -> impl Iterator<Item = BlockQ8> + '_ {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let stored = if kind.unit_blocks() == 1 {
        f16::from_f32(d).to_f32()
    } else {
        d
    };
    x.chunks_exact(BLOCK).map(move |x| {
        let mut q = [0i8; BLOCK];
        for (qi, &v) in q.iter_mut().zip(x) {
            *qi = (v * inv).round() as i8;
        }
        let half_sum = |h: usize| q[h * 16..(h + 1) * 16].iter().map(|&v| v as i32).sum();
        let sums: [i32; 2] = [half_sum(0), half_sum(1)];
        let sum = (sums[0] + sums[1]) as f32;
        let s = match kind {
            Kind::Q4_1 => f16::from_f32(d * sum).to_f32(),
            _ => stored * sum,
        };
        BlockQ8 {
            q,
            sums,
            d: stored,
            s,
            pair_sums: 0,
        }
    })
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// A unit's factors `(d, m)`: its one block's `d` and offset (Q4_1), or a K type's
/// superblock `d` and `-dmin`.
fn unit_factors(kind: Kind, b: &[u8]) -> (f32, f32) {
    match kind {
        Kind::Q5_0 | Kind::Q8_0 => (f16_at(b, 0), 0.0),
        Kind::Q4_1 => (f16_at(b, 0), f16_at(b, 2)),
        Kind::Q4K => (f16_at(b, 0), -f16_at(b, 2)),
        Kind::Q6K => (f16_at(b, 208), 0.0),
    }
}

/// Block `k` of a GGUF unit as integers: its weights `q`, the scales of its halves and its
/// min, so that `w = d * scale * q + m * min` with the unit's factors `(d, m)`.
fn decode_block(kind: Kind, b: &[u8], k: usize) -> ([i32; BLOCK], [i32; 2], i32) {
    let mut q = [0i32; BLOCK];
    match kind {
        Kind::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..BLOCK / 2 {
                q[j] = (b[6 + j] & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
                q[j + 16] = (b[6 + j] >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
            }
            q.iter_mut().for_each(|v| *v -= 16);
            (q, [1; 2], 0)
        }
        Kind::Q4_1 => {
            for j in 0..BLOCK / 2 {
                q[j] = (b[4 + j] & 0x0F) as i32;
                q[j + 16] = (b[4 + j] >> 4) as i32;
            }
            (q, [1; 2], 1)
        }
        Kind::Q8_0 => {
            for (j, v) in q.iter_mut().enumerate() {
                *v = b[2 + j] as i8 as i32;
            }
            (q, [1; 2], 0)
        }
        Kind::Q4K => {
            for (j, v) in q.iter_mut().enumerate() {
                *v = ((b[16 + 32 * (k / 2) + j] >> (4 * (k % 2))) & 0x0F) as i32;
            }
            let (scale, min) = q4k_scale_min(&b[4..16], k);
            (q, [scale as i32; 2], min as i32)
        }
        Kind::Q6K => {
            let (n, c) = (k / 4, k % 4);
            for (j, v) in q.iter_mut().enumerate() {
                let low = (b[64 * n + 32 * (c % 2) + j] >> (4 * (c / 2))) & 0x0F;
                let high = (b[128 + 32 * n + j] >> (2 * c)) & 3;
                *v = (low | high << 4) as i32 - 32;
            }
            let scale = |h: usize| b[192 + 2 * k + h] as i8 as i32;
            (q, [scale(0), scale(1)], 0)
        }
    }
}

/// Writes byte `at` of the vectors from `vectors[0]` on.
fn put_byte(vectors: &mut [Vector], at: usize, value: u8) {
    vectors[at / (4 * TILE)].0[at % (4 * TILE)] = value;
}

/// Reads byte `at` of the vectors from `vectors[0]` on.
fn byte_at(vectors: &[Vector], at: usize) -> u8 {
    vectors[at / (4 * TILE)].0[at % (4 * TILE)]
}

/// Scale and min of block `k` (0..8) of a Q4_K superblock, 6 bits each, from its 12 bytes.
fn q4k_scale_min(s: &[u8], k: usize) -> (u8, u8) {
    if k < 4 {
        (s[k] & 63, s[k + 4] & 63)
    } else {
        (
            (s[k + 4] & 0x0F) | ((s[k - 4] >> 6) << 4),
            (s[k + 4] >> 4) | ((s[k] >> 6) << 4),
        )
    }
}

/// AVX2 kernels on 256-bit registers (with VNNI byte products and AVX-512 bit masks where
/// the build target has them), or on 512-bit registers with AVX-512 VNNI (`wide_tiles`, set
/// by `build.rs`); `.cargo/config.toml` builds for the host CPU.
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod simd {
    use super::{BlockQ8, Kind, Vector, BLOCK, TILE};

    /// A tile layout (see [`super::QuantMatrix`]), as constants of its `Kind`.
    pub trait Format {
        const KIND: Kind;
        /// The stored weights minus this are the weights.
        const BIAS: i32 = Self::KIND.bias();
        const NIBBLES: bool = Self::KIND.nibbles();
        const HIGH_BITS: usize = Self::KIND.high_bits();
        const SPLIT: bool = Self::KIND.split();
        const OFFSETS: bool = Self::KIND.offsets();
        const SUPERBLOCKS: bool = Self::KIND.superblocks();
        const SIGNED_SCALES: bool = Self::KIND.signed_scales();
        const UNIT_BLOCKS: usize = Self::KIND.unit_blocks();
        const WEIGHT_VECTORS: usize = Self::KIND.weight_vectors();
        const BLOCK_VECTORS: usize = Self::KIND.block_vectors();
        const BLOCK_SCALES: usize = Self::KIND.block_scales();
        const SCALES_VECTOR: usize = Self::KIND.scales_vector();
        const OFFSETS_VECTOR: usize = Self::KIND.offsets_vector();
        const FACTORS_VECTOR: usize = Self::KIND.factors_vector();
        const UNIT_VECTORS: usize = Self::KIND.unit_vectors();
    }

    pub struct Q5_0;
    pub struct Q4_1;
    pub struct Q8_0;
    pub struct Q4K;
    pub struct Q6K;

    impl Format for Q5_0 {
        const KIND: Kind = Kind::Q5_0;
    }

    impl Format for Q4_1 {
        const KIND: Kind = Kind::Q4_1;
    }

    impl Format for Q8_0 {
        const KIND: Kind = Kind::Q8_0;
        const BIAS: i32 = lanes::SIGNED_BIAS;
    }

    impl Format for Q4K {
        const KIND: Kind = Kind::Q4K;
    }

    impl Format for Q6K {
        const KIND: Kind = Kind::Q6K;
    }

    /// The vector operations of one register width.
    #[cfg(wide_tiles)]
    mod lanes {
        use std::arch::x86_64::*;
        pub type Int = __m512i;
        pub type Float = __m512;
        /// Signed weights are made unsigned (+128); the activations' sum takes the 128s back.
        pub const SIGNED_BIAS: i32 = 128;

        #[inline(always)]
        pub unsafe fn load(p: *const u8) -> Int {
            _mm512_load_si512(p as *const _)
        }
        #[inline(always)]
        pub unsafe fn load_f32(p: *const u8) -> Float {
            _mm512_load_ps(p as *const f32)
        }
        #[inline(always)]
        pub unsafe fn splat_i32(x: i32) -> Int {
            _mm512_set1_epi32(x)
        }
        #[inline(always)]
        pub unsafe fn splat_f32(x: f32) -> Float {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        pub unsafe fn zero_f32() -> Float {
            _mm512_setzero_ps()
        }
        /// The low and high nibbles of every byte.
        #[inline(always)]
        pub unsafe fn nibbles(x: Int) -> (Int, Int) {
            let mask = _mm512_set1_epi8(0x0F);
            (
                _mm512_and_si512(x, mask),
                _mm512_and_si512(_mm512_srli_epi16(x, 4), mask),
            )
        }
        /// `x` with `bit` set in byte j where bit j of the word at `bits` is set.
        #[inline(always)]
        pub unsafe fn with_bit(x: Int, bits: *const u8, bit: i8) -> Int {
            let word = std::ptr::read_unaligned(bits as *const u64);
            // The bit is clear in `x`: adding it sets it.
            _mm512_mask_add_epi8(x, word, x, _mm512_set1_epi8(bit))
        }
        #[inline(always)]
        pub unsafe fn product_unsigned(acc: Int, u: Int, a: Int) -> Int {
            _mm512_dpbusd_epi32(acc, u, a)
        }
        #[inline(always)]
        pub unsafe fn product_signed(acc: Int, w: Int, a: Int) -> Int {
            _mm512_dpbusd_epi32(acc, _mm512_xor_si512(w, _mm512_set1_epi8(-128)), a)
        }
        /// `acc + float(dot) * factor`.
        #[inline(always)]
        pub unsafe fn scaled_add(acc: Float, dot: Int, factor: Float) -> Float {
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), factor, acc)
        }
        #[inline(always)]
        pub unsafe fn mul(a: Float, b: Float) -> Float {
            _mm512_mul_ps(a, b)
        }
        #[inline(always)]
        pub unsafe fn to_f32(x: Int) -> Float {
            _mm512_cvtepi32_ps(x)
        }
        #[inline(always)]
        pub unsafe fn add_i32(a: Int, b: Int) -> Int {
            _mm512_add_epi32(a, b)
        }
        /// The `TILE` bytes at `p`, one a lane, sign- or zero-extended.
        #[inline(always)]
        pub unsafe fn widen_bytes(p: *const u8, signed: bool) -> Int {
            let x = _mm_loadu_si128(p as *const _);
            if signed {
                _mm512_cvtepi8_epi32(x)
            } else {
                _mm512_cvtepu8_epi32(x)
            }
        }
        /// The `2 TILE` bytes at `p`, two a lane as 16-bit numbers.
        #[inline(always)]
        pub unsafe fn widen_byte_pairs(p: *const u8) -> Int {
            _mm512_cvtepu8_epi16(_mm256_loadu_si256(p as *const _))
        }
        /// Each lane's two 16-bit products summed.
        #[inline(always)]
        pub unsafe fn product_pairs(a: Int, b: Int) -> Int {
            _mm512_madd_epi16(a, b)
        }
        #[inline(always)]
        pub unsafe fn fmadd(a: Float, b: Float, c: Float) -> Float {
            _mm512_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        pub unsafe fn store_sum(out: *mut f32, a: Float, b: Float) {
            _mm512_storeu_ps(out, _mm512_add_ps(a, b))
        }
    }

    /// The vector operations of one register width.
    #[cfg(not(wide_tiles))]
    mod lanes {
        use std::arch::x86_64::*;
        pub type Int = __m256i;
        pub type Float = __m256;
        /// Whether byte products use VNNI (`vpdpbusd`, no 16-bit intermediate).
        const VNNI: bool = cfg!(all(
            target_feature = "avx512vnni",
            target_feature = "avx512vl"
        ));
        /// With VNNI the signed weights are made unsigned (+128) and the activations' sum
        /// takes the 128s back out; without it the sign trick keeps the pairs in 16 bits.
        pub const SIGNED_BIAS: i32 = if VNNI { 128 } else { 0 };

        #[inline(always)]
        pub unsafe fn load(p: *const u8) -> Int {
            _mm256_load_si256(p as *const _)
        }
        #[inline(always)]
        pub unsafe fn load_f32(p: *const u8) -> Float {
            _mm256_load_ps(p as *const f32)
        }
        #[inline(always)]
        pub unsafe fn splat_i32(x: i32) -> Int {
            _mm256_set1_epi32(x)
        }
        #[inline(always)]
        pub unsafe fn splat_f32(x: f32) -> Float {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        pub unsafe fn zero_f32() -> Float {
            _mm256_setzero_ps()
        }
        /// The low and high nibbles of every byte.
        #[inline(always)]
        pub unsafe fn nibbles(x: Int) -> (Int, Int) {
            let mask = _mm256_set1_epi8(0x0F);
            (
                _mm256_and_si256(x, mask),
                _mm256_and_si256(_mm256_srli_epi16(x, 4), mask),
            )
        }
        /// `x` with `bit` set in byte j where bit j of the word at `bits` is set.
        #[inline(always)]
        pub unsafe fn with_bit(x: Int, bits: *const u8, bit: i8) -> Int {
            let word = std::ptr::read_unaligned(bits as *const u32);
            // The bit is clear in `x`: adding it sets it.
            #[cfg(all(target_feature = "avx512bw", target_feature = "avx512vl"))]
            return _mm256_mask_add_epi8(x, word, x, _mm256_set1_epi8(bit));
            #[cfg(not(all(target_feature = "avx512bw", target_feature = "avx512vl")))]
            {
                // Broadcast byte j/8 of the word to byte j, then test bit j%8 by OR-ing the
                // others in.
                let spread = _mm256_shuffle_epi8(
                    _mm256_set1_epi32(word as i32),
                    _mm256_set_epi64x(
                        0x0303_0303_0303_0303,
                        0x0202_0202_0202_0202,
                        0x0101_0101_0101_0101,
                        0,
                    ),
                );
                let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
                let all = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1));
                _mm256_or_si256(x, _mm256_and_si256(all, _mm256_set1_epi8(bit)))
            }
        }
        #[inline(always)]
        pub unsafe fn product_unsigned(acc: Int, u: Int, a: Int) -> Int {
            #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
            return _mm256_dpbusd_epi32(acc, u, a);
            // u <= 63: pairs summed to i16 cannot overflow.
            #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
            return _mm256_add_epi32(
                acc,
                _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1)),
            );
        }
        #[inline(always)]
        pub unsafe fn product_signed(acc: Int, w: Int, a: Int) -> Int {
            #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
            return _mm256_dpbusd_epi32(acc, _mm256_xor_si256(w, _mm256_set1_epi8(-128)), a);
            // |w| * (a with w's sign); |w| <= 128 and |a| <= 127 keep pairs in i16.
            #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
            return _mm256_add_epi32(
                acc,
                _mm256_madd_epi16(
                    _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w)),
                    _mm256_set1_epi16(1),
                ),
            );
        }
        /// `acc + float(dot) * factor`.
        #[inline(always)]
        pub unsafe fn scaled_add(acc: Float, dot: Int, factor: Float) -> Float {
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), factor, acc)
        }
        #[inline(always)]
        pub unsafe fn mul(a: Float, b: Float) -> Float {
            _mm256_mul_ps(a, b)
        }
        #[inline(always)]
        pub unsafe fn to_f32(x: Int) -> Float {
            _mm256_cvtepi32_ps(x)
        }
        #[inline(always)]
        pub unsafe fn add_i32(a: Int, b: Int) -> Int {
            _mm256_add_epi32(a, b)
        }
        /// The `TILE` bytes at `p`, one a lane, sign- or zero-extended.
        #[inline(always)]
        pub unsafe fn widen_bytes(p: *const u8, signed: bool) -> Int {
            let x = _mm_loadl_epi64(p as *const _);
            if signed {
                _mm256_cvtepi8_epi32(x)
            } else {
                _mm256_cvtepu8_epi32(x)
            }
        }
        /// The `2 TILE` bytes at `p`, two a lane as 16-bit numbers.
        #[inline(always)]
        pub unsafe fn widen_byte_pairs(p: *const u8) -> Int {
            _mm256_cvtepu8_epi16(_mm_loadu_si128(p as *const _))
        }
        /// Each lane's two 16-bit products summed.
        #[inline(always)]
        pub unsafe fn product_pairs(a: Int, b: Int) -> Int {
            _mm256_madd_epi16(a, b)
        }
        #[inline(always)]
        pub unsafe fn fmadd(a: Float, b: Float, c: Float) -> Float {
            _mm256_fmadd_ps(a, b, c)
        }
        #[inline(always)]
        pub unsafe fn store_sum(out: *mut f32, a: Float, b: Float) {
            _mm256_storeu_ps(out, _mm256_add_ps(a, b))
        }
    }

    use lanes::*;

    /// Bytes ahead of the weights being read that are asked for early, where that pays: a
    /// decode step reads every weight once, and on Intel's Xeons the hardware's own
    /// prefetching left it waiting on memory (distance chosen by `bench`; see
    /// docs/results/engine-vs-llama-cpp.md).
    const PREFETCH_DISTANCE: usize = 4096;

    /// Whether to ask for weights ahead: on the Intel Xeon the kernels were tuned on it made
    /// Qwen2.5-1.5B's decode 45% faster, on an AMD EPYC (Zen 4) 35% slower, at any distance
    /// or cache level tried (docs/results/engine-vs-llama-cpp.md). Intel's CPUs ask for it.
    pub fn prefetch_pays() -> bool {
        static PAYS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *PAYS.get_or_init(|| {
            let id = std::arch::x86_64::__cpuid(0);
            let vendor = [id.ebx, id.edx, id.ecx].map(u32::to_le_bytes).concat();
            vendor == b"GenuineIntel"
        })
    }

    /// Asks for the cache line `PREFETCH_DISTANCE` bytes after `p`; past the tiles' end it
    /// is a hint that fetches nothing.
    #[inline(always)]
    unsafe fn prefetch(p: *const u8) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_DISTANCE) as *const i8);
    }

    /// Activation bytes `4g..4g+4` of a block in every lane.
    #[inline(always)]
    unsafe fn group(a: &BlockQ8, g: usize) -> Int {
        splat_i32(std::ptr::read_unaligned(
            a.q.as_ptr().add(4 * g) as *const i32
        ))
    }

    /// The outputs of one tile for each of `C` activation rows, asking for the weights ahead
    /// if `PREFETCH` ([`prefetch_pays`]). Each output is the same chain of operations whatever
    /// `C` is.
    #[inline(always)]
    pub fn tile<F: Format, const C: usize, const PREFETCH: bool>(
        tile: &[Vector],
        acts: [&[BlockQ8]; C],
    ) -> [[f32; TILE]; C] {
        let units = tile.len() / F::UNIT_VECTORS;
        for a in acts {
            assert_eq!(a.len(), units * F::UNIT_BLOCKS);
        }
        // SAFETY: the build target has the register width's instructions (cfg above and in
        // `build.rs`); every vector index is below `F::UNIT_VECTORS` within unit `u < units`
        // (a K type's scale and min bytes too: see the layout's offsets in `Kind`), and every
        // activation row has `units * F::UNIT_BLOCKS` blocks (asserted).
        unsafe {
            let mut acc = [zero_f32(); C];
            let mut off = [zero_f32(); C];
            for u in 0..units {
                let v = |i: usize| tile.as_ptr().add(u * F::UNIT_VECTORS + i) as *const u8;
                let first = u * F::UNIT_BLOCKS;
                // A K type's superblock `d` times each activation row's scale.
                let d_da: [Float; C] = if F::SUPERBLOCKS {
                    let d = load_f32(v(F::FACTORS_VECTOR));
                    std::array::from_fn(|c| mul(d, splat_f32(acts[c].get_unchecked(first).d)))
                } else {
                    [zero_f32(); C]
                };
                let mut mins = [splat_i32(0); C];
                for k in 0..F::UNIT_BLOCKS {
                    let w = |i: usize| v(k * F::BLOCK_VECTORS + i);
                    let a: [&BlockQ8; C] =
                        std::array::from_fn(|c| acts[c].get_unchecked(first + k));
                    // The block's products, or for a split block its first half's, and the
                    // second half's apart.
                    let (mut dot, mut second): ([Int; C], [Int; C]) = if F::SPLIT {
                        (
                            std::array::from_fn(|c| splat_i32(-F::BIAS * a[c].sums[0])),
                            std::array::from_fn(|c| splat_i32(-F::BIAS * a[c].sums[1])),
                        )
                    } else {
                        let sum = |c: usize| a[c].sums[0] + a[c].sums[1];
                        (
                            std::array::from_fn(|c| splat_i32(-F::BIAS * sum(c))),
                            [splat_i32(0); C],
                        )
                    };
                    if F::NIBBLES {
                        for g in 0..4 {
                            if PREFETCH {
                                prefetch(w(g));
                            }
                            let (mut low, mut high) = nibbles(load(w(g)));
                            for plane in 0..F::HIGH_BITS {
                                let word = TILE / 2;
                                let bits = w(F::WEIGHT_VECTORS + plane);
                                let bit = 0x10 << plane;
                                low = with_bit(low, bits.add(g * word), bit);
                                high = with_bit(high, bits.add((g + 4) * word), bit);
                            }
                            // The high nibbles are the block's second half.
                            for c in 0..C {
                                dot[c] = product_unsigned(dot[c], low, group(a[c], g));
                                let upper = if F::SPLIT {
                                    &mut second[c]
                                } else {
                                    &mut dot[c]
                                };
                                *upper = product_unsigned(*upper, high, group(a[c], g + 4));
                            }
                        }
                    } else {
                        for g in 0..BLOCK / 4 {
                            if PREFETCH {
                                prefetch(w(g));
                            }
                            let x = load(w(g));
                            for c in 0..C {
                                dot[c] = product_signed(dot[c], x, group(a[c], g));
                            }
                        }
                    }
                    // The factor of half `h`'s products for activation row `c`.
                    let scale = |h: usize| {
                        if F::SUPERBLOCKS {
                            let at = v(F::SCALES_VECTOR).add(TILE * (F::BLOCK_SCALES * k + h));
                            to_f32(widen_bytes(at, F::SIGNED_SCALES))
                        } else {
                            load_f32(v(F::SCALES_VECTOR))
                        }
                    };
                    let factor = |s: Float, c: usize| {
                        if F::SUPERBLOCKS {
                            mul(s, d_da[c])
                        } else {
                            mul(s, splat_f32(a[c].d))
                        }
                    };
                    let s = scale(0);
                    for c in 0..C {
                        acc[c] = scaled_add(acc[c], dot[c], factor(s, c));
                    }
                    if F::SPLIT {
                        let s = scale(1);
                        for c in 0..C {
                            acc[c] = scaled_add(acc[c], second[c], factor(s, c));
                        }
                    }
                    if F::OFFSETS && F::SUPERBLOCKS && k % 2 == 1 {
                        // Two blocks' mins times their activation sums, in 16-bit pairs.
                        let pairs = widen_byte_pairs(v(F::OFFSETS_VECTOR).add(2 * TILE * (k / 2)));
                        for c in 0..C {
                            let both = splat_i32(a[c].pair_sums);
                            mins[c] = add_i32(mins[c], product_pairs(pairs, both));
                        }
                    } else if F::OFFSETS && !F::SUPERBLOCKS {
                        let m = load_f32(v(F::OFFSETS_VECTOR));
                        for c in 0..C {
                            off[c] = fmadd(m, splat_f32(a[c].s), off[c]);
                        }
                    }
                }
                if F::OFFSETS && F::SUPERBLOCKS {
                    let m = load_f32(v(F::FACTORS_VECTOR + 1));
                    for c in 0..C {
                        let m_da = mul(m, splat_f32(acts[c].get_unchecked(first).d));
                        off[c] = fmadd(to_f32(mins[c]), m_da, off[c]);
                    }
                }
            }
            let mut out = [[0f32; TILE]; C];
            for c in 0..C {
                store_sum(out[c].as_mut_ptr(), acc[c], off[c]);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [GgmlDType; 5] = [
        GgmlDType::Q5_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ];

    fn weights(rows: usize, cols: usize, seed: u32) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let h = (i as u32 ^ seed.wrapping_mul(0x9e37_79b9))
                    .wrapping_mul(2_654_435_761)
                    .rotate_left(13)
                    .wrapping_mul(2_246_822_519);
                (h as f32 / u32::MAX as f32 - 0.5) * 2.0
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    fn max_abs(t: &Tensor) -> f32 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs(&(a - b).unwrap())
    }

    /// The activations as the kernels see them, back in f32.
    fn requantized(x: &Tensor, kind: Kind) -> Tensor {
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let back: Vec<f32> = quantize(&v, kind)
            .iter()
            .flat_map(|a| a.q.map(|q| q as f32 * a.d))
            .collect();
        Tensor::from_vec(back, x.shape(), &Device::Cpu).unwrap()
    }

    #[test]
    fn kernels_match_the_dequantized_product() {
        // 42 rows: whole tiles of four and single rows; 1..8 activation rows: both kernels
        // with every tile shape.
        for dtype in KINDS {
            let q = QTensor::quantize(&weights(42, 512, 1), dtype).unwrap();
            let m = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let w = q.dequantize(&Device::Cpu).unwrap().t().unwrap();
            for rows in 1..=8 {
                let x = (weights(rows, 512, 2 + rows as u32) * 3.0).unwrap();
                let ours = m.forward(&x).unwrap();
                // Same quantized activations, plain f32 arithmetic: only rounding differs (and
                // for Q4_1 the f16 rounding of Q8_1's block sums, as llama.cpp stores them).
                let tolerance = if dtype == GgmlDType::Q4_1 { 1e-3 } else { 2e-4 };
                let same_inputs = requantized(&x, m.kind).matmul(&w).unwrap();
                // Full-precision activations: the 8-bit activation error on top.
                let exact = x.matmul(&w).unwrap();
                let scale = max_abs(&exact);
                assert!(
                    max_diff(&ours, &same_inputs) < tolerance * scale,
                    "{dtype:?} m={rows}: {} vs scale {scale}",
                    max_diff(&ours, &same_inputs)
                );
                assert!(
                    max_diff(&ours, &exact) < 0.02 * scale,
                    "{dtype:?} m={rows}: {} vs scale {scale}",
                    max_diff(&ours, &exact)
                );
            }
        }
    }

    #[test]
    fn kernels_match_candle() {
        for dtype in KINDS {
            let q = QTensor::quantize(&weights(70, 256, 1), dtype).unwrap();
            for rows in [1, 5] {
                let x = (weights(rows, 256, 2) * 3.0)
                    .unwrap()
                    .reshape((1, rows, 256))
                    .unwrap();
                let ours = QuantMatrix::from_qtensor(&q)
                    .unwrap()
                    .unwrap()
                    .forward(&x)
                    .unwrap();
                let again = QTensor::quantize(&weights(70, 256, 1), dtype).unwrap();
                let candle = QMatMul::from_qtensor(again).unwrap().forward(&x).unwrap();
                let scale = max_abs(&candle);
                assert!(
                    max_diff(&ours, &candle) < 0.002 * scale,
                    "{dtype:?}: ours and candle differ by {}",
                    max_diff(&ours, &candle)
                );
            }
        }
    }

    #[test]
    fn simd_and_scalar_kernels_agree() {
        for dtype in KINDS {
            let q = QTensor::quantize(&weights(9, 256, 3), dtype).unwrap();
            let m = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            for rows in [1, 4] {
                let x = weights(rows, 256, 4);
                let ours: Vec<Vec<f32>> = m.forward(&x).unwrap().to_vec2().unwrap();
                let input: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let scalar = m.product_scalar(&quantize(&input, m.kind), rows);
                for (r, row) in ours.iter().enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        let s = scalar[r * m.rows + c];
                        assert!(
                            (v - s).abs() < 1e-4 * s.abs().max(1.0),
                            "{dtype:?} [{r}, {c}]: {v} vs {s}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        // Decode (one or two rows) and prefill (more) use different kernels and tile shapes;
        // rows must not notice.
        for dtype in KINDS {
            let q = QTensor::quantize(&weights(42, 512, 6), dtype).unwrap();
            let m = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let batch = (weights(7, 512, 7) * 2.0).unwrap();
            let together: Vec<Vec<f32>> = m.forward(&batch).unwrap().to_vec2().unwrap();
            for (r, row) in together.iter().enumerate() {
                for n in [1, 2, 3] {
                    let start = r.min(7 - n);
                    let part: Vec<Vec<f32>> = m
                        .forward(&batch.narrow(0, start, n).unwrap())
                        .unwrap()
                        .to_vec2()
                        .unwrap();
                    assert_eq!(&part[r - start], row, "{dtype:?} row {r} in {n}");
                }
            }
            // More rows than one run of activations: the rows of the second run too.
            let many = ACTS_PER_RUN + 5;
            let batch = (weights(many, 512, 8) * 2.0).unwrap();
            let together: Vec<Vec<f32>> = m.forward(&batch).unwrap().to_vec2().unwrap();
            for (r, row) in together.iter().enumerate() {
                let alone = m.forward(&batch.narrow(0, r, 1).unwrap()).unwrap();
                assert_eq!(
                    &alone.to_vec2::<f32>().unwrap()[0],
                    row,
                    "{dtype:?} row {r} of {many}"
                );
            }
        }
    }

    #[test]
    fn candle_types_give_a_row_the_same_bits_alone_or_in_a_batch() {
        // Shapes that take candle's repacked kernels (columns a multiple of 256) and others.
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q5_1,
            GgmlDType::Q2K,
            GgmlDType::Q3K,
            GgmlDType::Q5K,
        ] {
            for (rows, cols) in [(64, 512), (256, 1536), (40, 768)] {
                let q = QTensor::quantize(&weights(rows, cols, 6), dtype).unwrap();
                let m = Matrix::new(q).unwrap();
                let batch = (weights(40, cols, 7) * 2.0).unwrap();
                let alone: Vec<Vec<f32>> = (0..40)
                    .map(|r| {
                        let row = batch.narrow(0, r, 1).unwrap().unsqueeze(0).unwrap();
                        m.forward(&row)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap()
                    })
                    .collect();
                for n in [2, 3, 8, 16, 32, 33, 40] {
                    let together: Vec<Vec<f32>> = m
                        .forward(&batch.narrow(0, 0, n).unwrap())
                        .unwrap()
                        .to_vec2()
                        .unwrap();
                    for (r, row) in together.iter().enumerate() {
                        assert_eq!(row, &alone[r], "{dtype:?} {rows}x{cols}, row {r} of {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn k_types_take_about_the_files_bytes() {
        // Q4_K: 128 bytes of nibbles, 8 scales, 8 mins, d and -dmin per superblock and row
        // (the file: 144); Q6_K: 128 bytes of nibbles, 64 of high bits, 16 scales, d (the
        // file: 210).
        for (dtype, bytes_per_superblock) in [(GgmlDType::Q4K, 152), (GgmlDType::Q6K, 212)] {
            let (rows, cols) = (64, 1024);
            let q = QTensor::quantize(&weights(rows, cols, 9), dtype).unwrap();
            let m = Matrix::new(q).unwrap();
            assert!(matches!(m, Matrix::Own(_)));
            assert_eq!(
                m.bytes(),
                rows * cols / 256 * bytes_per_superblock,
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn other_types_are_left_to_candle() {
        let q = QTensor::quantize(&weights(4, 256, 5), GgmlDType::Q5K).unwrap();
        assert!(QuantMatrix::from_qtensor(&q).unwrap().is_none());
    }
}

/// Kernel timings against candle on the catalogue models' shapes (one thread for a fair
/// comparison):
/// `RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 cargo nextest run --release -p refusal-steer-engine
/// kernel_speed --run-ignored only --no-capture`.
#[cfg(test)]
mod speed {
    use super::*;
    use std::time::Instant;

    /// The best of three timings of `reps` calls, made on a thread-pool worker as the
    /// engine's forward pass makes them (from outside the pool each call would also pay a
    /// hand-off to the pool: ~70 us, most of a small matrix's time at one row).
    fn seconds(f: &(dyn Fn() + Sync), reps: usize) -> f64 {
        rayon::scope(|_| best_of_three(f, reps))
    }

    fn best_of_three(f: &dyn Fn(), reps: usize) -> f64 {
        f();
        (0..3)
            .map(|_| {
                let t = Instant::now();
                (0..reps).for_each(|_| f());
                t.elapsed().as_secs_f64() / reps as f64
            })
            .fold(f64::MAX, f64::min)
    }

    #[test]
    #[ignore = "timing, not a test"]
    fn kernel_speed() {
        let shapes = [
            (GgmlDType::Q8_0, 151_936, 896),
            (GgmlDType::Q5_0, 4864, 896),
            (GgmlDType::Q5_0, 896, 896),
            // Qwen2.5-1.5B's.
            (GgmlDType::Q4K, 8960, 1536),
            (GgmlDType::Q6K, 1536, 8960),
            (GgmlDType::Q4K, 1536, 1536),
            (GgmlDType::Q6K, 151_936, 1536),
            // SmolLM2's.
            (GgmlDType::Q4_1, 1536, 576),
            (GgmlDType::Q4_1, 576, 1536),
            (GgmlDType::Q4_1, 49152, 576),
        ];
        for (dtype, rows, cols) in shapes {
            let w = Tensor::randn(0f32, 1.0, (rows, cols), &Device::Cpu).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let ours = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let candle = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
            for m in [1usize, 128] {
                let x = Tensor::randn(0f32, 1.0, (m, cols), &Device::Cpu).unwrap();
                let reps = (200_000_000 / (rows * cols * m)).max(3);
                let t_ours = seconds(&|| drop(ours.forward(&x).unwrap()), reps);
                let t_candle = seconds(&|| drop(candle.forward(&x).unwrap()), reps);
                println!(
                    "{dtype:?} {rows}x{cols} m={m}: ours {:.3} ms ({:.1} Gop/s), candle {:.3} ms",
                    t_ours * 1e3,
                    2.0 * (rows * cols * m) as f64 / t_ours / 1e9,
                    t_candle * 1e3
                );
            }
        }
    }
}
