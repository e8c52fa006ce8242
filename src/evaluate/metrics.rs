//! The QSM reconstruction challenges' metrics, each comparing a map `x` with a reference `r`
//! over a region (the evaluation mask). Definitions follow the challenges' public evaluation
//! code (2016: Langkammer et al., MRM 2018; 2019 "challenge 2.0": Bilgic et al. and Marques
//! et al., MRM 2021; XSIM: Milovic et al., MRM 2024); README.md lists them and the choices made
//! where that code left room.
//!
//! Sums run in f64. A value that is undefined for the given maps (e.g. the correlation of a
//! constant map) is NaN; callers print it as "n/a" and write it to JSON as `null`.

use super::filter;

/// Gaussian window of SSIM and XSIM: σ = 1.5 voxels.
pub const WINDOW_SIGMA: f64 = 1.5;
/// XSIM's window half-width (7³ voxels), as in the challenge 2.0 code.
pub const XSIM_HALF_WIDTH: usize = 3;
/// SSIM's window half-width (11³ voxels), the standard SSIM window.
pub const SSIM_HALF_WIDTH: usize = 5;
/// HFEN's Laplacian-of-Gaussian: σ = 1.5 voxels on a 15³ kernel.
pub const HFEN_SIGMA: f64 = 1.5;
pub const HFEN_HALF_WIDTH: usize = 7;

fn masked<'a>(
    x: &'a [f32],
    r: &'a [f32],
    region: &'a [bool],
) -> impl Iterator<Item = (f64, f64)> + 'a {
    x.iter()
        .zip(r)
        .zip(region)
        .filter(|(_, &m)| m)
        .map(|((&a, &b), _)| (a as f64, b as f64))
}

fn means(x: &[f32], r: &[f32], region: &[bool]) -> (f64, f64, usize) {
    let (sx, sr, n) = masked(x, r, region).fold((0.0, 0.0, 0usize), |(sx, sr, n), (a, b)| {
        (sx + a, sr + b, n + 1)
    });
    if n == 0 {
        (f64::NAN, f64::NAN, 0)
    } else {
        (sx / n as f64, sr / n as f64, n)
    }
}

/// Centred second moments over `region`: (Σx̃², Σr̃², Σx̃r̃) with x̃ = x − x̄, r̃ = r − r̄, and
/// the means (x̄, r̄).
fn centred_moments(x: &[f32], r: &[f32], region: &[bool]) -> ([f64; 3], (f64, f64)) {
    let (mx, mr, _) = means(x, r, region);
    let m = masked(x, r, region).fold([0.0; 3], |[xx, rr, xr], (a, b)| {
        let (a, b) = (a - mx, b - mr);
        [xx + a * a, rr + b * b, xr + a * b]
    });
    (m, (mx, mr))
}

/// `100·‖(a·x + b) − r‖ / ‖r − r̄‖` over `region`, accumulated directly (no cancellation
/// for near-identical maps).
fn relative_error(x: &[f32], r: &[f32], region: &[bool], a: f64, b: f64, mr: f64) -> f64 {
    let (e, n) = masked(x, r, region).fold((0.0, 0.0), |(e, n), (u, v)| {
        let d = a * u + b - v;
        (e + d * d, n + (v - mr) * (v - mr))
    });
    100.0 * (e / n).sqrt()
}

/// Challenge RMSE in percent: `100·‖x − r‖ / ‖r‖` over `region`, no demeaning.
pub fn rmse(x: &[f32], reference: &[f32], region: &[bool]) -> f64 {
    relative_error(x, reference, region, 1.0, 0.0, 0.0)
}

/// Demeaned NRMSE in percent: `100·‖(x − x̄) − (r − r̄)‖ / ‖r − r̄‖` over `region`, the means
/// taken over `region`. χ maps are defined up to a constant, so both are demeaned first.
pub fn nrmse_demeaned(x: &[f32], reference: &[f32], region: &[bool]) -> f64 {
    let (mx, mr, _) = means(x, reference, region);
    relative_error(x, reference, region, 1.0, mr - mx, mr)
}

/// Detrended NRMSE in percent and the fitted scale: the demeaned map is first scaled by the
/// least-squares factor `a = Σx̃r̃ / Σx̃²` (the regression of r on x, so `a·x + b` is the affine
/// copy of x closest to r), then `100·‖a·x̃ − r̃‖ / ‖r̃‖`. This forgives a global scale error,
/// typical of regularised inversions, and equals `100·√(1 − ρ²)` with ρ the correlation.
/// A constant map has nothing to scale: a = 0 and the score is 100 %.
pub fn nrmse_detrended(x: &[f32], reference: &[f32], region: &[bool]) -> (f64, f64) {
    let ([xx, _, xr], (mx, mr)) = centred_moments(x, reference, region);
    let a = if xx > 0.0 { xr / xx } else { 0.0 };
    (relative_error(x, reference, region, a, mr - a * mx, mr), a)
}

/// Pearson correlation over `region`.
pub fn correlation(x: &[f32], reference: &[f32], region: &[bool]) -> f64 {
    let ([xx, rr, xr], _) = centred_moments(x, reference, region);
    xr / (xx * rr).sqrt()
}

/// `v` as f64 with voxels outside `region` set to 0: the challenges compare brain-masked maps,
/// so values outside the mask must not leak into the filtered maps.
fn masked_f64(v: &[f32], region: &[bool]) -> Vec<f64> {
    v.iter()
        .zip(region)
        .map(|(&a, &m)| if m { a as f64 } else { 0.0 })
        .collect()
}

/// Constants and window of one structural-similarity variant.
#[derive(Clone, Copy, Debug)]
pub struct SimilarityParams {
    pub k1: f64,
    pub k2: f64,
    /// Dynamic range L: C1 = (K1·L)², C2 = (K2·L)².
    pub range: f64,
    pub sigma: f64,
    pub half_width: usize,
}

/// XSIM (challenge 2.0): maps in native ppm, L = 1 ppm, K = (0.01, 0.001), 7³ Gaussian.
pub const XSIM: SimilarityParams = SimilarityParams {
    k1: 0.01,
    k2: 0.001,
    range: 1.0,
    sigma: WINDOW_SIGMA,
    half_width: XSIM_HALF_WIDTH,
};

/// Classic SSIM on maps rescaled to [0, 1]: L = 1, K = (0.01, 0.03), 11³ Gaussian.
pub const SSIM: SimilarityParams = SimilarityParams {
    k1: 0.01,
    k2: 0.03,
    range: 1.0,
    sigma: WINDOW_SIGMA,
    half_width: SSIM_HALF_WIDTH,
};

/// Gaussian-weighted local mean and local mean of squares of one map.
struct Local {
    mean: Vec<f64>,
    sq: Vec<f64>,
}

fn blur(v: &[f64], dims: [usize; 3], p: SimilarityParams) -> Vec<f64> {
    let g = filter::gaussian_1d(p.sigma, p.half_width);
    filter::separable(v, dims, [&g, &g, &g])
}

fn local(v: &[f64], dims: [usize; 3], p: SimilarityParams) -> Local {
    let sq: Vec<f64> = v.iter().map(|a| a * a).collect();
    Local {
        mean: blur(v, dims, p),
        sq: blur(&sq, dims, p),
    }
}

/// Mean over `region` of `(2μxμr + C1)(2σxr + C2) / ((μx² + μr² + C1)(σx² + σr² + C2))`,
/// given both maps and their local statistics.
fn similarity_with(
    (x, lx): (&[f64], &Local),
    (r, lr): (&[f64], &Local),
    region: &[bool],
    dims: [usize; 3],
    p: SimilarityParams,
) -> f64 {
    let xr: Vec<f64> = x.iter().zip(r).map(|(a, b)| a * b).collect();
    let sxr = blur(&xr, dims, p);
    let c1 = (p.k1 * p.range).powi(2);
    let c2 = (p.k2 * p.range).powi(2);
    let (mut sum, mut n) = (0.0, 0usize);
    for i in (0..x.len()).filter(|&i| region[i]) {
        let (ux, ur) = (lx.mean[i], lr.mean[i]);
        let vx = lx.sq[i] - ux * ux;
        let vr = lr.sq[i] - ur * ur;
        let cxr = sxr[i] - ux * ur;
        sum +=
            (2.0 * ux * ur + c1) * (2.0 * cxr + c2) / ((ux * ux + ur * ur + c1) * (vx + vr + c2));
        n += 1;
    }
    sum / n as f64
}

/// Mean over `region` of the local similarity map
/// `(2μxμr + C1)(2σxr + C2) / ((μx² + μr² + C1)(σx² + σr² + C2))`, where the local means,
/// variances and covariance are Gaussian-weighted over the window (zero outside the volume).
/// The maps are used as given (no masking, no scaling).
pub fn similarity_index(
    x: &[f64],
    r: &[f64],
    region: &[bool],
    dims: [usize; 3],
    p: SimilarityParams,
) -> f64 {
    let (lx, lr) = (local(x, dims, p), local(r, dims, p));
    similarity_with((x, &lx), (r, &lr), region, dims, p)
}

/// The reference with everything the filtered metrics need from it computed once, so that
/// scoring several maps filters the reference only once.
pub struct Reference<'a> {
    data: &'a [f32],
    region: &'a [bool],
    dims: [usize; 3],
    /// LoG of the masked reference (HFEN).
    log: Vec<f64>,
    /// Local statistics of the masked reference in ppm (XSIM).
    xsim: Local,
    /// The reference range [lo, hi] in the region and the local statistics of the rescaled
    /// reference (SSIM); None for a constant reference.
    ssim: Option<((f64, f64), Local)>,
}

impl<'a> Reference<'a> {
    pub fn new(data: &'a [f32], region: &'a [bool], dims: [usize; 3]) -> Self {
        let masked = masked_f64(data, region);
        let log = filter::log_filter(&masked, dims, HFEN_SIGMA, HFEN_HALF_WIDTH);
        let xsim = local(&masked, dims, XSIM);
        let (lo, hi) = data
            .iter()
            .zip(region)
            .filter(|(_, &m)| m)
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (&v, _)| {
                (lo.min(v as f64), hi.max(v as f64))
            });
        let ssim = (hi > lo).then(|| {
            let scaled = to_unit_range(data, region, (lo, hi));
            ((lo, hi), local(&scaled, dims, SSIM))
        });
        Reference {
            data,
            region,
            dims,
            log,
            xsim,
            ssim,
        }
    }

    /// High-frequency error norm in percent: both maps, zero outside the region, are filtered
    /// with the challenges' Laplacian-of-Gaussian (σ = 1.5 voxels, 15³ kernel, zero padding),
    /// then `100·‖LoG x − LoG r‖ / ‖LoG r‖` over the region.
    pub fn hfen(&self, x: &[f32]) -> f64 {
        let lx = filter::log_filter(
            &masked_f64(x, self.region),
            self.dims,
            HFEN_SIGMA,
            HFEN_HALF_WIDTH,
        );
        let (e, n) = lx
            .iter()
            .zip(&self.log)
            .zip(self.region)
            .filter(|(_, &m)| m)
            .fold((0.0, 0.0), |(e, n), ((&a, &b), _)| {
                (e + (a - b) * (a - b), n + b * b)
            });
        100.0 * (e / n).sqrt()
    }

    /// XSIM: the challenge 2.0 structural similarity, on maps in ppm set to zero outside the
    /// region.
    pub fn xsim(&self, x: &[f32]) -> f64 {
        let xm = masked_f64(x, self.region);
        let rm = masked_f64(self.data, self.region);
        let lx = local(&xm, self.dims, XSIM);
        similarity_with((&xm, &lx), (&rm, &self.xsim), self.region, self.dims, XSIM)
    }

    /// SSIM as in the 2016 challenge and the learned-QSM papers that followed it: both maps
    /// (zero outside the region) are clipped to the reference's range [min, max] over the
    /// region and mapped linearly to [0, 1], then compared with the classic constants. NaN
    /// when the reference is constant over the region (no range to scale by).
    pub fn ssim(&self, x: &[f32]) -> f64 {
        let Some((range, lr)) = &self.ssim else {
            return f64::NAN;
        };
        let xs = to_unit_range(x, self.region, *range);
        let rs = to_unit_range(self.data, self.region, *range);
        let lx = local(&xs, self.dims, SSIM);
        similarity_with((&xs, &lx), (&rs, lr), self.region, self.dims, SSIM)
    }

    /// Every metric of `x`; `labels` (0 = background) adds the per-label means.
    pub fn score(&self, x: &[f32], labels: Option<&[u32]>) -> Scores {
        let (r, region) = (self.data, self.region);
        let (nrmse_detrended, detrend_scale) = nrmse_detrended(x, r, region);
        let labels_means = labels
            .map(|l| label_means(x, r, l, region))
            .unwrap_or_default();
        Scores {
            rmse: rmse(x, r, region),
            nrmse_demeaned: nrmse_demeaned(x, r, region),
            nrmse_detrended,
            detrend_scale,
            hfen: self.hfen(x),
            ssim: self.ssim(x),
            xsim: self.xsim(x),
            correlation: correlation(x, r, region),
            label_slope: labels.map(|_| label_slope(&labels_means)),
            labels: labels_means,
        }
    }
}

/// Zero outside `region`, then clipped to [lo, hi] and mapped to [0, 1].
fn to_unit_range(v: &[f32], region: &[bool], (lo, hi): (f64, f64)) -> Vec<f64> {
    masked_f64(v, region)
        .into_iter()
        .map(|a| (a.clamp(lo, hi) - lo) / (hi - lo))
        .collect()
}

/// HFEN of `x` against `reference` (see [`Reference::hfen`]).
pub fn hfen(x: &[f32], reference: &[f32], region: &[bool], dims: [usize; 3]) -> f64 {
    Reference::new(reference, region, dims).hfen(x)
}

/// XSIM of `x` against `reference` (see [`Reference::xsim`]).
pub fn xsim(x: &[f32], reference: &[f32], region: &[bool], dims: [usize; 3]) -> f64 {
    Reference::new(reference, region, dims).xsim(x)
}

/// SSIM of `x` against `reference` (see [`Reference::ssim`]).
pub fn ssim(x: &[f32], reference: &[f32], region: &[bool], dims: [usize; 3]) -> f64 {
    Reference::new(reference, region, dims).ssim(x)
}

/// Mean of a map and of the reference over one label of a segmentation.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelMean {
    pub label: u32,
    pub voxels: usize,
    pub map: f64,
    pub reference: f64,
}

/// Per-label means over `labels == ℓ ∧ region` for every label ℓ > 0 that has voxels there,
/// in increasing label order.
pub fn label_means(
    x: &[f32],
    reference: &[f32],
    labels: &[u32],
    region: &[bool],
) -> Vec<LabelMean> {
    let mut acc: std::collections::BTreeMap<u32, (f64, f64, usize)> = Default::default();
    for i in 0..x.len() {
        if region[i] && labels[i] > 0 {
            let e = acc.entry(labels[i]).or_insert((0.0, 0.0, 0));
            e.0 += x[i] as f64;
            e.1 += reference[i] as f64;
            e.2 += 1;
        }
    }
    acc.into_iter()
        .map(|(label, (sx, sr, n))| LabelMean {
            label,
            voxels: n,
            map: sx / n as f64,
            reference: sr / n as f64,
        })
        .collect()
}

/// Least-squares slope of the map's label means against the reference's (challenge 2.0's deep
/// grey matter linearity, over whichever labels are given; 1 is ideal). NaN with fewer than two
/// labels or when all reference means are equal.
pub fn label_slope(means: &[LabelMean]) -> f64 {
    let n = means.len() as f64;
    if means.len() < 2 {
        return f64::NAN;
    }
    let mr = means.iter().map(|m| m.reference).sum::<f64>() / n;
    let mx = means.iter().map(|m| m.map).sum::<f64>() / n;
    let (rr, xr) = means.iter().fold((0.0, 0.0), |(rr, xr), m| {
        let d = m.reference - mr;
        (rr + d * d, xr + d * (m.map - mx))
    });
    if rr == 0.0 {
        f64::NAN
    } else {
        xr / rr
    }
}

/// Every metric of one map against the reference.
#[derive(Clone, Debug)]
pub struct Scores {
    pub rmse: f64,
    pub nrmse_demeaned: f64,
    pub nrmse_detrended: f64,
    /// The factor a of the detrended NRMSE (reference ≈ a·map + b).
    pub detrend_scale: f64,
    pub hfen: f64,
    pub ssim: f64,
    pub xsim: f64,
    pub correlation: f64,
    /// With a segmentation: per-label means and their slope.
    pub labels: Vec<LabelMean>,
    pub label_slope: Option<f64>,
}

/// Computes [`Scores`] for `x` against `reference` on a grid of `dims`; `labels` (0 =
/// background) adds the per-label means. To score several maps, use [`Reference`].
pub fn score(
    x: &[f32],
    reference: &[f32],
    region: &[bool],
    dims: [usize; 3],
    labels: Option<&[u32]>,
) -> Scores {
    Reference::new(reference, region, dims).score(x, labels)
}

#[cfg(test)]
mod tests {
    use super::super::filter::tests::{challenge_log_kernel, naive_conv, pseudo_random};
    use super::*;

    const R: [f32; 4] = [1.0, 2.0, 3.0, 100.0];
    const REGION: [bool; 4] = [true, true, true, false];

    fn close(a: f64, b: f64, tol: f64) {
        assert!((a - b).abs() <= tol, "{a} vs {b}");
    }

    #[test]
    fn nrmse_is_zero_for_an_offset_copy_and_matches_a_hand_computation() {
        assert!(nrmse_demeaned(&[11.0, 12.0, 13.0, 0.0], &R, &REGION).abs() < 1e-9);
        // r − r̄ = (−1, 0, 1); x = (1, 2, 4) → x − x̄ = (−4/3, −1/3, 5/3);
        // error = (−1/3, −1/3, 2/3): ‖e‖² = 6/9, ‖r − r̄‖² = 2 → 100·√(1/3).
        let got = nrmse_demeaned(&[1.0, 2.0, 4.0, 0.0], &R, &REGION);
        close(got, 100.0 * (1.0f64 / 3.0).sqrt(), 1e-9);
        // A zero map scores 100 %.
        close(nrmse_demeaned(&[0.0; 4], &R, &REGION), 100.0, 1e-9);
    }

    #[test]
    fn rmse_matches_a_hand_computation_and_is_not_demeaned() {
        // e = (0, 0, 1), ‖r‖² = 14 (the fourth voxel is outside the region).
        close(
            rmse(&[1.0, 2.0, 4.0, -7.0], &R, &REGION),
            100.0 / 14f64.sqrt(),
            1e-9,
        );
        // An offset copy is not free here: e = (1, 1, 1).
        close(
            rmse(&[2.0, 3.0, 4.0, 0.0], &R, &REGION),
            100.0 * (3.0f64 / 14.0).sqrt(),
            1e-9,
        );
        assert_eq!(rmse(&R, &R, &REGION), 0.0);
    }

    #[test]
    fn detrended_nrmse_matches_a_hand_computation() {
        // x̃ = (−4/3, −1/3, 5/3), r̃ = (−1, 0, 1): Σx̃r̃ = 3, Σx̃² = 14/3 → a = 9/14;
        // a·x̃ − r̃ = (2, −3, 1)/14 → ‖·‖² = 1/14; ‖r̃‖² = 2 → 100·√(1/28).
        let (got, a) = nrmse_detrended(&[1.0, 2.0, 4.0, 0.0], &R, &REGION);
        close(got, 100.0 / 28f64.sqrt(), 1e-9);
        close(a, 9.0 / 14.0, 1e-12);
        // Pearson: ρ = 3/√(28/3) → √(1 − ρ²) = √(1/28), the identity in the doc comment.
        let rho = correlation(&[1.0, 2.0, 4.0, 0.0], &R, &REGION);
        close(rho, 3.0 / (28.0f64 / 3.0).sqrt(), 1e-12);
        // A constant map: nothing to scale, the whole demeaned reference is error.
        close(nrmse_detrended(&[5.0; 4], &R, &REGION).0, 100.0, 1e-12);
    }

    #[test]
    fn invariances_offsets_scales_and_linear_transforms() {
        let n = 200;
        let r: Vec<f32> = pseudo_random(n, 1)
            .iter()
            .map(|&v| v as f32 * 0.2)
            .collect();
        let noise = pseudo_random(n, 2);
        let x: Vec<f32> = r
            .iter()
            .zip(&noise)
            .map(|(&a, &e)| a + 0.05 * e as f32)
            .collect();
        let region: Vec<bool> = (0..n).map(|i| i % 7 != 0).collect();
        // A constant offset changes neither demeaned nor detrended NRMSE nor correlation…
        let shifted: Vec<f32> = x.iter().map(|&v| v + 0.3).collect();
        close(
            nrmse_demeaned(&shifted, &r, &region),
            nrmse_demeaned(&x, &r, &region),
            1e-4,
        );
        // …but does change the plain RMSE.
        assert!(rmse(&shifted, &r, &region) > rmse(&x, &r, &region) + 10.0);
        // Scale and offset: detrended NRMSE and correlation do not change.
        let affine: Vec<f32> = x.iter().map(|&v| 0.4 * v - 0.1).collect();
        let (d0, a0) = nrmse_detrended(&x, &r, &region);
        let (d1, a1) = nrmse_detrended(&affine, &r, &region);
        close(d1, d0, 1e-3);
        close(a1 * 0.4, a0, 1e-4);
        assert!(nrmse_demeaned(&affine, &r, &region) > d0 + 20.0);
        close(
            correlation(&affine, &r, &region),
            correlation(&x, &r, &region),
            1e-6,
        );
        // An exact linear transform of the reference: correlation ±1, detrended NRMSE 0.
        let lin: Vec<f32> = r.iter().map(|&v| 3.0 * v + 1.0).collect();
        close(correlation(&lin, &r, &region), 1.0, 1e-6);
        let neg: Vec<f32> = r.iter().map(|&v| -2.0 * v).collect();
        close(correlation(&neg, &r, &region), -1.0, 1e-6);
        assert!(nrmse_detrended(&lin, &r, &region).0 < 1e-2);
        close(nrmse_detrended(&lin, &r, &region).1, 1.0 / 3.0, 1e-5);
    }

    /// A smooth test object with structure at several scales, in ppm.
    fn blob(dims: [usize; 3]) -> Vec<f32> {
        let [nx, ny, nz] = dims;
        let mut v = Vec::with_capacity(nx * ny * nz);
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    let (x, y, z) = (i as f32, j as f32, k as f32);
                    v.push(0.1 * (0.7 * x).sin() * (0.5 * y).cos() + 0.02 * z - 0.05);
                }
            }
        }
        v
    }

    #[test]
    fn similarity_of_a_map_with_itself_is_one_and_drops_with_noise() {
        let dims = [12, 11, 10];
        let n = 12 * 11 * 10;
        let r = blob(dims);
        let region: Vec<bool> = (0..n).map(|i| (i / 12) % 11 > 1).collect();
        close(xsim(&r, &r, &region, dims), 1.0, 1e-12);
        close(ssim(&r, &r, &region, dims), 1.0, 1e-12);
        let noisy: Vec<f32> = r
            .iter()
            .zip(pseudo_random(n, 5))
            .map(|(&a, e)| a + 0.05 * e as f32)
            .collect();
        let (x1, s1) = (
            xsim(&noisy, &r, &region, dims),
            ssim(&noisy, &r, &region, dims),
        );
        assert!(x1 < 0.99 && x1 > 0.0, "{x1}");
        assert!(s1 < 0.99 && s1 > 0.0, "{s1}");
        // Symmetric in its arguments.
        close(xsim(&r, &noisy, &region, dims), x1, 1e-12);
        // More noise, lower scores.
        let noisier: Vec<f32> = r
            .iter()
            .zip(pseudo_random(n, 5))
            .map(|(&a, e)| a + 0.2 * e as f32)
            .collect();
        assert!(xsim(&noisier, &r, &region, dims) < x1);
        assert!(ssim(&noisier, &r, &region, dims) < s1);
        // HFEN: 0 for a perfect map, grows with noise.
        assert_eq!(hfen(&r, &r, &region, dims), 0.0);
        assert!(hfen(&noisier, &r, &region, dims) > hfen(&noisy, &r, &region, dims));
    }

    #[test]
    fn similarity_of_constant_maps_is_the_luminance_term_by_hand() {
        // Constant maps over a 7³ volume: at the centre the whole window sees the data, so the
        // local variances vanish and the index is (2ab + C1)/(a² + b² + C1).
        let dims = [7, 7, 7];
        let n = 343;
        let (a, b) = (0.1, 0.2);
        let mut region = vec![false; n];
        region[3 + 7 * (3 + 7 * 3)] = true;
        let c1 = 1e-4;
        let want = (2.0 * a * b + c1) / (a * a + b * b + c1);
        let got = similarity_index(&vec![a; n], &vec![b; n], &region, dims, XSIM);
        // E[x²] − μ² leaves ~1e-17 of rounding next to C2 = 1e-6.
        close(got, want, 1e-9);
    }

    #[test]
    fn similarity_index_matches_a_naive_windowed_computation() {
        let dims = [5, 6, 4];
        let n = 120;
        let x: Vec<f64> = pseudo_random(n, 7).iter().map(|v| 0.1 * v).collect();
        let r: Vec<f64> = pseudo_random(n, 8).iter().map(|v| 0.1 * v).collect();
        let region: Vec<bool> = (0..n).map(|i| i % 3 != 1).collect();
        let s = 1.5f64;
        let mut norm = 0.0;
        for c in -3..=3isize {
            for b in -3..=3isize {
                for a in -3..=3isize {
                    norm += (-((a * a + b * b + c * c) as f64) / (2.0 * s * s)).exp();
                }
            }
        }
        let w = |a: isize, b: isize, c: isize| {
            (-((a * a + b * b + c * c) as f64) / (2.0 * s * s)).exp() / norm
        };
        let blur = |v: &[f64]| naive_conv(v, dims, &w, 3);
        let (mx, mr) = (blur(&x), blur(&r));
        let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
        let rr: Vec<f64> = r.iter().map(|v| v * v).collect();
        let xr: Vec<f64> = x.iter().zip(&r).map(|(a, b)| a * b).collect();
        let (bxx, brr, bxr) = (blur(&xx), blur(&rr), blur(&xr));
        let (c1, c2) = (1e-4, 1e-6);
        let mut sum = 0.0;
        let mut cnt = 0.0;
        for i in 0..n {
            if region[i] {
                let (vx, vr, cv) = (
                    bxx[i] - mx[i] * mx[i],
                    brr[i] - mr[i] * mr[i],
                    bxr[i] - mx[i] * mr[i],
                );
                sum += (2.0 * mx[i] * mr[i] + c1) * (2.0 * cv + c2)
                    / ((mx[i] * mx[i] + mr[i] * mr[i] + c1) * (vx + vr + c2));
                cnt += 1.0;
            }
        }
        close(
            similarity_index(&x, &r, &region, dims, XSIM),
            sum / cnt,
            1e-12,
        );
    }

    #[test]
    fn ssim_rescales_by_the_reference_range_and_clips() {
        let dims = [8, 7, 6];
        let n = 8 * 7 * 6;
        let r = blob(dims);
        let region = vec![true; n];
        // Values beyond the reference's range are clipped: exaggerating the map's extremes
        // past that range changes nothing, while XSIM (native ppm) does see it.
        let (lo, hi) = r
            .iter()
            .fold((f32::MAX, f32::MIN), |(l, h), &v| (l.min(v), h.max(v)));
        let x: Vec<f32> = r
            .iter()
            .map(|&v| {
                if v == hi {
                    10.0
                } else if v == lo {
                    -10.0
                } else {
                    v
                }
            })
            .collect();
        close(ssim(&x, &r, &region, dims), 1.0, 1e-12);
        assert!(xsim(&x, &r, &region, dims) < 0.999);
        // Scaled by hand: the same as the similarity index of the [0, 1] maps.
        let y: Vec<f32> = r.iter().map(|&v| 0.8 * v).collect();
        let to01 = |v: &[f32]| -> Vec<f64> {
            v.iter()
                .map(|&a| ((a as f64).clamp(lo as f64, hi as f64) - lo as f64) / (hi - lo) as f64)
                .collect()
        };
        close(
            ssim(&y, &r, &region, dims),
            similarity_index(&to01(&y), &to01(&r), &region, dims, SSIM),
            1e-12,
        );
        // A constant reference has no range.
        assert!(ssim(&y, &vec![0.3; n], &region, dims).is_nan());
    }

    #[test]
    fn hfen_matches_the_challenge_kernel_applied_directly() {
        let dims = [10, 9, 8];
        let n = 720;
        let r: Vec<f32> = pseudo_random(n, 21)
            .iter()
            .map(|&v| v as f32 * 0.1)
            .collect();
        let x: Vec<f32> = pseudo_random(n, 22)
            .iter()
            .map(|&v| v as f32 * 0.1)
            .collect();
        let region: Vec<bool> = (0..n).map(|i| i % 5 != 0).collect();
        let kern = challenge_log_kernel(1.5, 7);
        let m = |v: &[f32]| -> Vec<f64> {
            v.iter()
                .zip(&region)
                .map(|(&a, &k)| if k { a as f64 } else { 0.0 })
                .collect()
        };
        let (lx, lr) = (
            naive_conv(&m(&x), dims, &kern, 7),
            naive_conv(&m(&r), dims, &kern, 7),
        );
        let (mut e, mut d) = (0.0, 0.0);
        for i in 0..n {
            if region[i] {
                e += (lx[i] - lr[i]).powi(2);
                d += lr[i] * lr[i];
            }
        }
        close(hfen(&x, &r, &region, dims), 100.0 * (e / d).sqrt(), 1e-9);
    }

    #[test]
    fn label_means_and_slope_by_hand() {
        let r = [1.0f32, 3.0, 10.0, 20.0, 5.0, 7.0];
        let x = [2.0f32, 4.0, 21.0, 41.0, 0.0, 0.0];
        let labels = [1u32, 1, 2, 2, 0, 3];
        // Label 3's only voxel is outside the region; label 0 is background.
        let region = [true, true, true, true, true, false];
        let m = label_means(&x, &r, &labels, &region);
        assert_eq!(
            m,
            vec![
                LabelMean {
                    label: 1,
                    voxels: 2,
                    map: 3.0,
                    reference: 2.0
                },
                LabelMean {
                    label: 2,
                    voxels: 2,
                    map: 31.0,
                    reference: 15.0
                },
            ]
        );
        // Two points: slope (31 − 3)/(15 − 2).
        close(label_slope(&m), 28.0 / 13.0, 1e-12);
        assert!(label_slope(&m[..1]).is_nan());
        // Map = 2·reference + 1 on three labels: slope 2.
        let pts: Vec<LabelMean> = [(1.0, 3.0), (2.0, 5.0), (4.0, 9.0)]
            .iter()
            .enumerate()
            .map(|(i, &(rf, mp))| LabelMean {
                label: i as u32 + 1,
                voxels: 1,
                map: mp,
                reference: rf,
            })
            .collect();
        close(label_slope(&pts), 2.0, 1e-12);
    }
}
