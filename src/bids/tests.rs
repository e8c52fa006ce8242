//! Discovery tests on tiny datasets written to temporary folders.
use std::path::{Path, PathBuf};

use ndarray::{Array3, Array4};
use nifti::writer::WriterOptions;
use nifti::NiftiHeader;
use serde_json::{json, Value};

use super::*;
use crate::Error;

type Affine = [[f64; 4]; 4];

/// Writes a float32 NIfTI of zeros with the given grid and affine (sform).
pub(crate) fn write_nii(path: &Path, dims: [usize; 3], frames: usize, affine: Affine) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut hdr = NiftiHeader {
        sform_code: 1,
        qform_code: 0,
        ..NiftiHeader::default()
    };
    let row = |r: usize| affine[r].map(|v| v as f32);
    hdr.srow_x = row(0);
    hdr.srow_y = row(1);
    hdr.srow_z = row(2);
    for (c, p) in hdr.pixdim[1..4].iter_mut().enumerate() {
        *p = (0..3).map(|r| affine[r][c].powi(2)).sum::<f64>().sqrt() as f32;
    }
    let opts = WriterOptions::new(path).reference_header(&hdr);
    if frames > 1 {
        opts.write_nifti(&Array4::<f32>::zeros((dims[0], dims[1], dims[2], frames)))
            .unwrap();
    } else {
        opts.write_nifti(&Array3::<f32>::zeros((dims[0], dims[1], dims[2])))
            .unwrap();
    }
}

fn eye() -> Affine {
    [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

/// Voxel axes rotated about x by `deg`, 2 mm voxels.
fn rot_x(deg: f64) -> Affine {
    let (s, c) = deg.to_radians().sin_cos();
    [
        [2.0, 0.0, 0.0, -10.0],
        [0.0, 2.0 * c, -2.0 * s, 5.0],
        [0.0, 2.0 * s, 2.0 * c, 3.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

const DIMS: [usize; 3] = [4, 5, 3];

struct Ds {
    dir: tempfile::TempDir,
}

impl Ds {
    fn new(description: Option<Value>) -> Ds {
        let ds = Ds {
            dir: tempfile::TempDir::new().unwrap(),
        };
        if let Some(d) = description {
            ds.json("dataset_description.json", d);
        }
        ds
    }
    fn raw() -> Ds {
        Ds::new(Some(json!({"Name": "tiny", "BIDSVersion": "1.9.0"})))
    }
    fn root(&self) -> &Path {
        self.dir.path()
    }
    fn nii(&self, rel: &str, affine: Affine) -> PathBuf {
        self.nii_grid(rel, DIMS, 1, affine)
    }
    fn nii_grid(&self, rel: &str, dims: [usize; 3], frames: usize, affine: Affine) -> PathBuf {
        let p = self.root().join(rel);
        write_nii(&p, dims, frames, affine);
        p
    }
    fn json(&self, rel: &str, value: Value) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, serde_json::to_string_pretty(&value).unwrap()).unwrap();
    }
    /// One phase (+ optional magnitude) echo with its own EchoTime sidecar.
    fn echo(&self, stem: &str, echo: u32, te: Option<f64>, magnitude: bool, affine: Affine) {
        let phase = format!("{stem}_echo-{echo}_part-phase_MEGRE");
        self.nii(&format!("{phase}.nii.gz"), affine);
        if let Some(te) = te {
            self.json(&format!("{phase}.json"), json!({ "EchoTime": te }));
        }
        if magnitude {
            let mag = format!("{stem}_echo-{echo}_part-mag_MEGRE");
            self.nii(&format!("{mag}.nii.gz"), affine);
            if let Some(te) = te {
                self.json(&format!("{mag}.json"), json!({ "EchoTime": te }));
            }
        }
    }
    fn discover(&self, filter: &Filter) -> Discovery {
        discover(self.root(), filter).unwrap()
    }
}

fn all() -> Filter {
    Filter::default()
}

fn echoes(a: &Acquisition) -> &[Echo] {
    match &a.source {
        Source::Raw { echoes } => echoes,
        other => panic!("expected a raw series, got {other:?}"),
    }
}

fn name_of(p: &Path) -> &str {
    p.file_name().unwrap().to_str().unwrap()
}

fn problem_texts(d: &Discovery) -> Vec<String> {
    d.problems
        .iter()
        .map(|(n, e)| format!("{n}: {e}"))
        .collect()
}

#[test]
fn pairs_magnitude_with_phase_and_sorts_echoes_by_time_with_inheritance() {
    let ds = Ds::raw();
    // Root sidecar for every MEGRE file; sub-02 overrides it at the subject level.
    ds.json(
        "MEGRE.json",
        json!({"MagneticFieldStrength": 7, "Manufacturer": "X"}),
    );
    ds.json(
        "sub-02/sub-02_MEGRE.json",
        json!({"MagneticFieldStrength": 3}),
    );
    // Echo labels out of order with respect to their echo times.
    for sub in ["01", "02"] {
        let stem = format!("sub-{sub}/anat/sub-{sub}");
        ds.echo(&stem, 1, Some(0.012), true, eye());
        ds.echo(&stem, 2, Some(0.004), true, eye());
        ds.echo(&stem, 3, Some(0.008), true, eye());
    }
    // Must be ignored: derivatives and hidden folders.
    ds.nii(
        "derivatives/x/sub-01/anat/sub-01_echo-4_part-phase_MEGRE.nii",
        eye(),
    );
    ds.nii(
        "sub-01/anat/.trash/sub-01_echo-4_part-phase_MEGRE.nii",
        eye(),
    );

    let d = ds.discover(&all());
    assert!(d.problems.is_empty(), "{:?}", problem_texts(&d));
    assert_eq!(d.dataset_type, DatasetType::Raw);
    assert_eq!(d.name.as_deref(), Some("tiny"));
    assert_eq!(d.acquisitions.len(), 2);
    let a = &d.acquisitions[0];
    assert_eq!(a.name(), "sub-01");
    assert_eq!(a.suffix, "MEGRE");
    assert_eq!(a.entities.echo, None);
    assert_eq!(a.entities.part, None);
    let e = echoes(a);
    assert_eq!(
        e.iter().map(|e| e.echo_time).collect::<Vec<_>>(),
        vec![0.004, 0.008, 0.012]
    );
    let phases: Vec<&str> = e.iter().map(|e| name_of(&e.phase)).collect();
    assert_eq!(
        phases,
        [
            "sub-01_echo-2_part-phase_MEGRE.nii.gz",
            "sub-01_echo-3_part-phase_MEGRE.nii.gz",
            "sub-01_echo-1_part-phase_MEGRE.nii.gz"
        ]
    );
    for echo in e {
        let mag = echo.magnitude.as_ref().expect("magnitude paired");
        assert_eq!(
            name_of(mag),
            name_of(&echo.phase).replace("part-phase", "part-mag")
        );
        assert_eq!(echo.frame, None);
    }
    assert_eq!(a.field_strength, Some(7.0));
    assert_eq!(d.acquisitions[1].field_strength, Some(3.0));
    // The merged sidecar of the first (shortest) echo's phase: root key + own EchoTime.
    assert_eq!(a.sidecar["EchoTime"], json!(0.004));
    assert_eq!(a.sidecar["Manufacturer"], json!("X"));
    assert_eq!(a.inputs.len(), 6);
    assert!(a
        .inputs
        .iter()
        .all(|p| p.is_relative() && p.starts_with("sub-01/anat")));
    assert_eq!(a.dims, DIMS);
    assert_eq!(a.voxel_size, [1.0, 1.0, 1.0]);
    assert_eq!(a.b0_direction, [0.0, 0.0, 1.0]);
    assert!(d.orientation_sets.is_empty());
}

#[test]
fn phase_without_magnitude_and_missing_field_strength_are_allowed() {
    let ds = Ds::raw();
    ds.echo("sub-01/anat/sub-01", 1, Some(0.005), false, eye());
    ds.echo("sub-01/anat/sub-01", 2, Some(0.010), false, eye());
    let d = ds.discover(&all());
    assert!(d.problems.is_empty(), "{:?}", problem_texts(&d));
    let e = echoes(&d.acquisitions[0]);
    assert_eq!(e.len(), 2);
    assert!(e.iter().all(|e| e.magnitude.is_none()));
    assert_eq!(d.acquisitions[0].field_strength, None);
}

#[test]
fn single_4d_phase_file_with_echo_time_list() {
    let ds = Ds::raw();
    ds.nii_grid("sub-01/anat/sub-01_part-phase_MEGRE.nii", DIMS, 3, eye());
    ds.nii_grid("sub-01/anat/sub-01_part-mag_MEGRE.nii", DIMS, 3, eye());
    ds.json(
        "sub-01/anat/sub-01_part-phase_MEGRE.json",
        json!({"EchoTime": [0.01, 0.005, 0.015]}),
    );
    let d = ds.discover(&all());
    assert!(d.problems.is_empty(), "{:?}", problem_texts(&d));
    let e = echoes(&d.acquisitions[0]);
    assert_eq!(
        e.iter().map(|e| e.frame).collect::<Vec<_>>(),
        [Some(1), Some(0), Some(2)]
    );
    assert_eq!(
        e.iter().map(|e| e.echo_time).collect::<Vec<_>>(),
        [0.005, 0.01, 0.015]
    );
    assert!(e.iter().all(|e| e.magnitude.is_some()));
    assert_eq!(d.acquisitions[0].inputs.len(), 2);

    // A list that does not match the number of frames is a problem.
    ds.json(
        "sub-01/anat/sub-01_part-phase_MEGRE.json",
        json!({"EchoTime": [0.01, 0.005]}),
    );
    let d = ds.discover(&all());
    assert!(d.acquisitions.is_empty());
    let p = problem_texts(&d).join("\n");
    assert!(p.contains("2 value(s)") && p.contains("3 frame(s)"), "{p}");
}

#[test]
fn filters_by_participant_and_session() {
    let ds = Ds::raw();
    for (sub, ses) in [("01", "pre"), ("01", "post"), ("02", "pre")] {
        ds.echo(
            &format!("sub-{sub}/ses-{ses}/anat/sub-{sub}_ses-{ses}"),
            1,
            Some(0.01),
            true,
            eye(),
        );
    }
    let d = ds.discover(&all());
    let names: Vec<String> = d.acquisitions.iter().map(Acquisition::name).collect();
    assert_eq!(
        names,
        ["sub-01_ses-post", "sub-01_ses-pre", "sub-02_ses-pre"]
    );

    // Labels come without prefixes; an accidental prefix is tolerated.
    let f = Filter {
        participants: vec!["sub-01".into()],
        sessions: vec!["post".into()],
        ..Filter::default()
    };
    let names: Vec<String> = ds
        .discover(&f)
        .acquisitions
        .iter()
        .map(Acquisition::name)
        .collect();
    assert_eq!(names, ["sub-01_ses-post"]);

    let f = Filter {
        participants: vec!["02".into()],
        sessions: vec![],
        ..Filter::default()
    };
    let d = ds.discover(&f);
    assert_eq!(d.acquisitions.len(), 1);
    assert_eq!(d.acquisitions[0].entities.sub, "02");

    let f = Filter {
        participants: vec![],
        sessions: vec!["mid".into()],
        ..Filter::default()
    };
    let err = discover(ds.root(), &f).unwrap_err();
    assert!(matches!(err, Error::Usage(_)));
    assert!(err.to_string().contains("post, pre"), "{err}");
}

#[test]
fn not_a_bids_dataset() {
    let tmp = tempfile::TempDir::new().unwrap();
    std::fs::create_dir(tmp.path().join("data")).unwrap();
    let err = discover(tmp.path(), &all()).unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("is not a BIDS dataset"), "{msg}");
    assert!(
        msg.contains("dataset_description.json") && msg.contains("sub-<label>/"),
        "{msg}"
    );

    let err = discover(&tmp.path().join("missing"), &all()).unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err:?}");
}

#[test]
fn no_matching_subject_lists_existing_ones() {
    let ds = Ds::raw();
    ds.echo("sub-01/anat/sub-01", 1, Some(0.01), false, eye());
    ds.echo("sub-03/anat/sub-03", 1, Some(0.01), false, eye());
    let f = Filter {
        participants: vec!["02".into()],
        sessions: vec![],
        ..Filter::default()
    };
    let err = discover(ds.root(), &f).unwrap_err();
    assert!(matches!(err, Error::Usage(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("02") && msg.contains("01, 03"), "{msg}");

    // One existing and one missing label: the existing one runs, the missing one is a problem.
    let f = Filter {
        participants: vec!["01".into(), "02".into()],
        sessions: vec![],
        ..Filter::default()
    };
    let d = ds.discover(&f);
    assert_eq!(d.acquisitions.len(), 1);
    assert_eq!(d.problems.len(), 1);
    assert_eq!(d.problems[0].0, "sub-02");
}

#[test]
fn magnitude_only_series_is_a_problem() {
    let ds = Ds::raw();
    for echo in 1..=2 {
        let stem = format!("sub-01/anat/sub-01_acq-mag_echo-{echo}_part-mag_MEGRE");
        ds.nii(&format!("{stem}.nii.gz"), eye());
        ds.json(
            &format!("{stem}.json"),
            json!({"EchoTime": 0.005 * f64::from(echo)}),
        );
    }
    // A good series beside it still runs.
    ds.echo("sub-01/anat/sub-01_acq-ok", 1, Some(0.01), true, eye());
    let d = ds.discover(&all());
    assert_eq!(d.acquisitions.len(), 1);
    assert_eq!(d.acquisitions[0].name(), "sub-01_acq-ok");
    assert_eq!(d.problems.len(), 1);
    let (name, err) = &d.problems[0];
    assert_eq!(name, "sub-01_acq-mag");
    let msg = err.to_string();
    assert!(
        msg.contains("QSM needs the phase images") && msg.contains("part-phase"),
        "{msg}"
    );
}

#[test]
fn magnitude_without_part_entity_counts_as_magnitude() {
    let ds = Ds::raw();
    ds.nii("sub-01/anat/sub-01_echo-1_MEGRE.nii.gz", eye());
    ds.json(
        "sub-01/anat/sub-01_echo-1_MEGRE.json",
        json!({"EchoTime": 0.01}),
    );
    let d = ds.discover(&all());
    assert!(d.acquisitions.is_empty());
    assert!(
        problem_texts(&d)[0].contains("part-phase"),
        "{:?}",
        problem_texts(&d)
    );
}

#[test]
fn missing_echo_time_names_the_file() {
    let ds = Ds::raw();
    ds.json("MEGRE.json", json!({"MagneticFieldStrength": 3}));
    ds.echo("sub-01/anat/sub-01", 1, Some(0.005), true, eye());
    ds.echo("sub-01/anat/sub-01", 2, None, true, eye());
    ds.echo("sub-02/anat/sub-02", 1, Some(0.005), true, eye());
    let d = ds.discover(&all());
    assert_eq!(d.acquisitions.len(), 1, "the other subject still runs");
    assert_eq!(d.acquisitions[0].entities.sub, "02");
    assert_eq!(d.problems.len(), 1);
    let msg = d.problems[0].1.to_string();
    assert!(
        msg.contains("sub-01_echo-2_part-phase_MEGRE.nii.gz"),
        "{msg}"
    );
    assert!(msg.contains("sub-01_echo-2_part-phase_MEGRE.json"), "{msg}");
    assert!(msg.contains("EchoTime") && msg.contains("seconds"), "{msg}");
}

#[test]
fn echo_time_in_milliseconds_is_a_problem() {
    let ds = Ds::raw();
    ds.echo("sub-01/anat/sub-01", 1, Some(5.0), false, eye());
    let d = ds.discover(&all());
    assert!(d.acquisitions.is_empty());
    assert!(
        problem_texts(&d)[0].contains("milliseconds"),
        "{:?}",
        problem_texts(&d)
    );
}

#[test]
fn inconsistent_grids_name_both_files() {
    let ds = Ds::raw();
    ds.echo("sub-01/anat/sub-01", 1, Some(0.005), false, eye());
    ds.nii_grid(
        "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.nii.gz",
        [4, 5, 4],
        1,
        eye(),
    );
    ds.json(
        "sub-01/anat/sub-01_echo-2_part-phase_MEGRE.json",
        json!({"EchoTime": 0.01}),
    );
    // Magnitude on another grid than its phase.
    ds.echo("sub-02/anat/sub-02", 1, Some(0.005), false, eye());
    ds.nii_grid(
        "sub-02/anat/sub-02_echo-1_part-mag_MEGRE.nii.gz",
        [2, 2, 2],
        1,
        eye(),
    );
    let d = ds.discover(&all());
    assert!(d.acquisitions.is_empty());
    let p = problem_texts(&d);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(p[0].contains("sub-01_echo-1_part-phase") && p[0].contains("sub-01_echo-2_part-phase"));
    assert!(p[1].contains("sub-02_echo-1_part-phase") && p[1].contains("sub-02_echo-1_part-mag"));
}

#[test]
fn rotated_runs_form_an_orientation_set() {
    let ds = Ds::raw();
    // Session "a": two runs 25° apart, plus an unrelated acquisition with other entities.
    let a = "sub-01/ses-a/anat/sub-01_ses-a";
    ds.echo(&format!("{a}_run-1"), 1, Some(0.01), true, rot_x(0.0));
    ds.echo(&format!("{a}_run-2"), 1, Some(0.01), true, rot_x(25.0));
    ds.echo(
        &format!("{a}_acq-tilt_run-3"),
        1,
        Some(0.01),
        true,
        rot_x(-20.0),
    );
    ds.echo(&format!("{a}_rec-other"), 1, Some(0.01), true, rot_x(40.0));
    // Session "b": two runs with the same orientation (0.5° apart is the same).
    let b = "sub-01/ses-b/anat/sub-01_ses-b";
    ds.echo(&format!("{b}_run-1"), 1, Some(0.01), true, rot_x(0.0));
    ds.echo(&format!("{b}_run-2"), 1, Some(0.01), true, rot_x(0.5));
    let d = ds.discover(&all());
    assert!(d.problems.is_empty(), "{:?}", problem_texts(&d));
    assert_eq!(d.acquisitions.len(), 6);
    assert_eq!(d.orientation_sets.len(), 1, "{:?}", d.orientation_sets);
    let set = &d.orientation_sets[0];
    assert_eq!(set.subject, "01");
    assert_eq!(set.session.as_deref(), Some("a"));
    let names: Vec<String> = set
        .members
        .iter()
        .map(|&i| d.acquisitions[i].name())
        .collect();
    assert_eq!(
        names,
        [
            "sub-01_ses-a_acq-tilt_run-3",
            "sub-01_ses-a_run-1",
            "sub-01_ses-a_run-2"
        ]
    );
    let b0 = d.acquisitions[set.members[2]].b0_direction;
    let (s, c) = 25f64.to_radians().sin_cos();
    assert!(
        (b0[1] - s).abs() < 1e-6 && (b0[2] - c).abs() < 1e-6,
        "{b0:?}"
    );
    // Session "b" is a candidate set as scanned: one B0 direction, registration decides.
    assert_eq!(d.scanned_sets.len(), 1, "{:?}", d.scanned_sets);
    let scanned = &d.scanned_sets[0];
    assert!(scanned.as_scanned && !set.as_scanned);
    assert_eq!(scanned.session.as_deref(), Some("b"));
    assert_eq!(scanned.members.len(), 2);
}

#[test]
fn the_orientation_set_rule_keeps_other_series_of_the_session_apart() {
    let ds = Ds::raw();
    // Three head orientations as scanned, plus a repeat and a high-resolution series.
    let s = "sub-01/anat/sub-01";
    for acq in ["ori1", "ori2", "ori3", "highres"] {
        ds.echo(&format!("{s}_acq-{acq}"), 1, Some(0.01), true, rot_x(0.0));
    }
    ds.echo(
        &format!("{s}_acq-ori1_run-2"),
        1,
        Some(0.01),
        true,
        rot_x(0.0),
    );
    let members = |d: &Discovery| -> Vec<Vec<String>> {
        d.scanned_sets
            .iter()
            .map(|set| {
                set.members
                    .iter()
                    .map(|&i| d.acquisitions[i].name())
                    .collect()
            })
            .collect()
    };
    // Without a rule every series differing only in acq/run joins.
    assert_eq!(members(&ds.discover(&all()))[0].len(), 5);
    let rule = |acq: Option<&str>, run: Option<&str>| Filter {
        orientation_set: OrientationRule {
            acq: acq.map(str::to_string),
            run: run.map(str::to_string),
        },
        ..all()
    };
    let d = ds.discover(&rule(Some("ori*"), None));
    assert_eq!(
        members(&d),
        [[
            "sub-01_acq-ori1",
            "sub-01_acq-ori1_run-2",
            "sub-01_acq-ori2",
            "sub-01_acq-ori3"
        ]]
    );
    // Everything is still processed: the others alone.
    assert_eq!(d.acquisitions.len(), 5);
    // A run pattern needs a run label; `?` is one character.
    let d = ds.discover(&rule(Some("ori?"), Some("2")));
    assert!(members(&d).is_empty(), "{:?}", members(&d));
    let d = ds.discover(&rule(Some("o*i?"), None));
    assert_eq!(members(&d)[0].len(), 4);
}

#[test]
fn globs_match_whole_labels() {
    let r = |acq: &str| OrientationRule {
        acq: Some(acq.into()),
        run: None,
    };
    let e = |acq: Option<&str>| Entities {
        sub: "1".into(),
        acq: acq.map(str::to_string),
        ..Entities::default()
    };
    for (pattern, label, want) in [
        ("ori*", Some("ori12"), true),
        ("ori*", Some("ori"), true),
        ("ori*", Some("xori1"), false),
        ("*ori*", Some("xori1"), true),
        ("ori?", Some("ori12"), false),
        ("ori?", Some("ori1"), true),
        ("a*b*c", Some("aXbYc"), true),
        ("a*b*c", Some("aXcYb"), false),
        ("ori*", None, false),
        ("", Some(""), true),
    ] {
        assert_eq!(r(pattern).admits(&e(label)), want, "{pattern} on {label:?}");
    }
}

fn derivative() -> Ds {
    Ds::new(Some(
        json!({"Name": "fields", "BIDSVersion": "1.9.0", "DatasetType": "derivative"}),
    ))
}

#[test]
fn derivative_field_maps_with_units_and_masks() {
    let ds = derivative();
    ds.json("fieldmap.json", json!({"MagneticFieldStrength": 3.0}));
    ds.nii("sub-01/anat/sub-01_desc-local_fieldmap.nii.gz", eye());
    ds.json(
        "sub-01/anat/sub-01_desc-local_fieldmap.json",
        json!({"Units": "Hz"}),
    );
    ds.nii("sub-01/anat/sub-01_desc-brain_mask.nii.gz", eye());
    // Another datatype folder, units in another case, rad needs EchoTime.
    ds.nii(
        "sub-02/ses-1/qsm/sub-02_ses-1_desc-total_fieldmap.nii",
        eye(),
    );
    ds.json(
        "sub-02/ses-1/qsm/sub-02_ses-1_desc-total_fieldmap.json",
        json!({"Units": "RAD", "EchoTime": 0.02}),
    );
    ds.nii("sub-02/ses-1/qsm/sub-02_ses-1_desc-brain_mask.nii", eye());
    let d = ds.discover(&all());
    assert!(d.problems.is_empty(), "{:?}", problem_texts(&d));
    assert_eq!(d.dataset_type, DatasetType::Derivative);
    assert_eq!(d.acquisitions.len(), 2);
    let a = &d.acquisitions[0];
    assert_eq!(a.name(), "sub-01");
    assert_eq!(a.entities.desc, None);
    assert_eq!(a.suffix, "fieldmap");
    assert_eq!(a.field_strength, Some(3.0));
    match &a.source {
        Source::FieldMap {
            kind,
            field,
            units,
            mask,
            echo_time,
        } => {
            assert_eq!(*kind, FieldKind::Local);
            assert_eq!(*units, FieldUnits::Hz);
            assert_eq!(name_of(field), "sub-01_desc-local_fieldmap.nii.gz");
            assert_eq!(name_of(mask), "sub-01_desc-brain_mask.nii.gz");
            assert_eq!(*echo_time, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(a.inputs.len(), 2);
    let b = &d.acquisitions[1];
    assert_eq!(b.name(), "sub-02_ses-1");
    match &b.source {
        Source::FieldMap {
            kind,
            units,
            echo_time,
            ..
        } => {
            assert_eq!(*kind, FieldKind::Total);
            assert_eq!(*units, FieldUnits::Rad);
            assert_eq!(*echo_time, Some(0.02));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn derivative_problems_missing_mask_bad_units_rad_without_echo_time() {
    let ds = derivative();
    ds.nii("sub-01/anat/sub-01_desc-local_fieldmap.nii.gz", eye());
    ds.json(
        "sub-01/anat/sub-01_desc-local_fieldmap.json",
        json!({"Units": "ppm"}),
    );
    ds.nii("sub-02/anat/sub-02_desc-local_fieldmap.nii.gz", eye());
    ds.json(
        "sub-02/anat/sub-02_desc-local_fieldmap.json",
        json!({"Units": "tesla"}),
    );
    ds.nii("sub-02/anat/sub-02_desc-brain_mask.nii.gz", eye());
    ds.nii("sub-03/anat/sub-03_desc-total_fieldmap.nii.gz", eye());
    ds.json(
        "sub-03/anat/sub-03_desc-total_fieldmap.json",
        json!({"Units": "rad"}),
    );
    ds.nii("sub-03/anat/sub-03_desc-brain_mask.nii.gz", eye());
    let d = ds.discover(&all());
    assert!(d.acquisitions.is_empty());
    let p = problem_texts(&d);
    assert_eq!(p.len(), 3, "{p:?}");
    assert!(
        p[0].starts_with("sub-01") && p[0].contains("add sub-01_desc-brain_mask.nii.gz"),
        "{p:?}"
    );
    assert!(
        p[1].contains("\"tesla\"") && p[1].contains("\"ppm\", \"Hz\", \"rad\", \"rad/s\""),
        "{p:?}"
    );
    assert!(
        p[2].contains("EchoTime") && p[2].contains("sub-03_desc-total_fieldmap.json"),
        "{p:?}"
    );
}

#[test]
fn local_field_maps_form_orientation_sets() {
    let ds = derivative();
    for (run, deg) in [(1, 0.0), (2, 15.0)] {
        let stem = format!("sub-01/anat/sub-01_run-{run}");
        ds.nii(&format!("{stem}_desc-local_fieldmap.nii.gz"), rot_x(deg));
        ds.json(
            &format!("{stem}_desc-local_fieldmap.json"),
            json!({"Units": "ppm"}),
        );
        ds.nii(&format!("{stem}_desc-brain_mask.nii.gz"), rot_x(deg));
    }
    let d = ds.discover(&all());
    assert!(d.problems.is_empty(), "{:?}", problem_texts(&d));
    assert_eq!(d.orientation_sets.len(), 1);
    assert_eq!(d.orientation_sets[0].members, [0, 1]);
    assert_eq!(d.orientation_sets[0].session, None);
}

#[test]
fn misnamed_file_is_a_problem() {
    let ds = Ds::raw();
    ds.echo("sub-01/anat/sub-01", 1, Some(0.01), false, eye());
    ds.nii("sub-01/anat/sub-02_echo-1_part-phase_MEGRE.nii.gz", eye());
    let d = ds.discover(&all());
    assert_eq!(d.acquisitions.len(), 1);
    let p = problem_texts(&d);
    assert!(
        p.len() == 1 && p[0].contains("sub-02") && p[0].contains("sub-01/"),
        "{p:?}"
    );
}

#[test]
fn empty_dataset_is_a_usage_error() {
    let ds = Ds::raw();
    std::fs::create_dir_all(ds.root().join("sub-01/anat")).unwrap();
    ds.nii("sub-01/anat/sub-01_T1w.nii.gz", eye());
    let err = discover(ds.root(), &all()).unwrap_err();
    assert!(
        matches!(err, Error::Usage(_)) && err.to_string().contains("MEGRE"),
        "{err}"
    );
}

// ---------------------------------------------------------------------------------------
// User masks (--mask-dir)

/// A raw dataset of one-echo series with these name stems, and an empty mask folder.
fn raw_with_masks(stems: &[&str]) -> (Ds, tempfile::TempDir) {
    let ds = Ds::raw();
    ds.json("MEGRE.json", json!({"MagneticFieldStrength": 3}));
    for stem in stems {
        ds.echo(stem, 1, Some(0.004), true, eye());
    }
    (ds, tempfile::TempDir::new().unwrap())
}

fn mask_in(dir: &tempfile::TempDir, rel: &str) -> PathBuf {
    let p = dir.path().join(rel);
    write_nii(&p, DIMS, 1, eye());
    p
}

fn with_masks(ds: &Ds, masks: &tempfile::TempDir) -> Discovery {
    discover_with_masks(ds.root(), &all(), Some(masks.path())).unwrap()
}

fn user_mask_of<'a>(d: &'a Discovery, name: &str) -> &'a UserMask {
    let a = d
        .acquisitions
        .iter()
        .find(|a| a.name() == name)
        .unwrap_or_else(|| panic!("no {name}: {:?}", problem_texts(d)));
    a.user_mask.as_ref().expect("a user mask")
}

#[test]
fn a_session_mask_serves_every_series_of_the_session_and_a_specific_one_wins() {
    let (ds, masks) = raw_with_masks(&[
        "sub-01/ses-1/anat/sub-01_ses-1_acq-a",
        "sub-01/ses-1/anat/sub-01_ses-1_acq-b",
        "sub-01/ses-1/anat/sub-01_ses-1_acq-c",
    ]);
    let session = mask_in(
        &masks,
        "sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz",
    );
    // Other pipelines name the original grid with space-orig.
    let c = mask_in(
        &masks,
        "sub-01/ses-1/anat/sub-01_ses-1_acq-c_space-orig_desc-brain_mask.nii",
    );
    // A template-space mask is not on the series' grid: ignored even though more specific.
    mask_in(
        &masks,
        "sub-01/ses-1/anat/sub-01_ses-1_acq-a_space-MNI152NLin2009cAsym_desc-brain_mask.nii.gz",
    );
    // Not brain masks, or elsewhere: ignored.
    mask_in(
        &masks,
        "sub-01/ses-1/anat/sub-01_ses-1_acq-a_desc-wm_mask.nii.gz",
    );
    mask_in(
        &masks,
        "sub-01/ses-1/anat/.x/sub-01_ses-1_acq-a_desc-brain_mask.nii.gz",
    );
    let d = with_masks(&ds, &masks);
    assert!(d.problems.is_empty(), "{:?}", problem_texts(&d));
    for acq in ["sub-01_ses-1_acq-a", "sub-01_ses-1_acq-b"] {
        let m = user_mask_of(&d, acq);
        assert_eq!(m.path, session, "{acq}");
        assert_eq!(
            m.uri,
            "bids:masks:sub-01/ses-1/anat/sub-01_ses-1_desc-brain_mask.nii.gz"
        );
    }
    assert_eq!(user_mask_of(&d, "sub-01_ses-1_acq-c").path, c);
    // Without --mask-dir, nothing changes.
    let plain = ds.discover(&all());
    assert!(plain.acquisitions.iter().all(|a| a.user_mask.is_none()));
}

#[test]
fn a_series_without_a_mask_or_with_two_equal_ones_fails_alone() {
    let (ds, masks) = raw_with_masks(&[
        "sub-01/anat/sub-01_acq-a_run-1",
        "sub-01/anat/sub-01_acq-b",
        "sub-02/anat/sub-02",
    ]);
    // Both name two entities of acq-a_run-1: neither is more specific.
    let by_acq = mask_in(&masks, "sub-01/anat/sub-01_acq-a_desc-brain_mask.nii.gz");
    let by_run = mask_in(&masks, "sub-01/anat/sub-01_run-1_desc-brain_mask.nii.gz");
    mask_in(&masks, "sub-01/anat/sub-01_acq-b_desc-brain_mask.nii.gz");
    // sub-02 has a mask only in another space.
    mask_in(
        &masks,
        "sub-02/anat/sub-02_space-T1w_desc-brain_mask.nii.gz",
    );
    let d = with_masks(&ds, &masks);
    assert_eq!(d.acquisitions.len(), 1, "{:?}", problem_texts(&d));
    assert_eq!(d.acquisitions[0].name(), "sub-01_acq-b");
    let p = problem_texts(&d);
    assert_eq!(p.len(), 2, "{p:?}");
    assert!(
        p[0].starts_with("sub-01_acq-a_run-1: ")
            && p[0].contains(name_of(&by_acq))
            && p[0].contains(name_of(&by_run))
            && p[0].contains("equally"),
        "{p:?}"
    );
    assert!(
        p[1].starts_with("sub-02: ")
            && p[1].contains("no brain mask for sub-02")
            && p[1].contains("sub-02_desc-brain_mask.nii.gz")
            && p[1].contains("space-T1w"),
        "{p:?}"
    );
}

#[test]
fn a_mask_dir_without_masks_is_refused_and_field_maps_take_the_users_mask() {
    let (ds, masks) = raw_with_masks(&["sub-01/anat/sub-01"]);
    let err = discover_with_masks(ds.root(), &all(), Some(masks.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds no") && err.contains("--mask-dir"),
        "{err}"
    );
    let missing = masks.path().join("nope");
    let err = discover_with_masks(ds.root(), &all(), Some(&missing))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a folder"), "{err}");

    // A field map with no mask beside it runs on the user's; one with a mask beside it too.
    let fields = derivative();
    fields.json(
        "fieldmap.json",
        json!({"MagneticFieldStrength": 3.0, "Units": "ppm"}),
    );
    fields.nii("sub-01/anat/sub-01_desc-local_fieldmap.nii.gz", eye());
    fields.nii("sub-02/anat/sub-02_desc-local_fieldmap.nii.gz", eye());
    fields.nii("sub-02/anat/sub-02_desc-brain_mask.nii.gz", eye());
    let m1 = mask_in(&masks, "sub-01/anat/sub-01_desc-brain_mask.nii.gz");
    let m2 = mask_in(&masks, "sub-02/anat/sub-02_desc-brain_mask.nii.gz");
    let d = discover_with_masks(fields.root(), &all(), Some(masks.path())).unwrap();
    assert!(d.problems.is_empty(), "{:?}", problem_texts(&d));
    for (a, want) in d.acquisitions.iter().zip([m1, m2]) {
        assert_eq!(a.user_mask.as_ref().unwrap().path, want);
        match &a.source {
            Source::FieldMap { mask, .. } => assert_eq!(mask, &want),
            other => panic!("{other:?}"),
        }
        // The mask beside it is not used, so it is not a source.
        assert_eq!(a.inputs.len(), 1, "{:?}", a.inputs);
    }
}
