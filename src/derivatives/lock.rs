//! Locks that let many runs share one OUTPUT_DIR (array jobs, workflow engines).
//!
//! A lock is a hidden file held with the operating system's advisory lock (`flock`): the
//! kernel releases it when its process ends, `kill -9` and out-of-memory kills included, so
//! a lock is never left stale by a dead run. The file holds who took it (host, pid, time), for
//! the message of a run that has to wait. It is removed on release; a waiter that then
//! finds itself holding a removed file starts again, so two runs never both hold a path.
//!
//! Where the file system has no advisory locks (some parallel file systems are mounted so),
//! the run warns once and goes on unlocked: every file is still written atomically, so the
//! worst case is work done twice.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{io::partial, Error, Result};

static WARNED_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// A held lock; released (and its file removed) when dropped.
#[derive(Debug)]
pub struct Lock {
    path: PathBuf,
    file: Option<File>,
}

/// How the lock was obtained.
#[derive(Debug, PartialEq, Eq)]
pub enum Wait {
    /// Free at once.
    None,
    /// Another run held it; this one waited for it.
    Waited,
}

impl Lock {
    /// Takes the lock at `path` (its folder must exist), waiting while another process holds
    /// it; `what` names what it protects in the wait message.
    pub fn acquire(path: &Path, what: &str) -> Result<(Lock, Wait)> {
        let mut waited = Wait::None;
        loop {
            let mut file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
                .map_err(|e| Error::io(path, e))?;
            match file.try_lock() {
                Ok(()) => {}
                Err(TryLockError::WouldBlock) => {
                    let mut holder = String::new();
                    let _ = file.read_to_string(&mut holder);
                    let holder = holder.trim();
                    tracing::info!(
                        "waiting for {what}: another run holds {} ({})",
                        path.display(),
                        if holder.is_empty() {
                            "starting"
                        } else {
                            holder
                        }
                    );
                    waited = Wait::Waited;
                    file.lock().map_err(|e| Error::io(path, e))?;
                }
                Err(TryLockError::Error(e)) if unsupported(&e) => {
                    if !WARNED_UNSUPPORTED.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "{}: the file system offers no file locks ({e}); running unlocked, \
                             so runs on the same acquisition may repeat each other's work",
                            path.display()
                        );
                    }
                    return Ok((
                        Lock {
                            path: path.to_path_buf(),
                            file: None,
                        },
                        waited,
                    ));
                }
                Err(TryLockError::Error(e)) => return Err(Error::io(path, e)),
            }
            // The holder before us may have removed the file on release: then we hold a
            // file nobody else will see, and must start again on the path's current file.
            if !same_file(&file, path) {
                continue;
            }
            let note = format!(
                "pid {} on host {} since {}\n",
                std::process::id(),
                partial::host_name(),
                unix_seconds()
            );
            let _ = file
                .set_len(0)
                .and_then(|()| file.rewind())
                .and_then(|()| file.write_all(note.as_bytes()));
            return Ok((
                Lock {
                    path: path.to_path_buf(),
                    file: Some(file),
                },
                waited,
            ));
        }
    }
}

impl Lock {
    /// Whether some process holds the lock at `path` now (false when there is no file).
    pub fn is_held(path: &Path) -> bool {
        let Ok(file) = File::open(path) else {
            return false;
        };
        matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock))
    }

    /// Removes the file of a lock nobody holds: what a run killed while holding it leaves.
    pub fn remove_if_stale(path: &Path) {
        if !path.exists() {
            return;
        }
        if let Ok((lock, _)) = Self::try_acquire(path) {
            drop(lock);
        }
    }

    /// [`Lock::acquire`] without waiting: `Err` when another process holds it.
    fn try_acquire(path: &Path) -> std::io::Result<(Lock, Wait)> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        match file.try_lock() {
            Ok(()) if same_file(&file, path) => Ok((
                Lock {
                    path: path.to_path_buf(),
                    file: Some(file),
                },
                Wait::None,
            )),
            Ok(()) => Err(std::io::Error::other("replaced")),
            Err(TryLockError::WouldBlock) => Err(std::io::Error::other("held")),
            Err(TryLockError::Error(e)) => Err(e),
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Remove while still holding, so nobody can lock the path's file in between.
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
        self.file = None;
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::Unsupported)
        || e.raw_os_error() == Some(38) // ENOSYS
        || e.raw_os_error() == Some(95) // EOPNOTSUPP
}

#[cfg(unix)]
fn same_file(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_file: &File, path: &Path) -> bool {
    path.exists()
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn a_second_taker_waits_and_the_file_goes_on_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".x.lock");
        let (first, wait) = Lock::acquire(&path, "x").unwrap();
        assert_eq!(wait, Wait::None);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        let order = Arc::new(Mutex::new(Vec::new()));
        let (p, o) = (path.clone(), order.clone());
        let waiter = std::thread::spawn(move || {
            let (lock, wait) = Lock::acquire(&p, "x").unwrap();
            o.lock().unwrap().push("second");
            drop(lock);
            wait
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        order.lock().unwrap().push("first released");
        drop(first);
        assert_eq!(waiter.join().unwrap(), Wait::Waited);
        assert_eq!(*order.lock().unwrap(), ["first released", "second"]);
        assert!(!path.exists(), "the lock file is removed on release");
    }

    #[test]
    fn a_lock_left_by_a_dead_holder_is_not_held_and_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".z.lock");
        // What `kill -9` leaves: the file, with the kernel's lock gone.
        std::fs::write(&path, "pid 1 on host h since 0\n").unwrap();
        assert!(!Lock::is_held(&path));
        let (held, _) = Lock::acquire(&path, "z").unwrap();
        assert!(Lock::is_held(&path));
        Lock::remove_if_stale(&path);
        assert!(path.exists(), "a held lock stays");
        drop(held);
        std::fs::write(&path, "").unwrap();
        Lock::remove_if_stale(&path);
        assert!(!path.exists());
    }

    #[test]
    fn many_takers_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".y.lock");
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (p, inside) = (path.clone(), inside.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        let (lock, _) = Lock::acquire(&p, "y").unwrap();
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                        drop(lock);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(!path.exists());
    }
}
