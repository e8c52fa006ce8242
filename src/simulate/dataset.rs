//! `chimap simulate`: writes a raw multi-echo BIDS dataset and its ground truth.
//!
//! Layout (`[…]` only when there are several sessions or orientations):
//!
//! ```text
//! OUTPUT/dataset_description.json, README, participants.tsv
//! OUTPUT/sub-1[/ses-1]/anat/sub-1[_ses-1][_acq-ori1]_echo-1_part-{mag,phase}_MEGRE.nii.gz (+ .json)
//! OUTPUT/derivatives/chimap-truth/sub-1[/ses-1]/anat/sub-1[…]_Chimap.nii.gz
//!                                                    …_desc-{local,total}_fieldmap.nii.gz
//!                                                    …_desc-brain_mask.nii.gz
//! ```
//!
//! Geometry and B0: each series' B0 direction lives in its affine, built with
//! `geometry_with_b0`. For a `--chi` input without `--b0-direction`, the input's own affine
//! is kept and the B0 direction it implies (`b0_direction`) is the one simulated, so a
//! reader that takes B0 from the affine sees the same physics the simulator used. With an
//! explicit `--b0-direction`, the input's voxel size and dims are kept but its affine is
//! replaced by one centred on the scanner origin whose B0 is that direction.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::phantom::Phantom;
use super::rng::Rng;
use super::signal::{simulate_series_fine, Series, SimParams};
use crate::io::{write_atomic, write_json, write_volume, write_volume_i16};
use crate::physics::{b0_direction, geometry_with_b0};
use crate::simulate::phantom::Pose;
use crate::{Error, Result, Volume};

const BIDS_VERSION: &str = "1.10.0";
const TRUTH_DIR: &str = "derivatives/chimap-truth";
/// Scanner-style integer ranges: phase −4096..4095 for −π..π, magnitude up to 4095.
const INT_PHASE_SCALE: f32 = 4096.0;
const INT_MAG_MAX: f32 = 4095.0;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// Scanner-style integers: phase −4096..4095, magnitude scaled to at most 4095.
    Int16,
    /// Magnitude as simulated, phase in radians.
    Float32,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// The raw BIDS dataset to create (refused if it exists and is not empty, unless
    /// --overwrite).
    pub output: PathBuf,
    /// The phantom: a file or the procedural head (boxed: it keeps the CLI's command enum
    /// small).
    #[command(flatten)]
    pub phantom: Box<PhantomArgs>,
    /// Main field strength, tesla.
    #[arg(long, value_name = "T", default_value_t = 3.0)]
    pub field_strength: f64,
    /// Echo times, milliseconds.
    #[arg(long, num_args = 1.., value_name = "MS", default_values_t = [4.0f64, 8.0, 12.0, 16.0, 20.0])]
    pub echo_times: Vec<f64>,
    /// Peak SNR of the first echo in the brain ("inf" for no noise).
    #[arg(long, default_value_t = 100.0)]
    pub snr: f64,
    /// B0 direction in the voxel frame; repeat for one series per orientation
    /// (acq-ori1, acq-ori2, …) [default: 0 0 1, or the affine of --chi].
    #[arg(long = "b0-direction", num_args = 3, value_names = ["X", "Y", "Z"],
          action = clap::ArgAction::Append, allow_negative_numbers = true)]
    pub b0_direction: Vec<f64>,
    /// Number of subjects (each gets its own noise, phase offset and, for the procedural
    /// head, a slightly different head).
    #[arg(long, default_value_t = 1)]
    pub subjects: usize,
    /// Number of sessions per subject (more than 1 adds ses-1, ses-2, …).
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,
    /// Subvoxels per voxel along each axis for the field and signal (1 disables the
    /// k-space cropping) [default: 2, or 4 with --as-scanned].
    #[arg(long)]
    pub oversample: Option<usize>,
    /// Leave out the smooth receive-phase offset.
    #[arg(long)]
    pub no_phase_offset: bool,
    /// Data type of the raw images.
    #[arg(long, value_enum, default_value_t = Dtype::Float32)]
    pub dtype: Dtype,
    /// Seed of every random choice (heads, noise, phase offsets).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Simulate the orientations as a scanner images them: the head turned inside one axial
    /// grid (B0 along its z for every series), each --b0-direction being B0 in the head's
    /// frame; the true head rotations go to the ground truth (`*_pose.json`). The built-in
    /// head is evaluated turned; a --chi phantom is turned by trilinear resampling onto the
    /// subvoxel grid.
    #[arg(long)]
    pub as_scanned: bool,
    /// Write into an existing non-empty OUTPUT (a dataset made by chimap simulate is
    /// cleared of its subjects and truth first).
    #[arg(long)]
    pub overwrite: bool,
}

impl SimulateArgs {
    /// Subvoxels per axis: as given, else 2, or 4 for a head turned inside the grid. The
    /// intravoxel dephasing near air and bone follows B0, which stays along the grid's z; with
    /// 2 subvoxels it is too coarsely sampled and stays partly locked to the grid instead of
    /// turning with the head, which biased registration towards no rotation (the cli test's
    /// 15° turns, 3 T: B0 1.29° and 0.63° off with 2, 0.07° and 0.23° with 4). A --chi
    /// phantom keeps 2: it is already sampled at its own grid, and 4³ subvoxels of a 1 mm
    /// head would need tens of GB.
    pub fn oversample(&self) -> usize {
        self.oversample
            .unwrap_or(if self.as_scanned && self.phantom.chi.is_none() {
                4
            } else {
                2
            })
    }
}

/// Where the phantom comes from.
#[derive(clap::Args, Debug, Clone)]
pub struct PhantomArgs {
    /// Susceptibility map of the whole head (ppm) to simulate from [default: a built-in
    /// procedural head].
    #[arg(long, value_name = "FILE")]
    pub chi: Option<PathBuf>,
    /// Brain-only susceptibility (ppm, 0 outside the brain) for the ground truth [default:
    /// --chi inside the brain mask].
    #[arg(long, value_name = "FILE", requires = "chi")]
    pub chi_brain: Option<PathBuf>,
    /// Brain mask for --chi [default: from --seg, else the non-zero voxels of --chi-brain].
    #[arg(long, value_name = "FILE", requires = "chi")]
    pub mask: Option<PathBuf>,
    /// Segmentation for --chi (QSM Challenge 2.0 labels) giving M0 and R2* per tissue
    /// [default: M0 and R2* guessed from χ].
    #[arg(long, value_name = "FILE", requires = "chi")]
    pub seg: Option<PathBuf>,
    /// Grid of the procedural head, voxels.
    #[arg(long, num_args = 3, value_names = ["NX", "NY", "NZ"], default_values_t = [64usize, 64, 48])]
    pub dims: Vec<usize>,
    /// Voxel size of the procedural head, mm.
    #[arg(long, num_args = 3, value_names = ["X", "Y", "Z"], default_values_t = [3.0f64, 3.0, 3.0])]
    pub voxel_size: Vec<f64>,
}

/// One series to simulate: where it goes and with which B0.
struct Orientation {
    /// Requested direction, or `None` for the default (z, or the input's affine).
    b0: Option<[f64; 3]>,
    /// `acq-` label when there are several orientations.
    label: Option<String>,
}

/// Runs `chimap simulate`.
pub fn run(args: &SimulateArgs) -> Result<()> {
    let echo_times: Vec<f64> = args.echo_times.iter().map(|ms| ms / 1000.0).collect();
    let params = SimParams {
        field_strength: args.field_strength,
        echo_times,
        snr: args.snr,
        oversample: args.oversample(),
        phase_offset: !args.no_phase_offset,
        seed: args.seed,
    };
    params.validate()?;
    let orientations = orientations(&args.b0_direction)?;
    if args.subjects == 0 || args.sessions == 0 {
        return Err(Error::Usage(
            "--subjects and --sessions must be at least 1".into(),
        ));
    }
    let (dims, voxel) = procedural_grid(args)?;
    prepare_output(&args.output, args.overwrite)?;

    // A file phantom is read once and shared by every subject.
    let input = match &args.phantom.chi {
        Some(chi) => {
            tracing::info!(file = %chi.display(), "reading the susceptibility phantom");
            Some(Phantom::from_nifti(
                chi,
                args.phantom.chi_brain.as_deref(),
                args.phantom.mask.as_deref(),
                args.phantom.seg.as_deref(),
            )?)
        }
        None => None,
    };

    let root = &args.output;
    let truth_root = root.join(TRUTH_DIR);
    std::fs::create_dir_all(&truth_root).map_err(|e| Error::io(&truth_root, e))?;
    write_descriptions(root, args, &params)?;

    let mut participants = String::from("participant_id\n");
    for subject in 1..=args.subjects {
        let sub = format!("sub-{subject}");
        participants.push_str(&sub);
        participants.push('\n');
        let mut phantom = match &input {
            Some(p) => p.clone(),
            None => Phantom::procedural(
                dims,
                voxel,
                Rng::derived(args.seed, &[subject as u64]).next_u64(),
            )?,
        };
        let input_geometry = phantom.geometry().clone();
        for session in 1..=args.sessions {
            let ses = (args.sessions > 1).then(|| format!("ses-{session}"));
            for (o, ori) in orientations.iter().enumerate() {
                let (geometry, b0) = match (ori.b0, &input) {
                    (Some(b), _) => (geometry_with_b0(phantom.dims(), voxel_of(&phantom), b), b),
                    (None, Some(_)) => (input_geometry.clone(), b0_direction(&input_geometry)),
                    (None, None) => {
                        let b = [0.0, 0.0, 1.0];
                        (geometry_with_b0(phantom.dims(), voxel_of(&phantom), b), b)
                    }
                };
                // As scanned: the head turns by Q (with Qᵀ·ẑ = b, B0 in the head's frame)
                // inside an axial grid, and B0 is the grid's z.
                let (geometry, b0, pose) = if args.as_scanned {
                    let q = crate::physics::b0::rotation_with_last_row(b0);
                    let pose = Pose {
                        rotation: q,
                        shift: [0.0; 3],
                    };
                    phantom = match &input {
                        Some(upright) => upright.turned(&q, 1)?,
                        None => Phantom::procedural_posed(
                            dims,
                            voxel,
                            Rng::derived(args.seed, &[subject as u64]).next_u64(),
                            &pose,
                        )?,
                    };
                    let z = [0.0, 0.0, 1.0];
                    let (d, v) = (phantom.dims(), voxel_of(&phantom));
                    (geometry_with_b0(d, v, z), z, Some((pose, b0)))
                } else {
                    (geometry, b0, None)
                };
                phantom.set_geometry(geometry);
                let mut p = params.clone();
                p.seed =
                    Rng::derived(args.seed, &[subject as u64, session as u64, o as u64]).next_u64();
                let stem = stem(&sub, ses.as_deref(), ori.label.as_deref());
                tracing::info!(series = %stem, b0 = ?b0, "simulating");
                let start = std::time::Instant::now();
                // The procedural head turned inside the grid is also evaluated on the
                // oversampled grid, so its interfaces are not the output grid's staircase.
                // A file phantom is turned onto the subvoxel grid from its own grid.
                let fine = match (&pose, &input) {
                    (Some((pose, _)), None) if p.oversample > 1 => Some(Phantom::procedural_posed(
                        dims.map(|n| n * p.oversample),
                        voxel.map(|v| v / p.oversample as f64),
                        Rng::derived(args.seed, &[subject as u64]).next_u64(),
                        pose,
                    )?),
                    (Some((pose, _)), Some(upright)) if p.oversample > 1 => {
                        Some(upright.turned(&pose.rotation, p.oversample)?)
                    }
                    _ => None,
                };
                let series = simulate_series_fine(&phantom, fine.as_ref(), &p, b0)?;
                let rel = match &ses {
                    Some(s) => Path::new(&sub).join(s).join("anat"),
                    None => Path::new(&sub).join("anat"),
                };
                write_raw(&root.join(&rel), &stem, &series, &p, args.dtype)?;
                write_truth(&truth_root.join(&rel), &stem, &series, &p)?;
                if let Some((pose, head_b0)) = pose {
                    let path = truth_root.join(&rel).join(format!("{stem}_pose.json"));
                    write_json(
                        &path,
                        &json!({
                            "Description": "Head rotation inside the grid: tissue at grid point p (mm from the grid centre) is the upright head's at Rᵀ·p",
                            "Rotation": pose.rotation,
                            "RotationDegrees": crate::register::rigid::rotation_angle(&pose.rotation).to_degrees(),
                            "B0InHeadFrame": head_b0,
                        }),
                    )?;
                }
                tracing::info!(
                    series = %stem,
                    seconds = format!("{:.1}", start.elapsed().as_secs_f64()),
                    noise_sigma = series.noise_sigma,
                    "series written"
                );
            }
        }
    }
    write_atomic(&root.join("participants.tsv"), participants.as_bytes())?;
    tracing::info!(output = %root.display(), "simulated dataset written");
    Ok(())
}

fn voxel_of(p: &Phantom) -> [f64; 3] {
    p.geometry().voxel_size
}

fn orientations(flat: &[f64]) -> Result<Vec<Orientation>> {
    if flat.is_empty() {
        return Ok(vec![Orientation {
            b0: None,
            label: None,
        }]);
    }
    if !flat.len().is_multiple_of(3) {
        return Err(Error::Usage(
            "--b0-direction takes three numbers X Y Z".into(),
        ));
    }
    let several = flat.len() > 3;
    flat.chunks(3)
        .enumerate()
        .map(|(i, c)| {
            let n = (c[0] * c[0] + c[1] * c[1] + c[2] * c[2]).sqrt();
            if !(n > 0.0 && n.is_finite()) {
                return Err(Error::Usage(format!(
                    "--b0-direction {} {} {} is not a direction",
                    c[0], c[1], c[2]
                )));
            }
            Ok(Orientation {
                b0: Some([c[0] / n, c[1] / n, c[2] / n]),
                label: several.then(|| format!("ori{}", i + 1)),
            })
        })
        .collect()
}

fn procedural_grid(args: &SimulateArgs) -> Result<([usize; 3], [f64; 3])> {
    let (Ok(dims), Ok(voxel)) = (
        <[usize; 3]>::try_from(args.phantom.dims.as_slice()),
        <[f64; 3]>::try_from(args.phantom.voxel_size.as_slice()),
    ) else {
        return Err(Error::Usage(
            "--dims and --voxel-size take three values each".into(),
        ));
    };
    if dims.contains(&0) || voxel.iter().any(|v| !(*v > 0.0 && v.is_finite())) {
        return Err(Error::Usage(format!(
            "--dims and --voxel-size must be positive, got {dims:?} and {voxel:?}"
        )));
    }
    Ok((dims, voxel))
}

/// `sub-X[_ses-Y][_acq-Z]`.
fn stem(sub: &str, ses: Option<&str>, acq: Option<&str>) -> String {
    let mut s = sub.to_string();
    if let Some(ses) = ses {
        s.push('_');
        s.push_str(ses);
    }
    if let Some(acq) = acq {
        s.push_str("_acq-");
        s.push_str(acq);
    }
    s
}

/// Refuses a non-empty output unless overwriting; a previous chimap simulation there is
/// cleared of its subjects and truth so no stale series survive.
fn prepare_output(root: &Path, overwrite: bool) -> Result<()> {
    if root.exists() && !root.is_dir() {
        return Err(Error::input(root, "exists and is not a folder"));
    }
    let non_empty = root.is_dir()
        && std::fs::read_dir(root)
            .map_err(|e| Error::io(root, e))?
            .next()
            .is_some();
    if non_empty {
        if !overwrite {
            return Err(Error::input(
                root,
                "exists and is not empty; choose a new folder or pass --overwrite",
            ));
        }
        if made_by_us(root) {
            for entry in std::fs::read_dir(root).map_err(|e| Error::io(root, e))? {
                let path = entry.map_err(|e| Error::io(root, e))?.path();
                let is_sub = path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("sub-"));
                if is_sub && path.is_dir() {
                    std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
                }
            }
            let truth = root.join(TRUTH_DIR);
            if truth.is_dir() {
                std::fs::remove_dir_all(&truth).map_err(|e| Error::io(&truth, e))?;
            }
        } else {
            tracing::warn!(
                output = %root.display(),
                "writing into a non-empty folder not made by chimap simulate; other files stay"
            );
        }
    }
    std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))
}

fn made_by_us(root: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(root.join("dataset_description.json")) else {
        return false;
    };
    let Ok(v) = serde_json::from_str::<Value>(&text) else {
        return false;
    };
    v["GeneratedBy"][0]["Name"] == json!(GENERATOR)
}

const GENERATOR: &str = "chimap simulate";

fn parameters_text(args: &SimulateArgs, p: &SimParams) -> String {
    let phantom = match &args.phantom.chi {
        Some(chi) => format!("susceptibility map {}", chi.display()),
        None => format!(
            "procedural head on {:?} voxels of {:?} mm",
            args.phantom.dims, args.phantom.voxel_size
        ),
    };
    let b0 = if args.b0_direction.is_empty() {
        "default".to_string()
    } else {
        format!("{:?}", args.b0_direction)
    };
    format!(
        "{phantom}; B0 {} T; echo times {:?} ms; SNR {}; B0 directions {b0}; {} subject(s) x \
         {} session(s); oversampling {}; phase offset {}; {:?} data; seed {}",
        p.field_strength,
        args.echo_times,
        p.snr,
        args.subjects,
        args.sessions,
        p.oversample,
        if p.phase_offset { "on" } else { "off" },
        args.dtype,
        args.seed
    )
}

fn write_descriptions(root: &Path, args: &SimulateArgs, p: &SimParams) -> Result<()> {
    let params = parameters_text(args, p);
    let generated_by = json!([{
        "Name": GENERATOR,
        "Version": crate::VERSION,
        "Description": format!("Forward simulation of multi-echo gradient-echo data: {params}"),
    }]);
    write_json(
        &root.join("dataset_description.json"),
        &json!({
            "Name": "chimap simulated multi-echo GRE",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "raw",
            "GeneratedBy": generated_by,
        }),
    )?;
    let readme = format!(
        "Simulated multi-echo gradient-echo data for quantitative susceptibility mapping,\n\
         made by chimap simulate {}.\n\n\
         Parameters: {params}.\n\n\
         The ground truth (susceptibility in ppm, local and total field in ppm, brain mask)\n\
         is in {TRUTH_DIR}/. The B0 direction of each series is encoded in its affine.\n",
        crate::VERSION
    );
    write_atomic(&root.join("README"), readme.as_bytes())?;
    let truth = root.join(TRUTH_DIR);
    write_json(
        &truth.join("dataset_description.json"),
        &json!({
            "Name": "chimap simulation ground truth",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": generated_by,
        }),
    )
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}

/// Writes one simulated series' echoes (`<stem>_echo-<n>_part-{mag,phase}_MEGRE`, with
/// sidecars) into `dir`, as `chimap simulate` does.
pub fn write_raw(dir: &Path, stem: &str, s: &Series, p: &SimParams, dtype: Dtype) -> Result<()> {
    create_dir(dir)?;
    // One magnitude scale for all echoes keeps their decay intact.
    let peak = s
        .magnitude
        .iter()
        .flat_map(|m| m.data.iter())
        .fold(0.0f32, |a, &b| a.max(b));
    let mag_scale = if peak > 0.0 { INT_MAG_MAX / peak } else { 1.0 };
    for (e, te) in p.echo_times.iter().enumerate() {
        let echo = e + 1;
        for part in ["mag", "phase"] {
            let name = format!("{stem}_echo-{echo}_part-{part}_MEGRE");
            let vol = if part == "mag" {
                &s.magnitude[e]
            } else {
                &s.phase[e]
            };
            let nii = dir.join(format!("{name}.nii.gz"));
            match dtype {
                Dtype::Float32 => write_volume(&nii, vol)?,
                Dtype::Int16 => {
                    let scaled = if part == "mag" {
                        vol.with_data(vol.data.iter().map(|&m| m * mag_scale).collect())
                    } else {
                        int_phase(vol)
                    };
                    write_volume_i16(&nii, &[&scaled])?;
                }
            }
            let mut side = json!({
                "EchoTime": te,
                "EchoNumber": echo,
                "MagneticFieldStrength": p.field_strength,
                "MRAcquisitionType": "3D",
            });
            if part == "phase" {
                side["Units"] = json!(match dtype {
                    Dtype::Float32 => "rad",
                    Dtype::Int16 => "arbitrary",
                });
            }
            write_json(&dir.join(format!("{name}.json")), &side)?;
        }
    }
    Ok(())
}

/// Radians in [−π, π) to scanner integers −4096..4095.
fn int_phase(vol: &Volume) -> Volume {
    let f = INT_PHASE_SCALE / std::f32::consts::PI;
    vol.with_data(
        vol.data
            .iter()
            .map(|&p| {
                (p * f)
                    .round()
                    .clamp(-INT_PHASE_SCALE, INT_PHASE_SCALE - 1.0)
            })
            .collect(),
    )
}

/// Writes one simulated series' ground truth (χ, local and total field, brain mask) into
/// `dir`, as `chimap simulate` does under `derivatives/chimap-truth`.
pub fn write_truth(dir: &Path, stem: &str, s: &Series, p: &SimParams) -> Result<()> {
    create_dir(dir)?;
    let t = &s.truth;
    let chi = dir.join(format!("{stem}_Chimap.nii.gz"));
    write_volume(&chi, &t.chi)?;
    write_json(
        &sidecar_of(&chi),
        &json!({
            "Units": "ppm",
            "Description": "Simulated brain susceptibility (0 outside the brain)",
        }),
    )?;
    for (desc, vol, what) in [
        (
            "local",
            &t.local_field_ppm,
            "Field of the brain susceptibility alone",
        ),
        (
            "total",
            &t.total_field_ppm,
            "Field of all sources, averaged over each voxel",
        ),
    ] {
        let path = dir.join(format!("{stem}_desc-{desc}_fieldmap.nii.gz"));
        write_volume(&path, vol)?;
        write_json(
            &sidecar_of(&path),
            &json!({
                "Units": "ppm",
                "MagneticFieldStrength": p.field_strength,
                "B0Direction": s.b0_direction,
                "Description": what,
            }),
        )?;
    }
    let mask = dir.join(format!("{stem}_desc-brain_mask.nii.gz"));
    let data = t.mask.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
    write_volume(&mask, &t.chi.with_data(data))?;
    write_json(&sidecar_of(&mask), &json!({"Type": "Brain"}))?;
    Ok(())
}

/// `x.nii.gz` → `x.json`.
fn sidecar_of(nii: &Path) -> PathBuf {
    let name = nii
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    nii.with_file_name(format!("{}.json", name.trim_end_matches(".nii.gz")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: SimulateArgs,
    }

    fn parse(extra: &[&str], out: &Path) -> SimulateArgs {
        let mut argv = vec!["simulate", out.to_str().unwrap()];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).unwrap().args
    }

    fn read(path: &Path) -> Volume {
        crate::io::read_image(path).unwrap().frames.remove(0)
    }

    fn sidecar(path: &Path) -> Value {
        crate::io::read_json(path).unwrap()
    }

    const SMALL: [&str; 10] = [
        "--dims",
        "16",
        "16",
        "12",
        "--voxel-size",
        "12",
        "12",
        "12",
        "--oversample",
        "1",
    ];

    #[test]
    fn parses_the_documented_defaults_and_repeated_orientations() {
        let a = parse(&[], Path::new("/x"));
        assert_eq!(a.phantom.dims, vec![64, 64, 48]);
        assert_eq!(a.echo_times, vec![4.0, 8.0, 12.0, 16.0, 20.0]);
        assert_eq!(
            (a.snr, a.oversample(), a.subjects, a.sessions),
            (100.0, 2, 1, 1)
        );
        assert_eq!(parse(&["--as-scanned"], Path::new("/x")).oversample(), 4);
        assert_eq!(a.dtype, Dtype::Float32);
        assert!(a.b0_direction.is_empty());
        let a = parse(
            &[
                "--b0-direction",
                "0",
                "0",
                "1",
                "--b0-direction",
                "-0.1",
                "0.1",
                "0.98",
            ],
            Path::new("/x"),
        );
        let o = orientations(&a.b0_direction).unwrap();
        assert_eq!(o.len(), 2);
        assert_eq!(o[1].label.as_deref(), Some("ori2"));
        assert!(o[1].b0.unwrap()[0] < 0.0);
        assert!(orientations(&[0.0, 0.0, 0.0]).is_err());
        // A repeated --echo-times appends.
        let a = parse(
            &["--echo-times", "5", "--echo-times", "10", "15"],
            Path::new("/x"),
        );
        assert_eq!(a.echo_times, vec![5.0, 10.0, 15.0]);
    }

    #[test]
    fn writes_a_float_dataset_with_truth_that_reads_back() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ds");
        let mut argv = SMALL.to_vec();
        argv.extend_from_slice(&[
            "--echo-times",
            "5",
            "10",
            "--no-phase-offset",
            "--snr",
            "inf",
        ]);
        let args = parse(&argv, &out);
        run(&args).unwrap();

        let desc = sidecar(&out.join("dataset_description.json"));
        assert_eq!(desc["DatasetType"], "raw");
        assert_eq!(desc["BIDSVersion"], BIDS_VERSION);
        assert_eq!(desc["GeneratedBy"][0]["Version"], crate::VERSION);
        let tsv = std::fs::read_to_string(out.join("participants.tsv")).unwrap();
        assert_eq!(tsv, "participant_id\nsub-1\n");
        assert!(out.join("README").is_file());

        let anat = out.join("sub-1/anat");
        let side = sidecar(&anat.join("sub-1_echo-2_part-phase_MEGRE.json"));
        assert_eq!(side["EchoTime"], json!(0.01));
        assert_eq!(side["EchoNumber"], json!(2));
        assert_eq!(side["Units"], "rad");
        let phase = read(&anat.join("sub-1_echo-2_part-phase_MEGRE.nii.gz"));
        let mag = read(&anat.join("sub-1_echo-1_part-mag_MEGRE.nii.gz"));
        assert_eq!(phase.dims, [16, 16, 12]);
        assert!(crate::physics::b0_direction(&phase.geometry)[2] > 0.999);

        let truth = out.join(TRUTH_DIR);
        assert_eq!(
            sidecar(&truth.join("dataset_description.json"))["DatasetType"],
            "derivative"
        );
        let t = truth.join("sub-1/anat/sub-1");
        let total = read(&PathBuf::from(format!(
            "{}_desc-total_fieldmap.nii.gz",
            t.display()
        )));
        let mask = read(&PathBuf::from(format!(
            "{}_desc-brain_mask.nii.gz",
            t.display()
        )));
        let chi = read(&PathBuf::from(format!("{}_Chimap.nii.gz", t.display())));
        let fside = sidecar(&PathBuf::from(format!(
            "{}_desc-local_fieldmap.json",
            t.display()
        )));
        assert_eq!(fside["Units"], "ppm");
        assert_eq!(fside["MagneticFieldStrength"], json!(3.0));
        assert!(mask.data.iter().all(|&m| m == 0.0 || m == 1.0));
        assert!(mask.data.contains(&1.0));
        assert!(chi
            .data
            .iter()
            .zip(&mask.data)
            .all(|(&c, &m)| m == 1.0 || c == 0.0));
        // Without noise, offset or oversampling, the phase is the total field (no wraps
        // in the brain at this short echo and coarse grid where the field is gentle).
        let scale = 2.0 * std::f64::consts::PI * 0.01 * crate::physics::units::hz_per_ppm(3.0);
        let mut close = 0;
        let mut n = 0;
        for v in 0..phase.len() {
            if mask.data[v] == 1.0 && mag.data[v] > 0.1 {
                let want = (total.data[v] as f64 * scale + std::f64::consts::PI)
                    .rem_euclid(2.0 * std::f64::consts::PI)
                    - std::f64::consts::PI;
                n += 1;
                if (phase.data[v] as f64 - want).abs() < 1e-3 {
                    close += 1;
                }
            }
        }
        assert!(n > 100 && close == n, "{close} of {n}");
    }

    #[test]
    fn int16_sessions_orientations_and_the_overwrite_guard() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ds");
        let mut argv = SMALL.to_vec();
        argv.extend_from_slice(&[
            "--dtype",
            "int16",
            "--sessions",
            "2",
            "--subjects",
            "2",
            "--b0-direction",
            "0",
            "0",
            "1",
            "--b0-direction",
            "0.3",
            "0",
            "0.95",
        ]);
        let args = parse(&argv, &out);
        run(&args).unwrap();
        let anat = out.join("sub-2/ses-2/anat");
        let stem = "sub-2_ses-2_acq-ori2_echo-1_part";
        let img = crate::io::read_image(&anat.join(format!("{stem}-phase_MEGRE.nii.gz"))).unwrap();
        assert!(img.header.integer_type);
        let p = &img.frames[0];
        assert!(p
            .data
            .iter()
            .all(|&x| (-4096.0..=4095.0).contains(&x) && x.fract() == 0.0));
        assert!(p.data.iter().any(|&x| x < -2000.0) && p.data.iter().any(|&x| x > 2000.0));
        let m = read(&anat.join(format!("{stem}-mag_MEGRE.nii.gz")));
        let peak = m.data.iter().fold(0.0f32, |a, &b| a.max(b));
        assert!(peak <= 4095.0 && peak > 3000.0, "{peak}");
        assert_eq!(
            sidecar(&anat.join(format!("{stem}-phase_MEGRE.json")))["Units"],
            "arbitrary"
        );
        let b = crate::physics::b0_direction(&p.geometry);
        assert!(
            (b[0] - 0.3 / (0.3f64 * 0.3 + 0.95 * 0.95).sqrt()).abs() < 1e-4,
            "{b:?}"
        );
        let truth = out.join(TRUTH_DIR).join("sub-2/ses-2/anat");
        assert!(truth
            .join("sub-2_ses-2_acq-ori2_desc-local_fieldmap.nii.gz")
            .is_file());
        // Different subjects and sessions differ.
        let q = read(
            &out.join("sub-1/ses-2/anat")
                .join("sub-1_ses-2_acq-ori2_echo-1_part-phase_MEGRE.nii.gz"),
        );
        assert_ne!(p.data, q.data);

        // A non-empty output is refused without --overwrite …
        assert!(run(&args).is_err());
        // … and with it, a previous simulation is replaced, stale subjects included.
        let mut fewer = parse(&[SMALL.as_slice(), &["--overwrite"]].concat(), &out);
        fewer.phantom.dims = vec![16, 16, 12];
        run(&fewer).unwrap();
        assert!(out.join("sub-1/anat").is_dir());
        assert!(!out.join("sub-2").exists());
        assert!(!out.join(TRUTH_DIR).join("sub-2").exists());
    }
}
