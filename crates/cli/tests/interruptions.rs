//! Nothing lost, whatever happens to the process: the miniature run killed (SIGKILL) at random
//! moments and resumed each time ends exactly as an uninterrupted run does; on a full disk it
//! stops naming the file, and resumes once space is freed. `REFUSAL_STEER_KILLS` sets the
//! number of kills (4 by default); `scripts/robustness.sh` runs 30 and the full-disk check.

mod miniature;

use miniature::{refusal_steer, write_data, CONFIG};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The miniature run's config in `dir`, and the folder a run would write.
fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    write_data(&data);
    let config = dir.join("run.toml");
    std::fs::write(&config, CONFIG.replace("DATA", data.to_str().unwrap())).unwrap();
    (config, dir.join("run"))
}

/// A finished run: its printed table (without the report's path) and its folder.
fn finish(config: &Path, out: &Path) -> String {
    let done = refusal_steer(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    String::from_utf8_lossy(&done.stdout)
        .lines()
        .filter(|l| !l.starts_with("report: "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every file under `root` by relative path.
fn files(root: &Path) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, path);
            }
        }
    }
    out
}

/// The interrupted folder holds what the uninterrupted one does: every JSONL the same lines
/// (each whole, none twice), the same vectors and activations, recipes that steer alike.
fn assert_same_outputs(interrupted: &Path, reference: &Path) {
    let (got, want) = (files(interrupted), files(reference));
    for (rel, path) in &want {
        let other = got
            .get(rel)
            .unwrap_or_else(|| panic!("{rel} is missing after the interruptions"));
        if rel.ends_with(".jsonl") {
            let lines = |p: &Path| {
                let text = std::fs::read_to_string(p).unwrap();
                let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
                for l in &lines {
                    serde_json::from_str::<serde_json::Value>(l)
                        .unwrap_or_else(|e| panic!("{rel}: a torn line ({e}): {l}"));
                }
                lines.sort();
                lines
            };
            let (a, b) = (lines(other), lines(path));
            let mut distinct = a.clone();
            distinct.dedup();
            assert_eq!(distinct.len(), a.len(), "{rel} holds a line twice");
            assert_eq!(a, b, "{rel} differs");
        } else if rel.ends_with(".steer.safetensors") {
            let load = |p: &Path| {
                let mut r = refusal_steer_pipeline::Recipe::load(p).unwrap();
                // The provenance names the folder; everything that steers must match.
                r.made_by.source.clear();
                r.made_by.config_sha256 = None;
                r
            };
            assert_eq!(load(other), load(path), "{rel} differs");
        } else if rel.starts_with("vectors/") && rel.ends_with(".safetensors") {
            let load = |p: &Path| refusal_steer_steer::SteeringVectors::load(p).unwrap();
            let (a, b) = (load(other), load(path));
            assert_eq!(a.vectors, b.vectors, "{rel} differs");
            assert_eq!(a.fit, b.fit, "{rel}: the fit metadata differs");
            for (key, value) in &b.metadata {
                // Paths name the folder; every other provenance string must match.
                if !value.contains(reference_root(path, rel)) {
                    assert_eq!(a.metadata.get(key), Some(value), "{rel}: {key} differs");
                }
            }
        } else if rel == "train-acts.safetensors" {
            let load = |p: &Path| refusal_steer_data::activations::Activations::load(p).unwrap();
            let (a, b) = (load(other), load(path));
            assert_eq!(
                (a.header.ids, a.data),
                (b.header.ids, b.data),
                "{rel} differs"
            );
        }
    }
}

/// The run folder `path` (the file `rel` inside it) is in, as text.
fn reference_root<'a>(path: &'a Path, rel: &str) -> &'a str {
    let text = path.to_str().unwrap();
    &text[..text.len() - rel.len()]
}

#[test]
fn a_run_killed_at_random_moments_resumes_to_the_uninterrupted_result() {
    let kills: usize = std::env::var("REFUSAL_STEER_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let (config, reference) = setup(dir.path());
    let started = Instant::now();
    let table = finish(&config, &reference);
    let whole = started.elapsed();

    // Kill moments spread over a whole run: each resumed process gets a random share of
    // the uninterrupted run's time, so later kills land in later stages.
    let out = dir.path().join("killed");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut landed = 0;
    for _ in 0..kills {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let share = 0.05 + 0.5 * (state >> 11) as f64 / (1u64 << 53) as f64;
        let mut child = Command::new(env!("CARGO_BIN_EXE_refusal-steer"))
            .args(["--threads", "1", "run", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&out)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(whole.mul_f64(share));
        if child.try_wait().unwrap().is_none() {
            landed += 1;
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert!(landed > 0, "every run ended before its kill");
    assert_eq!(finish(&config, &out), table);
    assert_same_outputs(&out, &reference);
    eprintln!("{landed} of {kills} kills landed mid-run; {whole:?} uninterrupted");
}

#[test]
#[ignore = "mounts a small tmpfs (needs root); scripts/robustness.sh runs it"]
fn a_full_disk_stops_the_run_naming_the_file_and_a_resume_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (config, reference) = setup(dir.path());
    let table = finish(&config, &reference);
    let mount = dir.path().join("small");
    std::fs::create_dir(&mount).unwrap();
    let tmpfs = |options: &str| {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&mount)
            .status()
            .unwrap();
        assert!(status.success(), "mount {options} failed (run as root)");
    };
    tmpfs("size=1m");
    let out = mount.join("run");
    let full = refusal_steer(&[
        "run",
        "--config",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&full.stderr).to_string();
    let grown = Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(&mount)
        .status()
        .unwrap();
    assert!(grown.success());
    let resumed = finish(&config, &out);
    assert_same_outputs(&out, &reference);
    Command::new("umount").arg(&mount).status().unwrap();
    assert!(!full.status.success(), "the run fit in 1 MB");
    assert!(
        err.contains("No space left on device") && err.contains(mount.to_str().unwrap()),
        "{err}"
    );
    assert_eq!(resumed, table);
    eprintln!("{}", err.lines().last().unwrap_or_default());
}
