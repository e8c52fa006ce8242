//! Quality-guided region-growing unwrapping in the spirit of ROMEO (Dymerska et al., MRM 2021).
//!
//! Every edge between face neighbours gets a quality in [0, 1], the product of factors that
//! are each mapped to `0.1 + 0.9·c` (so no single factor vetoes an edge):
//! - phase coherence `1 − |wrap(Δφ)|/π` (small neighbour differences are trustworthy);
//! - phase-gradient coherence `max(0, 1 − |wrap(Δφ₁) − (TE₁/TE₂)·wrap(Δφ₂)|)`: with a second
//!   echo, the spatial difference must scale with echo time as a field's does;
//! - magnitude coherence `(min/max)²` of the two magnitudes (edges into signal voids and
//!   across tissue boundaries are risky);
//! - magnitude weight `min(1, min(m)/(½·m_p))`, `m_p` a high percentile of the magnitude
//!   (noise is dark).
//!
//! Qualities are quantised into 255 cost bins, and the volume is grown from the best voxel
//! like Prim's minimum spanning tree: the best queued edge is popped and its new voxel gets the
//! whole number of turns that brings it closest to its already unwrapped neighbour. Only whole
//! turns are ever added, so re-wrapping gives back the input exactly.
//!
//! When the best edge left falls below `new_region_fraction` of the current seed's quality,
//! and an unvisited voxel of better quality exists, a new region is seeded there (separate
//! tissue, or tissue beyond a dark gap, is then grown from its own inside instead of through
//! noise). Regions are put in register afterwards: by a reference phase where one is known
//! (per region, the weighted median of the turns to the reference), else across their common
//! boundary (weighted vote of the turns between neighbours), then the whole volume is shifted
//! by whole turns so its weighted median phase lies in (−π, π]. Noise and voxels outside a mask
//! are reached last, because their edges sit in the worst bins.
//!
//! Multi-echo ([`unwrap_echoes`], ROMEO's template mode): the template echo is unwrapped
//! spatially (with the gradient coherence of a neighbouring echo), every other echo
//! temporally: its predicted phase from the echoes unwrapped so far (proportional to TE
//! after offset removal, else a line in TE) plus the nearest whole turns of its own data.

use std::collections::HashMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::queue::BucketQueue;
use crate::preprocess::util::{quantile, weighted_median_int};
use crate::{Error, Result};

use std::f32::consts::PI;

const TAU: f32 = 2.0 * PI;
/// Cost of a missing edge (outside the grid, NaN input): never queued.
const NO_EDGE: u8 = 0;
/// Cost of the worst edge; costs 1..=255 are the 255 quality bins, 1 the best.
const WORST: u8 = 255;
/// Each factor `c` enters the edge quality as `FLOOR + (1 − FLOOR)·c`.
const FLOOR: f32 = 0.1;

/// Region-growing settings (YAML section `unwrap.romeo`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RomeoConfig {
    /// Use the phase coherence `1 − |wrap(Δφ)|/π` of neighbours. Default true.
    pub phase_coherence: bool,
    /// Use the coherence of the spatial phase differences of the unwrapped echo and a
    /// neighbouring echo, scaled by their echo-time ratio (multi-echo only). Default true.
    pub gradient_coherence: bool,
    /// Use the magnitude coherence `(min/max)²` of neighbours. Default true.
    pub magnitude_coherence: bool,
    /// Use the magnitude weight `min(1, min(m)/(½·m_p))`. Default true.
    pub magnitude_weight: bool,
    /// The quantile `p` of the magnitude (over the mask, or the whole volume) that the
    /// magnitude weight is relative to. Default 0.95.
    pub magnitude_percentile: f64,
    /// The echo unwrapped spatially (1-based); the others are unwrapped temporally from it.
    /// Default 1.
    pub template_echo: usize,
    /// At most this many regions are seeded while edges are still queued (regions that no
    /// edge reaches, e.g. isolated by NaN, are seeded regardless). 1 grows everything from
    /// one seed. Default 64.
    pub max_regions: usize,
    /// A new region is seeded when the best queued edge has less than this fraction of the
    /// current seed's quality. Default 0.5.
    pub new_region_fraction: f64,
    /// The volume is grown as this many slabs along z, in parallel, and the slabs' regions
    /// are then registered like any others (growth is sequential within a slab). A fixed
    /// number, not the thread count, so results do not depend on the machine. Slabs are
    /// at least 16 planes thick. Default 4.
    pub slabs: usize,
}

impl Default for RomeoConfig {
    fn default() -> Self {
        RomeoConfig {
            phase_coherence: true,
            gradient_coherence: true,
            magnitude_coherence: true,
            magnitude_weight: true,
            magnitude_percentile: 0.95,
            template_echo: 1,
            max_regions: 64,
            new_region_fraction: 0.5,
            slabs: 4,
        }
    }
}

impl RomeoConfig {
    /// Checks the values a YAML file may get wrong.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.magnitude_percentile) {
            return Err(Error::Config(format!(
                "unwrap.romeo.magnitude_percentile must lie in [0, 1], got {}",
                self.magnitude_percentile
            )));
        }
        if !(0.0..=1.0).contains(&self.new_region_fraction) {
            return Err(Error::Config(format!(
                "unwrap.romeo.new_region_fraction must lie in [0, 1], got {}",
                self.new_region_fraction
            )));
        }
        if self.max_regions == 0 || self.template_echo == 0 || self.slabs == 0 {
            return Err(Error::Config(
                "unwrap.romeo.max_regions, unwrap.romeo.template_echo and unwrap.romeo.slabs \
                 must be at least 1"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// What the edge qualities are computed from (all slices x-fastest on one grid).
#[derive(Clone, Copy, Debug)]
pub struct Quality<'a> {
    /// The wrapped phase to unwrap (rad).
    pub phase: &'a [f32],
    /// Its magnitude.
    pub magnitude: Option<&'a [f32]>,
    /// Another echo's wrapped phase and the ratio TE(this) / TE(other), for the
    /// phase-gradient coherence.
    pub second_echo: Option<(&'a [f32], f32)>,
    /// Edges touching a voxel outside the mask get the worst cost (unwrapped last).
    pub mask: Option<&'a [bool]>,
}

impl<'a> Quality<'a> {
    /// Phase alone.
    pub fn phase(phase: &'a [f32]) -> Self {
        Quality {
            phase,
            magnitude: None,
            second_echo: None,
            mask: None,
        }
    }
}

/// Quantised quality of a weight in [0, 1]: 1 (best) ..= 255 (worst); 0 for NaN.
fn cost_of(w: f32) -> u8 {
    if w.is_nan() {
        NO_EDGE
    } else {
        1 + ((1.0 - w.clamp(0.0, 1.0)) * (WORST - 1) as f32).round() as u8
    }
}

/// The weight at the centre of a cost bin (0 for a missing edge).
fn weight_of(cost: u8) -> f32 {
    if cost == NO_EDGE {
        0.0
    } else {
        1.0 - (cost - 1) as f32 / (WORST - 1) as f32
    }
}

/// The quality (before quantisation) of the edge between voxels `a` and `b`.
fn edge_weight(a: usize, b: usize, q: &Quality, cfg: &RomeoConfig, m_top: Option<f32>) -> f32 {
    let f = |c: f32| FLOOR + (1.0 - FLOOR) * c;
    let d = wrap_diff(q.phase[b] - q.phase[a]);
    let mut w = 1.0f32;
    if cfg.phase_coherence {
        w *= f(1.0 - d.abs() / PI);
    }
    if cfg.gradient_coherence {
        if let Some((p2, ratio)) = q.second_echo {
            let d2 = wrap_diff(p2[b] - p2[a]);
            w *= f((1.0 - (d - ratio * d2).abs()).max(0.0));
        }
    }
    if let Some(m) = q.magnitude {
        let (lo, hi) = if m[a] <= m[b] {
            (m[a], m[b])
        } else {
            (m[b], m[a])
        };
        if cfg.magnitude_coherence {
            w *= f(if hi > 0.0 { (lo / hi).powi(2) } else { 0.0 });
        }
        if cfg.magnitude_weight {
            if let Some(top) = m_top {
                w *= f((lo / (0.5 * top)).min(1.0));
            }
        }
    }
    w
}

/// A difference wrapped to [−π, π], odd in its argument (an exact ±π step scores the same
/// from both sides).
fn wrap_diff(d: f32) -> f32 {
    let w = crate::preprocess::util::wrap(d.abs());
    if d < 0.0 {
        -w
    } else {
        w
    }
}

/// Edge costs, three per voxel (to its +x, +y, +z neighbour; [`NO_EDGE`] at the far faces):
/// `costs[3·v + d]`.
pub fn edge_costs(dims: [usize; 3], q: &Quality, cfg: &RomeoConfig) -> Vec<u8> {
    let [nx, ny, nz] = dims;
    let stride = [1, nx, nx * ny];
    let m_top = q
        .magnitude
        .and_then(|m| quantile(m, q.mask, cfg.magnitude_percentile))
        .filter(|&t| t > 0.0);
    let mut costs = vec![NO_EDGE; 3 * nx * ny * nz];
    costs
        .par_chunks_mut(3 * nx * ny)
        .enumerate()
        .for_each(|(k, slab)| {
            for j in 0..ny {
                for i in 0..nx {
                    let v = i + nx * (j + ny * k);
                    let has = [i + 1 < nx, j + 1 < ny, k + 1 < nz];
                    for d in 0..3 {
                        if !has[d] {
                            continue;
                        }
                        let u = v + stride[d];
                        let outside = q.mask.is_some_and(|m| !(m[v] && m[u]));
                        let c = cost_of(edge_weight(v, u, q, cfg, m_top));
                        slab[3 * (i + nx * j) + d] =
                            if outside && c != NO_EDGE { WORST } else { c };
                    }
                }
            }
        });
    costs
}

/// The result of region growing: whole turns per voxel and the region each was reached in.
#[derive(Clone, Debug)]
pub struct Growth {
    /// Turns added to the input phase.
    pub turns: Vec<i32>,
    /// Region of each voxel, 0..n_regions.
    pub region: Vec<u32>,
    /// Number of regions seeded.
    pub n_regions: usize,
    /// Sum of the costs of the edges the voxels were reached through (the spanning forest's
    /// cost; minimal among spanning forests of the same regions).
    pub tree_cost: u64,
}

/// One voxel's state during growth, packed so that visiting a voxel touches one cache line:
/// growth is bound by the latency of random reads, not by arithmetic.
#[derive(Clone, Copy)]
#[repr(C, align(16))]
struct Cell {
    phase: f32,
    region: u32,
    /// Costs of the edges to the −x, +x, −y, +y, −z and +z neighbours.
    costs: [u8; 6],
    /// Whole turns (far beyond any field a scanner measures: 32767 turns).
    turns: i16,
}

/// A queued edge: the voxel it reaches, and the region and unwrapped phase of the voxel it
/// leaves (so that popping it reads only the voxel reached).
#[derive(Clone, Copy)]
struct Reach {
    to: u32,
    region: u32,
    from: f32,
}

const UNVISITED: u32 = u32::MAX;
/// How many queued voxels ahead growth loads into cache.
const PREFETCH: usize = 8;

/// Grows regions over the edge costs; see the module documentation.
pub fn grow(dims: [usize; 3], phase: &[f32], costs: &[u8], cfg: &RomeoConfig) -> Growth {
    let n = phase.len();
    let stride = [1, dims[0], dims[0] * dims[1]];
    let mut cells: Vec<Cell> = (0..n)
        .into_par_iter()
        .map(|v| {
            let below = |d: usize| {
                if v >= stride[d] {
                    costs[3 * (v - stride[d]) + d]
                } else {
                    NO_EDGE
                }
            };
            Cell {
                phase: phase[v],
                region: UNVISITED,
                costs: [
                    below(0),
                    costs[3 * v],
                    below(1),
                    costs[3 * v + 1],
                    below(2),
                    costs[3 * v + 2],
                ],
                turns: 0,
            }
        })
        .collect();
    // Seed order: voxels by the mean quality of their edges (isolated voxels last).
    let seed_cost: Vec<u8> = cells
        .par_iter()
        .map(|c| {
            let (mut sum, mut cnt) = (0.0f32, 0u32);
            for &e in c.costs.iter().filter(|&&e| e != NO_EDGE) {
                sum += weight_of(e);
                cnt += 1;
            }
            if cnt == 0 {
                WORST
            } else {
                cost_of(sum / cnt as f32)
            }
        })
        .collect();
    let order = counting_sort(&seed_cost);
    // Whether each voxel is reached, one bit each: small enough to stay in cache, so the
    // many queued edges to voxels reached meanwhile are dropped without a read of their cell.
    let mut reached = Bits::new(n);
    let mut queue = BucketQueue::<Reach>::new(WORST as usize + 1);
    let mut next = 0usize;
    let mut n_regions = 0usize;
    let mut threshold = WORST as usize + 1;
    let mut tree_cost = 0u64;
    loop {
        // The next unvisited voxel in seed order. Looked up only when a seed may be due:
        // every lookup is a random read.
        let mut next_seed = |reached: &Bits| {
            while next < n && reached.get(order[next] as usize) {
                next += 1;
            }
            (next < n).then(|| order[next] as usize)
        };
        let seed_now = match queue.lowest_bin() {
            None => next_seed(&reached).is_some(),
            Some(best) => {
                n_regions < cfg.max_regions
                    && best > threshold
                    && next_seed(&reached).is_some_and(|s| (seed_cost[s] as usize) < best)
            }
        };
        let new = if seed_now {
            let s = order[next] as usize;
            cells[s].region = n_regions as u32;
            reached.set(s);
            n_regions += 1;
            let limit = cfg.new_region_fraction as f32 * weight_of(seed_cost[s]);
            threshold = cost_of(limit) as usize;
            s
        } else {
            let Some((reach, cost)) = queue.pop() else {
                break;
            };
            if reached.get(reach.to as usize) {
                continue;
            }
            // Unless this voxel's neighbours are pushed on top of them, the next pops are
            // the items below: start loading their cells now, while this one is processed.
            for after in queue.peek(PREFETCH) {
                prefetch(&cells[after.to as usize]);
            }
            reached.set(reach.to as usize);
            let cell = &mut cells[reach.to as usize];
            cell.turns = ((reach.from - cell.phase) / TAU).round() as i16;
            cell.region = reach.region;
            tree_cost += cost as u64;
            reach.to as usize
        };
        let cell = cells[new];
        let from = cell.phase + TAU * cell.turns as f32;
        let mut push = |to: usize, cost: u8| {
            let region = cell.region;
            queue.push(
                Reach {
                    to: to as u32,
                    region,
                    from,
                },
                cost as usize,
            );
        };
        // The cell holds its six edge costs, NO_EDGE across the grid's faces.
        for (d, &s) in stride.iter().enumerate() {
            let (down, up) = (cell.costs[2 * d], cell.costs[2 * d + 1]);
            if down != NO_EDGE && !reached.get(new - s) {
                push(new - s, down);
            }
            if up != NO_EDGE && !reached.get(new + s) {
                push(new + s, up);
            }
        }
    }
    let (turns, region) = cells.par_iter().map(|c| (c.turns as i32, c.region)).unzip();
    Growth {
        turns,
        region,
        n_regions,
        tree_cost,
    }
}

/// Slabs thinner than this are not split further (their seams would cost more than the
/// parallelism gains).
const MIN_SLAB_PLANES: usize = 16;

/// [`grow`] on `cfg.slabs` slabs along z at once, each as if the edges to the next slab were
/// missing; the slabs' regions are numbered one after another. Growth cannot be split across
/// threads otherwise, and the seams cost little: registration votes over a whole plane.
pub fn grow_in_slabs(dims: [usize; 3], phase: &[f32], costs: &[u8], cfg: &RomeoConfig) -> Growth {
    let nz = dims[2];
    let slabs = cfg.slabs.min(nz / MIN_SLAB_PLANES).max(1);
    if slabs == 1 {
        return grow(dims, phase, costs, cfg);
    }
    let plane = dims[0] * dims[1];
    let slab_cfg = RomeoConfig {
        max_regions: cfg.max_regions.div_ceil(slabs),
        ..cfg.clone()
    };
    let parts: Vec<Growth> = (0..slabs)
        .into_par_iter()
        .map(|s| {
            let (z0, z1) = (s * nz / slabs, (s + 1) * nz / slabs);
            let mut slab_costs = costs[3 * plane * z0..3 * plane * z1].to_vec();
            // The last plane's +z edges lead into the next slab.
            let top = 3 * plane * (z1 - z0 - 1);
            slab_costs[top..]
                .iter_mut()
                .skip(2)
                .step_by(3)
                .for_each(|c| *c = NO_EDGE);
            grow(
                [dims[0], dims[1], z1 - z0],
                &phase[plane * z0..plane * z1],
                &slab_costs,
                &slab_cfg,
            )
        })
        .collect();
    let mut all = Growth {
        turns: Vec::with_capacity(phase.len()),
        region: Vec::with_capacity(phase.len()),
        n_regions: 0,
        tree_cost: 0,
    };
    for part in parts {
        let first = all.n_regions as u32;
        all.turns.extend(part.turns);
        all.region.extend(part.region.iter().map(|r| r + first));
        all.n_regions += part.n_regions;
        all.tree_cost += part.tree_cost;
    }
    all
}

/// Asks the CPU to start loading `x` into cache (a hint; no effect on results).
#[inline(always)]
fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch never faults and `x` is a valid reference.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (x as *const T).cast(),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// A fixed-size set of voxel indices, one bit each.
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Self {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
}

/// Voxel indices ordered by increasing cost (stable).
fn counting_sort(cost: &[u8]) -> Vec<u32> {
    let mut start = [0usize; 257];
    for &c in cost {
        start[c as usize + 1] += 1;
    }
    for b in 1..257 {
        start[b] += start[b - 1];
    }
    let mut out = vec![0u32; cost.len()];
    for (v, &c) in cost.iter().enumerate() {
        out[start[c as usize]] = v as u32;
        start[c as usize] += 1;
    }
    out
}

/// Sums two weight histograms.
fn merge_counts<K: std::hash::Hash + Eq>(
    mut a: HashMap<K, f64>,
    b: HashMap<K, f64>,
) -> HashMap<K, f64> {
    if a.len() < b.len() {
        return merge_counts(b, a);
    }
    for (k, w) in b {
        *a.entry(k).or_insert(0.0) += w;
    }
    a
}

/// Adds `shift[r]` turns to every voxel of region `r`.
fn shift_regions(g: &mut Growth, shift: &[i32]) {
    if shift.iter().all(|&s| s == 0) {
        return;
    }
    g.turns
        .par_iter_mut()
        .zip(&g.region)
        .for_each(|(t, &r)| *t += shift[r as usize]);
}

/// Per region, the turns that bring it closest to `reference` (weighted median over its
/// voxels of the nearest whole turns between the two).
pub fn align_to_reference(
    g: &mut Growth,
    phase: &[f32],
    reference: &[f32],
    weights: Option<&[f32]>,
) {
    // Per region, a histogram of the votes (they take few distinct values), summed over
    // chunks of voxels in parallel.
    let votes: HashMap<(u32, i32), f64> = (0..phase.len())
        .into_par_iter()
        .fold(HashMap::new, |mut h, v| {
            let w = weights.map_or(1.0, |w| w[v] as f64);
            let now = phase[v] + TAU * g.turns[v] as f32;
            let k = ((reference[v] - now) / TAU).round();
            if w > 0.0 && k.is_finite() {
                *h.entry((g.region[v], k as i32)).or_insert(0.0) += w;
            }
            h
        })
        .reduce(HashMap::new, merge_counts);
    let mut per_region: Vec<Vec<(i64, f64)>> = vec![Vec::new(); g.n_regions];
    for ((r, k), w) in votes {
        per_region[r as usize].push((k as i64, w));
    }
    let shift: Vec<i32> = per_region
        .into_iter()
        .map(|h| weighted_median_int(h.into_iter()) as i32)
        .collect();
    shift_regions(g, &shift);
}

/// Puts regions in register across their common boundaries: from the region with the most
/// weight, each neighbour is attached in order of boundary strength, with the turns most of
/// the boundary's edge quality votes for.
pub fn merge_regions(
    g: &mut Growth,
    dims: [usize; 3],
    phase: &[f32],
    costs: &[u8],
    weights: Option<&[f32]>,
) {
    let r = g.n_regions;
    if r < 2 {
        return;
    }
    let stride = [1, dims[0], dims[0] * dims[1]];
    // votes[(a, b)] with a < b: turns to add to b to match a, weighted by edge quality.
    let mut votes: HashMap<(u32, u32), Vec<(i32, f64)>> = HashMap::new();
    for (e, &c) in costs.iter().enumerate() {
        if c == NO_EDGE {
            continue;
        }
        let (v, d) = (e / 3, e % 3);
        let u = v + stride[d];
        let (rv, ru) = (g.region[v], g.region[u]);
        if rv == ru {
            continue;
        }
        let (a, b, pa, pb) = if rv < ru {
            (rv, ru, v, u)
        } else {
            (ru, rv, u, v)
        };
        let k = ((phase[pa] + TAU * g.turns[pa] as f32 - phase[pb] - TAU * g.turns[pb] as f32)
            / TAU)
            .round() as i32;
        // A small floor so that boundaries running through noise still vote.
        let w = weight_of(c) as f64 + 1e-3;
        let h = votes.entry((a, b)).or_default();
        match h.iter_mut().find(|(kk, _)| *kk == k) {
            Some(x) => x.1 += w,
            None => h.push((k, w)),
        }
    }
    // Boundary strength and the winning turns of each pair.
    let pairs: Vec<(u32, u32, f64, i32)> = votes
        .into_iter()
        .map(|((a, b), h)| {
            let total = h.iter().map(|x| x.1).sum::<f64>();
            let best = h.iter().max_by(|x, y| x.1.total_cmp(&y.1)).unwrap().0;
            (a, b, total, best)
        })
        .collect();
    let mut mass = vec![0.0f64; r];
    for (v, &reg) in g.region.iter().enumerate() {
        mass[reg as usize] += weights.map_or(1.0, |w| w[v] as f64);
    }
    let mut shift = vec![0i32; r];
    let mut attached = vec![false; r];
    let mut pending = r;
    while pending > 0 {
        // Start (or restart, for a group with no boundary to the others) at the heaviest
        // unattached region.
        let root = (0..r)
            .filter(|&i| !attached[i])
            .max_by(|&i, &j| mass[i].total_cmp(&mass[j]))
            .unwrap();
        attached[root] = true;
        pending -= 1;
        loop {
            let best = pairs
                .iter()
                .filter(|p| attached[p.0 as usize] != attached[p.1 as usize])
                .max_by(|x, y| x.2.total_cmp(&y.2));
            let Some(&(a, b, _, k)) = best else { break };
            let (a, b) = (a as usize, b as usize);
            if attached[a] {
                shift[b] = shift[a] + k;
                attached[b] = true;
            } else {
                shift[a] = shift[b] - k;
                attached[a] = true;
            }
            pending -= 1;
        }
    }
    shift_regions(g, &shift);
}

/// Shifts everything by whole turns so the weighted median phase lies in (−π, π] (the scanner
/// centres its frequency on the tissue).
pub fn centre(g: &mut Growth, phase: &[f32], weights: Option<&[f32]>) {
    let hist: HashMap<i64, f64> = (0..phase.len())
        .into_par_iter()
        .fold(HashMap::new, |mut h, v| {
            let now = phase[v] + TAU * g.turns[v] as f32;
            let w = weights.map_or(1.0, |w| w[v] as f64);
            if w > 0.0 && w.is_finite() {
                *h.entry((now / TAU).round() as i64).or_insert(0.0) += w;
            }
            h
        })
        .reduce(HashMap::new, merge_counts);
    let k = weighted_median_int(hist.into_iter());
    if k != 0 {
        g.turns.par_iter_mut().for_each(|t| *t -= k as i32);
    }
}

/// A spatially unwrapped volume.
#[derive(Clone, Debug)]
pub struct Unwrapped {
    /// The input phase plus `2π·turns`.
    pub phase: Vec<f32>,
    /// Whole turns added to each voxel.
    pub turns: Vec<i32>,
    /// Number of regions grown.
    pub regions: usize,
}

/// The input plus `2π·turns`, so re-wrapping gives the input back.
fn apply_turns(phase: &[f32], turns: &[i32]) -> Vec<f32> {
    phase
        .par_iter()
        .zip(turns)
        .map(|(&p, &t)| p + TAU * t as f32)
        .collect()
}

/// Unwraps one volume: edge costs from `quality`, region growing, then regions registered
/// to `reference` (rad) when given, else across their boundaries and centred. `weights`
/// (e.g. magnitude²) decide the votes of the alignment.
pub fn unwrap_spatial(
    dims: [usize; 3],
    quality: &Quality,
    reference: Option<&[f32]>,
    weights: Option<&[f32]>,
    cfg: &RomeoConfig,
) -> Unwrapped {
    let costs = edge_costs(dims, quality, cfg);
    let mut g = grow_in_slabs(dims, quality.phase, &costs, cfg);
    match reference {
        Some(r) => align_to_reference(&mut g, quality.phase, r, weights),
        None => {
            merge_regions(&mut g, dims, quality.phase, &costs, weights);
            centre(&mut g, quality.phase, weights);
        }
    }
    Unwrapped {
        phase: apply_turns(quality.phase, &g.turns),
        turns: g.turns,
        regions: g.n_regions,
    }
}

/// Multi-echo unwrapping in template mode (see the module documentation).
///
/// `phases` are the wrapped echoes (rad), `magnitudes` theirs, `te` the echo times (any
/// unit). `template_reference` (rad), when known, registers the template echo's regions
/// (e.g. `2π·f·TE` from a field estimate); otherwise they are registered across their
/// boundaries and centred. With `through_origin` the phase is taken as proportional to TE
/// (receive offset removed); otherwise a line in TE with an intercept is extrapolated once
/// two echoes are unwrapped. Returns the unwrapped echoes and the template's region count.
pub fn unwrap_echoes(
    dims: [usize; 3],
    phases: &[&[f32]],
    magnitudes: Option<&[&[f32]]>,
    te: &[f32],
    template_reference: Option<&[f32]>,
    through_origin: bool,
    cfg: &RomeoConfig,
) -> Result<(Vec<Vec<f32>>, usize)> {
    cfg.validate()?;
    let n_echo = phases.len();
    if n_echo == 0 || te.len() != n_echo {
        return Err(Error::Usage(format!(
            "{n_echo} phase echoes but {} echo times",
            te.len()
        )));
    }
    let t = cfg.template_echo - 1;
    if t >= n_echo {
        return Err(Error::Config(format!(
            "unwrap.romeo.template_echo is {} but there are only {n_echo} echoes",
            cfg.template_echo
        )));
    }
    let mag = |e: usize| magnitudes.map(|m| m[e]);
    let weights =
        |e: usize| -> Option<Vec<f32>> { mag(e).map(|m| m.par_iter().map(|&v| v * v).collect()) };
    // The neighbouring echo whose spatial differences the template's should match.
    let second = (n_echo > 1).then(|| {
        let o = if t == 0 { 1 } else { t - 1 };
        (phases[o], te[t] / te[o])
    });
    let quality = Quality {
        phase: phases[t],
        magnitude: mag(t),
        second_echo: second,
        mask: None,
    };
    let w_t = weights(t);
    let template = unwrap_spatial(dims, &quality, template_reference, w_t.as_deref(), cfg);

    let mut out: Vec<Option<Vec<f32>>> = vec![None; n_echo];
    out[t] = Some(template.phase);
    // Later echoes first (they are predicted from nearer echo times), then earlier ones.
    let order: Vec<usize> = (t + 1..n_echo).chain((0..t).rev()).collect();
    for e in order {
        let done: Vec<(usize, &[f32])> = out
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_deref().map(|p| (i, p)))
            .collect();
        let wts: Vec<Option<&[f32]>> = done.iter().map(|&(i, _)| mag(i)).collect();
        let phi: Vec<f32> = (0..phases[e].len())
            .into_par_iter()
            .map(|v| {
                let pred = predict(&done, &wts, te, te[e], v, through_origin);
                let p = phases[e][v];
                p + TAU * ((pred - p) / TAU).round()
            })
            .collect();
        out[e] = Some(phi);
    }
    Ok((
        out.into_iter().map(Option::unwrap).collect(),
        template.regions,
    ))
}

/// The phase at echo time `t` of voxel `v` predicted from the unwrapped echoes `done`
/// (weighted by magnitude²): proportional to TE, or a line in TE when two or more echoes are
/// known and `through_origin` is false.
fn predict(
    done: &[(usize, &[f32])],
    mags: &[Option<&[f32]>],
    te: &[f32],
    t: f32,
    v: usize,
    through_origin: bool,
) -> f32 {
    let (mut s, mut st, mut stt, mut sp, mut stp) = (0.0f64, 0.0, 0.0, 0.0, 0.0);
    for (&(e, p), m) in done.iter().zip(mags) {
        // A tiny floor keeps a voxel without signal predictable from its echoes' mean.
        let w = m.map_or(1.0, |m| (m[v] as f64).powi(2)) + 1e-12;
        let x = te[e] as f64;
        let y = p[v] as f64;
        s += w;
        st += w * x;
        stt += w * x * x;
        sp += w * y;
        stp += w * x * y;
    }
    let t = t as f64;
    let det = s * stt - st * st;
    if !through_origin && done.len() >= 2 && det > 1e-12 * stt * s {
        let slope = (s * stp - st * sp) / det;
        ((sp - slope * st) / s + slope * t) as f32
    } else {
        (stp / stt * t) as f32
    }
}

#[cfg(test)]
mod tests;
