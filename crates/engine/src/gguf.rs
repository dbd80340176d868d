//! Reading a GGUF file: metadata with clear errors, and weights by their checkpoint names.

use crate::quant::Matrix;
use crate::weights::Weights;
use crate::{EngineError, Result};
use candle_core::quantized::ggml_file::qtensor_from_ggml;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Tensor types the engine loads (every type the catalogue's files use, and their siblings).
pub const SUPPORTED_TYPES: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |detail: String| EngineError::BadFile {
            path: path.to_path_buf(),
            detail,
        };
        let file = File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| bad(e.to_string()))?;
        for (name, info) in &content.tensor_infos {
            if !SUPPORTED_TYPES.contains(&info.ggml_dtype) {
                return Err(EngineError::UnsupportedTensorType {
                    name: name.clone(),
                    dtype: format!("{:?}", info.ggml_dtype),
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.content.metadata
    }

    pub fn architecture(&self) -> Result<String> {
        Ok(self.string("general.architecture")?.to_string())
    }

    pub fn string(&self, key: &str) -> Result<&str> {
        let v = self.value(key)?;
        v.to_string()
            .map(String::as_str)
            .map_err(|e| self.bad_meta(key, e))
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        let v = self.value(key)?;
        v.to_u64()
            .map(|x| x as usize)
            .or_else(|_| v.to_u32().map(|x| x as usize))
            .map_err(|e| self.bad_meta(key, e))
    }

    pub fn f32(&self, key: &str) -> Result<f32> {
        let v = self.value(key)?;
        v.to_f32().map_err(|e| self.bad_meta(key, e))
    }

    /// An array of booleans; `None` when the key is absent or holds no array.
    pub fn bools(&self, key: &str) -> Result<Option<Vec<bool>>> {
        let Some(Value::Array(items)) = self.content.metadata.get(key) else {
            return Ok(None);
        };
        items
            .iter()
            .map(|v| v.to_bool().map_err(|e| self.bad_meta(key, e)))
            .collect::<Result<_>>()
            .map(Some)
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        if self.content.metadata.contains_key(key) {
            self.usize(key)
        } else {
            Ok(default)
        }
    }

    pub fn f32_or(&self, key: &str, default: f32) -> Result<f32> {
        if self.content.metadata.contains_key(key) {
            self.f32(key)
        } else {
            Ok(default)
        }
    }

    fn value(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| EngineError::BadFile {
                path: self.path.clone(),
                detail: format!("metadata key '{key}' is missing"),
            })
    }

    fn bad_meta(&self, key: &str, e: candle_core::Error) -> EngineError {
        EngineError::BadFile {
            path: self.path.clone(),
            detail: format!("metadata key '{key}': {e}"),
        }
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    pub fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.has_tensor(name) {
            return Err(EngineError::BadFile {
                path: self.path.clone(),
                detail: format!("tensor '{name}' is missing"),
            });
        }
        self.content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| EngineError::BadFile {
                path: self.path.clone(),
                detail: format!("tensor '{name}': {e}"),
            })
    }
}

impl Weights for GgufFile {
    fn origin(&self) -> &Path {
        &self.path
    }

    fn has(&self, name: &str) -> bool {
        self.has_tensor(name)
    }

    /// Stays quantized.
    fn matrix(&mut self, name: &str) -> Result<Matrix> {
        Matrix::new(self.qtensor(name)?)
    }

    /// candle's quantized lookup serves.
    fn embedding(&mut self, name: &str) -> Result<QMatMul> {
        Ok(QMatMul::from_qtensor(self.qtensor(name)?)?)
    }

    fn vector(&mut self, name: &str) -> Result<Tensor> {
        Ok(self.qtensor(name)?.dequantize(&Device::Cpu)?)
    }

    /// Each expert's rows are one contiguous run of the stack's blocks.
    fn experts(&mut self, name: &str, count: usize) -> Result<Vec<Matrix>> {
        let stack = self.qtensor(name)?;
        let bad = |detail: String| EngineError::BadFile {
            path: self.path.clone(),
            detail: format!("tensor '{name}': {detail}"),
        };
        let (n, rows, cols) = stack.shape().dims3().map_err(|e| bad(e.to_string()))?;
        if n != count {
            return Err(bad(format!("{n} experts, but the model has {count}")));
        }
        let data = stack.data()?;
        let each = data.len() / n;
        data.chunks(each)
            .map(|bytes| {
                let t = qtensor_from_ggml(stack.dtype(), bytes, vec![rows, cols], &Device::Cpu)?;
                Matrix::new(t)
            })
            .collect()
    }
}
