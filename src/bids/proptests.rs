//! Hostile names and sidecars (issue 21): the BIDS filename parser and the sidecar reader
//! never panic on any input, valid names round-trip, and every rejected sidecar is an input
//! error naming a file. `CHIMAP_FUZZ_CASES` sets the number of cases.

use std::path::Path;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::{discover, Entities, Filter};
use crate::Error;

fn cases(default: u32) -> u32 {
    std::env::var("CHIMAP_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn runner(default: u32) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(default),
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn any_file_name_parses_or_is_refused_without_panic() {
    let mut r = runner(2000);
    r.run(&any::<String>(), |s| {
        let _ = Entities::parse(&s);
        Ok(())
    })
    .unwrap();
    // Names close to BIDS ones reach the deeper branches.
    r.run(
        &"[a-z]{0,4}(-[a-zA-Z0-9]{0,3})?(_[a-z]{0,4}-?[a-zA-Z0-9-]{0,3}){0,5}(\\.[a-z.]{0,7})?",
        |s| {
            if let Some((e, suffix, ext)) = Entities::parse(&s) {
                prop_assert!(!suffix.is_empty() && !suffix.contains('-'));
                prop_assert!(ext.is_empty() || ext.starts_with('.'));
                let _ = e.prefix();
            }
            Ok(())
        },
    )
    .unwrap();
}

#[test]
fn valid_names_round_trip() {
    let label = "[a-zA-Z0-9]{1,6}";
    let name = (
        label,
        proptest::option::of(label),
        proptest::option::of(label),
        1u32..20,
        "[A-Za-z0-9]{1,8}",
    );
    runner(500)
        .run(&name, |(sub, ses, acq, echo, suffix)| {
            let mut s = format!("sub-{sub}");
            if let Some(x) = &ses {
                s.push_str(&format!("_ses-{x}"));
            }
            if let Some(x) = &acq {
                s.push_str(&format!("_acq-{x}"));
            }
            s.push_str(&format!("_echo-{echo}_part-phase_{suffix}.nii.gz"));
            let (e, got_suffix, ext) = Entities::parse(&s).expect("a valid name parses");
            prop_assert_eq!(&e.sub, &sub);
            prop_assert_eq!(&e.ses, &ses);
            prop_assert_eq!(&e.acq, &acq);
            prop_assert_eq!(e.echo, Some(echo.to_string()));
            prop_assert_eq!(got_suffix, suffix);
            prop_assert_eq!(ext, ".nii.gz");
            Ok(())
        })
        .unwrap();
}

/// A one-acquisition copy of the example dataset (headers are all discovery reads).
fn small_dataset(dir: &Path) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("bids/example");
    let ds = dir.join("ds");
    let anat = ds.join("sub-1/anat");
    std::fs::create_dir_all(&anat).unwrap();
    std::fs::copy(
        src.join("dataset_description.json"),
        ds.join("dataset_description.json"),
    )
    .unwrap();
    for e in std::fs::read_dir(src.join("sub-1/anat")).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.contains("acq-ori1") && (name.contains("echo-1") || name.contains("echo-2")) {
            std::fs::copy(&p, anat.join(&name)).unwrap();
        }
    }
    ds
}

/// Garbage bytes, or JSON whose values have the wrong types, ranges or sizes.
fn hostile_sidecar() -> impl Strategy<Value = Vec<u8>> {
    let number = prop_oneof![
        any::<f64>().prop_map(|x| serde_json::json!(x)),
        Just(serde_json::json!(-1)),
        Just(serde_json::json!(0)),
        Just(serde_json::json!(1e308)),
        Just(serde_json::json!("0.004")),
        Just(serde_json::json!(null)),
        Just(serde_json::json!([0.004, 0.008])),
        Just(serde_json::json!({"EchoTime": 1})),
        Just(serde_json::json!(vec![1.0; 1000])),
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..300),
        (number.clone(), number, any::<bool>()).prop_map(|(te, b0, whole)| {
            let v = if whole {
                serde_json::json!({"EchoTime": te, "MagneticFieldStrength": b0})
            } else {
                serde_json::json!({"EchoTime": te})
            };
            serde_json::to_vec(&v).unwrap()
        }),
        "[\\[\\]{}\",:0-9a-zA-Z .e+-]{0,80}".prop_map(String::into_bytes),
    ]
}

#[test]
fn hostile_sidecars_are_named_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let ds = small_dataset(dir.path());
    let sidecar = ds.join("sub-1/anat/sub-1_acq-ori1_echo-1_part-phase_MEGRE.json");
    runner(256)
        .run(&hostile_sidecar(), |bytes| {
            std::fs::write(&sidecar, &bytes).unwrap();
            let named = |e: &Error| {
                matches!(e, Error::Input { .. } | Error::Io { .. } | Error::Usage(_))
                    && e.to_string().contains("sub-1")
            };
            match discover(&ds, &Filter::default()) {
                Ok(d) => {
                    for (_, e) in &d.problems {
                        prop_assert!(named(e), "unnamed problem: {e}");
                    }
                    for a in &d.acquisitions {
                        if let crate::bids::Source::Raw { echoes } = &a.source {
                            prop_assert!(echoes
                                .iter()
                                .all(|e| e.echo_time.is_finite() && e.echo_time > 0.0));
                        }
                        if let Some(t) = a.field_strength {
                            prop_assert!(t.is_finite() && t > 0.0, "field strength {t}");
                        }
                    }
                }
                Err(e) => prop_assert!(named(&e), "unnamed error: {e:?}"),
            }
            Ok(())
        })
        .unwrap();
}
