//! Other k-space multipliers used by the preprocessing: the spherical mean value (SMV)
//! kernel of background removal and the discrete Laplacian of phase unwrapping. Both are
//! real and even, laid out on the half spectrum of `Fft3`.

use super::fft::{signed_index, Fft3};

/// Voxels within `radius_mm` of the origin (with periodic wrap-around), normalised to sum 1:
/// the SMV kernel `S` in real space.
pub fn sphere_real(dims: [usize; 3], voxel_size: [f64; 3], radius_mm: f64) -> Vec<f32> {
    let [nx, ny, nz] = dims;
    let mut s = vec![0.0f32; nx * ny * nz];
    let mut count = 0usize;
    for k in 0..nz {
        let z = signed_index(k, nz) * voxel_size[2];
        for j in 0..ny {
            let y = signed_index(j, ny) * voxel_size[1];
            for i in 0..nx {
                let x = signed_index(i, nx) * voxel_size[0];
                if x * x + y * y + z * z <= radius_mm * radius_mm + 1e-9 {
                    s[i + nx * (j + ny * k)] = 1.0;
                    count += 1;
                }
            }
        }
    }
    let inv = 1.0 / count as f32;
    s.iter_mut().for_each(|v| *v *= inv);
    s
}

/// The SMV kernel `Ŝ(k)` on the half spectrum (real because the sphere is symmetric).
pub fn sphere_kernel(fft: &Fft3, voxel_size: [f64; 3], radius_mm: f64) -> Vec<f32> {
    fft.forward(&sphere_real(fft.dims(), voxel_size, radius_mm))
        .iter()
        .map(|c| c.re)
        .collect()
}

/// The 7-point discrete Laplacian (periodic) in k-space:
/// `L(k) = Σ_a (2 cos(2π f_a) − 2) / h_a²`, non-positive, zero only at DC.
pub fn laplacian_kernel(dims: [usize; 3], voxel_size: [f64; 3]) -> Vec<f32> {
    let [nx, ny, nz] = dims;
    let nh = nx / 2 + 1;
    let term = |idx: usize, n: usize, h: f64| {
        (2.0 * (2.0 * std::f64::consts::PI * idx as f64 / n as f64).cos() - 2.0) / (h * h)
    };
    let lx: Vec<f64> = (0..nh).map(|i| term(i, nx, voxel_size[0])).collect();
    let ly: Vec<f64> = (0..ny).map(|j| term(j, ny, voxel_size[1])).collect();
    let lz: Vec<f64> = (0..nz).map(|k| term(k, nz, voxel_size[2])).collect();
    let mut l = vec![0.0f32; nh * ny * nz];
    for k in 0..nz {
        for j in 0..ny {
            let row = nh * (j + ny * k);
            for i in 0..nh {
                l[row + i] = (lx[i] + ly[j] + lz[k]) as f32;
            }
        }
    }
    l
}

/// The same 7-point periodic Laplacian applied in real space (cheaper than two FFTs).
pub fn laplacian_real(x: &[f32], dims: [usize; 3], voxel_size: [f64; 3]) -> Vec<f32> {
    use rayon::prelude::*;
    let [nx, ny, nz] = dims;
    let w = voxel_size.map(|h| (1.0 / (h * h)) as f32);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(nx * ny)
        .enumerate()
        .for_each(|(k, slab)| {
            let (kp, km) = ((k + 1) % nz, (k + nz - 1) % nz);
            for j in 0..ny {
                let (jp, jm) = ((j + 1) % ny, (j + ny - 1) % ny);
                for i in 0..nx {
                    let (ip, im) = ((i + 1) % nx, (i + nx - 1) % nx);
                    let at = |a: usize, b: usize, c: usize| x[a + nx * (b + ny * c)];
                    let c = at(i, j, k);
                    slab[i + nx * j] = w[0] * (at(ip, j, k) + at(im, j, k) - 2.0 * c)
                        + w[1] * (at(i, jp, k) + at(i, jm, k) - 2.0 * c)
                        + w[2] * (at(i, j, kp) + at(i, j, km) - 2.0 * c);
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sphere_kernel_is_one_at_dc_and_matches_real_space_convolution() {
        let dims = [16, 12, 10];
        let vox = [1.0, 1.0, 1.5];
        let fft = Fft3::new(dims);
        let s = sphere_kernel(&fft, vox, 2.5);
        assert!((s[0] - 1.0).abs() < 1e-6);
        // Filtering a delta gives back the (normalised) sphere itself.
        let mut delta = vec![0.0; 16 * 12 * 10];
        delta[0] = 1.0;
        let got = fft.filter(&delta, &s);
        let want = sphere_real(dims, vox, 2.5);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6);
        }
        // 2.5 mm with 1×1×1.5 mm voxels. In-plane (z = 0): x² + y² ≤ 6.25 holds for 21
        // points (centre, 4 at distance 1, 4 at 2, 4 at √2, 8 at √5). At z = ±1.5 mm:
        // x² + y² ≤ 4 holds for 13 points each.
        let n = want.iter().filter(|&&v| v > 0.0).count();
        assert_eq!(n, 21 + 2 * 13);
    }

    #[test]
    fn laplacian_kernel_matches_finite_differences() {
        let dims = [8, 6, 5];
        let vox = [1.0, 2.0, 0.5];
        let fft = Fft3::new(dims);
        let l = laplacian_kernel(dims, vox);
        let n = 8 * 6 * 5;
        let x: Vec<f32> = (0..n).map(|v| ((v * 37 % 11) as f32 - 5.0) * 0.1).collect();
        let got = fft.filter(&x, &l);
        let at = |i: isize, j: isize, k: isize| {
            let w = |v: isize, n: usize| v.rem_euclid(n as isize) as usize;
            x[w(i, 8) + 8 * (w(j, 6) + 6 * w(k, 5))] as f64
        };
        let real = laplacian_real(&x, dims, vox);
        for (a, b) in real.iter().zip(&got) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        for k in 0..5isize {
            for j in 0..6isize {
                for i in 0..8isize {
                    let c = at(i, j, k);
                    let want = (at(i + 1, j, k) + at(i - 1, j, k) - 2.0 * c) / 1.0
                        + (at(i, j + 1, k) + at(i, j - 1, k) - 2.0 * c) / 4.0
                        + (at(i, j, k + 1) + at(i, j, k - 1) - 2.0 * c) / 0.25;
                    let g = got[(i + 8 * (j + 6 * k)) as usize] as f64;
                    assert!((g - want).abs() < 1e-4, "{g} vs {want}");
                }
            }
        }
    }
}
