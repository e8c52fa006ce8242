//! Multi-orientation sets of the MNI head as they come off the scanner ("as scanned": the head
//! turned inside one axial grid, B0 along the grid's z) against the same orientations
//! registered beforehand (the head upright, each series' B0 direction in its affine):
//! registration error per member, and COSMOS / LP-CNN from raw phase on both sets.
//!
//! ```sh
//! cargo run --release --example as_scanned_mni -- WORK_DIR [--data ../shared/data/mni_phantom]
//!     [--tesla 3] [--methods cosmos,lpcnn] [--skip-simulation] [--config FILE.yaml]
//! ```
//!
//! The phantom (1 mm, cropped to even dims) is the 2× subvoxel grid of a 2 mm acquisition:
//! each turned head is the 1 mm phantom resampled (trilinear, about the grid centre), so the
//! subvoxels of every orientation are the head's own, not a 2 mm staircase; the 2 mm truth is
//! the block mean of the upright head. 3 T: TE 4, 8, 12, 16, 20 ms; 7 T: TE 4, 10, 16 ms;
//! SNR 100; four orientations, the first upright (the reference), the others turned 15°, 25°
//! and 20° (B0 in the head's frame as in `B0`). The pre-registered set's turned members are
//! the head turned and turned back, interpolated like (twice as much as) the as-scanned ones,
//! so the two sets differ in registration rather than in the phantom's blur. Scores are
//! demeaned NRMSE over the true brain; results are in README.md (*as_scanned_mni*).

use std::path::{Path, PathBuf};

use chimap::inversion::MethodName;
use chimap::physics::b0::rotation_with_last_row;
use chimap::physics::geometry_with_b0;
use chimap::pipeline::{self, Config, Settings};
use chimap::register::{itk, rigid};
use chimap::simulate::{self, Dtype, Phantom, SimParams};
use chimap::{evaluate, io, Geometry, Volume};

/// B0 in the head's frame per orientation (the first is the reference, upright).
const B0: [[f64; 3]; 4] = [
    [0.0, 0.0, 1.0],
    [0.258_819, 0.0, 0.965_926],        // 15° about y
    [0.0, -0.422_618, 0.906_308],       // 25° about x
    [-0.241_845, 0.241_845, 0.939_693], // 20° about (1, 1, 0)/√2
];

struct Args {
    work: PathBuf,
    data: PathBuf,
    tesla: f64,
    methods: Vec<MethodName>,
    skip_simulation: bool,
    /// A configuration over the defaults for both sets' runs.
    config: Option<PathBuf>,
}

fn args() -> Args {
    let mut a = Args {
        work: PathBuf::new(),
        data: PathBuf::from("../shared/data/mni_phantom"),
        tesla: 3.0,
        methods: vec![MethodName::Cosmos, MethodName::Lpcnn],
        skip_simulation: false,
        config: None,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < argv.len() {
        match argv[i].as_str() {
            "--data" => {
                a.data = PathBuf::from(&argv[i + 1]);
                i += 1;
            }
            "--tesla" => {
                a.tesla = argv[i + 1].parse().expect("--tesla T");
                i += 1;
            }
            "--methods" => {
                a.methods = argv[i + 1]
                    .split(',')
                    .map(|m| match m {
                        "cosmos" => MethodName::Cosmos,
                        "lpcnn" => MethodName::Lpcnn,
                        other => panic!("--methods takes cosmos and lpcnn, not {other}"),
                    })
                    .collect();
                i += 1;
            }
            "--skip-simulation" => a.skip_simulation = true,
            "--config" => {
                a.config = Some(PathBuf::from(&argv[i + 1]));
                i += 1;
            }
            w => a.work = PathBuf::from(w),
        }
        i += 1;
    }
    assert!(
        !a.work.as_os_str().is_empty(),
        "usage: as_scanned_mni WORK_DIR [options]"
    );
    a
}

/// The first `dims` voxels along each axis.
fn crop(data: &[f32], from: [usize; 3], dims: [usize; 3]) -> Vec<f32> {
    let mut out = Vec::with_capacity(dims.iter().product());
    for k in 0..dims[2] {
        for j in 0..dims[1] {
            let row = from[0] * (j + from[1] * k);
            out.extend_from_slice(&data[row..row + dims[0]]);
        }
    }
    out
}

/// Mean of each 2×2×2 block.
fn block_mean(data: &[f32], fine: [usize; 3]) -> Vec<f32> {
    let c = fine.map(|n| n / 2);
    let mut out = vec![0.0f32; c.iter().product()];
    for k in 0..fine[2] {
        for j in 0..fine[1] {
            for i in 0..fine[0] {
                out[i / 2 + c[0] * (j / 2 + c[1] * (k / 2))] +=
                    data[i + fine[0] * (j + fine[1] * k)] / 8.0;
            }
        }
    }
    out
}

/// The fine (1 mm) head turned by `q` inside the grid (tissue at `p` is the upright head's
/// at `qᵀ·p`, p from the grid centre), and its 2 mm version, with the given geometry.
fn posed(upright: &Phantom, q: &[[f64; 3]; 3], coarse_geometry: Geometry) -> (Phantom, Phantom) {
    let fdims = upright.dims();
    let fine = upright.turned(q, 1).expect("the phantom's grid");
    let cdims = fdims.map(|n| n / 2);
    let fmask: Vec<f32> = fine.brain_mask.iter().map(|&b| b as u8 as f32).collect();
    let coarse = Phantom {
        chi_total: Volume::new(
            cdims,
            block_mean(&fine.chi_total.data, fdims),
            coarse_geometry.clone(),
        ),
        chi_local: Volume::new(
            cdims,
            block_mean(&fine.chi_local.data, fdims),
            coarse_geometry,
        ),
        brain_mask: block_mean(&fmask, fdims)
            .iter()
            .map(|&m| m >= 0.5)
            .collect(),
        m0: block_mean(&fine.m0, fdims),
        r2star: block_mean(&fine.r2star, fdims),
        fat_fraction: block_mean(&fine.fat_fraction, fdims),
    };
    (fine, coarse)
}

fn simulate_sets(a: &Args) {
    let p = Phantom::from_nifti(
        &a.data.join("chi_head.nii.gz"),
        Some(&a.data.join("chi_brain.nii.gz")),
        Some(&a.data.join("brainmask.nii.gz")),
        Some(&a.data.join("seg.nii.gz")),
    )
    .expect("the MNI phantom");
    let from = p.dims();
    let fdims = from.map(|n| n - n % 2);
    let fgeo = Geometry::from_voxel_size([1.0; 3]);
    let c = |d: &[f32]| crop(d, from, fdims);
    let m: Vec<f32> = p.brain_mask.iter().map(|&b| b as u8 as f32).collect();
    let upright = Phantom {
        chi_total: Volume::new(fdims, c(&p.chi_total.data), fgeo.clone()),
        chi_local: Volume::new(fdims, c(&p.chi_local.data), fgeo.clone()),
        brain_mask: c(&m).iter().map(|&v| v > 0.5).collect(),
        m0: c(&p.m0),
        r2star: c(&p.r2star),
        fat_fraction: c(&p.fat_fraction),
    };
    let echo_times = if a.tesla > 5.0 {
        vec![0.004, 0.010, 0.016]
    } else {
        vec![0.004, 0.008, 0.012, 0.016, 0.020]
    };
    let cdims = fdims.map(|n| n / 2);
    let z = [0.0, 0.0, 1.0];
    for (set, as_scanned) in [("as-scanned", true), ("registered", false)] {
        let root = a.work.join(set).join("raw");
        let _ = std::fs::remove_dir_all(&root);
        let anat = root.join("sub-1/anat");
        let truth = root.join("derivatives/chimap-truth/sub-1/anat");
        std::fs::create_dir_all(&anat).unwrap();
        std::fs::create_dir_all(&truth).unwrap();
        io::write_json(
            &root.join("dataset_description.json"),
            &serde_json::json!({"Name": format!("MNI head, {set}"), "BIDSVersion": "1.10.0", "DatasetType": "raw"}),
        )
        .unwrap();
        io::write_json(
            &root.join("derivatives/chimap-truth/dataset_description.json"),
            &serde_json::json!({"Name": "truth", "BIDSVersion": "1.10.0", "DatasetType": "derivative", "GeneratedBy": [{"Name": "as_scanned_mni"}]}),
        )
        .unwrap();
        io::write_atomic(&root.join("participants.tsv"), b"participant_id\nsub-1\n").unwrap();
        for (o, b) in B0.iter().enumerate() {
            let (q, b_grid) = if as_scanned {
                (rotation_with_last_row(*b), z)
            } else {
                (rotation_with_last_row(z), *b)
            };
            let geometry = geometry_with_b0(cdims, [2.0; 3], b_grid);
            let (fine, coarse) = if !as_scanned && o > 0 {
                // The head turned and turned back: interpolated as the as-scanned member's
                // (then twice), so the sets differ in registration, not in phantom blur.
                let q = rotation_with_last_row(*b);
                let (there, _) = posed(&upright, &q, geometry.clone());
                posed(&there, &rigid::transpose(&q), geometry)
            } else {
                posed(&upright, &q, geometry)
            };
            let params = SimParams {
                field_strength: a.tesla,
                echo_times: echo_times.clone(),
                snr: 100.0,
                oversample: 2,
                phase_offset: true,
                seed: 7 + o as u64,
            };
            let start = std::time::Instant::now();
            let series =
                simulate::simulate_series_fine(&coarse, Some(&fine), &params, b_grid).unwrap();
            let stem = format!("sub-1_acq-ori{}", o + 1);
            simulate::write_raw(&anat, &stem, &series, &params, Dtype::Float32).unwrap();
            simulate::write_truth(&truth, &stem, &series, &params).unwrap();
            eprintln!(
                "{set} ori{}: simulated in {:.1} s",
                o + 1,
                start.elapsed().as_secs_f64()
            );
        }
    }
}

fn run(bids: &Path, out: &Path, method: MethodName, config: Option<&Path>) -> f64 {
    let mut config = config.map_or_else(Config::default, |p| {
        Config::from_file(p).expect("a readable configuration")
    });
    config.inversion.method = method;
    let settings = Settings::for_dataset(bids, out, config, "as_scanned_mni");
    let start = std::time::Instant::now();
    let summary = pipeline::run(&settings).expect("pipeline runs");
    assert!(summary.success(), "pipeline failed: {:?}", summary.failed);
    start.elapsed().as_secs_f64()
}

fn read(p: &Path) -> Vec<f32> {
    io::read_image(p).unwrap().frames.remove(0).data
}

fn main() {
    let a = args();
    if !a.skip_simulation {
        simulate_sets(&a);
    }
    // The truth: the upright head's 2 mm χ and brain (ori1 is upright in both sets).
    let truth = a
        .work
        .join("registered/raw/derivatives/chimap-truth/sub-1/anat");
    let chi = read(&truth.join("sub-1_acq-ori1_Chimap.nii.gz"));
    let brain: Vec<bool> = read(&truth.join("sub-1_acq-ori1_desc-brain_mask.nii.gz"))
        .iter()
        .map(|&v| v > 0.5)
        .collect();
    let mut scores = Vec::new();
    for method in &a.methods {
        let name = method.as_str();
        let mut row = Vec::new();
        for set in ["as-scanned", "registered"] {
            let out = a.work.join(set).join(format!("out-{name}"));
            let secs = run(
                &a.work.join(set).join("raw"),
                &out,
                *method,
                a.config.as_deref(),
            );
            let est = read(&out.join(format!("sub-1/anat/sub-1_desc-{name}_Chimap.nii.gz")));
            row.push((evaluate::nrmse_demeaned(&est, &chi, &brain), secs));
        }
        scores.push((name, row));
    }
    // Registration of the as-scanned members (the transforms of the first method's run).
    let first = a.methods[0].as_str();
    let anat = a.work.join(format!("as-scanned/out-{first}/sub-1/anat"));
    let side = io::read_json(&anat.join(format!("sub-1_desc-{first}_Chimap.json"))).unwrap();
    println!(
        "MNI head, 2 mm (1 mm subvoxels), {} T, SNR 100, 4 orientations",
        a.tesla
    );
    println!("member | true turn (deg) | found (deg) | rotation error (deg) | B0 error (deg)");
    for (o, b) in B0.iter().enumerate().skip(1) {
        let q = rotation_with_last_row(*b);
        let t = itk::read(&anat.join(format!(
            "sub-1_acq-ori{}_from-orig_to-ref_mode-image_xfm.txt",
            o + 1
        )))
        .unwrap();
        let got: Vec<f64> = side["B0Directions"][o]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let b0_err = rigid::angle_between_degrees([got[0], got[1], got[2]], *b);
        let rot_err =
            rigid::rotation_angle(&rigid::mul(&t.rotation, &rigid::transpose(&q))).to_degrees();
        println!(
            "ori{} | {:.2} | {:.2} | {rot_err:.3} | {b0_err:.3}",
            o + 1,
            rigid::rotation_angle(&q).to_degrees(),
            t.angle_degrees()
        );
    }
    println!("method | as scanned NRMSE (%) | registered NRMSE (%) | difference (points) | run time (s) as scanned / registered");
    for (name, row) in scores {
        println!(
            "{name} | {:.2} | {:.2} | {:+.2} | {:.0} / {:.0}",
            row[0].0,
            row[1].0,
            row[0].0 - row[1].0,
            row[0].1,
            row[1].1
        );
    }
}
