//! Atomic writes of small text files (JSON sidecars, TSV tables): write to a temporary name
//! in the same folder, then rename, so a crash never leaves a half-written file behind.

use std::io::Write;
use std::path::Path;

use super::partial::partial_path;

use crate::{Error, Result};

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = partial_path(path, "");
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

/// Writes a value as pretty JSON (with a final newline) atomically.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value).expect("JSON values always serialise");
    text.push('\n');
    write_atomic(path, text.as_bytes())
}

/// Reads a JSON file, naming the file in the error.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::input(path, format!("invalid JSON ({e}); fix or remove the file")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        write_json(
            &p,
            &serde_json::json!({"Units": "ppm", "EchoTime": [0.004, 0.008]}),
        )
        .unwrap();
        let v = read_json(&p).unwrap();
        assert_eq!(v["Units"], "ppm");
        assert_eq!(v["EchoTime"][1], 0.008);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn failed_write_reports_the_path_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("missing-folder").join("a.json");
        let err = write_json(&p, &serde_json::json!({}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing-folder"), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn invalid_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.json");
        std::fs::write(&p, "{not json").unwrap();
        let err = read_json(&p).unwrap_err().to_string();
        assert!(
            err.contains("bad.json") && err.contains("invalid JSON"),
            "{err}"
        );
    }
}
