//! Where a decoder's tensors come from. The blocks ask for tensors by their GGUF names
//! (`blk.3.attn_q.weight`); each source answers in the engine's conventions, whatever its
//! own: a Hugging Face checkpoint renames, permutes and shifts its tensors as llama.cpp's
//! converter would have, so one loader per block serves every source.

use crate::quant::Matrix;
use crate::Result;
use candle_core::quantized::QMatMul;
use candle_core::Tensor;
use std::path::Path;

pub trait Weights {
    /// The file or folder the tensors come from, for error messages.
    fn origin(&self) -> &Path;

    fn has(&self, name: &str) -> bool;

    /// A weight used as a matrix `[out, in]`.
    fn matrix(&mut self, name: &str) -> Result<Matrix>;

    /// The token embedding table, whose rows are looked up.
    fn embedding(&mut self, name: &str) -> Result<QMatMul>;

    /// A small weight (norm, bias, rope factors) as f32.
    fn vector(&mut self, name: &str) -> Result<Tensor>;

    /// The `count` matrices `[out, in]` of a stack of experts (`[count, out, in]` in GGUF).
    fn experts(&mut self, name: &str, count: usize) -> Result<Vec<Matrix>>;

    /// The output projection; small models tie it to the token embeddings.
    fn output_head(&mut self) -> Result<Matrix> {
        let name = if self.has("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        self.matrix(name)
    }
}

/// A source that adds up the bytes of the matrices loaded through it.
pub struct Counted<'a> {
    inner: &'a mut dyn Weights,
    pub matrix_bytes: usize,
}

impl<'a> Counted<'a> {
    pub fn new(inner: &'a mut dyn Weights) -> Self {
        Self {
            inner,
            matrix_bytes: 0,
        }
    }
}

impl Weights for Counted<'_> {
    fn origin(&self) -> &Path {
        self.inner.origin()
    }

    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }

    fn matrix(&mut self, name: &str) -> Result<Matrix> {
        let m = self.inner.matrix(name)?;
        self.matrix_bytes += m.bytes();
        Ok(m)
    }

    fn embedding(&mut self, name: &str) -> Result<QMatMul> {
        self.inner.embedding(name)
    }

    fn vector(&mut self, name: &str) -> Result<Tensor> {
        self.inner.vector(name)
    }

    fn experts(&mut self, name: &str, count: usize) -> Result<Vec<Matrix>> {
        let experts = self.inner.experts(name, count)?;
        self.matrix_bytes += experts.iter().map(Matrix::bytes).sum::<usize>();
        Ok(experts)
    }
}
