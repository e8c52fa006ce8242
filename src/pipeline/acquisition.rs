//! One acquisition from its inputs to its derivative files.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::checkpoint::Checkpoint;
use super::fields;
use super::progress::Stages;
use super::Config;
use crate::bids::{Acquisition, Entities, FieldKind, OrientationSet, Source};
use crate::derivatives::{mask_volume, source_uri, Derivatives, Wait};
use crate::inversion::{self, Orientation, Problem};
use crate::{preprocess, qc, Error, Mask, Result, Volume};

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Outputs from an earlier run exist and `--overwrite` was not given.
    AlreadyDone,
}

/// A map to write, with the sidecar fields specific to it.
pub(super) struct Output {
    pub path: PathBuf,
    pub volume: Volume,
    pub sidecar: Value,
}

/// The local field and what produced it. Everything here lies on the padded work grid
/// (`work_dims`); `dims` is the input grid the outputs are cropped back to when written.
pub(super) struct LocalField {
    /// The input grid.
    pub dims: [usize; 3],
    /// Local field in ppm, zero outside `mask`.
    pub field: Volume,
    /// Where the local field (and so χ) is valid.
    pub mask: Mask,
    /// Preprocessing outputs to write beside the Chimap.
    pub outputs: Vec<Output>,
    /// Parameters of every preprocessing stage that ran.
    pub parameters: Value,
    /// χ of the signal voids modelled as sources (ppm), to add to the inversion's result.
    pub void_chi: Option<Vec<f32>>,
    /// Relative reliability of each voxel's field for the weighted methods (from the echo
    /// fit's noise); `None` when there is none (field-map inputs).
    pub weight: Option<Vec<f32>>,
    /// Root-sum-of-squares magnitude over the echoes, for MEDI's edge mask; `None` for
    /// field-map inputs.
    pub magnitude: Option<Vec<f32>>,
    /// The first (shortest) echo's magnitude, which an as-scanned set registers on; `None`
    /// for field-map inputs.
    pub magnitude_first: Option<Vec<f32>>,
    /// The local-field checks (run before inversion).
    pub checks: Vec<qc::Check>,
    /// The total field, kept only for the one-step methods (TFI).
    pub total: Option<Total>,
    /// The ventricles' CSF from R2*, for MEDI+0; only for raw phase with ≥ 2 echoes' magnitudes
    /// when MEDI runs with its CSF term.
    pub csf: Option<Mask>,
}

/// The total field (ppm, signal voids in-painted) on the work grid where it was measured
/// (`support`: the brain and the tissue around it), with its reliability, and the brain
/// mask, where χ is wanted.
pub(super) struct Total {
    pub field: Vec<f32>,
    pub support: Mask,
    pub weight: Option<Vec<f32>>,
    pub brain: Mask,
}

/// The total field (ppm) less the field of the fitted void sources, the voids refilled
/// harmonically from the corrected field around them: what the two-step methods get from
/// `fit_void_sources` for the local field, for the one-step methods. Without it their
/// dipole halos stay in the data and the inversion paints a ring around every source (MNI
/// head, SS-TV: χ off by > 0.1 ppm over ≈ 2 800 voxels around two calcifications).
fn total_without_void_sources(
    total: &Volume,
    void_chi: Option<&[f32]>,
    voids: &Mask,
    mask: &Mask,
    b0: [f64; 3],
) -> Vec<f32> {
    let Some(chi) = void_chi.filter(|c| c.iter().any(|&v| v != 0.0)) else {
        return total.data.clone();
    };
    let op = crate::physics::DipoleOperator::new(total.dims, total.geometry.voxel_size, b0);
    let halo = op.forward(chi);
    let corrected = total.with_data(total.data.iter().zip(&halo).map(|(&f, &h)| f - h).collect());
    let inside: Mask = voids.iter().zip(mask).map(|(&v, &m)| v && m).collect();
    preprocess::voids::harmonic_inpaint(&corrected, mask, &inside)
}

/// Data weight from the field's noise: `median(σ)/σ` in the mask, capped at 4 so that a few
/// very quiet voxels cannot dominate; 0 outside.
fn weight_from_noise(noise: &[f32], mask: &Mask) -> Vec<f32> {
    let median = preprocess::util::quantile(noise, Some(mask), 0.5).unwrap_or(0.0);
    noise
        .iter()
        .zip(mask)
        .map(|(&s, &m)| {
            if m && s > 0.0 && median > 0.0 {
                (median / s).min(4.0)
            } else {
                0.0
            }
        })
        .collect()
}

/// One acquisition: its local field, then χ from that orientation alone.
pub fn process(
    acq: &Acquisition,
    root: &Path,
    config: &Config,
    deriv: &Derivatives,
    overwrite: bool,
) -> Result<Outcome> {
    let method = config.inversion.method()?;
    let chimap_path = deriv.path(&acq.entities, Some(method.name()), "Chimap");
    let b0_tesla = acq.field_strength.or(config.field_strength);
    let keep_total = method.one_step();
    let checkpoint = deriv
        .work_dir()
        .map(|w| Checkpoint::new(w, acq, root, config, b0_tesla, keep_total));
    // A run killed between the Chimap and the checkpoint's removal leaves one behind.
    let done = || {
        checkpoint.iter().for_each(Checkpoint::remove);
        Ok(Outcome::AlreadyDone)
    };
    if !overwrite && Derivatives::exists(&chimap_path) {
        deriv.clear_stale_lock(&acq.entities);
        return done();
    }
    // One run at a time per acquisition; one that waited finds the work done.
    let (_lock, wait) = deriv.lock(&acq.entities)?;
    if wait == Wait::Waited && Derivatives::exists(&chimap_path) {
        return done();
    }
    let mut stages = Stages::new(&acq.name());
    let common = common_sidecar(acq, b0_tesla);
    let mut local = local_field_or_checkpoint(checkpoint.as_ref(), &acq.name(), || {
        local_field(acq, root, config, deriv, b0_tesla, keep_total, &mut stages)
    })?;
    if let Err(e) = gate_on_checks(deriv, &acq.entities, &local.checks, config) {
        // Keep what preprocessing made, so the report can show why it failed.
        let mut outputs = std::mem::take(&mut local.outputs);
        outputs.push(local_field_output(deriv, acq, &local));
        write_outputs(deriv, outputs, &common, local.dims)?;
        checkpoint.iter().for_each(Checkpoint::remove);
        return Err(e);
    }

    stages.start("inversion");
    // A one-step method inverts the total field and gives χ on the whole brain mask.
    let total = local.total.take();
    let chi_mask = total.as_ref().map_or(&local.mask, |t| &t.brain);
    let problem = Problem {
        dims: local.field.dims,
        voxel_size: local.field.geometry.voxel_size,
        orientations: vec![Orientation {
            field: &local.field.data,
            b0: acq.b0_direction,
        }],
        mask: chi_mask,
        weight: local.weight.as_deref(),
        magnitude: local.magnitude.as_deref(),
        total: total.as_ref().map(|t| inversion::TotalField {
            field: &t.field,
            support: &t.support,
            weight: t.weight.as_deref(),
        }),
        csf: local.csf.as_ref(),
    };
    let mut chi = method.invert(&problem)?;
    if let Some(v) = &local.void_chi {
        chi.iter_mut().zip(v).for_each(|(c, &s)| *c += s);
    }
    let reference = inversion::reference_to_mean(&mut chi, chi_mask, chi_mask);
    let reference_region = if total.is_some() {
        "mean over the brain mask (desc-brain_mask), where the total field was inverted"
    } else {
        "mean over the mask of the local field (desc-local_fieldmap, non-zero voxels of its mask)"
    };
    stages.finish();

    let mut outputs = std::mem::take(&mut local.outputs);
    outputs.push(local_field_output(deriv, acq, &local));
    // The Chimap goes last: its presence marks the acquisition finished.
    outputs.push(Output {
        path: chimap_path,
        volume: local.field.with_data(chi),
        sidecar: json!({
            "Units": "ppm",
            "Description": "Magnetic susceptibility (QSM)",
            "SkullStripped": true,
            "Method": method.name(),
            "MethodParameters": method.parameters(),
            "Preprocessing": local.parameters,
            "ReferenceRegion": reference_region,
            "ReferenceValueRemoved": reference,
            "ProcessingTimeSeconds": stages.to_json(),
            "PeakMemoryGiB": stages.peaks_json(),
        }),
    });
    write_outputs(deriv, outputs, &common, local.dims)?;
    checkpoint.iter().for_each(Checkpoint::remove);
    Ok(Outcome::Done)
}

/// The local field from the `--work-dir` checkpoint when there is a usable one, else from
/// `compute` (then kept there).
fn local_field_or_checkpoint(
    checkpoint: Option<&Checkpoint>,
    name: &str,
    compute: impl FnOnce() -> Result<LocalField>,
) -> Result<LocalField> {
    if let Some(local) = checkpoint.and_then(Checkpoint::load) {
        tracing::info!("{name}: local field taken from --work-dir; preprocessing skipped");
        return Ok(local);
    }
    let local = compute()?;
    if let Some(c) = checkpoint {
        c.save(&local);
    }
    Ok(local)
}

/// A multi-orientation set: every member's local field (written with the member's own
/// name), then one χ from all orientations jointly, named from the set's shared entities.
///
/// The members must share one voxel grid with the head in register: a head-rotation study
/// registered to one reference (or a simulation), with each member's B0 direction in that
/// common voxel frame.
pub fn process_set(
    set: &OrientationSet,
    acquisitions: &[Acquisition],
    root: &Path,
    config: &Config,
    deriv: &Derivatives,
    overwrite: bool,
) -> Result<Outcome> {
    let method = config.inversion.method()?;
    let chimap_path = deriv.path(&set.entities, Some(method.name()), "Chimap");
    let checkpoint = |acq: &Acquisition| {
        let b0_tesla = acq.field_strength.or(config.field_strength);
        deriv
            .work_dir()
            .map(|w| Checkpoint::new(w, acq, root, config, b0_tesla, false))
    };
    // A run killed between the Chimap and the checkpoints' removal leaves them behind.
    let done = || {
        for &i in &set.members {
            checkpoint(&acquisitions[i])
                .iter()
                .for_each(Checkpoint::remove);
        }
        Ok(Outcome::AlreadyDone)
    };
    if !overwrite && Derivatives::exists(&chimap_path) {
        deriv.clear_stale_lock(&set.entities);
        return done();
    }
    // The set's lock, then its members' (in order), as runs of other methods take those.
    let mut locks = vec![deriv.lock(&set.entities)?];
    for &i in &set.members {
        locks.push(deriv.lock(&acquisitions[i].entities)?);
    }
    if locks.iter().any(|(_, w)| *w == Wait::Waited) && Derivatives::exists(&chimap_path) {
        return done();
    }
    let members: Vec<&Acquisition> = set.members.iter().map(|&i| &acquisitions[i]).collect();
    let first = members[0];
    // As-scanned members are resampled onto the first one's grid, so any grids will do.
    for m in members[1..].iter().filter(|_| !set.as_scanned) {
        if m.dims != first.dims
            || m.voxel_size
                .iter()
                .zip(first.voxel_size)
                .any(|(a, b)| (a - b).abs() > 1e-3 * b.abs())
        {
            return Err(Error::input(
                root.join(&m.inputs[0]),
                format!(
                    "has grid {:?} with voxels {:?} mm, but {} has {:?} with {:?} mm: the \
                     orientations of a set must be registered to one grid before a joint \
                     inversion",
                    m.dims,
                    m.voxel_size,
                    first.name(),
                    first.dims,
                    first.voxel_size
                ),
            ));
        }
    }

    let mut stages = Stages::new(&set.entities.prefix());
    let mut locals = Vec::with_capacity(members.len());
    let mut checkpoints = Vec::new();
    for acq in &members {
        let b0_tesla = acq.field_strength.or(config.field_strength);
        let checkpoint = checkpoint(acq);
        let mut local = local_field_or_checkpoint(checkpoint.as_ref(), &acq.name(), || {
            local_field(acq, root, config, deriv, b0_tesla, false, &mut stages)
        })?;
        checkpoints.extend(checkpoint);
        let mut outputs = std::mem::take(&mut local.outputs);
        outputs.push(local_field_output(deriv, acq, &local));
        write_outputs(deriv, outputs, &common_sidecar(acq, b0_tesla), local.dims)?;
        gate_on_checks(deriv, &acq.entities, &local.checks, config)?;
        locals.push(local);
    }

    // B0 of each orientation in the voxel frame of the (first member's) grid.
    let mut b0: Vec<[f64; 3]> = members.iter().map(|a| a.b0_direction).collect();
    let mut registrations = Vec::new();
    let mut checks = Vec::new();
    if set.as_scanned {
        stages.start("registration");
        let r = super::register::to_reference(
            &set.entities.prefix(),
            &members,
            &mut locals,
            deriv,
            overwrite,
            &config.registration,
            &config.qc,
        )?;
        (b0, registrations, checks) = (r.b0, r.records, r.checks);
    }
    // The set's own checks (registration, conditioning of the B0 directions), in its qc json.
    checks.push(qc::orientations::conditioning(
        &b0,
        config.inversion.cosmos.threshold,
        &config.qc,
    ));
    gate_on_checks(deriv, &set.entities, &checks, config)?;

    stages.start("inversion");
    // χ is defined where every orientation's field is.
    let mut mask = locals[0].mask.clone();
    for l in &locals[1..] {
        mask.iter_mut().zip(&l.mask).for_each(|(a, &b)| *a &= b);
    }
    if !mask.iter().any(|&m| m) {
        return Err(Error::Numerics(format!(
            "{}: the masks of the orientations do not overlap",
            set.entities.prefix()
        )));
    }
    let weight = locals.iter().all(|l| l.weight.is_some()).then(|| {
        // A voxel is as reliable as its noisiest orientation.
        let mut w = locals[0].weight.clone().unwrap_or_default();
        for l in &locals[1..] {
            let lw = l.weight.as_deref().unwrap_or_default();
            w.iter_mut().zip(lw).for_each(|(a, &b)| *a = a.min(b));
        }
        w
    });
    let problem = Problem {
        dims: locals[0].field.dims,
        voxel_size: locals[0].field.geometry.voxel_size,
        orientations: locals
            .iter()
            .zip(&b0)
            .map(|(l, &b0)| Orientation {
                field: &l.field.data,
                b0,
            })
            .collect(),
        mask: &mask,
        weight: weight.as_deref(),
        magnitude: None,
        total: None,
        csf: None,
    };
    let mut chi = method.invert(&problem)?;
    // Void sources were fitted per orientation; their χ is one tissue property, so average.
    let voids: Vec<&Vec<f32>> = locals.iter().filter_map(|l| l.void_chi.as_ref()).collect();
    if !voids.is_empty() {
        let k = 1.0 / voids.len() as f32;
        for v in voids {
            chi.iter_mut().zip(v).for_each(|(c, &s)| *c += k * s);
        }
    }
    let reference = inversion::reference_to_mean(&mut chi, &mask, &mask);
    stages.finish();

    let sources: Vec<String> = members
        .iter()
        .flat_map(|a| a.inputs.iter().map(|p| source_uri(p)))
        .collect();
    let mut sidecar = json!({
        "Units": "ppm",
        "Description": "Magnetic susceptibility (QSM) from several head orientations inverted jointly",
        "SkullStripped": true,
        "Sources": sources,
        "SpatialReference": first.inputs.first().map(|p| source_uri(p)),
        "Orientations": members.iter().map(|a| a.name()).collect::<Vec<_>>(),
        "B0Directions": b0,
        "B0DirectionFrame": if set.as_scanned {
            "voxel axes (i, j, k) of the first orientation's grid, after rigid registration of each orientation to it"
        } else {
            "voxel axes (i, j, k) of the shared grid, from each series' affine"
        },
        "B0AnglesDegrees": super::register::pairwise_angles(&b0),
        "ChimapVersion": crate::VERSION,
        "Method": method.name(),
        "MethodParameters": method.parameters(),
        "Preprocessing": locals.iter().map(|l| l.parameters.clone()).collect::<Vec<_>>(),
        "ReferenceRegion": "mean over the intersection of the orientations' masks",
        "ReferenceValueRemoved": reference,
        "ProcessingTimeSeconds": stages.to_json(),
        "PeakMemoryGiB": stages.peaks_json(),
    });
    if let Some(t) = first.field_strength.or(config.field_strength) {
        sidecar["MagneticFieldStrength"] = json!(t);
    }
    if set.as_scanned {
        sidecar["Registration"] = json!(registrations);
    }
    let chimap = locals[0].field.with_data(chi);
    deriv.write(&chimap_path, &chimap.cropped(locals[0].dims), &sidecar)?;
    checkpoints.iter().for_each(Checkpoint::remove);
    Ok(Outcome::Done)
}

/// Writes the qc json of an acquisition or set (`entities` name it) and logs its warnings; a
/// failed check is an error naming the check and `--ignore-qc-failures`, unless
/// `qc.ignore_failures` is set.
fn gate_on_checks(
    deriv: &Derivatives,
    entities: &Entities,
    checks: &[qc::Check],
    config: &Config,
) -> Result<()> {
    let name = entities.prefix();
    let folder = deriv.folder(entities);
    std::fs::create_dir_all(&folder).map_err(|e| Error::io(&folder, e))?;
    let path = qc::json_path(&folder, &name);
    let ignore = config.qc.ignore_failures;
    qc::write_json(&path, &name, checks, ignore)?;
    for c in checks.iter().filter(|c| c.verdict != qc::Verdict::Pass) {
        tracing::warn!(
            "{name}: QC {} {} = {}: {}",
            c.verdict.as_str(),
            c.name,
            qc::format_value(c.value),
            c.message
        );
    }
    match qc::failure_message(checks) {
        Some(msg) if !ignore => Err(Error::input(path, msg)),
        Some(_) => {
            tracing::warn!("{name}: QC failures ignored (--ignore-qc-failures)");
            Ok(())
        }
        None => Ok(()),
    }
}

/// The local field of one acquisition on the padded work grid, from whatever it provides:
/// raw phase (every preprocessing stage), a total field map (background removal) or a
/// local field map (nothing).
fn local_field(
    acq: &Acquisition,
    root: &Path,
    config: &Config,
    deriv: &Derivatives,
    b0_tesla: Option<f64>,
    keep_total: bool,
    stages: &mut Stages,
) -> Result<LocalField> {
    Ok(match &acq.source {
        Source::Raw { echoes } => {
            let b0_tesla = b0_tesla.ok_or_else(|| missing_field_strength(acq, root))?;
            stages.start("load");
            let echoes = fields::load_echoes(echoes)?;
            raw_local_field(echoes, b0_tesla, config, deriv, acq, keep_total, stages)?
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
            let mask_v = match &acq.user_mask {
                Some(user) => fields::load_user_mask(&user.path, &field_ppm, field)?,
                None => fields::load_mask(mask, &field_ppm, field)?,
            };
            let dims = field_ppm.dims;
            let work = work_dims(dims);
            let field_w = field_ppm.padded(work);
            let mask_w = crate::volume::pad(&mask_v, dims, work, false);
            let (mut local, brain) = match kind {
                FieldKind::Local => {
                    let mut f = field_w;
                    zero_outside(&mut f.data, &mask_w);
                    let local = LocalField {
                        dims,
                        field: f,
                        mask: mask_w,
                        outputs: Vec::new(),
                        parameters: json!({ "Input": "local field map" }),
                        void_chi: None,
                        weight: None,
                        magnitude: None,
                        magnitude_first: None,
                        checks: Vec::new(),
                        total: None,
                        csf: None,
                    };
                    (local, None)
                }
                FieldKind::Total => {
                    stages.start("background removal");
                    let total = keep_total.then(|| Total {
                        field: field_w.data.clone(),
                        support: mask_w.clone(),
                        weight: None,
                        brain: mask_w.clone(),
                    });
                    let mut local =
                        background_removal(dims, field_w, mask_w.clone(), config, deriv, acq)?;
                    local.total = total;
                    (local, Some(mask_w))
                }
            };
            stages.start("checks");
            local.checks = qc::run(
                &qc::Inputs {
                    local_ppm: &local.field,
                    mask: &local.mask,
                    brain_mask: brain.as_ref(),
                    total_hz: None,
                    magnitude: None,
                    echo_coherence: None,
                    echo_times: &[],
                    echo_grid_mismatch_mm: None,
                    b0_direction: acq.b0_direction,
                    b0_tesla,
                },
                &config.qc,
            );
            local
        }
    })
}

/// The local field map output, in ppm.
fn local_field_output(deriv: &Derivatives, acq: &Acquisition, local: &LocalField) -> Output {
    Output {
        path: deriv.path(&acq.entities, Some("local"), "fieldmap"),
        volume: local.field.clone(),
        sidecar: json!({
            "Units": "ppm",
            "Description": "Local (tissue) field relative to B0, after background field removal; zero outside the mask",
            "SkullStripped": true,
        }),
    }
}

/// Writes each output cropped to the input grid, its sidecar being `common` plus its own.
fn write_outputs(
    deriv: &Derivatives,
    outputs: Vec<Output>,
    common: &Value,
    dims: [usize; 3],
) -> Result<()> {
    for o in outputs {
        let mut sidecar = common.clone();
        if let (Value::Object(s), Value::Object(extra)) = (&mut sidecar, o.sidecar) {
            s.extend(extra);
        }
        deriv.write(&o.path, &o.volume.cropped(dims), &sidecar)?;
    }
    Ok(())
}

/// Sidecar fields shared by every output of the acquisition.
fn common_sidecar(acq: &Acquisition, b0_tesla: Option<f64>) -> Value {
    let mut sources: Vec<String> = acq.inputs.iter().map(|p| source_uri(p)).collect();
    sources.extend(acq.user_mask.iter().map(|m| m.uri.clone()));
    let mut v = json!({
        "Sources": sources,
        // Outputs lie on the grid of the acquisition's first file.
        "SpatialReference": acq.inputs.first().map(|p| source_uri(p)),
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

/// Raw multi-echo phase → local field: phase scaling, offset removal, unwrapping and echo
/// fit, brain mask, signal voids, background removal.
fn raw_local_field(
    echoes: fields::Echoes,
    b0_tesla: f64,
    config: &Config,
    deriv: &Derivatives,
    acq: &Acquisition,
    keep_total: bool,
    stages: &mut Stages,
) -> Result<LocalField> {
    let pre = &config.preprocess;
    let fields::Echoes {
        mut phase,
        magnitude,
        echo_times,
        integer_phase,
        phase_paths,
    } = echoes;
    let echo_grid_mismatch_mm = phase
        .iter()
        .chain(&magnitude)
        .map(|v| qc::protocol::grid_mismatch_mm(&phase[0].geometry, &v.geometry, v.dims))
        .fold(0.0f64, f64::max);
    stages.start("phase scaling");
    let scaling =
        preprocess::scale::scale_phase(&mut phase, &phase_paths, integer_phase, &pre.scale)?;

    let dims = phase[0].dims;
    let work = work_dims(dims);
    let user_mask = user_brain_mask(acq, &phase[0], &phase_paths[0], work)?;
    // Consumed one echo at a time, so each input volume is freed once padded.
    let mut phase: Vec<Volume> = phase.into_iter().map(|v| v.padded(work)).collect();
    let magnitude: Vec<Volume> = magnitude.into_iter().map(|v| v.padded(work)).collect();
    let magnitude = (!magnitude.is_empty()).then_some(magnitude);

    let Some(rss) = magnitude
        .as_deref()
        .and_then(preprocess::echo_fit::root_sum_of_squares)
    else {
        return Err(Error::input(
            &phase_paths[0],
            "has no magnitude images (part-mag), which the brain mask is made from: add them, or give field maps with a desc-brain_mask in a derivative dataset",
        ));
    };

    // The mask's magnitude part needs no field, so it runs beside the echo fit and takes
    // the cores its sequential parts (region growing within a slab) leave idle.
    stages.start("echo fit and magnitude mask");
    let (fit, mask) = rayon::join(
        || {
            // In place: the wrapped phases are only needed again for echo coherence,
            // which compares echoes and so is blind to the offset removal.
            preprocess::echo_fit::fit_field_in_place(
                &mut phase,
                magnitude.as_deref(),
                &echo_times,
                &pre.echo_fit,
                &pre.unwrap,
            )
        },
        || {
            user_mask
                .is_none()
                .then(|| preprocess::mask::magnitude_mask(&rss, &pre.mask))
        },
    );
    let fit = fit?;

    let mask = match (user_mask, mask) {
        (Some(user), _) => user,
        (None, auto) => {
            stages.start("mask refinement");
            let auto = auto.expect("the magnitude mask is made whenever no mask was given")?;
            preprocess::mask::refine_mask(auto, &rss, Some(&fit.residual_rad), &pre.mask)?
        }
    };
    let first_magnitude = magnitude.as_deref().map(|m| &m[0]).unwrap_or(&rss);
    let echo_coherence = qc::echoes::pair_coherence(&phase, &mask);
    drop(phase);

    stages.start("signal voids");
    let filled = preprocess::voids::fill_voids(
        &fit.field_hz,
        &mask,
        Some(&rss),
        Some(&fit.residual_rad),
        &pre.voids,
    )?;
    let to_ppm = 1.0 / crate::physics::units::hz_per_ppm(b0_tesla);
    let total_ppm = filled.field.with_data(
        filled
            .field
            .data
            .iter()
            .map(|&v| (v as f64 * to_ppm) as f32)
            .collect(),
    );

    stages.start("background removal");
    // PDF weighs each voxel by the inverse noise of its field (the noise is capped, so finite).
    let weight: Option<Vec<f32>> = fit
        .noise_hz
        .as_ref()
        .map(|n| n.data.iter().map(|&s| 1.0 / s).collect());
    let mut local = preprocess::background::remove_background(
        &total_ppm,
        &mask,
        acq.b0_direction,
        weight.as_deref(),
        &pre.background,
    )?;
    let (void_chi, sources) = if pre.voids.enabled && pre.voids.fit_sources {
        stages.start("void sources");
        let (chi, sources) = preprocess::voids::fit_void_sources(
            &mut local.field,
            &local.mask,
            &filled.voids,
            &preprocess::voids::signal_loss(first_magnitude, &mask, &pre.voids),
            acq.b0_direction,
            &pre.voids,
        );
        (Some(chi), sources)
    } else {
        (None, Vec::new())
    };

    stages.start("checks");
    let checks = qc::run(
        &qc::Inputs {
            local_ppm: &local.field,
            mask: &local.mask,
            brain_mask: Some(&mask),
            total_hz: Some(&fit.field_hz),
            magnitude: Some(&rss),
            echo_coherence: Some(&echo_coherence),
            echo_times: &echo_times,
            echo_grid_mismatch_mm: Some(echo_grid_mismatch_mm),
            b0_direction: acq.b0_direction,
            b0_tesla: Some(b0_tesla),
        },
        &config.qc,
    );

    let e = &acq.entities;
    let mut outputs = vec![
        Output {
            path: deriv.path(e, Some("total"), "fieldmap"),
            volume: fit.field_hz,
            sidecar: json!({
                "Units": "Hz",
                "Description": "Total field offset from the multi-echo fit (receive-phase offset removed), before signal-void filling and background removal",
                "SkullStripped": false,
            }),
        },
        Output {
            path: deriv.path(e, Some("brain"), "mask"),
            volume: mask_volume(&rss, &mask),
            sidecar: brain_mask_sidecar(acq, &pre.mask),
        },
        Output {
            path: deriv.path(e, Some("voids"), "mask"),
            volume: mask_volume(&rss, &filled.voids),
            sidecar: json!({ "Type": "ROI", "Description": "Voxels whose signal was lost (dark magnitude or large fit residual); their field was replaced by harmonic in-painting before background removal" }),
        },
        Output {
            path: deriv.path(e, Some("eroded"), "mask"),
            volume: mask_volume(&rss, &local.mask),
            sidecar: json!({ "Type": "Brain", "Description": pre.background.mask_description() }),
        },
    ];
    // MEDI+0's CSF: the low-R2* region deep in the brain mask, from the echoes' decay.
    let medi = &config.inversion.medi;
    let csf = match magnitude.as_deref() {
        Some(mags)
            if config.inversion.method == inversion::MethodName::Medi
                && medi.csf_lambda > 0.0
                && mags.len() >= 2 =>
        {
            let r2 = preprocess::csf::r2star(mags, &echo_times, &mask);
            let voxel_size = rss.geometry.voxel_size;
            preprocess::csf::csf_mask(&r2, &mask, rss.dims, voxel_size, b0_tesla, &medi.csf)
        }
        _ => None,
    };
    if let Some(c) = &csf {
        outputs.push(Output {
            path: deriv.path(e, Some("csf"), "mask"),
            volume: mask_volume(&rss, c),
            sidecar: json!({
                "Type": "CSF",
                "Description": "Ventricular CSF for MEDI+0's uniform-χ term: the largest connected region of R2* below the limit, at least the inset inside the brain mask",
                "Parameters": medi.csf,
                "MagneticFieldStrength": b0_tesla,
            }),
        });
    }
    let total = keep_total.then(|| {
        let support = preprocess::mask::field_support(
            &mask,
            &rss,
            &fit.residual_rad,
            pre.mask.max_residual_rad,
            config.inversion.tfi.support_mm,
        );
        // Voids keep their in-painted field (as for the two-step methods) and their sources
        // are added afterwards: left without data (weight 0) they took the background in,
        // at tens of ppm, on the MNI head.
        let weight = fit
            .noise_hz
            .as_ref()
            .map(|noise| weight_from_noise(&noise.data, &support));
        Total {
            field: total_without_void_sources(
                &total_ppm,
                void_chi.as_deref(),
                &filled.voids,
                &mask,
                acq.b0_direction,
            ),
            support,
            weight,
            brain: mask.clone(),
        }
    });
    let weight = fit
        .noise_hz
        .as_ref()
        .map(|noise| weight_from_noise(&noise.data, &local.mask));
    Ok(LocalField {
        total,
        csf,
        dims,
        field: local.field,
        mask: local.mask,
        outputs,
        void_chi,
        weight,
        magnitude: Some(rss.data.clone()),
        magnitude_first: Some(first_magnitude.data.clone()),
        checks,
        parameters: json!({
            "PhaseScaling": scaling,
            "Unwrapping": pre.unwrap,
            "EchoFit": pre.echo_fit,
            "NoiseSigma": fit.noise_sigma,
            "BrainMask": brain_mask_parameters(acq, &pre.mask),
            "SignalVoids": { "config": pre.voids, "voxels": filled.voids.iter().filter(|&&v| v).count(), "sources": sources },
            "BackgroundRemoval": background_parameters(&pre.background, local.details),
        }),
    })
}

/// The user's brain mask (`--mask-dir`, `--mask`) on the work grid, when there is one; the
/// automatic mask is then not built. `like` is the first echo's phase on the input grid.
fn user_brain_mask(
    acq: &Acquisition,
    like: &Volume,
    like_path: &Path,
    work: [usize; 3],
) -> Result<Option<Mask>> {
    let Some(user) = &acq.user_mask else {
        return Ok(None);
    };
    let mask = fields::load_user_mask(&user.path, like, like_path)?;
    Ok(Some(crate::volume::pad(&mask, like.dims, work, false)))
}

/// The `desc-brain_mask` output's own sidecar fields: where the mask came from.
fn brain_mask_sidecar(acq: &Acquisition, config: &preprocess::MaskConfig) -> Value {
    match &acq.user_mask {
        Some(user) => json!({
            "Type": "Brain",
            "Description": "Brain mask supplied by the user, used as given (no automatic mask was made)",
            "UserMask": user.uri,
        }),
        None => json!({
            "Type": "Brain",
            "Description": config.description(),
            "Parameters": config,
        }),
    }
}

/// The `BrainMask` entry of the preprocessing parameters.
fn brain_mask_parameters(acq: &Acquisition, config: &preprocess::MaskConfig) -> Value {
    match &acq.user_mask {
        Some(user) => json!({ "Source": "user", "File": user.uri }),
        None => json!(config),
    }
}

/// The background removal method, its parameters and what it reported, for the sidecar.
fn background_parameters(config: &preprocess::BackgroundConfig, details: Value) -> Value {
    let mut v = config.parameters();
    v["result"] = details;
    v
}

/// Total field (ppm) + mask on the work grid → local field by the configured background
/// removal (uniform weight: a field map carries no noise estimate), with its output mask
/// written out. `dims` is the input grid.
fn background_removal(
    dims: [usize; 3],
    total_ppm: Volume,
    mask: Mask,
    config: &Config,
    deriv: &Derivatives,
    acq: &Acquisition,
) -> Result<LocalField> {
    let bg = &config.preprocess.background;
    let local =
        preprocess::background::remove_background(&total_ppm, &mask, acq.b0_direction, None, bg)?;
    let outputs = vec![Output {
        path: deriv.path(&acq.entities, Some("eroded"), "mask"),
        volume: mask_volume(&local.field, &local.mask),
        sidecar: json!({ "Type": "Brain", "Description": bg.mask_description() }),
    }];
    Ok(LocalField {
        dims,
        field: local.field,
        mask: local.mask,
        outputs,
        void_chi: None,
        weight: None,
        magnitude: None,
        magnitude_first: None,
        checks: Vec::new(),
        total: None,
        csf: None,
        parameters: json!({
            "Input": "total field map",
            "BackgroundRemoval": background_parameters(bg, local.details),
        }),
    })
}

/// The grid the FFT-based stages run on: each axis rounded up to a 7-smooth length.
pub(super) fn work_dims(dims: [usize; 3]) -> [usize; 3] {
    dims.map(crate::physics::fft::fast_len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    #[test]
    fn the_total_field_loses_the_void_sources_halo() {
        let n = 32;
        let dims = [n; 3];
        let idx = |i: usize, j: usize, k: usize| i + n * (j + n * k);
        let (mut chi, mut voids, mut mask) = (
            vec![0.0f32; n * n * n],
            vec![false; n * n * n],
            vec![false; n * n * n],
        );
        let mut ramp = vec![0.0f32; n * n * n];
        for k in 0..n {
            for j in 0..n {
                for i in 0..n {
                    let r2 = [i, j, k]
                        .iter()
                        .map(|&v| (v as f64 - 16.0).powi(2))
                        .sum::<f64>();
                    chi[idx(i, j, k)] = if r2 <= 9.0 { -1.0 } else { 0.0 };
                    voids[idx(i, j, k)] = r2 <= 16.0;
                    mask[idx(i, j, k)] = [i, j, k].iter().all(|&v| (2..n - 2).contains(&v));
                    ramp[idx(i, j, k)] = 0.01 * i as f32 - 0.02 * k as f32;
                }
            }
        }
        let b0 = [0.0, 0.0, 1.0];
        let halo = crate::physics::DipoleOperator::new(dims, [1.0; 3], b0).forward(&chi);
        let total = Volume::new(
            dims,
            ramp.iter().zip(&halo).map(|(&r, &h)| r + h).collect(),
            Geometry::from_voxel_size([1.0; 3]),
        );
        let peak = halo.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let got = total_without_void_sources(&total, Some(&chi), &voids, &mask, b0);
        let worst = |inside_voids: bool| {
            (0..got.len())
                .filter(|&i| mask[i] && voids[i] == inside_voids)
                .map(|i| (got[i] - ramp[i]).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(
            worst(false) < 1e-4 * peak,
            "{} around the void",
            worst(false)
        );
        // Inside, the ramp continued harmonically (a linear field is harmonic).
        assert!(worst(true) < 0.01 * peak, "{} in the void", worst(true));
        // Without void sources the field is passed on as it is.
        assert_eq!(
            total_without_void_sources(&total, None, &voids, &mask, b0),
            total.data
        );
    }
}
