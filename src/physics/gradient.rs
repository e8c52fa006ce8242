//! The discrete gradient used by every regularised inversion (CFL2, TV-ADMM, iLSQR).
//!
//! Forward differences with periodic boundaries, `(∇x)_a(i) = (x(i + e_a) − x(i)) / h_a`, so
//! that the operator is diagonal in k-space: `∇ᵀ∇ = −L` with `L` the 7-point Laplacian of
//! [`laplacian_kernel`](super::kernels::laplacian_kernel). Closed-form k-space updates and
//! real-space iterations then agree exactly. Volumes are padded before inversion, so the
//! periodic wrap only couples zero voxels.

use rayon::prelude::*;

use super::kernels::laplacian_kernel;

/// Forward-difference gradient on one grid with anisotropic voxels.
#[derive(Clone, Copy, Debug)]
pub struct Gradient {
    dims: [usize; 3],
    inv_h: [f32; 3],
}

impl Gradient {
    pub fn new(dims: [usize; 3], voxel_size: [f64; 3]) -> Self {
        Gradient {
            dims,
            inv_h: voxel_size.map(|h| (1.0 / h) as f32),
        }
    }

    /// `∇x` as three volumes (x, y, z components), in units of x per mm.
    pub fn forward(&self, x: &[f32]) -> [Vec<f32>; 3] {
        let mut g = [vec![0.0; x.len()], vec![0.0; x.len()], vec![0.0; x.len()]];
        self.forward_into(x, &mut g);
        g
    }

    /// `∇x` written into `g` (three volumes of the grid's size).
    pub fn forward_into(&self, x: &[f32], g: &mut [Vec<f32>; 3]) {
        let slab = self.dims[0] * self.dims[1];
        let [gx, gy, gz] = g;
        gx.par_chunks_mut(slab)
            .zip(gy.par_chunks_mut(slab))
            .zip(gz.par_chunks_mut(slab))
            .enumerate()
            .for_each(|(k, ((gx, gy), gz))| {
                self.for_each_in_slab(x, k, |o, g| {
                    gx[o] = g[0];
                    gy[o] = g[1];
                    gz[o] = g[2];
                })
            });
    }

    /// Calls `f(offset in the slab, ∇x)` for every voxel of z-slab `k`, so that a solver can
    /// use the gradient where it is computed instead of storing it (TV-ADMM's shrinkage).
    #[inline]
    pub fn for_each_in_slab(&self, x: &[f32], k: usize, mut f: impl FnMut(usize, [f32; 3])) {
        let [nx, ny, nz] = self.dims;
        let [hx, hy, hz] = self.inv_h;
        let kp = (k + 1) % nz;
        for j in 0..ny {
            let jp = (j + 1) % ny;
            let row = nx * (j + ny * k);
            let row_y = nx * (jp + ny * k);
            let row_z = nx * (j + ny * kp);
            for i in 0..nx {
                let ip = if i + 1 == nx { 0 } else { i + 1 };
                let c = x[row + i];
                f(
                    i + nx * j,
                    [
                        (x[row + ip] - c) * hx,
                        (x[row_y + i] - c) * hy,
                        (x[row_z + i] - c) * hz,
                    ],
                );
            }
        }
    }

    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// The adjoint `∇ᵀg` (minus the backward-difference divergence).
    pub fn adjoint(&self, g: &[Vec<f32>; 3]) -> Vec<f32> {
        let mut out = vec![0.0f32; g[0].len()];
        self.adjoint_into(g, &mut out);
        out
    }

    /// [`adjoint`](Self::adjoint) into a buffer of the grid's size.
    pub fn adjoint_into(&self, g: &[Vec<f32>; 3], out: &mut [f32]) {
        let [nx, ny, nz] = self.dims;
        let [hx, hy, hz] = self.inv_h;
        assert_eq!(out.len(), g[0].len(), "output buffer does not match");
        out.par_chunks_mut(nx * ny)
            .enumerate()
            .for_each(|(k, slab)| {
                let km = (k + nz - 1) % nz;
                for j in 0..ny {
                    let jm = (j + ny - 1) % ny;
                    let row = nx * (j + ny * k);
                    let row_y = nx * (jm + ny * k);
                    let row_z = nx * (j + ny * km);
                    for i in 0..nx {
                        let im = if i == 0 { nx - 1 } else { i - 1 };
                        let c = row + i;
                        slab[i + nx * j] = (g[0][row + im] - g[0][c]) * hx
                            + (g[1][row_y + i] - g[1][c]) * hy
                            + (g[2][row_z + i] - g[2][c]) * hz;
                    }
                }
            });
    }

    /// `|G(k)|²`, the spectrum of `∇ᵀ∇`, on the half spectrum of `Fft3` (non-negative, zero
    /// only at DC).
    pub fn energy_kernel(&self, voxel_size: [f64; 3]) -> Vec<f32> {
        laplacian_kernel(self.dims, voxel_size)
            .into_iter()
            .map(|l| -l)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::physics::fft::Fft3;
    use crate::simulate::rng::centred_noise as random;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    #[test]
    fn gradient_matches_a_naive_difference_and_is_adjoint() {
        let dims = [7, 6, 5];
        let vox = [1.0, 0.8, 1.5];
        let n = 7 * 6 * 5;
        let grad = Gradient::new(dims, vox);
        let x = random(n, 1);
        let g = grad.forward(&x);
        // Naive: one voxel in the interior and one on the wrapping edge of each axis.
        let at = |i: usize, j: usize, k: usize| x[i + 7 * (j + 6 * k)];
        let idx = |i: usize, j: usize, k: usize| i + 7 * (j + 6 * k);
        assert!((g[0][idx(2, 3, 1)] - (at(3, 3, 1) - at(2, 3, 1))).abs() < 1e-6);
        assert!((g[0][idx(6, 3, 1)] - (at(0, 3, 1) - at(6, 3, 1))).abs() < 1e-6);
        assert!((g[1][idx(2, 5, 1)] - (at(2, 0, 1) - at(2, 5, 1)) / 0.8).abs() < 1e-5);
        assert!((g[2][idx(2, 3, 4)] - (at(2, 3, 0) - at(2, 3, 4)) / 1.5).abs() < 1e-5);
        let y = [random(n, 2), random(n, 3), random(n, 4)];
        let lhs: f64 = (0..3).map(|a| dot(&g[a], &y[a])).sum();
        let rhs = dot(&x, &grad.adjoint(&y));
        assert!(
            (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    #[test]
    fn energy_kernel_is_the_spectrum_of_the_normal_operator() {
        let dims = [8, 6, 10];
        let vox = [1.0, 1.2, 0.9];
        let grad = Gradient::new(dims, vox);
        let x = random(8 * 6 * 10, 5);
        let real = grad.adjoint(&grad.forward(&x));
        let fft = Fft3::new(dims);
        let spectral = fft.filter(&x, &grad.energy_kernel(vox));
        for (a, b) in real.iter().zip(&spectral) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
