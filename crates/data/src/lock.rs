//! One process per output: an advisory lock beside an output file or run folder.
//!
//! `OutputLock::acquire(path)` takes an exclusive `flock` on `path.lock` (beside a file, or
//! inside a folder) and writes the holder's process id into it. The operating system drops
//! the lock when the process exits in any way, SIGKILL included, so a lock file left behind by
//! a dead process is stale and simply taken over; only a live holder refuses the second
//! process, with its id.

use crate::{DataError, Result};
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Held while a process writes an output; released on drop or exit.
#[derive(Debug)]
pub struct OutputLock {
    _file: File,
    pub path: PathBuf,
}

impl OutputLock {
    /// Locks the output `path` (a file, or a folder that exists) for this process.
    pub fn acquire(path: &Path) -> Result<Self> {
        let lock_path = if path.is_dir() {
            path.join(".lock")
        } else {
            let mut name = path.file_name().unwrap_or_default().to_os_string();
            name.push(".lock");
            path.with_file_name(name)
        };
        let io = |source| DataError::Io {
            path: lock_path.clone(),
            source,
        };
        if let Some(parent) = lock_path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(DataError::Invalid {
                    path: path.to_path_buf(),
                    detail: format!(
                        "in use by another process (pid {}); wait for it to finish or stop it, or write to another output",
                        holder.trim()
                    ),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.flush().map_err(io)?;
        Ok(Self {
            _file: file,
            path: lock_path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_and_a_released_lock_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("answers.jsonl");
        let first = OutputLock::acquire(&out).unwrap();
        assert_eq!(first.path, dir.path().join("answers.jsonl.lock"));
        // flock locks belong to the open file, so a second open in this process conflicts
        // the way another process would.
        let err = OutputLock::acquire(&out).unwrap_err().to_string();
        assert!(
            err.contains(&format!(
                "in use by another process (pid {})",
                std::process::id()
            )),
            "{err}"
        );
        drop(first);
        OutputLock::acquire(&out).unwrap();
        // A folder is locked from inside.
        let folder = OutputLock::acquire(dir.path()).unwrap();
        assert_eq!(folder.path, dir.path().join(".lock"));
    }
}
