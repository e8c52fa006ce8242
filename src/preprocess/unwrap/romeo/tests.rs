use super::*;
use crate::preprocess::util::wrap;
use crate::simulate::rng::Rng;

const N: usize = 40;
const DIMS: [usize; 3] = [N, N, N];

fn coords(v: usize) -> (f32, f32, f32) {
    ((v % N) as f32, ((v / N) % N) as f32, (v / (N * N)) as f32)
}

/// The six face neighbours of voxel `v` with the edge joining them.
fn neighbours(v: usize, dims: [usize; 3]) -> impl Iterator<Item = (usize, usize)> {
    let [nx, ny, nz] = dims;
    let (i, j, k) = (v % nx, (v / nx) % ny, v / (nx * ny));
    let s = [1, nx, nx * ny];
    let low = [i > 0, j > 0, k > 0];
    let high = [i + 1 < nx, j + 1 < ny, k + 1 < nz];
    (0..3).flat_map(move |d| {
        let down = low[d].then(|| (v - s[d], 3 * (v - s[d]) + d));
        let up = high[d].then(|| (v + s[d], 3 * v + d));
        down.into_iter().chain(up)
    })
}

/// A smooth phase (rad) with a 22 rad bump and a ramp: up to ≈ 2 rad between neighbours,
/// 6 turns peak to peak.
fn smooth_phase(v: usize) -> f32 {
    let (x, y, z) = coords(v);
    let r2 = (x - 21.0).powi(2) + (y - 18.0).powi(2) + (z - 20.0).powi(2);
    22.0 * (-r2 / (2.0 * 8.0f32.powi(2))).exp() + 0.25 * (x - 20.0) - 0.1 * (z - 20.0) - 8.0
}

/// Complex signal: magnitude 1 with phase `truth` where `inside`, noise of σ elsewhere
/// (random phase, Rayleigh magnitude); complex noise of `sigma` everywhere.
fn signal(truth: &[f32], inside: &[bool], sigma: f64, rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
    let mut p = vec![0.0f32; truth.len()];
    let mut m = vec![0.0f32; truth.len()];
    for v in 0..truth.len() {
        let a = if inside[v] { 1.0 } else { 0.0 };
        let re = a * (truth[v] as f64).cos() + sigma * rng.normal();
        let im = a * (truth[v] as f64).sin() + sigma * rng.normal();
        p[v] = im.atan2(re) as f32;
        m[v] = (re * re + im * im).sqrt() as f32;
    }
    (p, m)
}

fn ball(c: [f32; 3], r: f32) -> Vec<bool> {
    (0..N * N * N)
        .map(|v| {
            let (x, y, z) = coords(v);
            (x - c[0]).powi(2) + (y - c[1]).powi(2) + (z - c[2]).powi(2) < r * r
        })
        .collect()
}

/// Re-wrapping gives the input back: the output differs by whole turns only.
fn assert_whole_turns(out: &[f32], input: &[f32]) {
    for (v, (&o, &i)) in out.iter().zip(input).enumerate() {
        let k = (o - i) / TAU;
        // f32 spacing at |o| ≲ 100 rad is ≈ 1e-5.
        assert!(
            (k - k.round()).abs() < 1e-5,
            "voxel {v}: {o} − {i} is not whole turns"
        );
        assert!(
            (wrap(o) - wrap(i)).abs() < 1e-4 || (wrap(o) - wrap(i)).abs() > TAU - 1e-4,
            "voxel {v}: re-wrapped {} vs {}",
            wrap(o),
            wrap(i)
        );
    }
}

/// In `region`, out − truth must be the same whole number of turns everywhere, up to the
/// phase noise (< `tol` rad); returns that number.
fn constant_turns(out: &[f32], truth: &[f32], region: &[bool], tol: f32) -> i32 {
    let mut ks = std::collections::BTreeMap::<i32, usize>::new();
    let mut worst = 0.0f32;
    for v in (0..out.len()).filter(|&v| region[v]) {
        let d = out[v] - truth[v];
        let k = (d / TAU).round();
        worst = worst.max((d - k * TAU).abs());
        *ks.entry(k as i32).or_default() += 1;
    }
    assert_eq!(ks.len(), 1, "turn offsets in the region: {ks:?}");
    assert!(worst < tol, "noise beyond {tol}: {worst}");
    *ks.keys().next().unwrap()
}

/// The smooth phase in a ball of tissue (magnitude 1) inside noise, σ = 0.05.
struct Ball {
    inside: Vec<bool>,
    truth: Vec<f32>,
    wrapped: Vec<f32>,
    mag: Vec<f32>,
    /// Magnitude², the alignment weights.
    w: Vec<f32>,
}

fn noisy_ball(seed: u64) -> Ball {
    let inside = ball([20.0, 20.0, 20.0], 16.0);
    let truth: Vec<f32> = (0..N * N * N).map(smooth_phase).collect();
    let (wrapped, mag) = signal(&truth, &inside, 0.05, &mut Rng::new(seed));
    let w = mag.iter().map(|m| m * m).collect();
    Ball {
        inside,
        truth,
        wrapped,
        mag,
        w,
    }
}

#[test]
fn smooth_phase_with_many_wraps_and_a_noise_background_is_recovered_exactly() {
    let Ball {
        inside,
        truth,
        wrapped,
        mag,
        w,
    } = noisy_ball(11);
    let q = Quality {
        magnitude: Some(&mag),
        ..Quality::phase(&wrapped)
    };
    let out = unwrap_spatial(DIMS, &q, None, Some(&w), &RomeoConfig::default());
    assert_whole_turns(&out.phase, &wrapped);
    // Phase noise σ/1 = 0.05 rad: 0.4 rad is 8σ.
    let k = constant_turns(&out.phase, &truth, &inside, 0.4);
    // The truth's weighted median lies in (−π, π], so centring picks the truth's turn.
    assert_eq!(k, 0, "centring");
    // Without the magnitude the noise voxels compete with tissue on phase coherence alone;
    // the ball must still come out in one piece.
    let plain = unwrap_spatial(
        DIMS,
        &Quality::phase(&wrapped),
        None,
        None,
        &Default::default(),
    );
    assert_whole_turns(&plain.phase, &wrapped);
    let mut hist = std::collections::BTreeMap::<i32, usize>::new();
    for v in (0..truth.len()).filter(|&v| inside[v]) {
        *hist
            .entry(((plain.phase[v] - truth[v]) / TAU).round() as i32)
            .or_default() += 1;
    }
    let total = inside.iter().filter(|&&b| b).count();
    let bad = total - hist.values().max().unwrap();
    eprintln!("phase-only: {bad} of {total} ball voxels off the majority turn");
}

#[test]
fn two_separate_regions_are_each_exact_and_a_reference_registers_them() {
    let a = ball([11.0, 20.0, 20.0], 9.0);
    let b = ball([30.0, 20.0, 20.0], 8.0);
    let inside: Vec<bool> = a.iter().zip(&b).map(|(x, y)| *x || *y).collect();
    // Different phase patterns in the two balls, each with several turns.
    let truth: Vec<f32> = (0..N * N * N)
        .map(|v| {
            let (x, y, z) = coords(v);
            if x < 20.5 {
                0.9 * (x - 11.0) + 0.5 * (y - 20.0) + 2.0
            } else {
                -0.8 * (z - 20.0) + 0.04 * (y - 20.0).powi(2) - 3.0
            }
        })
        .collect();
    let mut rng = Rng::new(3);
    let (wrapped, mag) = signal(&truth, &inside, 0.05, &mut rng);
    let w: Vec<f32> = mag.iter().map(|m| m * m).collect();
    let q = Quality {
        magnitude: Some(&mag),
        ..Quality::phase(&wrapped)
    };
    let cfg = RomeoConfig::default();
    let costs = edge_costs(DIMS, &q, &cfg);
    let g = grow(DIMS, &wrapped, &costs, &cfg);
    assert!(g.n_regions >= 2, "the second ball gets its own seed");
    let ra = g.region[20 * N * N + 20 * N + 11];
    let rb = g.region[20 * N * N + 20 * N + 30];
    assert_ne!(ra, rb, "each ball grown from its own inside");

    // Boundary merge: each ball internally exact (their relative turns are unknowable).
    let out = unwrap_spatial(DIMS, &q, None, Some(&w), &cfg);
    assert_whole_turns(&out.phase, &wrapped);
    constant_turns(&out.phase, &truth, &a, 0.4);
    constant_turns(&out.phase, &truth, &b, 0.4);

    // A reference off by up to 2 rad (e.g. a field estimate from other echoes) registers
    // both balls to the truth.
    let reference: Vec<f32> = (0..truth.len())
        .map(|v| truth[v] + 2.0 * ((v % 7) as f32 / 6.0 - 0.5) + 0.5)
        .collect();
    let out = unwrap_spatial(DIMS, &q, Some(&reference), Some(&w), &cfg);
    assert_whole_turns(&out.phase, &wrapped);
    assert_eq!(constant_turns(&out.phase, &truth, &a, 0.4), 0);
    assert_eq!(constant_turns(&out.phase, &truth, &b, 0.4), 0);
}

#[test]
fn growth_is_a_minimum_spanning_tree_of_the_quantised_costs() {
    // Naive reference: Kruskal with union-find over all edges sorted by cost. Prim's growth
    // from one seed must reach the same total cost on noisy data full of residues.
    let n = 14;
    let dims = [n, n, n];
    let mut rng = Rng::new(9);
    let phase: Vec<f32> = (0..n * n * n)
        .map(|v| {
            let x = (v % n) as f32;
            0.8 * x + rng.normal() as f32 * 1.2
        })
        .collect();
    let mag: Vec<f32> = (0..n * n * n).map(|_| rng.uniform() as f32).collect();
    let q = Quality {
        magnitude: Some(&mag),
        ..Quality::phase(&phase)
    };
    let cfg = RomeoConfig {
        max_regions: 1,
        ..Default::default()
    };
    let costs = edge_costs(dims, &q, &cfg);
    let g = grow(dims, &phase, &costs, &cfg);
    assert_eq!(g.n_regions, 1);

    let mut edges: Vec<(u8, usize, usize)> = vec![];
    for (e, &c) in costs.iter().enumerate() {
        if c != NO_EDGE {
            let s = [1, n, n * n][e % 3];
            edges.push((c, e / 3, e / 3 + s));
        }
    }
    assert_eq!(edges.len(), 3 * n * n * (n - 1));
    edges.sort();
    let mut parent: Vec<usize> = (0..n * n * n).collect();
    fn find(p: &mut [usize], mut x: usize) -> usize {
        while p[x] != x {
            p[x] = p[p[x]];
            x = p[x];
        }
        x
    }
    let mut mst = 0u64;
    let mut used = 0;
    for (c, a, b) in edges {
        let (ra, rb) = (find(&mut parent, a), find(&mut parent, b));
        if ra != rb {
            parent[ra] = rb;
            mst += c as u64;
            used += 1;
        }
    }
    assert_eq!(used, n * n * n - 1);
    assert_eq!(g.tree_cost, mst);
    // And every voxel agrees with at least one neighbour to within π (its tree parent).
    let out = apply_turns(&phase, &g.turns);
    for v in 0..out.len() {
        let ok = neighbours(v, dims).any(|(u, _)| (out[u] - out[v]).abs() <= PI + 1e-4);
        assert!(ok, "voxel {v} disagrees with all its neighbours");
    }
}

#[test]
fn slabs_grow_on_their_own_and_registration_joins_them_seamlessly() {
    let Ball {
        inside,
        truth,
        wrapped,
        mag,
        w,
    } = noisy_ball(5);
    let q = Quality {
        magnitude: Some(&mag),
        ..Quality::phase(&wrapped)
    };
    let one = RomeoConfig {
        slabs: 1,
        ..Default::default()
    };
    // 40 planes hold two slabs of at least 16 planes: asking for 8 gives 2.
    let many = RomeoConfig {
        slabs: 8,
        ..Default::default()
    };
    let costs = edge_costs(DIMS, &q, &many);
    let g = grow_in_slabs(DIMS, &wrapped, &costs, &many);
    let plane = N * N;
    let seam = 20 * plane;
    let below: std::collections::HashSet<u32> = g.region[..seam].iter().copied().collect();
    let above: std::collections::HashSet<u32> = g.region[seam..].iter().copied().collect();
    assert!(below.is_disjoint(&above), "a region crosses the seam");
    assert_eq!(g.n_regions, below.len() + above.len());

    // Each slab is exactly the growth of that slab alone.
    let half = RomeoConfig {
        max_regions: many.max_regions.div_ceil(2),
        ..many.clone()
    };
    let upper = grow([N, N, 20], &wrapped[seam..], &costs[3 * seam..], &half);
    assert_eq!(upper.turns, g.turns[seam..]);
    let mut lower_costs = costs[..3 * seam].to_vec();
    for v in 19 * plane..seam {
        lower_costs[3 * v + 2] = NO_EDGE;
    }
    let lower = grow([N, N, 20], &wrapped[..seam], &lower_costs, &half);
    assert_eq!(lower.turns, g.turns[..seam]);

    // After registration the brain is unwrapped as by one growth.
    let joined = unwrap_spatial(DIMS, &q, None, Some(&w), &many);
    let whole = unwrap_spatial(DIMS, &q, None, Some(&w), &one);
    assert_whole_turns(&joined.phase, &wrapped);
    assert_eq!(constant_turns(&joined.phase, &truth, &inside, 0.4), 0);
    for v in (0..truth.len()).filter(|&v| inside[v]) {
        assert_eq!(joined.phase[v], whole.phase[v], "voxel {v}");
    }
}

#[test]
fn multi_echo_template_mode_is_linear_in_echo_time() {
    let inside = ball([20.0, 20.0, 20.0], 16.0);
    // Field (rad per ms of TE): echo 1 at 4 ms sees the smooth phase, later echoes 2× and 3×
    // as many turns, with up to ≈ 6 rad between neighbours at echo 3 (no spatial unwrapper
    // could follow that: only the temporal step can).
    let slope: Vec<f32> = (0..N * N * N).map(|v| smooth_phase(v) / 4.0).collect();
    let te = [4.0f32, 8.0, 12.0];
    let mut rng = Rng::new(21);
    // A smooth receive offset (|φ₀| < 1.2 rad) for the intercept variant.
    let offset: Vec<f32> = (0..N * N * N)
        .map(|v| {
            let (x, y, _) = coords(v);
            0.05 * (x - 20.0) - 0.03 * (y - 20.0) + 0.2
        })
        .collect();
    for with_offset in [false, true] {
        let mut wrapped = vec![];
        let mut mags = vec![];
        for &t in &te {
            let truth: Vec<f32> = (0..slope.len())
                .map(|v| slope[v] * t + if with_offset { offset[v] } else { 0.0 })
                .collect();
            let (p, m) = signal(&truth, &inside, 0.03, &mut rng);
            wrapped.push(p);
            mags.push(m);
        }
        let p: Vec<&[f32]> = wrapped.iter().map(|v| v.as_slice()).collect();
        let m: Vec<&[f32]> = mags.iter().map(|v| v.as_slice()).collect();
        let (out, _) = unwrap_echoes(
            DIMS,
            &p,
            Some(&m),
            &te,
            None,
            !with_offset,
            &RomeoConfig::default(),
        )
        .unwrap();
        for e in 0..3 {
            assert_whole_turns(&out[e], &wrapped[e]);
        }
        // Echo 1 is exact up to a constant number of turns k; echo e then carries k·TEₑ/TE₁
        // turns (the same field shifted by k/TE₁), i.e. every echo is exactly linear in TE.
        let truth1: Vec<f32> = (0..slope.len())
            .map(|v| slope[v] * te[0] + if with_offset { offset[v] } else { 0.0 })
            .collect();
        let k = constant_turns(&out[0], &truth1, &inside, 0.3);
        for e in 1..3 {
            let truth: Vec<f32> = (0..slope.len())
                .map(|v| {
                    slope[v] * te[e]
                        + if with_offset { offset[v] } else { 0.0 }
                        + TAU * k as f32 * te[e] / te[0]
                })
                .collect();
            let ke = constant_turns(&out[e], &truth, &inside, 0.3);
            assert_eq!(ke, 0, "echo {} with offset {with_offset}", e + 1);
        }
    }
}

#[test]
fn a_reference_fixes_the_template_and_mask_and_nan_are_handled() {
    let inside = ball([20.0, 20.0, 20.0], 16.0);
    let truth: Vec<f32> = (0..N * N * N).map(|v| smooth_phase(v) + 9.0).collect();
    let mut rng = Rng::new(4);
    let (mut wrapped, mag) = signal(&truth, &inside, 0.02, &mut rng);
    // A NaN voxel in the background is left as is, with no edges.
    wrapped[5] = f32::NAN;
    let q = Quality {
        magnitude: Some(&mag),
        mask: Some(&inside),
        ..Quality::phase(&wrapped)
    };
    let reference: Vec<f32> = truth.iter().map(|t| t + 1.0).collect();
    let w: Vec<f32> = mag.iter().map(|m| m * m).collect();
    let out = unwrap_spatial(
        DIMS,
        &q,
        Some(&reference),
        Some(&w),
        &RomeoConfig::default(),
    );
    assert!(out.phase[5].is_nan());
    let mut clean = out.phase.clone();
    clean[5] = 0.0;
    let mut input = wrapped.clone();
    input[5] = 0.0;
    assert_whole_turns(&clean, &input);
    assert_eq!(constant_turns(&out.phase, &truth, &inside, 0.2), 0);
}

#[test]
fn config_is_validated() {
    assert!(RomeoConfig::default().validate().is_ok());
    let bad = RomeoConfig {
        magnitude_percentile: 1.5,
        ..Default::default()
    };
    assert!(bad.validate().is_err());
    let bad = RomeoConfig {
        template_echo: 3,
        ..Default::default()
    };
    let p = vec![0.0f32; 8];
    let err = unwrap_echoes([2, 2, 2], &[&p, &p], None, &[1.0, 2.0], None, true, &bad);
    assert!(matches!(err, Err(Error::Config(_))));
}
