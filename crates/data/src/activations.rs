//! The activations file: one f32 tensor `activations` of shape `[n_prompts, n_points, d]` in
//! safetensors layout, with the prompt ids, set names and capture settings in its metadata.
//!
//! The file is laid out in full when created and rows are written in place, so memory stays at
//! one batch whatever the file's size, and an interrupted capture resumes: a sidecar
//! `<file>.progress` holds the number of rows written, and is removed when the file is complete.

use crate::{DataError, Result};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

const TENSOR: &str = "activations";

#[derive(Debug, Clone, PartialEq)]
pub struct ActivationsHeader {
    pub n_points: usize,
    pub d: usize,
    pub ids: Vec<String>,
    pub sets: Vec<Option<String>>,
    /// Capture settings (model, model sha256, position rule, template...).
    pub metadata: BTreeMap<String, String>,
}

impl ActivationsHeader {
    fn row_floats(&self) -> usize {
        self.n_points * self.d
    }

    fn to_json(&self) -> String {
        let mut meta = self.metadata.clone();
        meta.insert(
            "ids".into(),
            serde_json::to_string(&self.ids).expect("strings serialize"),
        );
        meta.insert(
            "sets".into(),
            serde_json::to_string(&self.sets).expect("strings serialize"),
        );
        let bytes = self.ids.len() * self.row_floats() * 4;
        let header = serde_json::json!({
            "__metadata__": meta,
            TENSOR: {"dtype": "F32", "shape": [self.ids.len(), self.n_points, self.d], "data_offsets": [0, bytes]},
        });
        let mut text = header.to_string();
        // Keep the data 8-byte aligned, as the format recommends.
        while !(text.len() + 8).is_multiple_of(8) {
            text.push(' ');
        }
        text
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, detail: String) -> DataError {
    DataError::Invalid {
        path: path.to_path_buf(),
        detail,
    }
}

fn progress_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".progress");
    PathBuf::from(p)
}

/// Reads the header; returns it with the byte offset where the data starts.
fn read_header(path: &Path, file: &mut File) -> Result<(ActivationsHeader, u64)> {
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io_err(path))?;
    let len = u64::from_le_bytes(len);
    let size = file.metadata().map_err(io_err(path))?.len();
    if len > size.saturating_sub(8) || len > 100 << 20 {
        return Err(bad(
            path,
            format!("not an activations file: header length {len} does not fit a {size}-byte file"),
        ));
    }
    let mut text = vec![0u8; len as usize];
    file.read_exact(&mut text).map_err(io_err(path))?;
    let json: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        bad(
            path,
            format!("not an activations file: header is not JSON ({e})"),
        )
    })?;
    let tensor = &json[TENSOR];
    if tensor["dtype"] != "F32" {
        return Err(bad(
            path,
            format!("expected an F32 tensor '{TENSOR}'; found {}", tensor),
        ));
    }
    let shape: Vec<usize> = serde_json::from_value(tensor["shape"].clone())
        .map_err(|_| bad(path, format!("tensor '{TENSOR}' has no valid shape")))?;
    let [n, n_points, d] = shape[..] else {
        return Err(bad(
            path,
            format!("tensor '{TENSOR}' must be [prompts, points, d], found {shape:?}"),
        ));
    };
    let mut metadata: BTreeMap<String, String> =
        serde_json::from_value(json["__metadata__"].clone()).unwrap_or_default();
    let ids: Vec<String> = metadata
        .remove("ids")
        .and_then(|s| serde_json::from_str(&s).ok())
        .ok_or_else(|| bad(path, "metadata has no prompt ids".into()))?;
    let sets: Vec<Option<String>> = metadata
        .remove("sets")
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| vec![None; ids.len()]);
    if ids.len() != n || sets.len() != n {
        return Err(bad(
            path,
            format!("{} ids and {} sets for {n} rows", ids.len(), sets.len()),
        ));
    }
    let data_start = 8 + len;
    let expected = data_start + (n * n_points * d * 4) as u64;
    if size != expected {
        return Err(bad(path, format!("file has {size} bytes, its header describes {expected}; it is truncated or corrupt")));
    }
    Ok((
        ActivationsHeader {
            n_points,
            d,
            ids,
            sets,
            metadata,
        },
        data_start,
    ))
}

/// Writes rows of an activations file, resuming an interrupted one.
pub struct ActivationsWriter {
    path: PathBuf,
    file: File,
    header: ActivationsHeader,
    data_start: u64,
    rows_done: usize,
}

impl ActivationsWriter {
    /// Creates the file, or reopens an interrupted one with the same header. A complete file
    /// gives a writer with nothing left to do.
    pub fn open(path: &Path, header: ActivationsHeader) -> Result<Self> {
        let progress = progress_path(path);
        if path.exists() {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(io_err(path))?;
            let (existing, data_start) = read_header(path, &mut file)?;
            if existing.ids != header.ids
                || existing.n_points != header.n_points
                || existing.d != header.d
            {
                return Err(bad(path, "exists with other prompts or another model's shape; choose another --out or remove it".into()));
            }
            // Rows read at another position or from another model file look alike; refuse them.
            for key in ["position", "model_sha256"] {
                if let (Some(was), Some(now)) =
                    (existing.metadata.get(key), header.metadata.get(key))
                {
                    if was != now {
                        return Err(bad(path, format!("holds rows with {key} {was}, not {now}; choose another --out or remove it")));
                    }
                }
            }
            let rows_done = match std::fs::read_to_string(&progress) {
                Ok(text) => text.trim().parse().map_err(|_| {
                    bad(&progress, format!("unreadable progress '{}'", text.trim()))
                })?,
                Err(_) => existing.ids.len(),
            };
            return Ok(Self {
                path: path.to_path_buf(),
                file,
                header: existing,
                data_start,
                rows_done,
            });
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let text = header.to_json();
        let mut file = File::create(path).map_err(io_err(path))?;
        file.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io_err(path))?;
        file.write_all(text.as_bytes()).map_err(io_err(path))?;
        let data_start = 8 + text.len() as u64;
        file.set_len(data_start + (header.ids.len() * header.row_floats() * 4) as u64)
            .map_err(io_err(path))?;
        std::fs::write(&progress, "0").map_err(io_err(&progress))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            header,
            data_start,
            rows_done: 0,
        })
    }

    /// Rows already written; capture continues from here.
    pub fn rows_done(&self) -> usize {
        self.rows_done
    }

    /// Writes the next row (`n_points * d` values, point-major).
    pub fn push_row(&mut self, row: &[f32]) -> Result<()> {
        if row.len() != self.header.row_floats() || self.rows_done >= self.header.ids.len() {
            return Err(bad(
                &self.path,
                format!(
                    "row {} of {} values does not fit",
                    self.rows_done,
                    row.len()
                ),
            ));
        }
        let offset = self.data_start + (self.rows_done * self.header.row_floats() * 4) as u64;
        let bytes: Vec<u8> = row.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(io_err(&self.path))?;
        self.file.write_all(&bytes).map_err(io_err(&self.path))?;
        self.rows_done += 1;
        let progress = progress_path(&self.path);
        if self.rows_done == self.header.ids.len() {
            self.file.sync_all().map_err(io_err(&self.path))?;
            let _ = std::fs::remove_file(&progress);
        } else {
            std::fs::write(&progress, self.rows_done.to_string()).map_err(io_err(&progress))?;
        }
        Ok(())
    }
}

/// A complete activations file in memory.
pub struct Activations {
    pub header: ActivationsHeader,
    /// Row-major `[n_prompts, n_points, d]`.
    pub data: Vec<f32>,
}

impl Activations {
    pub fn load(path: &Path) -> Result<Self> {
        if progress_path(path).exists() {
            return Err(bad(
                path,
                "capture did not finish; rerun the same capture command to complete it".into(),
            ));
        }
        let mut file = File::open(path).map_err(io_err(path))?;
        let (header, data_start) = read_header(path, &mut file)?;
        file.seek(SeekFrom::Start(data_start))
            .map_err(io_err(path))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io_err(path))?;
        let data: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if data.iter().any(|x| !x.is_finite()) {
            return Err(bad(path, "contains NaN or infinite activations".into()));
        }
        Ok(Self { header, data })
    }

    /// The activations of every prompt at one point: row-major `[n_prompts, d]`.
    pub fn at_point(&self, point: usize) -> Vec<f32> {
        let (p, d) = (self.header.n_points, self.header.d);
        self.data
            .chunks_exact(p * d)
            .flat_map(|row| row[point * d..(point + 1) * d].iter().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(n: usize) -> ActivationsHeader {
        ActivationsHeader {
            n_points: 2,
            d: 3,
            ids: (0..n).map(|i| format!("p{i}")).collect(),
            sets: (0..n)
                .map(|i| (i % 2 == 0).then(|| "even".to_string()))
                .collect(),
            metadata: BTreeMap::from([("position".to_string(), "last-prompt".to_string())]),
        }
    }

    #[test]
    fn rows_round_trip_and_an_interrupted_capture_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acts.safetensors");
        let row = |i: usize| (0..6).map(|j| (i * 10 + j) as f32).collect::<Vec<_>>();
        let mut w = ActivationsWriter::open(&path, header(3)).unwrap();
        w.push_row(&row(0)).unwrap();
        drop(w); // killed after one row
        assert!(Activations::load(&path)
            .err()
            .unwrap()
            .to_string()
            .contains("did not finish"));
        let mut w = ActivationsWriter::open(&path, header(3)).unwrap();
        assert_eq!(w.rows_done(), 1);
        w.push_row(&row(1)).unwrap();
        w.push_row(&row(2)).unwrap();
        let acts = Activations::load(&path).unwrap();
        assert_eq!(acts.header, header(3));
        assert_eq!(acts.data, [row(0), row(1), row(2)].concat());
        assert_eq!(
            acts.at_point(1),
            vec![3.0, 4.0, 5.0, 13.0, 14.0, 15.0, 23.0, 24.0, 25.0]
        );
        assert_eq!(
            ActivationsWriter::open(&path, header(3))
                .unwrap()
                .rows_done(),
            3
        );
    }

    #[test]
    fn the_file_reads_as_plain_safetensors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acts.safetensors");
        let mut w = ActivationsWriter::open(&path, header(1)).unwrap();
        w.push_row(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!((8 + len) % 8, 0);
        let json: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
        assert_eq!(json["activations"]["shape"], serde_json::json!([1, 2, 3]));
        assert_eq!(
            f32::from_le_bytes(bytes[8 + len..12 + len].try_into().unwrap()),
            1.0
        );
    }

    #[test]
    fn other_prompts_and_truncation_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acts.safetensors");
        ActivationsWriter::open(&path, header(2)).unwrap();
        assert!(ActivationsWriter::open(&path, header(3))
            .err()
            .unwrap()
            .to_string()
            .contains("other prompts"));
        let mut mean = header(2);
        mean.metadata
            .insert("position".to_string(), "mean-user".to_string());
        let err = ActivationsWriter::open(&path, mean)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("holds rows with position last-prompt, not mean-user"),
            "{err}"
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        std::fs::remove_file(progress_path(&path)).unwrap();
        assert!(Activations::load(&path)
            .err()
            .unwrap()
            .to_string()
            .contains("truncated"));
    }
}
