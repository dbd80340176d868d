//! Matrix-vector kernels for the quantization types whose candle kernels are scalar (Q5_0,
//! which holds most of Qwen2.5's and Gemma 3's weights, and Q4_1, SmolLM2's). Activations are
//! quantized per block of 32 to 8 bits, as llama.cpp does (Q8_0 for Q5_0, Q8_1 for Q4_1), and
//! dot products run in integers with AVX2 where the CPU has it.

use crate::Result;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use half::f16;
use rayon::prelude::*;

const BLOCK: usize = 32;
/// Output columns per parallel task: enough work to amortise scheduling.
const COLUMNS_PER_TASK: usize = 32;
/// From this many activation rows on, a weight row is unpacked once and reused; below it the
/// unpacking costs more than it saves and the packed kernel runs directly.
const UNPACK_FROM_ROWS: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// f16 d, u32 high bits, 16 bytes of low nibbles: w = (q - 16) * d.
    Q5_0,
    /// f16 d, f16 m, 16 bytes of nibbles: w = q * d + m.
    Q4_1,
}

impl Kind {
    fn block_bytes(self) -> usize {
        match self {
            Kind::Q5_0 => 22,
            Kind::Q4_1 => 20,
        }
    }
}

/// A weight matrix used by a projection: our kernels where candle's are slow, candle's otherwise.
pub enum Matrix {
    Own(QuantMatrix),
    Candle(QMatMul),
}

impl Matrix {
    pub fn new(t: QTensor) -> Result<Self> {
        Ok(match QuantMatrix::from_qtensor(&t)? {
            Some(m) => Matrix::Own(m),
            None => Matrix::Candle(QMatMul::from_qtensor(t)?),
        })
    }

    /// `x`: `[.., in]` -> `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Matrix::Own(m) => m.forward(x),
            Matrix::Candle(m) => Ok(m.forward(x)?),
        }
    }
}

/// A Q5_0 or Q4_1 weight matrix `[rows, cols]` (one row per output).
pub struct QuantMatrix {
    kind: Kind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

/// One block of 8-bit activations: `x ~= d * q`; `s = d * sum(q)`, rounded to f16 for Q4_1
/// as llama.cpp's Q8_1 stores it.
#[derive(Clone, Copy)]
struct BlockQ8 {
    d: f32,
    s: f32,
    q: [i8; BLOCK],
}

/// A weight block unpacked to one unsigned byte per weight: `w = d * q + offset`.
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
        let blocks = self.cols / BLOCK;
        let activations: Vec<BlockQ8> = input
            .chunks(BLOCK)
            .map(|b| quantize_block(b, self.kind))
            .collect();
        let row_bytes = blocks * self.kind.block_bytes();
        // Each task owns a run of output columns for every input row: a weight row is
        // unpacked once and then meets all activation rows while it is in L1.
        let parts: Vec<Vec<f32>> = (0..self.rows)
            .into_par_iter()
            .step_by(COLUMNS_PER_TASK)
            .map(|first| {
                let last = (first + COLUMNS_PER_TASK).min(self.rows);
                let width = last - first;
                let mut part = vec![0f32; m * width];
                let mut unpacked = Vec::with_capacity(blocks);
                for col in first..last {
                    let w = &self.data[col * row_bytes..(col + 1) * row_bytes];
                    if m < UNPACK_FROM_ROWS {
                        for r in 0..m {
                            part[r * width + col - first] = dot_packed(
                                self.kind,
                                w,
                                &activations[r * blocks..(r + 1) * blocks],
                            );
                        }
                        continue;
                    }
                    unpacked.clear();
                    unpack_row(self.kind, w, &mut unpacked);
                    for r in 0..m {
                        part[r * width + col - first] =
                            dot(&unpacked, &activations[r * blocks..(r + 1) * blocks]);
                    }
                }
                part
            })
            .collect();
        let mut out = vec![0f32; m * self.rows];
        for (task, part) in parts.iter().enumerate() {
            let first = task * COLUMNS_PER_TASK;
            let width = part.len() / m.max(1);
            for r in 0..m {
                out[r * self.rows + first..r * self.rows + first + width]
                    .copy_from_slice(&part[r * width..(r + 1) * width]);
            }
        }
        *out_dims.last_mut().expect("at least one dim") = self.rows;
        Ok(Tensor::from_vec(out, out_dims, &Device::Cpu)?)
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
    let d16 = f16::from_f32(d).to_f32();
    let s = match kind {
        Kind::Q4_1 => f16::from_f32(d * sum as f32).to_f32(),
        Kind::Q5_0 => d16 * sum as f32,
    };
    BlockQ8 { d: d16, s, q }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Unpacks one row of weight blocks.
fn unpack_row(kind: Kind, row: &[u8], out: &mut Vec<Unpacked>) {
    for b in row.chunks_exact(kind.block_bytes()) {
        let d = f16_at(b, 0);
        let mut q = [0u8; BLOCK];
        let (nibbles, offset) = match kind {
            // 5-bit values 0..31 stand for -16..15.
            Kind::Q5_0 => {
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                for (j, qj) in q.iter_mut().enumerate() {
                    *qj = (((qh >> j) & 1) as u8) << 4;
                }
                (&b[6..22], -16.0 * d)
            }
            Kind::Q4_1 => (&b[4..20], f16_at(b, 2)),
        };
        for j in 0..BLOCK / 2 {
            q[j] |= nibbles[j] & 0x0F;
            q[j + BLOCK / 2] |= nibbles[j] >> 4;
        }
        out.push(Unpacked { q, d, offset });
    }
}

/// Dot product of an unpacked weight row with a row of 8-bit activations.
fn dot(w: &[Unpacked], a: &[BlockQ8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            return unsafe { avx2::dot(w, a) };
        }
    }
    dot_scalar(w, a)
}

/// Dot product straight from packed weight blocks (decode: one activation row).
fn dot_packed(kind: Kind, w: &[u8], a: &[BlockQ8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked above); `w` holds whole blocks.
            return unsafe { avx2::dot_packed(kind, w, a) };
        }
    }
    let mut unpacked = Vec::with_capacity(a.len());
    unpack_row(kind, w, &mut unpacked);
    dot_scalar(&unpacked, a)
}

fn dot_scalar(w: &[Unpacked], a: &[BlockQ8]) -> f32 {
    let mut total = 0f32;
    for (w, a) in w.iter().zip(a) {
        let acc: i32 =
            w.q.iter()
                .zip(&a.q)
                .map(|(&x, &y)| x as i32 * y as i32)
                .sum();
        total += w.d * a.d * acc as f32 + w.offset * a.s;
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ8, Kind, Unpacked};
    use half::f16;
    use std::arch::x86_64::*;

    /// The 32 nibbles of 16 bytes as 32 bytes: low nibbles first, then high nibbles.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let x = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16(x, 4), x);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// Byte j is 0x10 where bit j of `bits` is set.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn fifth_bits(bits: u32) -> __m256i {
        // Broadcast byte j/8 of `bits` to byte j, then test bit j%8 by OR-ing all other bits in.
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

    /// Products of unsigned bytes `u` and signed bytes `s`, summed in groups of four (i32).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot_bytes(u: __m256i, s: __m256i) -> __m256i {
        // Builds for a CPU with AVX-512 VNNI (target-cpu=native here) fuse the two steps.
        #[cfg(all(target_feature = "avx512vnni", target_feature = "avx512vl"))]
        return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
        // u8 x i8 pairs summed to i16 (no overflow: 31 * 127 * 2 < 2^15), then to i32.
        #[cfg(not(all(target_feature = "avx512vnni", target_feature = "avx512vl")))]
        return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_packed(kind: Kind, w: &[u8], a: &[BlockQ8]) -> f32 {
        match kind {
            Kind::Q5_0 => dot_packed_with::<true>(w, a),
            Kind::Q4_1 => dot_packed_with::<false>(w, a),
        }
    }

    /// One block's products and scales; `Q5` selects the block layout at compile time.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block<const Q5: bool>(b: *const u8, a: &BlockQ8) -> (__m256, f32, f32) {
        let half_at =
            |at: usize| f16::from_bits(std::ptr::read_unaligned(b.add(at) as *const u16)).to_f32();
        let d = half_at(0);
        let (u, offset) = if Q5 {
            let qh = u32::from_le(std::ptr::read_unaligned(b.add(2) as *const u32));
            (
                _mm256_or_si256(nibbles(b.add(6)), fifth_bits(qh)),
                -16.0 * d,
            )
        } else {
            (nibbles(b.add(4)), half_at(2))
        };
        let s = _mm256_loadu_si256(a.q.as_ptr() as *const __m256i);
        (_mm256_cvtepi32_ps(dot_bytes(u, s)), d * a.d, offset * a.s)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_packed_with<const Q5: bool>(w: &[u8], a: &[BlockQ8]) -> f32 {
        let size = if Q5 { 22 } else { 20 };
        // The pointer reads below stay inside `w`: it holds one block per activation block.
        assert!(w.len() >= a.len() * size);
        // Two independent accumulator chains hide the fused multiply-add latency.
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut off0, mut off1) = (0f32, 0f32);
        let pairs = a.len() / 2;
        for i in 0..pairs {
            let (p0, s0, o0) = block::<Q5>(w.as_ptr().add(2 * i * size), &a[2 * i]);
            let (p1, s1, o1) = block::<Q5>(w.as_ptr().add((2 * i + 1) * size), &a[2 * i + 1]);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s0), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(s1), p1, acc1);
            off0 += o0;
            off1 += o1;
        }
        if a.len() % 2 == 1 {
            let i = a.len() - 1;
            let (p, s, o) = block::<Q5>(w.as_ptr().add(i * size), &a[i]);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s), p, acc0);
            off0 += o;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + off0 + off1
    }

    /// The same sums in the same order as [`dot_packed`], so that a row's result does not
    /// depend on which kernel its batch size selects.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot(w: &[Unpacked], a: &[BlockQ8]) -> f32 {
        let block = |w: &Unpacked, a: &BlockQ8| {
            let u = _mm256_load_si256(w.q.as_ptr() as *const __m256i);
            let s = _mm256_loadu_si256(a.q.as_ptr() as *const __m256i);
            (
                _mm256_cvtepi32_ps(dot_bytes(u, s)),
                w.d * a.d,
                w.offset * a.s,
            )
        };
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let (mut off0, mut off1) = (0f32, 0f32);
        for (w, a) in w.chunks_exact(2).zip(a.chunks_exact(2)) {
            let (p0, s0, o0) = block(&w[0], &a[0]);
            let (p1, s1, o1) = block(&w[1], &a[1]);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s0), p0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_set1_ps(s1), p1, acc1);
            off0 += o0;
            off1 += o1;
        }
        if a.len() % 2 == 1 {
            let (p, s, o) = block(&w[a.len() - 1], &a[a.len() - 1]);
            acc0 = _mm256_fmadd_ps(_mm256_set1_ps(s), p, acc0);
            off0 += o;
        }
        hsum(_mm256_add_ps(acc0, acc1)) + off0 + off1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(rows: usize, cols: usize, seed: u32) -> Tensor {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let h = (i as u32 ^ seed)
                    .wrapping_mul(2_654_435_761)
                    .rotate_left(13)
                    .wrapping_mul(2_246_822_519);
                (h as f32 / u32::MAX as f32 - 0.5) * 2.0
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
    }

    #[test]
    fn kernels_match_candle_and_the_exact_product() {
        for dtype in [GgmlDType::Q5_0, GgmlDType::Q4_1] {
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
                let exact = x
                    .broadcast_matmul(&q.dequantize(&Device::Cpu).unwrap().t().unwrap())
                    .unwrap();
                let again = QTensor::quantize(&weights(70, 256, 1), dtype).unwrap();
                let candle = candle_core::quantized::QMatMul::from_qtensor(again)
                    .unwrap()
                    .forward(&x)
                    .unwrap();
                let max_diff = |a: &Tensor, b: &Tensor| {
                    (a - b)
                        .unwrap()
                        .abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                };
                let scale = exact
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    max_diff(&ours, &exact) < 0.02 * scale,
                    "{dtype:?}: {} vs scale {scale}",
                    max_diff(&ours, &exact)
                );
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
        for dtype in [GgmlDType::Q5_0, GgmlDType::Q4_1] {
            let q = QTensor::quantize(&weights(3, 128, 3), dtype).unwrap();
            let m = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let x: Vec<f32> = weights(1, 128, 4).flatten_all().unwrap().to_vec1().unwrap();
            let a: Vec<BlockQ8> = x.chunks(BLOCK).map(|b| quantize_block(b, m.kind)).collect();
            let mut w = Vec::new();
            unpack_row(m.kind, &m.data[..4 * m.kind.block_bytes()], &mut w);
            let scalar = dot_scalar(&w, &a);
            assert!(
                (dot(&w, &a) - scalar).abs() < 1e-4 * scalar.abs().max(1.0),
                "{dtype:?}"
            );
            let packed = dot_packed(m.kind, &m.data[..4 * m.kind.block_bytes()], &a);
            assert!(
                (packed - scalar).abs() < 1e-4 * scalar.abs().max(1.0),
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn a_row_gets_the_same_bits_alone_or_in_a_batch() {
        // Decode (one row) and prefill (many rows) use different kernels; rows must not notice.
        for dtype in [GgmlDType::Q5_0, GgmlDType::Q4_1] {
            let q = QTensor::quantize(&weights(40, 320, 6), dtype).unwrap();
            let m = QuantMatrix::from_qtensor(&q).unwrap().unwrap();
            let batch = (weights(4, 320, 7) * 2.0).unwrap();
            let together: Vec<Vec<f32>> = m.forward(&batch).unwrap().to_vec2().unwrap();
            for (r, row) in together.iter().enumerate() {
                let alone: Vec<Vec<f32>> = m
                    .forward(&batch.narrow(0, r, 1).unwrap())
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                assert_eq!(&alone[0], row, "{dtype:?} row {r}");
            }
        }
    }

    #[test]
    fn other_types_are_left_to_candle() {
        let q = QTensor::quantize(&weights(4, 64, 5), GgmlDType::Q8_0).unwrap();
        assert!(QuantMatrix::from_qtensor(&q).unwrap().is_none());
    }
}
