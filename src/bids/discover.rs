//! Walks a BIDS dataset and groups its files into acquisitions.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use walkdir::WalkDir;

use super::masks::MaskIndex;
use super::sidecar::{Json, Sidecars};
use super::{
    Acquisition, DatasetType, Discovery, Echo, Entities, FieldKind, FieldUnits, Filter,
    OrientationRule, OrientationSet, Source, UserMask,
};
use crate::io::Header;
use crate::{Error, Result};

/// Two B0 directions closer than this (degrees) count as the same head orientation.
const SAME_ORIENTATION_DEG: f64 = 1.0;

/// An echo time above this many seconds is almost certainly given in milliseconds.
const MAX_ECHO_TIME_S: f64 = 1.0;

/// Folders that never hold the data of a participant-level run.
const SKIPPED_DIRS: &[&str] = &["derivatives", "sourcedata", "code"];

/// A NIfTI file with its parsed name.
#[derive(Clone, Debug)]
struct DataFile {
    path: PathBuf,
    entities: Entities,
    suffix: String,
    /// Name of the folder holding the file (`anat`, ...).
    datatype: String,
}

/// Problems collected while building one acquisition; each names its file and fix.
type Problems = Vec<Error>;

/// Finds every acquisition of the selected participants and sessions under `root`.
///
/// Fails only when `root` is not a BIDS dataset, when the filter selects nothing, when
/// `dataset_description.json` is unreadable, or when nothing processable was found at all;
/// a series that cannot be processed is reported in [`Discovery::problems`] instead.
pub fn discover(root: &Path, filter: &Filter) -> Result<Discovery> {
    discover_with_masks(root, filter, None)
}

/// [`discover`], with each acquisition's brain mask taken from `mask_dir` (see
/// [`super::masks`]): an acquisition without a matching mask becomes a problem, since a
/// silent fall-back to the automatic mask would hide a mistake.
pub fn discover_with_masks(
    root: &Path,
    filter: &Filter,
    mask_dir: Option<&Path>,
) -> Result<Discovery> {
    let masks = mask_dir.map(MaskIndex::scan).transpose()?;
    if !root.is_dir() {
        return Err(Error::Usage(format!(
            "{} does not exist or is not a folder: give the root folder of a BIDS dataset",
            root.display()
        )));
    }
    let description = read_description(root)?;
    let subjects = list_labelled_dirs(root, "sub-");
    if description.is_none() && subjects.is_empty() {
        return Err(Error::Usage(format!(
            "{} is not a BIDS dataset: expected dataset_description.json and sub-<label>/ folders",
            root.display()
        )));
    }
    let dataset_type = match description.as_ref().and_then(|d| d.get("DatasetType")) {
        Some(Value::String(t)) if t.eq_ignore_ascii_case("derivative") => DatasetType::Derivative,
        _ => DatasetType::Raw,
    };
    let name = description
        .as_ref()
        .and_then(|d| d.get("Name"))
        .and_then(Value::as_str)
        .map(str::to_string);

    let mut problems: Vec<(String, Error)> = Vec::new();
    let selected = select_subjects(root, &subjects, filter, &mut problems)?;
    let before_walk = problems.len();
    let files = walk_subjects(root, &selected, &mut problems);
    // An acquisition with an unreadable file (content not fetched) is given up whole, with
    // that error only: the pairing errors its gap would cause say nothing more.
    let walk_problems = problems.split_off(before_walk);
    let unreadable: std::collections::HashSet<String> =
        walk_problems.iter().map(|(n, _)| n.clone()).collect();
    let files = select_sessions(files, filter)?;

    let mut sidecars = Sidecars::new(root);
    let mut acquisitions = match dataset_type {
        DatasetType::Raw => {
            raw_acquisitions(root, &files, &mut sidecars, masks.as_ref(), &mut problems)
        }
        DatasetType::Derivative => {
            fieldmap_acquisitions(root, &files, &mut sidecars, masks.as_ref(), &mut problems)
        }
    };
    acquisitions.sort_by(|a, b| {
        (&a.entities.sub, &a.entities.ses, a.name(), &a.suffix).cmp(&(
            &b.entities.sub,
            &b.entities.ses,
            b.name(),
            &b.suffix,
        ))
    });
    acquisitions.retain(|a| !unreadable.contains(&a.name()));
    problems.retain(|(name, _)| !unreadable.contains(name));
    problems.extend(walk_problems);
    problems.sort_by(|a, b| a.0.cmp(&b.0));

    if acquisitions.is_empty() && problems.is_empty() {
        let expected = match dataset_type {
            DatasetType::Raw => {
                "expected sub-<label>/[ses-<label>/]anat/sub-<label>_echo-<n>_part-phase_MEGRE.nii[.gz] \
                 (for precomputed field maps, set \"DatasetType\": \"derivative\" in \
                 dataset_description.json)"
            }
            DatasetType::Derivative => {
                "expected sub-<label>/[ses-<label>/]anat/sub-<label>_desc-local_fieldmap.nii[.gz] \
                 or *_desc-total_fieldmap.nii[.gz], each with a *_desc-brain_mask.nii[.gz]"
            }
        };
        return Err(Error::Usage(format!(
            "no series to process in {} for the selected participants: {expected}",
            root.display()
        )));
    }

    let (scanned_sets, orientation_sets) = orientation_sets(&acquisitions, &filter.orientation_set)
        .into_iter()
        .partition(|s| s.as_scanned);
    Ok(Discovery {
        root: root.to_path_buf(),
        dataset_type,
        name,
        acquisitions,
        orientation_sets,
        scanned_sets,
        problems,
    })
}

fn read_description(root: &Path) -> Result<Option<Json>> {
    let path = root.join("dataset_description.json");
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(Some(map)),
        Ok(_) => Err(Error::input(
            &path,
            "must hold a JSON object with at least \"Name\" and \"BIDSVersion\": rewrite it",
        )),
        Err(e) => Err(Error::input(
            &path,
            format!("is not valid JSON ({e}): fix the syntax"),
        )),
    }
}

/// Labels of the `<prefix><label>` folders directly in `dir`, sorted.
fn list_labelled_dirs(dir: &Path, prefix: &str) -> Vec<String> {
    let mut labels: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter_map(|n| n.strip_prefix(prefix).map(str::to_string))
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default();
    labels.sort();
    labels
}

/// Labels as given, with an accidental `sub-`/`ses-` prefix removed, deduplicated.
fn clean_labels(labels: &[String], prefix: &str) -> Vec<String> {
    let set: BTreeSet<String> = labels
        .iter()
        .map(|l| l.strip_prefix(prefix).unwrap_or(l).to_string())
        .collect();
    set.into_iter().collect()
}

fn or_none(labels: &[String]) -> String {
    if labels.is_empty() {
        "none".to_string()
    } else {
        labels.join(", ")
    }
}

fn select_subjects(
    root: &Path,
    subjects: &[String],
    filter: &Filter,
    problems: &mut Vec<(String, Error)>,
) -> Result<Vec<String>> {
    if subjects.is_empty() {
        return Err(Error::Usage(format!(
            "{} has no sub-<label>/ folders: a BIDS dataset keeps each participant's data in one",
            root.display()
        )));
    }
    let requested = clean_labels(&filter.participants, "sub-");
    if requested.is_empty() {
        return Ok(subjects.to_vec());
    }
    let (found, missing): (Vec<String>, Vec<String>) =
        requested.into_iter().partition(|l| subjects.contains(l));
    if found.is_empty() {
        return Err(Error::Usage(format!(
            "participant label(s) {} match no subject in {}; subjects present: {}",
            missing.join(", "),
            root.display(),
            subjects.join(", ")
        )));
    }
    // Asked-for participants that do not exist fail the run, but the others still run.
    for label in missing {
        problems.push((
            format!("sub-{label}"),
            Error::Usage(format!(
                "participant label {label} matches no sub-{label}/ folder in {}; subjects present: {}",
                root.display(),
                subjects.join(", ")
            )),
        ));
    }
    Ok(found)
}

fn select_sessions(files: Vec<DataFile>, filter: &Filter) -> Result<Vec<DataFile>> {
    let requested = clean_labels(&filter.sessions, "ses-");
    if requested.is_empty() {
        return Ok(files);
    }
    let present: BTreeSet<String> = files
        .iter()
        .filter_map(|f| f.entities.ses.clone())
        .collect();
    let kept: Vec<DataFile> = files
        .into_iter()
        .filter(|f| {
            f.entities
                .ses
                .as_ref()
                .is_some_and(|s| requested.contains(s))
        })
        .collect();
    if kept.is_empty() {
        return Err(Error::Usage(format!(
            "session label(s) {} match no session of the selected participants; sessions present: {}",
            requested.join(", "),
            or_none(&present.into_iter().collect::<Vec<_>>())
        )));
    }
    Ok(kept)
}

fn is_nifti_ext(ext: &str) -> bool {
    ext == ".nii" || ext == ".nii.gz"
}

/// The entries under `dir`, sorted by name, following links, without hidden entries and the
/// folders a BIDS dataset keeps apart (`derivatives`, `sourcedata`, `code`).
pub(super) fn dataset_walk(dir: &Path) -> impl Iterator<Item = walkdir::Result<walkdir::DirEntry>> {
    WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| {
            let name = e.file_name().to_string_lossy();
            e.depth() == 0
                || !(name.starts_with('.')
                    || (e.file_type().is_dir() && SKIPPED_DIRS.contains(&name.as_ref())))
        })
}

/// Why a file of the dataset cannot be read. A link whose target is missing is what a
/// DataLad (git-annex) dataset holds for content that was not fetched: say so, and how to
/// get it.
fn unreadable(path: &Path, e: &walkdir::Error) -> Error {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if is_link && !path.exists() {
        let target = std::fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_default();
        let how = if target.contains(".git/annex") || target.contains("annex/objects") {
            format!(
                "an annexed file whose content was not fetched: run `datalad get {}` (or \
                 `git annex get`) in the dataset",
                path.display()
            )
        } else {
            "a broken link: restore its target or remove the link".to_string()
        };
        return Error::input(
            path,
            format!("content not present (a link to {target}): {how}"),
        );
    }
    Error::input(
        path,
        format!("cannot be read ({e}): fix the permissions, or fetch the file's content"),
    )
}

/// Every BIDS-named NIfTI file under the selected `sub-<label>/` folders, sorted by path.
fn walk_subjects(
    root: &Path,
    subjects: &[String],
    problems: &mut Vec<(String, Error)>,
) -> Vec<DataFile> {
    let mut files = Vec::new();
    for label in subjects {
        let sub_dir = root.join(format!("sub-{label}"));
        for entry in dataset_walk(&sub_dir) {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    // Broken links are typical of DataLad datasets whose content was not
                    // fetched; only report them when they look like images or sidecars.
                    let path = e
                        .path()
                        .map(Path::to_path_buf)
                        .unwrap_or_else(|| sub_dir.clone());
                    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
                    let relevant = name.as_deref().is_some_and(|n| {
                        n.ends_with(".nii") || n.ends_with(".nii.gz") || n.ends_with(".json")
                    }) || e.path().is_none();
                    if relevant {
                        // Named after its acquisition, so that only that one is given up.
                        let owner = name
                            .as_deref()
                            .and_then(Entities::parse)
                            .map(|(entities, _, _)| entities.prefix())
                            .unwrap_or_else(|| format!("sub-{label}"));
                        problems.push((owner, unreadable(&path, &e)));
                    }
                    continue;
                }
            };
            if !entry.file_type().is_file() {
                continue;
            }
            let path = entry.path().to_path_buf();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            let Some((entities, suffix, ext)) = Entities::parse(name) else {
                continue;
            };
            if !is_nifti_ext(&ext) {
                continue;
            }
            if let Some(err) = misplaced(&sub_dir, &path, label, &entities) {
                problems.push((entities.prefix(), err));
                continue;
            }
            let datatype = path
                .parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push(DataFile {
                path,
                entities,
                suffix,
                datatype,
            });
        }
    }
    files
}

/// A file whose `sub-`/`ses-` entities disagree with the folders it lies in.
fn misplaced(sub_dir: &Path, path: &Path, label: &str, entities: &Entities) -> Option<Error> {
    if entities.sub != label {
        return Some(Error::input(
            path,
            format!(
                "is named for sub-{} but lies in sub-{label}/: rename or move it so name and folder agree",
                or_dash(&entities.sub)
            ),
        ));
    }
    let rel = path.strip_prefix(sub_dir).ok()?;
    let ses_dir = rel
        .components()
        .next()
        .and_then(|c| c.as_os_str().to_str())
        .and_then(|c| c.strip_prefix("ses-"))
        .filter(|_| rel.components().count() > 1);
    match (ses_dir, entities.ses.as_deref()) {
        (Some(dir), Some(ses)) if dir == ses => None,
        (None, None) => None,
        (dir, ses) => Some(Error::input(
            path,
            format!(
                "has ses-{} in its name but lies in {}: rename or move it so name and folder agree",
                ses.unwrap_or("<none>"),
                dir.map(|d| format!("ses-{d}/"))
                    .unwrap_or_else(|| "no session folder".into())
            ),
        )),
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "<none>"
    } else {
        s
    }
}

fn relative(root: &Path, path: &Path) -> PathBuf {
    path.strip_prefix(root).unwrap_or(path).to_path_buf()
}

/// The sidecar a user would edit for `file`: same folder, same name, `.json`.
fn own_sidecar(file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let stem = name.split('.').next().unwrap_or(name);
    file.with_file_name(format!("{stem}.json"))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `MagneticFieldStrength` in tesla: `Ok(None)` when absent, an error when not a positive number.
fn field_strength(meta: &Json, file: &Path) -> std::result::Result<Option<f64>, Error> {
    match meta.get("MagneticFieldStrength") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(t) if t.is_finite() && t > 0.0 => Ok(Some(t)),
            _ => Err(Error::input(
                own_sidecar(file),
                format!(
                    "MagneticFieldStrength is {v}: write it as a positive number in tesla \
                     (e.g. 3), in this sidecar of {}",
                    file_name(file)
                ),
            )),
        },
    }
}

/// Checks one echo time in seconds.
fn check_echo_time(v: &Value) -> std::result::Result<f64, String> {
    match v.as_f64() {
        Some(t) if t.is_finite() && t > 0.0 && t <= MAX_ECHO_TIME_S => Ok(t),
        Some(t) if t.is_finite() && t > MAX_ECHO_TIME_S => Err(format!(
            "EchoTime {t} looks like milliseconds: BIDS gives EchoTime in seconds (e.g. {})",
            t / 1000.0
        )),
        _ => Err(format!("EchoTime {v} is not a positive number of seconds")),
    }
}

fn missing_echo_time(file: &Path) -> Error {
    Error::input(
        file,
        format!(
            "no EchoTime in its sidecar: add \"EchoTime\" (in seconds) to {}",
            own_sidecar(file).display()
        ),
    )
}

fn bad_echo_time(file: &Path, why: String) -> Error {
    Error::input(
        file,
        format!("{why}; fix it in {}", own_sidecar(file).display()),
    )
}

/// The grid of `file`, or a problem.
fn header(file: &Path, problems: &mut Problems) -> Option<Header> {
    match crate::io::read_header(file) {
        Ok(h) => Some(h),
        Err(e) => {
            problems.push(e);
            None
        }
    }
}

fn grid_mismatch(a: &Path, ha: &Header, b: &Path, hb: &Header) -> Error {
    Error::input(
        b,
        format!(
            "grid {:?}×{} differs from {} ({:?}×{}): all echoes and magnitude/phase images of a \
             series must share one grid; re-export them together",
            hb.dims,
            hb.frames,
            a.display(),
            ha.dims,
            ha.frames
        ),
    )
}

// ---------------------------------------------------------------------------------------
// Raw multi-echo series

fn is_raw_series(f: &DataFile) -> bool {
    f.datatype == "anat"
        && match f.suffix.as_str() {
            "MEGRE" => true,
            // Single-echo GRE/T2starw are not multi-echo series unless they carry `echo-`.
            "GRE" | "T2starw" => f.entities.echo.is_some(),
            _ => false,
        }
}

fn raw_acquisitions(
    root: &Path,
    files: &[DataFile],
    sidecars: &mut Sidecars,
    masks: Option<&MaskIndex>,
    problems: &mut Vec<(String, Error)>,
) -> Vec<Acquisition> {
    let mut groups: BTreeMap<(Entities, String), Vec<&DataFile>> = BTreeMap::new();
    for f in files.iter().filter(|f| is_raw_series(f)) {
        groups
            .entry((f.entities.without_echo_part(), f.suffix.clone()))
            .or_default()
            .push(f);
    }
    let mut acquisitions = Vec::new();
    for ((entities, suffix), group) in groups {
        let user_mask = masks.map(|m| m.resolve(&entities)).transpose();
        match (
            raw_series(root, entities.clone(), suffix, &group, sidecars),
            user_mask,
        ) {
            (Ok(acq), Ok(user_mask)) => acquisitions.push(Acquisition { user_mask, ..acq }),
            (Ok(_), Err(e)) => problems.push((entities.prefix(), e)),
            (Err(mut errs), mask) => {
                errs.extend(mask.err());
                problems.extend(errs.into_iter().map(|e| (entities.prefix(), e)))
            }
        }
    }
    acquisitions
}

/// The images of one echo (or of the whole series, for a 4D file).
#[derive(Default)]
struct Pair<'a> {
    phase: Option<&'a DataFile>,
    magnitude: Option<&'a DataFile>,
}

fn raw_series(
    root: &Path,
    entities: Entities,
    suffix: String,
    group: &[&DataFile],
    sidecars: &mut Sidecars,
) -> std::result::Result<Acquisition, Problems> {
    let mut problems = Problems::new();
    let mut pairs: BTreeMap<Option<String>, Pair> = BTreeMap::new();
    let mut unsupported: Vec<&DataFile> = Vec::new();
    for &f in group {
        let slot = pairs.entry(f.entities.echo.clone()).or_default();
        // BIDS: a MEGRE file without `part-` is a magnitude image.
        let target = match f.entities.part.as_deref() {
            Some("phase") => &mut slot.phase,
            None | Some("mag") => &mut slot.magnitude,
            Some(_) => {
                unsupported.push(f);
                continue;
            }
        };
        if let Some(prev) = target {
            problems.push(Error::input(
                &f.path,
                format!(
                    "is the same image as {} (same entities): keep only one of them",
                    prev.path.display()
                ),
            ));
        } else {
            *target = Some(f);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    if pairs.values().all(|p| p.phase.is_none()) {
        let first = group[0];
        let msg = if unsupported.is_empty() {
            let mut phase_name = first.entities.clone();
            phase_name.part = Some("phase".into());
            format!(
                "magnitude images only: QSM needs the phase images (part-phase), e.g. {}.nii.gz \
                 beside it; export phase from the scanner and convert it with the magnitude",
                phase_name.file_stem(&first.suffix)
            )
        } else {
            "has part-real/part-imag or other parts but no part-phase images: QSM needs \
             part-phase (and ideally part-mag) images; convert the complex data to magnitude \
             and phase"
                .to_string()
        };
        return Err(vec![Error::input(&first.path, msg)]);
    }
    for (echo, p) in &pairs {
        if let (None, Some(m)) = (p.phase, p.magnitude) {
            let echo = echo.as_deref().unwrap_or("<none>");
            problems.push(Error::input(
                &m.path,
                format!(
                    "magnitude of echo {echo} has no matching part-phase file: add the phase \
                     image of that echo or remove this magnitude"
                ),
            ));
        }
    }
    if pairs.contains_key(&None) && pairs.len() > 1 {
        let single = pairs[&None]
            .phase
            .or(pairs[&None].magnitude)
            .map(|f| f.path.clone());
        problems.push(Error::input(
            single.unwrap_or_default(),
            "mixes a file without echo- with per-echo (echo-<n>) files of the same series: use \
             either one 4D file or one file per echo",
        ));
    }
    if !problems.is_empty() {
        return Err(problems);
    }

    // Read the sidecars and headers of every image.
    let mut echoes: Vec<Echo> = Vec::new();
    let mut first_grid: Option<(PathBuf, Header)> = None;
    let mut metas: Vec<(f64, Json)> = Vec::new();
    let mut phase_headers: BTreeMap<PathBuf, Header> = BTreeMap::new();
    let mut inputs = Vec::new();
    for p in pairs.values() {
        let Some(phase) = p.phase else { continue };
        let meta = match sidecars.resolve(&phase.path) {
            Ok((m, _)) => m,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let Some(h) = header(&phase.path, &mut problems) else {
            continue;
        };
        let mag_h = p
            .magnitude
            .and_then(|m| header(&m.path, &mut problems).map(|h| (m, h)));
        phase_headers.insert(phase.path.clone(), h.clone());
        match &first_grid {
            None => first_grid = Some((phase.path.clone(), h.clone())),
            Some((fp, fh)) if fh.dims != h.dims => {
                problems.push(grid_mismatch(fp, fh, &phase.path, &h))
            }
            _ => {}
        }
        if let Some((m, mh)) = &mag_h {
            if mh.dims != h.dims || mh.frames != h.frames {
                problems.push(grid_mismatch(&phase.path, &h, &m.path, mh));
            }
        }
        inputs.push(relative(root, &phase.path));
        if let Some(m) = p.magnitude {
            inputs.push(relative(root, &m.path));
        }
        let magnitude = p.magnitude.map(|m| m.path.clone());
        match (phase.entities.echo.is_some(), meta.get("EchoTime")) {
            (_, None | Some(Value::Null)) => problems.push(missing_echo_time(&phase.path)),
            (true, Some(v)) => {
                if h.frames != 1 {
                    problems.push(Error::input(
                        &phase.path,
                        format!(
                            "has {} frames but is one echo (echo-{}): per-echo files must be 3D",
                            h.frames,
                            phase.entities.echo.as_deref().unwrap_or_default()
                        ),
                    ));
                    continue;
                }
                match check_echo_time(v) {
                    Ok(te) => {
                        echoes.push(Echo {
                            echo_time: te,
                            phase: phase.path.clone(),
                            magnitude,
                            frame: None,
                        });
                        metas.push((te, meta.clone()));
                    }
                    Err(why) => problems.push(bad_echo_time(&phase.path, why)),
                }
            }
            (false, Some(v)) => {
                // One file for the whole series: one echo time per frame.
                let times: Vec<&Value> = match v {
                    Value::Array(a) => a.iter().collect(),
                    other => vec![other],
                };
                if times.len() != h.frames {
                    problems.push(bad_echo_time(
                        &phase.path,
                        format!(
                            "EchoTime lists {} value(s) but the image has {} frame(s): give one \
                             echo time (in seconds) per frame as a JSON array",
                            times.len(),
                            h.frames
                        ),
                    ));
                    continue;
                }
                for (n, t) in times.into_iter().enumerate() {
                    match check_echo_time(t) {
                        Ok(te) => {
                            echoes.push(Echo {
                                echo_time: te,
                                phase: phase.path.clone(),
                                magnitude: magnitude.clone(),
                                frame: (h.frames > 1).then_some(n),
                            });
                            metas.push((te, meta.clone()));
                        }
                        Err(why) => problems.push(bad_echo_time(&phase.path, why)),
                    }
                }
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // Stable sort so equal times keep file order; they are reported just below anyway.
    echoes.sort_by(|a, b| a.echo_time.total_cmp(&b.echo_time));
    metas.sort_by(|a, b| a.0.total_cmp(&b.0));
    for w in echoes.windows(2) {
        if w[0].echo_time == w[1].echo_time {
            return Err(vec![bad_echo_time(
                &w[1].phase,
                format!(
                    "EchoTime {} s is also the echo time of {}: each echo needs its own echo time",
                    w[1].echo_time,
                    file_name(&w[0].phase)
                ),
            )]);
        }
    }
    let (Some(first), Some((_, meta))) = (echoes.first(), metas.into_iter().next()) else {
        // Unreachable: a series with a phase file yields an echo or a problem.
        return Err(vec![Error::input(
            &group[0].path,
            "no echo found in this series",
        )]);
    };
    let first_phase = first.phase.clone();
    let Some(h) = phase_headers.remove(&first_phase) else {
        return Err(vec![Error::input(&first_phase, "header was not read")]);
    };
    let field_strength = field_strength(&meta, &first_phase).map_err(|e| vec![e])?;
    Ok(Acquisition {
        entities,
        suffix,
        source: Source::Raw { echoes },
        field_strength,
        b0_direction: crate::physics::b0_direction(&h.geometry),
        dims: h.dims,
        voxel_size: h.geometry.voxel_size,
        sidecar: meta,
        inputs,
        user_mask: None,
    })
}

// ---------------------------------------------------------------------------------------
// Derivative field maps

fn fieldmap_kind(f: &DataFile) -> Option<FieldKind> {
    if f.suffix != "fieldmap" || f.entities.echo.is_some() || f.entities.part.is_some() {
        return None;
    }
    match f.entities.desc.as_deref() {
        Some("local") => Some(FieldKind::Local),
        Some("total") => Some(FieldKind::Total),
        _ => None,
    }
}

fn parse_units(v: Option<&Value>) -> Option<FieldUnits> {
    match v?.as_str()?.trim().to_ascii_lowercase().as_str() {
        "ppm" => Some(FieldUnits::Ppm),
        "hz" => Some(FieldUnits::Hz),
        "rad" => Some(FieldUnits::Rad),
        "rad/s" => Some(FieldUnits::RadPerSecond),
        _ => None,
    }
}

fn fieldmap_acquisitions(
    root: &Path,
    files: &[DataFile],
    sidecars: &mut Sidecars,
    user_masks: Option<&MaskIndex>,
    problems: &mut Vec<(String, Error)>,
) -> Vec<Acquisition> {
    // Brain masks by folder and entities (without desc).
    let mut masks: BTreeMap<(PathBuf, Entities), &DataFile> = BTreeMap::new();
    for f in files {
        if f.suffix == "mask" && f.entities.desc.as_deref() == Some("brain") {
            let dir = f.path.parent().map(Path::to_path_buf).unwrap_or_default();
            masks.insert(
                (
                    dir,
                    Entities {
                        desc: None,
                        ..f.entities.clone()
                    },
                ),
                f,
            );
        }
    }
    // When both a local and a total field map exist, the local one is further along.
    let mut chosen: BTreeMap<(PathBuf, Entities), (FieldKind, &DataFile)> = BTreeMap::new();
    for f in files {
        let Some(kind) = fieldmap_kind(f) else {
            continue;
        };
        let dir = f.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let key = (
            dir,
            Entities {
                desc: None,
                ..f.entities.clone()
            },
        );
        match chosen.get(&key) {
            Some((FieldKind::Local, _)) => {}
            Some((FieldKind::Total, prev)) if kind == FieldKind::Total => {
                problems.push((
                    key.1.prefix(),
                    Error::input(
                        &f.path,
                        format!(
                            "is the same field map as {}: keep only one",
                            prev.path.display()
                        ),
                    ),
                ));
            }
            _ => {
                chosen.insert(key, (kind, f));
            }
        }
    }
    let mut acquisitions = Vec::new();
    for ((dir, entities), (kind, f)) in chosen {
        let mask = masks.get(&(dir, entities.clone())).copied();
        let user_mask = match user_masks.map(|m| m.resolve(&entities)).transpose() {
            Ok(m) => m,
            Err(e) => {
                problems.push((entities.prefix(), e));
                continue;
            }
        };
        match fieldmap(root, entities.clone(), kind, f, mask, user_mask, sidecars) {
            Ok(a) => acquisitions.push(a),
            Err(errs) => problems.extend(errs.into_iter().map(|e| (entities.prefix(), e))),
        }
    }
    acquisitions
}

fn fieldmap(
    root: &Path,
    entities: Entities,
    kind: FieldKind,
    f: &DataFile,
    mask: Option<&DataFile>,
    user_mask: Option<UserMask>,
    sidecars: &mut Sidecars,
) -> std::result::Result<Acquisition, Problems> {
    let mut problems = Problems::new();
    let meta = sidecars.resolve(&f.path).map_err(|e| vec![e])?.0;
    let units = parse_units(meta.get("Units"));
    if units.is_none() {
        let found = meta
            .get("Units")
            .map(|v| format!("is {v}"))
            .unwrap_or_else(|| "is missing".into());
        problems.push(Error::input(
            &f.path,
            format!(
                "sidecar \"Units\" {found}: set it to one of \"ppm\", \"Hz\", \"rad\", \"rad/s\" in {}",
                own_sidecar(&f.path).display()
            ),
        ));
    }
    let echo_time = match meta.get("EchoTime") {
        None | Some(Value::Null) => {
            if units == Some(FieldUnits::Rad) {
                problems.push(Error::input(
                    &f.path,
                    format!(
                        "Units is \"rad\", which needs the echo time: add \"EchoTime\" (in \
                         seconds) to {}",
                        own_sidecar(&f.path).display()
                    ),
                ));
            }
            None
        }
        Some(v) => match check_echo_time(v) {
            Ok(te) => Some(te),
            // Only a rad map needs the echo time; elsewhere a bad value is merely unused.
            Err(why) if units == Some(FieldUnits::Rad) => {
                problems.push(bad_echo_time(&f.path, why));
                None
            }
            Err(_) => None,
        },
    };
    let field_strength = field_strength(&meta, &f.path).unwrap_or_else(|e| {
        problems.push(e);
        None
    });
    let h = header(&f.path, &mut problems);
    if let Some(h) = &h {
        if h.frames != 1 {
            problems.push(Error::input(
                &f.path,
                format!("has {} frames: a field map must be one 3D image", h.frames),
            ));
        }
    }
    // A user's mask replaces the one beside the field map; its grid is checked on loading.
    let mask = match &user_mask {
        Some(u) => Some(u.path.clone()),
        None => mask.map(|m| m.path.clone()),
    };
    match (&mask, &user_mask) {
        (_, Some(_)) => {}
        (None, None) => {
            let mut m = f.entities.clone();
            m.desc = Some("brain".into());
            let ext = if file_name(&f.path).ends_with(".gz") {
                ".nii.gz"
            } else {
                ".nii"
            };
            problems.push(Error::input(
                &f.path,
                format!(
                    "no brain mask beside it: add {}{ext} (1 inside the brain, 0 outside) on \
                     the same grid",
                    m.file_stem("mask")
                ),
            ));
        }
        (Some(m), None) => {
            if let (Some(h), Some(mh)) = (&h, header(m, &mut problems)) {
                if mh.dims != h.dims {
                    problems.push(grid_mismatch(&f.path, h, m, &mh));
                }
            }
        }
    }
    let (Some(units), Some(h), Some(mask), true) = (units, h, mask, problems.is_empty()) else {
        return Err(problems);
    };
    Ok(Acquisition {
        entities,
        suffix: f.suffix.clone(),
        source: Source::FieldMap {
            kind,
            field: f.path.clone(),
            units,
            mask: mask.clone(),
            echo_time,
        },
        field_strength,
        b0_direction: crate::physics::b0_direction(&h.geometry),
        dims: h.dims,
        voxel_size: h.geometry.voxel_size,
        sidecar: meta,
        // A user's mask is not in this dataset: `Sources` names it by its own URI.
        inputs: if user_mask.is_some() {
            vec![relative(root, &f.path)]
        } else {
            vec![relative(root, &f.path), relative(root, &mask)]
        },
        user_mask,
    })
}

// ---------------------------------------------------------------------------------------
// Multi-orientation sets

fn orientation_sets(acquisitions: &[Acquisition], rule: &OrientationRule) -> Vec<OrientationSet> {
    let mut groups: BTreeMap<(Entities, String, u8), Vec<usize>> = BTreeMap::new();
    for (i, a) in acquisitions.iter().enumerate() {
        if !rule.admits(&a.entities) {
            continue;
        }
        // Raw series combine with raw series, local field maps with local field maps.
        let class = match &a.source {
            Source::Raw { .. } => 0,
            Source::FieldMap {
                kind: FieldKind::Local,
                ..
            } => 1,
            Source::FieldMap {
                kind: FieldKind::Total,
                ..
            } => 2,
        };
        let key = Entities {
            acq: None,
            run: None,
            ..a.entities.clone()
        };
        groups
            .entry((key, a.suffix.clone(), class))
            .or_default()
            .push(i);
    }
    let min_cos = SAME_ORIENTATION_DEG.to_radians().cos();
    let mut sets = Vec::new();
    for ((key, _, class), members) in groups {
        let rotated = members.iter().enumerate().any(|(n, &i)| {
            members[n + 1..].iter().any(|&j| {
                let (a, b) = (acquisitions[i].b0_direction, acquisitions[j].b0_direction);
                a[0] * b[0] + a[1] * b[1] + a[2] * b[2] < min_cos
            })
        });
        // Raw series with one B0 direction may be a head-rotation study as scanned: their
        // magnitudes let registration find the rotations. Field maps bring no magnitude, so
        // they form a set only when their affines already carry distinct B0 directions.
        let as_scanned = !rotated && class == 0;
        if members.len() >= 2 && (rotated || as_scanned) {
            sets.push(OrientationSet {
                as_scanned,
                subject: key.sub.clone(),
                session: key.ses.clone(),
                entities: key,
                members,
            });
        }
    }
    sets.sort_by(|a, b| a.members.cmp(&b.members));
    sets
}
