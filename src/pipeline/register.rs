//! The registration step of an as-scanned orientation set: each member's local field (never
//! wrapped phase) moved onto the first member's grid, and its B0 direction in that frame.

use std::path::PathBuf;

use serde_json::{json, Value};

use super::acquisition::LocalField;
use crate::bids::Acquisition;
use crate::derivatives::Derivatives;
use crate::register::{self, itk, rigid, Grid, Options, Rigid};
use crate::{Error, Result};

/// Where a member's transform to the reference lives (ITK text, LPS) beside its outputs.
pub fn transform_path(deriv: &Derivatives, acq: &Acquisition) -> PathBuf {
    deriv.folder(&acq.entities).join(format!(
        "{}_from-orig_to-ref_mode-image_xfm.txt",
        acq.name()
    ))
}

/// Registers members 1.. to member 0 on their echo-combined magnitudes (reusing a transform
/// written by an earlier run unless `overwrite`), resamples their fields, masks and weights
/// onto member 0's work grid in place, and returns every member's B0 direction in that grid's
/// voxel frame with a QC record per member.
pub(super) fn to_reference(
    members: &[&Acquisition],
    locals: &mut [LocalField],
    deriv: &Derivatives,
    overwrite: bool,
) -> Result<(Vec<[f64; 3]>, Vec<Value>)> {
    let (reference, rest) = locals.split_first_mut().expect("a set has two members");
    let ref_grid = Grid::new(reference.field.dims, &reference.field.geometry)?;
    let ref_mag = magnitude_of(reference, members[0])?;
    let mut b0 = vec![members[0].b0_direction];
    let mut records = Vec::new();
    for (local, acq) in rest.iter_mut().zip(&members[1..]) {
        let path = transform_path(deriv, acq);
        let (t, record) = if !overwrite && path.is_file() {
            let t = itk::read(&path)?;
            (t, json!({ "Reused": true }))
        } else {
            let mag = magnitude_of(local, acq)?;
            let r = register::register(
                &ref_mag,
                &reference.mask,
                &mag,
                &local.mask,
                &Options::default(),
            )
            .map_err(|e| Error::Numerics(format!("{}: registration: {e}", acq.name())))?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            }
            crate::io::write_atomic(&path, itk::to_text(&r.transform).as_bytes())?;
            let record = json!({
                "NCCBefore": r.ncc_before,
                "NCCAfter": r.ncc_after,
                "Iterations": r.iterations,
                "Seconds": r.seconds,
            });
            (r.transform, record)
        };
        let grid = Grid::new(local.field.dims, &local.field.geometry)?;
        let sidecar = transform_sidecar(members[0], acq, &t, &record);
        crate::io::write_json(&path.with_extension("json"), &sidecar)?;
        resample_local(local, &grid, &ref_grid, reference, &t);
        let b = register::b0_in_reference(&t, &reference.field.geometry);
        tracing::info!(
            "{}: head rotated {:.2}° from {} (B0 {:.1}° apart), NCC after {}",
            acq.name(),
            t.angle_degrees(),
            members[0].name(),
            rigid::angle_between_degrees(b, members[0].b0_direction),
            record["NCCAfter"]
                .as_f64()
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "not recomputed (transform reused)".into())
        );
        b0.push(b);
        records.push(sidecar);
    }
    Ok((b0, records))
}

/// The member's magnitude as a volume on its work grid.
fn magnitude_of(local: &LocalField, acq: &Acquisition) -> Result<crate::Volume> {
    let m = local.magnitude.clone().ok_or_else(|| {
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

/// Moves one member's maps onto the reference work grid.
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
    local.void_chi = along(&local.void_chi);
    local.magnitude = along(&local.magnitude);
    local.field = reference.field.with_data(field);
    local.mask = mask;
}

/// Angles (degrees) between every pair of B0 directions: how well the set conditions COSMOS.
pub fn pairwise_angles(b0: &[[f64; 3]]) -> Vec<Value> {
    let mut out = Vec::new();
    for i in 0..b0.len() {
        for j in i + 1..b0.len() {
            out.push(json!({
                "Pair": [i, j],
                "Degrees": rigid::angle_between_degrees(b0[i], b0[j]),
            }));
        }
    }
    out
}
