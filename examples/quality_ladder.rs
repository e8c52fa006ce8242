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
//! It simulates a raw dataset into `WORK_DIR/raw` (ground truth in its derivatives), then runs
//! the participant pipeline three times and prints the demeaned NRMSE of TKD for:
//! (a) the true local field; (b) the true local field given as a total field, so that only
//! background removal and TKD run; (c) the full pipeline from raw phase.
//! (b) − (a) is the harmonic part of the local field that no background removal recovers;
//! (c) − (b) is what our phase processing costs.
//!
//! `--background vsharp|pdf|lbv` and `--config FILE.yaml` (first, before the simulate flags)
//! set the background removal method or any setting of rungs (b) and (c); each rung's
//! background removal time is printed too.

use std::path::{Path, PathBuf};

use clap::Parser;

use chimap::bids::Filter;
use chimap::derivatives::sidecar_path;
use chimap::pipeline::{self, Config, Settings};
use chimap::{evaluate, io};

#[derive(Parser)]
struct Simulate {
    #[command(flatten)]
    args: chimap::simulate::SimulateArgs,
}

fn run(bids: &Path, out: &Path, config: &Config) {
    let settings = Settings {
        bids_dir: bids.to_path_buf(),
        output_dir: out.to_path_buf(),
        filter: Filter::default(),
        config: config.clone(),
        overwrite: true,
        dry_run: false,
        command_line: "quality_ladder".into(),
    };
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

fn main() {
    let mut argv: Vec<String> = std::env::args().collect();
    assert!(
        argv.len() >= 2,
        "usage: quality_ladder WORK_DIR [chimap simulate flags...]"
    );
    let work = PathBuf::from(argv.remove(1));
    let mut config = Config::default();
    loop {
        match argv.get(1).map(String::as_str) {
            Some("--config") => {
                let f = argv.get(2).expect("--config FILE.yaml");
                config = Config::from_file(Path::new(f)).unwrap_or_else(|e| panic!("{e}"));
            }
            Some("--background") => {
                let m = argv.get(2).expect("--background vsharp|pdf|lbv");
                config.preprocess.background.method =
                    serde_yaml::from_str(m).expect("--background vsharp|pdf|lbv");
            }
            _ => break,
        }
        argv.drain(1..3);
    }
    let raw = work.join("raw");
    let mut sim_args = vec![
        "simulate".to_string(),
        raw.to_string_lossy().into_owned(),
        "--overwrite".into(),
    ];
    sim_args.extend(argv.into_iter().skip(1));
    let sim = Simulate::parse_from(sim_args);
    chimap::cli::init_logging_for_tools();
    chimap::simulate::run(&sim.args).expect("simulation runs");

    let truth = raw.join("derivatives/chimap-truth");
    let local_ds = work.join("truth-local");
    let total_ds = work.join("truth-as-total");
    for d in [&local_ds, &total_ds] {
        let _ = std::fs::remove_dir_all(d);
    }
    field_dataset(&truth, &local_ds, "local", "local");
    field_dataset(&truth, &total_ds, "local", "total");
    let rungs = [
        ("(a) true local field", local_ds, work.join("out-a")),
        (
            "(b) true local field as total field",
            total_ds,
            work.join("out-b"),
        ),
        ("(c) raw phase", raw.clone(), work.join("out-c")),
    ];
    for (_, input, out) in &rungs {
        run(input, out, &config);
    }

    println!(
        "\nbackground removal: {}",
        config.preprocess.background.method.name()
    );
    println!("TKD demeaned NRMSE (%)                      eroded mask   whole brain mask");
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
        let truth_chi = volume(&chi_truth_path);
        let brain: Vec<bool> = volume(
            &truth
                .join(&anat)
                .join(format!("{name}_desc-brain_mask.nii.gz")),
        )
        .iter()
        .map(|&v| v > 0.5)
        .collect();
        // The common region: voxels where the raw-phase run (c) defines χ.
        let eroded_c = work
            .join("out-c")
            .join(&anat)
            .join(format!("{name}_desc-eroded_mask.nii.gz"));
        let eroded: Vec<bool> = volume(&eroded_c)
            .iter()
            .zip(&brain)
            .map(|(&v, &b)| v > 0.5 && b)
            .collect();
        println!("{name}");
        let mut scores = Vec::new();
        for (label, _, out) in &rungs {
            let chi_path = out
                .join(&anat)
                .join(format!("{name}_desc-tkd_Chimap.nii.gz"));
            let chi = volume(&chi_path);
            let e = evaluate::nrmse_demeaned(&chi, &truth_chi, &eroded);
            let w = evaluate::nrmse_demeaned(&chi, &truth_chi, &brain);
            let side = io::read_json(&sidecar_path(&chi_path)).expect("sidecar");
            let t_bg = side["ProcessingTimeSeconds"]["background removal"]
                .as_f64()
                .map(|t| format!("   background removal {t:.1} s"))
                .unwrap_or_default();
            println!("  {label:<40} {e:>8.1}      {w:>8.1}{t_bg}");
            scores.push(e);
            assert!(sidecar_path(&chi_path).is_file());
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
