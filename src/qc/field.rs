//! Checks on the local field's values: NaN/Inf, plausible range in ppm, residual wraps.

use super::{Check, Config, Inputs};
use crate::preprocess::util::quantile;

/// NaN/Inf voxels of the local field (and of the total field) inside the mask.
pub fn non_finite(inputs: &Inputs, config: &Config) -> Check {
    let count = |data: &[f32]| {
        data.iter()
            .zip(inputs.mask)
            .filter(|(v, &m)| m && !v.is_finite())
            .count()
    };
    let mut n = count(&inputs.local_ppm.data);
    if let Some(t) = inputs.total_hz {
        n += count(&t.data);
    }
    Check::new(
        "non_finite_voxels",
        n as f64,
        config.non_finite_voxels,
        if n == 0 {
            "every field value in the mask is finite".into()
        } else {
            format!(
                "{n} NaN/Inf value(s) in the mask: the input or a stage produced invalid numbers"
            )
        },
    )
}

/// The 1st–99th percentile range of the local field in the mask, in ppm.
pub fn range_ppm(inputs: &Inputs, config: &Config) -> Check {
    let f = &inputs.local_ppm.data;
    let lo = quantile(f, Some(inputs.mask), 0.01);
    let hi = quantile(f, Some(inputs.mask), 0.99);
    let (value, message) = match (lo, hi) {
        (Some(lo), Some(hi)) => (
            (hi - lo) as f64,
            format!(
                "1st–99th percentile {lo:.4} … {hi:.4} ppm (brain tissue: a few hundredths \
                 of a ppm; much more suggests a background left in or wrong units)"
            ),
        ),
        _ => (f64::NAN, "the mask is empty".into()),
    };
    Check::new("field_range_ppm", value, config.field_range_ppm, message)
}

/// Fraction of the mask's interior voxels (all six neighbours in the mask) whose discrete
/// Laplacian (neighbour sum minus six times the centre, so a step of height h gives about h)
/// is an outlier: beyond `wrap_outlier_sigmas` robust standard deviations (1.4826 × median
/// absolute deviation) and beyond `wrap_jump_fraction` of the field jump of one 2π wrap at
/// the last echo. A phase wrap left in the field is a step, which lights up a sheet of voxels.
/// `None` without echo times and B0 (a field map): there is no wrap size to look for.
pub fn residual_wraps(inputs: &Inputs, config: &Config) -> Option<Check> {
    // One wrap at the last echo TE moves the field by 1/TE Hz.
    let jump_ppm = match (inputs.echo_times.last(), inputs.b0_tesla) {
        (Some(&te), Some(b0)) if te > 0.0 => 1.0 / te / crate::physics::units::hz_per_ppm(b0),
        _ => return None,
    };
    let v = inputs.local_ppm;
    let lap = interior_laplacian(&v.data, inputs.mask, v.dims);
    let values: Vec<f32> = lap.iter().map(|&(_, l)| l).collect();
    if values.is_empty() {
        return Some(Check::new(
            "residual_wraps",
            f64::NAN,
            config.residual_wraps,
            "the mask has no interior voxels".into(),
        ));
    }
    let median = quantile(&values, None, 0.5).unwrap_or(0.0);
    let dev: Vec<f32> = values.iter().map(|&x| (x - median).abs()).collect();
    let sigma = 1.4826 * quantile(&dev, None, 0.5).unwrap_or(0.0) as f64;
    let floor = config.wrap_jump_fraction * jump_ppm;
    let limit = (config.wrap_outlier_sigmas * sigma).max(floor);
    let outliers = values
        .iter()
        .filter(|&&x| ((x - median).abs() as f64) > limit)
        .count();
    let fraction = outliers as f64 / values.len() as f64;
    Some(Check::new(
        "residual_wraps",
        fraction,
        config.residual_wraps,
        format!(
            "{outliers} of {} interior voxels have a field Laplacian beyond {limit:.3e} ppm \
             (the larger of {} robust SD and {} of the 2π jump at the last echo, \
             {jump_ppm:.3e} ppm)",
            values.len(),
            config.wrap_outlier_sigmas,
            config.wrap_jump_fraction,
        ),
    ))
}

/// (index, Laplacian) of every voxel whose six neighbours are all inside `mask`.
pub fn interior_laplacian(f: &[f32], mask: &[bool], dims: [usize; 3]) -> Vec<(usize, f32)> {
    let [nx, ny, nz] = dims;
    let (sy, sz) = (nx, nx * ny);
    let mut out = Vec::new();
    for k in 1..nz.saturating_sub(1) {
        for j in 1..ny.saturating_sub(1) {
            for i in 1..nx.saturating_sub(1) {
                let c = i + j * sy + k * sz;
                let nb = [c - 1, c + 1, c - sy, c + sy, c - sz, c + sz];
                if mask[c] && nb.iter().all(|&n| mask[n]) {
                    let s: f32 = nb.iter().map(|&n| f[n]).sum();
                    out.push((c, s - 6.0 * f[c]));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testing::Scene;
    use super::super::Verdict;
    use super::*;

    #[test]
    fn laplacian_of_a_quadratic_is_its_constant_and_of_a_step_is_the_step() {
        let dims = [6, 6, 6];
        let n = 216;
        let mask = vec![true; n];
        let idx = |i: usize, j: usize, k: usize| i + 6 * j + 36 * k;
        let mut f = vec![0.0f32; n];
        for k in 0..6 {
            for j in 0..6 {
                for i in 0..6 {
                    f[idx(i, j, k)] = (i * i) as f32 + 0.5 * (k * k) as f32 + j as f32;
                }
            }
        }
        let lap = interior_laplacian(&f, &mask, dims);
        assert_eq!(lap.len(), 64);
        // ∂²(x²) = 2, ∂²(0.5 z²) = 1, linear terms vanish.
        assert!(lap.iter().all(|&(_, l)| (l - 3.0).abs() < 1e-4), "{lap:?}");
        let step: Vec<f32> = (0..n).map(|c| if c % 6 >= 3 { 2.0 } else { 0.0 }).collect();
        let lap = interior_laplacian(&step, &mask, dims);
        let at = |i| lap.iter().find(|&&(c, _)| c == idx(i, 2, 2)).unwrap().1;
        assert_eq!((at(1), at(2), at(3), at(4)), (0.0, 2.0, -2.0, 0.0));
    }

    #[test]
    fn clean_field_passes_nan_and_wrap_patch_and_wrong_units_are_flagged() {
        let s = Scene::new();
        let config = Config::default();
        let clean = s.inputs(&s.local);
        assert_eq!(non_finite(&clean, &config).verdict, Verdict::Pass);
        let r = range_ppm(&clean, &config);
        assert_eq!(r.verdict, Verdict::Pass, "{r:?}");
        let w = residual_wraps(&clean, &config).unwrap();
        assert_eq!(w.verdict, Verdict::Pass, "{w:?}");
        let mut no_te = s.inputs(&s.local);
        no_te.echo_times = &[];
        assert!(residual_wraps(&no_te, &config).is_none());

        let mut nan = s.local.clone();
        nan.data[s.centre] = f32::NAN;
        let c = non_finite(&s.inputs(&nan), &config);
        assert_eq!((c.value, c.verdict), (1.0, Verdict::Fail));

        // A 2π wrap over a block of the brain, at the first and at the last echo.
        for te in [s.echo_times[0], s.echo_times[3]] {
            let wrapped = s.with_wrap_patch(te);
            let w = residual_wraps(&s.inputs(&wrapped), &config).unwrap();
            assert_eq!(w.verdict, Verdict::Fail, "{w:?}");
        }

        // The field in Hz but labelled ppm: far too wide a range.
        let hz = s
            .local
            .with_data(s.local.data.iter().map(|&v| v * 128.0).collect());
        let r = range_ppm(&s.inputs(&hz), &config);
        assert_ne!(r.verdict, Verdict::Pass, "{r:?}");
        // And a field a million times too small (ppm read as parts per unit).
        let tiny = s
            .local
            .with_data(s.local.data.iter().map(|&v| v * 1e-6).collect());
        let r = range_ppm(&s.inputs(&tiny), &config);
        assert_eq!(r.verdict, Verdict::Fail, "{r:?}");
    }
}
