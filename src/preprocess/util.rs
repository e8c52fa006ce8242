//! Small numerical helpers shared by the preprocessing stages: phase wrapping, robust
//! statistics, Gaussian smoothing, and a fast exact spectrum of the SMV sphere.

use rayon::prelude::*;

use crate::physics::fft::{multiply_real, signed_index, Fft3};

use std::f32::consts::PI;

/// Wraps an angle to (−π, π].
#[inline]
pub fn wrap(x: f32) -> f32 {
    if x > -PI && x <= PI {
        return x;
    }
    let y = x - 2.0 * PI * ((x + PI) / (2.0 * PI)).floor();
    // `floor` puts y in [−π, π); move the −π end to +π so the range is (−π, π].
    if y <= -PI {
        y + 2.0 * PI
    } else {
        y
    }
}

/// The `q`-quantile (0..=1) of the values selected by `keep` (all when `None`); `None` when
/// nothing is selected. Copies the selection once and uses a linear-time selection.
pub fn quantile(values: &[f32], keep: Option<&[bool]>, q: f64) -> Option<f32> {
    let mut v: Vec<f32> = match keep {
        Some(k) => values
            .iter()
            .zip(k)
            .filter(|(_, &m)| m)
            .map(|(&x, _)| x)
            .collect(),
        None => values.to_vec(),
    };
    if v.is_empty() {
        return None;
    }
    let idx = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    let (_, x, _) = v.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    Some(*x)
}

/// Weighted median of small integers (e.g. numbers of 2π turns). Ties go to the lower value.
/// Returns 0 when the total weight is zero.
pub fn weighted_median_int(values: impl Iterator<Item = (i64, f64)>) -> i64 {
    let mut hist = std::collections::BTreeMap::<i64, f64>::new();
    let mut total = 0.0;
    for (v, w) in values {
        if w > 0.0 && w.is_finite() {
            *hist.entry(v).or_insert(0.0) += w;
            total += w;
        }
    }
    let mut acc = 0.0;
    for (v, w) in hist {
        acc += w;
        if acc >= 0.5 * total {
            return v;
        }
    }
    0
}

/// `exp(−2π² σ² |k|²)`: the Fourier transform of a Gaussian of standard deviation `sigma_mm`
/// sampled on the half spectrum of `Fft3` (periodic smoothing; 1 at DC).
pub fn gaussian_kernel(dims: [usize; 3], voxel_size: [f64; 3], sigma_mm: f64) -> Vec<f32> {
    let [nx, ny, nz] = dims;
    let nh = nx / 2 + 1;
    let c = -2.0 * std::f64::consts::PI.powi(2) * sigma_mm * sigma_mm;
    let axis = |n: usize, h: f64, m: usize| -> Vec<f64> {
        (0..m)
            .map(|i| {
                let k = signed_index(i, n) / (n as f64 * h);
                (c * k * k).exp()
            })
            .collect()
    };
    let gx = axis(nx, voxel_size[0], nh);
    let gy = axis(ny, voxel_size[1], ny);
    let gz = axis(nz, voxel_size[2], nz);
    let mut g = vec![0.0f32; nh * ny * nz];
    g.par_chunks_mut(nh * ny).enumerate().for_each(|(k, slab)| {
        for j in 0..ny {
            for i in 0..nh {
                slab[i + nh * j] = (gx[i] * gy[j] * gz[k]) as f32;
            }
        }
    });
    g
}

/// Gaussian smoothing of several real volumes with one plan and one kernel.
pub fn smooth(fft: &Fft3, kernel: &[f32], x: &[f32]) -> Vec<f32> {
    let mut s = fft.forward(x);
    multiply_real(&mut s, kernel);
    fft.inverse(&mut s)
}

/// The spectrum of `physics::kernels::sphere_real(dims, voxel_size, radius_mm)`, computed
/// without a 3D FFT.
///
/// The sphere is symmetric under each sign flip, so its DFT is a sum of products of cosines
/// and factorises into three small stages (Dirichlet sums along x, then y, then z); this
/// costs about `N·(R+1)` multiply-adds for a radius of `R` voxels instead of a full FFT.
/// Valid while the sphere spans less than half the grid along each axis (the periodic
/// sphere is then symmetric); `None` otherwise, so callers can fall back to the FFT.
pub fn sphere_kernel_fast(
    dims: [usize; 3],
    voxel_size: [f64; 3],
    radius_mm: f64,
) -> Option<Vec<f32>> {
    let [nx, ny, nz] = dims;
    let nh = nx / 2 + 1;
    let r2 = radius_mm * radius_mm + 1e-9;
    let reach = |h: f64| (radius_mm / h + 1e-9).floor().max(0.0) as usize;
    let (rx, ry, rz) = (
        reach(voxel_size[0]),
        reach(voxel_size[1]),
        reach(voxel_size[2]),
    );
    // The even-n grid has a lone +n/2 sample; require the sphere to stay clear of it.
    if 2 * rx >= nx || 2 * ry >= ny || 2 * rz >= nz {
        return None;
    }
    let tau = 2.0 * std::f64::consts::PI;
    // Half-width along x of the sphere's row at (y, z), or None when the row is empty.
    let half_x = |y: usize, z: usize| -> Option<usize> {
        let yz = (y as f64 * voxel_size[1]).powi(2) + (z as f64 * voxel_size[2]).powi(2);
        if yz > r2 {
            return None;
        }
        Some(((r2 - yz).sqrt() / voxel_size[0] + 1e-9).floor() as usize)
    };
    // cx[a][i] = Σ_{|x| ≤ a} cos(2π i x / nx): the x-sum of a row of half-width a.
    let mut cx = vec![vec![0.0f64; nh]; rx + 1];
    for i in 0..nh {
        let mut acc = 1.0;
        cx[0][i] = acc;
        for a in 1..=rx {
            acc += 2.0 * (tau * (i * a) as f64 / nx as f64).cos();
            cx[a][i] = acc;
        }
    }
    let mut count = 0usize;
    for z in 0..=rz {
        for y in 0..=ry {
            if let Some(a) = half_x(y, z) {
                let mult = if y == 0 { 1 } else { 2 } * if z == 0 { 1 } else { 2 };
                count += mult * (2 * a + 1);
            }
        }
    }
    // b[z][i + nh·j] = Σ_y cos(2π j y / ny) · cx[half_x(y, z)][i].
    let b: Vec<Vec<f64>> = (0..=rz)
        .into_par_iter()
        .map(|z| {
            let mut out = vec![0.0f64; nh * ny];
            for y in 0..=ry {
                let Some(a) = half_x(y, z) else { continue };
                let w = if y == 0 { 1.0 } else { 2.0 };
                for j in 0..ny {
                    let c = w * (tau * ((j * y) % ny) as f64 / ny as f64).cos();
                    let row = &mut out[nh * j..nh * (j + 1)];
                    for (o, &v) in row.iter_mut().zip(&cx[a]) {
                        *o += c * v;
                    }
                }
            }
            out
        })
        .collect();
    let inv = 1.0 / count as f64;
    let mut s = vec![0.0f32; nh * ny * nz];
    s.par_chunks_mut(nh * ny).enumerate().for_each(|(k, slab)| {
        let cz: Vec<f64> = (0..=rz)
            .map(|z| {
                let w = if z == 0 { 1.0 } else { 2.0 };
                w * (tau * ((k * z) % nz) as f64 / nz as f64).cos() * inv
            })
            .collect();
        for (idx, o) in slab.iter_mut().enumerate() {
            let mut acc = 0.0;
            for z in 0..=rz {
                acc += cz[z] * b[z][idx];
            }
            *o = acc as f32;
        }
    });
    Some(s)
}

/// The SMV spectrum, by the fast path when it applies and by FFT otherwise.
pub fn sphere_kernel_any(fft: &Fft3, voxel_size: [f64; 3], radius_mm: f64) -> Vec<f32> {
    sphere_kernel_fast(fft.dims(), voxel_size, radius_mm)
        .unwrap_or_else(|| crate::physics::kernels::sphere_kernel(fft, voxel_size, radius_mm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::physics::kernels::sphere_kernel;

    #[test]
    fn wrap_maps_into_half_open_interval() {
        for &(x, want) in &[
            (0.5f32, 0.5f32),
            (PI, PI),
            (-PI, PI),
            (3.0 * PI, PI),
            (2.0 * PI + 0.25, 0.25),
            (-2.0 * PI - 0.25, -0.25),
            (7.0, 7.0 - 2.0 * PI),
        ] {
            assert!((wrap(x) - want).abs() < 1e-5, "wrap({x}) = {}", wrap(x));
        }
    }

    #[test]
    fn fast_sphere_spectrum_matches_fft() {
        for (dims, vox, r) in [
            ([16, 12, 10], [1.0, 1.0, 1.5], 2.5),
            ([15, 20, 18], [1.2, 0.9, 1.0], 4.0),
            ([32, 32, 32], [2.0, 2.0, 2.0], 12.0),
        ] {
            let fft = Fft3::new(dims);
            let want = sphere_kernel(&fft, vox, r);
            let got = sphere_kernel_fast(dims, vox, r).expect("sphere fits");
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(err < 1e-5, "dims {dims:?} r {r}: max error {err}");
        }
        assert!(sphere_kernel_fast([16, 16, 16], [1.0; 3], 8.0).is_none());
    }

    #[test]
    fn gaussian_smoothing_preserves_mean_and_widens() {
        let dims = [32, 32, 32];
        let fft = Fft3::new(dims);
        let mut x = vec![0.0f32; 32 * 32 * 32];
        x[16 + 32 * (16 + 32 * 16)] = 1.0;
        let g = gaussian_kernel(dims, [1.0; 3], 2.0);
        let y = smooth(&fft, &g, &x);
        let sum: f32 = y.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4);
        // Variance along x of a σ = 2 mm Gaussian is 4 mm².
        let mut var = 0.0f64;
        for k in 0..32 {
            for j in 0..32 {
                for i in 0..32 {
                    var += y[i + 32 * (j + 32 * k)] as f64 * ((i as f64 - 16.0).powi(2));
                }
            }
        }
        assert!((var - 4.0).abs() < 0.05, "variance {var}");
    }

    #[test]
    fn quantiles_and_weighted_median() {
        let v: Vec<f32> = (0..101).map(|i| i as f32).collect();
        assert_eq!(quantile(&v, None, 0.5), Some(50.0));
        assert_eq!(quantile(&v, None, 0.9), Some(90.0));
        let keep: Vec<bool> = (0..101).map(|i| i < 11).collect();
        assert_eq!(quantile(&v, Some(&keep), 1.0), Some(10.0));
        assert_eq!(quantile(&v, Some(&[false; 101]), 0.5), None);
        let m = weighted_median_int([(0, 1.0), (1, 5.0), (-3, 2.0)].into_iter());
        assert_eq!(m, 1);
    }
}
