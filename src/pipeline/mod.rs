//! The participant-level run: discovery, then for every acquisition the stages in order,
//! then the derivative outputs. This is the only module that knows the order of the stages.
//!
//! A failed acquisition is logged and recorded; the others still run, and the summary (and
//! the exit status) reports every failure.

mod acquisition;
mod checkpoint;
mod config;
pub(crate) mod fields;
pub mod memory;
mod progress;
mod register;
pub use progress::STAGE_ORDER;

pub use acquisition::{process, Outcome};
pub use config::Config;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bids::{self, Discovery, Filter};
use crate::derivatives::Derivatives;
use crate::inversion::MethodName;
use crate::{Error, Result};

/// Everything a participant-level run needs, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    pub bids_dir: PathBuf,
    pub output_dir: PathBuf,
    pub filter: Filter,
    pub config: Config,
    pub overwrite: bool,
    pub dry_run: bool,
    /// A derivative dataset of brain masks (`--mask-dir`) that replace the automatic ones.
    pub mask_dir: Option<PathBuf>,
    /// The command line, recorded in `dataset_description.json`.
    pub command_line: String,
    /// Peak memory the run may use, in GiB (`--mem-gb`): work that would need more is
    /// refused before anything runs.
    pub mem_gb: Option<f64>,
    /// Where intermediates go (`--work-dir`), e.g. node-local scratch: each acquisition's
    /// local field until its Chimap is written, so a killed run resumes at the inversion.
    pub work_dir: Option<PathBuf>,
}

impl Settings {
    /// Everything in `bids` into `out` with `config` and no other option (examples and
    /// benchmarks); `command_line` is what `dataset_description.json` records.
    pub fn for_dataset(bids: &Path, out: &Path, config: Config, command_line: &str) -> Settings {
        Settings {
            bids_dir: bids.to_path_buf(),
            output_dir: out.to_path_buf(),
            filter: Filter::default(),
            config,
            overwrite: true,
            dry_run: false,
            mask_dir: None,
            command_line: command_line.into(),
            mem_gb: None,
            work_dir: None,
        }
    }

    /// The filter discovery applies: the selected participants and sessions, with the
    /// config's `orientation_set` rule (the config is its one source).
    pub fn discovery_filter(&self) -> Filter {
        Filter {
            orientation_set: self.config.orientation_set.clone(),
            ..self.filter.clone()
        }
    }
}

/// What happened to each acquisition.
#[derive(Debug, Default)]
pub struct Summary {
    pub processed: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<(String, Error)>,
}

impl Summary {
    pub fn success(&self) -> bool {
        self.failed.is_empty()
    }
}

/// Refuses output locations that would write into the input dataset: OUTPUT_DIR equal to
/// BIDS_DIR or inside it, except under `BIDS_DIR/derivatives/`.
pub fn check_output_location(bids_dir: &Path, output_dir: &Path) -> Result<()> {
    let bids = std::fs::canonicalize(bids_dir).map_err(|e| Error::io(bids_dir, e))?;
    let out = canonical_even_if_missing(output_dir);
    if out == bids {
        return Err(Error::Usage(format!(
            "OUTPUT_DIR {} is the input dataset: choose another folder (e.g. {}/derivatives/chimap)",
            output_dir.display(),
            bids_dir.display()
        )));
    }
    if let Ok(rest) = out.strip_prefix(&bids) {
        if rest
            .components()
            .next()
            .map(|c| c.as_os_str() != "derivatives")
            .unwrap_or(true)
        {
            return Err(Error::Usage(format!(
                "OUTPUT_DIR {} is inside the input dataset {}: chimap never writes there; use a folder outside it or under {}/derivatives/",
                output_dir.display(),
                bids_dir.display(),
                bids_dir.display()
            )));
        }
    }
    Ok(())
}

/// The canonical path of the nearest existing ancestor, with the missing tail appended.
/// `.` and `..` are resolved lexically first, since a missing folder cannot be canonicalised.
fn canonical_even_if_missing(path: &Path) -> PathBuf {
    use std::path::Component;
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    let mut lexical = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                lexical.pop();
            }
            other => lexical.push(other),
        }
    }
    let mut tail: Vec<std::ffi::OsString> = Vec::new();
    let mut cur = lexical.as_path();
    loop {
        if let Ok(mut out) = std::fs::canonicalize(cur) {
            out.extend(tail.iter().rev());
            return out;
        }
        match (cur.file_name(), cur.parent()) {
            (Some(name), Some(parent)) => {
                tail.push(name.to_os_string());
                cur = parent;
            }
            _ => return lexical,
        }
    }
}

/// What the pipeline inverts in one go.
enum Unit<'a> {
    One(&'a bids::Acquisition),
    Set(&'a bids::OrientationSet),
}

/// Discovers the dataset and processes every selected acquisition.
pub fn run(settings: &Settings) -> Result<Summary> {
    check_output_location(&settings.bids_dir, &settings.output_dir)?;
    if let Some(masks) = &settings.mask_dir {
        check_output_outside(masks, &settings.output_dir, "--mask-dir")?;
    }
    let discovery = bids::discover_with_masks(
        &settings.bids_dir,
        &settings.discovery_filter(),
        settings.mask_dir.as_deref(),
    )?;
    run_discovered(settings, discovery)
}

/// Refuses an OUTPUT_DIR equal to or inside another input folder (`what` names it), whose
/// files a run could otherwise overwrite.
fn check_output_outside(input: &Path, output_dir: &Path, what: &str) -> Result<()> {
    let input_c = std::fs::canonicalize(input).map_err(|e| Error::io(input, e))?;
    if canonical_even_if_missing(output_dir).starts_with(&input_c) {
        return Err(Error::Usage(format!(
            "OUTPUT_DIR {} is inside {what} {}: chimap never writes into its inputs; choose \
             another folder",
            output_dir.display(),
            input.display()
        )));
    }
    Ok(())
}

/// Where `chimap files` may write. Workflow engines stage a step's inputs in the folder its
/// outputs go to, so OUTPUT_DIR may hold the inputs; but no input may lie where outputs are
/// written (`OUTPUT_DIR/sub-<label>/`: a rerun on an earlier output would overwrite it), and an
/// existing `dataset_description.json` there must be chimap's own.
pub fn check_files_output(output_dir: &Path, discovery: &Discovery) -> Result<()> {
    let out = canonical_even_if_missing(output_dir);
    for acq in &discovery.acquisitions {
        let written = out.join(format!("sub-{}", acq.entities.sub));
        let inputs = acq
            .inputs
            .iter()
            .map(|p| discovery.root.join(p))
            .chain(acq.user_mask.iter().map(|m| m.path.clone()));
        for input in inputs {
            if canonical_even_if_missing(&input).starts_with(&written) {
                return Err(Error::input(
                    &input,
                    format!(
                        "lies in {}, where chimap writes this acquisition's outputs: copy it \
                         elsewhere, choose another OUTPUT_DIR, or another --name",
                        written.display()
                    ),
                ));
            }
        }
    }
    let description = output_dir.join("dataset_description.json");
    if description.is_file() {
        let generated_by = crate::io::read_json(&description)
            .ok()
            .and_then(|d| d["GeneratedBy"][0]["Name"].as_str().map(str::to_string));
        if generated_by.as_deref() != Some("chimap") {
            return Err(Error::input(
                &description,
                "belongs to another dataset: chimap would replace it; choose an empty or \
                 chimap OUTPUT_DIR",
            ));
        }
    }
    Ok(())
}

/// Processes the acquisitions of a discovery (a BIDS dataset, or the one acquisition of
/// `chimap files`): the same stages, outputs and reports whatever the acquisitions came from.
pub fn run_discovered(settings: &Settings, discovery: Discovery) -> Result<Summary> {
    // A joint method (COSMOS) takes each orientation set as one unit; its members are not
    // inverted on their own.
    let joint = settings.config.inversion.method()?.joint_orientations();
    let mut units: Vec<Unit> = Vec::new();
    if joint {
        units.extend(
            discovery
                .orientation_sets
                .iter()
                .chain(&discovery.scanned_sets)
                .map(Unit::Set),
        );
    }
    let in_set = |i: usize| {
        joint
            && discovery
                .orientation_sets
                .iter()
                .chain(&discovery.scanned_sets)
                .any(|s| s.members.contains(&i))
    };
    units.extend(
        (0..discovery.acquisitions.len())
            .filter(|&i| !in_set(i))
            .map(|i| Unit::One(&discovery.acquisitions[i])),
    );
    if settings.dry_run {
        print!("{}", describe(&discovery));
        for unit in &units {
            let work = work_of(unit, &discovery.acquisitions, &settings.config);
            let budget = settings.config.inversion.max_memory_gib * memory::GIB;
            let act = memory::activations(&work, &settings.config, budget);
            let need = memory::estimate(&work, settings.config.inversion.method, act);
            println!(
                "memory: {} with {} needs about {:.1} GiB (peak at {})",
                unit_name(unit),
                settings.config.inversion.method.as_str(),
                memory::gib(need.bytes),
                need.stage
            );
        }
        return Ok(Summary {
            failed: discovery.problems.into_iter().collect(),
            ..Summary::default()
        });
    }
    let mut config = settings.config.clone();
    if let Some(limit) = settings.mem_gb {
        fit_memory(&units, &discovery.acquisitions, &mut config, limit)?;
    }
    let links: Vec<(&str, &Path)> = settings
        .mask_dir
        .iter()
        .map(|m| (bids::masks::MASK_LINK, m.as_path()))
        .collect();
    let derivatives = Derivatives::create_linked(
        &settings.output_dir,
        &discovery.root,
        &links,
        &settings.command_line,
    )?
    .with_work_dir(settings.work_dir.clone());
    let mut summary = Summary::default();
    for (name, problem) in &discovery.problems {
        tracing::error!("{name}: {problem}");
    }
    let total = units.len();
    for (n, unit) in units.iter().enumerate() {
        let name = unit_name(unit);
        tracing::info!("[{}/{}] {name}", n + 1, total);
        let start = Instant::now();
        let result = match unit {
            Unit::One(acq) => acquisition::process(
                acq,
                &discovery.root,
                &config,
                &derivatives,
                settings.overwrite,
            ),
            Unit::Set(set) => acquisition::process_set(
                set,
                &discovery.acquisitions,
                &discovery.root,
                &config,
                &derivatives,
                settings.overwrite,
            ),
        };
        match result {
            Ok(Outcome::Done) => {
                tracing::info!("{name}: done in {:.1} s", start.elapsed().as_secs_f64());
                summary.processed.push(name);
            }
            Ok(Outcome::AlreadyDone) => {
                tracing::info!("{name}: outputs exist, skipped (use --overwrite to recompute)");
                summary.skipped.push(name);
            }
            Err(e) => {
                tracing::error!("{name}: {e}");
                summary.failed.push((name, e));
            }
        }
    }
    // One report per subject, built from what is on disk (so skipped work is included).
    let mut subjects: Vec<&str> = units
        .iter()
        .map(|u| match u {
            Unit::One(acq) => acq.entities.sub.as_str(),
            Unit::Set(set) => set.subject.as_str(),
        })
        .collect();
    subjects.dedup();
    for sub in subjects {
        match crate::report::subject(&settings.output_dir, &discovery.root, sub) {
            Ok(path) => tracing::info!("report: {}", path.display()),
            Err(e) => {
                tracing::error!("sub-{sub} report: {e}");
                summary.failed.push((format!("sub-{sub} report"), e));
            }
        }
    }
    summary.failed.extend(discovery.problems);
    Ok(summary)
}

/// The shape of one unit of work, for the memory estimate.
fn work_of(unit: &Unit, acquisitions: &[bids::Acquisition], config: &Config) -> memory::Work {
    let (acq, orientations) = match unit {
        Unit::One(acq) => (*acq, 1),
        Unit::Set(set) => (&acquisitions[set.members[0]], set.members.len()),
    };
    let (echoes, magnitude) = match &acq.source {
        bids::Source::Raw { echoes } => {
            (echoes.len(), echoes.iter().all(|e| e.magnitude.is_some()))
        }
        bids::Source::FieldMap { .. } => (0, false),
    };
    let work = acquisition::work_dims(acq.dims);
    let inv = &config.inversion;
    let pad_mm = match inv.method {
        MethodName::Tfi => Some(inv.tfi.pad_mm),
        MethodName::Sstv => Some(inv.sstv.pad_mm),
        // A learned method may start from SS-TV on one orientation's total field (raw phase,
        // or a field map that is a total one); a multi-orientation set has none.
        MethodName::Lpcnn | MethodName::Loopnet | MethodName::Unet
            if inv.learned_from_total && orientations == 1 =>
        {
            Some(inv.sstv.pad_mm)
        }
        _ => None,
    };
    let padded_voxels = pad_mm.map(|pad_mm| {
        crate::inversion::tfi::padded_dims(work, acq.voxel_size, pad_mm)
            .iter()
            .product()
    });
    memory::Work {
        input_voxels: acq.dims.iter().product(),
        work_voxels: work.iter().product(),
        echoes,
        magnitude,
        orientations,
        padded_voxels,
        sstv_radii: inv.sstv.radii_mm.len(),
    }
}

/// Checks, before any work, that every unit fits in `limit_gib`, and gives the learned
/// methods' activations what is left where their budget does not fit (their tiles shrink).
/// The error names every unit that does not fit, what it needs and where.
fn fit_memory(
    units: &[Unit],
    acquisitions: &[bids::Acquisition],
    config: &mut Config,
    limit_gib: f64,
) -> Result<()> {
    let method = config.inversion.method;
    let limit = limit_gib * memory::GIB;
    let budget = config.inversion.max_memory_gib * memory::GIB;
    let mut activations = budget;
    let mut too_big = Vec::new();
    for unit in units {
        let work = work_of(unit, acquisitions, config);
        let need = memory::estimate(&work, method, memory::activations(&work, config, budget));
        if need.bytes <= limit {
            continue;
        }
        // What the learned methods' tiles may use here: what the rest leaves.
        let rest = memory::estimate(&work, method, 0.0);
        let left = (limit - rest.bytes) / memory::MARGIN;
        if method.learned() && left >= memory::MIN_ACTIVATION_BYTES {
            activations = activations.min(left);
            continue;
        }
        let least = memory::estimate(
            &work,
            method,
            memory::activations(&work, config, memory::MIN_ACTIVATION_BYTES.min(budget)),
        );
        too_big.push(format!(
            "{} needs about {:.1} GiB (at {})",
            unit_name(unit),
            memory::gib(least.bytes),
            least.stage
        ));
    }
    if !too_big.is_empty() {
        return Err(Error::Memory(format!(
            "--mem-gb {limit_gib} is not enough: {}; raise --mem-gb (and the job's memory \
             request), or run these on a larger node",
            too_big.join("; ")
        )));
    }
    if activations < budget {
        config.inversion.max_memory_gib = memory::gib(activations);
        tracing::info!(
            "--mem-gb {limit_gib}: the network's activations get {:.2} GiB (tiles shrink to fit)",
            config.inversion.max_memory_gib
        );
    }
    Ok(())
}

fn unit_name(unit: &Unit) -> String {
    match unit {
        Unit::One(acq) => acq.name(),
        Unit::Set(set) => format!("{} (orientation set)", set.entities.prefix()),
    }
}

/// The `--dry-run` listing: one block per acquisition, then orientation sets and problems.
pub fn describe(d: &Discovery) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let kind = match d.dataset_type {
        bids::DatasetType::Raw => "raw",
        bids::DatasetType::Derivative => "derivative",
    };
    let _ = writeln!(
        s,
        "dataset {} ({kind}): {} acquisition(s)",
        d.root.display(),
        d.acquisitions.len()
    );
    for a in &d.acquisitions {
        let b0 = a.b0_direction;
        let field = a
            .field_strength
            .map(|t| format!("{t} T"))
            .unwrap_or_else(|| "B0 unknown".into());
        let what = match &a.source {
            bids::Source::Raw { echoes } => format!(
                "{} echo(es), TE = {} ms{}",
                echoes.len(),
                echoes
                    .iter()
                    .map(|e| format!("{:.2}", e.echo_time * 1e3))
                    .collect::<Vec<_>>()
                    .join(", "),
                if echoes.iter().all(|e| e.magnitude.is_some()) {
                    ""
                } else {
                    ", no magnitude"
                }
            ),
            bids::Source::FieldMap { kind, units, .. } => {
                format!("{kind:?} field map in {units:?}")
            }
        };
        let _ = writeln!(
            s,
            "  {}  [{}] {what}; {}×{}×{} at {:.2}×{:.2}×{:.2} mm; {field}; B0 ({:.3}, {:.3}, {:.3}), tilt {:.1}°",
            a.name(),
            a.suffix,
            a.dims[0],
            a.dims[1],
            a.dims[2],
            a.voxel_size[0],
            a.voxel_size[1],
            a.voxel_size[2],
            b0[0],
            b0[1],
            b0[2],
            crate::physics::tilt_degrees(b0)
        );
        if let Some(m) = &a.user_mask {
            let _ = writeln!(s, "    brain mask: {}", m.path.display());
        }
    }
    for set in d.orientation_sets.iter().chain(&d.scanned_sets) {
        let names: Vec<_> = set
            .members
            .iter()
            .map(|&m| d.acquisitions[m].name())
            .collect();
        let _ = writeln!(
            s,
            "  orientation set{} ({} orientations): {}",
            if set.as_scanned {
                " as scanned, registered by joint methods"
            } else {
                ""
            },
            names.len(),
            names.join(", ")
        );
    }
    for (name, e) in &d.problems {
        let _ = writeln!(s, "  cannot process {name}: {e}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_inside_the_input_is_refused_except_derivatives() {
        let d = tempfile::tempdir().unwrap();
        let bids = d.path().join("ds");
        std::fs::create_dir_all(bids.join("sub-01")).unwrap();
        let err = check_output_location(&bids, &bids).unwrap_err().to_string();
        assert!(err.contains("is the input dataset"), "{err}");
        let err = check_output_location(&bids, &bids.join("sub-01/out"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside the input dataset"), "{err}");
        check_output_location(&bids, &bids.join("derivatives/chimap")).unwrap();
        check_output_location(&bids, &d.path().join("out")).unwrap();
        // A relative path with `..` that lands inside is still caught.
        let sneaky = bids.join("derivatives/../sub-01/x");
        assert!(check_output_location(&bids, &sneaky).is_err());
        // Nor inside a --mask-dir, even one under derivatives/.
        let masks = bids.join("derivatives/masks");
        std::fs::create_dir_all(&masks).unwrap();
        let err = check_output_outside(&masks, &masks.join("out"), "--mask-dir")
            .unwrap_err()
            .to_string();
        assert!(err.contains("inside --mask-dir"), "{err}");
        check_output_outside(&masks, &bids.join("derivatives/chimap"), "--mask-dir").unwrap();
    }

    #[test]
    fn file_mode_output_may_hold_the_inputs_but_not_where_outputs_go() {
        let d = tempfile::tempdir().unwrap();
        let input = d.path().join("phase.nii");
        std::fs::write(&input, b"").unwrap();
        let acq = bids::Acquisition {
            entities: bids::Entities {
                sub: "x".into(),
                ..Default::default()
            },
            suffix: "MEGRE".into(),
            source: bids::Source::Raw { echoes: Vec::new() },
            field_strength: None,
            b0_direction: [0.0, 0.0, 1.0],
            dims: [1, 1, 1],
            voxel_size: [1.0; 3],
            sidecar: Default::default(),
            inputs: vec![PathBuf::from("phase.nii")],
            user_mask: Some(bids::UserMask {
                path: d.path().join("sub-x/anat/m.nii"),
                uri: String::new(),
            }),
        };
        let discovery = Discovery {
            root: d.path().to_path_buf(),
            dataset_type: bids::DatasetType::Raw,
            name: None,
            acquisitions: vec![acq],
            orientation_sets: Vec::new(),
            scanned_sets: Vec::new(),
            problems: Vec::new(),
        };
        // The mask lies in OUTPUT_DIR/sub-x/: refused; elsewhere, the inputs' folder is fine.
        let err = check_files_output(d.path(), &discovery)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("m.nii") && err.contains("where chimap writes"),
            "{err}"
        );
        let elsewhere = d.path().join("out");
        check_files_output(&elsewhere, &discovery).unwrap();
        // Another dataset's description would be replaced: refused.
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(
            elsewhere.join("dataset_description.json"),
            r#"{"Name": "raw", "BIDSVersion": "1.9.0"}"#,
        )
        .unwrap();
        let err = check_files_output(&elsewhere, &discovery)
            .unwrap_err()
            .to_string();
        assert!(err.contains("another dataset"), "{err}");
    }
}
