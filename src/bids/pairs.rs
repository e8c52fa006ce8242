//! Pairs a derivative field map with a companion image of another suffix (e.g. a
//! reference `Chimap` from COSMOS) by entities, for training on user data.

use std::path::{Path, PathBuf};

use super::{Acquisition, Entities, Source};
use crate::{Error, Result};

/// The `suffix` image (NIfTI) in the folder of `acq`'s field map that belongs to it: one
/// with the same entities (ignoring `desc`), else one of the whole session (without `acq`
/// and `run`, as a COSMOS map shared by the orientations). With `desc`, only files with
/// that `desc-` count. An error names the field map and the fix when there is none or
/// more than one.
pub fn companion(acq: &Acquisition, suffix: &str, desc: Option<&str>) -> Result<PathBuf> {
    let Source::FieldMap { field, .. } = &acq.source else {
        return Err(Error::Config(format!(
            "{} is a raw series: training needs local field maps",
            acq.name()
        )));
    };
    let dir = field.parent().unwrap_or(Path::new("."));
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let key = |e: &Entities| Entities {
        desc: None,
        ..e.clone()
    };
    let session = |e: &Entities| Entities {
        acq: None,
        run: None,
        ..key(e)
    };
    let own = key(&acq.entities);
    let (mut exact, mut shared) = (Vec::new(), Vec::new());
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((e, s, ext)) = Entities::parse(name) else {
            continue;
        };
        if s != suffix || !(ext == ".nii" || ext == ".nii.gz") {
            continue;
        }
        if desc.is_some_and(|d| e.desc.as_deref() != Some(d)) {
            continue;
        }
        if key(&e) == own {
            exact.push(path);
        } else if key(&e) == session(&acq.entities) {
            shared.push(path);
        }
    }
    let mut found = if exact.is_empty() { shared } else { exact };
    found.sort();
    let wanted = match desc {
        Some(d) => format!("{}_desc-{d}_{suffix}.nii.gz", acq.entities.prefix()),
        None => format!("{}_{suffix}.nii.gz", acq.entities.prefix()),
    };
    match found.len() {
        0 => Err(Error::input(
            field,
            format!("has no reference {suffix} beside it: add {wanted} on the same grid"),
        )),
        1 => Ok(found.remove(0)),
        _ => Err(Error::input(
            field,
            format!(
                "matches {} {suffix} files ({}): choose one by its desc- label (data.derivatives.reference_desc of a training configuration)",
                found.len(),
                found
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        )),
    }
}
