//! Geometric multigrid for Laplace's equation on a masked domain with Dirichlet data.
//!
//! The unknowns are the voxels of a mask; every other voxel (and every point beyond the grid,
//! taken as 0) holds a fixed value. The discrete operator is the 7-point Laplacian with the
//! voxel sizes of each axis, `A u = Σ_a w_a (2u − u₋ − u₊)`, `w_a = 1/h_a²`, which is
//! symmetric positive definite on the unknowns.
//!
//! Each V-cycle smooths by red-black Gauss-Seidel (a red voxel's neighbours are all black, so
//! a colour is relaxed in parallel; the two colours are stored apart so that this needs no
//! shared mutable state), restricts the residual by full weighting, recurses, and adds the
//! trilinearly interpolated correction (vertex-centred: coarse point `I` sits on fine point
//! `2I`). A coarse point is an unknown when the fine point under it is, so the coarse domains
//! follow the mask. With anisotropic voxels only the finest axes are halved until the spacings
//! are even (semi-coarsening), which keeps point smoothing effective. The coarsest level is
//! solved by conjugate gradients.

use rayon::prelude::*;

/// Marks "no unknown here".
const NONE: u32 = u32::MAX;

/// Stopping rule and smoothing of [`solve_dirichlet`].
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Stop when ‖f − A u‖ ≤ tolerance · ‖f‖ on the finest level.
    pub tolerance: f64,
    /// At most this many V-cycles.
    pub max_cycles: usize,
    /// Red-black Gauss-Seidel sweeps before and after each coarse-grid correction.
    pub smoothing: usize,
}

/// Result of [`solve_dirichlet`].
#[derive(Clone, Debug)]
pub struct Solution {
    /// The solution at the unknowns, the given values elsewhere.
    pub values: Vec<f32>,
    pub cycles: usize,
    /// ‖f − A u‖ / ‖f‖ after the last cycle (0 when there is nothing to solve).
    pub relative_residual: f64,
    /// Number of grid levels, the finest included.
    pub levels: usize,
}

/// Solves `Δu = 0` on the voxels where `unknown` is true, with `u = values` on the others.
pub fn solve_dirichlet(
    dims: [usize; 3],
    voxel_size: [f64; 3],
    unknown: &[bool],
    values: &[f32],
    settings: &Settings,
) -> Solution {
    let fine = Level::new(dims, voxel_size, unknown);
    let f = fine.boundary_rhs(unknown, values);
    let levels = hierarchy(fine);
    let lv = &levels[0];
    let mut u = [vec![0.0; lv.cells[0].len()], vec![0.0; lv.cells[1].len()]];
    let fnorm = norm(&f);
    let (mut cycles, mut rel) = (0, 0.0);
    if fnorm > 0.0 {
        rel = norm(&lv.residual(&u, &f)) / fnorm;
        while rel > settings.tolerance && cycles < settings.max_cycles {
            vcycle(&levels, 0, &mut u, &f, settings.smoothing);
            cycles += 1;
            rel = norm(&lv.residual(&u, &f)) / fnorm;
        }
    }
    let mut out = values.to_vec();
    for c in 0..2 {
        for (&idx, &v) in lv.cells[c].iter().zip(&u[c]) {
            out[idx] = v as f32;
        }
    }
    Solution {
        values: out,
        cycles,
        relative_residual: rel,
        levels: levels.len(),
    }
}

/// Values at the unknowns, split by colour.
type Split = [Vec<f64>; 2];

fn norm(x: &Split) -> f64 {
    x.iter()
        .map(|v| v.par_iter().map(|a| a * a).sum::<f64>())
        .sum::<f64>()
        .sqrt()
}

/// One grid of the hierarchy.
struct Level {
    dims: [usize; 3],
    voxel_size: [f64; 3],
    w: [f64; 3],
    diag: f64,
    /// Grid index of each unknown, by colour `(i + j + k) mod 2`.
    cells: [Vec<usize>; 2],
    /// Per unknown, the slots of its six neighbours (−x, +x, −y, +y, −z, +z) in the other
    /// colour's arrays; `NONE` where the neighbour is fixed.
    nbrs: [Vec<[u32; 6]>; 2],
    /// Grid index → slot in its colour's arrays, `NONE` where fixed.
    slot: Vec<u32>,
}

fn coords(idx: usize, dims: [usize; 3]) -> [usize; 3] {
    [
        idx % dims[0],
        (idx / dims[0]) % dims[1],
        idx / (dims[0] * dims[1]),
    ]
}

/// The in-grid face neighbours of `p`, as (direction 0..6, grid index).
fn face_neighbours(p: [usize; 3], dims: [usize; 3]) -> [Option<usize>; 6] {
    let [nx, ny, nz] = dims;
    let idx = p[0] + nx * (p[1] + ny * p[2]);
    [
        (p[0] > 0).then(|| idx - 1),
        (p[0] + 1 < nx).then(|| idx + 1),
        (p[1] > 0).then(|| idx - nx),
        (p[1] + 1 < ny).then(|| idx + nx),
        (p[2] > 0).then(|| idx - nx * ny),
        (p[2] + 1 < nz).then(|| idx + nx * ny),
    ]
}

impl Level {
    fn new(dims: [usize; 3], voxel_size: [f64; 3], unknown: &[bool]) -> Level {
        let w = voxel_size.map(|h| 1.0 / (h * h));
        let mut cells = [Vec::new(), Vec::new()];
        let mut slot = vec![NONE; unknown.len()];
        for (idx, _) in unknown.iter().enumerate().filter(|(_, &u)| u) {
            let p = coords(idx, dims);
            let c = (p[0] + p[1] + p[2]) & 1;
            slot[idx] = cells[c].len() as u32;
            cells[c].push(idx);
        }
        let nbrs = [0, 1].map(|c| {
            cells[c]
                .par_iter()
                .map(|&idx| {
                    face_neighbours(coords(idx, dims), dims)
                        .map(|nb| nb.map_or(NONE, |nb| slot[nb]))
                })
                .collect()
        });
        Level {
            dims,
            voxel_size,
            w,
            diag: 2.0 * (w[0] + w[1] + w[2]),
            cells,
            nbrs,
            slot,
        }
    }

    fn len(&self) -> usize {
        self.cells[0].len() + self.cells[1].len()
    }

    /// The right-hand side that moves the fixed neighbours' values to the unknowns.
    fn boundary_rhs(&self, unknown: &[bool], values: &[f32]) -> Split {
        [0, 1].map(|c| {
            self.cells[c]
                .par_iter()
                .map(|&idx| {
                    face_neighbours(coords(idx, self.dims), self.dims)
                        .iter()
                        .enumerate()
                        .filter_map(|(d, nb)| nb.map(|nb| (d, nb)))
                        .filter(|&(_, nb)| !unknown[nb])
                        .map(|(d, nb)| self.w[d / 2] * values[nb] as f64)
                        .sum()
                })
                .collect()
        })
    }

    /// Gauss-Seidel on the unknowns of colour `c` (which only read the other colour).
    fn relax(&self, c: usize, u: &mut Split, f: &Split) {
        let [u0, u1] = u;
        let (uc, uo): (&mut Vec<f64>, &Vec<f64>) = if c == 0 { (u0, u1) } else { (u1, u0) };
        let (w, diag) = (self.w, self.diag);
        uc.par_iter_mut()
            .zip(&self.nbrs[c])
            .zip(&f[c])
            .for_each(|((x, nb), &fv)| {
                let mut s = fv;
                for (d, &t) in nb.iter().enumerate() {
                    if t != NONE {
                        s += w[d / 2] * uo[t as usize];
                    }
                }
                *x = s / diag;
            });
    }

    fn apply(&self, u: &Split) -> Split {
        let (w, diag) = (self.w, self.diag);
        [0, 1].map(|c| {
            u[c].par_iter()
                .zip(&self.nbrs[c])
                .map(|(&x, nb)| {
                    let mut s = diag * x;
                    for (d, &t) in nb.iter().enumerate() {
                        if t != NONE {
                            s -= w[d / 2] * u[1 - c][t as usize];
                        }
                    }
                    s
                })
                .collect()
        })
    }

    fn residual(&self, u: &Split, f: &Split) -> Split {
        let mut r = self.apply(u);
        for c in 0..2 {
            r[c].par_iter_mut()
                .zip(&f[c])
                .for_each(|(r, &f)| *r = f - *r);
        }
        r
    }

    /// The values on the whole grid, zero at fixed points.
    fn to_grid(&self, x: &Split) -> Vec<f64> {
        let [nx, ny, _] = self.dims;
        let mut g = vec![0.0; self.slot.len()];
        g.par_chunks_mut(nx * ny)
            .zip(self.slot.par_chunks(nx * ny))
            .enumerate()
            .for_each(|(k, (g, s))| {
                for j in 0..ny {
                    for i in 0..nx {
                        let t = s[i + nx * j];
                        if t != NONE {
                            g[i + nx * j] = x[(i + j + k) & 1][t as usize];
                        }
                    }
                }
            });
        g
    }

    /// The next coarser level, halving the axes whose spacing is within √2 of the finest;
    /// `None` when that would not shrink the problem.
    fn coarser(&self) -> Option<(Level, [bool; 3])> {
        let hmin = self
            .voxel_size
            .iter()
            .cloned()
            .fold(f64::INFINITY, f64::min);
        let halve = [0, 1, 2].map(|a| self.voxel_size[a] < 1.42 * hmin && self.dims[a] >= 5);
        if !halve.iter().any(|&h| h) {
            return None;
        }
        let cdims = [0, 1, 2].map(|a| {
            if halve[a] {
                self.dims[a].div_ceil(2)
            } else {
                self.dims[a]
            }
        });
        let ch = [0, 1, 2].map(|a| self.voxel_size[a] * if halve[a] { 2.0 } else { 1.0 });
        let [nx, ny, _] = self.dims;
        let unknown: Vec<bool> = (0..cdims.iter().product())
            .into_par_iter()
            .map(|cidx| {
                let p = coords(cidx, cdims);
                let q = [0, 1, 2].map(|a| if halve[a] { 2 * p[a] } else { p[a] });
                self.slot[q[0] + nx * (q[1] + ny * q[2])] != NONE
            })
            .collect();
        let coarse = Level::new(cdims, ch, &unknown);
        (coarse.len() > 0 && coarse.len() < self.len()).then_some((coarse, halve))
    }

    /// Full weighting of the residual onto the coarse unknowns.
    fn restrict(&self, r: &Split, coarse: &Level, halve: [bool; 3]) -> Split {
        let g = self.to_grid(r);
        let [nx, ny, _] = self.dims;
        [0, 1].map(|c| {
            coarse.cells[c]
                .par_iter()
                .map(|&cidx| {
                    let p = coords(cidx, coarse.dims);
                    let taps = [0, 1, 2].map(|a| restriction_taps(p[a], self.dims[a], halve[a]));
                    let mut s = 0.0;
                    for &(k, wk) in taps[2].iter().flatten() {
                        for &(j, wj) in taps[1].iter().flatten() {
                            for &(i, wi) in taps[0].iter().flatten() {
                                s += wi * wj * wk * g[i + nx * (j + ny * k)];
                            }
                        }
                    }
                    s
                })
                .collect()
        })
    }

    /// Adds the trilinear interpolation of the coarse correction `e` to `u`.
    fn prolong_add(&self, coarse: &Level, e: &Split, halve: [bool; 3], u: &mut Split) {
        let g = coarse.to_grid(e);
        let [cx, cy, _] = coarse.dims;
        for c in 0..2 {
            u[c].par_iter_mut()
                .zip(&self.cells[c])
                .for_each(|(x, &idx)| {
                    let p = coords(idx, self.dims);
                    let taps =
                        [0, 1, 2].map(|a| interpolation_taps(p[a], coarse.dims[a], halve[a]));
                    for &(k, wk) in taps[2].iter().flatten() {
                        for &(j, wj) in taps[1].iter().flatten() {
                            for &(i, wi) in taps[0].iter().flatten() {
                                *x += wi * wj * wk * g[i + cx * (j + cy * k)];
                            }
                        }
                    }
                });
        }
    }

    /// Conjugate gradients to a tight tolerance: the coarsest level is small.
    fn solve_exactly(&self, u: &mut Split, f: &Split) {
        let dot = |a: &Split, b: &Split| -> f64 {
            (0..2)
                .map(|c| a[c].iter().zip(&b[c]).map(|(x, y)| x * y).sum::<f64>())
                .sum()
        };
        let mut r = self.residual(u, f);
        let mut p = r.clone();
        let mut rr = dot(&r, &r);
        let stop = 1e-20 * dot(f, f);
        for _ in 0..4 * self.len() + 10 {
            if rr <= stop {
                break;
            }
            let ap = self.apply(&p);
            let alpha = rr / dot(&p, &ap);
            for c in 0..2 {
                for s in 0..u[c].len() {
                    u[c][s] += alpha * p[c][s];
                    r[c][s] -= alpha * ap[c][s];
                }
            }
            let rr_new = dot(&r, &r);
            let beta = rr_new / rr;
            rr = rr_new;
            for c in 0..2 {
                for s in 0..p[c].len() {
                    p[c][s] = r[c][s] + beta * p[c][s];
                }
            }
        }
    }
}

/// Fine points (and weights) that full weighting gathers into coarse point `p` along one axis.
fn restriction_taps(p: usize, n: usize, halve: bool) -> [Option<(usize, f64)>; 3] {
    if !halve {
        return [Some((p, 1.0)), None, None];
    }
    let q = 2 * p;
    [
        (q > 0).then(|| (q - 1, 0.25)),
        Some((q, 0.5)),
        (q + 1 < n).then(|| (q + 1, 0.25)),
    ]
}

/// Coarse points (and weights) that linear interpolation reads for fine point `p` along one
/// axis; points beyond the coarse grid are fixed at zero and left out.
fn interpolation_taps(p: usize, nc: usize, halve: bool) -> [Option<(usize, f64)>; 2] {
    if !halve {
        return [Some((p, 1.0)), None];
    }
    if p.is_multiple_of(2) {
        [Some((p / 2, 1.0)), None]
    } else {
        [
            Some((p / 2, 0.5)),
            (p / 2 + 1 < nc).then(|| (p / 2 + 1, 0.5)),
        ]
    }
}

/// The levels, finest first, each but the last with how its coarser neighbour was made.
struct Hierarchy {
    levels: Vec<Level>,
    halve: Vec<[bool; 3]>,
}

impl std::ops::Index<usize> for Hierarchy {
    type Output = Level;
    fn index(&self, i: usize) -> &Level {
        &self.levels[i]
    }
}

impl Hierarchy {
    fn len(&self) -> usize {
        self.levels.len()
    }
}

/// Coarsens until the coarsest level has at most a few hundred unknowns (CG solves those
/// in a handful of iterations) or cannot shrink further.
fn hierarchy(fine: Level) -> Hierarchy {
    let mut h = Hierarchy {
        levels: vec![fine],
        halve: Vec::new(),
    };
    while h.levels.last().expect("never empty").len() > 512 {
        match h.levels.last().expect("never empty").coarser() {
            Some((c, halve)) => {
                h.levels.push(c);
                h.halve.push(halve);
            }
            None => break,
        }
    }
    h
}

fn vcycle(h: &Hierarchy, l: usize, u: &mut Split, f: &Split, smoothing: usize) {
    let lv = &h[l];
    if l + 1 == h.len() {
        lv.solve_exactly(u, f);
        return;
    }
    for _ in 0..smoothing {
        lv.relax(0, u, f);
        lv.relax(1, u, f);
    }
    let coarse = &h[l + 1];
    let fc = lv.restrict(&lv.residual(u, f), coarse, h.halve[l]);
    let mut e = [
        vec![0.0; coarse.cells[0].len()],
        vec![0.0; coarse.cells[1].len()],
    ];
    vcycle(h, l + 1, &mut e, &fc, smoothing);
    lv.prolong_add(coarse, &e, h.halve[l], u);
    // The reverse colour order keeps the cycle symmetric.
    for _ in 0..smoothing {
        lv.relax(1, u, f);
        lv.relax(0, u, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ball(dims: [usize; 3], c: [f64; 3], r: f64, h: [f64; 3]) -> Vec<bool> {
        (0..dims.iter().product())
            .map(|idx| {
                let p = coords(idx, dims);
                (0..3)
                    .map(|a| ((p[a] as f64 - c[a]) * h[a]).powi(2))
                    .sum::<f64>()
                    < r * r
            })
            .collect()
    }

    /// The mask voxels with all six neighbours in the mask and inside the grid.
    fn interior(mask: &[bool], dims: [usize; 3]) -> Vec<bool> {
        (0..mask.len())
            .map(|idx| {
                let nb = face_neighbours(coords(idx, dims), dims);
                mask[idx] && nb.iter().all(|n| n.is_some_and(|n| mask[n]))
            })
            .collect()
    }

    /// Values of `g(x, y, z)` (mm, from the grid centre) on the grid.
    fn sample(dims: [usize; 3], h: [f64; 3], g: impl Fn(f64, f64, f64) -> f64) -> Vec<f32> {
        (0..dims.iter().product())
            .map(|idx| {
                let p = coords(idx, dims);
                let x = [0, 1, 2].map(|a| (p[a] as f64 - (dims[a] as f64 - 1.0) / 2.0) * h[a]);
                g(x[0], x[1], x[2]) as f32
            })
            .collect()
    }

    /// Quadratic harmonic functions are harmonic for the discrete Laplacian too (the second
    /// differences of a quadratic are exact), so the solution must reproduce them to
    /// round-off, on anisotropic voxels and a non-convex domain.
    #[test]
    fn reproduces_a_quadratic_harmonic_function_exactly() {
        let dims = [40, 36, 30];
        let h = [1.0, 1.2, 2.0];
        let mut mask = ball(dims, [20.0, 18.0, 15.0], 19.0, h);
        // A notch makes the domain non-convex.
        for (m, b) in mask.iter_mut().zip(ball(dims, [32.0, 18.0, 15.0], 8.0, h)) {
            *m &= !b;
        }
        let unknown = interior(&mask, dims);
        let g = |x: f64, y: f64, z: f64| 2.0 * x * x - y * y - z * z + 0.5 * x * y + 3.0 * z + 7.0;
        let truth = sample(dims, h, g);
        // Fixed values: the truth on the boundary, garbage on the unknowns (never read).
        let values: Vec<f32> = truth
            .iter()
            .zip(&unknown)
            .map(|(&t, &u)| if u { 1e3 } else { t })
            .collect();
        let settings = Settings {
            tolerance: 1e-10,
            max_cycles: 40,
            smoothing: 2,
        };
        let sol = solve_dirichlet(dims, h, &unknown, &values, &settings);
        let scale = truth.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
        let err = (0..truth.len())
            .filter(|&i| unknown[i])
            .map(|i| (sol.values[i] as f64 - truth[i] as f64).abs())
            .fold(0.0, f64::max);
        assert!(sol.levels >= 3, "levels {}", sol.levels);
        assert!(sol.relative_residual <= 1e-10, "{}", sol.relative_residual);
        assert!(err < 1e-5 * scale, "max error {err} (scale {scale})");
        // Fixed voxels are returned unchanged.
        assert!((0..truth.len()).all(|i| unknown[i] || sol.values[i] == values[i]));
    }

    /// `1/r` outside its pole is harmonic but not discretely so: the error must be at the
    /// level of the discretisation and shrink by about 4× when the voxels halve (second order).
    #[test]
    fn recovers_the_field_of_a_point_source_to_second_order() {
        let err_at = |n: usize, hv: f64| {
            let dims = [n, n, n];
            let h = [hv; 3];
            let c = (n as f64 - 1.0) / 2.0;
            let mask = ball(dims, [c; 3], 0.45 * n as f64 * hv, h);
            let unknown = interior(&mask, dims);
            // Pole 0.6 × the domain radius beyond the domain's edge.
            let pole = [0.0, 0.0, -0.45 * n as f64 * hv * 1.6];
            let g = move |x: f64, y: f64, z: f64| {
                1.0 / ((x - pole[0]).powi(2) + (y - pole[1]).powi(2) + (z - pole[2]).powi(2)).sqrt()
            };
            let truth = sample(dims, h, g);
            let settings = Settings {
                tolerance: 1e-9,
                max_cycles: 40,
                smoothing: 2,
            };
            let sol = solve_dirichlet(dims, h, &unknown, &truth, &settings);
            let (mut e, mut t) = (0.0f64, 0.0f64);
            for i in 0..truth.len() {
                if unknown[i] {
                    e += (sol.values[i] as f64 - truth[i] as f64).powi(2);
                    t += (truth[i] as f64).powi(2);
                }
            }
            ((e / t).sqrt(), sol.cycles)
        };
        // The same physical domain (radius 14.4 mm) at 1 mm and at 0.5 mm voxels.
        let (coarse, cycles_coarse) = err_at(32, 1.0);
        let (fine, cycles_fine) = err_at(64, 0.5);
        assert!(coarse < 1e-3, "relative error {coarse}");
        assert!(fine < coarse / 2.5, "{fine} vs {coarse}: not second order");
        // Multigrid: the number of cycles does not grow with the grid.
        assert!(
            cycles_fine <= cycles_coarse + 2 && cycles_fine <= 15,
            "cycles {cycles_coarse} → {cycles_fine}"
        );
    }

    #[test]
    fn restriction_is_the_adjoint_of_interpolation_over_two_per_axis() {
        // Full weighting R and linear interpolation P satisfy R = Pᵀ / 2 per halved axis
        // (the 3D operators are tensor products), as the coarse operator assumes.
        for (n, halve) in [(9usize, true), (10, true), (7, false)] {
            let nc = if halve { n.div_ceil(2) } else { n };
            let mut p = vec![vec![0.0; nc]; n];
            for (f, row) in p.iter_mut().enumerate() {
                for (c, w) in interpolation_taps(f, nc, halve).into_iter().flatten() {
                    row[c] += w;
                }
            }
            for c in 0..nc {
                let mut r = vec![0.0; n];
                for (f, w) in restriction_taps(c, n, halve).into_iter().flatten() {
                    r[f] += w;
                }
                let k = if halve { 0.5 } else { 1.0 };
                for f in 0..n {
                    assert!((r[f] - k * p[f][c]).abs() < 1e-12, "n {n} f {f} c {c}");
                }
            }
        }
    }
}
