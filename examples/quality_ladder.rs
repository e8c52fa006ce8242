//! The quality ladder: how much of TKD's error comes from the physics of background removal
//! and how much from our own phase processing.
//!
//! ```sh
//! cargo run --release --example quality_ladder -- WORK_DIR [chimap simulate flags...]
//! # e.g. the MNI head at 3 T, 5 echoes, SNR 100:
//! cargo run --release --example quality_ladder -- /tmp/ladder \
//!     --chi ../shared/data/mni_phantom/chi_head.nii.gz --chi-brain ../shared/data/mni_phantom/chi_brain.nii.gz \
//!     --mask ../shared/data/mni_phantom/brainmask.nii.gz --seg ../shared/data/mni_phantom/seg.nii.gz
//! ```
//!
//! Options, before WORK_DIR: `--methods tkd,cfl2,ilsqr,tv` scores several inversions (default
//! TKD alone); `--skip-simulation` reuses `WORK_DIR/raw` from an earlier run;
//! `--background vsharp|pdf|lbv` and `--config FILE.yaml` change the pipeline's settings.
//!
//! It simulates a raw dataset into `WORK_DIR/raw` (ground truth in its derivatives), then runs
//! the participant pipeline three times per method and prints the demeaned NRMSE for:
//! (a) the true local field; (b) the true local field given as a total field, so that only
//! background removal and TKD run; (c) the full pipeline from raw phase.
//! (b) − (a) is the harmonic part of the local field that no background removal recovers;
//! (c) − (b) is what our phase processing costs.

use std::path::{Path, PathBuf};

use clap::Parser;

use chimap::derivatives::sidecar_path;
use chimap::inversion::MethodName;
use chimap::pipeline::{self, Config, Settings};
use chimap::{evaluate, io};

#[derive(Parser)]
struct Simulate {
    #[command(flatten)]
    args: chimap::simulate::SimulateArgs,
}

fn run(bids: &Path, out: &Path, config: &Config, method: MethodName) {
    let mut config = config.clone();
    config.inversion.method = method;
    let settings = Settings::for_dataset(bids, out, config, "quality_ladder");
    let summary = pipeline::run(&settings).expect("pipeline runs");
    assert!(summary.success(), "pipeline failed: {:?}", summary.failed);
}

/// Copies the truth derivative's `desc-<from>_fieldmap` as `desc-<to>_fieldmap`, with masks.
fn field_dataset(truth: &Path, dest: &Path, from: &str, to: &str) {
    for entry in walk(truth) {
        let rel = entry.strip_prefix(truth).unwrap();
        let name = rel.to_string_lossy();
        let target =
            if name.ends_with("dataset_description.json") || name.contains("desc-brain_mask") {
                dest.join(rel)
            } else if name.contains(&format!("desc-{from}_fieldmap")) {
                dest.join(name.replace(&format!("desc-{from}_"), &format!("desc-{to}_")))
            } else {
                continue;
            };
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::copy(&entry, &target).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

fn volume(path: &Path) -> Vec<f32> {
    io::read_image(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .frames
        .swap_remove(0)
        .data
}

/// Seconds the inversion stage took, from the Chimap's sidecar.
fn inversion_seconds(chi_path: &Path) -> f64 {
    let sidecar: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sidecar_path(chi_path)).unwrap()).unwrap();
    sidecar["ProcessingTimeSeconds"]["inversion"]
        .as_f64()
        .unwrap_or(f64::NAN)
}

fn main() {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    let mut methods = vec![MethodName::Tkd];
    let mut simulate = true;
    let mut config = Config::default();
    loop {
        match argv.first().map(String::as_str) {
            Some("--methods") if argv.len() > 1 => {
                methods = argv[1]
                    .split(',')
                    .map(|m| clap::ValueEnum::from_str(m, true).expect("a known method"))
                    .collect();
                argv.drain(..2);
            }
            Some("--skip-simulation") => {
                simulate = false;
                argv.remove(0);
            }
            Some("--config") if argv.len() > 1 => {
                config = Config::from_file(Path::new(&argv[1])).unwrap_or_else(|e| panic!("{e}"));
                argv.drain(..2);
            }
            Some("--background") if argv.len() > 1 => {
                config.preprocess.background.method =
                    serde_yaml::from_str(&argv[1]).expect("--background vsharp|pdf|lbv");
                argv.drain(..2);
            }
            _ => break,
        }
    }
    assert!(
        !argv.is_empty(),
        "usage: quality_ladder [--methods LIST] [--skip-simulation] [--config FILE.yaml] [--background vsharp|pdf|lbv] WORK_DIR [chimap simulate flags...]"
    );
    let work = PathBuf::from(argv.remove(0));
    let raw = work.join("raw");
    let mut sim_args = vec![
        "simulate".to_string(),
        raw.to_string_lossy().into_owned(),
        "--overwrite".into(),
    ];
    sim_args.extend(argv);
    chimap::cli::init_logging_for_tools();
    if simulate {
        let sim = Simulate::parse_from(sim_args);
        chimap::simulate::run(&sim.args).expect("simulation runs");
    }

    let truth = raw.join("derivatives/chimap-truth");
    let local_ds = work.join("truth-local");
    let total_ds = work.join("truth-as-total");
    for d in [&local_ds, &total_ds] {
        let _ = std::fs::remove_dir_all(d);
    }
    field_dataset(&truth, &local_ds, "local", "local");
    field_dataset(&truth, &total_ds, "local", "total");
    let rungs = [
        ("(a) true local field", local_ds, "a"),
        ("(b) true local field as total field", total_ds, "b"),
        ("(c) raw phase", raw.clone(), "c"),
    ];
    let out_dir = |method: MethodName, rung: &str| {
        let m = format!("{method:?}").to_lowercase();
        work.join(format!("out-{m}-{rung}"))
    };
    for &method in &methods {
        for (_, input, rung) in &rungs {
            run(input, &out_dir(method, rung), &config, method);
        }
    }

    println!(
        "\nbackground removal: {}",
        config.preprocess.background.method.name()
    );
    for chi_truth_path in walk(&truth)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with("_Chimap.nii.gz"))
    {
        let name = chi_truth_path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace("_Chimap.nii.gz", "");
        let anat = chi_truth_path
            .parent()
            .unwrap()
            .strip_prefix(&truth)
            .unwrap()
            .to_path_buf();
        let truth_image = io::read_image(&chi_truth_path)
            .unwrap_or_else(|e| panic!("{e}"))
            .frames
            .swap_remove(0);
        let (truth_dims, truth_chi) = (truth_image.dims, truth_image.data);
        let brain: Vec<bool> = volume(
            &truth
                .join(&anat)
                .join(format!("{name}_desc-brain_mask.nii.gz")),
        )
        .iter()
        .map(|&v| v > 0.5)
        .collect();
        // The common region: voxels where the raw-phase run (c) of the first method defines χ.
        let eroded_c = out_dir(methods[0], "c")
            .join(&anat)
            .join(format!("{name}_desc-eroded_mask.nii.gz"));
        let eroded: Vec<bool> = volume(&eroded_c)
            .iter()
            .zip(&brain)
            .map(|(&v, &b)| v > 0.5 && b)
            .collect();
        // The raw-phase run's own brain mask against the truth, and how much of the true
        // brain gets a χ value.
        let own: Vec<bool> = volume(
            &out_dir(methods[0], "c")
                .join(&anat)
                .join(format!("{name}_desc-brain_mask.nii.gz")),
        )
        .iter()
        .map(|&v| v > 0.5)
        .collect();
        let count = |m: &[bool]| m.iter().filter(|&&b| b).count() as f64;
        let both = own.iter().zip(&brain).filter(|(a, b)| **a && **b).count() as f64;
        println!(
            "\n{name}: brain mask Dice {:.3}, volume {:.3} × the true brain's, χ on {:.1} % of the true brain",
            2.0 * both / (count(&own) + count(&brain)),
            count(&own) / count(&brain),
            100.0 * count(&eroded) / count(&brain)
        );
        let reference = evaluate::metrics::Reference::new(&truth_chi, &eroded, truth_dims);
        println!("\n{name}: demeaned NRMSE (%)              eroded mask   whole brain mask   HFEN (%)   XSIM   inversion (s)");
        for &method in &methods {
            let m = format!("{method:?}").to_lowercase();
            println!("{m}");
            let mut scores = Vec::new();
            for (label, _, rung) in &rungs {
                let chi_path = out_dir(method, rung)
                    .join(&anat)
                    .join(format!("{name}_desc-{m}_Chimap.nii.gz"));
                let chi = volume(&chi_path);
                let e = evaluate::nrmse_demeaned(&chi, &truth_chi, &eroded);
                let w = evaluate::nrmse_demeaned(&chi, &truth_chi, &brain);
                let t = inversion_seconds(&chi_path);
                let (h, x) = (reference.hfen(&chi), reference.xsim(&chi));
                println!(
                    "  {label:<40} {e:>8.1}      {w:>8.1}        {h:>8.1}   {x:.3}   {t:>8.2}"
                );
                scores.push(e);
            }
            println!(
                "  (b) − (a) harmonic part lost by background removal: {:.1} points",
                scores[1] - scores[0]
            );
            println!(
                "  (c) − (b) cost of our phase processing:              {:.1} points (goal ≤ 8)",
                scores[2] - scores[1]
            );
        }
    }
}
