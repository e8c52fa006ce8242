//! Normalised cross-correlation (NCC) and its Levenberg–Marquardt optimiser, for images of
//! one contrast.
//!
//! With `f̂`, `m̂` the fixed and (warped) moving samples centred and scaled to unit norm,
//! `‖f̂ − m̂‖² = 2 − 2·NCC`, so least squares on that residual maximises NCC. Its Jacobian is
//! exact: if `J_i` is the derivative of the moving sample `m_i` with respect to the six
//! parameters (image gradient × point motion), the normalisation contributes
//! `∂m̂_i = (J_i − J̄ − m̂_i·a)/σ_m` with `a = Σ m̂_j J_j`. Everything the step needs reduces
//! to a few sums over the samples, gathered in one parallel pass per evaluation.

use rayon::prelude::*;

use super::align::{warped, Sample};
use super::pyramid::Level;
use super::rigid::Rigid;

/// Sums over the samples that the transform keeps inside the moving grid.
#[derive(Clone, Default)]
pub(super) struct Sums {
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

pub(super) fn evaluate(samples: &[Sample], moving: &Level, t: &Rigid) -> Sums {
    samples
        .par_chunks(4096)
        .map(|chunk| {
            let mut s = Sums::default();
            for &(y, fv) in chunk {
                let Some((mv, jac)) = warped(moving, t, y) else {
                    continue;
                };
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

pub(super) fn ncc(s: &Sums) -> f64 {
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
pub(super) fn optimise(
    samples: &[Sample],
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
