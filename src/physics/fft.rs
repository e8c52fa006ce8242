//! 3D FFTs on x-fastest volumes, parallel over lines with rayon.
//!
//! `Fft3` is a real-to-complex transform: the spectrum keeps the non-negative half of the
//! x frequencies, `nh = nx/2 + 1` bins, stored x-fastest like volumes
//! (index = i + nh·(j + ny·k)). `ComplexFft3` is the full complex transform (same layout with
//! `nx` bins), used where signals are complex (k-space cropping in the simulator).
//!
//! Conventions: forward transforms are unnormalised, inverse transforms divide by the number
//! of voxels, so `inverse(forward(x)) == x`.

use std::sync::Arc;

use rayon::prelude::*;
use realfft::{ComplexToReal, RealFftPlanner, RealToComplex};
use rustfft::num_complex::Complex32;
use rustfft::{Fft, FftPlanner};

pub use rustfft::num_complex::Complex32 as C32;

/// Plans of the 1D transforms along y and z, shared by the real and complex 3D transforms.
struct AxisPlans {
    y_fwd: Arc<dyn Fft<f32>>,
    y_inv: Arc<dyn Fft<f32>>,
    z_fwd: Arc<dyn Fft<f32>>,
    z_inv: Arc<dyn Fft<f32>>,
}

impl AxisPlans {
    fn new(planner: &mut FftPlanner<f32>, ny: usize, nz: usize) -> Self {
        AxisPlans {
            y_fwd: planner.plan_fft_forward(ny),
            y_inv: planner.plan_fft_inverse(ny),
            z_fwd: planner.plan_fft_forward(nz),
            z_inv: planner.plan_fft_inverse(nz),
        }
    }
}

/// Real-to-complex 3D FFT plan for one grid.
pub struct Fft3 {
    dims: [usize; 3],
    r2c: Arc<dyn RealToComplex<f32>>,
    c2r: Arc<dyn ComplexToReal<f32>>,
    axes: AxisPlans,
}

impl Fft3 {
    pub fn new(dims: [usize; 3]) -> Self {
        assert!(dims.iter().all(|&n| n > 0), "FFT dims must be positive");
        let mut real = RealFftPlanner::<f32>::new();
        let mut planner = FftPlanner::<f32>::new();
        Fft3 {
            dims,
            r2c: real.plan_fft_forward(dims[0]),
            c2r: real.plan_fft_inverse(dims[0]),
            axes: AxisPlans::new(&mut planner, dims[1], dims[2]),
        }
    }

    pub fn dims(&self) -> [usize; 3] {
        self.dims
    }

    /// Dims of the half spectrum: `[nx/2 + 1, ny, nz]`.
    pub fn spectrum_dims(&self) -> [usize; 3] {
        [self.dims[0] / 2 + 1, self.dims[1], self.dims[2]]
    }

    pub fn spectrum_len(&self) -> usize {
        let s = self.spectrum_dims();
        s[0] * s[1] * s[2]
    }

    /// Forward transform of a real volume.
    pub fn forward(&self, x: &[f32]) -> Vec<Complex32> {
        let mut out = vec![Complex32::new(0.0, 0.0); self.spectrum_len()];
        self.forward_into(x, &mut out);
        out
    }

    /// Forward transform into `out` (of [`spectrum_len`](Self::spectrum_len)): iterative
    /// solvers reuse one buffer instead of faulting in fresh pages every iteration.
    pub fn forward_into(&self, x: &[f32], out: &mut [Complex32]) {
        let [nx, ny, nz] = self.dims;
        assert_eq!(
            x.len(),
            nx * ny * nz,
            "FFT input does not match the plan's grid"
        );
        let nh = nx / 2 + 1;
        assert_eq!(out.len(), nh * ny * nz, "spectrum buffer does not match");
        let r2c = &self.r2c;
        out.par_chunks_mut(nh).zip(x.par_chunks(nx)).for_each_init(
            || (r2c.make_input_vec(), r2c.make_scratch_vec()),
            |(line, scratch), (spec, src)| {
                line.copy_from_slice(src);
                r2c.process_with_scratch(line, spec, scratch)
                    .expect("buffer sizes come from the plan");
            },
        );
        transform_y(out, nh, ny, &self.axes.y_fwd);
        transform_z(out, nh, ny, nz, &self.axes.z_fwd);
    }

    /// Inverse transform (normalised). The spectrum is used as scratch and left clobbered.
    pub fn inverse(&self, spec: &mut [Complex32]) -> Vec<f32> {
        let mut out = vec![0.0f32; self.dims.iter().product()];
        self.inverse_into(spec, &mut out);
        out
    }

    /// Inverse transform into `out` (normalised); the spectrum is left clobbered.
    pub fn inverse_into(&self, spec: &mut [Complex32], out: &mut [f32]) {
        let [nx, ny, nz] = self.dims;
        let nh = nx / 2 + 1;
        assert_eq!(
            spec.len(),
            nh * ny * nz,
            "spectrum does not match the plan's grid"
        );
        assert_eq!(out.len(), nx * ny * nz, "output buffer does not match");
        transform_z(spec, nh, ny, nz, &self.axes.z_inv);
        transform_y(spec, nh, ny, &self.axes.y_inv);
        let scale = 1.0 / (nx * ny * nz) as f32;
        let c2r = &self.c2r;
        out.par_chunks_mut(nx)
            .zip(spec.par_chunks_mut(nh))
            .for_each_init(
                || c2r.make_scratch_vec(),
                |scratch, (dst, line)| {
                    // The DC and Nyquist bins of a real signal are real; rounding leaves a tiny
                    // imaginary part there that realfft rejects.
                    line[0].im = 0.0;
                    if nx % 2 == 0 {
                        line[nh - 1].im = 0.0;
                    }
                    c2r.process_with_scratch(line, dst, scratch)
                        .expect("buffer sizes come from the plan");
                    for v in dst.iter_mut() {
                        *v *= scale;
                    }
                },
            );
    }

    /// `x ↦ IFFT(h · FFT(x))` for a real multiplier `h` on the half spectrum.
    pub fn filter(&self, x: &[f32], h: &[f32]) -> Vec<f32> {
        let mut spec = self.forward(x);
        multiply_real(&mut spec, h);
        self.inverse(&mut spec)
    }
}

/// Multiplies a spectrum by a real multiplier of the same layout, in parallel.
pub fn multiply_real(spec: &mut [Complex32], h: &[f32]) {
    assert_eq!(
        spec.len(),
        h.len(),
        "multiplier does not match the spectrum"
    );
    spec.par_chunks_mut(4096)
        .zip(h.par_chunks(4096))
        .for_each(|(s, h)| {
            for (s, &h) in s.iter_mut().zip(h) {
                *s *= h;
            }
        });
}

/// Complex-to-complex 3D FFT plan for one grid.
pub struct ComplexFft3 {
    dims: [usize; 3],
    x_fwd: Arc<dyn Fft<f32>>,
    x_inv: Arc<dyn Fft<f32>>,
    axes: AxisPlans,
}

impl ComplexFft3 {
    pub fn new(dims: [usize; 3]) -> Self {
        let mut planner = FftPlanner::<f32>::new();
        ComplexFft3 {
            dims,
            x_fwd: planner.plan_fft_forward(dims[0]),
            x_inv: planner.plan_fft_inverse(dims[0]),
            axes: AxisPlans::new(&mut planner, dims[1], dims[2]),
        }
    }

    /// In-place forward transform (unnormalised).
    pub fn forward(&self, data: &mut [Complex32]) {
        let [nx, ny, nz] = self.dims;
        assert_eq!(data.len(), nx * ny * nz);
        transform_x(data, nx, &self.x_fwd);
        transform_y(data, nx, ny, &self.axes.y_fwd);
        transform_z(data, nx, ny, nz, &self.axes.z_fwd);
    }

    /// In-place inverse transform (normalised).
    pub fn inverse(&self, data: &mut [Complex32]) {
        let [nx, ny, nz] = self.dims;
        assert_eq!(data.len(), nx * ny * nz);
        transform_z(data, nx, ny, nz, &self.axes.z_inv);
        transform_y(data, nx, ny, &self.axes.y_inv);
        transform_x(data, nx, &self.x_inv);
        let scale = 1.0 / data.len() as f32;
        data.par_chunks_mut(4096)
            .for_each(|c| c.iter_mut().for_each(|v| *v *= scale));
    }
}

fn transform_x(data: &mut [Complex32], nx: usize, fft: &Arc<dyn Fft<f32>>) {
    // Batches of whole x-lines per task keep rustfft's batched kernels busy.
    let lines_per_task = (16384 / nx).max(1);
    data.par_chunks_mut(nx * lines_per_task).for_each_init(
        || vec![Complex32::new(0.0, 0.0); fft.get_inplace_scratch_len()],
        |scratch, lines| fft.process_with_scratch(lines, scratch),
    );
}

/// Transforms along y within each z-slab (contiguous `nxe·ny`), via a transpose so the
/// 1D transforms run on contiguous memory.
fn transform_y(data: &mut [Complex32], nxe: usize, ny: usize, fft: &Arc<dyn Fft<f32>>) {
    if ny == 1 {
        return;
    }
    data.par_chunks_mut(nxe * ny).for_each_init(
        || {
            (
                vec![Complex32::new(0.0, 0.0); nxe * ny],
                vec![Complex32::new(0.0, 0.0); fft.get_inplace_scratch_len()],
            )
        },
        |(buf, scratch), slab| {
            transpose(slab, buf, nxe, ny);
            fft.process_with_scratch(buf, scratch);
            transpose(buf, slab, ny, nxe);
        },
    );
}

/// Transforms along z. Each task owns one y-row across all slabs: the elements (·, j, ·)
/// are disjoint between tasks, so writing them through a shared pointer is race-free.
fn transform_z(data: &mut [Complex32], nxe: usize, ny: usize, nz: usize, fft: &Arc<dyn Fft<f32>>) {
    if nz == 1 {
        return;
    }
    let ptr = SharedMut(data.as_mut_ptr());
    let slab = nxe * ny;
    (0..ny).into_par_iter().for_each_init(
        || {
            (
                vec![Complex32::new(0.0, 0.0); nxe * nz],
                vec![Complex32::new(0.0, 0.0); nxe * nz],
                vec![Complex32::new(0.0, 0.0); fft.get_inplace_scratch_len()],
            )
        },
        |(rows, cols, scratch), j| {
            let base = ptr.get();
            for k in 0..nz {
                // SAFETY: offsets (nxe·j + slab·k) .. +nxe lie inside `data` and belong to row j only.
                let src = unsafe { std::slice::from_raw_parts(base.add(nxe * j + slab * k), nxe) };
                rows[k * nxe..(k + 1) * nxe].copy_from_slice(src);
            }
            transpose(rows, cols, nxe, nz);
            fft.process_with_scratch(cols, scratch);
            transpose(cols, rows, nz, nxe);
            for k in 0..nz {
                // SAFETY: as above; no other task touches row j.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(base.add(nxe * j + slab * k), nxe) };
                dst.copy_from_slice(&rows[k * nxe..(k + 1) * nxe]);
            }
        },
    );
}

#[derive(Clone, Copy)]
struct SharedMut(*mut Complex32);
// SAFETY: used only by `transform_z`, whose tasks write disjoint elements.
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    fn get(self) -> *mut Complex32 {
        self.0
    }
}

/// `dst[c·rows + r] = src[r·cols + c]` for a `rows × cols` row-major `src`… seen from the
/// fast axis: `src` has `fast` elements per line and `lines` lines.
fn transpose(src: &[Complex32], dst: &mut [Complex32], fast: usize, lines: usize) {
    const B: usize = 16;
    for l0 in (0..lines).step_by(B) {
        for f0 in (0..fast).step_by(B) {
            for l in l0..(l0 + B).min(lines) {
                for f in f0..(f0 + B).min(fast) {
                    dst[f * lines + l] = src[l * fast + f];
                }
            }
        }
    }
}

/// The smallest length ≥ `n` whose prime factors are all ≤ 7. Prime lengths such as 197 or
/// 233 (the MNI grid) take the Bluestein path and run about 3× slower than a padded grid.
pub fn fast_len(n: usize) -> usize {
    let mut m = n.max(1);
    loop {
        let mut r = m;
        for p in [2, 3, 5, 7] {
            while r.is_multiple_of(p) {
                r /= p;
            }
        }
        if r == 1 {
            return m;
        }
        m += 1;
    }
}

/// Signed frequency index of bin `i` of an `n`-point transform: 0, 1, …, −2, −1.
#[inline]
pub fn signed_index(i: usize, n: usize) -> f64 {
    if i <= n / 2 {
        i as f64
    } else {
        i as f64 - n as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook O(N²) 3D DFT, the oracle for the fast transforms.
    fn naive_dft(x: &[Complex32], dims: [usize; 3], inverse: bool) -> Vec<Complex32> {
        let [nx, ny, nz] = dims;
        let sign = if inverse { 1.0 } else { -1.0 };
        let mut out = vec![Complex32::new(0.0, 0.0); x.len()];
        for w in 0..nz {
            for v in 0..ny {
                for u in 0..nx {
                    let mut acc = rustfft::num_complex::Complex64::new(0.0, 0.0);
                    for k in 0..nz {
                        for j in 0..ny {
                            for i in 0..nx {
                                let ph = sign
                                    * 2.0
                                    * std::f64::consts::PI
                                    * ((u * i) as f64 / nx as f64
                                        + (v * j) as f64 / ny as f64
                                        + (w * k) as f64 / nz as f64);
                                let xv = x[i + nx * (j + ny * k)];
                                acc += rustfft::num_complex::Complex64::new(
                                    xv.re as f64,
                                    xv.im as f64,
                                ) * rustfft::num_complex::Complex64::from_polar(1.0, ph);
                            }
                        }
                    }
                    out[u + nx * (v + ny * w)] = Complex32::new(acc.re as f32, acc.im as f32);
                }
            }
        }
        out
    }

    use crate::simulate::rng::centred_noise as random;

    const SHAPES: [[usize; 3]; 5] = [[4, 6, 5], [5, 3, 4], [8, 8, 8], [7, 1, 3], [1, 4, 6]];

    #[test]
    fn real_forward_matches_naive_dft() {
        for dims in SHAPES {
            let n = dims.iter().product();
            let x = random(n, 7);
            let fast = Fft3::new(dims).forward(&x);
            let xc: Vec<_> = x.iter().map(|&v| Complex32::new(v, 0.0)).collect();
            let slow = naive_dft(&xc, dims, false);
            let nh = dims[0] / 2 + 1;
            for k in 0..dims[2] {
                for j in 0..dims[1] {
                    for i in 0..nh {
                        let a = fast[i + nh * (j + dims[1] * k)];
                        let b = slow[i + dims[0] * (j + dims[1] * k)];
                        assert!(
                            (a - b).norm() < 1e-4,
                            "dims {dims:?} bin ({i},{j},{k}): {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn real_round_trip_is_identity() {
        for dims in SHAPES {
            let n = dims.iter().product();
            let x = random(n, 3);
            let plan = Fft3::new(dims);
            let mut spec = plan.forward(&x);
            let back = plan.inverse(&mut spec);
            for (a, b) in x.iter().zip(&back) {
                assert!((a - b).abs() < 1e-5, "dims {dims:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn complex_forward_matches_naive_and_round_trips() {
        for dims in SHAPES {
            let n = dims.iter().product();
            let re = random(n, 11);
            let im = random(n, 12);
            let x: Vec<_> = re
                .iter()
                .zip(&im)
                .map(|(&a, &b)| Complex32::new(a, b))
                .collect();
            let plan = ComplexFft3::new(dims);
            let mut y = x.clone();
            plan.forward(&mut y);
            let slow = naive_dft(&x, dims, false);
            for (a, b) in y.iter().zip(&slow) {
                assert!((a - b).norm() < 1e-4, "dims {dims:?}: {a} vs {b}");
            }
            plan.inverse(&mut y);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).norm() < 1e-5);
            }
        }
    }

    #[test]
    fn fast_len_rounds_up_to_7_smooth_sizes() {
        assert_eq!(fast_len(197), 200);
        assert_eq!(fast_len(233), 240);
        assert_eq!(fast_len(189), 189);
        assert_eq!(fast_len(64), 64);
        assert_eq!(fast_len(11), 12);
        assert_eq!(fast_len(0), 1);
    }

    #[test]
    fn signed_index_wraps_at_half() {
        assert_eq!(signed_index(0, 8), 0.0);
        assert_eq!(signed_index(4, 8), 4.0);
        assert_eq!(signed_index(5, 8), -3.0);
        assert_eq!(signed_index(2, 5), 2.0);
        assert_eq!(signed_index(3, 5), -2.0);
    }
}
