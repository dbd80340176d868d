//! The steering-vector file: one vector per residual-stream point, as safetensors.
//!
//! One F32 tensor named `vectors` of shape `[n_points, d]`. The safetensors header's
//! `__metadata__` holds where the activations came from (model, model_sha256, position,
//! format: strings, as the activations file gives them) and, under `fit`, the typed
//! [`FitMetadata`] as JSON. Point 0 is the embeddings, point `p >= 1` the output of block
//! `p - 1` (llama.cpp's `direction.N` is our point `N + 1`). The vectors point from compliance
//! to refusal: a negative strength removes refusals.

use std::collections::{BTreeMap, HashMap};

use crate::fit_metadata::FitMetadata;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use thiserror::Error;

const TENSOR_NAME: &str = "vectors";
const FIT_KEY: &str = "fit";
const LEGACY_FIT_KEYS: [&str; 12] = [
    "method",
    "ridge",
    "lambda_per_point",
    "norm_per_point",
    "residual_norm_per_point",
    "heldout_auc_per_point",
    "recommended_points",
    "n_refusal",
    "n_compliance",
    "sign",
    "protected_cosine_per_point",
    "surviving_fraction_per_point",
];

#[derive(Debug, Clone, PartialEq)]
pub struct SteeringVectors {
    /// Row-major `[n_points, d]`.
    pub vectors: Vec<f32>,
    pub n_points: usize,
    pub d: usize,
    /// Where the activations came from (model, model_sha256, position, format).
    pub metadata: BTreeMap<String, String>,
    /// How they were fitted; `None` for vectors made elsewhere.
    pub fit: Option<FitMetadata>,
}

#[derive(Debug, Error)]
pub enum VectorFileError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("steering vectors need at least one point of dimension >= 1, got {n_points} points of dimension {d}")]
    Empty { n_points: usize, d: usize },
    #[error("steering vectors hold {len} values, but {n_points} points of dimension {d} need {}", n_points * d)]
    Length {
        len: usize,
        n_points: usize,
        d: usize,
    },
    #[error(
        "steering vector of point {point} has {value} at index {index}; vectors must be finite"
    )]
    NonFinite {
        point: usize,
        index: usize,
        value: f32,
    },
    #[error("the fit metadata describes {found} points, but the vectors have {n_points}")]
    FitPoints { found: usize, n_points: usize },
    #[error("these steering vectors carry no fit metadata (they were imported from llama.cpp, or fitted by an earlier version), so they have no {needed}; refit them with `refusal-steer fit`, or {instead}")]
    NotFitted {
        needed: &'static str,
        instead: &'static str,
    },
    #[error("steering vectors have {have_points} points of dimension {have_d}, but the model has {want_points} points (blocks + 1) of dimension {want_d}; use vectors fitted on this model")]
    WrongModel {
        have_points: usize,
        have_d: usize,
        want_points: usize,
        want_d: usize,
    },
}

impl SteeringVectors {
    /// Checks that `vectors` is `n_points × d` and finite.
    pub fn new(
        vectors: Vec<f32>,
        n_points: usize,
        d: usize,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self, VectorFileError> {
        let this = Self {
            vectors,
            n_points,
            d,
            metadata,
            fit: None,
        };
        this.validate()?;
        Ok(this)
    }

    /// These vectors with how they were fitted (one entry per point).
    pub fn with_fit(mut self, fit: FitMetadata) -> Result<Self, VectorFileError> {
        self.fit = Some(fit);
        self.validate()?;
        Ok(self)
    }

    /// The fit metadata, or an error naming what is `needed` from it and what to do `instead`.
    pub fn require_fit(
        &self,
        needed: &'static str,
        instead: &'static str,
    ) -> Result<&FitMetadata, VectorFileError> {
        self.fit
            .as_ref()
            .ok_or(VectorFileError::NotFitted { needed, instead })
    }

    /// Checks the invariants [`SteeringVectors::new`] establishes (the fields are public).
    pub(crate) fn validate(&self) -> Result<(), VectorFileError> {
        let (n_points, d) = (self.n_points, self.d);
        if n_points == 0 || d == 0 {
            return Err(VectorFileError::Empty { n_points, d });
        }
        if Some(self.vectors.len()) != n_points.checked_mul(d) {
            return Err(VectorFileError::Length {
                len: self.vectors.len(),
                n_points,
                d,
            });
        }
        if let Some(i) = self.vectors.iter().position(|v| !v.is_finite()) {
            return Err(VectorFileError::NonFinite {
                point: i / d,
                index: i % d,
                value: self.vectors[i],
            });
        }
        match &self.fit {
            Some(fit) if fit.points.len() != n_points => Err(VectorFileError::FitPoints {
                found: fit.points.len(),
                n_points,
            }),
            _ => Ok(()),
        }
    }

    /// The vector at point `p`, or `None` past the last point.
    pub fn point(&self, p: usize) -> Option<&[f32]> {
        self.vectors
            .get(p.checked_mul(self.d)?..(p + 1).checked_mul(self.d)?)
    }

    /// Mutable access to the vector at point `p`, or `None` past the last point.
    pub fn point_mut(&mut self, p: usize) -> Option<&mut [f32]> {
        let d = self.d;
        self.vectors
            .get_mut(p.checked_mul(d)?..(p + 1).checked_mul(d)?)
    }

    /// Errors unless these vectors fit a model with `n_points` points (blocks + 1) of width `d`.
    pub fn check_dims(&self, n_points: usize, d: usize) -> Result<(), VectorFileError> {
        if (self.n_points, self.d) == (n_points, d) {
            Ok(())
        } else {
            Err(VectorFileError::WrongModel {
                have_points: self.n_points,
                have_d: self.d,
                want_points: n_points,
                want_d: d,
            })
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), VectorFileError> {
        self.validate()?;
        let invalid = |reason: String| VectorFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let bytes: Vec<u8> = self.vectors.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![self.n_points, self.d], &bytes)
            .map_err(|e| invalid(format!("cannot describe the tensor: {e}")))?;
        let mut metadata: HashMap<String, String> = self.metadata.clone().into_iter().collect();
        if let Some(fit) = &self.fit {
            let json = serde_json::to_string(fit)
                .map_err(|e| invalid(format!("cannot serialise the fit metadata: {e}")))?;
            metadata.insert(FIT_KEY.to_string(), json);
        }
        let file = safetensors::serialize([(TENSOR_NAME, view)], Some(metadata))
            .map_err(|e| invalid(format!("cannot serialise: {e}")))?;
        // Through a temporary file, so a kill never leaves a torn vector file behind.
        let tmp = path.with_extension("safetensors.tmp");
        let io = |source| VectorFileError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::write(&tmp, file).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    /// Reads and validates a file written by [`SteeringVectors::save`] (or any safetensors file
    /// with a finite 2-D F32 tensor named `vectors`).
    pub fn load(path: &Path) -> Result<Self, VectorFileError> {
        let bytes = std::fs::read(path).map_err(|source| VectorFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes).map_err(|reason| VectorFileError::Invalid {
            path: path.to_path_buf(),
            reason,
        })
    }

    fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| {
            format!(
                "not a valid safetensors file ({e}); was it written by `SteeringVectors::save`?"
            )
        })?;
        let tensor = tensors.tensor(TENSOR_NAME).map_err(|_| {
            format!(
                "no tensor named {TENSOR_NAME:?} (found {:?}); this is not a steering-vector file",
                tensors.names()
            )
        })?;
        if tensor.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor {TENSOR_NAME:?} has dtype {:?}, expected F32",
                tensor.dtype()
            ));
        }
        let &[n_points, d] = tensor.shape() else {
            return Err(format!(
                "tensor {TENSOR_NAME:?} has shape {:?}, expected 2 dimensions [n_points, d]",
                tensor.shape()
            ));
        };
        let vectors = tensor
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (_, header) =
            SafeTensors::read_metadata(bytes).map_err(|e| format!("unreadable header ({e})"))?;
        let mut metadata: BTreeMap<String, String> = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        let fit = match metadata.remove(FIT_KEY) {
            Some(json) => Some(serde_json::from_str(&json).map_err(|e| {
                format!("its fit metadata is not understood ({e}); refit it with this version")
            })?),
            // Earlier versions stored the fit as loose strings ("method", "ridge", ...): the
            // vectors still steer, but what was measured is not read back.
            None => {
                metadata.retain(|key, _| !LEGACY_FIT_KEYS.contains(&key.as_str()));
                None
            }
        };
        let vectors = Self::new(vectors, n_points, d, metadata).map_err(|e| e.to_string())?;
        match fit {
            Some(fit) => vectors.with_fit(fit).map_err(|e| e.to_string()),
            None => Ok(vectors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit_metadata::{PointFit, Protection};
    use crate::{Method, Ridge};

    fn example() -> SteeringVectors {
        // Values chosen to exercise the bits: subnormals, negative zero, extremes.
        let values = vec![
            0.0,
            -0.0,
            1.5,
            f32::MIN_POSITIVE / 8.0,
            f32::MAX,
            f32::MIN,
            1e-30,
            -3.25,
            7.0,
        ];
        let metadata = BTreeMap::from([("model".to_string(), "tiny".to_string())]);
        let point = |auc| PointFit {
            norm: 1.0,
            residual_norm: 2.0,
            lambda: Some(0.1),
            heldout_auc: auc,
            protected: Some(Protection {
                cosine: 0.5,
                surviving_fraction: 0.75,
            }),
        };
        let fit = FitMetadata {
            method: Method::Wrmd,
            ridge: Ridge::Relative(0.1),
            n_refusal: 2,
            n_compliance: 3,
            balance: None,
            points: vec![point(None), point(Some(0.5)), point(Some(0.75))],
        };
        SteeringVectors::new(values, 3, 3, metadata)
            .unwrap()
            .with_fit(fit)
            .unwrap()
    }

    #[test]
    fn round_trip_is_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.safetensors");
        let original = example();
        original.save(&path).unwrap();
        let loaded = SteeringVectors::load(&path).unwrap();
        let bits = |v: &SteeringVectors| v.vectors.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&loaded), bits(&original));
        assert_eq!(
            (loaded.n_points, loaded.d, &loaded.metadata, &loaded.fit),
            (3, 3, &original.metadata, &original.fit)
        );
    }

    #[test]
    fn fit_metadata_must_cover_every_point_and_be_of_this_version() {
        let mut fit = example().fit.unwrap();
        fit.points.pop();
        let unfitted = SteeringVectors::new(vec![0.0; 9], 3, 3, BTreeMap::new()).unwrap();
        assert!(matches!(
            unfitted.clone().with_fit(fit),
            Err(VectorFileError::FitPoints {
                found: 2,
                n_points: 3
            })
        ));
        let err = unfitted.require_fit("residual norms", "use --alpha-profile uniform");
        assert!(err.unwrap_err().to_string().contains("no residual norms"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.safetensors");
        let old = BTreeMap::from([("method".to_string(), "wrmd".to_string())]);
        SteeringVectors::new(vec![0.0; 9], 3, 3, old)
            .unwrap()
            .save(&path)
            .unwrap();
        // A file of an earlier version still steers; what it measured is not read back.
        let loaded = SteeringVectors::load(&path).unwrap();
        assert!(loaded.fit.is_none() && loaded.metadata.is_empty());
    }

    #[test]
    fn point_accessors() {
        let mut v = example();
        assert_eq!(
            v.point(1).unwrap(),
            &[f32::MIN_POSITIVE / 8.0, f32::MAX, f32::MIN]
        );
        assert!(v.point(3).is_none());
        assert!(v.point(usize::MAX).is_none());
        v.point_mut(2).unwrap().copy_from_slice(&[1.0, 2.0, 3.0]);
        assert_eq!(v.point(2).unwrap(), &[1.0, 2.0, 3.0]);
    }

    #[test]
    fn construction_and_dims_are_checked() {
        assert!(matches!(
            SteeringVectors::new(vec![0.0; 5], 2, 3, BTreeMap::new()),
            Err(VectorFileError::Length { .. })
        ));
        assert!(matches!(
            SteeringVectors::new(vec![], 0, 3, BTreeMap::new()),
            Err(VectorFileError::Empty { .. })
        ));
        assert!(matches!(
            SteeringVectors::new(vec![0.0, f32::INFINITY], 1, 2, BTreeMap::new()),
            Err(VectorFileError::NonFinite {
                point: 0,
                index: 1,
                ..
            })
        ));
        let v = example();
        assert!(v.check_dims(3, 3).is_ok());
        let err = v.check_dims(25, 896).unwrap_err();
        assert!(err.to_string().contains("3 points of dimension 3"), "{err}");
    }

    #[test]
    fn loading_bad_files_names_the_file_and_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let expect = |path: &Path, needle: &str| {
            let err = SteeringVectors::load(path).unwrap_err().to_string();
            assert!(
                err.contains(&path.display().to_string()) && err.contains(needle),
                "{err}"
            );
        };
        let serialise = |name: &str, dtype: Dtype, shape: Vec<usize>, data: &[u8]| {
            let view = TensorView::new(dtype, shape, data).unwrap();
            safetensors::serialize([(name, view)], None).unwrap()
        };

        expect(&dir.path().join("missing.safetensors"), "No such file");
        expect(
            &write("garbage", b"not a safetensors file at all"),
            "not a valid safetensors file",
        );
        let good = {
            let path = dir.path().join("good");
            example().save(&path).unwrap();
            std::fs::read(&path).unwrap()
        };
        expect(
            &write("truncated", &good[..good.len() - 5]),
            "not a valid safetensors file",
        );
        expect(
            &write("other", &serialise("weights", Dtype::F32, vec![1], &[0; 4])),
            "no tensor named \"vectors\"",
        );
        expect(
            &write(
                "f16",
                &serialise("vectors", Dtype::F16, vec![1, 2], &[0; 4]),
            ),
            "dtype F16",
        );
        expect(
            &write("1d", &serialise("vectors", Dtype::F32, vec![2], &[0; 8])),
            "expected 2 dimensions",
        );
        let nan = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>();
        expect(
            &write("nan", &serialise("vectors", Dtype::F32, vec![1, 2], &nan)),
            "NaN at index 1",
        );
    }
}
