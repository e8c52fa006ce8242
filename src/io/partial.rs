//! Names of the temporary files that atomic writes go through, and how to tell a dead
//! writer's leftovers from a live writer's file.
//!
//! A temporary file is a hidden sibling of its final name,
//! `.<stem>.partial-<host>-<pid>-<n><ext>`: host and process id say who writes it (so many
//! processes on many nodes sharing one folder never pick the same name), and `n` counts within
//! the process. After a `kill -9` such a file stays behind; a later run removes it once its
//! writer is known to be gone (see [`is_stale`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

const MARK: &str = ".partial-";

/// A temporary file untouched for this long belongs to a dead writer whatever its host:
/// writes take seconds and every write moves the modification time.
pub const STALE_AFTER: Duration = Duration::from_secs(3600);

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// This machine's name (`/proc/sys/kernel/hostname`, else `$HOSTNAME`), reduced to letters,
/// digits and dots so that it fits in a file name. Read once: every atomic write names it.
pub fn host_name() -> String {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(read_host_name).clone()
}

fn read_host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.')
        .collect();
    if clean.is_empty() {
        "localhost".into()
    } else {
        clean
    }
}

/// Whether process `pid` of this machine is running. Without `/proc` nothing can be told,
/// so every process counts as running (its files then age out by [`STALE_AFTER`]).
pub fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let proc_root = Path::new("/proc");
    if !proc_root.join("self").exists() {
        return true;
    }
    proc_root.join(pid.to_string()).exists()
}

/// The temporary sibling of `path` for this process; `ext` (e.g. `.nii.gz`) is kept at the
/// end so that tools that look at extensions still recognise the file.
pub fn partial_path(path: &Path, ext: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(ext).unwrap_or(&name);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(
        ".{stem}{MARK}{}-{}-{n}{ext}",
        host_name(),
        std::process::id()
    ))
}

/// The writer (host, pid) of a temporary file, from its name; `None` for any other name.
pub fn writer(file_name: &str) -> Option<(String, u32)> {
    if !file_name.starts_with('.') {
        return None;
    }
    let (_, tail) = file_name.rsplit_once(MARK)?;
    // The tail is `<host>-<pid>-<n><ext>`. Hosts may hold '-' (names from other tools) and
    // so may the extension (`.local-field`): the counter is the last `-<digits>` followed by
    // the end or the extension's '.', with a numeric pid before it.
    tail.rmatch_indices('-').find_map(|(i, _)| {
        let (head, last) = (&tail[..i], &tail[i + 1..]);
        let digits = last.len() - last.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        let counter = digits > 0 && (digits == last.len() || last[digits..].starts_with('.'));
        let (host, pid) = head.rsplit_once('-')?;
        counter
            .then(|| pid.parse().ok().map(|pid| (host.to_string(), pid)))
            .flatten()
    })
}

/// Whether `path` is a temporary file whose writer is gone: a process of this machine that no
/// longer runs, or (any machine) a file untouched for [`STALE_AFTER`].
pub fn is_stale(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some((host, pid)) = writer(name) else {
        return false;
    };
    if host == host_name() && !process_alive(pid) {
        return true;
    }
    std::fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > STALE_AFTER)
}

/// Removes the stale temporary files directly in `dir` (not below); returns how many.
pub fn remove_stale_in(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
        if is_file && is_stale(&path) && std::fs::remove_file(&path).is_ok() {
            tracing::info!("removed {}, left by a run that was killed", path.display());
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_carry_host_and_pid_and_keep_the_extension() {
        let p = partial_path(Path::new("/o/sub-1_Chimap.nii.gz"), ".nii.gz");
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert!(
            name.starts_with(".sub-1_Chimap.partial-") && name.ends_with(".nii.gz"),
            "{name}"
        );
        let (host, pid) = writer(&name).unwrap();
        assert_eq!(host, host_name());
        assert_eq!(pid, std::process::id());
        // Two names in one process differ.
        assert_ne!(
            p,
            partial_path(Path::new("/o/sub-1_Chimap.nii.gz"), ".nii.gz")
        );
        assert_eq!(
            writer(".a.json.partial-node-7.cluster-123-0").unwrap(),
            ("node-7.cluster".to_string(), 123)
        );
        assert!(writer("sub-1_Chimap.nii.gz").is_none());
        assert!(writer(".hidden").is_none());
        assert!(writer(".a.partial-host-x-1").is_none());
        // An extension with a '-' (the --work-dir's local fields).
        let p = partial_path(Path::new("/w/.sub-1_ab12.local-field"), ".local-field");
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        assert_eq!(writer(&name).unwrap(), (host_name(), std::process::id()));
        assert_eq!(
            writer(".x.partial-vm-23499-14.local-field").unwrap(),
            ("vm".to_string(), 23499)
        );
    }

    #[test]
    fn only_dead_writers_files_are_stale() {
        let dir = tempfile::tempdir().unwrap();
        let mine = partial_path(&dir.path().join("a.json"), "");
        std::fs::write(&mine, b"{").unwrap();
        // A pid far above any pid_max (2^22) never runs.
        let dead = dir
            .path()
            .join(format!(".b.json.partial-{}-99999999-0", host_name()));
        std::fs::write(&dead, b"{").unwrap();
        let final_name = dir.path().join("c.json");
        std::fs::write(&final_name, b"{}").unwrap();
        assert!(!is_stale(&mine));
        assert!(is_stale(&dead));
        assert!(!is_stale(&final_name));
        assert_eq!(remove_stale_in(dir.path()), 1);
        assert!(mine.exists() && !dead.exists() && final_name.exists());
    }
}
