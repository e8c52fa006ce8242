//! BIDS entities parsed from a file name.
//!
//! A BIDS name is `key-value` pairs joined by `_`, then a suffix, then an extension that
//! starts at the first dot: `sub-01_ses-pre_echo-2_part-phase_MEGRE.nii.gz`.
use std::collections::BTreeMap;

/// The key-value entities of a BIDS file name, in BIDS order.
///
/// `sub` is empty for names without a `sub-` entity; those only occur for sidecars placed
/// higher up in the hierarchy (e.g. `MEGRE.json` at the dataset root), which apply to many
/// subjects by the inheritance principle.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entities {
    pub sub: String,
    pub ses: Option<String>,
    pub acq: Option<String>,
    pub rec: Option<String>,
    pub run: Option<String>,
    pub echo: Option<String>,
    pub part: Option<String>,
    pub desc: Option<String>,
    /// Any other entity, kept so that distinct series stay distinct.
    pub other: BTreeMap<String, String>,
}

/// Entity keys in the order the BIDS specification writes them; unknown keys go last.
const BIDS_ORDER: &[&str] = &[
    "sub",
    "ses",
    "sample",
    "task",
    "tracksys",
    "acq",
    "nuc",
    "voi",
    "ce",
    "trc",
    "stain",
    "rec",
    "dir",
    "run",
    "mod",
    "echo",
    "flip",
    "inv",
    "mt",
    "part",
    "proc",
    "hemi",
    "space",
    "split",
    "recording",
    "chunk",
    "seg",
    "res",
    "den",
    "label",
    "desc",
];

fn rank(key: &str) -> usize {
    BIDS_ORDER
        .iter()
        .position(|k| *k == key)
        .unwrap_or(BIDS_ORDER.len())
}

impl Entities {
    /// Parses a file name (no folders) into entities, suffix and extension.
    ///
    /// The extension keeps its leading dot (`.nii.gz`, `.json`) and is empty when the name
    /// has none. Returns `None` for names that do not follow the BIDS pattern: no suffix, a
    /// part without `-`, an empty key or value, a repeated key, or a suffix holding `-`.
    pub fn parse(file_name: &str) -> Option<(Entities, String, String)> {
        let (stem, extension) = match file_name.find('.') {
            Some(i) => (&file_name[..i], &file_name[i..]),
            None => (file_name, ""),
        };
        let mut parts: Vec<&str> = stem.split('_').collect();
        let suffix = parts.pop()?;
        if suffix.is_empty() || !suffix.chars().all(|c| c.is_ascii_alphanumeric()) {
            return None;
        }
        let mut entities = Entities::default();
        let mut seen = std::collections::HashSet::new();
        for part in parts {
            let (key, value) = part.split_once('-')?;
            if key.is_empty()
                || value.is_empty()
                || !key.chars().all(|c| c.is_ascii_alphanumeric())
                || !seen.insert(key)
            {
                return None;
            }
            let value = value.to_string();
            match key {
                "sub" => entities.sub = value,
                "ses" => entities.ses = Some(value),
                "acq" => entities.acq = Some(value),
                "rec" => entities.rec = Some(value),
                "run" => entities.run = Some(value),
                "echo" => entities.echo = Some(value),
                "part" => entities.part = Some(value),
                "desc" => entities.desc = Some(value),
                _ => {
                    entities.other.insert(key.to_string(), value);
                }
            }
        }
        Some((entities, suffix.to_string(), extension.to_string()))
    }

    /// All entities as `(key, value)` pairs in BIDS order.
    pub fn pairs(&self) -> Vec<(&str, &str)> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        if !self.sub.is_empty() {
            pairs.push(("sub", &self.sub));
        }
        let named = [
            ("ses", &self.ses),
            ("acq", &self.acq),
            ("rec", &self.rec),
            ("run", &self.run),
            ("echo", &self.echo),
            ("part", &self.part),
            ("desc", &self.desc),
        ];
        for (key, value) in named {
            if let Some(v) = value {
                pairs.push((key, v));
            }
        }
        for (k, v) in &self.other {
            pairs.push((k, v));
        }
        // Stable sort keeps unknown keys alphabetical (BTreeMap order) after known ones.
        pairs.sort_by_key(|(k, _)| rank(k));
        pairs
    }

    /// `sub-X[_ses-Y][_acq-Z][_rec-..][_run-N]` plus other entities, without echo/part/desc.
    pub fn prefix(&self) -> String {
        self.pairs()
            .into_iter()
            .filter(|(k, _)| !matches!(*k, "echo" | "part" | "desc"))
            .map(|(k, v)| format!("{k}-{v}"))
            .collect::<Vec<_>>()
            .join("_")
    }

    /// The full name `prefix..._suffix` including echo/part/desc, without extension.
    pub fn file_stem(&self, suffix: &str) -> String {
        let mut parts: Vec<String> = self
            .pairs()
            .into_iter()
            .map(|(k, v)| format!("{k}-{v}"))
            .collect();
        parts.push(suffix.to_string());
        parts.join("_")
    }

    /// These entities without `echo` and `part`: the key that groups one series.
    pub fn without_echo_part(&self) -> Entities {
        Entities {
            echo: None,
            part: None,
            ..self.clone()
        }
    }

    /// True when every entity set here has the same value in `other` (the inheritance
    /// principle's test for whether a sidecar applies to a file).
    pub fn is_subset_of(&self, other: &Entities) -> bool {
        let theirs: BTreeMap<&str, &str> = other.pairs().into_iter().collect();
        self.pairs()
            .into_iter()
            .all(|(k, v)| theirs.get(k) == Some(&v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_name() {
        let (e, suffix, ext) =
            Entities::parse("sub-01_ses-pre_acq-tilt_run-2_echo-3_part-phase_MEGRE.nii.gz")
                .unwrap();
        assert_eq!(e.sub, "01");
        assert_eq!(e.ses.as_deref(), Some("pre"));
        assert_eq!(e.acq.as_deref(), Some("tilt"));
        assert_eq!(e.run.as_deref(), Some("2"));
        assert_eq!(e.echo.as_deref(), Some("3"));
        assert_eq!(e.part.as_deref(), Some("phase"));
        assert_eq!(suffix, "MEGRE");
        assert_eq!(ext, ".nii.gz");
        assert_eq!(e.prefix(), "sub-01_ses-pre_acq-tilt_run-2");
        assert_eq!(
            e.file_stem(&suffix),
            "sub-01_ses-pre_acq-tilt_run-2_echo-3_part-phase_MEGRE"
        );
    }

    #[test]
    fn prefix_keeps_bids_order_for_other_entities() {
        // Written out of order on purpose: prefix() must reorder and drop echo/part/desc.
        let (e, _, _) =
            Entities::parse("sub-1_run-1_dir-AP_echo-1_desc-x_task-rest_zz-9_acq-a_T2starw.json")
                .unwrap();
        assert_eq!(e.prefix(), "sub-1_task-rest_acq-a_dir-AP_run-1_zz-9");
        assert_eq!(e.other.get("dir").map(String::as_str), Some("AP"));
    }

    #[test]
    fn odd_names() {
        // Inheritance-level sidecars have no subject.
        let (e, s, x) = Entities::parse("MEGRE.json").unwrap();
        assert_eq!(
            (e.sub.as_str(), s.as_str(), x.as_str()),
            ("", "MEGRE", ".json")
        );
        let (e, s, x) = Entities::parse("acq-tilt_MEGRE").unwrap();
        assert_eq!(
            (e.acq.as_deref(), s.as_str(), x.as_str()),
            (Some("tilt"), "MEGRE", "")
        );
        // Not BIDS names.
        for bad in [
            "",
            ".DS_Store",
            "dataset_description.json",
            "sub-01.nii.gz",
            "sub-01_echo-1_part-phase.nii",
            "sub-01__MEGRE.nii",
            "sub-_MEGRE.nii",
            "-01_MEGRE.nii",
            "sub-01_sub-02_MEGRE.nii",
            "sub-01_MEG-RE.nii",
        ] {
            assert!(Entities::parse(bad).is_none(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn subset_follows_values() {
        let (file, _, _) = Entities::parse("sub-01_acq-a_echo-2_part-phase_MEGRE.nii").unwrap();
        let (root, _, _) = Entities::parse("MEGRE.json").unwrap();
        let (echo2, _, _) = Entities::parse("echo-2_MEGRE.json").unwrap();
        let (echo1, _, _) = Entities::parse("echo-1_MEGRE.json").unwrap();
        let (other_sub, _, _) = Entities::parse("sub-02_MEGRE.json").unwrap();
        let (extra, _, _) = Entities::parse("sub-01_run-1_MEGRE.json").unwrap();
        assert!(root.is_subset_of(&file));
        assert!(echo2.is_subset_of(&file));
        assert!(!echo1.is_subset_of(&file));
        assert!(!other_sub.is_subset_of(&file));
        assert!(!extra.is_subset_of(&file));
    }
}
