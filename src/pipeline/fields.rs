//! Loading an acquisition's inputs into memory: echoes, precomputed field maps (converted to
//! ppm from the units of their sidecar) and masks, with grid checks that name the files.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;

use crate::bids::{Echo, FieldUnits};
use crate::physics::units;
use crate::{io, Error, Mask, Result, Volume};

/// The echoes of a raw series, in echo-time order.
pub struct Echoes {
    pub phase: Vec<Volume>,
    /// One per echo, or empty when the dataset has no magnitude.
    pub magnitude: Vec<Volume>,
    pub echo_times: Vec<f64>,
    /// The on-disk phase type was an integer type (scanner units likely).
    pub integer_phase: bool,
    pub phase_paths: Vec<std::path::PathBuf>,
}

/// The volume of `path` that one echo names: frame `frame` of a 4D file, or a 3D file's only
/// volume. `frames` are the file's volumes, each handed out once.
fn frame_of(path: &Path, frames: &mut [Option<Volume>], frame: Option<usize>) -> Result<Volume> {
    let n = frames.len();
    let slot = match frame {
        Some(f) if f < n => &mut frames[f],
        Some(f) => {
            return Err(Error::input(path, format!("has {n} volume(s) but the sidecar lists an echo for volume {}", f + 1)))
        }
        None if n == 1 => &mut frames[0],
        None => {
            return Err(Error::input(path, format!("is 4D ({n} volumes) but is named as one echo: split it, or drop `echo-` and list all EchoTimes in its sidecar")))
        }
    };
    slot.take().ok_or_else(|| {
        Error::input(
            path,
            "has one volume listed for two echoes: check the EchoTime lists of its sidecars",
        )
    })
}

/// The only volume of a 3D file.
fn single_volume(path: &Path) -> Result<Volume> {
    let mut frames: Vec<Option<Volume>> =
        io::read_image(path)?.frames.into_iter().map(Some).collect();
    frame_of(path, &mut frames, None)
}

pub fn load_echoes(echoes: &[Echo]) -> Result<Echoes> {
    let with_magnitude = echoes.iter().all(|e| e.magnitude.is_some());
    // Every file is read once (a 4D file holds all echoes) and the files in parallel:
    // decompression dominates loading and is sequential within a file.
    let mut paths: Vec<&Path> = Vec::new();
    for e in echoes {
        let mag = e.magnitude.as_deref().filter(|_| with_magnitude);
        for p in std::iter::once(e.phase.as_path()).chain(mag) {
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
    }
    let read: Vec<Result<io::Image>> = paths.par_iter().map(|p| io::read_image(p)).collect();
    let mut files: HashMap<&Path, (Vec<Option<Volume>>, bool)> = HashMap::new();
    for (p, image) in paths.iter().zip(read) {
        let image = image?;
        let integer = image.header.integer_type;
        files.insert(p, (image.frames.into_iter().map(Some).collect(), integer));
    }

    let mut out = Echoes {
        phase: Vec::new(),
        magnitude: Vec::new(),
        echo_times: Vec::new(),
        integer_phase: false,
        phase_paths: Vec::new(),
    };
    for e in echoes {
        let (frames, integer) = files.get_mut(e.phase.as_path()).expect("read above");
        out.integer_phase |= *integer;
        let p = frame_of(&e.phase, frames, e.frame)?;
        if let Some(first) = out.phase.first() {
            same_grid(first, &p, &out.phase_paths[0], &e.phase)?;
        }
        if with_magnitude {
            let mpath = e.magnitude.as_deref().expect("checked above");
            let (frames, _) = files.get_mut(mpath).expect("read above");
            let m = frame_of(mpath, frames, e.frame)?;
            same_grid(&p, &m, &e.phase, mpath)?;
            out.magnitude.push(m);
        }
        out.phase.push(p);
        out.echo_times.push(e.echo_time);
        out.phase_paths.push(e.phase.clone());
    }
    Ok(out)
}

/// Errors unless `b` has the grid of `a` (dims and, within 0.1 %, voxel size).
pub fn same_grid(a: &Volume, b: &Volume, path_a: &Path, path_b: &Path) -> Result<()> {
    let vox_ok = a
        .geometry
        .voxel_size
        .iter()
        .zip(&b.geometry.voxel_size)
        .all(|(x, y)| (x - y).abs() <= 1e-3 * x.abs().max(1e-6));
    if a.dims != b.dims || !vox_ok {
        return Err(Error::input(
            path_b,
            format!(
                "grid {:?} with voxels {:?} mm does not match {} ({:?}, {:?} mm): all echoes, magnitude and phase must share one grid",
                b.dims,
                b.geometry.voxel_size,
                path_a.display(),
                a.dims,
                a.geometry.voxel_size
            ),
        ));
    }
    Ok(())
}

/// A field map in ppm, converted from `units`.
pub fn load_field_ppm(
    path: &Path,
    units_: FieldUnits,
    echo_time: Option<f64>,
    b0_tesla: Option<f64>,
) -> Result<Volume> {
    let mut vol = single_volume(path)?;
    if let Some(bad) = vol.data.iter().position(|v| !v.is_finite()) {
        return Err(Error::input(
            path,
            format!(
                "contains NaN or Inf (first at voxel {bad}): set voxels outside the brain to 0"
            ),
        ));
    }
    let need_b0 = || {
        b0_tesla.ok_or_else(|| {
            Error::input(path, "MagneticFieldStrength is missing from the sidecar: add it (in tesla) or pass --field-strength")
        })
    };
    let scale = match units_ {
        FieldUnits::Ppm => 1.0,
        FieldUnits::Hz => 1.0 / units::hz_per_ppm(need_b0()?),
        FieldUnits::RadPerSecond => units::rad_per_s_to_hz(1.0) / units::hz_per_ppm(need_b0()?),
        FieldUnits::Rad => {
            let te = echo_time.ok_or_else(|| {
                Error::input(
                    path,
                    "is in rad but its sidecar has no EchoTime: add EchoTime (s)",
                )
            })?;
            units::rad_to_hz(1.0, te) / units::hz_per_ppm(need_b0()?)
        }
    };
    vol.data
        .iter_mut()
        .for_each(|v| *v = (*v as f64 * scale) as f32);
    Ok(vol)
}

/// A binary mask (voxels > 0.5) on the grid of `like`.
pub fn load_mask(path: &Path, like: &Volume, like_path: &Path) -> Result<Mask> {
    let m = single_volume(path)?;
    same_grid(like, &m, like_path, path)?;
    let mask: Mask = m.data.iter().map(|&v| v > 0.5).collect();
    if !mask.iter().any(|&b| b) {
        return Err(Error::input(
            path,
            "the mask is empty: it must mark the brain with values of 1",
        ));
    }
    Ok(mask)
}

/// Largest corner displacement (mm) between a user's mask and its data that still counts as
/// the same grid: below half a typical voxel, so a mask never lands one voxel off.
const USER_MASK_MAX_MISMATCH_MM: f64 = 0.5;

/// A user's brain mask (voxels > 0.5) on the grid of `like`. Unlike masks that another
/// pipeline wrote beside its field maps, a mask brought from elsewhere is easily one of
/// another series, a template or a probability map, so beyond the dims its placement, frame
/// count and content are checked; every error names both files.
pub fn load_user_mask(path: &Path, like: &Volume, like_path: &Path) -> Result<Mask> {
    let bad = |what: String| {
        Error::input(
            path,
            format!(
                "{what}; the brain mask must be one 3D image on the grid of {}",
                like_path.display()
            ),
        )
    };
    let mut image = io::read_image(path)?;
    if image.frames.len() != 1 {
        return Err(bad(format!(
            "is 4D ({} volumes), not one brain mask",
            image.frames.len()
        )));
    }
    let m = image.frames.remove(0);
    if m.dims != like.dims {
        return Err(bad(format!(
            "has dimensions {:?} but the data has {:?}",
            m.dims, like.dims
        )));
    }
    let mm = crate::qc::protocol::grid_mismatch_mm(&like.geometry, &m.geometry, like.dims);
    if mm.is_nan() || mm > USER_MASK_MAX_MISMATCH_MM {
        return Err(bad(format!(
            "has the data's dimensions but another position or orientation (its affine places \
             a corner {mm:.1} mm away): resample it onto the data"
        )));
    }
    let mask: Mask = m.data.iter().map(|&v| v > 0.5).collect();
    let inside = mask.iter().filter(|&&b| b).count();
    if inside == 0 {
        return Err(bad(
            "is empty (no voxel above 0.5): it must mark the brain with 1".into(),
        ));
    }
    if inside == mask.len() {
        return Err(bad(
            "marks every voxel: that is the whole field of view, not a brain mask".into(),
        ));
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Geometry;

    #[test]
    fn echoes_come_from_4d_files_frame_by_frame_and_from_3d_files() {
        let dir = tempfile::tempdir().unwrap();
        let geo = Geometry::from_voxel_size([1.0; 3]);
        let vol = |base: f32| {
            Volume::new(
                [2, 2, 1],
                vec![base, base + 1.0, base + 2.0, base + 3.0],
                geo.clone(),
            )
        };
        let frames: Vec<Volume> = (0..3).map(|e| vol(10.0 * e as f32)).collect();
        let refs: Vec<&Volume> = frames.iter().collect();
        let phase4d = dir.path().join("phase.nii.gz");
        let mag4d = dir.path().join("mag.nii.gz");
        io::write_volume_i16(&phase4d, &refs).unwrap();
        io::write_volume_i16(&mag4d, &refs).unwrap();
        // Echoes listed out of frame order: each takes its own frame.
        let echo = |t: f64, f: usize| Echo {
            echo_time: t,
            phase: phase4d.clone(),
            magnitude: Some(mag4d.clone()),
            frame: Some(f),
        };
        let got = load_echoes(&[echo(0.004, 0), echo(0.012, 2), echo(0.008, 1)]).unwrap();
        assert!(got.integer_phase);
        let firsts: Vec<f32> = got.phase.iter().map(|v| v.data[0]).collect();
        assert_eq!(firsts, [0.0, 20.0, 10.0]);
        let mags: Vec<f32> = got.magnitude.iter().map(|v| v.data[3]).collect();
        assert_eq!(mags, [3.0, 23.0, 13.0]);
        assert_eq!(got.echo_times, [0.004, 0.012, 0.008]);

        // A frame named twice, or beyond the file, is an error naming the file.
        let err = load_echoes(&[echo(0.004, 1), echo(0.008, 1)])
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("phase.nii.gz") && err.contains("two echoes"),
            "{err}"
        );
        let err = load_echoes(&[echo(0.004, 3)]).err().unwrap().to_string();
        assert!(
            err.contains("phase.nii.gz") && err.contains("volume 4"),
            "{err}"
        );

        // 3D files without magnitude: one per echo.
        let paths: Vec<_> = (0..2)
            .map(|e| {
                let p = dir.path().join(format!("echo{e}.nii.gz"));
                io::write_volume(&p, &frames[e]).unwrap();
                p
            })
            .collect();
        let echoes: Vec<Echo> = paths
            .iter()
            .enumerate()
            .map(|(e, p)| Echo {
                echo_time: 0.004 * (e + 1) as f64,
                phase: p.clone(),
                magnitude: None,
                frame: None,
            })
            .collect();
        let got = load_echoes(&echoes).unwrap();
        assert!(!got.integer_phase && got.magnitude.is_empty());
        assert_eq!(got.phase[1].data, frames[1].data);
        assert_eq!(got.phase_paths, paths);
    }

    #[test]
    fn field_maps_convert_to_ppm_from_every_unit() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.nii.gz");
        let hz = units::hz_per_ppm(3.0) as f32; // 1 ppm at 3 T
        io::write_volume(
            &p,
            &Volume::new(
                [2, 1, 1],
                vec![hz, -hz],
                Geometry::from_voxel_size([1.0; 3]),
            ),
        )
        .unwrap();
        let v = load_field_ppm(&p, FieldUnits::Hz, None, Some(3.0)).unwrap();
        assert!((v.data[0] - 1.0).abs() < 1e-5 && (v.data[1] + 1.0).abs() < 1e-5);
        let v = load_field_ppm(&p, FieldUnits::RadPerSecond, None, Some(3.0)).unwrap();
        assert!((v.data[0] as f64 - 1.0 / (2.0 * std::f64::consts::PI)).abs() < 1e-5);
        let v = load_field_ppm(&p, FieldUnits::Rad, Some(0.01), Some(3.0)).unwrap();
        let want = units::rad_to_hz(hz as f64, 0.01) / hz as f64;
        assert!((v.data[0] as f64 - want).abs() < 1e-4 * want.abs());
        let v = load_field_ppm(&p, FieldUnits::Ppm, None, None).unwrap();
        assert_eq!(v.data[0], hz);
        let err = load_field_ppm(&p, FieldUnits::Hz, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.nii.gz") && err.contains("--field-strength"),
            "{err}"
        );
        let err = load_field_ppm(&p, FieldUnits::Rad, None, Some(3.0))
            .unwrap_err()
            .to_string();
        assert!(err.contains("EchoTime"), "{err}");
    }

    #[test]
    fn empty_or_mismatched_masks_are_rejected_with_the_file_named() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::from_voxel_size([1.0; 3]);
        let like = Volume::new([2, 2, 1], vec![0.0; 4], g.clone());
        let empty = dir.path().join("empty_mask.nii.gz");
        io::write_volume(&empty, &like).unwrap();
        let err = load_mask(&empty, &like, Path::new("f.nii"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("empty_mask") && err.contains("empty"), "{err}");
        let small = dir.path().join("small_mask.nii.gz");
        io::write_volume(&small, &Volume::new([1, 1, 1], vec![1.0], g)).unwrap();
        let err = load_mask(&small, &like, Path::new("f.nii"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not match"), "{err}");
    }

    #[test]
    fn user_masks_must_be_one_3d_brain_mask_on_the_data_grid() {
        let dir = tempfile::tempdir().unwrap();
        let g = Geometry::from_voxel_size([2.0; 3]);
        let like = Volume::new([4, 4, 2], vec![0.0; 32], g.clone());
        let data = Path::new("/d/phase.nii.gz");
        let write = |name: &str, v: &[&Volume]| {
            let p = dir.path().join(name);
            if v.len() == 1 {
                io::write_volume(&p, v[0]).unwrap();
            } else {
                io::write_volume_i16(&p, v).unwrap();
            }
            p
        };
        let mut inside = vec![0.0; 32];
        inside[5] = 1.0;
        inside[6] = 0.7;
        let good = Volume::new([4, 4, 2], inside, g.clone());
        let ok = write("ok_mask.nii.gz", &[&good]);
        let m = load_user_mask(&ok, &like, data).unwrap();
        assert_eq!(m.iter().filter(|&&b| b).count(), 2);

        // A shift of a fraction of a voxel passes; one of 1 mm (half a voxel) does not.
        let mut g_near = g.clone();
        g_near.affine[0][3] += 0.2;
        let near = write(
            "near_mask.nii.gz",
            &[&Volume::new(good.dims, good.data.clone(), g_near)],
        );
        load_user_mask(&near, &like, data).unwrap();
        let mut g_far = g.clone();
        g_far.affine[2][3] += 1.0;
        let far_mask = Volume::new(good.dims, good.data.clone(), g_far);
        let shifted = write("shifted_mask.nii.gz", &[&far_mask]);
        let cases = [
            (shifted, "position or orientation"),
            (
                write(
                    "small_mask.nii.gz",
                    &[&Volume::new([4, 4, 1], vec![1.0; 16], g.clone())],
                ),
                "dimensions [4, 4, 1]",
            ),
            (
                write("frames_mask.nii.gz", &[&good, &good]),
                "4D (2 volumes)",
            ),
            (
                write("empty_mask.nii.gz", &[&good.with_data(vec![0.0; 32])]),
                "is empty",
            ),
            (
                write("ones_mask.nii.gz", &[&good.with_data(vec![1.0; 32])]),
                "marks every voxel",
            ),
        ];
        for (path, why) in cases {
            let err = load_user_mask(&path, &like, data).unwrap_err().to_string();
            assert!(
                err.contains(name_of(&path)) && err.contains("phase.nii.gz") && err.contains(why),
                "{err}"
            );
        }
    }

    fn name_of(p: &Path) -> &str {
        p.file_name().unwrap().to_str().unwrap()
    }
}
