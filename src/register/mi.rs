//! Mattes mutual information (Mattes et al. 2003) and a BFGS optimiser for it, for images
//! whose intensities are related by any mapping, not only a linear one.
//!
//! The joint histogram of fixed bin ι and moving bin κ is built with Parzen windows, a box
//! for the fixed intensities (they do not move) and a cubic B-spline β₃ for the moving ones:
//! `p(ι,κ) = 1/N Σᵢ [ιᵢ = ι] β₃(κ − m̃ᵢ)`, `m̃` the moving intensity in bin units. So the
//! histogram and the mutual information `MI = Σ p ln(p / (p_f p_m))` are differentiable in the
//! transform, and as the fixed marginal `p_f` does not move,
//! `∂MI/∂μ = Σ_{ι,κ} ∂p(ι,κ)/∂μ · ln(p(ι,κ) / p_m(κ))`.

use rayon::prelude::*;

use super::align::{warped, Sample};
use super::pyramid::Level;
use super::rigid::{norm, Rigid};

pub(super) const DEFAULT_BINS: usize = 32;
pub(super) const MIN_BINS: usize = 8;
/// Bins kept free at each end of the moving axis: the B-spline window's half support.
const PAD: f64 = 2.0;
/// Fewer overlapping samples than this and the histogram is not a density.
const MIN_POINTS: usize = 64;

/// Intensity → bin maps for one level.
struct Binning {
    bins: usize,
    fmin: f64,
    fscale: f64,
    mmin: f64,
    mscale: f64,
}

impl Binning {
    /// Fixed bins span the samples' range, moving bins the moving image's, both
    /// [`winsorised`]; `None` for a constant image, which carries no information.
    fn new(samples: &[Sample], moving: &Level, bins: usize) -> Option<Binning> {
        let (fmin, fmax) = winsorised(samples.iter().map(|s| s.1 as f64).collect());
        let step = moving.data.len().div_ceil(1 << 20).max(1);
        let (mmin, mmax) = winsorised(
            moving
                .data
                .iter()
                .step_by(step)
                .map(|&v| v as f64)
                .collect(),
        );
        if !(fmax > fmin && mmax > mmin) {
            return None;
        }
        Some(Binning {
            bins,
            fmin,
            // The largest value falls just inside the last bin.
            fscale: bins as f64 / (fmax - fmin) * (1.0 - 1e-9),
            mmin,
            mscale: (bins as f64 - 2.0 * PAD) / (mmax - mmin),
        })
    }

    fn fixed_bin(&self, f: f64) -> usize {
        (((f - self.fmin) * self.fscale).max(0.0) as usize).min(self.bins - 1)
    }

    /// The bin position of a moving intensity, and whether it lies inside the binned range
    /// (beyond it the position is held at the end, so it does not move with the intensity).
    fn moving_position(&self, m: f64) -> (f64, bool) {
        let x = (m - self.mmin) * self.mscale;
        let top = self.bins as f64 - 2.0 * PAD;
        (x.clamp(0.0, top) + PAD, (0.0..=top).contains(&x))
    }
}

/// Intensities below and above these quantiles share the end bins (winsorised, as ANTs does
/// by default), so that a few bright voxels (vessels, artefacts) do not squeeze the tissue
/// into a few bins.
const WINSOR: (f64, f64) = (0.005, 0.995);

/// The [`WINSOR`] quantiles of `values` (NaN-free).
fn winsorised(mut values: Vec<f64>) -> (f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0);
    }
    let last = values.len() - 1;
    let at = |q: f64| ((q * last as f64).round() as usize).min(last);
    let (lo, hi) = (at(WINSOR.0), at(WINSOR.1));
    let low = *values.select_nth_unstable_by(lo, f64::total_cmp).1;
    let high = *values.select_nth_unstable_by(hi, f64::total_cmp).1;
    (low, high)
}

/// Cubic B-spline and its derivative.
fn bspline3(x: f64) -> f64 {
    let a = x.abs();
    if a < 1.0 {
        (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
    } else if a < 2.0 {
        (2.0 - a).powi(3) / 6.0
    } else {
        0.0
    }
}

fn bspline3_derivative(x: f64) -> f64 {
    let a = x.abs();
    let d = if a < 1.0 {
        -2.0 * a + 1.5 * a * a
    } else if a < 2.0 {
        -0.5 * (2.0 - a).powi(2)
    } else {
        0.0
    };
    d * x.signum()
}

/// The moving bins a sample at bin position `pos` touches, with their weights' derivative
/// with respect to `pos` alongside: `(κ, β₃(κ − pos), −β₃′(κ − pos))`.
fn window(pos: f64, bins: usize) -> impl Iterator<Item = (usize, f64, f64)> {
    let k0 = pos.floor() as i64;
    (k0 - 1..=k0 + 2)
        .filter(move |&k| k >= 0 && (k as usize) < bins)
        .map(move |k| {
            let u = k as f64 - pos;
            (k as usize, bspline3(u), -bspline3_derivative(u))
        })
}

/// A fixed sample that lands inside the moving image.
struct Point {
    fixed_bin: usize,
    position: f64,
    jacobian: [f64; 6],
}

fn points(samples: &[Sample], moving: &Level, t: &Rigid, b: &Binning) -> Vec<Point> {
    samples
        .par_iter()
        .filter_map(|&(y, f)| {
            let (m, jac) = warped(moving, t, y)?;
            let (position, inside) = b.moving_position(m);
            let scale = if inside { b.mscale } else { 0.0 };
            Some(Point {
                fixed_bin: b.fixed_bin(f as f64),
                position,
                jacobian: jac.map(|j| j * scale),
            })
        })
        .collect()
}

/// The joint density `p(ι,κ)`, row ι.
fn joint(points: &[Point], bins: usize) -> Vec<f64> {
    let n = points.len() as f64;
    let mut p = points
        .par_chunks(4096)
        .map(|chunk| {
            let mut h = vec![0.0f64; bins * bins];
            for pt in chunk {
                for (k, w, _) in window(pt.position, bins) {
                    h[pt.fixed_bin * bins + k] += w;
                }
            }
            h
        })
        .reduce(
            || vec![0.0f64; bins * bins],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    p.iter_mut().for_each(|v| *v /= n);
    p
}

/// Mutual information (nats) of a joint density, and `ln(p(ι,κ)/p_m(κ))` where `p > 0`.
fn information(p: &[f64], bins: usize) -> (f64, Vec<f64>) {
    let pf: Vec<f64> = (0..bins)
        .map(|i| p[i * bins..(i + 1) * bins].iter().sum())
        .collect();
    let pm: Vec<f64> = (0..bins)
        .map(|k| (0..bins).map(|i| p[i * bins + k]).sum())
        .collect();
    let mut mi = 0.0;
    let mut log_ratio = vec![0.0; bins * bins];
    for i in 0..bins {
        for k in 0..bins {
            let v = p[i * bins + k];
            if v > 0.0 {
                mi += v * (v / (pf[i] * pm[k])).ln();
                log_ratio[i * bins + k] = (v / pm[k]).ln();
            }
        }
    }
    (mi, log_ratio)
}

/// Mutual information and its gradient with respect to the six parameters of
/// [`Rigid::updated`], or `None` when too few samples overlap the moving image.
fn evaluate(samples: &[Sample], moving: &Level, t: &Rigid, b: &Binning) -> Option<(f64, [f64; 6])> {
    let pts = points(samples, moving, t, b);
    if pts.len() < MIN_POINTS {
        return None;
    }
    let bins = b.bins;
    let (mi, log_ratio) = information(&joint(&pts, bins), bins);
    let n = pts.len() as f64;
    let gradient = pts
        .par_chunks(4096)
        .map(|chunk| {
            let mut g = [0.0f64; 6];
            for pt in chunk {
                let row = &log_ratio[pt.fixed_bin * bins..(pt.fixed_bin + 1) * bins];
                let c: f64 = window(pt.position, bins).map(|(k, _, d)| d * row[k]).sum();
                (0..6).for_each(|a| g[a] += c * pt.jacobian[a]);
            }
            g
        })
        .reduce(|| [0.0; 6], |a, b| [0, 1, 2, 3, 4, 5].map(|k| a[k] + b[k]));
    Some((mi, gradient.map(|v| v / n)))
}

/// Mutual information of the fixed samples with the moving image warped by `t`, with
/// `bins` bins per image.
pub(super) fn value(samples: &[Sample], moving: &Level, t: &Rigid, bins: usize) -> Option<f64> {
    let b = Binning::new(samples, moving, bins)?;
    let pts = points(samples, moving, t, &b);
    (pts.len() >= MIN_POINTS).then(|| information(&joint(&pts, bins), bins).0)
}

/// BFGS ascent of the mutual information from `t`; returns the transform and the iterations.
///
/// The rotation vector is scaled by the samples' RMS radius about the centre, so every
/// parameter is a displacement in mm and one step length serves both.
pub(super) fn optimise(
    samples: &[Sample],
    moving: &Level,
    mut t: Rigid,
    max_it: usize,
    bins: usize,
) -> (Rigid, usize) {
    let Some(binning) = Binning::new(samples, moving, bins) else {
        return (t, 0);
    };
    let radius = rms_radius(samples, t.centre).max(1.0);
    let voxel = voxel_size(moving);
    let scaled = |g: [f64; 6]| [0, 1, 2, 3, 4, 5].map(|k| if k < 3 { g[k] / radius } else { g[k] });
    let at = |t: &Rigid| evaluate(samples, moving, t, &binning).map(|(v, g)| (v, scaled(g)));
    let Some((mut f, mut g)) = at(&t) else {
        return (t, 0);
    };
    // The first step moves the brain by about one voxel.
    let fresh = |g: &[f64; 6]| identity6(voxel / norm6(g).max(1e-300));
    let mut h = fresh(&g);
    let mut h_is_fresh = true;
    let mut its = 0;
    while its < max_it {
        its += 1;
        let mut d = mat_vec(&h, &g);
        if dot6(&d, &g) <= 0.0 {
            h = fresh(&g);
            h_is_fresh = true;
            d = mat_vec(&h, &g);
        }
        let len = norm6(&d);
        if len > 2.0 * voxel {
            d = d.map(|v| v * 2.0 * voxel / len);
        }
        let slope = dot6(&d, &g);
        let mut alpha = 1.0;
        let mut accepted = None;
        for _ in 0..10 {
            let s = d.map(|v| alpha * v);
            let cand = t.updated(
                [s[0] / radius, s[1] / radius, s[2] / radius],
                [s[3], s[4], s[5]],
            );
            if let Some((fc, gc)) = at(&cand) {
                if fc >= f + 1e-4 * alpha * slope {
                    accepted = Some((cand, fc, gc, s));
                    break;
                }
            }
            alpha *= 0.5;
        }
        let Some((cand, fc, gc, s)) = accepted else {
            if h_is_fresh {
                break;
            }
            h = fresh(&g);
            h_is_fresh = true;
            continue;
        };
        // Curvature of −MI along the step updates the inverse Hessian.
        let y = [0, 1, 2, 3, 4, 5].map(|k| g[k] - gc[k]);
        let sy = dot6(&s, &y);
        if sy > 1e-12 {
            h = bfgs_update(&h, &s, &y, sy);
            h_is_fresh = false;
        }
        (t, f, g) = (cand, fc, gc);
        if norm6(&s) < 1e-3 * voxel {
            break;
        }
    }
    (t, its)
}

fn rms_radius(samples: &[Sample], centre: [f64; 3]) -> f64 {
    let s: f64 = samples
        .iter()
        .map(|(y, _)| (0..3).map(|a| (y[a] - centre[a]).powi(2)).sum::<f64>())
        .sum();
    (s / samples.len().max(1) as f64).sqrt()
}

/// The smallest voxel edge of a level, mm.
fn voxel_size(level: &Level) -> f64 {
    let l = &level.grid.linear;
    (0..3)
        .map(|c| norm([l[0][c], l[1][c], l[2][c]]))
        .fold(f64::INFINITY, f64::min)
}

type Mat6 = [[f64; 6]; 6];

fn identity6(scale: f64) -> Mat6 {
    let mut m = [[0.0; 6]; 6];
    (0..6).for_each(|k| m[k][k] = scale);
    m
}

fn mat_vec(m: &Mat6, v: &[f64; 6]) -> [f64; 6] {
    m.map(|row| dot6(&row, v))
}

fn dot6(a: &[f64; 6], b: &[f64; 6]) -> f64 {
    (0..6).map(|k| a[k] * b[k]).sum()
}

fn norm6(a: &[f64; 6]) -> f64 {
    dot6(a, a).sqrt()
}

/// `H ← (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`, `ρ = 1/(yᵀs)`.
fn bfgs_update(h: &Mat6, s: &[f64; 6], y: &[f64; 6], sy: f64) -> Mat6 {
    let rho = 1.0 / sy;
    let hy = mat_vec(h, y);
    let yhy = dot6(y, &hy);
    let mut out = *h;
    for i in 0..6 {
        for j in 0..6 {
            out[i][j] +=
                -rho * (s[i] * hy[j] + hy[i] * s[j]) + (rho * rho * yhy + rho) * s[i] * s[j];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::register::resample::Grid;
    use crate::Geometry;

    /// A smooth blob image on a 24³ grid of 2 mm voxels.
    fn blobs(dims: [usize; 3]) -> Level {
        let g = Geometry::from_voxel_size([2.0; 3]);
        let grid = Grid::new(dims, &g).unwrap();
        let mut data = vec![0.0f32; grid.len()];
        for (i, v) in data.iter_mut().enumerate() {
            let p = [
                i % dims[0],
                (i / dims[0]) % dims[1],
                i / (dims[0] * dims[1]),
            ]
            .map(|x| x as f64);
            let r2 = |c: [f64; 3], s: f64| {
                (-(0..3).map(|a| (p[a] - c[a]).powi(2)).sum::<f64>() / (2.0 * s * s)).exp()
            };
            *v = (r2([10.0, 12.0, 11.0], 4.0) + 0.6 * r2([15.0, 8.0, 14.0], 2.5)
                - 0.4 * r2([8.0, 16.0, 9.0], 2.0)) as f32;
        }
        Level { data, grid }
    }

    /// The voxels within 8 voxels of the centre: every small motion keeps them inside the
    /// moving grid, so no sample enters or leaves (which would make MI jump).
    fn fixed_samples(level: &Level) -> Vec<Sample> {
        let [nx, ny, _] = level.grid.dims;
        (0..level.data.len())
            .filter_map(|i| {
                let v = [i % nx, (i / nx) % ny, i / (nx * ny)].map(|x| x as f64);
                let r2: f64 = v.iter().map(|x| (x - 11.5).powi(2)).sum();
                (r2 < 64.0).then(|| (level.grid.to_world(v), level.data[i]))
            })
            .collect()
    }

    #[test]
    fn cubic_bspline_is_a_partition_of_unity_and_its_derivative_matches() {
        for pos in [2.0, 2.3, 7.5, 12.99] {
            let total: f64 = window(pos, 32).map(|(_, w, _)| w).sum();
            assert!((total - 1.0).abs() < 1e-12, "{pos}: {total}");
            let dsum: f64 = window(pos, 32).map(|(_, _, d)| d).sum();
            assert!(dsum.abs() < 1e-12, "{pos}: {dsum}");
        }
        for x in [-1.7, -0.4, 0.2, 0.9, 1.3] {
            let h = 1e-6;
            let fd = (bspline3(x + h) - bspline3(x - h)) / (2.0 * h);
            assert!((fd - bspline3_derivative(x)).abs() < 1e-8, "{x}");
        }
    }

    #[test]
    fn identical_images_share_more_information_than_independent_ones() {
        let level = blobs([24, 24, 24]);
        let s = fixed_samples(&level);
        let centre = level.grid.to_world([11.5; 3]);
        let same = value(&s, &level, &Rigid::identity(centre), 32).unwrap();
        // MI of an image with itself is at most the fixed entropy, and positive.
        let b = Binning::new(&s, &level, 32).unwrap();
        let mut counts = vec![0.0f64; 32];
        s.iter()
            .for_each(|x| counts[b.fixed_bin(x.1 as f64)] += 1.0);
        let n = s.len() as f64;
        let entropy: f64 = counts
            .iter()
            .filter(|&&c| c > 0.0)
            .map(|&c| -(c / n) * (c / n).ln())
            .sum();
        assert!(
            same > 0.5 * entropy && same <= entropy + 1e-9,
            "{same} vs H {entropy}"
        );
        // A shuffled moving image (same histogram, no spatial relation) shares almost none.
        let mut shuffled = level.clone();
        let len = shuffled.data.len();
        for i in 0..len {
            shuffled.data.swap(i, (i * 7919 + 13) % len);
        }
        let indep = value(&s, &shuffled, &Rigid::identity(centre), 32).unwrap();
        assert!(indep < 0.2 * same, "shuffled {indep} vs aligned {same}");
        // MI ignores how intensities are mapped: an inverted moving image scores the same.
        let mut inverted = level.clone();
        inverted.data.iter_mut().for_each(|v| *v = 1.0 - *v);
        let inv = value(&s, &inverted, &Rigid::identity(centre), 32).unwrap();
        assert!((inv - same).abs() < 0.05 * same, "inverted {inv} vs {same}");
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let level = blobs([24, 24, 24]);
        let s = fixed_samples(&level);
        let mut moving = level.clone();
        moving.data.iter_mut().for_each(|v| *v = (*v * 1.7).tanh());
        let centre = level.grid.to_world([11.5; 3]);
        let t = Rigid::from_rotation_vector([0.05, -0.03, 0.04], [1.2, -0.7, 0.5], centre);
        let b = Binning::new(&s, &moving, 24).unwrap();
        let (_, g) = evaluate(&s, &moving, &t, &b).unwrap();
        for k in 0..6 {
            let h = if k < 3 { 1e-5 } else { 1e-4 };
            let step = |sign: f64| {
                let mut p = [0.0; 6];
                p[k] = sign * h;
                let tt = t.updated([p[0], p[1], p[2]], [p[3], p[4], p[5]]);
                evaluate(&s, &moving, &tt, &b).unwrap().0
            };
            let fd = (step(1.0) - step(-1.0)) / (2.0 * h);
            let scale = g.iter().map(|v| v.abs()).fold(0.0, f64::max);
            assert!(
                (fd - g[k]).abs() <= 0.02 * scale,
                "parameter {k}: analytic {} vs finite difference {fd}",
                g[k]
            );
        }
    }
}
