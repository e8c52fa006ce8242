//! The dipole kernel and the forward model `field = D * χ`.
//!
//! In k-space, `D(k) = 1/3 − (k·b̂)² / |k|²` with `k` in cycles/mm (so anisotropic voxels are
//! handled) and `b̂` the unit B0 direction in the voxel frame. `D(0) = 0`: a uniform
//! susceptibility produces no measurable field offset, so χ is only defined up to a
//! constant and every map is referenced to a region (see the sidecars). The 1/3 term is the
//! Lorentz-sphere correction: the field inside a uniformly magnetised sphere is zero.
//!
//! `D` is real and even in k, so the operator is self-adjoint: `Dᴴ = D`.

use rayon::prelude::*;
use rustfft::num_complex::Complex32;

use super::fft::{multiply_real, signed_index, Fft3};

/// `D(k)` on the half spectrum of `Fft3` for one grid, voxel size and B0 direction.
///
/// On an even axis the Nyquist bin is both +N/2 and −N/2; with an oblique B0 the two give
/// different `D`, so the bin takes their mean. That keeps the kernel Hermitian-even, hence
/// the operator real and independent of how the axes are labelled.
pub fn dipole_kernel(dims: [usize; 3], voxel_size: [f64; 3], b0: [f64; 3]) -> Vec<f32> {
    let [nx, ny, nz] = dims;
    let nh = nx / 2 + 1;
    let n = (b0[0] * b0[0] + b0[1] * b0[1] + b0[2] * b0[2]).sqrt();
    let b = b0.map(|v| v / n);
    // The frequencies (cycles/mm) a bin stands for: one, or ±N/2 at an even Nyquist bin.
    let freqs = |i: usize, n: usize, h: f64| -> Vec<f64> {
        let f = signed_index(i, n) / (n as f64 * h);
        if n.is_multiple_of(2) && i == n / 2 {
            vec![f, -f]
        } else {
            vec![f]
        }
    };
    let d_at = |kx: f64, ky: f64, kz: f64| {
        let k2 = kx * kx + ky * ky + kz * kz;
        if k2 > 0.0 {
            let kb = kx * b[0] + ky * b[1] + kz * b[2];
            1.0 / 3.0 - kb * kb / k2
        } else {
            0.0
        }
    };
    let fx: Vec<Vec<f64>> = (0..nh).map(|i| freqs(i, nx, voxel_size[0])).collect();
    let fy: Vec<Vec<f64>> = (0..ny).map(|j| freqs(j, ny, voxel_size[1])).collect();
    let fz: Vec<Vec<f64>> = (0..nz).map(|k| freqs(k, nz, voxel_size[2])).collect();
    let mut d = vec![0.0f32; nh * ny * nz];
    d.par_chunks_mut(nh * ny).zip(&fz).for_each(|(plane, fz)| {
        for (j, fy) in fy.iter().enumerate() {
            let row = nh * j;
            for (i, fx) in fx.iter().enumerate() {
                let mut sum = 0.0;
                for &kz in fz {
                    for &ky in fy {
                        for &kx in fx {
                            sum += d_at(kx, ky, kz);
                        }
                    }
                }
                plane[row + i] = (sum / (fx.len() * fy.len() * fz.len()) as f64) as f32;
            }
        }
    });
    d
}

/// The dipole convolution for one grid and B0 direction, with its FFT plan.
///
/// One instance serves the simulator, every inversion and the learned models' data term.
pub struct DipoleOperator {
    fft: Fft3,
    kernel: Vec<f32>,
    b0: [f64; 3],
    voxel_size: [f64; 3],
}

impl DipoleOperator {
    pub fn new(dims: [usize; 3], voxel_size: [f64; 3], b0: [f64; 3]) -> Self {
        DipoleOperator {
            fft: Fft3::new(dims),
            kernel: dipole_kernel(dims, voxel_size, b0),
            b0,
            voxel_size,
        }
    }

    pub fn dims(&self) -> [usize; 3] {
        self.fft.dims()
    }

    pub fn b0(&self) -> [f64; 3] {
        self.b0
    }

    pub fn voxel_size(&self) -> [f64; 3] {
        self.voxel_size
    }

    pub fn fft(&self) -> &Fft3 {
        &self.fft
    }

    /// `D(k)` on the half spectrum.
    pub fn kernel(&self) -> &[f32] {
        &self.kernel
    }

    /// Field (in the units of χ, e.g. ppm) produced by the susceptibility map `chi`.
    pub fn forward(&self, chi: &[f32]) -> Vec<f32> {
        self.fft.filter(chi, &self.kernel)
    }

    /// The adjoint, equal to `forward` because `D` is real and even.
    pub fn adjoint(&self, field: &[f32]) -> Vec<f32> {
        self.forward(field)
    }

    /// `IFFT(g(D) · FFT(x))`: any real function of the kernel, e.g. a regularised inverse.
    pub fn apply_fn(&self, x: &[f32], g: impl Fn(f32) -> f32 + Sync) -> Vec<f32> {
        let mut spec = self.fft.forward(x);
        let h: Vec<f32> = self.kernel.iter().map(|&d| g(d)).collect();
        multiply_real(&mut spec, &h);
        self.fft.inverse(&mut spec)
    }
}

/// `Σᵢ g(Dᵢ)·FFT(fᵢ)` and `Σᵢ g(Dᵢ)²` on the half spectrum: the least-squares combination
/// of several orientations' fields under a kernel `g(D)` (D itself for COSMOS, the truncated
/// kernel for TKD). `fields[i]` pairs with `kernels[i]`.
pub fn combine_orientations(
    fft: &Fft3,
    fields: &[&[f32]],
    kernels: &[&[f32]],
    g: impl Fn(f32) -> f32 + Sync,
) -> (Vec<Complex32>, Vec<f32>) {
    // One fused parallel pass per orientation over the half spectrum (besides the FFTs these
    // passes are TKD's whole cost, so they decide whether it stays near one FFT pair).
    let mut num: Option<Vec<Complex32>> = None;
    let mut den = vec![0.0f32; fft.spectrum_len()];
    for (field, kernel) in fields.iter().zip(kernels) {
        let mut spec = fft.forward(field);
        spec.par_iter_mut()
            .zip(den.par_iter_mut())
            .zip(kernel.par_iter())
            .for_each(|((a, s), &d)| {
                let gd = g(d);
                *a *= gd;
                *s += gd * gd;
            });
        if let Some(sum) = &num {
            spec.par_iter_mut().zip(sum).for_each(|(a, &b)| *a += b);
        }
        num = Some(spec);
    }
    let num = num.unwrap_or_else(|| vec![Complex32::new(0.0, 0.0); fft.spectrum_len()]);
    (num, den)
}

/// The TKD kernel: `D` where `|D| ≥ t`, else `t·sign(D)` (`t` at DC).
#[inline]
pub fn truncate_kernel(d: f32, t: f32) -> f32 {
    if d.abs() >= t {
        d
    } else if d < 0.0 {
        -t
    } else {
        t
    }
}

/// Thresholded k-space division of one or more orientations' fields:
/// `IFFT(Σᵢ D̃ᵢ Fᵢ / Σᵢ D̃ᵢ²)`, with `D̃` the kernel truncated at `t` (`0 < t`).
pub fn tkd(fft: &Fft3, fields: &[&[f32]], kernels: &[&[f32]], t: f32) -> Vec<f32> {
    let (mut spec, den) = combine_orientations(fft, fields, kernels, |d| truncate_kernel(d, t));
    // Σ D̃² ≥ t² > 0 everywhere (D̃ = t at DC keeps the mean).
    spec.par_iter_mut()
        .zip(den.par_iter())
        .for_each(|(a, &s)| *a /= s);
    fft.inverse(&mut spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::simulate::rng::centred_noise as random;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
    }

    /// Analytic field of a uniformly magnetised sphere (radius `a`, susceptibility `chi`):
    /// zero inside; `chi/3 · (a/r)³ · (3cos²θ − 1)` outside, θ measured from B0.
    fn sphere_field(r: [f64; 3], b: [f64; 3], a: f64, chi: f64) -> f64 {
        let rr = (r[0] * r[0] + r[1] * r[1] + r[2] * r[2]).sqrt();
        if rr < a {
            return 0.0;
        }
        let c = (r[0] * b[0] + r[1] * b[1] + r[2] * b[2]) / rr;
        chi / 3.0 * (a / rr).powi(3) * (3.0 * c * c - 1.0)
    }

    fn check_sphere(b0: [f64; 3], voxel: [f64; 3]) {
        let dims = [64, 64, 64];
        let a = 7.0; // mm
        let chi = 1.0;
        let c = [32.0, 32.0, 32.0];
        // Supersampled sphere: partial-volume voxels get their fraction of χ.
        let mut x = vec![0.0f32; 64 * 64 * 64];
        let s = 4;
        for k in 0..64 {
            for j in 0..64 {
                for i in 0..64 {
                    let mut inside = 0;
                    for (si, sj, sk) in (0..s)
                        .flat_map(|p| (0..s).flat_map(move |q| (0..s).map(move |r| (p, q, r))))
                    {
                        let off = |u: usize| (u as f64 + 0.5) / s as f64 - 0.5;
                        let p = [
                            (i as f64 + off(si) - c[0]) * voxel[0],
                            (j as f64 + off(sj) - c[1]) * voxel[1],
                            (k as f64 + off(sk) - c[2]) * voxel[2],
                        ];
                        if p.iter().map(|v| v * v).sum::<f64>() < a * a {
                            inside += 1;
                        }
                    }
                    x[i + 64 * (j + 64 * k)] = chi as f32 * inside as f32 / (s * s * s) as f32;
                }
            }
        }
        let b = {
            let n = b0.iter().map(|v| v * v).sum::<f64>().sqrt();
            b0.map(|v| v / n)
        };
        let op = DipoleOperator::new(dims, voxel, b);
        let f = op.forward(&x);
        let (mut err, mut norm, mut count) = (0.0, 0.0, 0);
        for k in 0..64 {
            for j in 0..64 {
                for i in 0..64 {
                    let r = [
                        (i as f64 - c[0]) * voxel[0],
                        (j as f64 - c[1]) * voxel[1],
                        (k as f64 - c[2]) * voxel[2],
                    ];
                    let rr = r.iter().map(|v| v * v).sum::<f64>().sqrt();
                    // Away from the discretised surface, and not so far that the periodic
                    // images of the sphere matter.
                    if (rr > 1.5 * a && rr < 2.5 * a) || rr < 0.5 * a {
                        let want = sphere_field(r, b, a, chi);
                        let got = f[i + 64 * (j + 64 * k)] as f64;
                        err += (got - want).powi(2);
                        norm += (chi / 3.0).powi(2);
                        count += 1;
                    }
                }
            }
        }
        let rel = (err / norm).sqrt();
        assert!(count > 1000);
        assert!(
            rel < 0.02,
            "sphere field error {rel} for b0 {b0:?}, voxel {voxel:?}"
        );
    }

    #[test]
    fn sphere_field_matches_analytic_solution() {
        check_sphere([0.0, 0.0, 1.0], [1.0, 1.0, 1.0]);
    }

    #[test]
    fn sphere_field_follows_an_oblique_b0_and_anisotropic_voxels() {
        check_sphere([0.3, -0.2, 0.93], [1.0, 1.0, 1.0]);
        check_sphere([0.0, 0.0, 1.0], [0.75, 0.75, 1.5]);
    }

    #[test]
    fn kernel_values_at_known_frequencies() {
        let d = dipole_kernel([8, 8, 8], [1.0; 3], [0.0, 0.0, 1.0]);
        let nh = 5;
        let at = |i: usize, j: usize, k: usize| d[i + nh * (j + 8 * k)];
        assert_eq!(at(0, 0, 0), 0.0);
        assert!((at(1, 0, 0) - 1.0 / 3.0).abs() < 1e-7); // k ⟂ B0
        assert!((at(0, 0, 1) + 2.0 / 3.0).abs() < 1e-7); // k ∥ B0
        assert!((at(0, 0, 7) + 2.0 / 3.0).abs() < 1e-7); // negative frequency
                                                         // k ∥ (1,1,1) lies on the magic-angle cone, (k·b̂)² = |k|²/3, where D vanishes.
        assert!(at(1, 1, 1).abs() < 1e-7);
    }

    #[test]
    fn operator_is_self_adjoint() {
        let dims = [12, 10, 9];
        let op = DipoleOperator::new(dims, [1.0, 0.8, 1.7], [0.1, 0.2, 0.97]);
        let n = 12 * 10 * 9;
        let x = random(n, 1);
        let y = random(n, 2);
        let lhs = dot(&op.forward(&x), &y);
        let rhs = dot(&x, &op.adjoint(&y));
        assert!(
            (lhs - rhs).abs() < 1e-5 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    /// Relabelling the axes (x ↔ z, with the voxel size and B0 swapped too) must not change
    /// the field, also on even grids with an oblique B0, where the Nyquist bins are shared.
    #[test]
    fn field_does_not_depend_on_axis_labels() {
        let (nx, ny, nz) = (12, 10, 8);
        let vox = [1.0, 1.2, 1.5];
        let b0 = [0.3, 0.2, 0.93];
        let x = random(nx * ny * nz, 3);
        let f = DipoleOperator::new([nx, ny, nz], vox, b0).forward(&x);
        // The same data with axes (z, y, x).
        let mut xs = vec![0.0; x.len()];
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    xs[k + nz * (j + ny * i)] = x[i + nx * (j + ny * k)];
                }
            }
        }
        let fs = DipoleOperator::new(
            [nz, ny, nx],
            [vox[2], vox[1], vox[0]],
            [b0[2], b0[1], b0[0]],
        )
        .forward(&xs);
        let mut worst = 0.0f32;
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    let d = (fs[k + nz * (j + ny * i)] - f[i + nx * (j + ny * k)]).abs();
                    worst = worst.max(d);
                }
            }
        }
        assert!(worst < 1e-5, "largest difference {worst}");
    }

    #[test]
    fn forward_matches_naive_circular_convolution_in_kspace() {
        // A single voxel's field is the inverse DFT of D itself: check against a naive sum.
        let dims = [6, 5, 4];
        let op = DipoleOperator::new(dims, [1.0, 1.2, 0.9], [0.2, 0.1, 0.97]);
        let mut x = vec![0.0; 120];
        x[0] = 1.0;
        let f = op.forward(&x);
        let full = |i: usize, j: usize, k: usize| {
            // D on the full spectrum through Hermitian symmetry (D is even).
            let ii = if i <= 3 { i } else { 6 - i };
            let jj = if i <= 3 { j } else { (5 - j) % 5 };
            let kk = if i <= 3 { k } else { (4 - k) % 4 };
            op.kernel()[ii + 4 * (jj + 5 * kk)] as f64
        };
        for z in 0..4 {
            for y in 0..5 {
                for xx in 0..6 {
                    let mut acc = 0.0;
                    for k in 0..4 {
                        for j in 0..5 {
                            for i in 0..6 {
                                let ph = 2.0
                                    * std::f64::consts::PI
                                    * ((i * xx) as f64 / 6.0
                                        + (j * y) as f64 / 5.0
                                        + (k * z) as f64 / 4.0);
                                acc += full(i, j, k) * ph.cos();
                            }
                        }
                    }
                    let want = acc / 120.0;
                    let got = f[xx + 6 * (y + 5 * z)] as f64;
                    assert!((got - want).abs() < 1e-6, "({xx},{y},{z}): {got} vs {want}");
                }
            }
        }
    }
}
