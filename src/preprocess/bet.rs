//! Brain extraction by a deformable surface, in the manner of BET (Smith 2002, "Fast robust
//! automated brain extraction", Hum. Brain Mapp. 17:143).
//!
//! A tessellated sphere starts inside the head at its centre of gravity and moves, vertex by
//! vertex, under three forces: a tangential one that keeps the vertices evenly spaced, a
//! normal one that limits the local curvature (radii of curvature below ≈ 3 mm are pulled
//! flat, above ≈ 10 mm left alone), and an intensity one that pushes a vertex outward while
//! the image along its inward normal is brain-bright and pulls it in once it reaches dark
//! tissue. On gradient-echo magnitude the dark tissue that stops it is the skull's inner
//! table and the dura; the surface's stiffness keeps it from leaking through the thin gaps
//! between brain and scalp fat, eyes or marrow that a threshold leaks through.
//!
//! The surface is then filled into a voxel mask (a voxel is in the brain when its centre is
//! inside the closed surface). Positions are in mm along the voxel axes, so anisotropic
//! voxels are handled; the affine plays no part.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::util::quantile;
use crate::{Error, Mask, Result, Volume};

/// Brain-extraction settings (YAML section `mask.bet`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BetConfig {
    /// Fractional intensity threshold (0..1): where between the local background and the
    /// local brain intensity the surface settles. Smaller values give larger brains.
    pub fractional_threshold: f64,
    /// Number of surface updates.
    pub iterations: usize,
    /// Subdivisions of the icosahedron that starts the surface: 4 gives 2562 vertices, ≈ 5 mm
    /// apart on an adult brain.
    pub subdivisions: usize,
    /// How far (mm) along the inward normal each vertex looks for the darkest intensity.
    pub search_depth_mm: f64,
}

impl Default for BetConfig {
    fn default() -> Self {
        BetConfig {
            fractional_threshold: 0.5,
            iterations: 1000,
            subdivisions: 4,
            search_depth_mm: 20.0,
        }
    }
}

/// Radii of curvature (mm) below which the surface is smoothed fully and above which not
/// at all (Smith 2002).
const R_MIN_MM: f64 = 3.33;
const R_MAX_MM: f64 = 10.0;

/// The brain of `image` (an echo-combined magnitude) as a mask on its grid.
pub fn extract_brain(image: &Volume, config: &BetConfig) -> Result<Mask> {
    let surface = fit_surface(image, config)?;
    Ok(surface.fill(image.dims, image.geometry.voxel_size))
}

/// Intensity landmarks of the whole image (Smith 2002, section 2.2).
#[derive(Clone, Copy, Debug)]
struct Landmarks {
    /// Robust minimum (2nd percentile).
    t2: f64,
    /// Brain/background threshold, 10 % of the way from t2 to the 98th percentile.
    t: f64,
    /// Median intensity of the head within `radius` of `centre`.
    tm: f64,
    /// Centre of gravity (mm) and radius (mm) of the head.
    centre: [f64; 3],
    radius: f64,
}

impl Landmarks {
    fn of(image: &Volume) -> Result<Landmarks> {
        let data = &image.data;
        let finite: Vec<bool> = data.iter().map(|v| v.is_finite()).collect();
        let q = |p| quantile(data, Some(&finite), p).map(|v| v as f64);
        let (Some(t2), Some(t98)) = (q(0.02), q(0.98)) else {
            return Err(Error::Numerics(
                "brain extraction: the magnitude image has no finite voxel".into(),
            ));
        };
        if t98 <= t2 {
            return Err(Error::Numerics(
                "brain extraction: the magnitude image has no contrast (2nd and 98th \
                 percentiles are equal); give a mask instead"
                    .into(),
            ));
        }
        let t = t2 + 0.1 * (t98 - t2);
        let [nx, ny, _] = image.dims;
        let h = image.geometry.voxel_size;
        let pos = |v: usize| [v % nx, (v / nx) % ny, v / (nx * ny)];
        // Centre of gravity of the voxels above t, weighted by intensity clamped at t98.
        let (mut w, mut c, mut count) = (0.0f64, [0.0f64; 3], 0usize);
        for (v, &x) in data.iter().enumerate() {
            let x = x as f64;
            if x > t {
                let x = x.min(t98);
                let p = pos(v);
                for a in 0..3 {
                    c[a] += x * p[a] as f64 * h[a];
                }
                w += x;
                count += 1;
            }
        }
        let centre = c.map(|v| v / w);
        let volume = count as f64 * h[0] * h[1] * h[2];
        let radius = (3.0 * volume / (4.0 * std::f64::consts::PI)).cbrt();
        let near: Vec<f32> = data
            .iter()
            .enumerate()
            .filter(|&(v, &x)| {
                let p = pos(v);
                let d2: f64 = (0..3)
                    .map(|a| (p[a] as f64 * h[a] - centre[a]).powi(2))
                    .sum();
                (x as f64) > t2 && (x as f64) < t98 && d2 < radius * radius
            })
            .map(|(_, &x)| x)
            .collect();
        let tm = quantile(&near, None, 0.5).map_or(t98, |v| v as f64);
        Ok(Landmarks {
            t2,
            t,
            tm,
            centre,
            radius,
        })
    }
}

/// A closed triangulated surface in mm.
#[derive(Clone, Debug)]
pub(crate) struct Surface {
    pub vertices: Vec<[f64; 3]>,
    /// Triangles, counter-clockwise seen from outside (normals point outward).
    pub triangles: Vec<[usize; 3]>,
    /// Each vertex's neighbours along the edges.
    pub neighbours: Vec<Vec<usize>>,
}

impl Surface {
    /// The unit icosahedron subdivided `levels` times, projected onto the unit sphere.
    pub fn sphere(levels: usize) -> Surface {
        let g = (1.0 + 5f64.sqrt()) / 2.0;
        let mut vertices: Vec<[f64; 3]> = vec![
            [-1.0, g, 0.0],
            [1.0, g, 0.0],
            [-1.0, -g, 0.0],
            [1.0, -g, 0.0],
            [0.0, -1.0, g],
            [0.0, 1.0, g],
            [0.0, -1.0, -g],
            [0.0, 1.0, -g],
            [g, 0.0, -1.0],
            [g, 0.0, 1.0],
            [-g, 0.0, -1.0],
            [-g, 0.0, 1.0],
        ];
        let mut triangles: Vec<[usize; 3]> = vec![
            [0, 11, 5],
            [0, 5, 1],
            [0, 1, 7],
            [0, 7, 10],
            [0, 10, 11],
            [1, 5, 9],
            [5, 11, 4],
            [11, 10, 2],
            [10, 7, 6],
            [7, 1, 8],
            [3, 9, 4],
            [3, 4, 2],
            [3, 2, 6],
            [3, 6, 8],
            [3, 8, 9],
            [4, 9, 5],
            [2, 4, 11],
            [6, 2, 10],
            [8, 6, 7],
            [9, 8, 1],
        ];
        for _ in 0..levels {
            let mut midpoint = std::collections::HashMap::new();
            let mut mid = |a: usize, b: usize, vertices: &mut Vec<[f64; 3]>| {
                *midpoint.entry((a.min(b), a.max(b))).or_insert_with(|| {
                    let (p, q) = (vertices[a], vertices[b]);
                    vertices.push([0, 1, 2].map(|i| (p[i] + q[i]) / 2.0));
                    vertices.len() - 1
                })
            };
            let mut next = Vec::with_capacity(triangles.len() * 4);
            for &[a, b, c] in &triangles {
                let ab = mid(a, b, &mut vertices);
                let bc = mid(b, c, &mut vertices);
                let ca = mid(c, a, &mut vertices);
                next.extend([[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]);
            }
            triangles = next;
        }
        for v in &mut vertices {
            let n = norm(*v);
            *v = v.map(|x| x / n);
        }
        // Orient every triangle outward (its normal along its centroid).
        for t in &mut triangles {
            let n = cross(
                sub(vertices[t[1]], vertices[t[0]]),
                sub(vertices[t[2]], vertices[t[0]]),
            );
            if dot(n, vertices[t[0]]) < 0.0 {
                t.swap(1, 2);
            }
        }
        let mut neighbours = vec![Vec::new(); vertices.len()];
        for t in &triangles {
            for e in 0..3 {
                let (a, b) = (t[e], t[(e + 1) % 3]);
                if !neighbours[a].contains(&b) {
                    neighbours[a].push(b);
                }
                if !neighbours[b].contains(&a) {
                    neighbours[b].push(a);
                }
            }
        }
        Surface {
            vertices,
            triangles,
            neighbours,
        }
    }

    /// Unit outward normal of each vertex: the area-weighted mean of its triangles' normals.
    fn normals(&self) -> Vec<[f64; 3]> {
        let mut n = vec![[0.0f64; 3]; self.vertices.len()];
        for t in &self.triangles {
            let v = |i: usize| self.vertices[t[i]];
            let f = cross(sub(v(1), v(0)), sub(v(2), v(0)));
            for &i in t {
                n[i] = add(n[i], f);
            }
        }
        n.iter()
            .map(|&x| {
                let l = norm(x);
                if l > 0.0 {
                    x.map(|c| c / l)
                } else {
                    x
                }
            })
            .collect()
    }

    /// Mean edge length.
    fn mean_edge(&self) -> f64 {
        let (mut sum, mut count) = (0.0, 0usize);
        for (a, ns) in self.neighbours.iter().enumerate() {
            for &b in ns {
                sum += norm(sub(self.vertices[a], self.vertices[b]));
                count += 1;
            }
        }
        sum / count.max(1) as f64
    }

    /// Voxels (of a grid with `dims` and `voxel_size`) whose centres lie inside the surface:
    /// for each line along z, the crossings with the triangles are sorted and the voxels
    /// between the 1st and 2nd, 3rd and 4th, … crossing are inside.
    pub fn fill(&self, dims: [usize; 3], voxel_size: [f64; 3]) -> Mask {
        let [nx, ny, nz] = dims;
        // Lines pass a hair off the voxel centres so that none runs exactly through an
        // edge or vertex of the surface (which would count one crossing twice).
        const JITTER: [f64; 2] = [1.234e-4, 2.718e-4];
        let to_voxel = |p: [f64; 3]| [0, 1, 2].map(|a| p[a] / voxel_size[a]);
        let mut crossings: Vec<(usize, f64)> = self
            .triangles
            .par_iter()
            .flat_map_iter(|t| {
                let [a, b, c] = t.map(|i| to_voxel(self.vertices[i]));
                let lo = |k: usize| a[k].min(b[k]).min(c[k]);
                let hi = |k: usize| a[k].max(b[k]).max(c[k]);
                let range = |k: usize, n: usize| {
                    let first = (lo(k) - JITTER[k]).ceil().max(0.0) as usize;
                    let last = ((hi(k) - JITTER[k]).floor()).min(n as f64 - 1.0);
                    (first, last)
                };
                let (i0, i1) = range(0, nx);
                let (j0, j1) = range(1, ny);
                let mut out = Vec::new();
                if i1 < 0.0 || j1 < 0.0 {
                    return out.into_iter();
                }
                let det = (b[0] - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (b[1] - a[1]);
                if det == 0.0 {
                    return out.into_iter();
                }
                for j in j0..=j1 as usize {
                    for i in i0..=i1 as usize {
                        let (x, y) = (i as f64 + JITTER[0], j as f64 + JITTER[1]);
                        // Barycentric coordinates of (x, y) in the projected triangle.
                        let u = ((x - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (y - a[1])) / det;
                        let v = ((b[0] - a[0]) * (y - a[1]) - (x - a[0]) * (b[1] - a[1])) / det;
                        if u >= 0.0 && v >= 0.0 && u + v <= 1.0 {
                            let z = a[2] + u * (b[2] - a[2]) + v * (c[2] - a[2]);
                            out.push((i + nx * j, z));
                        }
                    }
                }
                out.into_iter()
            })
            .collect();
        crossings.par_sort_unstable_by(|p, q| p.0.cmp(&q.0).then(p.1.total_cmp(&q.1)));
        let mut mask = vec![false; nx * ny * nz];
        for line in crossings.chunk_by(|p, q| p.0 == q.0) {
            let col = line[0].0;
            for pair in line.chunks_exact(2) {
                let first = pair[0].1.ceil().max(0.0) as usize;
                let last = pair[1].1.floor().min(nz as f64 - 1.0);
                if last < 0.0 {
                    continue;
                }
                for k in first..=last as usize {
                    mask[col + nx * ny * k] = true;
                }
            }
        }
        mask
    }
}

/// Trilinear interpolation of `image` at `p` (mm along the voxel axes); 0 outside the grid.
fn sample(image: &Volume, p: [f64; 3]) -> f64 {
    let [nx, ny, nz] = image.dims;
    let h = image.geometry.voxel_size;
    let x = [p[0] / h[0], p[1] / h[1], p[2] / h[2]];
    let n = [nx, ny, nz];
    let mut base = [0usize; 3];
    let mut frac = [0.0f64; 3];
    for a in 0..3 {
        if !(x[a] >= 0.0 && x[a] <= (n[a] - 1) as f64) {
            return 0.0;
        }
        let f = x[a].floor().min((n[a].max(2) - 2) as f64);
        base[a] = f as usize;
        frac[a] = x[a] - f;
    }
    let at = |i: usize, j: usize, k: usize| {
        let (i, j, k) = (
            (base[0] + i).min(nx - 1),
            (base[1] + j).min(ny - 1),
            (base[2] + k).min(nz - 1),
        );
        let v = image.data[i + nx * (j + ny * k)];
        if v.is_finite() {
            v as f64
        } else {
            0.0
        }
    };
    let mut acc = 0.0;
    for (k, wk) in [(0, 1.0 - frac[2]), (1, frac[2])] {
        for (j, wj) in [(0, 1.0 - frac[1]), (1, frac[1])] {
            for (i, wi) in [(0, 1.0 - frac[0]), (1, frac[0])] {
                let w = wi * wj * wk;
                if w > 0.0 {
                    acc += w * at(i, j, k);
                }
            }
        }
    }
    acc
}

/// Grows the surface from a sphere inside the head to the brain's edge.
pub(crate) fn fit_surface(image: &Volume, config: &BetConfig) -> Result<Surface> {
    if !(config.fractional_threshold > 0.0 && config.fractional_threshold < 1.0) {
        return Err(Error::Usage(format!(
            "mask.bet.fractional_threshold must be between 0 and 1, got {}",
            config.fractional_threshold
        )));
    }
    let lm = Landmarks::of(image)?;
    let mut surface = Surface::sphere(config.subdivisions.min(6));
    for v in &mut surface.vertices {
        *v = [0, 1, 2].map(|a| lm.centre[a] + 0.5 * lm.radius * v[a]);
    }
    let e = 0.5 * (1.0 / R_MIN_MM + 1.0 / R_MAX_MM);
    let f = 6.0 / (1.0 / R_MIN_MM - 1.0 / R_MAX_MM);
    let bt = config.fractional_threshold;
    let step = image
        .geometry
        .voxel_size
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min);
    let d1 = config.search_depth_mm.max(step);
    let samples1 = (d1 / step).round() as usize;
    let samples2 = samples1 / 2;
    for _ in 0..config.iterations {
        let normals = surface.normals();
        let l = surface.mean_edge();
        let moves: Vec<[f64; 3]> = (0..surface.vertices.len())
            .into_par_iter()
            .map(|i| {
                let p = surface.vertices[i];
                let n = normals[i];
                let ns = &surface.neighbours[i];
                let mean = ns
                    .iter()
                    .fold([0.0; 3], |acc, &j| add(acc, surface.vertices[j]))
                    .map(|c| c / ns.len() as f64);
                let s = sub(mean, p);
                let sn = scale(n, dot(s, n));
                let st = sub(s, sn);
                // Smoothness: pull along the normal in proportion to local curvature.
                let inv_r = 2.0 * norm(sn) / (l * l);
                let f2 = 0.5 * (1.0 + (f * (inv_r - e)).tanh());
                // Brightness along the inward normal.
                let (mut lo, mut hi) = (lm.tm, lm.t);
                for d in 0..=samples1 {
                    let x = sample(image, sub(p, scale(n, d as f64 * step)));
                    lo = lo.min(x);
                    if d <= samples2 {
                        hi = hi.max(x);
                    }
                }
                let i_min = lo.max(lm.t2);
                let i_max = hi.min(lm.tm);
                let tl = (i_max - lm.t2) * bt + lm.t2;
                let f3 = if i_max > lm.t2 {
                    2.0 * (i_min - tl) / (i_max - lm.t2)
                } else {
                    -1.0
                };
                add(add(scale(st, 0.5), scale(sn, f2)), scale(n, 0.05 * f3 * l))
            })
            .collect();
        for (v, m) in surface.vertices.iter_mut().zip(&moves) {
            *v = add(*v, *m);
        }
    }
    Ok(surface)
}

fn add(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn scale(a: [f64; 3], s: f64) -> [f64; 3] {
    a.map(|x| x * s)
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::rng::Rng;
    use crate::Geometry;

    fn dice(a: &[bool], b: &[bool]) -> f64 {
        let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count() as f64;
        let sum = (a.iter().filter(|&&x| x).count() + b.iter().filter(|&&x| x).count()) as f64;
        2.0 * both / sum
    }

    fn ball(dims: [usize; 3], vox: [f64; 3], c: [f64; 3], r: [f64; 3]) -> Vec<bool> {
        let [nx, ny, nz] = dims;
        let mut m = vec![false; nx * ny * nz];
        for k in 0..nz {
            for j in 0..ny {
                for i in 0..nx {
                    let p = [i as f64 * vox[0], j as f64 * vox[1], k as f64 * vox[2]];
                    let d: f64 = (0..3).map(|a| ((p[a] - c[a]) / r[a]).powi(2)).sum();
                    m[i + nx * (j + ny * k)] = d < 1.0;
                }
            }
        }
        m
    }

    #[test]
    fn icosphere_is_closed_and_outward() {
        for levels in 0..4 {
            let s = Surface::sphere(levels);
            assert_eq!(s.vertices.len(), 10 * 4usize.pow(levels as u32) + 2);
            // Euler: V − E + F = 2 for a closed genus-0 surface.
            let edges: usize = s.neighbours.iter().map(Vec::len).sum::<usize>() / 2;
            assert_eq!(
                s.vertices.len() as i64 - edges as i64 + s.triangles.len() as i64,
                2
            );
            for (v, n) in s.vertices.iter().zip(s.normals()) {
                assert!(dot(*v, n) > 0.95, "normal along the radius");
            }
        }
    }

    #[test]
    fn filled_sphere_matches_the_analytic_ball() {
        let dims = [40, 36, 30];
        let vox = [1.0, 1.2, 1.5];
        let c = [20.3, 21.1, 22.4];
        let r = 14.0;
        let mut s = Surface::sphere(5);
        for v in &mut s.vertices {
            *v = [0, 1, 2].map(|a| c[a] + r * v[a]);
        }
        let got = s.fill(dims, vox);
        let want = ball(dims, vox, c, [r; 3]);
        // The polyhedron lies within r(1 − cos θ) ≈ 0.01 mm of the sphere: only voxels
        // whose centres sit on the sphere can differ.
        let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert!(diff <= 10, "{diff} voxels differ");
        assert!(dice(&got, &want) > 0.999);
    }

    #[test]
    fn trilinear_sample_is_exact_on_linear_images() {
        let dims = [5, 6, 7];
        let vox = [1.0, 2.0, 0.5];
        let mut data = vec![0.0f32; 5 * 6 * 7];
        for k in 0..7 {
            for j in 0..6 {
                for i in 0..5 {
                    data[i + 5 * (j + 6 * k)] =
                        (1.0 + 2.0 * i as f64 * vox[0] - 0.5 * j as f64 * vox[1]
                            + 3.0 * k as f64 * vox[2]) as f32;
                }
            }
        }
        let img = Volume::new(dims, data, Geometry::from_voxel_size(vox));
        for p in [[1.3, 2.7, 1.1], [4.0, 10.0, 3.0], [0.0, 0.0, 0.0]] {
            let want = 1.0 + 2.0 * p[0] - 0.5 * p[1] + 3.0 * p[2];
            assert!((sample(&img, p) - want).abs() < 1e-4, "{p:?}");
        }
        assert_eq!(sample(&img, [-0.1, 1.0, 1.0]), 0.0);
    }

    /// A bright "brain" ellipsoid inside a dark "skull" shell inside a bright "scalp" shell
    /// (brighter than the brain, as fat is), with Rician noise.
    fn head(dims: [usize; 3], vox: [f64; 3]) -> (Volume, Vec<bool>) {
        let c = dims.map(|n| n as f64 / 2.0);
        let c = [c[0] * vox[0], c[1] * vox[1], c[2] * vox[2]];
        let r = [60.0, 72.0, 52.0];
        let grown = |d: f64| ball(dims, vox, c, r.map(|x| x + d));
        let (brain, skull, scalp) = (grown(0.0), grown(7.0), grown(13.0));
        let mut rng = Rng::new(11);
        let data = (0..brain.len())
            .map(|v| {
                let base = if brain[v] {
                    1.0
                } else if skull[v] {
                    0.05
                } else if scalp[v] {
                    1.3
                } else {
                    0.0
                };
                let (a, b) = (rng.normal() * 0.05, rng.normal() * 0.05);
                ((base + a).powi(2) + b * b).sqrt() as f32
            })
            .collect();
        (
            Volume::new(dims, data, Geometry::from_voxel_size(vox)),
            brain,
        )
    }

    #[test]
    fn brain_inside_skull_and_scalp_is_extracted() {
        let vox = [3.0, 3.0, 3.0];
        let (img, brain) = head([60, 64, 52], vox);
        let got = extract_brain(&img, &BetConfig::default()).unwrap();
        let d = dice(&got, &brain);
        let vol = got.iter().filter(|&&b| b).count() as f64;
        let want = brain.iter().filter(|&&b| b).count() as f64;
        assert!(d > 0.95, "Dice {d}");
        assert!(
            (vol / want - 1.0).abs() < 0.05,
            "volume ratio {}",
            vol / want
        );
    }

    #[test]
    fn bad_images_and_settings_are_clear_errors() {
        let g = Geometry::from_voxel_size([1.0; 3]);
        let flat = Volume::new([8, 8, 8], vec![1.0; 512], g.clone());
        let e = extract_brain(&flat, &BetConfig::default()).unwrap_err();
        assert!(e.to_string().contains("no contrast"), "{e}");
        let nan = Volume::new([8, 8, 8], vec![f32::NAN; 512], g);
        assert!(extract_brain(&nan, &BetConfig::default()).is_err());
        let (img, _) = head([40, 40, 40], [4.0; 3]);
        let bad = BetConfig {
            fractional_threshold: 1.5,
            ..BetConfig::default()
        };
        let e = extract_brain(&img, &bad).unwrap_err();
        assert!(e.to_string().contains("fractional_threshold"), "{e}");
    }
}
