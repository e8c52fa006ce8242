//! One acquisition from its inputs to its derivative files.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::fields;
use super::progress::Stages;
use super::Config;
use crate::bids::{Acquisition, FieldKind, Source};
use crate::derivatives::{mask_volume, source_uri, Derivatives};
use crate::inversion::{self, Orientation, Problem};
use crate::{preprocess, Error, Mask, Result, Volume};

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Outputs from an earlier run exist and `--overwrite` was not given.
    AlreadyDone,
}

/// A map to write, with the sidecar fields specific to it.
struct Output {
    path: PathBuf,
    volume: Volume,
    sidecar: Value,
}

/// The local field and what produced it.
pub(super) struct LocalField {
    /// Local field in ppm, zero outside `mask`.
    pub field: Volume,
    /// Where the local field (and so χ) is valid.
    pub mask: Mask,
    /// Preprocessing outputs to write beside the Chimap.
    outputs: Vec<Output>,
    /// Parameters of every preprocessing stage that ran.
    pub parameters: Value,
}

pub fn process(
    acq: &Acquisition,
    root: &Path,
    config: &Config,
    deriv: &Derivatives,
    overwrite: bool,
) -> Result<Outcome> {
    let method = config.inversion.method();
    let chimap_path = deriv.path(&acq.entities, Some(method.name()), "Chimap");
    if !overwrite && Derivatives::exists(&chimap_path) {
        return Ok(Outcome::AlreadyDone);
    }
    let mut stages = Stages::new(&acq.name());
    let b0_tesla = acq.field_strength.or(config.field_strength);
    let common = common_sidecar(acq, root, b0_tesla);

    let local = match &acq.source {
        Source::Raw { echoes } => {
            let b0_tesla = b0_tesla.ok_or_else(|| missing_field_strength(acq, root))?;
            stages.start("load");
            let echoes = fields::load_echoes(echoes)?;
            raw_local_field(acq, echoes, b0_tesla, config, deriv, &mut stages)?
        }
        Source::FieldMap {
            kind,
            field,
            units,
            mask,
            echo_time,
        } => {
            stages.start("load");
            let field_ppm = fields::load_field_ppm(field, *units, *echo_time, b0_tesla)?;
            let mask_v = fields::load_mask(mask, &field_ppm, field)?;
            match kind {
                FieldKind::Local => {
                    let mut f = field_ppm;
                    zero_outside(&mut f.data, &mask_v);
                    LocalField {
                        field: f,
                        mask: mask_v,
                        outputs: Vec::new(),
                        parameters: json!({ "Input": "local field map" }),
                    }
                }
                FieldKind::Total => {
                    stages.start("background");
                    background_removal(acq, field_ppm, mask_v, config, deriv)?
                }
            }
        }
    };

    stages.start("inversion");
    let problem = Problem {
        dims: local.field.dims,
        voxel_size: local.field.geometry.voxel_size,
        orientations: vec![Orientation {
            field: &local.field.data,
            b0: acq.b0_direction,
        }],
        mask: &local.mask,
    };
    let mut chi = method.invert(&problem)?;
    let reference = inversion::reference_to_mean(&mut chi, &local.mask, &local.mask);
    stages.finish();

    let mut outputs = local.outputs;
    outputs.push(Output {
        path: deriv.path(&acq.entities, Some("local"), "fieldmap"),
        volume: local.field.clone(),
        sidecar: json!({
            "Units": "ppm",
            "Description": "Local (tissue) field relative to B0, after background field removal; zero outside the mask",
        }),
    });
    let chimap = Output {
        path: chimap_path,
        volume: local.field.with_data(chi),
        sidecar: json!({
            "Units": "ppm",
            "Description": "Magnetic susceptibility (QSM)",
            "Method": method.name(),
            "MethodParameters": method.parameters(),
            "Preprocessing": local.parameters,
            "ReferenceRegion": "mean over the mask of the local field (desc-local_fieldmap, non-zero voxels of its mask)",
            "ReferenceValueRemoved": reference,
            "ProcessingTimeSeconds": stages.to_json(),
        }),
    };
    // The Chimap goes last: its presence marks the acquisition finished.
    outputs.push(chimap);
    for o in outputs {
        let mut sidecar = common.clone();
        if let (Value::Object(s), Value::Object(extra)) = (&mut sidecar, o.sidecar) {
            s.extend(extra);
        }
        deriv.write(&o.path, &o.volume, &sidecar)?;
    }
    Ok(Outcome::Done)
}

/// Sidecar fields shared by every output of the acquisition.
fn common_sidecar(acq: &Acquisition, root: &Path, b0_tesla: Option<f64>) -> Value {
    let sources: Vec<String> = acq.inputs.iter().map(|p| source_uri(p)).collect();
    let mut v = json!({
        "Sources": sources,
        "B0Direction": acq.b0_direction,
        "B0DirectionFrame": "voxel axes (i, j, k), from the image affine",
        "ChimapVersion": crate::VERSION,
    });
    if let Some(t) = b0_tesla {
        v["MagneticFieldStrength"] = json!(t);
    }
    if let Source::Raw { echoes } = &acq.source {
        v["EchoTime"] = json!(echoes.iter().map(|e| e.echo_time).collect::<Vec<_>>());
    }
    let _ = root;
    v
}

fn missing_field_strength(acq: &Acquisition, root: &Path) -> Error {
    let file = acq
        .inputs
        .first()
        .map(|p| root.join(p))
        .unwrap_or_else(|| root.to_path_buf());
    Error::input(
        file,
        "MagneticFieldStrength is missing from the sidecar (after inheritance): add it in tesla, or pass --field-strength",
    )
}

fn zero_outside(data: &mut [f32], mask: &Mask) {
    for (v, &m) in data.iter_mut().zip(mask) {
        if !m {
            *v = 0.0;
        }
    }
}

/// Raw multi-echo phase → local field (scaling, offset removal, unwrapping, echo fit, mask,
/// signal voids, background removal).
fn raw_local_field(
    acq: &Acquisition,
    echoes: fields::Echoes,
    b0_tesla: f64,
    config: &Config,
    deriv: &Derivatives,
    stages: &mut Stages,
) -> Result<LocalField> {
    let _ = (acq, echoes, b0_tesla, config, deriv, stages);
    Err(Error::Numerics(
        "raw phase processing is being wired".into(),
    ))
}

/// Total field (ppm) + mask → local field, with the eroded mask written out.
fn background_removal(
    acq: &Acquisition,
    total_ppm: Volume,
    mask: Mask,
    config: &Config,
    deriv: &Derivatives,
) -> Result<LocalField> {
    let _ = (
        acq,
        total_ppm,
        mask,
        config,
        deriv,
        mask_volume as fn(&Volume, &[bool]) -> Volume,
    );
    let _ = &preprocess::Config::default();
    Err(Error::Numerics("background removal is being wired".into()))
}
