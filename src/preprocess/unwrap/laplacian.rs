//! Laplacian phase unwrapping (Schofield & Zhu 2003), periodic FFT form.
//!
//! The Laplacian of the true phase is computed from the wrapped phase alone, then inverted
//! with the discrete periodic Laplacian (`physics::kernels::laplacian_kernel`, DC set to 0).
//! Where the wrapped data are consistent (no phase residues) this recovers the true phase
//! up to a constant; residues (noise outside the head, phase singularities) add a smooth
//! error that is harmonic away from them, which background removal discards later.
//!
//! Two forms of the phase Laplacian are offered. Schofield & Zhu's
//! `cos φ ∇²(sin φ) − sin φ ∇²(cos φ)` equals, for the 7-point stencil, `Σ sin(φ_nb − φ)/h²`
//! over the six neighbours; replacing `sin` by the wrapped difference gives the exact
//! discrete Laplacian of the true phase whenever neighbours differ by less than π (the
//! least-squares unwrapping of Ghiglia & Romero), which avoids the `sin Δ ≈ Δ` bias at steep
//! phase gradients. Both are evaluated in real space (one pass), so an unwrap costs one
//! forward and one inverse FFT.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::UnwrapConfig;
use crate::physics::fft::{multiply_real, Fft3};
use crate::physics::kernels::laplacian_kernel;
use crate::preprocess::util::{quantile, weighted_median_int, wrap};

/// Which estimate of the phase Laplacian to invert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LaplacianForm {
    /// Σ wrap(φ_nb − φ)/h²: exact for neighbour differences below π (default).
    WrappedDifference,
    /// Σ sin(φ_nb − φ)/h², i.e. cos φ ∇²sin φ − sin φ ∇²cos φ (Schofield & Zhu 2003).
    Sine,
}

/// A Laplacian unwrapper for one grid: the FFT plan and the inverse Laplacian are built once
/// and reused for every echo.
pub struct LaplacianUnwrapper {
    fft: Fft3,
    inv_laplacian: Vec<f32>,
    voxel_size: [f64; 3],
    form: LaplacianForm,
    reliable_fraction: f64,
    round_to_turns: bool,
}

impl LaplacianUnwrapper {
    /// Builds the FFT plan and the inverse Laplacian for `dims` and `voxel_size` (mm).
    pub fn new(dims: [usize; 3], voxel_size: [f64; 3], config: &UnwrapConfig) -> Self {
        let inv_laplacian = laplacian_kernel(dims, voxel_size)
            .into_iter()
            .map(|l| if l != 0.0 { 1.0 / l } else { 0.0 })
            .collect();
        LaplacianUnwrapper {
            fft: Fft3::new(dims),
            inv_laplacian,
            voxel_size,
            form: config.laplacian,
            reliable_fraction: config.reliable_fraction,
            round_to_turns: config.round_to_turns,
        }
    }

    /// The grid this unwrapper was built for.
    pub fn dims(&self) -> [usize; 3] {
        self.fft.dims()
    }

    /// The smooth unwrapped phase (zero mean over the grid); rad in, rad out.
    pub fn unwrap(&self, wrapped: &[f32]) -> Vec<f32> {
        self.unwrap_within(wrapped, None)
    }

    /// As [`unwrap`](Self::unwrap), counting only neighbour differences between voxels that
    /// are both `reliable` (all when `None`).
    pub fn unwrap_within(&self, wrapped: &[f32], reliable: Option<&[bool]>) -> Vec<f32> {
        let lap = phase_laplacian(wrapped, self.dims(), self.voxel_size, self.form, reliable);
        let mut spec = self.fft.forward(&lap);
        multiply_real(&mut spec, &self.inv_laplacian);
        self.fft.inverse(&mut spec)
    }

    /// The configured unwrapping: [`unwrap_turns`](Self::unwrap_turns) when
    /// `round_to_turns` is set, else the Laplacian estimate over the reliable voxels.
    pub fn unwrap_phase(&self, wrapped: &[f32], weights: Option<&[f32]>) -> Vec<f32> {
        if self.round_to_turns {
            self.unwrap_turns(wrapped, weights)
        } else {
            self.unwrap_within(wrapped, self.reliable(weights).as_deref())
        }
    }

    /// Voxels bright enough to enter the phase Laplacian, from magnitude² weights.
    fn reliable(&self, weights: Option<&[f32]>) -> Option<Vec<bool>> {
        weights.and_then(|w| {
            // Weights are magnitude², so the fraction applies to their square root.
            let cut = quantile(w, None, 0.99)? as f64 * self.reliable_fraction.powi(2);
            Some(w.par_iter().map(|&v| v as f64 >= cut).collect())
        })
    }

    /// The wrapped phase plus the whole number of turns that brings each voxel closest to the
    /// Laplacian estimate, so the result agrees with the data mod 2π exactly; then one
    /// global number of turns is removed so the weighted median lies in (−π, π].
    ///
    /// The global shift matters because the Laplacian estimate has an arbitrary constant; the
    /// median rule assumes the phase is centred on zero over the weighted region (the scanner
    /// centres its frequency on the tissue). `weights` (e.g. magnitude²) keep noise from voting.
    pub fn unwrap_turns(&self, wrapped: &[f32], weights: Option<&[f32]>) -> Vec<f32> {
        let smooth = self.unwrap_within(wrapped, self.reliable(weights).as_deref());
        let tau = 2.0 * std::f32::consts::PI;
        let mut out: Vec<f32> = wrapped
            .par_iter()
            .zip(&smooth)
            .map(|(&w, &s)| {
                let w = wrap(w);
                w + tau * ((s - w) / tau).round()
            })
            .collect();
        let turns = weighted_median_int(out.iter().enumerate().map(|(i, &v)| {
            let w = weights.map_or(1.0, |w| w[i] as f64);
            ((v / tau).round() as i64, w)
        }));
        if turns != 0 {
            let shift = tau * turns as f32;
            out.par_iter_mut().for_each(|v| *v -= shift);
        }
        out
    }
}

/// The discrete (periodic, 7-point) Laplacian of the unwrapped phase, estimated from the
/// wrapped phase; differences touching a voxel outside `reliable` count as zero.
pub fn phase_laplacian(
    wrapped: &[f32],
    dims: [usize; 3],
    voxel_size: [f64; 3],
    form: LaplacianForm,
    reliable: Option<&[bool]>,
) -> Vec<f32> {
    let [nx, ny, nz] = dims;
    let w = voxel_size.map(|h| (1.0 / (h * h)) as f32);
    // The difference must be odd in d, or an exact ±π step (common in integer phase and in
    // zero-signal background) counts +π from both sides and leaves a net source whose DC
    // removal then bends the whole solution.
    let diff = |d: f32| match form {
        LaplacianForm::WrappedDifference => {
            if d < 0.0 {
                -wrap(-d)
            } else {
                wrap(d)
            }
        }
        LaplacianForm::Sine => d.sin(),
    };
    let mut out = vec![0.0f32; nx * ny * nz];
    out.par_chunks_mut(nx * ny)
        .enumerate()
        .for_each(|(k, slab)| {
            let kp = (k + 1) % nz;
            let km = (k + nz - 1) % nz;
            for j in 0..ny {
                let jp = (j + 1) % ny;
                let jm = (j + ny - 1) % ny;
                for i in 0..nx {
                    let ip = (i + 1) % nx;
                    let im = (i + nx - 1) % nx;
                    let ok = |a: usize, b: usize, c: usize| {
                        reliable.is_none_or(|r| r[a + nx * (b + ny * c)])
                    };
                    if !ok(i, j, k) {
                        slab[i + nx * j] = 0.0;
                        continue;
                    }
                    // An unreliable neighbour's value is replaced by the centre's: zero difference.
                    let at = |a: usize, b: usize, c: usize| {
                        if ok(a, b, c) {
                            wrapped[a + nx * (b + ny * c)]
                        } else {
                            wrapped[i + nx * (j + ny * k)]
                        }
                    };
                    let c = at(i, j, k);
                    slab[i + nx * j] = w[0] * (diff(at(ip, j, k) - c) + diff(at(im, j, k) - c))
                        + w[1] * (diff(at(i, jp, k) - c) + diff(at(i, jm, k) - c))
                        + w[2] * (diff(at(i, j, kp) - c) + diff(at(i, j, km) - c));
                }
            }
        });
    out
}

/// One-shot convenience: unwrap one wrapped phase volume (rad) on its grid.
pub fn laplacian_unwrap(phase: &crate::Volume, config: &UnwrapConfig) -> crate::Volume {
    let u = LaplacianUnwrapper::new(phase.dims, phase.geometry.voxel_size, config);
    phase.with_data(u.unwrap(&phase.data))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::physics::fft::Fft3;

    /// A Gaussian bump of `amp` rad plus a gentle ramp, on a 48³ grid.
    fn bump(dims: [usize; 3], amp: f32) -> Vec<f32> {
        let [nx, ny, nz] = dims;
        let mut v = vec![0.0f32; nx * ny * nz];
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    let r2 = (i as f32 - 24.0).powi(2)
                        + (j as f32 - 22.0).powi(2)
                        + (k as f32 - 25.0).powi(2) * 1.5;
                    v[i + nx * (j + ny * k)] = amp * (-r2 / (2.0 * 7.0f32.powi(2))).exp();
                }
            }
        }
        v
    }

    #[test]
    fn recovers_laplacian_and_phase_of_a_20_rad_bump() {
        let dims = [48, 48, 48];
        let vox = [1.0, 1.0, 1.0];
        let truth = bump(dims, 20.0);
        let wrapped: Vec<f32> = truth.iter().map(|&t| wrap(t)).collect();
        let u = LaplacianUnwrapper::new(dims, vox, &UnwrapConfig::default());
        let got = u.unwrap(&wrapped);
        // Laplacians agree.
        let fft = Fft3::new(dims);
        let l = laplacian_kernel(dims, vox);
        let lt = fft.filter(&truth, &l);
        let lg = fft.filter(&got, &l);
        let scale = lt.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
        let err = lt
            .iter()
            .zip(&lg)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(err < 1e-3 * scale, "Laplacian error {err} (scale {scale})");
        // On a periodic grid the only harmonic functions are constants: difference is flat.
        let d: Vec<f32> = got.iter().zip(&truth).map(|(g, t)| g - t).collect();
        let mean = d.iter().sum::<f32>() / d.len() as f32;
        let dev = d.iter().map(|v| (v - mean).abs()).fold(0.0f32, f32::max);
        assert!(dev < 1e-3, "unwrapped − truth varies by {dev} rad");
        // Turn-rounded version is exact (the bump's median is 0).
        let t = u.unwrap_turns(&wrapped, None);
        let e = t
            .iter()
            .zip(&truth)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(e < 1e-4, "turn-rounded error {e}");
    }

    #[test]
    fn sine_form_is_biased_at_steep_gradients_but_close() {
        let dims = [48, 48, 48];
        let truth = bump(dims, 20.0);
        let wrapped: Vec<f32> = truth.iter().map(|&t| wrap(t)).collect();
        let cfg = UnwrapConfig {
            laplacian: LaplacianForm::Sine,
            ..Default::default()
        };
        let u = LaplacianUnwrapper::new(dims, [1.0; 3], &cfg);
        let got = u.unwrap(&wrapped);
        let d: Vec<f32> = got.iter().zip(&truth).map(|(g, t)| g - t).collect();
        let mean = d.iter().sum::<f32>() / d.len() as f32;
        let rms = (d.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / d.len() as f32).sqrt();
        // Gradients reach ~1.7 rad/voxel, where sin(Δ) underestimates Δ by ~40 %; the error
        // stays a modest fraction of the 20 rad bump, and turn rounding removes it.
        assert!(rms > 1e-3 && rms < 2.0, "sine-form rms error {rms}");
        let t = u.unwrap_turns(&wrapped, None);
        let wrong = t
            .iter()
            .zip(&truth)
            .filter(|(a, b)| (*a - *b).abs() > 1e-3)
            .count();
        assert!(
            wrong < truth.len() / 100,
            "{wrong} voxels off by whole turns"
        );
    }

    #[test]
    fn exact_half_turn_steps_do_not_bend_the_solution() {
        // Background of 0 and ±π values (atan2 of signed zeros, or integer phase at −4096):
        // wrapped differences of exactly ±π must cancel.
        let dims = [24, 24, 24];
        let pi = std::f32::consts::PI;
        let wrapped: Vec<f32> = (0..24 * 24 * 24)
            .map(|i| match (i * 7919) % 3 {
                0 => 0.0,
                1 => pi,
                _ => -pi,
            })
            .collect();
        let lap = phase_laplacian(
            &wrapped,
            dims,
            [1.0; 3],
            LaplacianForm::WrappedDifference,
            None,
        );
        let sum: f64 = lap.iter().map(|&v| v as f64).sum();
        assert!(sum.abs() < 1e-2, "net source {sum}");
        let u = LaplacianUnwrapper::new(dims, [1.0; 3], &UnwrapConfig::default());
        let x = u.unwrap(&wrapped);
        let max = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        assert!(max < 4.0, "solution reaches {max} rad");
    }
}
