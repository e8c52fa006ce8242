//! Sidecar JSON resolution by the BIDS inheritance principle.
//!
//! A JSON file applies to a data file when it has the same suffix, its entities are a subset
//! of the data file's, and it lies in the data file's folder or one of its ancestors up to the
//! dataset root. Metadata are merged from the root down, so the closest file wins per key;
//! within one folder, the JSON with fewer entities is applied first (the more specific one
//! wins), which keeps the result deterministic for datasets that bend the one-per-level rule.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::Entities;
use crate::{Error, Result};

pub(crate) type Json = Map<String, Value>;

/// A JSON file found in some folder, with its parsed name.
#[derive(Clone, Debug)]
struct Candidate {
    path: PathBuf,
    entities: Entities,
    suffix: String,
}

/// Resolves sidecars, caching folder listings and parsed JSON.
pub(crate) struct Sidecars {
    root: PathBuf,
    listings: HashMap<PathBuf, Vec<Candidate>>,
    parsed: HashMap<PathBuf, Json>,
}

impl Sidecars {
    pub(crate) fn new(root: &Path) -> Self {
        Sidecars {
            root: root.to_path_buf(),
            listings: HashMap::new(),
            parsed: HashMap::new(),
        }
    }

    /// The merged metadata for `file`, and the sidecar paths that contributed (root first).
    pub(crate) fn resolve(&mut self, file: &Path) -> Result<(Json, Vec<PathBuf>)> {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let Some((entities, suffix, _)) = Entities::parse(name) else {
            return Ok((Json::new(), Vec::new()));
        };
        let mut merged = Json::new();
        let mut used = Vec::new();
        for dir in self.levels(file) {
            let mut applicable: Vec<Candidate> = self
                .listing(&dir)
                .iter()
                .filter(|c| c.suffix == suffix && c.entities.is_subset_of(&entities))
                .cloned()
                .collect();
            applicable.sort_by(|a, b| {
                (a.entities.pairs().len(), &a.path).cmp(&(b.entities.pairs().len(), &b.path))
            });
            for c in applicable {
                for (k, v) in self.json(&c.path)? {
                    merged.insert(k.clone(), v.clone());
                }
                used.push(c.path);
            }
        }
        Ok((merged, used))
    }

    /// Folders from the dataset root down to the file's own folder.
    fn levels(&self, file: &Path) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        let mut cur = file.parent();
        while let Some(d) = cur {
            dirs.push(d.to_path_buf());
            if d == self.root {
                break;
            }
            cur = d.parent();
        }
        // A file outside the root would walk up to `/`; only the file's folder applies then.
        if dirs.last().map(PathBuf::as_path) != Some(self.root.as_path()) {
            dirs.truncate(1);
        }
        dirs.reverse();
        dirs
    }

    fn listing(&mut self, dir: &Path) -> &[Candidate] {
        self.listings.entry(dir.to_path_buf()).or_insert_with(|| {
            let mut found = Vec::new();
            // An unreadable folder simply contributes no sidecars; the walk reports it.
            if let Ok(rd) = std::fs::read_dir(dir) {
                for entry in rd.flatten() {
                    let path = entry.path();
                    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                        continue;
                    };
                    match Entities::parse(name) {
                        Some((entities, suffix, ext)) if ext == ".json" => found.push(Candidate {
                            path,
                            entities,
                            suffix,
                        }),
                        _ => {}
                    }
                }
            }
            found.sort_by(|a, b| a.path.cmp(&b.path));
            found
        })
    }

    fn json(&mut self, path: &Path) -> Result<&Json> {
        if !self.parsed.contains_key(path) {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let value: Value = serde_json::from_str(&text).map_err(|e| {
                Error::input(path, format!("is not valid JSON ({e}): fix the syntax"))
            })?;
            let Value::Object(map) = value else {
                return Err(Error::input(
                    path,
                    "a sidecar must hold a JSON object ({\"Key\": value, ...}): rewrite it as one",
                ));
            };
            self.parsed.insert(path.to_path_buf(), map);
        }
        Ok(&self.parsed[path])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn merges_from_root_to_file_closest_wins() {
        let tmp = tempfile::TempDir::new().unwrap();
        let root = tmp.path();
        let anat = root.join("sub-01/ses-1/anat");
        write(
            &root.join("MEGRE.json"),
            r#"{"MagneticFieldStrength": 3, "A": "root", "B": "root"}"#,
        );
        write(
            &root.join("echo-1_MEGRE.json"),
            r#"{"EchoTime": 0.004, "C": "root-echo1"}"#,
        );
        write(&root.join("echo-2_MEGRE.json"), r#"{"EchoTime": 0.008}"#);
        write(&root.join("T1w.json"), r#"{"A": "wrong suffix"}"#);
        write(
            &root.join("sub-01/sub-01_MEGRE.json"),
            r#"{"B": "subject"}"#,
        );
        write(
            &root.join("sub-01/sub-02_MEGRE.json"),
            r#"{"B": "other subject"}"#,
        );
        write(
            &root.join("sub-01/ses-1/sub-01_ses-1_MEGRE.json"),
            r#"{"D": "session"}"#,
        );
        write(
            &anat.join("sub-01_ses-1_echo-1_part-phase_MEGRE.json"),
            r#"{"C": "file", "EchoTime": 0.005}"#,
        );
        write(
            &anat.join("sub-01_ses-1_echo-1_part-mag_MEGRE.json"),
            r#"{"C": "mag"}"#,
        );
        let file = anat.join("sub-01_ses-1_echo-1_part-phase_MEGRE.nii.gz");
        let (meta, used) = Sidecars::new(root).resolve(&file).unwrap();
        assert_eq!(meta["MagneticFieldStrength"], json!(3));
        assert_eq!(meta["A"], json!("root"));
        assert_eq!(meta["B"], json!("subject"));
        assert_eq!(meta["C"], json!("file"));
        assert_eq!(meta["D"], json!("session"));
        assert_eq!(meta["EchoTime"], json!(0.005));
        assert_eq!(used.len(), 5, "{used:?}");
        assert_eq!(used[0], root.join("MEGRE.json"));
        assert_eq!(
            used[4],
            anat.join("sub-01_ses-1_echo-1_part-phase_MEGRE.json")
        );

        // Echo 2 has no file-level sidecar: EchoTime comes from the root.
        let file2 = anat.join("sub-01_ses-1_echo-2_part-phase_MEGRE.nii.gz");
        let (meta2, _) = Sidecars::new(root).resolve(&file2).unwrap();
        assert_eq!(meta2["EchoTime"], json!(0.008));
        assert!(!meta2.contains_key("C"));
    }

    #[test]
    fn invalid_json_names_the_file() {
        let tmp = tempfile::TempDir::new().unwrap();
        let root = tmp.path();
        write(&root.join("sub-01/anat/sub-01_MEGRE.json"), "{ not json");
        let err = Sidecars::new(root)
            .resolve(&root.join("sub-01/anat/sub-01_MEGRE.nii"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sub-01_MEGRE.json") && err.contains("not valid JSON"),
            "{err}"
        );
    }
}
