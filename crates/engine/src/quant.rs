//! Matrix-vector and matrix-matrix kernels for the quantization types where candle's CPU
//! kernels are slow: Q5_0 (most of Qwen2.5's and Gemma 3's weights), Q4_1 (SmolLM2's) and
//! Q8_0 (Qwen2.5's output head, whose 896 columns keep it off candle's repacked path).
//!
//! Activations are quantized per block of 32 to 8 bits, as llama.cpp does (Q8_0 for Q5_0 and
//! Q8_0 weights, Q8_1 for Q4_1), and each block's dot product runs exactly in integers. Every
//! output is then `sum_b (d_w * d_a) * int_dot_b` accumulated in one fused multiply-add chain
//! in block order (plus, for Q4_1, the `m * s` terms added one by one), whichever kernel runs:
//! decode reads packed weight blocks for a few weight rows at once, prefill unpacks a few
//! weight rows and meets several activation rows per pass. The integer and float operations
//! per output are the same in both, so batching cannot change a row's bits.

use crate::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
/// Output columns per parallel task: enough work to amortise scheduling.
const COLUMNS_PER_TASK: usize = 32;
/// From this many activation rows on, weight rows are unpacked once and reused; below it the
/// unpacking costs more than it saves and the packed kernel runs directly.
const UNPACK_FROM_ROWS: usize = 3;
/// Weight rows per pass of the unpacked (prefill) kernel; each activation block is loaded once
/// for all of them. (The packed kernel reads one weight row at a time: decode streams weights
/// from memory, and one sequential stream is what the hardware prefetcher follows best.)
const TILE_ROWS: usize = 4;
/// Activation rows per pass of the unpacked kernel; each weight block is loaded once for all.
const TILE_ACTS: usize = 2;
/// Activation rows that every unpacked weight row of a task meets before the next ones are
/// read: a run of them (up to ~350 KB of quantized blocks for Qwen2.5's widest matrix) stays
/// in a core's L2 cache.
const ACTS_PER_RUN: usize = 64;
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
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q5_0 => 22,
            Kind::Q4_1 => 20,
            Kind::Q8_0 => 34,
        }
    }

    /// What the SIMD kernels add to each weight to make it an unsigned byte; the activation
    /// block carries the matching integer correction.
    fn bias(self) -> i32 {
        match self {
            Kind::Q5_0 => 16,
            Kind::Q4_1 => 0,
            Kind::Q8_0 => 128,
        }
    }
}

/// A weight matrix used by a projection: our kernels where candle's are slow, candle's otherwise.
pub enum Matrix {
    Own(QuantMatrix),
    /// A float matrix in runs of output rows, multiplied in parallel: candle multiplies a few
    /// activation rows by a whole matrix on one thread.
    Dense(Vec<Tensor>),
    Candle {
        matmul: QMatMul,
        /// candle multiplies Q6_K by one activation row with another kernel than by several,
        /// and the two round differently; a lone row is run with a zero row beside it so that
        /// a row's bits do not depend on its batch.
        pad_lone_rows: bool,
    },
}

impl Matrix {
    pub fn new(t: QTensor) -> Result<Self> {
        Ok(match QuantMatrix::from_qtensor(&t)? {
            Some(m) => Matrix::Own(m),
            None => Matrix::Candle {
                pad_lone_rows: t.dtype() == GgmlDType::Q6K,
                matmul: QMatMul::from_qtensor(t)?,
            },
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
            Matrix::Candle {
                matmul,
                pad_lone_rows,
            } => {
                let rows = x.elem_count() / x.dim(x.rank() - 1)?;
                if *pad_lone_rows && rows == 1 {
                    let pair = Tensor::cat(&[x, &x.zeros_like()?], 0)?;
                    Ok(matmul.forward(&pair)?.narrow(0, 0, 1)?)
                } else {
                    Ok(matmul.forward(x)?)
                }
            }
        }
    }
}

/// A Q5_0, Q4_1 or Q8_0 weight matrix `[rows, cols]` (one row per output).
pub struct QuantMatrix {
    kind: Kind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// One block of 8-bit activations: `x ~= d * q`. `s = d * sum(q)` (rounded to f16 for Q4_1 as
/// llama.cpp's Q8_1 stores it); `corr[l] = -bias * sum(q[4l..4l+4])` undoes the weights' bias
/// in the integer products.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct BlockQ8 {
    q: [i8; BLOCK],
    corr: [i32; 8],
    d: f32,
    s: f32,
}

/// A weight block unpacked to the bytes the SIMD product takes: `w = d * (q - bias) + offset`
/// (for Q8_0 without VNNI the bytes are the signed weights themselves).
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Unpacked {
    q: [u8; BLOCK],
    d: f32,
    offset: f32,
}

impl QuantMatrix {
    /// The matrix, if its type is one this module handles.
    pub fn from_qtensor(t: &QTensor) -> Result<Option<Self>> {
        let kind = match t.dtype() {
            GgmlDType::Q5_0 => Kind::Q5_0,
            GgmlDType::Q4_1 => Kind::Q4_1,
            GgmlDType::Q8_0 => Kind::Q8_0,
            _ => return Ok(None),
        };
        let (rows, cols) = t.shape().dims2()?;
        Ok(Some(Self {
            kind,
            rows,
            cols,
            data: t.data()?.into_owned(),
        }))
    }

    /// `x`: `[.., cols]` -> `[.., rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let m = x.elem_count() / self.cols;
        let input: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let activations: Vec<BlockQ8> = input
            .par_chunks(BLOCK)
            .with_min_len(PARALLEL_FROM_VALUES / BLOCK)
            .map(|b| quantize_block(b, self.kind))
            .collect();
        let out = match self.kind {
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            Kind::Q5_0 => self.product::<simd::Q5_0>(&activations, m),
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            Kind::Q4_1 => self.product::<simd::Q4_1>(&activations, m),
            #[cfg(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            ))]
            Kind::Q8_0 => self.product::<simd::Q8_0>(&activations, m),
            #[cfg(not(all(
                target_arch = "x86_64",
                target_feature = "avx2",
                target_feature = "fma"
            )))]
            _ => self.product_scalar(&activations, m),
        };
        *out_dims.last_mut().expect("at least one dim") = self.rows;
        Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
    }

    /// Runs `task(first, last, part)` on runs of output columns in parallel, each filling
    /// `part[r * width + col - first]`, and gathers the parts into `[m, rows]`.
    fn by_columns<T>(&self, m: usize, task: T) -> Vec<f32>
    where
        T: Fn(usize, usize, &mut [f32]) + Sync,
    {
        let parts: Vec<Vec<f32>> = (0..self.rows)
            .into_par_iter()
            .step_by(COLUMNS_PER_TASK)
            .map(|first| {
                let last = (first + COLUMNS_PER_TASK).min(self.rows);
                let mut part = vec![0f32; m * (last - first)];
                task(first, last, &mut part);
                part
            })
            .collect();
        let mut out = vec![0f32; m * self.rows];
        out.par_chunks_mut(self.rows.max(1))
            .with_min_len(PARALLEL_FROM_VALUES.div_ceil(self.rows.max(1)))
            .enumerate()
            .for_each(|(r, row)| {
                for (task, part) in parts.iter().enumerate() {
                    let first = task * COLUMNS_PER_TASK;
                    let width = part.len() / m;
                    row[first..first + width].copy_from_slice(&part[r * width..(r + 1) * width]);
                }
            });
        out
    }

    #[cfg(all(
        target_arch = "x86_64",
        target_feature = "avx2",
        target_feature = "fma"
    ))]
    fn product<F: simd::Format>(&self, acts: &[BlockQ8], m: usize) -> Vec<f32> {
        let blocks = self.cols / BLOCK;
        let row_bytes = blocks * F::BYTES;
        assert_eq!(self.data.len(), self.rows * row_bytes);
        assert_eq!(acts.len(), m * blocks);
        let act = |r: usize| &acts[r * blocks..(r + 1) * blocks];
        self.by_columns(m, |first, last, part| {
            let width = last - first;
            if m < UNPACK_FROM_ROWS {
                for col in first..last {
                    let w = &self.data[col * row_bytes..(col + 1) * row_bytes];
                    let w = simd::Packed::<F>::new(w, row_bytes, blocks);
                    let at = col - first;
                    if m == 2 {
                        let [[s0, s1]] = simd::tile::<F, _, 1, 2>(&w, [act(0), act(1)]);
                        (part[at], part[width + at]) = (s0, s1);
                    } else if m == 1 {
                        part[at] = simd::tile::<F, _, 1, 1>(&w, [act(0)])[0][0];
                    }
                }
                return;
            }
            // Each weight tile is unpacked when the first run of activation rows reaches it,
            // and kept: later runs (only when the rows are many) reuse it while their rows stay
            // in cache, instead of one pass over all the rows per tile streaming them from
            // memory.
            let mut unpacked: Vec<Unpacked> = Vec::with_capacity(width * blocks);
            let mut put = |r: usize, col: usize, sums: &[f32]| {
                let at = r * width + col - first;
                part[at..at + sums.len()].copy_from_slice(sums);
            };
            for run in (0..m).step_by(ACTS_PER_RUN) {
                let run_end = (run + ACTS_PER_RUN).min(m);
                let mut col = first;
                while col < last {
                    let n = if last - col >= TILE_ROWS {
                        TILE_ROWS
                    } else {
                        1
                    };
                    let at = (col - first) * blocks;
                    if run == 0 {
                        simd::unpack::<F>(
                            &self.data[col * row_bytes..(col + n) * row_bytes],
                            &mut unpacked,
                        );
                    }
                    let w = simd::Unpacking::<F>::new(&unpacked[at..at + n * blocks], blocks);
                    let mut r = run;
                    while r < run_end {
                        if n == TILE_ROWS && run_end - r >= TILE_ACTS {
                            let acts = std::array::from_fn(|i| act(r + i));
                            let s = simd::tile::<F, _, TILE_ROWS, TILE_ACTS>(&w, acts);
                            for i in 0..TILE_ACTS {
                                put(r + i, col, &s.map(|c| c[i]));
                            }
                            r += TILE_ACTS;
                        } else if n == TILE_ROWS {
                            let s = simd::tile::<F, _, TILE_ROWS, 1>(&w, [act(r)]);
                            put(r, col, &s.map(|c| c[0]));
                            r += 1;
                        } else {
                            put(r, col, &[simd::tile::<F, _, 1, 1>(&w, [act(r)])[0][0]]);
                            r += 1;
                        }
                    }
                    col += n;
                }
            }
        })
    }

    #[cfg_attr(
        all(
            target_arch = "x86_64",
            target_feature = "avx2",
            target_feature = "fma"
        ),
        allow(dead_code)
    )]
    fn product_scalar(&self, acts: &[BlockQ8], m: usize) -> Vec<f32> {
        let blocks = self.cols / BLOCK;
        let row_bytes = blocks * self.kind.block_bytes();
        self.by_columns(m, |first, last, part| {
            let width = last - first;
            for col in first..last {
                let w = &self.data[col * row_bytes..(col + 1) * row_bytes];
                for r in 0..m {
                    part[r * width + col - first] =
                        dot_scalar(self.kind, w, &acts[r * blocks..(r + 1) * blocks]);
                }
            }
        })
    }
}

/// 8-bit quantization of one block, rounding the scale to f16 as llama.cpp stores it.
fn quantize_block(x: &[f32], kind: Kind) -> BlockQ8 {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = (v * inv).round() as i8;
        sum += *qi as i32;
    }
    let mut corr = [0i32; 8];
    for (c, quad) in corr.iter_mut().zip(q.chunks_exact(4)) {
        *c = -kind.bias() * quad.iter().map(|&v| v as i32).sum::<i32>();
    }
    let d16 = f16::from_f32(d).to_f32();
    let s = match kind {
        Kind::Q4_1 => f16::from_f32(d * sum as f32).to_f32(),
        Kind::Q5_0 | Kind::Q8_0 => d16 * sum as f32,
    };
    BlockQ8 { q, corr, d: d16, s }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// One weight block as signed integers, scale and offset: `w = d * q + offset`.
fn decode_scalar(kind: Kind, b: &[u8]) -> ([i32; BLOCK], f32, f32) {
    let d = f16_at(b, 0);
    let mut q = [0i32; BLOCK];
    match kind {
        Kind::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for j in 0..BLOCK / 2 {
                q[j] = (b[6 + j] & 0x0F) as i32 | (((qh >> j) & 1) << 4) as i32;
                q[j + 16] = (b[6 + j] >> 4) as i32 | (((qh >> (j + 16)) & 1) << 4) as i32;
            }
            q.iter_mut().for_each(|v| *v -= 16);
            (q, d, 0.0)
        }
        Kind::Q4_1 => {
            for j in 0..BLOCK / 2 {
                q[j] = (b[4 + j] & 0x0F) as i32;
                q[j + 16] = (b[4 + j] >> 4) as i32;
            }
            (q, d, f16_at(b, 2))
        }
        Kind::Q8_0 => {
            for (j, v) in q.iter_mut().enumerate() {
                *v = b[2 + j] as i8 as i32;
            }
            (q, d, 0.0)
        }
    }
}

/// The portable kernel (and the reference the SIMD kernels are tested against).
fn dot_scalar(kind: Kind, w: &[u8], a: &[BlockQ8]) -> f32 {
    let mut total = 0f32;
    let mut offsets = 0f32;
    for (b, a) in w.chunks_exact(kind.block_bytes()).zip(a) {
        let (q, d, offset) = decode_scalar(kind, b);
        let acc: i32 = q.iter().zip(&a.q).map(|(&x, &y)| x * y as i32).sum();
        total += d * a.d * acc as f32;
        offsets += offset * a.s;
    }
    total + offsets
}

/// AVX2 kernels (with VNNI byte products and AVX-512 bit masks where the build target has
/// them; `.cargo/config.toml` builds for the host CPU).
#[cfg(all(
    target_arch = "x86_64",
    target_feature = "avx2",
    target_feature = "fma"
))]
mod simd {
    use super::{BlockQ8, Unpacked, BLOCK};
    #[cfg(not(target_feature = "f16c"))]
    use half::f16;
    use std::arch::x86_64::*;
    use std::marker::PhantomData;

    /// Whether byte products use VNNI (`vpdpbusd`, no 16-bit intermediate).
    const VNNI: bool = cfg!(all(
        target_feature = "avx512vnni",
        target_feature = "avx512vl"
    ));

    /// A weight block layout.
    pub trait Format {
        const BYTES: usize;
        /// The weights carry a float offset per block (`m * s` terms).
        const OFFSET: bool;
        /// The activation blocks carry a nonzero integer correction.
        const BIAS: bool;
        /// The product takes signed weight bytes (Q8_0 without VNNI).
        #[allow(dead_code)]
        const SIGNED: bool = false;
        /// One block as the product's byte operand, scale and offset.
        ///
        /// # Safety
        /// `b` points at `BYTES` readable bytes.
        unsafe fn decode(b: *const u8) -> (__m256i, f32, f32);
    }

    #[inline(always)]
    unsafe fn half_at(b: *const u8) -> f32 {
        let bits = u16::from_le(std::ptr::read_unaligned(b as *const u16));
        // F16C when the target has it (one instruction, no round trip through memory).
        #[cfg(target_feature = "f16c")]
        return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)));
        #[cfg(not(target_feature = "f16c"))]
        return f16::from_bits(bits).to_f32();
    }

    /// The 32 nibbles of 16 bytes as 32 bytes: low nibbles first, then high nibbles.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let x = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(x, 4), x);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Byte j is 0x10 where bit j of `bits` is set.
    #[inline(always)]
    unsafe fn fifth_bits(bits: u32) -> __m256i {
        #[cfg(all(target_feature = "avx512bw", target_feature = "avx512vl"))]
        return _mm256_maskz_mov_epi8(bits, _mm256_set1_epi8(0x10));
        #[cfg(not(all(target_feature = "avx512bw", target_feature = "avx512vl")))]
        {
            // Broadcast byte j/8 of `bits` to byte j, then test bit j%8 by OR-ing the others in.
            let spread = _mm256_shuffle_epi8(
                _mm256_set1_epi32(bits as i32),
                _mm256_set_epi64x(
                    0x0303_0303_0303_0303,
                    0x0202_0202_0202_0202,
                    0x0101_0101_0101_0101,
                    0,
                ),
            );
            let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe_u64 as i64);
            let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1));
            _mm256_and_si256(set, _mm256_set1_epi8(0x10))
        }
    }

    pub struct Q5_0;
    pub struct Q4_1;
    pub struct Q8_0;

    impl Format for Q5_0 {
        const BYTES: usize = 22;
        const OFFSET: bool = false;
        const BIAS: bool = true;
        #[inline(always)]
        unsafe fn decode(b: *const u8) -> (__m256i, f32, f32) {
            let qh = u32::from_le(std::ptr::read_unaligned(b.add(2) as *const u32));
            let u = _mm256_or_si256(nibbles(b.add(6)), fifth_bits(qh));
            (u, half_at(b), 0.0)
        }
    }

    impl Format for Q4_1 {
        const BYTES: usize = 20;
        const OFFSET: bool = true;
        const BIAS: bool = false;
        #[inline(always)]
        unsafe fn decode(b: *const u8) -> (__m256i, f32, f32) {
            (nibbles(b.add(4)), half_at(b), half_at(b.add(2)))
        }
    }

    impl Format for Q8_0 {
        const BYTES: usize = 34;
        const OFFSET: bool = false;
        const BIAS: bool = VNNI;
        const SIGNED: bool = !VNNI;
        #[inline(always)]
        unsafe fn decode(b: *const u8) -> (__m256i, f32, f32) {
            let w = _mm256_loadu_si256(b.add(2) as *const __m256i);
            // With VNNI the weights become unsigned (+128) and the activations' correction
            // takes the 128s back out; without it the sign trick keeps the pairs in 16 bits.
            let u = if VNNI {
                _mm256_xor_si256(w, _mm256_set1_epi8(-128))
            } else {
                w
            };
            (u, half_at(b), 0.0)
        }
    }

    /// The exact integer dot product of one weight block with one activation block, in eight
    /// partial sums.
    #[inline(always)]
    unsafe fn product<F: Format>(u: __m256i, a: &BlockQ8) -> __m256i {
        let q = _mm256_load_si256(a.q.as_ptr() as *const __m256i);
        let corr = || _mm256_load_si256(a.corr.as_ptr() as *const __m256i);
        #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
        {
            let start = if F::BIAS {
                corr()
            } else {
                _mm256_setzero_si256()
            };
            _mm256_dpbusd_epi32(start, u, q)
        }
        #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
        {
            let ones = _mm256_set1_epi16(1);
            if F::SIGNED {
                // |w| * (a with w's sign); |w| <= 128 and |a| <= 127 keep pairs in i16.
                let p = _mm256_maddubs_epi16(_mm256_sign_epi8(u, u), _mm256_sign_epi8(q, u));
                return _mm256_madd_epi16(p, ones);
            }
            // u <= 31: pairs summed to i16 cannot overflow.
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(u, q), ones);
            if F::BIAS {
                _mm256_add_epi32(p, corr())
            } else {
                p
            }
        }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    /// A few consecutive weight rows, block by block.
    pub trait Source {
        fn rows(&self) -> usize;
        fn blocks(&self) -> usize;
        /// Block `b` of row `r`: byte operand, scale, offset.
        ///
        /// # Safety
        /// `r` is below the number of rows the source was made with, `b` below `blocks()`.
        unsafe fn block(&self, r: usize, b: usize) -> (__m256i, f32, f32);
    }

    /// Weight rows read straight from their packed blocks.
    pub struct Packed<'a, F> {
        data: &'a [u8],
        row_bytes: usize,
        blocks: usize,
        format: PhantomData<F>,
    }

    impl<'a, F: Format> Packed<'a, F> {
        pub fn new(data: &'a [u8], row_bytes: usize, blocks: usize) -> Self {
            assert_eq!(row_bytes, blocks * F::BYTES);
            assert_eq!(data.len() % row_bytes.max(1), 0);
            Self {
                data,
                row_bytes,
                blocks,
                format: PhantomData,
            }
        }
    }

    impl<F: Format> Source for Packed<'_, F> {
        fn rows(&self) -> usize {
            self.data.len() / self.row_bytes.max(1)
        }
        fn blocks(&self) -> usize {
            self.blocks
        }
        #[inline(always)]
        unsafe fn block(&self, r: usize, b: usize) -> (__m256i, f32, f32) {
            F::decode(self.data.as_ptr().add(r * self.row_bytes + b * F::BYTES))
        }
    }

    /// Unpacks whole rows of packed blocks.
    pub fn unpack<F: Format>(rows: &[u8], out: &mut Vec<Unpacked>) {
        for b in rows.chunks_exact(F::BYTES) {
            // SAFETY: the build target has AVX2 (cfg above); `b` holds one whole block.
            unsafe {
                let (u, d, offset) = F::decode(b.as_ptr());
                let mut w = Unpacked {
                    q: [0; BLOCK],
                    d,
                    offset,
                };
                _mm256_store_si256(w.q.as_mut_ptr() as *mut __m256i, u);
                out.push(w);
            }
        }
    }

    /// Weight rows unpacked by [`unpack`].
    pub struct Unpacking<'a, F> {
        rows: &'a [Unpacked],
        blocks: usize,
        format: PhantomData<F>,
    }

    impl<'a, F: Format> Unpacking<'a, F> {
        pub fn new(rows: &'a [Unpacked], blocks: usize) -> Self {
            Self {
                rows,
                blocks,
                format: PhantomData,
            }
        }
    }

    impl<F: Format> Source for Unpacking<'_, F> {
        fn rows(&self) -> usize {
            self.rows.len() / self.blocks.max(1)
        }
        fn blocks(&self) -> usize {
            self.blocks
        }
        #[inline(always)]
        unsafe fn block(&self, r: usize, b: usize) -> (__m256i, f32, f32) {
            let w = self.rows.get_unchecked(r * self.blocks + b);
            (
                _mm256_load_si256(w.q.as_ptr() as *const __m256i),
                w.d,
                w.offset,
            )
        }
    }

    /// Dot products of `R` weight rows with `C` activation rows: `out[r][c]`. Each output is
    /// one multiply-add chain over the blocks in order, whatever `R` and `C` are.
    #[inline(always)]
    pub fn tile<F: Format, S: Source, const R: usize, const C: usize>(
        w: &S,
        acts: [&[BlockQ8]; C],
    ) -> [[f32; C]; R] {
        let blocks = w.blocks();
        for a in acts {
            assert_eq!(a.len(), blocks);
        }
        assert!(w.rows() >= R);
        // SAFETY: the build target has AVX2 and FMA (cfg above); every block index is below
        // `blocks`, the length of each activation row, and `S` was made with at least `R` rows.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); C]; R];
            let mut off = [[0f32; C]; R];
            for b in 0..blocks {
                let mut u = [_mm256_setzero_si256(); R];
                let mut dw = [0f32; R];
                let mut ow = [0f32; R];
                for r in 0..R {
                    (u[r], dw[r], ow[r]) = w.block(r, b);
                }
                for c in 0..C {
                    let a = acts[c].get_unchecked(b);
                    let da = _mm256_set1_ps(a.d);
                    for r in 0..R {
                        let p = _mm256_cvtepi32_ps(product::<F>(u[r], a));
                        let scale = _mm256_mul_ps(_mm256_set1_ps(dw[r]), da);
                        acc[r][c] = _mm256_fmadd_ps(p, scale, acc[r][c]);
                        if F::OFFSET {
                            off[r][c] += ow[r] * a.s;
                        }
                    }
                }
            }
            let mut out = [[0f32; C]; R];
            for r in 0..R {
                for c in 0..C {
                    out[r][c] = hsum(acc[r][c]) + off[r][c];
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KINDS: [GgmlDType; 3] = [GgmlDType::Q5_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

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

    /// The activations as the kernels see them: quantized per block, then back to f32.
    fn requantized(x: &Tensor, kind: Kind) -> Tensor {
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let back: Vec<f32> = v
            .chunks(BLOCK)
            .flat_map(|b| {
                let a = quantize_block(b, kind);
                a.q.map(|q| q as f32 * a.d)
            })
            .collect();
        Tensor::from_vec(back, x.shape(), &Device::Cpu).unwrap()
    }

    #[test]
    fn kernels_match_the_dequantized_product() {
        // 42 rows: whole tiles of four and single rows; 1..8 activation rows: both kernels
        // with every tile shape.
        for dtype in KINDS {
            let q = QTensor::quantize(&weights(42, 320, 1), dtype).unwrap();
            let m = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let w = q.dequantize(&Device::Cpu).unwrap().t().unwrap();
            for rows in 1..=8 {
                let x = (weights(rows, 320, 2 + rows as u32) * 3.0).unwrap();
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
            let q = QTensor::quantize(&weights(9, 160, 3), dtype).unwrap();
            let m = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            for rows in [1, 4] {
                let x = weights(rows, 160, 4);
                let ours: Vec<Vec<f32>> = m.forward(&x).unwrap().to_vec2().unwrap();
                let input: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let acts: Vec<BlockQ8> = input
                    .chunks(BLOCK)
                    .map(|b| quantize_block(b, m.kind))
                    .collect();
                let scalar = m.product_scalar(&acts, rows);
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
            let q = QTensor::quantize(&weights(42, 320, 6), dtype).unwrap();
            let m = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let batch = (weights(7, 320, 7) * 2.0).unwrap();
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
            let batch = (weights(many, 320, 8) * 2.0).unwrap();
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
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
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
    fn other_types_are_left_to_candle() {
        let q = QTensor::quantize(&weights(4, 256, 5), GgmlDType::Q4K).unwrap();
        assert!(QuantMatrix::from_qtensor(&q).unwrap().is_none());
    }
}

/// Kernel timings against candle on Qwen2.5-0.5B's shapes (one thread for a fair comparison):
/// `RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1 cargo nextest run --release -p refusal-steer-engine
/// kernel_speed --run-ignored only --no-capture`.
#[cfg(test)]
mod speed {
    use super::*;
    use std::time::Instant;

    fn seconds(f: &dyn Fn(), reps: usize) -> f64 {
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
