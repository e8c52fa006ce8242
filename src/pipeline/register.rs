//! The registration step of an as-scanned orientation set (on first-echo magnitudes): each
//! member's local field (never wrapped phase) moved onto the first member's grid, and its B0
//! direction in that frame.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::acquisition::LocalField;
use crate::bids::Acquisition;
use crate::derivatives::{source_uri, Derivatives};
use crate::register::{self, itk, rigid, Grid, Options, Rigid, Similarity};
use crate::{qc, Error, Result};

/// Where a member's transform to the reference lives (ITK text, LPS) beside its outputs.
pub fn transform_path(deriv: &Derivatives, acq: &Acquisition) -> PathBuf {
    deriv.folder(&acq.entities).join(format!(
        "{}_from-orig_to-ref_mode-image_xfm.txt",
        acq.name()
    ))
}

/// What registering an as-scanned set gives: every member's B0 direction in the reference
/// grid's voxel frame, a sidecar record per moved member, and their registration checks.
pub(super) struct SetRegistration {
    pub b0: Vec<[f64; 3]>,
    pub records: Vec<Value>,
    pub checks: Vec<qc::Check>,
}

/// Registers members 1.. to member 0 on their first-echo magnitudes (reusing a transform
/// written by an earlier run unless `overwrite`), resamples their fields, masks and weights
/// onto member 0's work grid in place, and writes every member's magnitude in that grid
/// ([`registered_magnitude_path`]) for the report's overlays. `set_prefix` names the set.
pub(super) fn to_reference(
    set_prefix: &str,
    members: &[&Acquisition],
    locals: &mut [LocalField],
    deriv: &Derivatives,
    overwrite: bool,
    options: &Options,
    qc_config: &qc::Config,
) -> Result<SetRegistration> {
    let (reference, rest) = locals.split_first_mut().expect("a set has two members");
    let ref_grid = Grid::new(reference.field.dims, &reference.field.geometry)?;
    let ref_mag = magnitude_of(reference, members[0])?;
    write_registered_magnitude(deriv, set_prefix, members[0], members[0], reference, None)?;
    let mut b0 = vec![members[0].b0_direction];
    let (mut records, mut checks) = (Vec::new(), Vec::new());
    for (local, acq) in rest.iter_mut().zip(&members[1..]) {
        let path = transform_path(deriv, acq);
        let mag = magnitude_of(local, acq)?;
        let reusable = !overwrite && path.is_file() && made_with(&path, options.similarity);
        let (t, record) = if reusable {
            reuse(&path, &ref_mag, &reference.mask, &mag, options)?
        } else {
            let r = register::register(&ref_mag, &reference.mask, &mag, &local.mask, options)
                .map_err(|e| Error::Numerics(format!("{}: registration: {e}", acq.name())))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            crate::io::write_atomic(&path, itk::to_text(&r.transform).as_bytes())?;
            let mut record = json!({
                "Similarity": r.similarity.name(),
                "NCCBefore": r.ncc_before,
                "NCCAfter": r.ncc_after,
                "Iterations": r.iterations,
                "Seconds": r.seconds,
            });
            if let (Some(before), Some(after)) = (r.mi_before, r.mi_after) {
                record["MutualInformationBefore"] = json!(before);
                record["MutualInformationAfter"] = json!(after);
            }
            (r.transform, record)
        };
        let grid = Grid::new(local.field.dims, &local.field.geometry)?;
        let sidecar = transform_sidecar(members[0], acq, &t, &record);
        crate::io::write_json(&path.with_extension("json"), &sidecar)?;
        resample_local(local, &grid, &ref_grid, reference, &t);
        write_registered_magnitude(deriv, set_prefix, members[0], acq, local, Some(&path))?;
        let b = register::b0_in_reference(&t, &reference.field.geometry);
        let ncc_after = record["NCCAfter"].as_f64().unwrap_or(f64::NAN);
        tracing::info!(
            "{}: head rotated {:.2}° from {} (B0 {:.1}° apart), NCC after {ncc_after:.3}{}",
            acq.name(),
            t.angle_degrees(),
            members[0].name(),
            rigid::angle_between_degrees(b, members[0].b0_direction),
            if record["Reused"] == true {
                " (transform reused)"
            } else {
                ""
            }
        );
        checks.extend(qc::orientations::registration(
            &qc::orientations::Registered {
                label: qc::orientations::member_label(set_prefix, &acq.name()),
                ncc_after,
                rotation_degrees: t.angle_degrees(),
            },
            &members[0].name(),
            qc_config,
        ));
        b0.push(b);
        records.push(sidecar);
    }
    Ok(SetRegistration {
        b0,
        records,
        checks,
    })
}

/// A transform written by an earlier run, with the similarity it gives now recomputed (a
/// reused transform has no registration record, but its check still needs the value).
fn reuse(
    path: &Path,
    ref_mag: &crate::Volume,
    ref_mask: &[bool],
    mag: &crate::Volume,
    options: &Options,
) -> Result<(Rigid, Value)> {
    let t = itk::read(path)?;
    let ncc = register::similarity(ref_mag, ref_mask, mag, &t, options.max_samples)?.ok_or_else(
        || {
            Error::input(
                path,
                "moves this orientation off the reference's brain (no overlap left): remove \
                 it, or rerun with --overwrite, to register again",
            )
        },
    )?;
    Ok((
        t,
        json!({ "Reused": true, "Similarity": options.similarity.name(), "NCCAfter": ncc }),
    ))
}

/// Whether the transform at `path` was found with `similarity` (its sidecar says; files from
/// before the choice existed were NCC). A changed choice registers again.
fn made_with(path: &Path, similarity: Similarity) -> bool {
    let recorded = std::fs::read_to_string(path.with_extension("json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["Similarity"].as_str().map(str::to_owned))
        .unwrap_or_else(|| Similarity::Ncc.name().to_owned());
    let same = recorded == similarity.name();
    if !same {
        tracing::info!(
            "{}: found with {recorded}, the configuration asks for {}: registering again",
            path.display(),
            similarity.name()
        );
    }
    same
}

/// Where a member's echo-combined magnitude in the reference's grid is written:
/// `<member>_space-ref_desc-rss_magnitude.nii.gz` (`space-ref` as in the transform's `to-ref`).
pub fn registered_magnitude_path(deriv: &Derivatives, acq: &Acquisition) -> PathBuf {
    let mut e = acq.entities.clone();
    e.other.insert("space".into(), "ref".into());
    deriv.path(&e, Some("rss"), "magnitude")
}

/// Writes `local`'s magnitude (already on the reference's work grid) cropped to the
/// reference's grid, with a sidecar naming the set, the reference and the transform
/// (`None` for the reference itself).
fn write_registered_magnitude(
    deriv: &Derivatives,
    set_prefix: &str,
    reference: &Acquisition,
    acq: &Acquisition,
    local: &LocalField,
    transform: Option<&Path>,
) -> Result<()> {
    let Some(mag) = &local.magnitude else {
        return Ok(());
    };
    let how = match transform {
        Some(_) => "moved into the reference orientation's grid by the rigid transform (trilinear)",
        None => "of the reference orientation itself, on its own grid",
    };
    let mut sidecar = json!({
        "Description": format!("Root-sum-of-squares magnitude over the echoes, {how}: for checking the registration by eye (which matched the first echo's magnitude)"),
        "Orientation": acq.name(),
        "Reference": reference.name(),
        "OrientationSet": set_prefix,
        "Sources": acq.inputs.iter().map(|p| source_uri(p)).collect::<Vec<_>>(),
        "ChimapVersion": crate::VERSION,
    });
    if let Some(t) = transform.and_then(|p| p.file_name()) {
        sidecar["Transform"] = json!(t.to_string_lossy());
    }
    let volume = local.field.with_data(mag.clone()).cropped(local.dims);
    deriv.write(&registered_magnitude_path(deriv, acq), &volume, &sidecar)
}

/// The member's first-echo magnitude as a volume on its work grid. Not the echoes'
/// root-sum-of-squares: intravoxel dephasing grows with TE and follows B0, which stays along
/// the scanner's z while the head turns, so later echoes pull the registration towards no
/// rotation (cli test's head, 15° turns, noiseless: 0.92° and 0.29° off with the
/// root-sum-of-squares of TE 4, 8, 12 ms, 0.55° and 0.12° with the 4 ms echo, 0.16° and
/// 0.07° with a 1 ms echo).
fn magnitude_of(local: &LocalField, acq: &Acquisition) -> Result<crate::Volume> {
    let m = local.magnitude_first.clone().ok_or_else(|| {
        Error::Numerics(format!(
            "{}: an as-scanned orientation set is registered on the magnitude, which this \
             series lacks",
            acq.name()
        ))
    })?;
    Ok(local.field.with_data(m))
}

fn transform_sidecar(
    reference: &Acquisition,
    acq: &Acquisition,
    t: &Rigid,
    record: &Value,
) -> Value {
    let mut v = json!({
        "Description": "Rigid transform from the reference orientation's world (fixed) to this orientation's (moving), ITK convention, LPS mm",
        "Orientation": acq.name(),
        "Reference": reference.name(),
        "RotationDegrees": t.angle_degrees(),
        "EulerDegreesXYZ": t.euler_degrees(),
        "TranslationMm": t.translation,
        "CentreRasMm": t.centre,
        "ChimapVersion": crate::VERSION,
    });
    if let (Value::Object(o), Value::Object(r)) = (&mut v, record) {
        o.extend(r.clone());
    }
    v
}

/// Moves one member's maps onto the reference work grid: the field and the void sources'
/// χ by cubic B-spline (trilinear shrinks the compact, strong void sources: on the MNI
/// as-scanned set at 7 T, LP-CNN scored 2.04 points worse than on the pre-registered set with
/// them moved trilinearly, 0.93 by spline), the rest (weights, magnitudes) trilinear.
fn resample_local(
    local: &mut LocalField,
    from: &Grid,
    to: &Grid,
    reference: &LocalField,
    t: &Rigid,
) {
    let (field, mask) = register::resample_masked(&local.field.data, &local.mask, from, to, t);
    let along = |v: &Option<Vec<f32>>| v.as_ref().map(|d| register::resample(d, from, to, t, 0.0));
    local.weight = along(&local.weight);
    local.void_chi = local
        .void_chi
        .as_ref()
        .map(|d| register::resample_spline(d, from, to, t, 0.0));
    local.magnitude = along(&local.magnitude);
    local.magnitude_first = along(&local.magnitude_first);
    local.field = reference.field.with_data(field);
    local.mask = mask;
}

/// Angles (degrees) between every pair of B0 directions: how well the set conditions COSMOS.
pub fn pairwise_angles(b0: &[[f64; 3]]) -> Vec<Value> {
    rigid::pairwise_degrees(b0)
        .into_iter()
        .map(|(pair, degrees)| json!({ "Pair": pair, "Degrees": degrees }))
        .collect()
}
