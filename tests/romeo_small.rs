//! The unwrapping check of issue 10 on real multi-echo data: `../shared/data/romeo_small`
//! (51×51×41, 3 echoes at 4, 8, 12 ms; the small test set of ROMEO.jl). The unwrapped echoes
//! must differ by a field linear in TE (small residual inside a magnitude mask) and re-wrap
//! to the input exactly. Skipped, with a message, where the shared data are absent; the
//! folder holding `data/` can be given by `CHIMAP_SHARED` (default `../shared`).

use std::path::{Path, PathBuf};

use chimap::io::read_image;
use chimap::preprocess::echo_fit::{fit_field, EchoFitConfig};
use chimap::preprocess::unwrap::romeo::unwrap_echoes;
use chimap::preprocess::unwrap::{UnwrapConfig, UnwrapMethod};
use chimap::Volume;

const TAU: f32 = 2.0 * std::f32::consts::PI;

fn data_dir() -> Option<PathBuf> {
    let shared = std::env::var_os("CHIMAP_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    let dir = shared.join("data/romeo_small");
    dir.join("small_Phase.nii").is_file().then_some(dir)
}

/// Phase frames in radians (p / max|p| · π, as the data set's README says) and magnitudes.
fn load(dir: &Path) -> (Vec<Volume>, Vec<Volume>) {
    let phase = read_image(&dir.join("small_Phase.nii")).unwrap().frames;
    let mag = read_image(&dir.join("small_Mag.nii")).unwrap().frames;
    let max = phase
        .iter()
        .flat_map(|v| v.data.iter())
        .fold(0.0f32, |m, &p| m.max(p.abs()));
    let phase = phase
        .iter()
        .map(|v| {
            v.with_data(
                v.data
                    .iter()
                    .map(|&p| p / max * std::f32::consts::PI)
                    .collect(),
            )
        })
        .collect();
    (phase, mag)
}

/// Voxels whose echo-1 magnitude is at least `frac` of its 99th percentile.
fn magnitude_mask(mag: &Volume, frac: f32) -> Vec<bool> {
    let mut s = mag.data.clone();
    s.sort_by(|a, b| a.total_cmp(b));
    let p99 = s[(s.len() - 1) * 99 / 100];
    mag.data.iter().map(|&m| m >= frac * p99).collect()
}

#[test]
fn romeo_small_unwraps_linear_in_te_and_rewraps_exactly() {
    let Some(dir) = data_dir() else {
        eprintln!(
            "SKIPPED romeo_small check: ../shared/data/romeo_small not found \
             (set CHIMAP_SHARED to the folder that holds data/romeo_small to run it)"
        );
        return;
    };
    let (phase, mag) = load(&dir);
    assert_eq!(phase.len(), 3);
    let dims = phase[0].dims;
    let te = [4.0f32, 8.0, 12.0];
    let mask = magnitude_mask(&mag[0], 0.3);
    let n_mask = mask.iter().filter(|&&b| b).count();
    assert!(
        n_mask > dims.iter().product::<usize>() / 4,
        "mask of {n_mask} voxels"
    );

    // ROMEO's template mode on the raw phase (no offset removal: a line in TE per voxel).
    let p: Vec<&[f32]> = phase.iter().map(|v| v.data.as_slice()).collect();
    let m: Vec<&[f32]> = mag.iter().map(|v| v.data.as_slice()).collect();
    let cfg = UnwrapConfig::default().romeo;
    let (out, regions) = unwrap_echoes(dims, &p, Some(&m), &te, None, false, &cfg).unwrap();

    // Re-wrapping reproduces the input: only whole turns were added.
    for e in 0..3 {
        for (v, (&o, &i)) in out[e].iter().zip(p[e]).enumerate() {
            let k = (o - i) / TAU;
            assert!(
                (k - k.round()).abs() < 1e-5,
                "echo {} voxel {v}: not whole turns",
                e + 1
            );
        }
    }

    // Linear in TE: the residual of a least-squares line φ = a + b·TE per voxel (one spare
    // degree of freedom with three echoes). A wrong turn in one echo leaves ≥ 2π/√6 ≈ 2.6 rad.
    let mut rms: Vec<f32> = (0..out[0].len())
        .filter(|&v| mask[v])
        .map(|v| {
            let mean_t = te.iter().sum::<f32>() / 3.0;
            let mean_p = (0..3).map(|e| out[e][v]).sum::<f32>() / 3.0;
            let stt: f32 = te.iter().map(|t| (t - mean_t).powi(2)).sum();
            let b = (0..3)
                .map(|e| (te[e] - mean_t) * (out[e][v] - mean_p))
                .sum::<f32>()
                / stt;
            let r2: f32 = (0..3)
                .map(|e| (out[e][v] - mean_p - b * (te[e] - mean_t)).powi(2))
                .sum();
            (r2 / 3.0).sqrt()
        })
        .collect();
    rms.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| rms[((rms.len() - 1) as f64 * f) as usize];
    let turn_errors = rms.iter().filter(|&&r| r > 1.0).count();
    eprintln!(
        "romeo_small: {regions} regions; residual of the line in TE inside the mask \
         ({n_mask} voxels): median {:.3} rad, 99th percentile {:.3} rad, {turn_errors} voxels \
         ({:.2} %) above 1 rad",
        q(0.5),
        q(0.99),
        100.0 * turn_errors as f64 / n_mask as f64
    );
    assert!(q(0.5) < 0.1, "median residual {} rad", q(0.5));
    assert!(
        (turn_errors as f64) < 0.01 * n_mask as f64,
        "{turn_errors} of {n_mask} voxels with turn errors"
    );

    // The same through the echo fit (offset removed, field through the origin): its residual
    // measures the same linearity.
    let romeo = UnwrapConfig {
        method: UnwrapMethod::Romeo,
        ..Default::default()
    };
    let te_s: Vec<f64> = te.iter().map(|&t| t as f64 * 1e-3).collect();
    let fit = fit_field(&phase, Some(&mag), &te_s, &EchoFitConfig::default(), &romeo).unwrap();
    let mut res: Vec<f32> = (0..mask.len())
        .filter(|&v| mask[v])
        .map(|v| fit.residual_rad.data[v])
        .collect();
    res.sort_by(|a, b| a.total_cmp(b));
    let big = res.iter().filter(|&&r| r > 1.0).count();
    eprintln!(
        "romeo_small through fit_field: residual median {:.3} rad, 99th percentile {:.3} rad, \
         {big} voxels above 1 rad",
        res[res.len() / 2],
        res[(res.len() - 1) * 99 / 100]
    );
    assert!((big as f64) < 0.01 * n_mask as f64);
}
