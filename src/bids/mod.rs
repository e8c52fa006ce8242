//! BIDS discovery: walk a dataset, parse entities, resolve sidecars by the inheritance
//! principle, and group files into acquisitions (all echoes of one series, magnitude paired
//! with phase) and multi-orientation sets.
//!
//! Raw datasets give `MEGRE` series (and `GRE`/`T2starw` with `echo-`). Derivative datasets
//! give precomputed field maps: `*_desc-local_fieldmap` (only inversion runs) or
//! `*_desc-total_fieldmap` (background removal and inversion run), each with a
//! `*_desc-brain_mask` beside it.
//!
//! Rules worth knowing:
//! - a MEGRE file without `part-` is a magnitude image (BIDS default); a series needs phase;
//! - a per-series problem (missing `EchoTime`, grids that disagree, no mask, ...) goes into
//!   [`Discovery::problems`], labelled with the series name, and the other series still run;
//! - when both `desc-local` and `desc-total` maps exist for the same entities, the local one
//!   is used (it is further along the pipeline);
//! - an orientation set holds every series of its group (same entities but `acq`/`run`) as
//!   soon as two of them differ in B0 direction by more than 1°; repeats of one orientation
//!   stay in the set since they still add data.

mod discover;
mod entities;
pub mod files;
pub(crate) mod masks;
mod pairs;
#[cfg(test)]
mod proptests;
mod sidecar;
#[cfg(test)]
mod tests;

pub use discover::{discover, discover_with_masks};
pub use entities::Entities;
pub use pairs::companion;

use std::path::PathBuf;

/// Which participants and sessions to process (labels without `sub-`/`ses-`); empty = all.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub participants: Vec<String>,
    pub sessions: Vec<String>,
    /// Which of a session's series may form a multi-orientation set.
    pub orientation_set: OrientationRule,
}

/// Which series of a session may join a multi-orientation set (the config's
/// `orientation_set`): globs (`*` any characters, `?` one) on the `acq-` and `run-` labels,
/// `null` accepting any label. A session often holds other series beside its head rotations
/// (a repeat, a high-resolution scan): with `acq: "ori*"` only `acq-ori1`, `acq-ori2`, …
/// form the set and the others are processed alone.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrientationRule {
    pub acq: Option<String>,
    pub run: Option<String>,
}

impl OrientationRule {
    /// Whether a series with these entities may join a set.
    pub fn admits(&self, e: &Entities) -> bool {
        let fits = |pattern: &Option<String>, label: &Option<String>| match (pattern, label) {
            (None, _) => true,
            (Some(p), Some(l)) => glob(p, l),
            (Some(_), None) => false,
        };
        fits(&self.acq, &e.acq) && fits(&self.run, &e.run)
    }
}

/// Whether `text` matches `pattern`, where `*` stands for any run of characters and `?` for
/// one.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    // matched[j]: the pattern so far matches text[..j].
    let mut matched = vec![false; t.len() + 1];
    matched[0] = true;
    for &c in &p {
        let mut next = vec![false; t.len() + 1];
        for j in 0..=t.len() {
            next[j] = match c {
                '*' => matched[j] || (j > 0 && next[j - 1]),
                '?' => j > 0 && matched[j - 1],
                c => j > 0 && matched[j - 1] && t[j - 1] == c,
            };
        }
        matched = next;
    }
    matched[t.len()]
}

/// One echo of a raw series.
#[derive(Clone, Debug)]
pub struct Echo {
    /// Echo time in seconds (the BIDS unit).
    pub echo_time: f64,
    pub phase: PathBuf,
    /// The magnitude image of the same echo, when the dataset has one.
    pub magnitude: Option<PathBuf>,
    /// For a 4D file holding all echoes along t: which frame is this echo.
    pub frame: Option<usize>,
}

/// Units of a precomputed field map, from its sidecar's `Units`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FieldUnits {
    Ppm,
    Hz,
    Rad,
    RadPerSecond,
}

/// What an acquisition starts from.
#[derive(Clone, Debug)]
pub enum Source {
    /// Multi-echo magnitude/phase, echoes sorted by echo time.
    Raw { echoes: Vec<Echo> },
    /// A field map computed elsewhere, in `units`, with a brain mask.
    FieldMap {
        kind: FieldKind,
        field: PathBuf,
        units: FieldUnits,
        mask: PathBuf,
        /// Echo time in seconds, needed only when `units` is `Rad`.
        echo_time: Option<f64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldKind {
    /// Total field: background removal still has to run.
    Total,
    /// Local (tissue) field: only inversion runs.
    Local,
}

/// One series to reconstruct into one `Chimap`.
#[derive(Clone, Debug)]
pub struct Acquisition {
    /// Entities of the source files minus `echo` and `part` (kept for output names).
    pub entities: Entities,
    /// The BIDS suffix of the source (`MEGRE`, `GRE`, `T2starw`, `fieldmap`).
    pub suffix: String,
    pub source: Source,
    /// B0 strength in tesla (`MagneticFieldStrength`), when known.
    pub field_strength: Option<f64>,
    /// Unit B0 direction in the voxel frame, from the affine of the first file.
    pub b0_direction: [f64; 3],
    /// Grid of the first file (spatial dims) and voxel size in mm.
    pub dims: [usize; 3],
    pub voxel_size: [f64; 3],
    /// Merged sidecar of the first phase (or field) file, after inheritance.
    pub sidecar: serde_json::Map<String, serde_json::Value>,
    /// Paths relative to the dataset root of every input file (for `Sources`).
    pub inputs: Vec<PathBuf>,
    /// A brain mask the user supplied (`--mask-dir`, or `--mask` of `chimap files`): it
    /// replaces the automatic mask of raw data and the mask beside a field map.
    pub user_mask: Option<UserMask>,
}

/// A brain mask supplied by the user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserMask {
    /// Where to read it.
    pub path: PathBuf,
    /// How the outputs' `Sources` name it (a BIDS URI).
    pub uri: String,
}

impl Acquisition {
    /// A readable name such as `sub-01_ses-2_acq-tilt_run-1`.
    pub fn name(&self) -> String {
        self.entities.prefix()
    }
}

/// Series of one session that differ only in `acq-`/`run-`: either registered to one grid
/// already, with B0 directions that differ (each carried by its affine), or raw series as
/// they come off the scanner, whose affines agree and whose head rotations registration
/// finds (`as_scanned`).
#[derive(Clone, Debug)]
pub struct OrientationSet {
    /// The members' affines give (nearly) one B0 direction: the head turned inside the image,
    /// so the members must be registered before a joint inversion.
    pub as_scanned: bool,
    pub subject: String,
    pub session: Option<String>,
    /// The members' shared entities (theirs without `acq` and `run`): the set's outputs are
    /// named from these.
    pub entities: Entities,
    /// Indices into `Discovery::acquisitions`.
    pub members: Vec<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatasetType {
    Raw,
    Derivative,
}

/// Everything found in a dataset.
#[derive(Debug)]
pub struct Discovery {
    pub root: PathBuf,
    pub dataset_type: DatasetType,
    /// `Name` from `dataset_description.json`, if present.
    pub name: Option<String>,
    pub acquisitions: Vec<Acquisition>,
    pub orientation_sets: Vec<OrientationSet>,
    /// Raw series of a session that differ only in `acq-`/`run-` and share one B0 direction:
    /// candidate head-rotation sets as scanned (`as_scanned`), which a joint method registers.
    /// Kept apart so that everything else sees the sets it always saw.
    pub scanned_sets: Vec<OrientationSet>,
    /// Series that were found but cannot be processed, each with the reason (the file and
    /// the fix). They make the run fail without stopping the other acquisitions.
    pub problems: Vec<(String, crate::Error)>,
}
