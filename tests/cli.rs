//! End-to-end runs of the `chimap` binary on small datasets made by `chimap simulate`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chimap::io;

fn chimap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chimap"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A tiny raw dataset: `subjects` subjects, two orientations each, 4 echoes.
fn simulate(dir: &Path, subjects: &str, dtype: &str) -> PathBuf {
    let ds = dir.join("raw");
    let o = chimap(&[
        "simulate",
        ds.to_str().unwrap(),
        "--subjects",
        subjects,
        "--dims",
        "32",
        "32",
        "24",
        "--voxel-size",
        "4",
        "4",
        "4",
        "--echo-times",
        "4",
        "8",
        "12",
        "16",
        "--b0-direction",
        "0",
        "0",
        "1",
        "--b0-direction",
        "0.2588",
        "0",
        "0.9659",
        "--dtype",
        dtype,
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "simulate failed: {}", stderr(&o));
    ds
}

fn files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect()
}

/// A failed run: non-zero exit, no panic, the message names `needle`, no partial files left.
fn assert_clean_failure(o: &Output, needle: &str, out: &Path) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert!(err.contains(needle), "expected {needle:?} in: {err}");
    if out.exists() {
        let partial: Vec<_> = files(out)
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".partial"))
            .collect();
        assert!(partial.is_empty(), "half-written files left: {partial:?}");
    }
}

#[test]
fn participant_run_writes_a_derivative_dataset_with_provenance_and_reruns_skip() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "1", "int16");
    let out = dir.path().join("out");
    let o = chimap(&[
        ds.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--participant-label",
        "sub-1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let desc = io::read_json(&out.join("dataset_description.json")).unwrap();
    assert_eq!(desc["DatasetType"], "derivative");
    assert_eq!(desc["GeneratedBy"][0]["Name"], "chimap");
    let anat = out.join("sub-1/anat");
    for ori in ["ori1", "ori2"] {
        for suffix in [
            "desc-tkd_Chimap",
            "desc-local_fieldmap",
            "desc-total_fieldmap",
            "desc-brain_mask",
            "desc-eroded_mask",
            "desc-voids_mask",
        ] {
            let p = anat.join(format!("sub-1_acq-{ori}_{suffix}.nii.gz"));
            assert!(p.is_file(), "missing {}", p.display());
        }
        let side =
            io::read_json(&anat.join(format!("sub-1_acq-{ori}_desc-tkd_Chimap.json"))).unwrap();
        assert_eq!(side["Units"], "ppm");
        assert_eq!(side["Method"], "tkd");
        assert_eq!(side["MagneticFieldStrength"], 3.0);
        assert_eq!(side["EchoTime"].as_array().unwrap().len(), 4);
        assert!(side["Sources"][0]
            .as_str()
            .unwrap()
            .starts_with("bids:raw:sub-1/anat/"));
        assert!(side["ProcessingTimeSeconds"]["total"].as_f64().unwrap() > 0.0);
        assert_eq!(
            side["Preprocessing"]["PhaseScaling"]["bits"], 12,
            "int16 scanner phase is detected"
        );
        let chi =
            io::read_image(&anat.join(format!("sub-1_acq-{ori}_desc-tkd_Chimap.nii.gz"))).unwrap();
        assert!(chi.frames[0].data.iter().all(|v| v.is_finite()));
        assert!(chi.frames[0].data.iter().any(|&v| v != 0.0));
    }
    // The tilted series carries its B0 direction from the affine.
    let side = io::read_json(&anat.join("sub-1_acq-ori2_desc-local_fieldmap.json")).unwrap();
    let b = side["B0Direction"].as_array().unwrap();
    assert!((b[0].as_f64().unwrap() - 0.2588).abs() < 1e-3, "{b:?}");
    assert!(
        !ds.join("derivatives/chimap").exists(),
        "nothing is written into the input"
    );

    // A rerun skips finished acquisitions; --overwrite recomputes them.
    let chimap_file = anat.join("sub-1_acq-ori1_desc-tkd_Chimap.nii.gz");
    let before = std::fs::metadata(&chimap_file).unwrap().modified().unwrap();
    let o = chimap(&[ds.to_str().unwrap(), out.to_str().unwrap(), "participant"]);
    assert!(o.status.success());
    assert!(stderr(&o).contains("skipped 2"), "{}", stderr(&o));
    assert!(
        !stderr(&o).contains('\x1b'),
        "no colour codes when stderr is not a terminal"
    );
    assert_eq!(
        std::fs::metadata(&chimap_file).unwrap().modified().unwrap(),
        before
    );
    let o = chimap(&[
        ds.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--overwrite",
        "--log-format",
        "json",
    ]);
    assert!(o.status.success());
    let first = stderr(&o).lines().next().unwrap_or_default().to_string();
    assert!(
        serde_json::from_str::<serde_json::Value>(&first).is_ok(),
        "JSON log line: {first}"
    );
}

#[test]
fn dry_run_lists_acquisitions_and_orientation_sets_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "2", "int16");
    let out = dir.path().join("out");
    let o = chimap(&[
        ds.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--dry-run",
        "--participant-label",
        "2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("sub-2_acq-ori1") && text.contains("sub-2_acq-ori2"),
        "{text}"
    );
    assert!(!text.contains("sub-1_"), "{text}");
    assert!(text.contains("orientation set (2 orientations)"), "{text}");
    assert!(text.contains("tilt 15.0°"), "{text}");
    assert!(!out.exists());
}

#[test]
fn local_field_maps_from_a_derivative_dataset_go_straight_to_inversion() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "1", "float32");
    let out = dir.path().join("out");
    let truth = ds.join("derivatives/chimap-truth");
    let o = chimap(&[
        truth.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let side = io::read_json(&out.join("sub-1/anat/sub-1_acq-ori1_desc-tkd_Chimap.json")).unwrap();
    assert_eq!(side["Preprocessing"]["Input"], "local field map");
    // TKD of the true local field correlates with the true χ.
    let chi = io::read_image(&out.join("sub-1/anat/sub-1_acq-ori1_desc-tkd_Chimap.nii.gz"))
        .unwrap()
        .frames
        .remove(0)
        .data;
    let want = io::read_image(&truth.join("sub-1/anat/sub-1_acq-ori1_Chimap.nii.gz"))
        .unwrap()
        .frames
        .remove(0)
        .data;
    let mask: Vec<bool> =
        io::read_image(&truth.join("sub-1/anat/sub-1_acq-ori1_desc-brain_mask.nii.gz"))
            .unwrap()
            .frames[0]
            .data
            .iter()
            .map(|&v| v > 0.5)
            .collect();
    let e = chimap::evaluate::nrmse_demeaned(&chi, &want, &mask);
    assert!(e < 60.0, "TKD NRMSE from the true local field: {e} %");
}

#[test]
fn bad_inputs_fail_with_a_clear_message_and_leave_nothing_half_written() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "1", "float32");
    let out = dir.path().join("out");
    let (ds_s, out_s) = (ds.to_str().unwrap(), out.to_str().unwrap());
    let anat = ds.join("sub-1/anat");

    // Not a BIDS dataset.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_clean_failure(
        &chimap(&[empty.to_str().unwrap(), out_s, "participant"]),
        "not a BIDS dataset",
        &out,
    );
    // Output inside the input.
    let inside = ds.join("sub-1/out");
    assert_clean_failure(
        &chimap(&[ds_s, inside.to_str().unwrap(), "participant"]),
        "inside the input dataset",
        &out,
    );
    assert!(!inside.exists());
    // A learned method without weights (none ship yet), or with a missing file.
    assert_clean_failure(
        &chimap(&[ds_s, out_s, "participant", "--method", "lpcnn"]),
        "--weights",
        &out,
    );
    assert_clean_failure(
        &chimap(&[
            ds_s,
            out_s,
            "participant",
            "--method",
            "unet",
            "--weights",
            "no.safetensors",
        ]),
        "no.safetensors",
        &out,
    );
    // Unknown participant; unknown config key.
    assert_clean_failure(
        &chimap(&[ds_s, out_s, "participant", "--participant-label", "9"]),
        "9",
        &out,
    );
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(&cfg, "inversion:\n  tkd:\n    treshold: 0.2\n").unwrap();
    assert_clean_failure(
        &chimap(&[
            ds_s,
            out_s,
            "participant",
            "--config",
            cfg.to_str().unwrap(),
        ]),
        "treshold",
        &out,
    );

    // NaN in the phase of one orientation: that series fails, the other still runs.
    let phase = anat.join("sub-1_acq-ori1_echo-2_part-phase_MEGRE.nii.gz");
    let mut img = io::read_image(&phase).unwrap();
    img.frames[0].data[100] = f32::NAN;
    io::write_volume(&phase, &img.frames[0]).unwrap();
    let o = chimap(&[ds_s, out_s, "participant"]);
    assert_clean_failure(&o, "sub-1_acq-ori1_echo-2_part-phase_MEGRE.nii.gz", &out);
    assert!(stderr(&o).contains("NaN"), "{}", stderr(&o));
    assert!(
        out.join("sub-1/anat/sub-1_acq-ori2_desc-tkd_Chimap.nii.gz")
            .is_file(),
        "the other series still ran"
    );
    assert!(!out
        .join("sub-1/anat/sub-1_acq-ori1_desc-tkd_Chimap.nii.gz")
        .exists());

    // A truncated file.
    let bytes = std::fs::read(&phase).unwrap();
    std::fs::write(&phase, &bytes[..bytes.len() / 2]).unwrap();
    assert_clean_failure(
        &chimap(&[ds_s, out_s, "participant", "--overwrite"]),
        "sub-1_acq-ori1_echo-2_part-phase_MEGRE.nii.gz",
        &out,
    );

    // Missing EchoTime.
    let side = anat.join("sub-1_acq-ori2_echo-3_part-phase_MEGRE.json");
    let mut v = io::read_json(&side).unwrap();
    v.as_object_mut().unwrap().remove("EchoTime");
    io::write_json(&side, &v).unwrap();
    let o = chimap(&[ds_s, out_s, "participant", "--overwrite"]);
    assert_clean_failure(&o, "EchoTime", &out);
    assert!(
        stderr(&o).contains("sub-1_acq-ori2_echo-3_part-phase_MEGRE"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn magnitude_phase_mismatch_and_magnitude_only_data_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "1", "float32");
    let out = dir.path().join("out");
    let anat = ds.join("sub-1/anat");
    // A magnitude echo on another grid.
    let mag = anat.join("sub-1_acq-ori1_echo-2_part-mag_MEGRE.nii.gz");
    let small = chimap::Volume::zeros([8, 8, 8], chimap::Geometry::from_voxel_size([4.0; 3]));
    io::write_volume(&mag, &small).unwrap();
    let o = chimap(&[
        ds.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--participant-label",
        "1",
    ]);
    assert_clean_failure(&o, "sub-1_acq-ori1_echo-2_part-mag_MEGRE.nii.gz", &out);
    // Magnitude only: every phase file removed.
    for p in files(&anat) {
        if p.to_string_lossy().contains("part-phase") {
            std::fs::remove_file(p).unwrap();
        }
    }
    let o = chimap(&[ds.to_str().unwrap(), out.to_str().unwrap(), "participant"]);
    assert_clean_failure(&o, "phase", &out);
}

#[test]
fn config_default_prints_every_section() {
    let o = chimap(&["config", "--default"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for key in [
        "preprocess:",
        "unwrap:",
        "echo_fit:",
        "mask:",
        "voids:",
        "background:",
        "inversion:",
        "tkd:",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    // What it prints is itself a valid configuration.
    assert!(chimap::pipeline::Config::from_yaml(&text).is_ok());
}
