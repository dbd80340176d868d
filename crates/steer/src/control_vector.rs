//! llama.cpp control vectors (`--control-vector`): GGUF files with one F32 tensor
//! `direction.N` per steered layer, added (times the user's scale) to the output of block N.
//!
//! Our point `p` is the output of block `p - 1`, so it becomes `direction.(p-1)`. llama.cpp has
//! no `direction.0` and cannot steer the embeddings, so our points 0 and 1 cannot be exported.

mod gguf;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::vectors::{SteeringVectors, VectorFileError};
use gguf::MetaValue;

const ARCHITECTURE: &str = "controlvector";
const ARCHITECTURE_KEY: &str = "general.architecture";
const MODEL_HINT_KEY: &str = "controlvector.model_hint";
const LAYER_COUNT_KEY: &str = "controlvector.layer_count";
const DIRECTION_PREFIX: &str = "direction.";
/// Metadata key under which an imported model hint is kept in [`SteeringVectors::metadata`].
pub const MODEL_HINT_METADATA: &str = "model_hint";

/// The directions of a control vector, keyed by our point (llama.cpp's `direction.N` is point
/// `N + 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlVector {
    pub model_hint: Option<String>,
    pub d: usize,
    pub directions: BTreeMap<usize, Vec<f32>>,
}

#[derive(Debug, Error)]
pub enum ControlVectorError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Invalid { path: PathBuf, reason: String },
    #[error("point {point} cannot go into a llama.cpp control vector: llama.cpp steers only the outputs of blocks 1..{last_block}, our points 2..={last_point} (it cannot steer the embeddings, point 0, or block 0's output, point 1)", last_block = last_point - 1)]
    UnrepresentablePoint { point: usize, last_point: usize },
    #[error("no points to export; choose at least one of the points 2..={last_point}")]
    NoPoints { last_point: usize },
    #[error("the scale {alpha} is not finite")]
    BadScale { alpha: f32 },
    #[error("{alpha} times the vector of point {point} overflows f32; use a smaller scale")]
    Overflow { alpha: f32, point: usize },
    #[error("the control vector steers point {point}, but a model with {n_points} points ends at point {}; use a control vector made for this model", n_points - 1)]
    PointBeyondModel { point: usize, n_points: usize },
    #[error(transparent)]
    Vectors(#[from] VectorFileError),
}

/// Writes `alpha · v_p` for each point `p` in `points` as llama.cpp's `direction.(p-1)`.
///
/// `controlvector.layer_count` is the number of directions written, as repeng and llama.cpp's
/// cvector-generator write it (llama.cpp itself does not read it).
pub fn export_control_vector(
    path: &Path,
    vectors: &SteeringVectors,
    alpha: f32,
    points: &[usize],
    model_hint: &str,
) -> Result<(), ControlVectorError> {
    vectors.validate()?;
    let last_point = vectors.n_points - 1;
    if !alpha.is_finite() {
        return Err(ControlVectorError::BadScale { alpha });
    }
    let points: BTreeSet<usize> = points.iter().copied().collect();
    if points.is_empty() {
        return Err(ControlVectorError::NoPoints { last_point });
    }
    let mut tensors = Vec::with_capacity(points.len());
    for point in points {
        let vector = vectors
            .point(point)
            .filter(|_| point >= 2)
            .ok_or(ControlVectorError::UnrepresentablePoint { point, last_point })?;
        let scaled: Vec<f32> = vector.iter().map(|v| alpha * v).collect();
        if scaled.iter().any(|v| !v.is_finite()) {
            return Err(ControlVectorError::Overflow { alpha, point });
        }
        tensors.push((format!("{DIRECTION_PREFIX}{}", point - 1), scaled));
    }
    let metadata = [
        (ARCHITECTURE_KEY, MetaValue::Str(ARCHITECTURE)),
        (MODEL_HINT_KEY, MetaValue::Str(model_hint)),
        (LAYER_COUNT_KEY, MetaValue::U32(tensors.len() as u32)),
    ];
    std::fs::write(path, gguf::write(&metadata, &tensors)).map_err(|source| {
        ControlVectorError::Io {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Reads a control vector written by [`export_control_vector`], repeng or llama.cpp's
/// cvector-generator. `controlvector.model_hint` may be missing; every tensor must be a finite
/// 1-D F32 `direction.N` with `N >= 1`, all of the same length.
pub fn import_control_vector(path: &Path) -> Result<ControlVector, ControlVectorError> {
    let bytes = std::fs::read(path).map_err(|source| ControlVectorError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&bytes).map_err(|reason| ControlVectorError::Invalid {
        path: path.to_path_buf(),
        reason,
    })
}

fn parse(bytes: &[u8]) -> Result<ControlVector, String> {
    let gguf = gguf::read(bytes)?;
    if let Some(architecture) = gguf
        .strings
        .get(ARCHITECTURE_KEY)
        .filter(|a| *a != ARCHITECTURE)
    {
        return Err(format!(
            "{ARCHITECTURE_KEY} is {architecture:?}, not {ARCHITECTURE:?}: this is a model file, not a control vector"
        ));
    }
    let first = gguf
        .tensors
        .first()
        .ok_or("the file has no direction tensors")?;
    let (d, first_name) = (first.values.len(), first.name.clone());
    if d == 0 {
        return Err(format!("tensor {first_name:?} is empty"));
    }
    let mut directions = BTreeMap::new();
    for tensor in gguf.tensors {
        // Block N's output is our point N + 1.
        let point = tensor
            .name
            .strip_prefix(DIRECTION_PREFIX)
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&n| n >= 1)
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| {
                format!("tensor {:?} is not a control-vector direction; expected direction.N with N >= 1", tensor.name)
            })?;
        if tensor.values.len() != d {
            return Err(format!(
                "tensor {:?} has {} values but {first_name:?} has {d}; all directions must have the model's width",
                tensor.name,
                tensor.values.len(),
            ));
        }
        if let Some(index) = tensor.values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "tensor {:?} has {} at index {index}; directions must be finite",
                tensor.name, tensor.values[index]
            ));
        }
        if directions.insert(point, tensor.values).is_some() {
            return Err(format!(
                "tensor {:?} names layer {} a second time",
                tensor.name,
                point - 1
            ));
        }
    }
    Ok(ControlVector {
        model_hint: gguf.strings.get(MODEL_HINT_KEY).cloned(),
        d,
        directions,
    })
}

impl ControlVector {
    /// Steering vectors for a model with `n_points` points: the imported directions at their
    /// points, zeros elsewhere. The model hint, if any, goes into the metadata.
    pub fn to_steering_vectors(
        &self,
        n_points: usize,
    ) -> Result<SteeringVectors, ControlVectorError> {
        let mut metadata = BTreeMap::new();
        if let Some(hint) = &self.model_hint {
            metadata.insert(MODEL_HINT_METADATA.to_string(), hint.clone());
        }
        let mut vectors = SteeringVectors::new(
            vec![0.0; n_points.saturating_mul(self.d)],
            n_points,
            self.d,
            metadata,
        )?;
        for (&point, direction) in &self.directions {
            vectors
                .point_mut(point)
                .ok_or(ControlVectorError::PointBeyondModel { point, n_points })?
                .copy_from_slice(direction);
        }
        Ok(vectors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    fn random_vectors(n_points: usize, d: usize) -> SteeringVectors {
        let mut rng = SplitMix64::new(5);
        let values = (0..n_points * d).map(|_| rng.gaussian() as f32).collect();
        SteeringVectors::new(values, n_points, d, BTreeMap::new()).unwrap()
    }

    fn export_bytes(vectors: &SteeringVectors, alpha: f32, points: &[usize]) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cv.gguf");
        export_control_vector(&path, vectors, alpha, points, "qwen2").unwrap();
        std::fs::read(&path).unwrap()
    }

    #[test]
    fn round_trip_is_bit_identical_and_maps_points() {
        let vectors = random_vectors(6, 8); // 5 blocks: exportable points 2..=5
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cv.gguf");
        export_control_vector(&path, &vectors, 1.0, &[5, 2, 3, 5], "qwen2").unwrap();
        let imported = import_control_vector(&path).unwrap();
        assert_eq!(imported.model_hint.as_deref(), Some("qwen2"));
        assert_eq!(
            imported.directions.keys().copied().collect::<Vec<_>>(),
            vec![2, 3, 5]
        );
        let back = imported.to_steering_vectors(6).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for p in [2, 3, 5] {
            assert_eq!(
                bits(back.point(p).unwrap()),
                bits(vectors.point(p).unwrap()),
                "point {p}"
            );
        }
        for p in [0, 1, 4] {
            assert_eq!(back.point(p).unwrap(), &[0.0; 8], "point {p}");
        }
        assert_eq!(
            back.metadata.get(MODEL_HINT_METADATA).map(String::as_str),
            Some("qwen2")
        );

        let gguf = gguf::read(&std::fs::read(&path).unwrap()).unwrap();
        let names: Vec<&str> = gguf.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["direction.1", "direction.2", "direction.4"]);
        assert_eq!(gguf.strings[ARCHITECTURE_KEY], "controlvector");
    }

    #[test]
    fn export_scales_by_alpha() {
        let vectors = random_vectors(4, 8);
        let imported = parse(&export_bytes(&vectors, -2.0, &[3])).unwrap();
        let expected: Vec<f32> = vectors.point(3).unwrap().iter().map(|v| -2.0 * v).collect();
        assert_eq!(imported.directions[&3], expected);
    }

    #[test]
    fn export_rejects_points_llama_cpp_cannot_steer() {
        let vectors = random_vectors(4, 8);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cv.gguf");
        for point in [0, 1, 4, usize::MAX] {
            let err = export_control_vector(&path, &vectors, 1.0, &[2, point], "x").unwrap_err();
            assert!(
                matches!(err, ControlVectorError::UnrepresentablePoint { point: p, last_point: 3 } if p == point)
            );
            assert!(
                err.to_string().contains(&format!("point {point} cannot")),
                "{err}"
            );
        }
        assert!(matches!(
            export_control_vector(&path, &vectors, 1.0, &[], "x"),
            Err(ControlVectorError::NoPoints { .. })
        ));
        assert!(matches!(
            export_control_vector(&path, &vectors, f32::NAN, &[2], "x"),
            Err(ControlVectorError::BadScale { .. })
        ));
        assert!(matches!(
            export_control_vector(&path, &vectors, f32::MAX, &[2], "x"),
            Err(ControlVectorError::Overflow { point: 2, .. })
        ));
        assert!(!path.exists(), "nothing is written on error");
    }

    #[test]
    fn imports_a_cvector_generator_style_file() {
        // As llama.cpp's cvector-generator writes it: layer_count as i32, no model hint here,
        // and every direction.1..n_layer-1 present. Built by hand, independent of our writer.
        let mut b = Vec::new();
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend_from_slice(&(s.len() as u64).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        };
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        b.extend_from_slice(&2u64.to_le_bytes());
        string(&mut b, "general.architecture");
        b.extend_from_slice(&8u32.to_le_bytes());
        string(&mut b, "controlvector");
        string(&mut b, "controlvector.layer_count");
        b.extend_from_slice(&5u32.to_le_bytes());
        b.extend_from_slice(&2i32.to_le_bytes());
        for (i, offset) in [(1u32, 0u64), (2, 32)] {
            string(&mut b, &format!("direction.{i}"));
            b.extend_from_slice(&1u32.to_le_bytes());
            b.extend_from_slice(&3u64.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&offset.to_le_bytes());
        }
        for row in [[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]] {
            b.resize(b.len().div_ceil(32) * 32, 0);
            b.extend(row.iter().flat_map(|v| v.to_le_bytes()));
        }
        let imported = parse(&b).unwrap();
        assert_eq!(imported.model_hint, None);
        assert_eq!(imported.d, 3);
        assert_eq!(imported.directions[&2], vec![1.0, 2.0, 3.0]);
        assert_eq!(imported.directions[&3], vec![4.0, 5.0, 6.0]);
        assert!(matches!(
            imported.to_steering_vectors(3),
            Err(ControlVectorError::PointBeyondModel {
                point: 3,
                n_points: 3
            })
        ));
    }

    #[test]
    fn truncated_and_corrupted_files_give_errors_not_panics() {
        let bytes = export_bytes(&random_vectors(4, 8), 1.0, &[2, 3]);
        // d = 8 fills the alignment exactly, so every strict prefix lacks real data.
        for len in 0..bytes.len() {
            assert!(
                parse(&bytes[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
        for i in 0..bytes.len() {
            for flip in [0xFF, 0x80, 0x01] {
                let mut corrupted = bytes.clone();
                corrupted[i] ^= flip;
                let _ = parse(&corrupted);
            }
        }
    }

    #[test]
    fn invalid_contents_are_named() {
        let tensors = |list: &[(&str, Vec<f32>)]| -> Vec<u8> {
            let owned: Vec<(String, Vec<f32>)> = list
                .iter()
                .map(|(n, v)| (n.to_string(), v.clone()))
                .collect();
            gguf::write(&[(ARCHITECTURE_KEY, MetaValue::Str(ARCHITECTURE))], &owned)
        };
        let expect = |bytes: &[u8], needle: &str| {
            let err = parse(bytes).unwrap_err();
            assert!(err.contains(needle), "{err}");
        };
        expect(
            &tensors(&[("direction.0", vec![1.0])]),
            "\"direction.0\" is not a control-vector direction",
        );
        expect(
            &tensors(&[("blk.0.attn_q.weight", vec![1.0])]),
            "\"blk.0.attn_q.weight\" is not",
        );
        expect(
            &tensors(&[("direction.1", vec![1.0, f32::NAN])]),
            "NaN at index 1",
        );
        expect(
            &tensors(&[("direction.1", vec![1.0]), ("direction.2", vec![1.0, 2.0])]),
            "has 2 values but",
        );
        expect(
            &tensors(&[("direction.1", vec![1.0]), ("direction.1", vec![2.0])]),
            "appears twice",
        );
        expect(
            &tensors(&[("direction.1", vec![1.0]), ("direction.01", vec![2.0])]),
            "names layer 1 a second time",
        );
        expect(
            &tensors(&[(&format!("direction.{}", usize::MAX), vec![1.0])]),
            "is not a control-vector direction",
        );
        expect(&tensors(&[]), "no direction tensors");
        let model = gguf::write(&[(ARCHITECTURE_KEY, MetaValue::Str("qwen2"))], &[]);
        expect(&model, "this is a model file");
        expect(b"GGML\x03\0\0\0", "not a GGUF file");
        let mut v1 = tensors(&[("direction.1", vec![1.0])]);
        v1[4] = 1;
        expect(&v1, "version 1");

        // An F16 tensor: patch the type field that follows the name, n_dims and ne[0].
        let mut f16 = tensors(&[("direction.1", vec![1.0; 8])]);
        let name_end = f16.windows(11).position(|w| w == b"direction.1").unwrap() + 11;
        f16[name_end + 12] = 1;
        expect(&f16, "ggml type 1");
        let mut two_d = tensors(&[("direction.1", vec![1.0; 8])]);
        two_d[name_end] = 2;
        expect(&two_d, "is 1-D");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gguf");
        std::fs::write(&path, b"GGUF").unwrap();
        let err = import_control_vector(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&path.display().to_string()) && err.contains("truncated"),
            "{err}"
        );
    }
}
