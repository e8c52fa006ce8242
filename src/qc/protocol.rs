//! Checks on the acquisition and the masks: echoes, grids, B0 tilt, mask coverage and
//! erosion. Each applies only when its inputs exist.

use super::{Check, Config, Inputs};
use crate::preprocess::util::quantile;
use crate::Geometry;

/// Every check of this file that applies to `inputs`.
pub fn all(inputs: &Inputs, config: &Config) -> Vec<Check> {
    let mut checks = Vec::new();
    let tilt = crate::physics::tilt_degrees(inputs.b0_direction);
    checks.push(Check::new(
        "b0_tilt_degrees",
        tilt,
        config.b0_tilt_degrees,
        format!(
            "B0 is {tilt:.1}° from the nearest voxel axis (handled exactly; a large tilt may \
             mean a wrong affine)"
        ),
    ));
    let te = inputs.echo_times;
    if !te.is_empty() {
        checks.push(Check::new(
            "echo_count",
            te.len() as f64,
            config.echo_count,
            format!(
                "{} echo(es); with fewer than 3 the fit cannot tell a bad echo",
                te.len()
            ),
        ));
    }
    if te.len() > 1 {
        let spacing = te
            .windows(2)
            .map(|w| (w[1] - w[0]) * 1e3)
            .fold(f64::INFINITY, f64::min);
        checks.push(Check::new(
            "echo_spacing_ms",
            spacing,
            config.echo_spacing_ms,
            format!(
                "smallest spacing between echo times {spacing:.3} ms (TE = {} ms)",
                te.iter()
                    .map(|t| format!("{:.2}", t * 1e3))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    if let Some(mm) = inputs.echo_grid_mismatch_mm {
        checks.push(Check::new(
            "echo_grid_mismatch_mm",
            mm,
            config.echo_grid_mismatch_mm,
            format!(
                "the echoes' and magnitudes' affines place the grid corners up to {mm:.3} mm apart"
            ),
        ));
    }
    if let (Some(mag), Some(brain)) = (inputs.magnitude, inputs.brain_mask) {
        let p99 = quantile(&mag.data, None, 0.99).unwrap_or(0.0);
        let signal = mag.data.iter().filter(|&&m| m > 0.1 * p99).count();
        let in_mask = brain.iter().filter(|&&m| m).count();
        let value = ratio(in_mask, signal);
        checks.push(Check::new(
            "mask_coverage",
            value,
            config.mask_coverage,
            format!(
                "{in_mask} brain-mask voxels for {signal} voxels with signal (magnitude above \
                 10 % of its 99th percentile)"
            ),
        ));
    }
    if let Some(brain) = inputs.brain_mask {
        checks.extend(brain_shape(
            brain,
            inputs.local_ppm.dims,
            inputs.local_ppm.geometry.voxel_size,
            config,
        ));
        let before = brain.iter().filter(|&&m| m).count();
        let after = inputs.mask.iter().filter(|&&m| m).count();
        let value = ratio(after, before);
        checks.push(Check::new(
            "mask_kept_after_background",
            value,
            config.mask_kept_after_background,
            format!("background removal kept {after} of {before} mask voxels"),
        ));
    }
    checks
}

/// Volume, length and elongation of a brain mask: a mask that holds scalp, face or neck is
/// too big, too long or too elongated to be a brain.
fn brain_shape(
    mask: &[bool],
    dims: [usize; 3],
    voxel_size: [f64; 3],
    config: &Config,
) -> Vec<Check> {
    let [nx, ny, _] = dims;
    let (mut n, mut sum, mut outer) = (0usize, [0.0f64; 3], [[0.0f64; 3]; 3]);
    for (v, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
        let p = [v % nx, (v / nx) % ny, v / (nx * ny)];
        let p = [0, 1, 2].map(|a| p[a] as f64 * voxel_size[a]);
        n += 1;
        for a in 0..3 {
            sum[a] += p[a];
            for b in 0..3 {
                outer[a][b] += p[a] * p[b];
            }
        }
    }
    if n == 0 {
        return Vec::new();
    }
    let ml = n as f64 * voxel_size.iter().product::<f64>() / 1000.0;
    let mean = sum.map(|s| s / n as f64);
    let cov: [[f64; 3]; 3] =
        [0, 1, 2].map(|a| [0, 1, 2].map(|b| outer[a][b] / n as f64 - mean[a] * mean[b]));
    // A solid ellipsoid of semi-axis a has variance a²/5 along it.
    let axes = symmetric_eigenvalues(cov).map(|l| 2.0 * (5.0 * l.max(0.0)).sqrt());
    let (longest, shortest) = (axes[2], axes[0]);
    vec![
        Check::new(
            "brain_volume_ml",
            ml,
            config.brain_volume_ml,
            format!("brain mask volume {ml:.0} mL (adult intracranial volume ≈ 1100–1900 mL)"),
        ),
        Check::new(
            "brain_length_mm",
            longest,
            config.brain_length_mm,
            format!(
                "brain mask principal axes {:.0} × {:.0} × {:.0} mm (adult brain ≈ 170 × 140 × 120)",
                axes[2], axes[1], axes[0]
            ),
        ),
        Check::new(
            "brain_elongation",
            longest / shortest,
            config.brain_elongation,
            format!(
                "longest over shortest principal axis of the brain mask {:.2}",
                longest / shortest
            ),
        ),
    ]
}

/// Eigenvalues of a symmetric 3×3 matrix, ascending (closed form by the trigonometric
/// solution of the characteristic cubic).
fn symmetric_eigenvalues(m: [[f64; 3]; 3]) -> [f64; 3] {
    let p1 = m[0][1].powi(2) + m[0][2].powi(2) + m[1][2].powi(2);
    let q = (m[0][0] + m[1][1] + m[2][2]) / 3.0;
    if p1 == 0.0 {
        let mut d = [m[0][0], m[1][1], m[2][2]];
        d.sort_by(f64::total_cmp);
        return d;
    }
    let p2 = (m[0][0] - q).powi(2) + (m[1][1] - q).powi(2) + (m[2][2] - q).powi(2) + 2.0 * p1;
    let p = (p2 / 6.0).sqrt();
    let b = [0, 1, 2].map(|i| [0, 1, 2].map(|j| (m[i][j] - if i == j { q } else { 0.0 }) / p));
    let det = b[0][0] * (b[1][1] * b[2][2] - b[1][2] * b[2][1])
        - b[0][1] * (b[1][0] * b[2][2] - b[1][2] * b[2][0])
        + b[0][2] * (b[1][0] * b[2][1] - b[1][1] * b[2][0]);
    let phi = (det / 2.0).clamp(-1.0, 1.0).acos() / 3.0;
    let hi = q + 2.0 * p * phi.cos();
    let lo = q + 2.0 * p * (phi + 2.0 * std::f64::consts::PI / 3.0).cos();
    [lo, 3.0 * q - hi - lo, hi]
}

/// Largest distance (mm) between where two geometries place the corners of a `dims` grid.
pub fn grid_mismatch_mm(a: &Geometry, b: &Geometry, dims: [usize; 3]) -> f64 {
    let mut worst = 0.0f64;
    for corner in 0..8 {
        let ijk = [0, 1, 2].map(|ax| {
            if corner >> ax & 1 == 1 {
                dims[ax].saturating_sub(1) as f64
            } else {
                0.0
            }
        });
        let map = |g: &Geometry| {
            let m = &g.affine;
            [0, 1, 2].map(|r| m[r][0] * ijk[0] + m[r][1] * ijk[1] + m[r][2] * ijk[2] + m[r][3])
        };
        let (p, q) = (map(a), map(b));
        let d = ((p[0] - q[0]).powi(2) + (p[1] - q[1]).powi(2) + (p[2] - q[2]).powi(2)).sqrt();
        worst = worst.max(d);
    }
    worst
}

/// `num / den`, NaN (no verdict) when there is nothing to count.
fn ratio(num: usize, den: usize) -> f64 {
    if den > 0 {
        num as f64 / den as f64
    } else {
        f64::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::Scene;
    use super::super::Verdict;
    use super::*;

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn grid_mismatch_is_the_corner_shift() {
        let a = Geometry::from_voxel_size([1.0, 2.0, 3.0]);
        assert_eq!(grid_mismatch_mm(&a, &a, [10, 10, 10]), 0.0);
        let mut b = a.clone();
        b.affine[0][3] += 1.5;
        assert!((grid_mismatch_mm(&a, &b, [10, 10, 10]) - 1.5).abs() < 1e-12);
        // A voxel size 1 % off moves the far corner by 1 % of the extent.
        let c = Geometry::from_voxel_size([1.01, 2.0, 3.0]);
        assert!((grid_mismatch_mm(&a, &c, [11, 1, 1]) - 0.1).abs() < 1e-9);
    }

    #[test]
    fn clean_acquisition_passes_and_each_protocol_problem_is_flagged() {
        let s = Scene::new();
        let config = Config::default();
        let checks = all(&s.inputs(&s.local), &config);
        // The scene's brain is a 72 mL toy: the adult-brain shape checks are tested below.
        for c in checks.iter().filter(|c| !c.name.starts_with("brain_")) {
            assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
        }
        assert_eq!(checks.len(), 9, "{checks:?}");

        let mut i = s.inputs(&s.local);
        let te = [0.004, 0.004, 0.008];
        i.echo_times = &te;
        let c = all(&i, &config);
        assert_eq!(find(&c, "echo_spacing_ms").verdict, Verdict::Fail);

        let mut i = s.inputs(&s.local);
        i.echo_grid_mismatch_mm = Some(4.0);
        i.b0_direction = [0.0, 0.6, 0.8]; // 36.9° from z
        let c = all(&i, &config);
        assert_eq!(find(&c, "echo_grid_mismatch_mm").verdict, Verdict::Fail);
        assert_eq!(find(&c, "b0_tilt_degrees").verdict, Verdict::Warn);

        // A mask eroded to almost nothing, and a tiny brain mask in a big head.
        let mut small = s.mask.clone();
        let mut kept = 0;
        small.iter_mut().for_each(|m| {
            if *m {
                kept += 1;
                *m = kept % 10 == 0;
            }
        });
        let mut i = s.inputs(&s.local);
        i.mask = &small;
        let c = all(&i, &config);
        assert_eq!(
            find(&c, "mask_kept_after_background").verdict,
            Verdict::Fail
        );
        i.brain_mask = Some(&small);
        let c = all(&i, &config);
        assert_eq!(find(&c, "mask_coverage").verdict, Verdict::Fail);
    }

    /// An ellipsoid of semi-axes `r` (mm), optionally with a cylinder of radius 45 mm
    /// hanging from its centre to the bottom of the grid (a neck), on a 2 mm grid.
    fn head_mask(r: [f64; 3], neck: bool) -> (Vec<bool>, [usize; 3]) {
        let dims = [100, 110, 120];
        let c = [100.0, 110.0, 140.0];
        let mask = (0..dims.iter().product::<usize>())
            .map(|v| {
                let p = [v % 100, (v / 100) % 110, v / 11000].map(|x| x as f64 * 2.0);
                let e: f64 = (0..3).map(|a| ((p[a] - c[a]) / r[a]).powi(2)).sum();
                let in_neck =
                    neck && p[2] < c[2] && (p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2) < 2025.0;
                e <= 1.0 || in_neck
            })
            .collect();
        (mask, dims)
    }

    #[test]
    fn brain_shape_flags_scalp_and_neck_but_not_a_brain() {
        let config = Config::default();
        let verdicts = |r: [f64; 3], neck: bool| {
            let (m, dims) = head_mask(r, neck);
            let c = brain_shape(&m, dims, [2.0; 3], &config);
            (
                c[0].value,
                c[1].value,
                c[2].value,
                c.iter().map(|c| c.verdict).collect::<Vec<_>>(),
            )
        };
        // An adult brain: 140 × 170 × 120 mm.
        let (ml, length, elong, v) = verdicts([70.0, 85.0, 60.0], false);
        assert!(
            (ml / (4.0 / 3.0 * std::f64::consts::PI * 70.0 * 85.0 * 60.0 / 1000.0) - 1.0).abs()
                < 0.02
        );
        assert!((length - 170.0).abs() < 3.0 && (elong - 170.0 / 120.0).abs() < 0.05);
        assert!(v.iter().all(|&v| v == Verdict::Pass), "{v:?}");
        // The same with 12 mm of scalp: 2.4 L and 194 mm long.
        let (_, _, _, v) = verdicts([82.0, 97.0, 72.0], false);
        assert_eq!(v[0], Verdict::Warn);
        // Leaking down the neck: elongated.
        let (_, _, _, v) = verdicts([70.0, 85.0, 60.0], true);
        assert!(v[1] == Verdict::Warn || v[2] == Verdict::Warn, "{v:?}");
    }

    #[test]
    fn symmetric_eigenvalues_match_a_known_rotation() {
        // R·diag(1, 4, 9)·Rᵀ for a rotation about (1, 1, 1).
        let (c, s) = (0.6f64, 0.8f64);
        let u = [1.0 / 3f64.sqrt(); 3];
        let r = [0, 1, 2].map(|i| {
            [0, 1, 2].map(|j| {
                let k = (3 + j - i) % 3;
                let cross = match k {
                    1 => -u[(i + 2) % 3],
                    2 => u[(i + 1) % 3],
                    _ => 0.0,
                };
                c * if i == j { 1.0 } else { 0.0 } + (1.0 - c) * u[i] * u[j] + s * cross
            })
        });
        let d = [1.0, 4.0, 9.0];
        let m =
            [0, 1, 2].map(|i| [0, 1, 2].map(|j| (0..3).map(|k| r[i][k] * d[k] * r[j][k]).sum()));
        let e = symmetric_eigenvalues(m);
        for (got, want) in e.iter().zip(d) {
            assert!((got - want).abs() < 1e-9, "{e:?}");
        }
        assert_eq!(
            symmetric_eigenvalues([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]]),
            [1.0, 2.0, 3.0]
        );
    }
}
