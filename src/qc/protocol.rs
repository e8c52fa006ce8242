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
        for c in &checks {
            assert_eq!(c.verdict, Verdict::Pass, "{c:?}");
        }
        assert_eq!(checks.len(), 6, "{checks:?}");

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
}
