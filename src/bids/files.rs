//! `chimap files`: one acquisition from NIfTI files named on the command line (a workflow
//! step's inputs) instead of a BIDS dataset. It becomes a [`Discovery`] of one acquisition, so
//! the participant pipeline, its outputs, sidecars, QC and reports are the same as for BIDS.
//!
//! The "dataset" root is the deepest folder holding every input (the outputs' `Sources` name
//! the files relative to it); the acquisition's entities come from `--name`, else from the
//! first input's name.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{
    Acquisition, DatasetType, Discovery, Echo, Entities, FieldKind, FieldUnits, Source, UserMask,
};
use crate::derivatives::source_uri;
use crate::io::Header;
use crate::{Error, Result};

/// What the images of a file-mode run are.
#[derive(Clone, Debug)]
pub enum FileSource {
    /// Multi-echo phase and magnitude: one 3D file per echo, or one 4D file of all echoes.
    Raw {
        phase: Vec<PathBuf>,
        magnitude: Vec<PathBuf>,
        /// Seconds, one per echo, in the order of the files (or frames).
        echo_times: Vec<f64>,
    },
    /// A precomputed field map (with `mask`, required).
    FieldMap {
        kind: FieldKind,
        field: PathBuf,
        units: FieldUnits,
        /// Seconds; needed for `rad`.
        echo_time: Option<f64>,
    },
}

/// Everything `chimap files` was given.
#[derive(Clone, Debug)]
pub struct FileInputs {
    pub source: FileSource,
    /// Brain mask on the data's grid; replaces the automatic one.
    pub mask: Option<PathBuf>,
    /// Entities such as `sub-01_ses-2` for the output names.
    pub name: Option<String>,
}

/// The one-acquisition discovery of a file-mode run. Errors name the file and the fix.
pub fn from_files(inputs: &FileInputs) -> Result<Discovery> {
    let mut all: Vec<&Path> = match &inputs.source {
        FileSource::Raw {
            phase, magnitude, ..
        } => phase
            .iter()
            .chain(magnitude)
            .map(PathBuf::as_path)
            .collect(),
        FileSource::FieldMap { field, .. } => vec![field.as_path()],
    };
    all.extend(inputs.mask.as_deref());
    let mut canonical = Vec::with_capacity(all.len());
    for p in &all {
        if !p.is_file() {
            return Err(Error::input(p, "does not exist or is not a file"));
        }
        canonical.push(std::fs::canonicalize(p).map_err(|e| Error::io(p, e))?);
    }
    let root = common_folder(&canonical);
    let rel = |p: &Path| -> PathBuf {
        let c = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        c.strip_prefix(&root).map(Path::to_path_buf).unwrap_or(c)
    };
    let first = all[0];
    let entities = match &inputs.name {
        Some(n) => parse_name(n)?,
        None => name_from_file(first),
    };
    let user_mask = inputs.mask.as_ref().map(|m| UserMask {
        path: m.clone(),
        uri: source_uri(&rel(m)),
    });

    let (source, suffix, dataset_type, h, echo_times) = match &inputs.source {
        FileSource::Raw {
            phase,
            magnitude,
            echo_times,
        } => {
            let (echoes, h) = raw_echoes(phase, magnitude, echo_times)?;
            let times: Vec<f64> = echoes.iter().map(|e| e.echo_time).collect();
            (Source::Raw { echoes }, "MEGRE", DatasetType::Raw, h, times)
        }
        FileSource::FieldMap {
            kind,
            field,
            units,
            echo_time,
        } => {
            let Some(mask) = &inputs.mask else {
                return Err(Error::Usage(format!(
                    "a field map ({}) needs --mask: the brain mask on its grid",
                    field.display()
                )));
            };
            if *units == FieldUnits::Rad && echo_time.is_none() {
                return Err(Error::input(
                    field,
                    "is in rad, which needs its echo time: pass --echo-times with one value (ms)",
                ));
            }
            let h = crate::io::read_header(field)?;
            if h.frames != 1 {
                return Err(Error::input(
                    field,
                    format!("has {} frames: a field map must be one 3D image", h.frames),
                ));
            }
            let source = Source::FieldMap {
                kind: *kind,
                field: field.clone(),
                units: *units,
                mask: mask.clone(),
                echo_time: *echo_time,
            };
            let times = echo_time.iter().copied().collect();
            (source, "fieldmap", DatasetType::Derivative, h, times)
        }
    };
    let mut sidecar = serde_json::Map::new();
    if !echo_times.is_empty() {
        sidecar.insert("EchoTime".into(), json!(echo_times));
    }
    let inputs_rel: Vec<PathBuf> = match &source {
        Source::Raw { .. } => all
            .iter()
            .filter(|p| Some(**p) != inputs.mask.as_deref())
            .map(|p| rel(p))
            .collect(),
        Source::FieldMap { field, .. } => vec![rel(field)],
    };
    let acquisition = Acquisition {
        entities,
        suffix: suffix.into(),
        source,
        // From the configuration or --field-strength: plain NIfTI files carry none.
        field_strength: None,
        b0_direction: crate::physics::b0_direction(&h.geometry),
        dims: h.dims,
        voxel_size: h.geometry.voxel_size,
        sidecar,
        inputs: inputs_rel,
        user_mask,
    };
    Ok(Discovery {
        root,
        dataset_type,
        name: None,
        acquisitions: vec![acquisition],
        orientation_sets: Vec::new(),
        scanned_sets: Vec::new(),
        problems: Vec::new(),
    })
}

/// The echoes, sorted by echo time, and the first phase file's header.
fn raw_echoes(
    phase: &[PathBuf],
    magnitude: &[PathBuf],
    echo_times: &[f64],
) -> Result<(Vec<Echo>, Header)> {
    if phase.is_empty() {
        return Err(Error::Usage("--phase needs at least one file".into()));
    }
    if !magnitude.is_empty() && magnitude.len() != phase.len() {
        return Err(Error::Usage(format!(
            "{} --phase file(s) but {} --magnitude file(s): give one magnitude per phase file, \
             in the same order",
            phase.len(),
            magnitude.len()
        )));
    }
    let headers: Vec<Header> = phase
        .iter()
        .map(|p| crate::io::read_header(p))
        .collect::<Result<_>>()?;
    for ((p, hp), m) in phase.iter().zip(&headers).zip(magnitude) {
        let hm = crate::io::read_header(m)?;
        if hp.dims != hm.dims || hp.frames != hm.frames {
            return Err(Error::input(
                m,
                format!(
                    "grid {:?}×{} differs from its phase {} ({:?}×{}): pair each magnitude with \
                     the phase of the same echo(es)",
                    hm.dims,
                    hm.frames,
                    p.display(),
                    hp.dims,
                    hp.frames
                ),
            ));
        }
    }
    let four_d = phase.len() == 1 && headers[0].frames > 1;
    let n = if four_d {
        headers[0].frames
    } else {
        phase.len()
    };
    if let Some((p, h)) = phase.iter().zip(&headers).find(|(_, h)| h.frames != 1) {
        if !four_d {
            return Err(Error::input(
                p,
                format!(
                    "has {} frames: give either one 4D file holding all echoes, or one 3D file \
                     per echo",
                    h.frames
                ),
            ));
        }
    }
    if echo_times.len() != n {
        return Err(Error::input(
            &phase[0],
            format!(
                "{} echo(es) but --echo-times lists {}: give one echo time (ms) per echo",
                n,
                echo_times.len()
            ),
        ));
    }
    let mut echoes: Vec<Echo> = (0..n)
        .map(|i| {
            let file = if four_d { 0 } else { i };
            Echo {
                echo_time: echo_times[i],
                phase: phase[file].clone(),
                magnitude: magnitude.get(file).cloned(),
                frame: four_d.then_some(i),
            }
        })
        .collect();
    echoes.sort_by(|a, b| a.echo_time.total_cmp(&b.echo_time));
    if echoes.windows(2).any(|w| w[0].echo_time == w[1].echo_time) {
        return Err(Error::Usage(
            "--echo-times lists one echo time twice: each echo needs its own".into(),
        ));
    }
    Ok((
        echoes,
        headers.into_iter().next().expect("checked non-empty"),
    ))
}

/// The deepest folder holding every file (all canonical).
fn common_folder(files: &[PathBuf]) -> PathBuf {
    let mut root = files[0].parent().map(Path::to_path_buf).unwrap_or_default();
    for f in &files[1..] {
        while !f.starts_with(&root) {
            if !root.pop() {
                break;
            }
        }
    }
    root
}

/// `--name`: BIDS entities such as `sub-01` or `sub-01_ses-2_acq-x`.
fn parse_name(name: &str) -> Result<Entities> {
    let bad = || {
        Error::Usage(format!(
            "--name {name:?} is not BIDS entities such as sub-01 or sub-01_ses-2_acq-fast \
             (letters and digits only in each value; no echo-, part- or desc-)"
        ))
    };
    let (e, _, ext) = Entities::parse(&format!("{name}_MEGRE")).ok_or_else(bad)?;
    if e.sub.is_empty()
        || !ext.is_empty()
        || e.echo.is_some()
        || e.part.is_some()
        || e.desc.is_some()
        || e.pairs()
            .iter()
            .any(|(_, v)| !v.chars().all(|c| c.is_ascii_alphanumeric()))
    {
        return Err(bad());
    }
    Ok(e)
}

/// Entities from a file's name: its BIDS entities when it has some (echo/part/desc dropped),
/// else `sub-<letters and digits of the name>`, else `sub-files`.
fn name_from_file(path: &Path) -> Entities {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some((e, _, _)) = Entities::parse(&name).filter(|(e, _, _)| !e.sub.is_empty()) {
        return Entities {
            desc: None,
            ..e.without_echo_part()
        };
    }
    let stem = name.split('.').next().unwrap_or_default();
    let label: String = stem.chars().filter(char::is_ascii_alphanumeric).collect();
    Entities {
        sub: if label.is_empty() {
            "files".into()
        } else {
            label
        },
        ..Entities::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_option_or_the_file() {
        assert_eq!(parse_name("sub-01_ses-2").unwrap().prefix(), "sub-01_ses-2");
        for bad in ["01", "sub-01_echo-1", "sub-a.b", "sub-01_", "ses-1"] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
        let e = name_from_file(Path::new("/x/sub-3_acq-a_echo-1_part-phase_MEGRE.nii.gz"));
        assert_eq!(e.prefix(), "sub-3_acq-a");
        assert_eq!(
            name_from_file(Path::new("/x/my_phase.nii")).prefix(),
            "sub-myphase"
        );
        assert_eq!(name_from_file(Path::new("/x/_.nii")).prefix(), "sub-files");
    }

    #[test]
    fn the_root_is_the_deepest_common_folder() {
        let f = |s: &str| PathBuf::from(s);
        assert_eq!(
            common_folder(&[f("/a/b/x.nii"), f("/a/b/y.nii")]),
            f("/a/b")
        );
        assert_eq!(common_folder(&[f("/a/b/x.nii"), f("/a/c/m.nii")]), f("/a"));
        assert_eq!(common_folder(&[f("/a/b/x.nii"), f("/a/bc/m.nii")]), f("/a"));
    }
}
