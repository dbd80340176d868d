//! The inference engine: decoder models from GGUF files or Hugging Face checkpoint folders, with intervention points on the residual stream.
//!
//! ```text
//! tokens -> embeddings -[point 0]-> block 0 -[point 1]-> ... block n-1 -[point n]-> norm -> logits
//! ```
//! See [`hooks`] for what can happen at a point.

mod attention;
pub mod batcher;
mod gemma3;
pub mod generate;
pub mod gguf;
pub mod hf;
pub mod hooks;
pub mod kv_cache;
mod layers;
mod llama;
pub mod model;
mod moe;
mod quant;
pub mod thinking;
pub mod tiny;
mod weights;

pub use batcher::{Batcher, Interventions, Sequence};
pub use generate::{
    generate, prefill, FinishReason, Flow, GenerateOptions, Generation, Padding, Request, Sampled,
    Sampling, SharedPrefix,
};
pub use hooks::{Action, Captured, Hooks, Intervention, Positions, Rows};
pub use layers::log_softmax;
pub use model::{read_tokenizer, Architecture, Config, Logits, Model};
pub use thinking::ThinkingBudget;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: not a usable GGUF model: {detail}")]
    BadFile { path: PathBuf, detail: String },
    #[error("{path}: not a usable Hugging Face checkpoint folder: {detail}")]
    BadCheckpoint { path: PathBuf, detail: String },
    #[error("unsupported architecture '{0}' (supported: {supported})", supported = Architecture::SUPPORTED)]
    UnsupportedArchitecture(String),
    #[error("tensor '{name}' has type {dtype}, which the engine cannot run (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K); requantize the file")]
    UnsupportedTensorType { name: String, dtype: String },
    #[error("prompt of {prompt} tokens plus {new_tokens} new tokens exceeds the model's context of {context} tokens; shorten the prompt or lower --max-tokens")]
    ContextLength {
        prompt: usize,
        new_tokens: usize,
        context: usize,
    },
    #[error("invalid intervention: {0}")]
    BadIntervention(String),
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error(transparent)]
    Tokenizer(#[from] refusal_steer_tokenizer::TokenizerError),
    #[error("tensor operation failed: {0}")]
    Tensor(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EngineError>;
