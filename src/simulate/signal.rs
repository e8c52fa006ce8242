//! The multi-echo gradient-echo signal of a phantom.
//!
//! A scanner samples a band-limited k-space of a continuous object; simulating directly on
//! the output grid would miss the intravoxel dephasing that makes signal voids next to air
//! and bone. So the field and the complex signal are computed on a grid `oversample` times
//! finer (nearest-neighbour subvoxels), Fourier transformed, and only the central k-space
//! block of the output size is kept, as the scanner does. A linear phase ramp in k-space
//! puts each output sample at the centre of its block of subvoxels, not at its first corner.
//!
//! Per echo n: `S_n = M0 · exp(−R2*·TE_n) · (1 − F + F·exp(i2π·f_fat·TE_n)) · exp(i(φ₀ +
//! 2π·f·TE_n))` with F the fat fraction and `f_fat = FAT_SHIFT_PPM · hz_per_ppm(B0)`, `f = field_ppm ·
//! hz_per_ppm(B0)`, R2* scaled by B0/3 T from the phantom's 3 T values. Then complex Gaussian
//! noise with standard deviation σ in each of the real and imaginary parts, where
//! σ = (99th percentile of the noise-free echo-1 magnitude in the brain) / SNR.
//! Echoes are processed one at a time with one reused fine buffer to bound memory.
//!
//! φ₀ is applied after the crop, on the output grid: it is smooth, so multiplying before or
//! after band-limiting is the same up to rounding, and the truth is then exactly φ₀. For an
//! even output size the Nyquist bin is taken from the positive fine frequency, as the
//! scanner's −N/2..N/2−1 sampling does.

use std::f64::consts::PI;

use rayon::prelude::*;

use super::phantom::Phantom;
use super::rng::Rng;
use crate::physics::fft::C32;
use crate::physics::units::{hz_per_ppm, FAT_SHIFT_PPM};
use crate::physics::{ComplexFft3, DipoleOperator};
use crate::volume::voxel_count;
use crate::{Error, Result, Volume};

/// Acquisition and simulation settings of one series.
#[derive(Clone, Debug)]
pub struct SimParams {
    /// Main field, tesla.
    pub field_strength: f64,
    /// Echo times, seconds.
    pub echo_times: Vec<f64>,
    /// Peak signal-to-noise ratio of echo 1 in the brain; infinite means no noise.
    pub snr: f64,
    /// Subvoxels per output voxel along each axis (1 = simulate at the output grid).
    pub oversample: usize,
    /// Add a smooth receive-phase offset φ₀.
    pub phase_offset: bool,
    /// Seeds the noise and the phase offset.
    pub seed: u64,
}

impl Default for SimParams {
    fn default() -> Self {
        SimParams {
            field_strength: 3.0,
            echo_times: vec![0.004, 0.008, 0.012, 0.016, 0.020],
            snr: 100.0,
            oversample: 2,
            phase_offset: true,
            seed: 0,
        }
    }
}

impl SimParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.field_strength > 0.0 && self.field_strength.is_finite()) {
            return Err(Error::Usage(format!(
                "field strength must be positive, got {} T",
                self.field_strength
            )));
        }
        if self.echo_times.is_empty() {
            return Err(Error::Usage("at least one echo time is needed".into()));
        }
        if let Some(te) = self
            .echo_times
            .iter()
            .find(|t| !(**t > 0.0 && t.is_finite()))
        {
            return Err(Error::Usage(format!(
                "echo times must be positive, got {te} s"
            )));
        }
        if self.snr.is_nan() || self.snr <= 0.0 {
            return Err(Error::Usage(format!(
                "SNR must be positive (or inf for no noise), got {}",
                self.snr
            )));
        }
        if !(1..=8).contains(&self.oversample) {
            return Err(Error::Usage(format!(
                "oversampling factor must be 1..8, got {}",
                self.oversample
            )));
        }
        Ok(())
    }
}

/// What a perfect method would recover, on the output grid.
#[derive(Clone, Debug)]
pub struct Truth {
    /// Brain susceptibility, ppm (0 outside the brain).
    pub chi: Volume,
    /// `D * χ_brain`, ppm: the field a background-removal step should leave.
    pub local_field_ppm: Volume,
    /// The fine-grid field of all sources averaged over each output voxel, ppm.
    pub total_field_ppm: Volume,
    pub mask: Vec<bool>,
}

/// One simulated multi-echo series.
#[derive(Clone, Debug)]
pub struct Series {
    pub magnitude: Vec<Volume>,
    /// Wrapped phase in radians, in [−π, π).
    pub phase: Vec<Volume>,
    pub truth: Truth,
    /// Noise standard deviation per real/imaginary channel (0 without noise).
    pub noise_sigma: f64,
    /// The B0 direction (unit, voxel frame) the series was simulated for.
    pub b0_direction: [f64; 3],
}

/// Simulates one series of `phantom` for the B0 direction `b0_dir` (voxel frame). The
/// outputs carry the phantom's geometry.
pub fn simulate_series(phantom: &Phantom, params: &SimParams, b0_dir: [f64; 3]) -> Result<Series> {
    simulate_series_fine(phantom, None, params, b0_dir)
}

/// [`simulate_series`] with the subvoxels taken from `fine`, the same head evaluated on the
/// grid `oversample` times finer (the procedural head, which is analytic), instead of
/// copied from `phantom`'s voxels. Copied subvoxels give every interface the output grid's
/// staircase, whose intravoxel dephasing is locked to the grid: a head turned inside the
/// grid then keeps part of its magnitude where the upright head had it.
pub fn simulate_series_fine(
    phantom: &Phantom,
    fine: Option<&Phantom>,
    params: &SimParams,
    b0_dir: [f64; 3],
) -> Result<Series> {
    params.validate()?;
    let norm = b0_dir.iter().map(|v| v * v).sum::<f64>().sqrt();
    if !(norm > 0.0 && norm.is_finite()) {
        return Err(Error::Usage(format!(
            "B0 direction must be a non-zero vector, got {b0_dir:?}"
        )));
    }
    let b0 = b0_dir.map(|v| v / norm);
    let dims = phantom.dims();
    if dims.contains(&0) {
        return Err(Error::Usage("the phantom grid is empty".into()));
    }
    let geometry = phantom.geometry().clone();
    let voxel = geometry.voxel_size;
    let s = params.oversample;
    let fdims = dims.map(|n| n * s);
    let n = voxel_count(dims);

    let fine_phantom = fine.filter(|_| s > 1);
    if let Some(f) = fine_phantom {
        if f.dims() != fdims {
            return Err(Error::Usage(format!(
                "the fine phantom is {:?}, not the {fdims:?} of {s}× oversampling",
                f.dims()
            )));
        }
    }
    let field_fine = {
        let chi_fine = match fine_phantom {
            Some(f) => f.chi_total.data.clone(),
            None => upsample(&phantom.chi_total.data, dims, s),
        };
        DipoleOperator::new(fdims, voxel.map(|v| v / s as f64), b0).forward(&chi_fine)
    };
    let total_field = block_mean(&field_fine, dims, s);
    let local_field = DipoleOperator::new(dims, voxel, b0).forward(&phantom.chi_local.data);

    let hz = hz_per_ppm(params.field_strength);
    let r2_scale = (params.field_strength / 3.0) as f32;
    let offset = params.phase_offset.then(|| phase_offset(dims, params.seed));
    let cropper = (s > 1).then(|| Cropper::new(dims, s));
    let mut fine = if s > 1 {
        vec![C32::new(0.0, 0.0); voxel_count(fdims)]
    } else {
        Vec::new()
    };
    let mut sigma = None;
    let mut magnitude = Vec::with_capacity(params.echo_times.len());
    let mut phase = Vec::with_capacity(params.echo_times.len());
    for (e, &te) in params.echo_times.iter().enumerate() {
        let w = 2.0 * PI * hz * te;
        // Water and fat share a voxel's field; fat also lags by its chemical shift.
        let fat_turn = C32::from_polar(1.0, (w * FAT_SHIFT_PPM) as f32);
        let decay_of = |p: &Phantom, c: usize| {
            let a = p.m0[c] * (-p.r2star[c] * r2_scale * te as f32).exp();
            let f = p.fat_fraction[c];
            (C32::new(1.0 - f, 0.0) + fat_turn * f) * a
        };
        let decay = |c: usize| decay_of(phantom, c);
        let mut sig = match &cropper {
            Some(crop) => {
                let [fx, fy, _] = fdims;
                fine.par_chunks_mut(fx * fy)
                    .enumerate()
                    .for_each(|(kf, slab)| {
                        let k = kf / s;
                        for jf in 0..fy {
                            let j = jf / s;
                            let row = dims[0] * (j + dims[1] * k);
                            for i_f in 0..fx {
                                let c = row + i_f / s;
                                let v = i_f + fx * (jf + fy * kf);
                                let ph = w * field_fine[v] as f64;
                                let d = match fine_phantom {
                                    Some(f) => decay_of(f, v),
                                    None => decay(c),
                                };
                                slab[i_f + fx * jf] = d * C32::from_polar(1.0, ph as f32);
                            }
                        }
                    });
                crop.apply(&mut fine)
            }
            None => (0..n)
                .into_par_iter()
                .map(|c| decay(c) * C32::from_polar(1.0, (w * field_fine[c] as f64) as f32))
                .collect(),
        };
        if let Some(o) = &offset {
            sig.par_iter_mut()
                .zip(o.par_iter())
                .for_each(|(x, &p)| *x *= C32::from_polar(1.0, p));
        }
        let sigma = *sigma.get_or_insert_with(|| {
            let peak = robust_peak(&sig, &phantom.brain_mask);
            if params.snr.is_finite() {
                peak / params.snr
            } else {
                0.0
            }
        });
        if sigma > 0.0 {
            add_noise(&mut sig, sigma as f32, params.seed, e as u64);
        }
        let (m, p): (Vec<f32>, Vec<f32>) = sig
            .par_iter()
            .map(|x| {
                let mut p = x.im.atan2(x.re);
                if p >= std::f32::consts::PI {
                    p = -std::f32::consts::PI;
                }
                (x.norm(), p)
            })
            .unzip();
        magnitude.push(Volume::new(dims, m, geometry.clone()));
        phase.push(Volume::new(dims, p, geometry.clone()));
    }
    Ok(Series {
        magnitude,
        phase,
        truth: Truth {
            chi: phantom.chi_local.clone(),
            local_field_ppm: Volume::new(dims, local_field, geometry.clone()),
            total_field_ppm: Volume::new(dims, total_field, geometry),
            mask: phantom.brain_mask.clone(),
        },
        noise_sigma: sigma.unwrap_or(0.0),
        b0_direction: b0,
    })
}

/// Nearest-neighbour upsampling by `s` along each axis.
pub(crate) fn upsample(data: &[f32], dims: [usize; 3], s: usize) -> Vec<f32> {
    if s == 1 {
        return data.to_vec();
    }
    let [fx, fy, fz] = dims.map(|n| n * s);
    let mut out = vec![0.0f32; fx * fy * fz];
    out.par_chunks_mut(fx * fy)
        .enumerate()
        .for_each(|(kf, slab)| {
            let k = kf / s;
            for jf in 0..fy {
                let row = dims[0] * (jf / s + dims[1] * k);
                for i_f in 0..fx {
                    slab[i_f + fx * jf] = data[row + i_f / s];
                }
            }
        });
    out
}

/// Mean of each `s³` block of a fine volume: the output-grid value of a fine quantity.
fn block_mean(fine: &[f32], dims: [usize; 3], s: usize) -> Vec<f32> {
    if s == 1 {
        return fine.to_vec();
    }
    let [fx, fy, _] = dims.map(|n| n * s);
    let scale = 1.0 / (s * s * s) as f64;
    let mut out = vec![0.0f32; voxel_count(dims)];
    out.par_chunks_mut(dims[0] * dims[1])
        .enumerate()
        .for_each(|(k, slab)| {
            for j in 0..dims[1] {
                for i in 0..dims[0] {
                    let mut acc = 0.0f64;
                    for kk in k * s..(k + 1) * s {
                        for jj in j * s..(j + 1) * s {
                            let row = fx * (jj + fy * kk);
                            for ii in i * s..(i + 1) * s {
                                acc += fine[row + ii] as f64;
                            }
                        }
                    }
                    slab[i + dims[0] * j] = (acc * scale) as f32;
                }
            }
        });
    out
}

/// Keeps the central k-space block of a fine grid: the output grid's frequencies.
pub(crate) struct Cropper {
    dims: [usize; 3],
    fine_dims: [usize; 3],
    fine: ComplexFft3,
    coarse: ComplexFft3,
    /// Per axis, for each output bin: the fine bin and the centring phase ramp.
    axes: [Vec<(usize, C32)>; 3],
    scale: f32,
}

impl Cropper {
    pub(crate) fn new(dims: [usize; 3], s: usize) -> Self {
        let axis = |a: usize| -> Vec<(usize, C32)> {
            let n = dims[a];
            let nf = n * s;
            // Output sample i should sit at fine coordinate s·i + (s−1)/2 (its block's
            // centre); shifting by δ multiplies bin m by exp(+2πi·m·δ/nf).
            let delta = (s as f64 - 1.0) / 2.0;
            (0..n)
                .map(|i| {
                    let m = crate::physics::fft::signed_index(i, n);
                    let fi = if m >= 0.0 {
                        m as usize
                    } else {
                        (nf as f64 + m) as usize
                    };
                    let ph = 2.0 * PI * m * delta / nf as f64;
                    (fi, C32::from_polar(1.0, ph as f32))
                })
                .collect()
        };
        Cropper {
            dims,
            fine_dims: dims.map(|n| n * s),
            fine: ComplexFft3::new(dims.map(|n| n * s)),
            coarse: ComplexFft3::new(dims),
            axes: [axis(0), axis(1), axis(2)],
            // Forward sums over the fine voxels, inverse divides by the output voxels.
            scale: 1.0 / (s * s * s) as f32,
        }
    }

    /// Crops the fine signal (clobbered: it is transformed in place) to the output grid.
    pub(crate) fn apply(&self, fine: &mut [C32]) -> Vec<C32> {
        let [nx, ny, _] = self.dims;
        let [fnx, fny, _] = self.fine_dims;
        self.fine.forward(fine);
        let mut out = vec![C32::new(0.0, 0.0); voxel_count(self.dims)];
        let fine: &[C32] = fine;
        out.par_chunks_mut(nx * ny)
            .enumerate()
            .for_each(|(k, slab)| {
                let (kf, rz) = self.axes[2][k];
                for j in 0..ny {
                    let (jf, ry) = self.axes[1][j];
                    let ryz = ry * rz * self.scale;
                    for i in 0..nx {
                        let (i_f, rx) = self.axes[0][i];
                        slab[i + nx * j] = fine[i_f + fnx * (jf + fny * kf)] * rx * ryz;
                    }
                }
            });
        self.coarse.inverse(&mut out);
        out
    }
}

/// A smooth receive-phase offset φ₀ (rad): a random constant plus linear and quadratic
/// terms in coordinates normalised to [−1, 1] over the field of view.
fn phase_offset(dims: [usize; 3], seed: u64) -> Vec<f32> {
    let mut rng = Rng::derived(seed, &[0x5068_6173]);
    let c0 = rng.range(-PI, PI);
    let lin: Vec<f64> = (0..3).map(|_| rng.range(-0.8, 0.8)).collect();
    let quad: Vec<f64> = (0..6).map(|_| rng.range(-0.4, 0.4)).collect();
    let u = |i: usize, n: usize| {
        if n > 1 {
            2.0 * i as f64 / (n as f64 - 1.0) - 1.0
        } else {
            0.0
        }
    };
    let mut out = vec![0.0f32; voxel_count(dims)];
    out.par_chunks_mut(dims[0] * dims[1])
        .enumerate()
        .for_each(|(k, slab)| {
            let z = u(k, dims[2]);
            for j in 0..dims[1] {
                let y = u(j, dims[1]);
                for i in 0..dims[0] {
                    let x = u(i, dims[0]);
                    let p = c0
                        + lin[0] * x
                        + lin[1] * y
                        + lin[2] * z
                        + quad[0] * x * x
                        + quad[1] * y * y
                        + quad[2] * z * z
                        + quad[3] * x * y
                        + quad[4] * y * z
                        + quad[5] * x * z;
                    slab[i + dims[0] * j] = p as f32;
                }
            }
        });
    out
}

/// The 99th percentile of |S| in the mask (all voxels if the mask is empty): a peak that a
/// few bright outliers do not move.
fn robust_peak(sig: &[C32], mask: &[bool]) -> f64 {
    let mut m: Vec<f32> = sig
        .iter()
        .zip(mask)
        .filter(|(_, &b)| b)
        .map(|(x, _)| x.norm())
        .collect();
    if m.is_empty() {
        m = sig.iter().map(|x| x.norm()).collect();
    }
    if m.is_empty() {
        return 0.0;
    }
    let idx = ((m.len() - 1) as f64 * 0.99).round() as usize;
    let (_, v, _) = m.select_nth_unstable_by(idx, |a, b| a.total_cmp(b));
    *v as f64
}

const NOISE_CHUNK: usize = 1 << 16;

/// Adds complex Gaussian noise (σ per channel). Each fixed-size chunk has its own stream,
/// so the result is the same for any number of threads.
fn add_noise(sig: &mut [C32], sigma: f32, seed: u64, echo: u64) {
    sig.par_chunks_mut(NOISE_CHUNK)
        .enumerate()
        .for_each(|(c, chunk)| {
            let mut rng = Rng::derived(seed, &[0x4e6f_6973, echo, c as u64]);
            for x in chunk {
                let (a, b) = rng.normal_pair();
                *x += C32::new(sigma * a as f32, sigma * b as f32);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Geometry;

    fn params(snr: f64, oversample: usize, echo_times: Vec<f64>) -> SimParams {
        SimParams {
            field_strength: 3.0,
            echo_times,
            snr,
            oversample,
            phase_offset: false,
            seed: 7,
        }
    }

    fn head() -> Phantom {
        Phantom::procedural([32, 32, 24], [6.0, 6.0, 6.0], 1).unwrap()
    }

    #[test]
    fn phase_is_the_dipole_field_without_oversampling_noise_or_offset() {
        let ph = head();
        let te = 1e-4;
        let b0 = [0.1, -0.2, 0.97];
        let series = simulate_series(&ph, &params(f64::INFINITY, 1, vec![te]), b0).unwrap();
        let op = DipoleOperator::new(ph.dims(), [6.0; 3], series.b0_direction);
        let want = op.forward(&ph.chi_total.data);
        let scale = 2.0 * PI * te * hz_per_ppm(3.0);
        let mut checked = 0;
        for v in 0..want.len() {
            // Fat's phase carries its chemical shift too (tested on its own below).
            if series.magnitude[0].data[v] > 0.05 && ph.fat_fraction[v] == 0.0 {
                let got = series.phase[0].data[v] as f64 / scale;
                assert!(
                    (got - want[v] as f64).abs() < 1e-3,
                    "voxel {v}: {got} vs {}",
                    want[v]
                );
                checked += 1;
            }
            assert!((series.truth.total_field_ppm.data[v] - want[v]).abs() < 1e-6);
        }
        assert!(checked > 4000, "{checked}");
        // Magnitude is M0 decayed by R2*.
        let v = (0..want.len()).find(|&v| ph.brain_mask[v]).unwrap();
        let m = ph.m0[v] * (-ph.r2star[v] * te as f32).exp();
        assert!((series.magnitude[0].data[v] - m).abs() < 1e-5);
        // Truth: χ and the local field of the brain alone.
        assert_eq!(series.truth.chi.data, ph.chi_local.data);
        let local = op.forward(&ph.chi_local.data);
        assert_eq!(series.truth.local_field_ppm.data, local);
    }

    #[test]
    fn fat_lags_water_by_its_chemical_shift_and_cancels_it_out_of_phase() {
        let dims = [4, 4, 4];
        let n = voxel_count(dims);
        let g = crate::Geometry::from_voxel_size([1.0; 3]);
        // Half the voxels pure fat, half a 50/50 mixture; no field (χ = 0 everywhere).
        let fat: Vec<f32> = (0..n).map(|v| if v % 2 == 0 { 1.0 } else { 0.5 }).collect();
        let ph = Phantom {
            chi_total: Volume::new(dims, vec![0.0; n], g.clone()),
            chi_local: Volume::new(dims, vec![0.0; n], g),
            brain_mask: vec![true; n],
            m0: vec![1.0; n],
            r2star: vec![0.0; n],
            fat_fraction: fat,
        };
        let f_fat = FAT_SHIFT_PPM * hz_per_ppm(3.0);
        // A quarter turn, then out of phase (half a turn), then back in phase.
        let tes: Vec<f64> = [0.25, 0.5, 1.0].iter().map(|t| t / f_fat.abs()).collect();
        let s = simulate_series(&ph, &params(f64::INFINITY, 1, tes), [0.0, 0.0, 1.0]).unwrap();
        let want_fat_phase = -PI / 2.0; // fat precesses slower: its phase runs negative
        assert!((s.phase[0].data[0] as f64 - want_fat_phase).abs() < 1e-4);
        assert!((s.magnitude[0].data[0] - 1.0).abs() < 1e-5);
        // 50/50 voxel: |0.5 + 0.5·e^{iθ}| = |cos(θ/2)|.
        let half = [0.5f64.sqrt(), 0.0, 1.0];
        for (e, want) in half.iter().enumerate() {
            let got = s.magnitude[e].data[1] as f64;
            assert!((got - want).abs() < 1e-4, "echo {e}: {got} vs {want}");
        }
    }

    #[test]
    fn kspace_crop_of_an_upsampled_constant_is_the_constant() {
        for dims in [[6, 5, 4], [8, 8, 8]] {
            for s in [2, 3] {
                let n = voxel_count(dims);
                let re = upsample(&vec![0.7; n], dims, s);
                let mut fine: Vec<C32> = re.iter().map(|&r| C32::new(r, -0.2)).collect();
                let out = Cropper::new(dims, s).apply(&mut fine);
                for x in out {
                    assert!(
                        (x - C32::new(0.7, -0.2)).norm() < 1e-5,
                        "{dims:?} s={s}: {x}"
                    );
                }
            }
        }
    }

    #[test]
    fn kspace_crop_keeps_samples_at_block_centres() {
        // A cosine along x, upsampled by replication: the box average attenuates it but
        // must not shift it, so no sine component and no imaginary part appear.
        let dims = [16, 4, 4];
        let n = voxel_count(dims);
        let w = 2.0 * PI / 16.0;
        let vals: Vec<f32> = (0..n).map(|v| ((v % 16) as f64 * w).cos() as f32).collect();
        let fine_re = upsample(&vals, dims, 2);
        let mut fine: Vec<C32> = fine_re.iter().map(|&r| C32::new(r, 0.0)).collect();
        let out = Cropper::new(dims, 2).apply(&mut fine);
        let (mut a, mut b) = (0.0, 0.0);
        for (v, x) in out.iter().enumerate() {
            let t = (v % 16) as f64 * w;
            a += x.re as f64 * t.cos();
            b += x.re as f64 * t.sin();
            assert!(x.im.abs() < 1e-5, "imaginary part {}", x.im);
        }
        assert!(a > 0.0 && (b / a).abs() < 1e-4, "cos {a}, sin {b}");
    }

    #[test]
    fn noise_sigma_matches_the_requested_snr() {
        let ph = head();
        let clean = simulate_series(
            &ph,
            &params(f64::INFINITY, 1, vec![0.004, 0.01]),
            [0.0, 0.0, 1.0],
        )
        .unwrap();
        let snr = 25.0;
        let noisy =
            simulate_series(&ph, &params(snr, 1, vec![0.004, 0.01]), [0.0, 0.0, 1.0]).unwrap();
        let c = |s: &Series, e: usize, v: usize| {
            C32::from_polar(s.magnitude[e].data[v], s.phase[e].data[v])
        };
        let sig: Vec<C32> = (0..ph.m0.len()).map(|v| c(&clean, 0, v)).collect();
        let want = robust_peak(&sig, &ph.brain_mask) / snr;
        // The clean signal is rebuilt from f32 magnitude and phase: equal up to rounding.
        assert!((noisy.noise_sigma - want).abs() < 1e-4 * want);
        for e in 0..2 {
            let (mut sr, mut si, mut cnt) = (0.0, 0.0, 0.0);
            for v in 0..ph.m0.len() {
                let d = c(&noisy, e, v) - c(&clean, e, v);
                sr += (d.re as f64).powi(2);
                si += (d.im as f64).powi(2);
                cnt += 1.0;
            }
            for got in [(sr / cnt).sqrt(), (si / cnt).sqrt()] {
                assert!((got / want - 1.0).abs() < 0.03, "σ {got} vs {want}");
            }
        }
    }

    #[test]
    fn seeds_are_reproducible_and_distinct() {
        let ph = head();
        let mut p = params(50.0, 2, vec![0.005]);
        p.phase_offset = true;
        let a = simulate_series(&ph, &p, [0.0, 0.0, 1.0]).unwrap();
        let b = simulate_series(&ph, &p, [0.0, 0.0, 1.0]).unwrap();
        p.seed += 1;
        let c = simulate_series(&ph, &p, [0.0, 0.0, 1.0]).unwrap();
        assert_eq!(a.phase[0].data, b.phase[0].data);
        assert_eq!(a.magnitude[0].data, b.magnitude[0].data);
        assert_ne!(a.phase[0].data, c.phase[0].data);
        assert!(a.phase[0]
            .data
            .iter()
            .all(|&p| (-std::f32::consts::PI..std::f32::consts::PI).contains(&p)));
    }

    #[test]
    fn sphere_dipole_pattern_follows_b0() {
        let dims = [32, 32, 32];
        let n = voxel_count(dims);
        let g = Geometry::from_voxel_size([1.0; 3]);
        let mut chi = vec![0.0f32; n];
        let idx = |i: usize, j: usize, k: usize| i + 32 * (j + 32 * k);
        for k in 0..32 {
            for j in 0..32 {
                for i in 0..32 {
                    let r2 = [i, j, k]
                        .iter()
                        .map(|&c| (c as f64 - 16.0).powi(2))
                        .sum::<f64>();
                    if r2 < 16.0 {
                        chi[idx(i, j, k)] = 1.0;
                    }
                }
            }
        }
        let ph = Phantom {
            chi_total: Volume::new(dims, chi.clone(), g.clone()),
            chi_local: Volume::new(dims, chi, g),
            brain_mask: vec![true; n],
            m0: vec![1.0; n],
            r2star: vec![0.0; n],
            fat_fraction: vec![0.0; n],
        };
        let p = params(f64::INFINITY, 2, vec![0.001]);
        let along_z = idx(16, 16, 24);
        let along_x = idx(24, 16, 16);
        let z = simulate_series(&ph, &p, [0.0, 0.0, 1.0]).unwrap();
        assert!(z.phase[0].data[along_z] > 0.0 && z.phase[0].data[along_x] < 0.0);
        assert!(z.truth.local_field_ppm.data[along_z] > 0.0);
        let x = simulate_series(&ph, &p, [1.0, 0.0, 0.0]).unwrap();
        assert!(x.phase[0].data[along_x] > 0.0 && x.phase[0].data[along_z] < 0.0);
        assert!(x.truth.total_field_ppm.data[along_x] > 0.0);
    }

    #[test]
    fn fine_subvoxels_copied_from_the_voxels_give_the_plain_simulation() {
        let ph = head();
        let p = params(f64::INFINITY, 2, vec![0.004, 0.01]);
        let up = |v: &[f32]| upsample(v, ph.dims(), 2);
        let fdims = ph.dims().map(|n| 2 * n);
        let g = crate::Geometry::from_voxel_size([3.0; 3]);
        let fine = Phantom {
            chi_total: Volume::new(fdims, up(&ph.chi_total.data), g.clone()),
            chi_local: Volume::new(fdims, up(&ph.chi_local.data), g),
            brain_mask: Vec::new(),
            m0: up(&ph.m0),
            r2star: up(&ph.r2star),
            fat_fraction: up(&ph.fat_fraction),
        };
        let a = simulate_series(&ph, &p, [0.1, 0.0, 1.0]).unwrap();
        let b = simulate_series_fine(&ph, Some(&fine), &p, [0.1, 0.0, 1.0]).unwrap();
        for e in 0..2 {
            assert_eq!(a.magnitude[e].data, b.magnitude[e].data);
            assert_eq!(a.phase[e].data, b.phase[e].data);
        }
        // A fine phantom on another grid than the oversampling's is refused.
        let q = params(f64::INFINITY, 3, vec![0.004]);
        assert!(simulate_series_fine(&ph, Some(&fine), &q, [0.0, 0.0, 1.0]).is_err());
    }

    #[test]
    fn oversampled_phase_follows_the_field_inside_the_brain() {
        let ph = Phantom::procedural([64, 64, 48], [3.0; 3], 1).unwrap();
        let te = 0.002;
        let s = simulate_series(&ph, &params(f64::INFINITY, 2, vec![te]), [0.0, 0.0, 1.0]).unwrap();
        let scale = 2.0 * PI * te * hz_per_ppm(3.0);
        // Interior voxels: the brain eroded by two voxels, away from the skull's edge.
        let d = ph.dims();
        let interior = |v: usize| {
            let (i, j, k) = (v % d[0], (v / d[0]) % d[1], v / (d[0] * d[1]));
            (i >= 2 && j >= 2 && k >= 2 && i + 2 < d[0] && j + 2 < d[1] && k + 2 < d[2])
                && [-2i64, 0, 2].iter().all(|&o| {
                    [1i64, d[0] as i64, (d[0] * d[1]) as i64]
                        .iter()
                        .all(|&st| ph.brain_mask[(v as i64 + o * st) as usize])
                })
        };
        let mut errs: Vec<f64> = (0..ph.m0.len())
            .filter(|&v| interior(v))
            .map(|v| {
                (s.phase[0].data[v] as f64 / scale - s.truth.total_field_ppm.data[v] as f64).abs()
            })
            .collect();
        errs.sort_by(f64::total_cmp);
        let median = errs[errs.len() / 2];
        assert!(median < 0.01, "median |phase field − truth| {median} ppm");
        // Magnitude is preserved in the interior (uniform tissue away from edges).
        let m: f64 = (0..ph.m0.len())
            .filter(|&v| ph.brain_mask[v])
            .map(|v| s.magnitude[0].data[v] as f64)
            .sum::<f64>();
        let m0: f64 = (0..ph.m0.len())
            .filter(|&v| ph.brain_mask[v])
            .map(|v| (ph.m0[v] * (-ph.r2star[v] * te as f32).exp()) as f64)
            .sum();
        assert!((m / m0 - 1.0).abs() < 0.05, "{m} vs {m0}");
    }
}
