//! The BIDS derivative dataset that a run writes: its `dataset_description.json`, the names
//! of outputs (derived from the source entities), and each map with its JSON sidecar.
//!
//! Outputs of one acquisition go to `sub-<label>/[ses-<label>/]anat/` under names such as
//! `sub-01_ses-1_acq-ori1_desc-tkd_Chimap.nii.gz`. Every file is written atomically, and the
//! `Chimap` is written last, so its presence marks a finished acquisition (reruns skip it
//! unless `--overwrite`).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

mod lock;

pub use lock::{Lock, Wait};

use crate::bids::Entities;
use crate::io::partial;
use crate::{io, Error, Result, Volume};

/// The lock that guards `dataset_description.json` and `.bidsignore`.
const DATASET_LOCK: &str = ".chimap-dataset.lock";

/// Files BIDS has no rule for yet: reports, QC, and the field maps, whose `fieldmap` suffix
/// the specification knows only as a raw `fmap/` image (QSM derivatives are not standardised).
/// (`figures` without a trailing slash: the schema-based validator matches folders so.)
const BIDSIGNORE: &[u8] =
    b"*.html\nlogs\nfigures\n*_desc-qc.json\ngroup_qc.tsv\ngroup_status.tsv\n\
*_fieldmap.nii.gz\n*_fieldmap.json\n";

const README: &str = "# chimap derivatives\n\nQuantitative susceptibility maps (`*_Chimap.nii.gz`, ppm) and the field maps and masks \
they were made from, written by chimap. Each file's JSON sidecar gives its units, method, \
parameters, B0 direction and sources; `sub-*.html` is the quality report of each subject.\n";

/// Name of the source dataset in BIDS URIs (`bids:raw:sub-01/anat/…`).
pub const SOURCE_LINK: &str = "raw";

/// A derivative dataset being written.
pub struct Derivatives {
    root: PathBuf,
    /// Where this run keeps intermediates (`--work-dir`), e.g. on node-local scratch.
    work_dir: Option<PathBuf>,
}

impl Derivatives {
    /// Creates (or reuses) `root` with its `dataset_description.json` and `.bidsignore`.
    pub fn create(root: &Path, source_root: &Path, command_line: &str) -> Result<Self> {
        Self::create_linked(root, source_root, &[], command_line)
    }

    /// [`Derivatives::create`], with more input datasets (e.g. user masks) linked by name in
    /// `DatasetLinks`, so that their files can be named by BIDS URIs in `Sources`.
    pub fn create_linked(
        root: &Path,
        source_root: &Path,
        links: &[(&str, &Path)],
        command_line: &str,
    ) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        let file_url = |p: &Path| -> Result<String> {
            let abs = std::fs::canonicalize(p).map_err(|e| Error::io(p, e))?;
            Ok(format!("file://{}", abs.display()))
        };
        let source_uri = file_url(source_root)?;
        let mut dataset_links = serde_json::Map::new();
        dataset_links.insert(SOURCE_LINK.into(), json!(source_uri));
        let mut sources = vec![json!({ "URL": source_uri })];
        for (name, path) in links {
            let url = file_url(path)?;
            sources.push(json!({ "URL": url }));
            dataset_links.insert((*name).into(), json!(url));
        }
        let description = json!({
            "Name": "chimap: quantitative susceptibility maps",
            "BIDSVersion": "1.10.0",
            "DatasetType": "derivative",
            "GeneratedBy": [{
                "Name": "chimap",
                "Version": crate::VERSION,
                "Description": format!("QSM from multi-echo gradient-echo phase; command line: {command_line}"),
            }],
            "SourceDatasets": sources,
            "DatasetLinks": dataset_links,
        });
        // Many runs (array jobs) may start on one OUTPUT_DIR at once: the shared files are
        // created if absent, or completed, under one lock, never rewritten blindly.
        let (_lock, _) = Lock::acquire(&root.join(DATASET_LOCK), "the dataset description")?;
        partial::remove_stale_in(root);
        update_description(&root.join("dataset_description.json"), description)?;
        let ignore = root.join(".bidsignore");
        if std::fs::read(&ignore).ok().as_deref() != Some(BIDSIGNORE) {
            io::write_atomic(&ignore, BIDSIGNORE)?;
        }
        // A README the user may edit: written only where there is none.
        let readme = root.join("README.md");
        if !readme.exists() {
            io::write_atomic(&readme, README.as_bytes())?;
        }
        Ok(Derivatives {
            root: root.to_path_buf(),
            work_dir: None,
        })
    }

    /// Keeps intermediates in `dir` (`--work-dir`): each acquisition's local field, so that
    /// a killed run resumes at the inversion.
    /// What killed runs left half-written there is removed.
    pub fn with_work_dir(mut self, dir: Option<PathBuf>) -> Self {
        if let Some(d) = &dir {
            partial::remove_stale_in(d);
        }
        self.work_dir = dir;
        self
    }

    /// Where intermediates go, if anywhere.
    pub fn work_dir(&self) -> Option<&Path> {
        self.work_dir.as_deref()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Folder of an acquisition's outputs.
    pub fn folder(&self, entities: &Entities) -> PathBuf {
        let mut dir = self.root.join(format!("sub-{}", entities.sub));
        if let Some(ses) = &entities.ses {
            dir = dir.join(format!("ses-{ses}"));
        }
        dir.join("anat")
    }

    /// Path of one output: `<prefix>[_desc-<desc>]_<suffix>.nii.gz`.
    pub fn path(&self, entities: &Entities, desc: Option<&str>, suffix: &str) -> PathBuf {
        let mut name = entities.prefix();
        if let Some(d) = desc {
            name.push_str(&format!("_desc-{d}"));
        }
        name.push_str(&format!("_{suffix}.nii.gz"));
        self.folder(entities).join(name)
    }

    /// Writes a map and its sidecar (same name, `.json`), atomically, creating folders.
    pub fn write(&self, path: &Path, volume: &Volume, sidecar: &Value) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        io::write_volume(path, volume)?;
        io::write_json(&sidecar_path(path), sidecar)
    }

    /// Takes the lock of one acquisition's outputs (`entities` name it), waiting while another
    /// run holds it, and removes what killed runs left half-written in its folder and in the
    /// `--work-dir` (a run killed while keeping its local field there leaves a temporary file
    /// that the run taking over must clear: the start-up sweep ran before it existed).
    pub fn lock(&self, entities: &Entities) -> Result<(Lock, Wait)> {
        let dir = self.folder(entities);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let name = entities.prefix();
        let got = Lock::acquire(&dir.join(format!(".{name}.lock")), &name)?;
        partial::remove_stale_in(&dir);
        if let Some(work) = &self.work_dir {
            partial::remove_stale_in(work);
        }
        Ok(got)
    }

    /// Removes the lock file of an acquisition that a killed run left (nobody holds it).
    pub fn clear_stale_lock(&self, entities: &Entities) {
        let path = self
            .folder(entities)
            .join(format!(".{}.lock", entities.prefix()));
        Lock::remove_if_stale(&path);
    }

    /// True when the output and its sidecar both exist (a finished earlier run).
    pub fn exists(path: &Path) -> bool {
        path.is_file() && sidecar_path(path).is_file()
    }
}

/// Writes `description` if the file is absent; otherwise keeps the existing one (the first
/// run's) and adds the dataset links and sources it lacks. Another dataset's description is
/// refused rather than replaced.
fn update_description(path: &Path, description: Value) -> Result<()> {
    if !path.exists() {
        return io::write_json(path, &description);
    }
    let mut existing = io::read_json(path)?;
    if existing["GeneratedBy"][0]["Name"].as_str() != Some("chimap") {
        return Err(Error::input(
            path,
            "belongs to another dataset (not generated by chimap): chimap would replace it; \
             choose an empty or chimap OUTPUT_DIR",
        ));
    }
    let mut changed = false;
    if let Some(links) = description["DatasetLinks"].as_object() {
        let have = &mut existing["DatasetLinks"];
        if !have.is_object() {
            *have = json!({});
        }
        for (name, url) in links {
            match have.get(name) {
                None => {
                    have[name] = url.clone();
                    changed = true;
                }
                Some(old) if old != url => tracing::warn!(
                    "{}: DatasetLinks.{name} is {old}, this run reads {url}; keeping the first",
                    path.display()
                ),
                Some(_) => {}
            }
        }
    }
    if let Some(sources) = description["SourceDatasets"].as_array() {
        if !existing["SourceDatasets"].is_array() {
            existing["SourceDatasets"] = json!([]);
        }
        let have = existing["SourceDatasets"]
            .as_array_mut()
            .expect("set above");
        for s in sources {
            if !have.contains(s) {
                have.push(s.clone());
                changed = true;
            }
        }
    }
    if changed {
        io::write_json(path, &existing)?;
    }
    Ok(())
}

/// `x.nii.gz` → `x.json`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name
        .strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .unwrap_or(&name);
    path.with_file_name(format!("{stem}.json"))
}

/// The BIDS URI of a file of the source dataset, given its path relative to that root.
pub fn source_uri(relative: &Path) -> String {
    dataset_uri(SOURCE_LINK, relative)
}

/// The BIDS URI of a file of the dataset linked as `link`, given its path relative to that
/// dataset's root.
pub fn dataset_uri(link: &str, relative: &Path) -> String {
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    format!("bids:{link}:{}", parts.join("/"))
}

/// A mask as a 0/1 volume on the grid of `like`.
pub fn mask_volume(like: &Volume, mask: &[bool]) -> Volume {
    like.with_data(mask.iter().map(|&m| if m { 1.0 } else { 0.0 }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entities() -> Entities {
        Entities {
            sub: "01".into(),
            ses: Some("2".into()),
            acq: Some("ori1".into()),
            ..Default::default()
        }
    }

    /// Taking an acquisition's lock clears a dead writer's temporary file from the
    /// `--work-dir` too, and leaves a live writer's alone.
    #[test]
    fn the_lock_clears_dead_writers_files_from_the_work_dir() {
        let (src, out, work) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let d = Derivatives::create(&out.path().join("d"), src.path(), "chimap")
            .unwrap()
            .with_work_dir(Some(work.path().to_path_buf()));
        // Written after the start-up sweep, as by a run killed mid-way.
        let host = partial::host_name();
        let dead = work
            .path()
            .join(format!(".x.partial-{host}-99999999-0.local-field"));
        std::fs::write(&dead, b"half").unwrap();
        let live = partial::partial_path(&work.path().join("y"), ".local-field");
        std::fs::write(&live, b"half").unwrap();
        let _lock = d.lock(&entities()).unwrap();
        assert!(!dead.exists() && live.exists());
    }

    #[test]
    fn sidecar_names_replace_the_nifti_extension() {
        assert_eq!(
            sidecar_path(Path::new("/a/x_Chimap.nii.gz")),
            PathBuf::from("/a/x_Chimap.json")
        );
        assert_eq!(
            sidecar_path(Path::new("x_mask.nii")),
            PathBuf::from("x_mask.json")
        );
    }

    #[test]
    fn source_uris_use_the_dataset_link() {
        assert_eq!(
            source_uri(Path::new(
                "sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"
            )),
            "bids:raw:sub-01/anat/sub-01_echo-1_part-phase_MEGRE.nii.gz"
        );
    }

    #[test]
    fn dataset_description_is_a_derivative_with_provenance() {
        let src = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let root = out.path().join("deriv");
        let d = Derivatives::create(&root, src.path(), "chimap in out participant").unwrap();
        let desc = io::read_json(&root.join("dataset_description.json")).unwrap();
        assert_eq!(desc["DatasetType"], "derivative");
        assert_eq!(desc["GeneratedBy"][0]["Name"], "chimap");
        assert_eq!(desc["GeneratedBy"][0]["Version"], crate::VERSION);
        assert!(desc["GeneratedBy"][0]["Description"]
            .as_str()
            .unwrap()
            .contains("chimap in out participant"));
        assert!(desc["DatasetLinks"]["raw"]
            .as_str()
            .unwrap()
            .starts_with("file:///"));
        let p = d.path(&entities(), Some("tkd"), "Chimap");
        assert!(
            p.ends_with("sub-01/ses-2/anat/sub-01_ses-2_acq-ori1_desc-tkd_Chimap.nii.gz"),
            "{}",
            p.display()
        );
    }
}
