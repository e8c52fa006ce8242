use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::*;

/// A rotation about an oblique axis times anisotropic voxels, optionally with a reflection
/// (negative determinant, as radiological-order data has), plus an offset.
fn oblique_geometry(reflect: bool) -> Geometry {
    let (a, b) = (0.3f64, -0.5f64);
    let rz = [
        [a.cos(), -a.sin(), 0.0],
        [a.sin(), a.cos(), 0.0],
        [0.0, 0.0, 1.0],
    ];
    let rx = [
        [1.0, 0.0, 0.0],
        [0.0, b.cos(), -b.sin()],
        [0.0, b.sin(), b.cos()],
    ];
    let voxel = [0.8, 1.1, if reflect { -2.0 } else { 2.0 }];
    let mut aff = [[0.0; 4]; 4];
    for i in 0..3 {
        for j in 0..3 {
            let r: f64 = (0..3).map(|k| rz[i][k] * rx[k][j]).sum();
            aff[i][j] = r * voxel[j];
        }
    }
    aff[0][3] = -90.5;
    aff[1][3] = 126.25;
    aff[2][3] = -72.0;
    aff[3][3] = 1.0;
    Geometry::from_affine(aff)
}

fn ramp(dims: [usize; 3], geometry: Geometry, seed: f32) -> Volume {
    let n = dims.iter().product::<usize>();
    let data = (0..n)
        .map(|i| (i as f32 * 0.37 + seed).sin() * 100.0 + i as f32 * 1e-3)
        .collect();
    Volume::new(dims, data, geometry)
}

fn assert_affine_close(got: &[[f64; 4]; 4], want: &[[f64; 4]; 4], tol: f64) {
    for i in 0..4 {
        for j in 0..4 {
            assert!(
                (got[i][j] - want[i][j]).abs() <= tol * (1.0 + want[i][j].abs()),
                "affine differs at [{i}][{j}]:\n got {got:?}\nwant {want:?}"
            );
        }
    }
}

fn patch(path: &Path, at: usize, bytes: &[u8]) {
    let mut all = std::fs::read(path).unwrap();
    all[at..at + bytes.len()].copy_from_slice(bytes);
    std::fs::write(path, all).unwrap();
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

fn input_message(r: Result<Image>) -> String {
    match r {
        Err(e @ Error::Input { .. }) => e.to_string(),
        Err(e) => panic!("expected an input error, got {e:?}"),
        Ok(_) => panic!("expected an error, got an image"),
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn float_round_trip_nii_and_niigz_keeps_data_dims_and_affine() {
    let dir = tempfile::tempdir().unwrap();
    for reflect in [false, true] {
        for name in ["a.nii", "b.nii.gz"] {
            let vol = ramp([5, 6, 7], oblique_geometry(reflect), 0.1);
            let path = dir.path().join(format!("{reflect}-{name}"));
            write_volume(&path, &vol).unwrap();
            if name.ends_with(".gz") {
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(
                    &bytes[..2],
                    &[0x1f, 0x8b],
                    "a .nii.gz must be gzip-compressed"
                );
            }
            let img = read_image(&path).unwrap();
            assert_eq!(img.header.dims, [5, 6, 7]);
            assert_eq!(img.header.frames, 1);
            assert!(!img.header.integer_type);
            assert_eq!(img.frames.len(), 1);
            assert_eq!(img.frames[0].dims, [5, 6, 7]);
            assert_eq!(
                img.frames[0].data, vol.data,
                "float32 data must round-trip exactly"
            );
            assert_affine_close(&img.header.geometry.affine, &vol.geometry.affine, 1e-6);
            assert_affine_close(&img.frames[0].geometry.affine, &vol.geometry.affine, 1e-6);
            for k in 0..3 {
                assert!(
                    (img.header.geometry.voxel_size[k] - vol.geometry.voxel_size[k]).abs() < 1e-6
                );
            }
            let h = read_header(&path).unwrap();
            assert_eq!((h.dims, h.frames), ([5, 6, 7], 1));
            assert_affine_close(&h.geometry.affine, &vol.geometry.affine, 1e-6);
        }
    }
}

#[test]
fn written_header_fields_follow_the_nifti_standard() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.nii.gz");
    write_volume(&path, &ramp([3, 4, 5], oblique_geometry(true), 0.0)).unwrap();
    let b = gunzip(&path);
    let i16_at = |at: usize| i16::from_le_bytes([b[at], b[at + 1]]);
    let f32_at = |at: usize| f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    assert_eq!(b.len(), 352 + 3 * 4 * 5 * 4);
    assert_eq!(i16_at(offset::DATATYPE), 16);
    assert_eq!(i16_at(offset::BITPIX), 32);
    assert_eq!(i16_at(offset::SFORM_CODE), 1);
    assert_eq!(i16_at(offset::QFORM_CODE), 1);
    assert_eq!(
        f32_at(offset::PIXDIM),
        -1.0,
        "a reflected affine needs qfac = -1"
    );
    assert!((f32_at(offset::PIXDIM + 4) - 0.8).abs() < 1e-6);
    assert!((f32_at(offset::PIXDIM + 12) - 2.0).abs() < 1e-6);
    assert_eq!(f32_at(offset::SCL_SLOPE), 1.0);
    assert_eq!(f32_at(offset::SCL_INTER), 0.0);
    assert_eq!(f32_at(offset::VOX_OFFSET), 352.0);
    assert_eq!(b[offset::XYZT_UNITS], 10);
    assert_eq!(&b[offset::MAGIC..offset::MAGIC + 4], b"n+1\0");
}

#[test]
fn qform_only_file_gives_the_qform_affine() {
    let dir = tempfile::tempdir().unwrap();
    for reflect in [false, true] {
        let vol = ramp([4, 3, 2], oblique_geometry(reflect), 0.0);
        let path = dir.path().join(format!("q{reflect}.nii"));
        write_volume(&path, &vol).unwrap();
        // sform_code 0 and a nonsense sform: only the qform can give the right answer.
        patch(&path, offset::SFORM_CODE, &0i16.to_le_bytes());
        patch(&path, offset::SROW_X, &7.0f32.to_le_bytes());
        let h = read_header(&path).unwrap();
        assert_affine_close(&h.geometry.affine, &vol.geometry.affine, 1e-5);
    }
}

#[test]
fn singular_sform_falls_back_to_qform_and_no_codes_to_pixdim() {
    let dir = tempfile::tempdir().unwrap();
    let vol = ramp([4, 3, 2], oblique_geometry(false), 0.0);
    let path = dir.path().join("s.nii");
    write_volume(&path, &vol).unwrap();
    for k in 0..12 {
        patch(&path, offset::SROW_X + 4 * k, &0f32.to_le_bytes());
    }
    assert_affine_close(
        &read_header(&path).unwrap().geometry.affine,
        &vol.geometry.affine,
        1e-5,
    );

    patch(&path, offset::SFORM_CODE, &0i16.to_le_bytes());
    patch(&path, offset::QFORM_CODE, &0i16.to_le_bytes());
    let g = read_header(&path).unwrap().geometry;
    let want = [
        [0.8, 0.0, 0.0, 0.0],
        [0.0, 1.1, 0.0, 0.0],
        [0.0, 0.0, 2.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ];
    assert_affine_close(&g.affine, &want, 1e-6);
    assert!((g.voxel_size[1] - 1.1).abs() < 1e-6);
}

#[test]
fn sheared_affine_is_written_without_qform_and_read_back_from_sform() {
    let dir = tempfile::tempdir().unwrap();
    let mut aff = oblique_geometry(false).affine;
    aff[0][1] += 0.4;
    let vol = ramp([3, 3, 3], Geometry::from_affine(aff), 0.0);
    let path = dir.path().join("shear.nii");
    write_volume(&path, &vol).unwrap();
    let b = std::fs::read(&path).unwrap();
    assert_eq!(
        i16::from_le_bytes([b[offset::QFORM_CODE], b[offset::QFORM_CODE + 1]]),
        0
    );
    assert_affine_close(&read_header(&path).unwrap().geometry.affine, &aff, 1e-6);
}

#[test]
fn int16_4d_round_trip_rounds_and_clamps() {
    let dir = tempfile::tempdir().unwrap();
    let g = oblique_geometry(false);
    let mut frames: Vec<Volume> = (0..3)
        .map(|t| ramp([4, 5, 6], g.clone(), t as f32))
        .collect();
    frames[0].data[0] = 40000.0;
    frames[0].data[1] = -1e6;
    frames[0].data[2] = 2.5;
    frames[0].data[3] = -2.5;
    frames[0].data[4] = f32::NAN;
    frames[1].data[0] = 4095.4;
    frames[1].data[1] = -4096.0;
    for name in ["p.nii", "p.nii.gz"] {
        let path = dir.path().join(name);
        let refs: Vec<&Volume> = frames.iter().collect();
        write_volume_i16(&path, &refs).unwrap();
        let img = read_image(&path).unwrap();
        assert!(img.header.integer_type);
        assert_eq!(img.header.frames, 3);
        assert_eq!(img.frames.len(), 3);
        for (got, want) in img.frames.iter().zip(&frames) {
            assert_eq!(got.dims, [4, 5, 6]);
            for (g, w) in got.data.iter().zip(&want.data) {
                let expect = if w.is_nan() {
                    0.0
                } else {
                    w.round().clamp(-32768.0, 32767.0)
                };
                assert_eq!(*g, expect);
            }
        }
        assert_eq!(
            &img.frames[0].data[..5],
            &[32767.0, -32768.0, 3.0, -3.0, 0.0]
        );
        assert_eq!(&img.frames[1].data[..2], &[4095.0, -4096.0]);
        assert_affine_close(&img.header.geometry.affine, &g.affine, 1e-6);
    }
}

#[test]
fn int16_frames_on_different_grids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = ramp([4, 5, 6], oblique_geometry(false), 0.0);
    let b = ramp([4, 5, 7], oblique_geometry(false), 0.0);
    let c = ramp([4, 5, 6], oblique_geometry(true), 0.0);
    let path = dir.path().join("bad.nii");
    assert!(write_volume_i16(&path, &[&a, &b]).is_err());
    assert!(write_volume_i16(&path, &[&a, &c]).is_err());
    assert!(write_volume_i16(&path, &[]).is_err());
    assert!(
        entries(dir.path()).is_empty(),
        "nothing may be written: {:?}",
        entries(dir.path())
    );
}

/// An int16 file whose values are 0, 1, 2, … so that any scaling shows.
fn int16_counting_file(dir: &Path, name: &str) -> (PathBuf, Vec<f32>) {
    let n = 2 * 3 * 4;
    let values: Vec<f32> = (0..n).map(|i| i as f32 - 5.0).collect();
    let vol = Volume::new([2, 3, 4], values.clone(), oblique_geometry(false));
    let path = dir.join(name);
    write_volume_i16(&path, &[&vol]).unwrap();
    (path, values)
}

#[test]
fn nan_or_zero_slope_means_unscaled() {
    let dir = tempfile::tempdir().unwrap();
    for (k, slope) in [f32::NAN, 0.0].into_iter().enumerate() {
        let (path, values) = int16_counting_file(dir.path(), &format!("s{k}.nii"));
        patch(&path, offset::SCL_SLOPE, &slope.to_le_bytes());
        // nibabel pairs a NaN slope with a NaN intercept; a set intercept must be ignored too.
        patch(&path, offset::SCL_INTER, &5.0f32.to_le_bytes());
        let img = read_image(&path).unwrap();
        assert_eq!(
            img.frames[0].data, values,
            "slope {slope} must leave values unscaled"
        );
    }
}

#[test]
fn real_slope_and_intercept_are_applied() {
    let dir = tempfile::tempdir().unwrap();
    let (path, values) = int16_counting_file(dir.path(), "scaled.nii");
    patch(&path, offset::SCL_SLOPE, &2.0f32.to_le_bytes());
    patch(&path, offset::SCL_INTER, &1.0f32.to_le_bytes());
    let img = read_image(&path).unwrap();
    let want: Vec<f32> = values.iter().map(|v| v * 2.0 + 1.0).collect();
    assert_eq!(img.frames[0].data, want);
    assert!(img.header.integer_type);
}

/// A hand-made single-file NIfTI-1 holding `payload` (dims 2×2×2), in either byte order.
fn raw_file(path: &Path, datatype: i16, bitpix: i16, big: bool, payload: &[u8]) {
    let mut b = vec![0u8; 352];
    let i16b = |v: i16| {
        if big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let f32b = |v: f32| {
        if big {
            v.to_be_bytes()
        } else {
            v.to_le_bytes()
        }
    };
    let i32b = if big {
        348i32.to_be_bytes()
    } else {
        348i32.to_le_bytes()
    };
    b[0..4].copy_from_slice(&i32b);
    for (k, d) in [3i16, 2, 2, 2, 1, 1, 1, 1].into_iter().enumerate() {
        b[offset::DIM + 2 * k..offset::DIM + 2 * k + 2].copy_from_slice(&i16b(d));
    }
    b[offset::DATATYPE..offset::DATATYPE + 2].copy_from_slice(&i16b(datatype));
    b[offset::BITPIX..offset::BITPIX + 2].copy_from_slice(&i16b(bitpix));
    for k in 0..8 {
        b[offset::PIXDIM + 4 * k..offset::PIXDIM + 4 * k + 4].copy_from_slice(&f32b(1.5));
    }
    b[offset::VOX_OFFSET..offset::VOX_OFFSET + 4].copy_from_slice(&f32b(352.0));
    b[offset::MAGIC..offset::MAGIC + 4].copy_from_slice(b"n+1\0");
    b.extend_from_slice(payload);
    std::fs::write(path, b).unwrap();
}

#[test]
fn every_real_datatype_and_byte_order_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let want: Vec<f32> = vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 100.0];
    macro_rules! case {
        ($t:ty, $code:expr, $big:expr) => {{
            let mut payload = Vec::new();
            for &v in &want {
                let x = v as $t;
                payload.extend_from_slice(&if $big {
                    x.to_be_bytes()
                } else {
                    x.to_le_bytes()
                });
            }
            let path = dir.path().join(format!("{}-{}.nii", stringify!($t), $big));
            raw_file(
                &path,
                $code,
                (std::mem::size_of::<$t>() * 8) as i16,
                $big,
                &payload,
            );
            let img = read_image(&path).unwrap();
            assert_eq!(
                img.frames[0].data,
                want,
                "{} big-endian={}",
                stringify!($t),
                $big
            );
            assert_eq!(img.header.integer_type, $code != 16 && $code != 64);
            // No sform/qform codes: pixdim-scaled identity.
            assert_eq!(img.header.geometry.voxel_size, [1.5, 1.5, 1.5]);
        }};
    }
    case!(u8, 2, false);
    case!(i8, 256, false);
    case!(u16, 512, false);
    case!(i16, 4, false);
    case!(i16, 4, true);
    case!(u32, 768, false);
    case!(i32, 8, true);
    case!(i64, 1024, false);
    case!(u64, 1280, false);
    case!(f32, 16, true);
    case!(f64, 64, false);
    case!(f64, 64, true);
}

#[test]
fn complex_and_rgb_data_are_refused_with_the_type_named() {
    let dir = tempfile::tempdir().unwrap();
    for (code, name) in [(32i16, "complex64"), (1792, "complex128"), (128, "RGB24")] {
        let path = dir.path().join(format!("c{code}.nii"));
        raw_file(&path, code, 64, false, &[0u8; 8 * 16]);
        let msg = input_message(read_image(&path));
        assert!(msg.contains(name) && msg.contains("real"), "{msg}");
        assert!(read_header(&path).is_err());
    }
}

#[test]
fn truncated_files_are_input_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let vol = ramp([10, 10, 10], oblique_geometry(false), 0.0);
    for name in ["t.nii", "t.nii.gz"] {
        let path = dir.path().join(name);
        write_volume(&path, &vol).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len * 2 / 3).unwrap();
        drop(f);
        let msg = input_message(read_image(&path));
        assert!(msg.contains(name), "{msg}");
        assert!(msg.contains("truncated"), "{msg}");
    }
    // A truncated 4D file: the last frame is short.
    let path = dir.path().join("t4.nii");
    write_volume_i16(&path, &[&vol, &vol]).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    assert!(input_message(read_image(&path)).contains("truncated"));
    // Shorter than a header.
    let path = dir.path().join("short.nii");
    std::fs::write(&path, [0u8; 100]).unwrap();
    let msg = input_message(read_image(&path));
    assert!(
        msg.contains("short.nii") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn non_nifti_and_missing_files_are_input_errors() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("notes.nii");
    std::fs::write(&text, "this is not an image\n".repeat(40)).unwrap();
    let msg = input_message(read_image(&text));
    assert!(
        msg.contains("notes.nii") && msg.contains("not a NIfTI"),
        "{msg}"
    );

    // Gzip of garbage, and a file named .nii.gz that is not compressed at all.
    let gz = dir.path().join("garbage.nii.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&[7u8; 500]).unwrap();
    std::fs::write(&gz, enc.finish().unwrap()).unwrap();
    assert!(input_message(read_image(&gz)).contains("not a NIfTI"));
    let plain = dir.path().join("plain.nii.gz");
    std::fs::write(&plain, [1u8; 400]).unwrap();
    assert!(input_message(read_image(&plain)).contains("not a NIfTI"));

    let bad_gz = dir.path().join("badgz.nii.gz");
    std::fs::write(
        &bad_gz,
        [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3, 0xff, 0xff, 0xff, 0xff],
    )
    .unwrap();
    let msg = input_message(read_image(&bad_gz));
    assert!(
        msg.contains("badgz.nii.gz") && msg.contains("corrupt"),
        "{msg}"
    );

    let nifti2 = dir.path().join("two.nii");
    let mut b = vec![0u8; 600];
    b[0..4].copy_from_slice(&540i32.to_le_bytes());
    b[4..8].copy_from_slice(b"n+2\0");
    std::fs::write(&nifti2, b).unwrap();
    assert!(input_message(read_image(&nifti2)).contains("NIfTI-2"));

    let pair = dir.path().join("pair.nii");
    write_volume(&pair, &ramp([2, 2, 2], oblique_geometry(false), 0.0)).unwrap();
    patch(&pair, offset::MAGIC, b"ni1\0");
    assert!(input_message(read_image(&pair)).contains(".hdr/.img"));

    let empty = dir.path().join("empty.nii");
    std::fs::write(&empty, []).unwrap();
    assert!(input_message(read_image(&empty)).contains("empty"));

    let missing = dir.path().join("missing.nii.gz");
    let msg = input_message(read_image(&missing));
    assert!(
        msg.contains("missing.nii.gz") && msg.contains("does not exist"),
        "{msg}"
    );
    assert!(read_header(&missing).is_err());
}

#[test]
fn compression_is_recognised_by_content_not_name() {
    let dir = tempfile::tempdir().unwrap();
    let vol = ramp([3, 4, 5], oblique_geometry(false), 0.0);
    let gz = dir.path().join("real.nii.gz");
    write_volume(&gz, &vol).unwrap();
    let misnamed = dir.path().join("misnamed.nii");
    std::fs::rename(&gz, &misnamed).unwrap();
    assert_eq!(read_image(&misnamed).unwrap().frames[0].data, vol.data);
}

#[test]
fn corrupt_gzip_stream_is_an_input_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.nii.gz");
    write_volume(&path, &ramp([20, 20, 20], oblique_geometry(false), 0.0)).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, bytes).unwrap();
    // Either the deflate stream or its CRC catches the damage; both must be clean errors.
    let msg = input_message(read_image(&path));
    assert!(msg.contains("c.nii.gz") && msg.contains("corrupt"), "{msg}");
}

#[test]
fn dimensionality_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let vol = ramp([2, 3, 4], oblique_geometry(false), 0.0);
    let path = dir.path().join("d.nii");
    let set_dims = |dims: [i16; 8]| {
        write_volume(&path, &vol).unwrap();
        for (k, d) in dims.into_iter().enumerate() {
            patch(&path, offset::DIM + 2 * k, &d.to_le_bytes());
        }
    };
    set_dims([2, 6, 4, 1, 1, 1, 1, 1]);
    assert!(input_message(read_image(&path)).contains("2D"));
    set_dims([5, 2, 3, 2, 1, 2, 1, 1]);
    assert!(input_message(read_image(&path)).contains("5D"));
    // Trailing singleton dimensions are accepted: this is the same 3D volume.
    set_dims([5, 2, 3, 4, 1, 1, 1, 1]);
    let img = read_image(&path).unwrap();
    assert_eq!((img.header.dims, img.header.frames), ([2, 3, 4], 1));
    assert_eq!(img.frames[0].data, vol.data);
    set_dims([3, 2, -3, 4, 1, 1, 1, 1]);
    assert!(input_message(read_image(&path)).contains("corrupt"));
    set_dims([9, 2, 3, 4, 1, 1, 1, 1]);
    assert!(read_image(&path).is_err());
}

#[test]
fn extensions_before_the_data_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let vol = ramp([2, 3, 4], oblique_geometry(false), 0.0);
    let path = dir.path().join("ext.nii");
    write_volume(&path, &vol).unwrap();
    let mut b = std::fs::read(&path).unwrap();
    // One 32-byte extension (esize 32, ecode 6 = comment) after a non-zero extender.
    let mut ext = vec![0u8; 32];
    ext[0..4].copy_from_slice(&32i32.to_le_bytes());
    ext[4..8].copy_from_slice(&6i32.to_le_bytes());
    b[348] = 1;
    b.splice(352..352, ext);
    b[offset::VOX_OFFSET..offset::VOX_OFFSET + 4].copy_from_slice(&384f32.to_le_bytes());
    std::fs::write(&path, b).unwrap();
    assert_eq!(read_image(&path).unwrap().frames[0].data, vol.data);
}

#[test]
fn atomic_write_leaves_only_the_target_and_failures_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let vol = ramp([3, 4, 5], oblique_geometry(false), 0.0);
    write_volume(&dir.path().join("x.nii.gz"), &vol).unwrap();
    write_volume_i16(&dir.path().join("y.nii"), &[&vol]).unwrap();
    // Overwriting an existing file replaces it.
    let other = ramp([3, 4, 5], oblique_geometry(false), 9.0);
    write_volume(&dir.path().join("x.nii.gz"), &other).unwrap();
    assert_eq!(
        read_image(&dir.path().join("x.nii.gz")).unwrap().frames[0].data,
        other.data
    );
    assert_eq!(entries(dir.path()), ["x.nii.gz", "y.nii"]);

    // Missing directory: a clear error, nothing created.
    let missing = dir.path().join("no_such_dir").join("z.nii.gz");
    let err = write_volume(&missing, &vol).unwrap_err().to_string();
    assert!(
        err.contains("does not exist") && err.contains("no_such_dir"),
        "{err}"
    );
    assert_eq!(entries(dir.path()), ["x.nii.gz", "y.nii"]);

    // The rename fails (a directory holds the name): the temporary file must be cleaned up.
    std::fs::create_dir(dir.path().join("blocked.nii")).unwrap();
    std::fs::write(dir.path().join("blocked.nii").join("keep"), "x").unwrap();
    assert!(write_volume(&dir.path().join("blocked.nii"), &vol).is_err());
    assert_eq!(entries(dir.path()), ["blocked.nii", "x.nii.gz", "y.nii"]);

    // Data that does not match the dims is refused before anything is written.
    let broken = Volume {
        dims: [3, 4, 6],
        data: vol.data.clone(),
        geometry: vol.geometry.clone(),
    };
    assert!(write_volume(&dir.path().join("broken.nii"), &broken).is_err());
    // A name that is neither .nii nor .nii.gz is refused before anything is written.
    assert!(write_volume(&dir.path().join("w.img"), &vol).is_err());
    assert_eq!(entries(dir.path()), ["blocked.nii", "x.nii.gz", "y.nii"]);
}

#[test]
fn temp_name_keeps_the_extension_and_is_hidden() {
    let t = temp_path(Path::new("/d/sub-01_Chimap.nii.gz"), true);
    let name = t.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(".sub-01_Chimap.partial-") && name.ends_with(".nii.gz"),
        "{name}"
    );
    assert_eq!(t.parent(), Some(Path::new("/d")));
    let t = temp_path(Path::new("m.nii"), false);
    let name = t.to_string_lossy().into_owned();
    assert!(name.starts_with(".m.partial-") && name.ends_with(".nii") && !name.ends_with(".gz"));
}

#[test]
fn romeo_small_phase_has_three_echoes_if_present() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/romeo_small/small_Phase.nii");
    let path = if path.exists() {
        path
    } else {
        PathBuf::from("/work/shared/data/romeo_small/small_Phase.nii")
    };
    if !path.exists() {
        eprintln!("skipping: {} is absent", path.display());
        return;
    }
    let img = read_image(&path).unwrap();
    assert_eq!(img.header.dims, [51, 51, 41]);
    assert_eq!(img.header.frames, 3);
    assert_eq!(img.frames.len(), 3);
    assert!(
        (img.header.geometry.voxel_size[0] - 0.469).abs() < 0.01,
        "{:?}",
        img.header.geometry
    );
    assert!(img.frames.iter().all(|f| f.data.iter().any(|&v| v != 0.0)));
}

/// Reads the 1 mm MNI head (when present) and prints the time; run with `--ignored`.
#[test]
#[ignore]
fn read_speed_of_a_1mm_head() {
    let path = Path::new("/work/shared/data/mni_phantom/chi_head.nii.gz");
    if !path.exists() {
        eprintln!("skipping: {} is absent", path.display());
        return;
    }
    // Decompression alone, the floor for reading a .nii.gz.
    let t = std::time::Instant::now();
    let _ = gunzip(path);
    let inflate = t.elapsed();
    let t = std::time::Instant::now();
    let img = read_image(path).unwrap();
    let read = t.elapsed();
    let dir = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    write_volume(&dir.path().join("w.nii.gz"), &img.frames[0]).unwrap();
    let write_gz = t.elapsed();
    let t = std::time::Instant::now();
    write_volume(&dir.path().join("w.nii"), &img.frames[0]).unwrap();
    let write = t.elapsed();
    let t = std::time::Instant::now();
    let _ = read_image(&dir.path().join("w.nii")).unwrap();
    let read_nii = t.elapsed();
    eprintln!(
        "dims {:?}: inflate only {inflate:?}, read .nii.gz {read:?}, read .nii {read_nii:?}, write .nii.gz {write_gz:?}, write .nii {write:?}",
        img.header.dims
    );
}
