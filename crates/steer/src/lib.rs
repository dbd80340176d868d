//! Steering-vector math and files, independent of the engine.
//!
//! - [`classify`]: a class-balanced ridge classifier over several points' vectors (the gate).
//! - [`fit`](mod@fit): one layer's refusal direction from labelled activations (MD, RMD, WRMD, PCA).
//! - [`separability`]: how well a direction separates refusals from compliances (AUC,
//!   Pearson r, k-fold held-out AUC for ranking layers).
//! - [`linalg`]: the dot products, cosines, means, principal axes and ridge solve they all use.
//! - [`fit_metadata`]: what fitting measured per point, stored once in the vector file.
//! - [`vectors`]: the project's steering-vector file (safetensors), one vector per point.
//! - [`protect`]: keep a protected behaviour still by removing its directions from a vector.
//! - [`control_vector`]: llama.cpp control-vector GGUF export and import.
//! - [`analysis`]: per-point held-out separability, norms, angles and dimensionality of a
//!   vector file, with its JSON / Markdown / SVG report.
//!
//! Point numbering follows the engine: point 0 is the embeddings, point `p >= 1` the output
//! of block `p - 1`.

pub mod analysis;
pub mod classify;
pub mod control_vector;
pub mod fit;
pub mod fit_metadata;
pub mod linalg;
pub mod protect;
mod rng;
pub mod separability;
#[cfg(test)]
mod synthetic;
pub mod vectors;

pub use control_vector::{
    export_control_vector, import_control_vector, ControlVector, ControlVectorError,
};
pub use fit::{fit, Class, FitError, FitReport, FittedVector, Method, Ridge, Samples};
pub use fit_metadata::{Balance, FitMetadata, PointFit, Protection};
pub use separability::{
    auc, best_points, k_fold_auc, k_fold_heldout, pearson, projections, HeldOut, SeparabilityError,
};
pub use vectors::{SteeringVectors, VectorFileError};
