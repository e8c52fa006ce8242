//! End-to-end runs of the `chimap` binary on small datasets made by `chimap simulate`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use chimap::io;
use chimap::qc::Verdict;

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

/// Runs COSMOS on `ds` into `out` with registration by mutual information (config written
/// to `dir`), and asserts that it succeeded.
fn cosmos_registered_by_mutual_information(dir: &Path, ds: &Path, out: &Path) {
    let config = dir.join("mi.yaml");
    std::fs::write(&config, "registration:\n  similarity: mutual-information\n").unwrap();
    let o = chimap(&[
        ds.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--method",
        "cosmos",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
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

fn read(path: &Path) -> Vec<f32> {
    io::read_image(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .frames
        .remove(0)
        .data
}

#[test]
fn cosmos_inverts_each_orientation_set_jointly() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "1", "float32");
    let truth = ds.join("derivatives/chimap-truth");
    let anat = "sub-1/anat";

    // From the true local fields of both orientations: one Chimap for the set, better than
    // TKD of either orientation alone.
    let out = dir.path().join("out-local");
    let o = chimap(&[
        truth.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--method",
        "cosmos",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let set_chi = out.join(anat).join("sub-1_desc-cosmos_Chimap.nii.gz");
    let side = io::read_json(&chimap::derivatives::sidecar_path(&set_chi)).unwrap();
    assert_eq!(side["B0Directions"].as_array().unwrap().len(), 2);
    assert_eq!(side["Orientations"][1], "sub-1_acq-ori2");
    assert!(!out
        .join(anat)
        .join("sub-1_acq-ori1_desc-cosmos_Chimap.nii.gz")
        .exists());
    let want = read(&truth.join(anat).join("sub-1_acq-ori1_Chimap.nii.gz"));
    let mask: Vec<bool> = read(
        &truth
            .join(anat)
            .join("sub-1_acq-ori1_desc-brain_mask.nii.gz"),
    )
    .iter()
    .map(|&v| v > 0.5)
    .collect();
    let e_cosmos = chimap::evaluate::nrmse_demeaned(&read(&set_chi), &want, &mask);
    let tkd_out = dir.path().join("out-tkd");
    let o = chimap(&[
        truth.to_str().unwrap(),
        tkd_out.to_str().unwrap(),
        "participant",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e_tkd = chimap::evaluate::nrmse_demeaned(
        &read(
            &tkd_out
                .join(anat)
                .join("sub-1_acq-ori1_desc-tkd_Chimap.nii.gz"),
        ),
        &want,
        &mask,
    );
    assert!(e_cosmos < e_tkd, "COSMOS {e_cosmos} % vs TKD {e_tkd} %");

    // From raw phase: each orientation's preprocessing outputs under its own name, then the
    // set's Chimap.
    let out = dir.path().join("out-raw");
    let o = chimap(&[
        ds.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--method",
        "cosmos",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for name in [
        "sub-1_acq-ori1_desc-local_fieldmap.nii.gz",
        "sub-1_acq-ori2_desc-local_fieldmap.nii.gz",
        "sub-1_acq-ori2_desc-eroded_mask.nii.gz",
        "sub-1_desc-cosmos_Chimap.nii.gz",
    ] {
        assert!(out.join(anat).join(name).is_file(), "missing {name}");
    }
}

/// `--method lpcnn` needs no flag: the shipped weights run on the whole orientation set,
/// and the sidecar says exactly which weights, which architecture and how they were trained.
#[test]
fn learned_methods_run_their_shipped_weights_with_no_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = chimap(&[
        example().to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--participant-label",
        "1",
        "--method",
        "lpcnn",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let chi = out.join("sub-1/anat/sub-1_desc-lpcnn_Chimap.nii.gz");
    assert!(read(&chi).iter().all(|v| v.is_finite()));
    let side = io::read_json(&chimap::derivatives::sidecar_path(&chi)).unwrap();
    let p = &side["MethodParameters"];
    assert_eq!(p["WeightsName"], "lpcnn-default", "{side}");
    assert_eq!(p["WeightsShipped"], true);
    assert_eq!(p["WeightsSha256"].as_str().unwrap().len(), 64);
    assert!(p["Architecture"]["channels"].as_u64().unwrap() > 0, "{p}");
    assert!(p["Training"]["CpuHours"].as_f64().unwrap() > 0.0, "{p}");
    assert_eq!(side["B0Directions"].as_array().unwrap().len(), 2);
}

#[test]
fn medi_plus_zero_writes_the_csf_mask_it_held_uniform() {
    let dir = tempfile::tempdir().unwrap();
    // The example's 2 mm grid leaves no ventricle 5 mm inside the brain: no CSF term.
    let run = |out: &Path, config: Option<&Path>| {
        let mut args = vec![
            example().to_str().unwrap().to_string(),
            out.to_str().unwrap().to_string(),
            "participant".into(),
            "--participant-label".into(),
            "1".into(),
            "--method".into(),
            "medi".into(),
        ];
        if let Some(c) = config {
            args.extend(["--config".to_string(), c.to_str().unwrap().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = chimap(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let anat = out.join("sub-1/anat");
        let side = io::read_json(&anat.join("sub-1_acq-ori1_desc-medi_Chimap.json")).unwrap();
        let csf = anat.join("sub-1_acq-ori1_desc-csf_mask.nii.gz");
        (
            side["MethodParameters"]["csf_voxels"].as_u64().unwrap(),
            csf,
        )
    };
    let (voxels, csf) = run(&dir.path().join("default"), None);
    assert_eq!(voxels, 0);
    assert!(!csf.exists());
    let config = dir.path().join("csf.yaml");
    std::fs::write(
        &config,
        "inversion:\n  medi:\n    csf:\n      inset_mm: 0\n      min_voxels: 1\n",
    )
    .unwrap();
    let (voxels, csf) = run(&dir.path().join("inset0"), Some(&config));
    let mask = read(&csf);
    let brain = read(&csf.with_file_name("sub-1_acq-ori1_desc-brain_mask.nii.gz"));
    assert!(voxels > 0);
    assert_eq!(mask.iter().filter(|&&v| v > 0.5).count() as u64, voxels);
    assert!(
        mask.iter().zip(&brain).all(|(&c, &b)| c <= b),
        "CSF outside the brain mask"
    );
    let side = io::read_json(&chimap::derivatives::sidecar_path(&csf)).unwrap();
    assert_eq!(side["Parameters"]["inset_mm"], 0.0);
}

#[test]
fn cosmos_on_a_single_orientation_names_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "1", "float32");
    // Without its second orientation the series is alone: COSMOS refuses it with the reason.
    let lone = dir.path().join("lone");
    std::fs::create_dir_all(lone.join("sub-1/anat")).unwrap();
    for f in files(&ds) {
        let rel = f.strip_prefix(&ds).unwrap();
        let name = rel.to_string_lossy();
        if name.contains("acq-ori2") || name.starts_with("derivatives") {
            continue;
        }
        let dest = lone.join(rel);
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(&f, dest).unwrap();
    }
    let out2 = dir.path().join("out2");
    let o = chimap(&[
        lone.to_str().unwrap(),
        out2.to_str().unwrap(),
        "participant",
        "--method",
        "cosmos",
    ]);
    assert_clean_failure(&o, "at least two head orientations", &out2);
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
    // A learned method with a missing weights file.
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

/// Writes a float32 NIfTI with 1 mm voxels.
fn write_nii(dir: &Path, name: &str, dims: [usize; 3], data: Vec<f32>) -> PathBuf {
    let p = dir.join(name);
    let v = chimap::Volume::new(dims, data, chimap::Geometry::from_voxel_size([1.0; 3]));
    io::write_volume(&p, &v).unwrap();
    p
}

#[test]
fn evaluate_scores_maps_prints_a_table_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dims = [10, 9, 8];
    let n = 10 * 9 * 8;
    let coords = |i: usize| ((i % 10) as f32, ((i / 10) % 9) as f32, (i / 90) as f32);
    let reference: Vec<f32> = (0..n)
        .map(|i| {
            let (x, y, z) = coords(i);
            0.05 * (0.9 * x).sin() + 0.03 * (0.6 * y).cos() + 0.01 * z
        })
        .collect();
    // The mask leaves a one-voxel border out; the segmentation splits it into three slabs.
    let inside = |i: usize| {
        let (x, y, z) = coords(i);
        x > 0.0 && y > 0.0 && z > 0.0 && x < 9.0 && y < 8.0 && z < 7.0
    };
    let mask: Vec<f32> = (0..n).map(|i| inside(i) as u8 as f32).collect();
    let seg: Vec<f32> = (0..n)
        .map(|i| {
            if inside(i) {
                1.0 + (coords(i).0 / 3.0).floor()
            } else {
                0.0
            }
        })
        .collect();
    // A perfect map, a scaled and shifted copy, and a noisy copy.
    let scaled: Vec<f32> = reference.iter().map(|&v| 0.5 * v + 0.02).collect();
    let noisy: Vec<f32> = reference
        .iter()
        .enumerate()
        .map(|(i, &v)| v + 0.02 * (((i * 7919) % 101) as f32 / 100.0 - 0.5))
        .collect();
    let rp = write_nii(d, "ref.nii.gz", dims, reference.clone());
    let mp = write_nii(d, "mask.nii.gz", dims, mask.clone());
    let sp = write_nii(d, "seg.nii.gz", dims, seg.clone());
    let perfect = write_nii(d, "perfect_Chimap.nii.gz", dims, reference.clone());
    let sc = write_nii(d, "scaled_Chimap.nii.gz", dims, scaled.clone());
    let no = write_nii(d, "noisy_Chimap.nii.gz", dims, noisy.clone());
    let json_path = d.join("scores.json");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = chimap(&[
        "evaluate",
        "--reference",
        &s(&rp),
        "--mask",
        &s(&mp),
        "--seg",
        &s(&sp),
        "--json",
        &s(&json_path),
        &s(&perfect),
        &s(&sc),
        &s(&no),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    for needle in [
        "perfect_Chimap.nii.gz",
        "scaled_Chimap.nii.gz",
        "noisy_Chimap.nii.gz",
        "XSIM",
        "detNRMSE%",
        "per label",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }

    let v = io::read_json(&json_path).unwrap();
    assert_eq!(v["mask_voxels"], 8 * 7 * 6);
    let maps = v["maps"].as_array().unwrap();
    assert_eq!(maps.len(), 3);
    let f = |m: &serde_json::Value, k: &str| m[k].as_f64().unwrap_or_else(|| panic!("{k}: {m}"));
    // The perfect copy.
    for (k, want) in [
        ("rmse", 0.0),
        ("nrmse_demeaned", 0.0),
        ("nrmse_detrended", 0.0),
        ("hfen", 0.0),
        ("ssim", 1.0),
        ("xsim", 1.0),
        ("correlation", 1.0),
        ("label_slope", 1.0),
    ] {
        assert!((f(&maps[0], k) - want).abs() < 1e-6, "{k}: {}", maps[0]);
    }
    // The affine copy: detrended NRMSE and correlation forgive it; the others do not.
    let m = &maps[1];
    assert!(f(m, "nrmse_detrended") < 1e-3, "{m}");
    assert!((f(m, "correlation") - 1.0).abs() < 1e-6, "{m}");
    assert!((f(m, "detrend_scale") - 2.0).abs() < 1e-4, "{m}");
    assert!((f(m, "nrmse_demeaned") - 50.0).abs() < 1e-3, "{m}");
    assert!((f(m, "label_slope") - 0.5).abs() < 1e-5, "{m}");
    assert!(f(m, "xsim") < 0.999, "{m}");
    // Plain RMSE, recomputed here from its definition.
    let (mut e, mut r2) = (0.0f64, 0.0f64);
    for i in (0..n).filter(|&i| mask[i] > 0.5) {
        e += ((scaled[i] - reference[i]) as f64).powi(2);
        r2 += (reference[i] as f64).powi(2);
    }
    assert!((f(m, "rmse") - 100.0 * (e / r2).sqrt()).abs() < 1e-3, "{m}");
    // The noisy copy scores in between.
    let m = &maps[2];
    assert!(f(m, "nrmse_demeaned") > 1.0 && f(m, "hfen") > 1.0, "{m}");
    assert!(
        f(m, "correlation") < 0.999 && f(m, "nrmse_detrended") > 1.0,
        "{m}"
    );
    assert!(f(m, "xsim") < 1.0 && f(m, "ssim") < 1.0, "{m}");
    // Per-label means: label 1 is x in 1..3 inside the mask.
    let labels = v["labels"].as_array().unwrap();
    assert_eq!(labels.len(), 3, "{v}");
    let sel: Vec<usize> = (0..n).filter(|&i| seg[i] == 1.0).collect();
    let mean = |d: &[f32]| sel.iter().map(|&i| d[i] as f64).sum::<f64>() / sel.len() as f64;
    assert_eq!(labels[0]["label"], 1);
    assert_eq!(labels[0]["voxels"], sel.len());
    assert!((f(&labels[0], "reference_mean") - mean(&reference)).abs() < 1e-6);
    assert!((f(&maps[1]["labels"][0], "mean") - mean(&scaled)).abs() < 1e-6);

    // Bad inputs: a map on another grid and a map with NaN are named; no JSON is written.
    let other = write_nii(d, "other_grid.nii.gz", [10, 9, 7], vec![0.0; 630]);
    let mut with_nan = reference.clone();
    with_nan[5] = f32::NAN;
    let nan = write_nii(d, "nan_Chimap.nii.gz", dims, with_nan);
    let empty = write_nii(d, "empty_mask.nii.gz", dims, vec![0.0; n]);
    let out2 = d.join("bad.json");
    for (maskp, map, needle) in [
        (&mp, &other, "other_grid.nii.gz"),
        (&mp, &nan, "nan_Chimap.nii.gz"),
        (&empty, &perfect, "empty_mask.nii.gz"),
    ] {
        let o = chimap(&[
            "evaluate",
            "--reference",
            &s(&rp),
            "--mask",
            &s(maskp),
            "--json",
            &s(&out2),
            &s(map),
        ]);
        assert_clean_failure(&o, needle, d);
        assert_eq!(o.status.code(), Some(2));
        assert!(!out2.exists());
    }
}

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    for e in walkdir::WalkDir::new(from)
        .into_iter()
        .filter_map(|e| e.ok())
    {
        let dest = to.join(e.path().strip_prefix(from).unwrap());
        if e.file_type().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bids/example")
}

/// Every `<img src>` of an HTML page, resolved beside it; each must be a PNG.
fn assert_images_exist(page: &Path) -> usize {
    let html = std::fs::read_to_string(page).unwrap();
    let srcs: Vec<&str> = html
        .split("<img src=\"")
        .skip(1)
        .map(|s| s.split('"').next().unwrap())
        .collect();
    for s in &srcs {
        let p = page.parent().unwrap().join(s);
        let bytes = std::fs::read(&p).unwrap_or_else(|_| panic!("{} is missing", p.display()));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "{} is not a PNG",
            p.display()
        );
    }
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "external resource"
    );
    srcs.len()
}

#[test]
fn a_corrupted_echo_fails_qc_unless_ignored_and_the_report_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    copy_tree(&example(), &ds);
    // Echo 3 of sub-1 ori1 replaced by uniform random scanner phase.
    let p = ds.join("sub-1/anat/sub-1_acq-ori1_echo-3_part-phase_MEGRE.nii.gz");
    let mut v = io::read_image(&p).unwrap().frames.swap_remove(0);
    let mut x = 12345u64;
    for d in v.data.iter_mut() {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *d = ((x >> 33) % 8192) as f32 - 4096.0;
    }
    io::write_volume_i16(&p, &[&v]).unwrap();
    let out = dir.path().join("out");
    let args = [
        ds.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--participant-label",
        "1",
    ];
    let o = chimap(&args);
    assert_clean_failure(&o, "echo_consistency", &out);
    assert!(
        stderr(&o).contains("--ignore-qc-failures"),
        "{}",
        stderr(&o)
    );
    let anat = out.join("sub-1/anat");
    let qc = io::read_json(&anat.join("sub-1_acq-ori1_desc-qc.json")).unwrap();
    assert_eq!(qc["Verdict"], "fail");
    assert!(!anat.join("sub-1_acq-ori1_desc-tkd_Chimap.nii.gz").exists());
    // The sound orientation is unaffected.
    let qc2 = io::read_json(&anat.join("sub-1_acq-ori2_desc-qc.json")).unwrap();
    assert_ne!(qc2["Verdict"], "fail", "{qc2}");
    assert!(anat.join("sub-1_acq-ori2_desc-tkd_Chimap.nii.gz").is_file());
    // The report exists with the failing section and its preprocessing figures.
    let page = out.join("sub-1.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(
        html.contains("inversion did not run"),
        "failed section explained"
    );
    assert!(assert_images_exist(&page) >= 7);

    let mut ignore = args.to_vec();
    ignore.push("--ignore-qc-failures");
    let o = chimap(&ignore);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(anat.join("sub-1_acq-ori1_desc-tkd_Chimap.nii.gz").is_file());
    let qc = io::read_json(&anat.join("sub-1_acq-ori1_desc-qc.json")).unwrap();
    assert_eq!(qc["FailuresIgnored"], true);
}

#[test]
fn an_unremoved_background_field_fails_qc() {
    // The true total field of the example, presented as a local field.
    let dir = tempfile::tempdir().unwrap();
    let truth = example().join("derivatives/chimap-truth");
    let ds = dir.path().join("fields");
    std::fs::create_dir_all(ds.join("sub-1/anat")).unwrap();
    std::fs::copy(
        truth.join("dataset_description.json"),
        ds.join("dataset_description.json"),
    )
    .unwrap();
    for (from, to) in [
        ("desc-total_fieldmap", "desc-local_fieldmap"),
        ("desc-brain_mask", "desc-brain_mask"),
    ] {
        for ext in ["nii.gz", "json"] {
            std::fs::copy(
                truth.join(format!("sub-1/anat/sub-1_acq-ori1_{from}.{ext}")),
                ds.join(format!("sub-1/anat/sub-1_acq-ori1_{to}.{ext}")),
            )
            .unwrap();
        }
    }
    let out = dir.path().join("out");
    let o = chimap(&[ds.to_str().unwrap(), out.to_str().unwrap(), "participant"]);
    assert_clean_failure(&o, "residual_background", &out);
    // The true local field passes.
    for ext in ["nii.gz", "json"] {
        std::fs::copy(
            truth.join(format!(
                "sub-1/anat/sub-1_acq-ori1_desc-local_fieldmap.{ext}"
            )),
            ds.join(format!(
                "sub-1/anat/sub-1_acq-ori1_desc-local_fieldmap.{ext}"
            )),
        )
        .unwrap();
    }
    let o = chimap(&[ds.to_str().unwrap(), out.to_str().unwrap(), "participant"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn reports_on_the_example_then_the_group_level_with_a_segmentation() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ex = example();
    let o = chimap(&[ex.to_str().unwrap(), out.to_str().unwrap(), "participant"]);
    assert!(o.status.success(), "{}", stderr(&o));
    for sub in ["sub-1", "sub-2"] {
        // Magnitude, total field, local field and χ for each of two orientations, and the
        // minimum-intensity projections of the magnitude and of χ.
        assert_eq!(assert_images_exist(&out.join(format!("{sub}.html"))), 12);
    }
    // A rerun that skips everything still rebuilds the report from disk.
    std::fs::remove_file(out.join("sub-1.html")).unwrap();
    let o = chimap(&[ex.to_str().unwrap(), out.to_str().unwrap(), "participant"]);
    assert!(stderr(&o).contains("skipped 4"), "{}", stderr(&o));
    assert_eq!(assert_images_exist(&out.join("sub-1.html")), 12);

    // A two-label segmentation for one acquisition: left and right halves of its mask.
    let seg_dir = dir.path().join("seg");
    std::fs::create_dir_all(&seg_dir).unwrap();
    let mask = io::read_image(&out.join("sub-1/anat/sub-1_acq-ori1_desc-eroded_mask.nii.gz"))
        .unwrap()
        .frames
        .swap_remove(0);
    let nx = mask.dims[0];
    let seg = mask.with_data(
        mask.data
            .iter()
            .enumerate()
            .map(|(c, &m)| {
                if m > 0.5 {
                    1.0 + ((c % nx) * 2 / nx) as f32
                } else {
                    0.0
                }
            })
            .collect(),
    );
    io::write_volume(
        &seg_dir.join("sub-1_acq-ori1_desc-halves_dseg.nii.gz"),
        &seg,
    )
    .unwrap();
    let o = chimap(&[
        ex.to_str().unwrap(),
        out.to_str().unwrap(),
        "group",
        "--seg-dir",
        seg_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let tsv = std::fs::read_to_string(out.join("group_qc.tsv")).unwrap();
    let lines: Vec<&str> = tsv.lines().collect();
    assert_eq!(lines.len(), 5, "{tsv}");
    let head: Vec<&str> = lines[0].split('\t').collect();
    for col in [
        "residual_background",
        "echo_consistency",
        "chi_tkd_mean",
        "chi_tkd_label2_mean",
    ] {
        assert!(head.contains(&col), "{col} missing: {head:?}");
    }
    let row: Vec<&str> = lines[1].split('\t').collect();
    assert_eq!(row.len(), head.len());
    let label = |name: &str| row[head.iter().position(|h| *h == name).unwrap()].parse::<f64>();
    assert!(label("chi_tkd_label1_mean").is_ok() && label("chi_tkd_label2_mean").is_ok());
    let html = std::fs::read_to_string(out.join("group.html")).unwrap();
    assert!(html.matches("<svg").count() >= 10, "one plot per value");
    // Without participant outputs the group level explains what to do.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let o = chimap(&[ex.to_str().unwrap(), empty.to_str().unwrap(), "group"]);
    assert_clean_failure(&o, "run the participant level first", &empty);
}

// ---------------------------------------------------------------------------------------
// Masks users bring (--mask-dir) and the file mode

/// The simulated true brain mask of `sub-1_acq-<acq>`.
fn true_mask(ds: &Path, acq: &str) -> chimap::Volume {
    let p = ds.join(format!(
        "derivatives/chimap-truth/sub-1/anat/sub-1_acq-{acq}_desc-brain_mask.nii.gz"
    ));
    io::read_image(&p).unwrap().frames.remove(0)
}

/// A mask dataset holding `ori1` (as given) and the true mask of `ori2`.
fn mask_dir(dir: &Path, name: &str, ori1: Option<&[&chimap::Volume]>, ds: &Path) -> PathBuf {
    let root = dir.join(name);
    let anat = root.join("sub-1/anat");
    std::fs::create_dir_all(&anat).unwrap();
    if let Some(frames) = ori1 {
        let p = anat.join("sub-1_acq-ori1_desc-brain_mask.nii.gz");
        match frames {
            [one] => io::write_volume(&p, one).unwrap(),
            many => io::write_volume_i16(&p, many).unwrap(),
        }
    }
    io::write_volume(
        &anat.join("sub-1_acq-ori2_desc-brain_mask.nii.gz"),
        &true_mask(ds, "ori2"),
    )
    .unwrap();
    root
}

#[test]
fn mask_dir_replaces_the_automatic_mask_and_is_named_in_sources() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "1", "float32");
    let truth = ds.join("derivatives/chimap-truth");
    let out = dir.path().join("out");
    let o = chimap(&[
        ds.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--mask-dir",
        truth.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let anat = out.join("sub-1/anat");
    for ori in ["ori1", "ori2"] {
        let written = read(&anat.join(format!("sub-1_acq-{ori}_desc-brain_mask.nii.gz")));
        assert_eq!(
            written,
            true_mask(&ds, ori).data,
            "{ori}: the mask as given"
        );
        let uri = format!("bids:masks:sub-1/anat/sub-1_acq-{ori}_desc-brain_mask.nii.gz");
        let side =
            io::read_json(&anat.join(format!("sub-1_acq-{ori}_desc-tkd_Chimap.json"))).unwrap();
        let sources: Vec<&str> = side["Sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(sources.contains(&uri.as_str()), "{sources:?}");
        assert_eq!(side["Preprocessing"]["BrainMask"]["Source"], "user");
        let mask_side =
            io::read_json(&anat.join(format!("sub-1_acq-{ori}_desc-brain_mask.json"))).unwrap();
        assert!(
            mask_side["Description"]
                .as_str()
                .unwrap()
                .contains("supplied by the user"),
            "{mask_side}"
        );
    }
    let desc = io::read_json(&out.join("dataset_description.json")).unwrap();
    assert!(desc["DatasetLinks"]["masks"]
        .as_str()
        .unwrap()
        .ends_with("derivatives/chimap-truth"));
}

#[test]
fn unusable_user_masks_fail_their_acquisition_naming_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "1", "float32");
    let good = true_mask(&ds, "ori1");
    let mut moved = good.clone();
    moved.geometry.affine[0][3] += 8.0;
    let empty = good.with_data(vec![0.0; good.data.len()]);
    let ones = good.with_data(vec![1.0; good.data.len()]);
    let cases: [(&str, Option<&[&chimap::Volume]>, &str); 5] = [
        ("moved", Some(&[&moved]), "another position or orientation"),
        ("frames", Some(&[&good, &good]), "is 4D (2 volumes)"),
        ("empty", Some(&[&empty]), "is empty"),
        ("ones", Some(&[&ones]), "marks every voxel"),
        ("missing", None, "no brain mask for sub-1_acq-ori1"),
    ];
    for (name, ori1, why) in cases {
        let masks = mask_dir(dir.path(), name, ori1, &ds);
        let out = dir.path().join(format!("out-{name}"));
        let o = chimap(&[
            ds.to_str().unwrap(),
            out.to_str().unwrap(),
            "participant",
            "--mask-dir",
            masks.to_str().unwrap(),
        ]);
        assert_clean_failure(&o, why, &out);
        let err = stderr(&o);
        let file = if ori1.is_some() {
            "sub-1_acq-ori1_desc-brain_mask.nii.gz"
        } else {
            masks.to_str().unwrap()
        };
        assert!(err.contains(file), "{name}: {err}");
        if ori1.is_some() {
            assert!(
                err.contains("sub-1_acq-ori1_echo-1_part-phase_MEGRE.nii.gz"),
                "{name}: the data file is named too: {err}"
            );
        }
        // The other acquisition still runs, on its own mask.
        assert!(
            out.join("sub-1/anat/sub-1_acq-ori2_desc-tkd_Chimap.nii.gz")
                .is_file(),
            "{name}: ori2 ran"
        );
        assert!(!out
            .join("sub-1/anat/sub-1_acq-ori1_desc-tkd_Chimap.nii.gz")
            .exists());
    }
}

#[test]
fn files_mode_runs_4d_echoes_with_a_mask_through_the_participant_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let ds = simulate(dir.path(), "1", "int16");
    // A workflow step's inputs: all echoes in one 4D file each, and a mask, in one folder.
    let step = dir.path().join("step");
    std::fs::create_dir_all(&step).unwrap();
    let frames = |part: &str| -> Vec<chimap::Volume> {
        (1..=4)
            .map(|e| {
                let p = ds.join(format!(
                    "sub-1/anat/sub-1_acq-ori1_echo-{e}_part-{part}_MEGRE.nii.gz"
                ));
                io::read_image(&p).unwrap().frames.remove(0)
            })
            .collect()
    };
    for (part, file) in [("phase", "phase.nii.gz"), ("mag", "mag.nii.gz")] {
        let f = frames(part);
        io::write_volume_i16(&step.join(file), &f.iter().collect::<Vec<_>>()).unwrap();
    }
    let mask = true_mask(&ds, "ori1");
    io::write_volume(&step.join("brain.nii.gz"), &mask).unwrap();
    let arg = |f: &str| step.join(f).to_str().unwrap().to_string();
    let base = [
        "files".to_string(),
        step.to_str().unwrap().to_string(),
        "--phase".into(),
        arg("phase.nii.gz"),
        "--magnitude".into(),
        arg("mag.nii.gz"),
        "--echo-times".into(),
        "4".into(),
        "8".into(),
        "12".into(),
        "16".into(),
        "--field-strength".into(),
        "3".into(),
        "--mask".into(),
        arg("brain.nii.gz"),
    ];
    let args: Vec<&str> = base.iter().map(String::as_str).collect();
    // OUTPUT_DIR may be the inputs' own folder, as workflow engines stage them there.
    let o = chimap(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let anat = step.join("sub-phase/anat");
    let side = io::read_json(&anat.join("sub-phase_desc-tkd_Chimap.json")).unwrap();
    assert_eq!(
        side["EchoTime"],
        serde_json::json!([0.004, 0.008, 0.012, 0.016])
    );
    assert_eq!(side["MagneticFieldStrength"], 3.0);
    assert_eq!(side["Preprocessing"]["PhaseScaling"]["bits"], 12);
    let sources = side["Sources"].to_string();
    assert!(
        sources.contains("bids:raw:phase.nii.gz") && sources.contains("bids:raw:brain.nii.gz"),
        "{sources}"
    );
    assert_eq!(
        read(&anat.join("sub-phase_desc-brain_mask.nii.gz")),
        mask.data
    );
    let chi = read(&anat.join("sub-phase_desc-tkd_Chimap.nii.gz"));
    assert!(chi.iter().all(|v| v.is_finite()) && chi.iter().any(|&v| v != 0.0));
    assert!(
        step.join("sub-phase.html").is_file(),
        "the report is written"
    );
    assert!(step.join("sub-phase/anat/sub-phase_desc-qc.json").is_file());

    // An input where the outputs go would be overwritten: refused.
    let mut again = args.clone();
    let own = anat.join("sub-phase_desc-brain_mask.nii.gz");
    let own = own.to_str().unwrap();
    *again.last_mut().unwrap() = own;
    let o = chimap(&again);
    assert_clean_failure(&o, "where chimap writes", &step);
    assert!(stderr(&o).contains("sub-phase_desc-brain_mask.nii.gz"));

    // A mask that covers everything is refused here too, naming both files.
    io::write_volume(
        &step.join("ones.nii.gz"),
        &mask.with_data(vec![1.0; mask.data.len()]),
    )
    .unwrap();
    let out = dir.path().join("out-ones");
    let mut ones = args.clone();
    ones[1] = out.to_str().unwrap();
    let ones_path = arg("ones.nii.gz");
    *ones.last_mut().unwrap() = &ones_path;
    let o = chimap(&ones);
    assert_clean_failure(&o, "marks every voxel", &out);
    assert!(stderr(&o).contains("ones.nii.gz") && stderr(&o).contains("phase.nii.gz"));

    // A local field map with its mask: only the inversion runs.
    let truth = ds.join("derivatives/chimap-truth/sub-1/anat");
    let out = dir.path().join("out-local");
    let o = chimap(&[
        "files",
        out.to_str().unwrap(),
        "--local-field",
        truth
            .join("sub-1_acq-ori1_desc-local_fieldmap.nii.gz")
            .to_str()
            .unwrap(),
        "--mask",
        truth
            .join("sub-1_acq-ori1_desc-brain_mask.nii.gz")
            .to_str()
            .unwrap(),
        "--field-units",
        "ppm",
        "--name",
        "sub-x_ses-2",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let side =
        io::read_json(&out.join("sub-x/ses-2/anat/sub-x_ses-2_desc-tkd_Chimap.json")).unwrap();
    assert_eq!(side["Preprocessing"]["Input"], "local field map");
}

/// The JSON summary record (the last line of a `--log-format json` run).
fn summary_record(o: &Output) -> serde_json::Value {
    let err = stderr(o);
    let last = err.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(last).expect("the last line is JSON");
    assert_eq!(v["event"], "summary", "{last}");
    v
}

/// Issue 21: a DataLad-style dataset (images are links into `.git/annex`, one not fetched),
/// read-only: only the acquisition whose content is missing fails, with a named error; the
/// rest is processed and nothing is written into the dataset.
#[test]
fn datalad_style_dataset_fails_only_where_content_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("ds");
    copy_tree(&example(), &ds);
    std::fs::remove_dir_all(ds.join("derivatives")).unwrap();
    std::fs::remove_dir_all(ds.join("sub-2")).unwrap();
    let objects = ds.join(".git/annex/objects");
    for (n, f) in files(&ds.join("sub-1")).into_iter().enumerate() {
        if !f.to_string_lossy().ends_with(".nii.gz") {
            continue;
        }
        let key = objects.join(format!("k{n}"));
        std::fs::create_dir_all(&key).unwrap();
        let content = key.join(f.file_name().unwrap());
        std::fs::rename(&f, &content).unwrap();
        std::os::unix::fs::symlink(
            Path::new("../../.git/annex/objects")
                .join(format!("k{n}"))
                .join(f.file_name().unwrap()),
            &f,
        )
        .unwrap();
        if f.to_string_lossy().contains("acq-ori2_echo-3_part-phase") {
            std::fs::remove_file(&content).unwrap();
        }
    }
    let before = files(&ds);
    let set_read_only = |ro: bool| {
        for e in walkdir::WalkDir::new(&ds)
            .into_iter()
            .filter_map(|e| e.ok())
        {
            use std::os::unix::fs::PermissionsExt;
            if e.file_type().is_symlink() {
                continue;
            }
            let mode = match (e.file_type().is_dir(), ro) {
                (true, true) => 0o555,
                (true, false) => 0o755,
                (false, true) => 0o444,
                (false, false) => 0o644,
            };
            std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        }
    };
    set_read_only(true);
    let out = dir.path().join("out");
    let o = chimap(&[
        ds.to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--log-format",
        "json",
    ]);
    set_read_only(false);
    let v = summary_record(&o);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(v["exit_status"], 1);
    assert_eq!(v["processed"], serde_json::json!(["sub-1_acq-ori1"]));
    let failed = v["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["name"], "sub-1_acq-ori2");
    let e = failed[0]["error"].as_str().unwrap();
    assert!(
        e.contains("acq-ori2_echo-3_part-phase")
            && e.contains("content not present")
            && e.contains("datalad get"),
        "{e}"
    );
    assert!(out
        .join("sub-1/anat/sub-1_acq-ori1_desc-tkd_Chimap.nii.gz")
        .is_file());
    assert_eq!(files(&ds), before, "nothing is written into the dataset");
}

/// Issue 21: exit statuses a scheduler can tell apart: 3 when OUTPUT_DIR cannot be used,
/// with the reason in the JSON summary record.
#[test]
fn an_unusable_output_dir_exits_3_with_a_summary_record() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("dataset_description.json"),
        r#"{"Name": "someone else's", "BIDSVersion": "1.9.0"}"#,
    )
    .unwrap();
    let o = chimap(&[
        example().to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--participant-label",
        "1",
        "--log-format",
        "json",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    let v = summary_record(&o);
    assert_eq!(v["exit_status"], 3);
    assert!(
        v["error"].as_str().unwrap().contains("another dataset"),
        "{v}"
    );
    assert!(!out.join("sub-1").exists());
}

/// Issue 21: the group level says which participants are missing, in `group_status.tsv`,
/// the JSON summary record and the exit status.
#[test]
fn group_level_reports_missing_participants() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let (ex, o) = (example(), out.to_str().unwrap().to_string());
    let ex = ex.to_str().unwrap();
    let p = chimap(&[ex, &o, "participant", "--participant-label", "2", "-q"]);
    assert!(p.status.success(), "{}", stderr(&p));
    let g = chimap(&[ex, &o, "group", "--log-format", "json"]);
    assert_eq!(g.status.code(), Some(1), "{}", stderr(&g));
    let v = summary_record(&g);
    assert_eq!(v["participants_missing"], serde_json::json!(["sub-1"]));
    assert_eq!(
        v["done"],
        serde_json::json!(["sub-2_acq-ori1", "sub-2_acq-ori2"])
    );
    let tsv = std::fs::read_to_string(out.join("group_status.tsv")).unwrap();
    assert!(tsv.contains("sub-1\tsub-1_acq-ori1\tmissing\t"), "{tsv}");
    assert!(out.join("group_qc.tsv").is_file());
    // Once every participant is done, the group level exits 0.
    let p = chimap(&[ex, &o, "participant", "--participant-label", "1", "-q"]);
    assert!(p.status.success(), "{}", stderr(&p));
    let g = chimap(&[ex, &o, "group"]);
    assert!(g.status.success(), "{}", stderr(&g));
}

#[test]
fn as_scanned_orientations_are_registered_before_cosmos() {
    // The head turns inside one axial grid: every series' affine says B0 = z.
    let dir = tempfile::tempdir().unwrap();
    let ds = dir.path().join("raw");
    let o = chimap(&[
        "simulate",
        ds.to_str().unwrap(),
        "--dims",
        "56",
        "56",
        "44",
        "--voxel-size",
        "2",
        "2",
        "2",
        "--echo-times",
        "4",
        "8",
        "12",
        "--as-scanned",
        "--b0-direction",
        "0",
        "0",
        "1",
        "--b0-direction",
        "0.2588",
        "0",
        "0.9659",
        "--b0-direction",
        "0",
        "-0.2588",
        "0.9659",
        "--seed",
        "2",
    ]);
    assert!(o.status.success(), "simulate failed: {}", stderr(&o));
    let anat = "sub-1/anat";
    let truth = ds.join("derivatives/chimap-truth");
    let pose = io::read_json(&truth.join(anat).join("sub-1_acq-ori2_pose.json")).unwrap();
    assert!((pose["RotationDegrees"].as_f64().unwrap() - 15.0).abs() < 0.1);

    // The dry run lists the set; an orientation_set rule that admits every member keeps it,
    // one that admits none of the labels (brackets are literal, globs have no classes)
    // leaves no set.
    let listing = |extra: &[&str]| {
        let mut a = vec![
            ds.to_str().unwrap(),
            "/tmp/unused-out",
            "participant",
            "--dry-run",
        ];
        a.extend_from_slice(extra);
        let o = chimap(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let all = listing(&[]);
    assert!(
        all.contains("orientation set as scanned, registered by joint methods (3 orientations)"),
        "{all}"
    );
    let rule = dir.path().join("rule.yaml");
    std::fs::write(&rule, "orientation_set:\n  acq: \"ori?\"\n  run: null\n").unwrap();
    assert!(listing(&["--config", rule.to_str().unwrap()]).contains("(3 orientations)"));
    std::fs::write(&rule, "orientation_set:\n  acq: \"*[12]\"\n").unwrap();
    let none = listing(&["--config", rule.to_str().unwrap()]);
    assert!(!none.contains("orientation set"), "{none}");

    let out = dir.path().join("out");
    let run = || {
        chimap(&[
            ds.to_str().unwrap(),
            out.to_str().unwrap(),
            "participant",
            "--method",
            "cosmos",
        ])
    };
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    let set_chi = out.join(anat).join("sub-1_desc-cosmos_Chimap.nii.gz");
    let side = io::read_json(&chimap::derivatives::sidecar_path(&set_chi)).unwrap();
    let want = [
        [0.0, 0.0, 1.0],
        [0.2588, 0.0, 0.9659],
        [0.0, -0.2588, 0.9659],
    ];
    for (got, want) in side["B0Directions"].as_array().unwrap().iter().zip(want) {
        let g: Vec<f64> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let cos = g.iter().zip(want).map(|(a, b)| a * b).sum::<f64>()
            / (0.2588f64.powi(2) + 0.9659f64.powi(2)).sqrt();
        let err = cos.clamp(-1.0, 1.0).acos().to_degrees();
        // Measured 0.07° and 0.23° (4× oversampled simulation, first-echo registration);
        // 1.29° and 0.63° when the simulator's 2× subvoxels left the dephasing near the skull
        // locked to the grid and the registration matched the echoes' root-sum-of-squares.
        assert!(err < 0.5, "B0 {g:?}, expected {want:?}: {err:.2}° off");
    }
    assert_eq!(side["Registration"].as_array().unwrap().len(), 2);
    let xfm = out
        .join(anat)
        .join("sub-1_acq-ori2_from-orig_to-ref_mode-image_xfm.txt");
    let text = std::fs::read_to_string(&xfm).unwrap();
    assert!(text.starts_with("#Insight Transform File V1.0"), "{text}");
    assert!(xfm.with_extension("json").is_file());

    // The set's own qc json: each moved member's registration, and the B0 directions'
    // conditioning of COSMOS (measured: NCC 0.990 and 0.991, rotations 14.93° and 14.77°,
    // nothing of k-space below the floor).
    let set_qc = out.join(anat).join("sub-1_desc-qc.json");
    let checks = set_checks(&set_qc);
    for member in ["acq-ori2", "acq-ori3"] {
        let ncc = &checks[&format!("registration_ncc_{member}")];
        assert!(ncc.0 > 0.95 && ncc.1 == Verdict::Pass, "{member}: {ncc:?}");
        let rot = &checks[&format!("head_rotation_degrees_{member}")];
        assert!(
            (rot.0 - 15.0).abs() < 0.5 && rot.1 == Verdict::Pass,
            "{member}: {rot:?}"
        );
        // Its magnitude in the reference's grid, which the report's overlay is drawn from.
        let mag = out.join(anat).join(format!(
            "sub-1_{member}_space-ref_desc-rss_magnitude.nii.gz"
        ));
        assert_eq!(read(&mag).len(), 56 * 56 * 44, "{}", mag.display());
    }
    let cond = &checks["b0_ill_conditioned_fraction"];
    assert!(cond.0 < 1e-3 && cond.1 == Verdict::Pass, "{cond:?}");
    // The report shows them with an overlay of each moved member on the reference.
    let page = std::fs::read_to_string(out.join("sub-1.html")).unwrap();
    let section = page
        .find("<h2 id=\"sub-1\">")
        .expect("a section for the set");
    let registration = page.find("Registration to the reference").unwrap();
    assert!(
        section < registration,
        "the registration part is in the set's section"
    );
    assert!(page[section..].contains("<td>b0_ill_conditioned_fraction</td>"));
    for member in ["acq-ori2", "acq-ori3"] {
        let fig = format!("sub-1/figures/sub-1_registration-{member}.png");
        assert!(
            page.contains(&format!("src=\"{fig}\"")),
            "{fig} not on the page"
        );
        assert!(out.join(&fig).is_file(), "{fig} missing");
    }

    // COSMOS on the registered set beats TKD of the reference orientation alone, 6 mm
    // inside the brain's edge (≈ 99 % vs 107 %; over the whole brain both are
    // ≈ 114 %, dominated by the voids along this small head's skull).
    let truth_chi = read(&truth.join(anat).join("sub-1_acq-ori1_Chimap.nii.gz"));
    let brain: Vec<bool> = read(
        &truth
            .join(anat)
            .join("sub-1_acq-ori1_desc-brain_mask.nii.gz"),
    )
    .iter()
    .map(|&v| v > 0.5)
    .collect();
    let mask = chimap::preprocess::erode(&brain, [56, 56, 44], [2.0; 3], 6.0);
    let e_cosmos = chimap::evaluate::nrmse_demeaned(&read(&set_chi), &truth_chi, &mask);
    let tkd_out = dir.path().join("out-tkd");
    let o = chimap(&[
        ds.to_str().unwrap(),
        tkd_out.to_str().unwrap(),
        "participant",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e_tkd = chimap::evaluate::nrmse_demeaned(
        &read(
            &tkd_out
                .join(anat)
                .join("sub-1_acq-ori1_desc-tkd_Chimap.nii.gz"),
        ),
        &truth_chi,
        &mask,
    );
    assert!(e_cosmos < e_tkd, "COSMOS {e_cosmos} % vs TKD {e_tkd} %");

    // A rerun reuses the written transforms.
    std::fs::remove_file(&set_chi).unwrap();
    let o = run();
    assert!(o.status.success(), "{}", stderr(&o));
    let side = io::read_json(&chimap::derivatives::sidecar_path(&set_chi)).unwrap();
    assert_eq!(side["Registration"][0]["Reused"], true, "{side}");
    // A reused transform still gets its similarity check, recomputed: the same value.
    let again = set_checks(&set_qc);
    for member in ["acq-ori2", "acq-ori3"] {
        let name = format!("registration_ncc_{member}");
        assert!(
            (again[&name].0 - checks[&name].0).abs() < 1e-3,
            "{name}: {again:?}"
        );
    }

    // Asking for mutual information registers again (the transforms were found with NCC)
    // and finds the same B0 directions.
    std::fs::remove_file(&set_chi).unwrap();
    cosmos_registered_by_mutual_information(dir.path(), &ds, &out);
    let side = io::read_json(&chimap::derivatives::sidecar_path(&set_chi)).unwrap();
    for r in side["Registration"].as_array().unwrap() {
        assert_eq!(r["Similarity"], "mutual-information", "{r}");
        assert!(r.get("Reused").is_none(), "{r}");
        let (before, after) = (
            r["MutualInformationBefore"].as_f64().unwrap(),
            r["MutualInformationAfter"].as_f64().unwrap(),
        );
        assert!(after > before, "{r}");
    }
    let xfm_side = io::read_json(&xfm.with_extension("json")).unwrap();
    assert_eq!(xfm_side["Similarity"], "mutual-information");
    for (got, want) in side["B0Directions"].as_array().unwrap().iter().zip(want) {
        let g: Vec<f64> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let cos = g.iter().zip(want).map(|(a, b)| a * b).sum::<f64>()
            / (0.2588f64.powi(2) + 0.9659f64.powi(2)).sqrt();
        let err = cos.clamp(-1.0, 1.0).acos().to_degrees();
        eprintln!("mutual information: B0 {err:.3}° off");
        assert!(
            err < 0.5,
            "mutual information: B0 {g:?}, expected {want:?}: {err:.2}° off"
        );
    }
}

/// `name → (value, verdict)` of the checks in a qc json.
fn set_checks(path: &Path) -> std::collections::BTreeMap<String, (f64, Verdict)> {
    let (_, checks) = chimap::qc::read_json(path).unwrap();
    checks
        .into_iter()
        .map(|c| (c.name, (c.value, c.verdict)))
        .collect()
}

/// Issue 21: `--mem-gb` refuses work that needs more before anything runs (exit status 4,
/// the acquisition and its need named, nothing written); with enough, the run's measured
/// peak (in the Chimap's sidecar) stays under both the bound and the dry run's estimate.
#[test]
fn mem_gb_refuses_work_that_needs_more_and_the_estimate_bounds_the_peak() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ex = example();
    let args = |extra: &[&str]| -> Output {
        let mut a = vec![
            ex.to_str().unwrap(),
            out.to_str().unwrap(),
            "participant",
            "--participant-label",
            "1",
        ];
        a.extend_from_slice(extra);
        chimap(&a)
    };
    let dry = args(&["--dry-run"]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    let listing = String::from_utf8_lossy(&dry.stdout).into_owned();
    let estimates: Vec<f64> = listing
        .lines()
        .filter(|l| l.starts_with("memory: "))
        .map(|l| {
            let gib = l.split("needs about ").nth(1).unwrap();
            gib.split(' ').next().unwrap().parse().unwrap()
        })
        .collect();
    assert!(!estimates.is_empty(), "no memory estimate in: {listing}");
    let estimate = estimates.iter().cloned().fold(0.0, f64::max);
    assert!(!out.exists(), "a dry run wrote {}", out.display());

    let o = args(&["--mem-gb", "0.05", "--log-format", "json"]);
    assert_eq!(o.status.code(), Some(4), "{}", stderr(&o));
    let v = summary_record(&o);
    let error = v["error"].as_str().unwrap();
    assert!(error.contains("--mem-gb 0.05 is not enough"), "{error}");
    assert!(error.contains("sub-1") && error.contains("GiB"), "{error}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());

    let bad = args(&["--mem-gb", "0"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));

    let o = args(&["--mem-gb", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut checked = 0;
    for f in files(&out) {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with("_Chimap.json") {
            continue;
        }
        let sidecar: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let peak = sidecar["PeakMemoryGiB"]["peak"].as_f64().unwrap();
        assert!(
            peak > 0.0 && peak <= estimate,
            "{name}: peak {peak} GiB, estimate {estimate}"
        );
        checked += 1;
    }
    assert!(checked > 0, "no Chimap sidecar in {}", out.display());
}

/// Issue 21: `--work-dir` keeps each acquisition's local field until its Chimap is written;
/// a run killed during the inversion is resumed there by a rerun, which gives the same χ bit
/// for bit as a run never killed, and leaves the folder empty.
#[test]
fn a_run_killed_during_the_inversion_resumes_from_the_work_dir() {
    let dir = tempfile::tempdir().unwrap();
    // A slow inversion, so that the kill lands in it.
    let config = dir.path().join("slow.yaml");
    std::fs::write(
        &config,
        "inversion:\n  method: tv\n  tv:\n    tolerance: 1.0e-12\n    max_iterations: 150\n",
    )
    .unwrap();
    let ex = example();
    let run = |out: &Path, work: Option<&Path>| -> Vec<String> {
        let mut a: Vec<String> = [
            ex.to_str().unwrap(),
            out.to_str().unwrap(),
            "participant",
            "--participant-label",
            "1",
            "--config",
            config.to_str().unwrap(),
            "--nthreads",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(w) = work {
            a.extend(["--work-dir".to_string(), w.to_string_lossy().into_owned()]);
        }
        a
    };
    let clean = dir.path().join("clean");
    let o = chimap(
        &run(&clean, None)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let (out, work) = (dir.path().join("out"), dir.path().join("work"));
    let checkpoints = || -> Vec<PathBuf> {
        std::fs::read_dir(&work)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().ends_with(".local-field"))
                    .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_chimap"))
        .args(run(&out, Some(&work)))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while checkpoints().is_empty() && started.elapsed().as_secs() < 120 {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before its local field was kept in {}",
            work.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let kept = checkpoints();
    assert_eq!(kept.len(), 1, "{kept:?}");

    let o = chimap(
        &run(&out, Some(&work))
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("taken from --work-dir"),
        "the rerun did not resume: {}",
        stderr(&o)
    );
    let mut compared = 0;
    for f in files(&clean) {
        if f.to_string_lossy().ends_with("_Chimap.nii.gz") {
            let twin = out.join(f.strip_prefix(&clean).unwrap());
            assert_eq!(
                std::fs::read(&f).unwrap(),
                std::fs::read(&twin).unwrap(),
                "{} differs from the run never killed",
                twin.display()
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 2);
    assert_eq!(
        files(&work),
        Vec::<PathBuf>::new(),
        "the work folder is not empty"
    );
}

/// `simulate --as-scanned --chi`: a phantom read from a file is turned inside its grid per
/// orientation (pose in the truth), and the pipeline finds the turns. This phantom is brain
/// χ alone, its magnitude guessed from χ, with nothing around the brain: NCC's optimum sits
/// 2° past the truth on it (17.05°, measured), mutual information's within 0.3°.
#[test]
fn a_file_phantom_simulated_as_scanned_is_registered_back() {
    let dir = tempfile::tempdir().unwrap();
    let upright = dir.path().join("upright");
    let o = chimap(&[
        "simulate",
        upright.to_str().unwrap(),
        "--dims",
        "48",
        "48",
        "40",
        "--voxel-size",
        "2",
        "2",
        "2",
        "--seed",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let truth = upright.join("derivatives/chimap-truth/sub-1/anat");
    let ds = dir.path().join("turned");
    let o = chimap(&[
        "simulate",
        ds.to_str().unwrap(),
        "--chi",
        truth.join("sub-1_Chimap.nii.gz").to_str().unwrap(),
        "--mask",
        truth.join("sub-1_desc-brain_mask.nii.gz").to_str().unwrap(),
        "--as-scanned",
        "--b0-direction",
        "0",
        "0",
        "1",
        "--b0-direction",
        "0.2588",
        "0",
        "0.9659",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let pose =
        io::read_json(&ds.join("derivatives/chimap-truth/sub-1/anat/sub-1_acq-ori2_pose.json"))
            .unwrap();
    assert!((pose["RotationDegrees"].as_f64().unwrap() - 15.0).abs() < 0.01);
    let out = dir.path().join("out");
    cosmos_registered_by_mutual_information(dir.path(), &ds, &out);
    let xfm =
        io::read_json(&out.join("sub-1/anat/sub-1_acq-ori2_from-orig_to-ref_mode-image_xfm.json"))
            .unwrap();
    let found = xfm["RotationDegrees"].as_f64().unwrap();
    assert!((found - 15.0).abs() < 0.5, "found {found:.2}° of 15°");
}

#[test]
fn sstv_from_raw_phase_fills_the_whole_brain_mask() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let o = chimap(&[
        example().to_str().unwrap(),
        out.to_str().unwrap(),
        "participant",
        "--participant-label",
        "1",
        "--method",
        "sstv",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let anat = out.join("sub-1/anat");
    let chi = read(&anat.join("sub-1_acq-ori1_desc-sstv_Chimap.nii.gz"));
    let brain = read(&anat.join("sub-1_acq-ori1_desc-brain_mask.nii.gz"));
    // A one-step method gives χ on the whole brain mask, none outside it.
    let inside = brain.iter().filter(|&&b| b > 0.5).count();
    let covered = chi
        .iter()
        .zip(&brain)
        .filter(|(&c, &b)| b > 0.5 && c != 0.0 && c.is_finite())
        .count();
    assert!(
        covered as f64 > 0.99 * inside as f64,
        "{covered} of {inside}"
    );
    assert!(chi.iter().zip(&brain).all(|(&c, &b)| b > 0.5 || c == 0.0));
    let side = io::read_json(&anat.join("sub-1_acq-ori1_desc-sstv_Chimap.json")).unwrap();
    assert_eq!(side["Method"], "sstv");
    let per_radius = side["MethodParameters"]["data_voxels_per_radius"]
        .as_array()
        .unwrap();
    assert!(per_radius.iter().any(|v| v.as_u64().unwrap() > 0), "{side}");
}
