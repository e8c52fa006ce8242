//! Rigid registration by maximising normalised cross-correlation (NCC) with
//! Levenberg–Marquardt, coarse to fine.
//!
//! With `f̂`, `m̂` the fixed and (warped) moving samples centred and scaled to unit norm,
//! `‖f̂ − m̂‖² = 2 − 2·NCC`, so least squares on that residual maximises NCC. Its Jacobian is
//! exact: if `J_i` is the derivative of the moving sample `m_i` with respect to the six
//! parameters (image gradient × point motion), the normalisation contributes
//! `∂m̂_i = (J_i − J̄ − m̂_i·a)/σ_m` with `a = Σ m̂_j J_j`. Everything the step needs reduces
//! to a few sums over the samples, gathered in one parallel pass per evaluation.

use std::time::Instant;

use rayon::prelude::*;

use super::pyramid::{self, Level};
use super::resample::{sample_with_gradient, Grid};
use super::rigid::{cross, mul_vec, sub, Rigid};
use crate::{Error, Result, Volume};

/// Smoothing (voxels) of the reference mask that sets where similarity is measured.
const DOMAIN_WIDENING: f64 = 1.5;

/// How hard to try.
#[derive(Clone, Debug)]
pub struct Options {
    /// Pyramid levels (each halves the grid).
    pub levels: usize,
    /// Levenberg–Marquardt iterations per level at most.
    pub max_iterations: usize,
    /// At most this many fixed voxels per level (a regular subset beyond that).
    pub max_samples: usize,
    /// Start here instead of from the centres of mass.
    pub initial: Option<Rigid>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            levels: 3,
            max_iterations: 60,
            max_samples: 200_000,
            initial: None,
        }
    }
}

/// The result: `transform` maps reference world points to moving world points.
#[derive(Clone, Debug)]
pub struct Registration {
    pub transform: Rigid,
    /// NCC over the reference's (dilated) brain at full resolution, before (images aligned
    /// by the initial guess) and after.
    pub ncc_before: f64,
    pub ncc_after: f64,
    pub iterations: usize,
    pub seconds: f64,
}

/// Registers `moving` to `fixed` (magnitudes, unmasked; the pipeline gives first echoes).
/// Similarity is measured over the fixed brain mask widened by a few voxels; the rotation
/// centre is the centre of that mask, and the moving mask's centre gives the starting shift.
pub fn register(
    fixed: &Volume,
    fixed_mask: &[bool],
    moving: &Volume,
    moving_mask: &[bool],
    options: &Options,
) -> Result<Registration> {
    let start = Instant::now();
    let fgrid = Grid::new(fixed.dims, &fixed.geometry)?;
    let mgrid = Grid::new(moving.dims, &moving.geometry)?;
    let fdata = finite(&fixed.data);
    let mdata = finite(&moving.data);
    let fc = centroid(fixed_mask, &fgrid).ok_or_else(|| {
        Error::Numerics("the reference brain mask is empty: nothing to register to".into())
    })?;
    let mc = centroid(moving_mask, &mgrid).ok_or_else(|| {
        Error::Numerics("the moving brain mask is empty: nothing to register".into())
    })?;
    let mut t = options.initial.clone().unwrap_or(Rigid {
        translation: sub(mc, fc),
        ..Rigid::identity(fc)
    });
    let fmask_f = domain(fixed_mask, fixed.dims);
    let fixed_levels = pyramid::build(&fdata, &fgrid, options.levels);
    let domain_levels = pyramid::build(&fmask_f, &fgrid, options.levels);
    let moving_levels = pyramid::build(&mdata, &mgrid, options.levels);
    let finest = samples(&fixed_levels[0], &domain_levels[0], options.max_samples);
    let ncc_before = ncc(&evaluate(&finest, &moving_levels[0], &t));
    let mut iterations = 0;
    for l in (0..fixed_levels.len().min(moving_levels.len())).rev() {
        let s = if l == 0 {
            finest.clone()
        } else {
            samples(&fixed_levels[l], &domain_levels[l], options.max_samples)
        };
        let (next, its) = optimise(&s, &moving_levels[l], t, options.max_iterations);
        t = next;
        iterations += its;
    }
    let ncc_after = ncc(&evaluate(&finest, &moving_levels[0], &t));
    if !ncc_after.is_finite() {
        return Err(Error::Numerics(
            "registration lost the overlap between the images (NCC undefined)".into(),
        ));
    }
    Ok(Registration {
        transform: t,
        ncc_before,
        ncc_after,
        iterations,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The NCC that [`register`] reports as `ncc_after`, for a transform found earlier (a
/// reused transform file): the same samples of the fixed image, the moving image warped by
/// `t`. `None` when the transform leaves too little overlap to define it.
pub fn similarity(
    fixed: &Volume,
    fixed_mask: &[bool],
    moving: &Volume,
    t: &Rigid,
    max_samples: usize,
) -> Result<Option<f64>> {
    let fgrid = Grid::new(fixed.dims, &fixed.geometry)?;
    let mgrid = Grid::new(moving.dims, &moving.geometry)?;
    let fixed_level = pyramid::build(&finite(&fixed.data), &fgrid, 1).swap_remove(0);
    let domain_level = pyramid::build(&domain(fixed_mask, fixed.dims), &fgrid, 1).swap_remove(0);
    let moving_level = pyramid::build(&finite(&moving.data), &mgrid, 1).swap_remove(0);
    let s = samples(&fixed_level, &domain_level, max_samples);
    let r = ncc(&evaluate(&s, &moving_level, t));
    Ok(r.is_finite().then_some(r))
}

/// Non-finite voxels (a damaged file) set to 0: they would poison every sum.
fn finite(data: &[f32]) -> Vec<f32> {
    data.iter()
        .map(|&x| if x.is_finite() { x } else { 0.0 })
        .collect()
}

/// The fixed brain mask, widened by a few voxels so that its edge, where much of the
/// contrast is, takes part; the moving image is used whole, so no hard mask edge enters.
fn domain(fixed_mask: &[bool], dims: [usize; 3]) -> Vec<f32> {
    let m: Vec<f32> = fixed_mask.iter().map(|&b| b as u8 as f32).collect();
    pyramid::smooth(&m, dims, DOMAIN_WIDENING)
}

/// Centre of a mask in world coordinates.
fn centroid(mask: &[bool], grid: &Grid) -> Option<[f64; 3]> {
    let [nx, ny, _] = grid.dims;
    let (mut s, mut n) = ([0.0f64; 3], 0usize);
    for (idx, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let v = [idx % nx, (idx / nx) % ny, idx / (nx * ny)];
        (0..3).for_each(|a| s[a] += v[a] as f64);
        n += 1;
    }
    (n > 0).then(|| grid.to_world(s.map(|x| x / n as f64)))
}

/// World position and value of the fixed voxels near the brain (where the smoothed mask is
/// non-negligible, so the brain's edge counts), thinned to at most `max`.
fn samples(fixed: &Level, domain: &Level, max: usize) -> Vec<([f64; 3], f32)> {
    let [nx, ny, _] = fixed.grid.dims;
    let idx: Vec<usize> = (0..domain.data.len())
        .filter(|&i| domain.data[i] > 0.01)
        .collect();
    let stride = idx.len().div_ceil(max.max(1)).max(1);
    idx.iter()
        .step_by(stride)
        .map(|&i| {
            let v = [
                (i % nx) as f64,
                ((i / nx) % ny) as f64,
                (i / (nx * ny)) as f64,
            ];
            (fixed.grid.to_world(v), fixed.data[i])
        })
        .collect()
}

/// Sums over the samples that the transform keeps inside the moving grid.
#[derive(Clone, Default)]
struct Sums {
    n: f64,
    f: f64,
    ff: f64,
    m: f64,
    mm: f64,
    fm: f64,
    j: [f64; 6],
    fj: [f64; 6],
    mj: [f64; 6],
    jj: [[f64; 6]; 6],
}

impl Sums {
    fn merge(mut self, o: Sums) -> Sums {
        self.n += o.n;
        self.f += o.f;
        self.ff += o.ff;
        self.m += o.m;
        self.mm += o.mm;
        self.fm += o.fm;
        for a in 0..6 {
            self.j[a] += o.j[a];
            self.fj[a] += o.fj[a];
            self.mj[a] += o.mj[a];
            for b in 0..6 {
                self.jj[a][b] += o.jj[a][b];
            }
        }
        self
    }
}

fn evaluate(samples: &[([f64; 3], f32)], moving: &Level, t: &Rigid) -> Sums {
    let grid = &moving.grid;
    // World gradient = (voxel→world)^-ᵀ · voxel gradient.
    let inv = grid.inverse;
    samples
        .par_chunks(4096)
        .map(|chunk| {
            let mut s = Sums::default();
            for &(y, fv) in chunk {
                let q = mul_vec(&t.rotation, sub(y, t.centre));
                let x = [0, 1, 2].map(|a| q[a] + t.centre[a] + t.translation[a]);
                let Some((mv, gv)) =
                    sample_with_gradient(&moving.data, grid.dims, grid.to_voxel(x))
                else {
                    continue;
                };
                let g = [0, 1, 2].map(|c| (0..3).map(|r| inv[r][c] * gv[r]).sum::<f64>());
                // d x / d ω = ω × q, so d m / d ω = q × g; d m / d t = g.
                let qg = cross(q, g);
                let jac = [qg[0], qg[1], qg[2], g[0], g[1], g[2]];
                let f = fv as f64;
                s.n += 1.0;
                s.f += f;
                s.ff += f * f;
                s.m += mv;
                s.mm += mv * mv;
                s.fm += f * mv;
                for a in 0..6 {
                    s.j[a] += jac[a];
                    s.fj[a] += f * jac[a];
                    s.mj[a] += mv * jac[a];
                    for b in a..6 {
                        s.jj[a][b] += jac[a] * jac[b];
                    }
                }
            }
            s
        })
        .reduce(Sums::default, Sums::merge)
}

/// Centred sums of squares of f and m.
fn variances(s: &Sums) -> (f64, f64) {
    let vf = s.ff - s.f * s.f / s.n;
    let vm = s.mm - s.m * s.m / s.n;
    (vf, vm)
}

fn ncc(s: &Sums) -> f64 {
    if s.n < 2.0 {
        return f64::NAN;
    }
    let (vf, vm) = variances(s);
    let c = s.fm - s.f * s.m / s.n;
    if vf > 0.0 && vm > 0.0 {
        c / (vf * vm).sqrt()
    } else {
        f64::NAN
    }
}

/// The Gauss–Newton normal equations `H δ = g` at these sums (see the module docs).
fn normal_equations(s: &Sums) -> Option<([[f64; 6]; 6], [f64; 6])> {
    let r = ncc(s);
    if !r.is_finite() {
        return None;
    }
    let (vf, vm) = variances(s);
    let (sf, sm) = (vf.sqrt(), vm.sqrt());
    let (mu_f, mu_m) = (s.f / s.n, s.m / s.n);
    let a: [f64; 6] = [0, 1, 2, 3, 4, 5].map(|k| (s.mj[k] - mu_m * s.j[k]) / sm);
    let b: [f64; 6] = [0, 1, 2, 3, 4, 5].map(|k| (s.fj[k] - mu_f * s.j[k]) / sf);
    let mut h = [[0.0; 6]; 6];
    for p in 0..6 {
        for q in p..6 {
            let jc = s.jj[p][q] - s.j[p] * s.j[q] / s.n;
            h[p][q] = (jc - a[p] * a[q]) / vm;
            h[q][p] = h[p][q];
        }
    }
    let g = [0, 1, 2, 3, 4, 5].map(|k| (b[k] - r * a[k]) / sm);
    Some((h, g))
}

/// Levenberg–Marquardt from `t`; returns the transform and the iterations used.
fn optimise(
    samples: &[([f64; 3], f32)],
    moving: &Level,
    mut t: Rigid,
    max_it: usize,
) -> (Rigid, usize) {
    let mut cur = evaluate(samples, moving, &t);
    let mut lambda = 1e-3;
    let mut its = 0;
    while its < max_it {
        its += 1;
        let Some((h, g)) = normal_equations(&cur) else {
            break;
        };
        let mut damped = h;
        (0..6).for_each(|k| damped[k][k] += lambda * h[k][k].max(1e-12));
        let Some(d) = solve6(damped, g) else {
            break;
        };
        let cand = t.updated([d[0], d[1], d[2]], [d[3], d[4], d[5]]);
        let next = evaluate(samples, moving, &cand);
        if ncc(&next) >= ncc(&cur) {
            t = cand;
            cur = next;
            lambda = (lambda / 4.0).max(1e-8);
            let rot = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
                .sqrt()
                .to_degrees();
            let shift = (d[3] * d[3] + d[4] * d[4] + d[5] * d[5]).sqrt();
            if rot < 1e-3 && shift < 1e-3 {
                break;
            }
        } else {
            lambda *= 8.0;
            if lambda > 1e8 {
                break;
            }
        }
    }
    (t, its)
}

/// Gaussian elimination with partial pivoting.
fn solve6(mut a: [[f64; 6]; 6], mut b: [f64; 6]) -> Option<[f64; 6]> {
    for c in 0..6 {
        let p = (c..6).max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))?;
        if a[p][c].abs() <= 1e-300 || a[p][c].is_nan() {
            return None;
        }
        a.swap(c, p);
        b.swap(c, p);
        for r in c + 1..6 {
            let f = a[r][c] / a[c][c];
            for k in c..6 {
                a[r][k] -= f * a[c][k];
            }
            b[r] -= f * b[c];
        }
    }
    let mut x = [0.0; 6];
    for c in (0..6).rev() {
        let s: f64 = (c + 1..6).map(|k| a[c][k] * x[k]).sum();
        x[c] = (b[c] - s) / a[c][c];
    }
    x.iter().all(|v| v.is_finite()).then_some(x)
}
