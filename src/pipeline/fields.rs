//! Loading an acquisition's inputs into memory: echoes, precomputed field maps (converted to
//! ppm from the units of their sidecar) and masks, with grid checks that name the files.

use std::path::Path;

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

fn frame_of(path: &Path, frame: Option<usize>) -> Result<(Volume, bool)> {
    let image = io::read_image(path)?;
    let integer = image.header.integer_type;
    let n = image.frames.len();
    let mut frames = image.frames;
    let vol = match frame {
        Some(f) if f < n => frames.swap_remove(f),
        Some(f) => {
            return Err(Error::input(path, format!("has {n} volume(s) but the sidecar lists an echo for volume {}", f + 1)))
        }
        None if n == 1 => frames.swap_remove(0),
        None => {
            return Err(Error::input(path, format!("is 4D ({n} volumes) but is named as one echo: split it, or drop `echo-` and list all EchoTimes in its sidecar")))
        }
    };
    Ok((vol, integer))
}

pub fn load_echoes(echoes: &[Echo]) -> Result<Echoes> {
    let mut out = Echoes {
        phase: Vec::new(),
        magnitude: Vec::new(),
        echo_times: Vec::new(),
        integer_phase: false,
        phase_paths: Vec::new(),
    };
    let with_magnitude = echoes.iter().all(|e| e.magnitude.is_some());
    for e in echoes {
        let (p, integer) = frame_of(&e.phase, e.frame)?;
        out.integer_phase |= integer;
        if let Some(first) = out.phase.first() {
            same_grid(first, &p, &out.phase_paths[0], &e.phase)?;
        }
        if with_magnitude {
            let mpath = e.magnitude.as_ref().expect("checked above");
            let (m, _) = frame_of(mpath, e.frame)?;
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
    let (mut vol, _) = frame_of(path, None)?;
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
    let (m, _) = frame_of(path, None)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Geometry;

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
}
