//! Hostile NIfTI files (issue 21): random damage to a valid header and its data, claimed
//! sizes far beyond the file, truncation. Reading never panics, never allocates what the
//! header merely claims, and every rejection is an input error naming the file.
//! `CHIMAP_FUZZ_CASES` sets the number of cases (a longer run: see README).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use super::*;

fn cases(default: u32) -> u32 {
    std::env::var("CHIMAP_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A valid little image's bytes, uncompressed.
fn valid_bytes(dir: &Path) -> Vec<u8> {
    let path = dir.join("valid.nii");
    let vol = Volume::new(
        [4, 3, 2],
        (0..24).map(|i| i as f32).collect(),
        Geometry::from_affine([
            [2.0, 0.0, 0.0, -4.0],
            [0.0, 2.0, 0.0, -3.0],
            [0.0, 0.0, 2.0, -2.0],
            [0.0, 0.0, 0.0, 1.0],
        ]),
    );
    write_volume(&path, &vol).unwrap();
    std::fs::read(&path).unwrap()
}

/// Reads `bytes` as `name` (gzip-compressed when it ends in `.gz`) and checks the outcome.
fn read_hostile(dir: &Path, name: &str, bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
    let path = dir.join(name);
    if name.ends_with(".gz") {
        let mut enc = GzEncoder::new(Vec::new(), Compression::fast());
        enc.write_all(bytes).unwrap();
        std::fs::write(&path, enc.finish().unwrap()).unwrap();
    } else {
        std::fs::write(&path, bytes).unwrap();
    }
    match read_image(&path) {
        Ok(img) => {
            let n: usize = img.header.dims.iter().product();
            prop_assert!(img.frames.iter().all(|f| f.data.len() == n));
        }
        Err(e) => {
            prop_assert!(
                matches!(e, Error::Input { .. } | Error::Io { .. }),
                "not an input error: {e:?}"
            );
            prop_assert!(e.to_string().contains(name), "unnamed: {e}");
        }
    }
    Ok(())
}

#[test]
fn damaged_headers_and_data_are_named_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let valid = valid_bytes(dir.path());
    let len = valid.len();
    // Up to 8 bytes anywhere set to anything (biased to the header), then maybe truncated.
    let damage = (
        proptest::collection::vec((0..len, any::<u8>()), 1..8),
        proptest::collection::vec((0usize..HEADER_SIZE, any::<u8>()), 0..8),
        proptest::option::of(0..len),
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: cases(512),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&damage, |(anywhere, header, cut, gz)| {
            let mut bytes = valid.clone();
            for (i, b) in anywhere.into_iter().chain(header) {
                bytes[i] = b;
            }
            if let Some(c) = cut {
                bytes.truncate(c);
            }
            read_hostile(dir.path(), if gz { "x.nii.gz" } else { "x.nii" }, &bytes)
        })
        .unwrap();
}

#[test]
fn claimed_sizes_beyond_the_file_are_refused_without_allocating_them() {
    let dir = tempfile::tempdir().unwrap();
    let valid = valid_bytes(dir.path());
    // Any dims (as NIfTI's signed 16 bits), any frame count, any data type code.
    let claims = (
        proptest::array::uniform7(any::<i16>()),
        1i16..=7,
        prop_oneof![
            Just(2i16),
            Just(4),
            Just(16),
            Just(64),
            Just(512),
            any::<i16>()
        ],
        any::<bool>(),
    );
    let mut runner = TestRunner::new(Config {
        cases: cases(256),
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&claims, |(dims, ndim, datatype, gz)| {
            let mut bytes = valid.clone();
            bytes[offset::DIM..offset::DIM + 2].copy_from_slice(&ndim.to_le_bytes());
            for (k, d) in dims.iter().enumerate() {
                let at = offset::DIM + 2 * (k + 1);
                bytes[at..at + 2].copy_from_slice(&d.to_le_bytes());
            }
            bytes[offset::DATATYPE..offset::DATATYPE + 2].copy_from_slice(&datatype.to_le_bytes());
            read_hostile(
                dir.path(),
                if gz { "big.nii.gz" } else { "big.nii" },
                &bytes,
            )
        })
        .unwrap();
}
