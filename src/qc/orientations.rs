//! Checks on a multi-orientation set before its joint inversion, written to the set's own
//! qc json: how well each as-scanned member was registered to the reference, and whether
//! the set's B0 directions together make the dipole inversion well posed.

use super::{Check, Config};
use crate::physics::dipole_kernel;
use crate::physics::fft::signed_index;
use crate::register::rigid::pairwise_degrees;

/// What registration found for one member of an as-scanned set (not the reference).
#[derive(Clone, Debug)]
pub struct Registered {
    /// The member's entities beyond the set's (`acq-ori2`): the suffix of its check names.
    pub label: String,
    /// NCC of the first-echo magnitudes over the reference's brain after registration
    /// (recomputed when the transform was reused from an earlier run).
    pub ncc_after: f64,
    /// Rotation angle of the transform.
    pub rotation_degrees: f64,
}

/// The member's entities beyond the set's (`acq-ori2` of `sub-1_acq-ori2` in set `sub-1`):
/// short and the same across subjects, so it names the member's checks, group columns and
/// report figures.
pub fn member_label(set_prefix: &str, member: &str) -> String {
    let shared: Vec<&str> = set_prefix.split('_').collect();
    let own: Vec<&str> = member.split('_').filter(|p| !shared.contains(p)).collect();
    if own.is_empty() {
        member.to_string()
    } else {
        own.join("_")
    }
}

/// `registration_ncc_<label>` and `head_rotation_degrees_<label>` of one member.
pub fn registration(member: &Registered, reference: &str, config: &Config) -> Vec<Check> {
    let Registered {
        label,
        ncc_after: ncc,
        rotation_degrees: angle,
    } = member;
    vec![
        Check::new(
            &format!("registration_ncc_{label}"),
            *ncc,
            config.registration_ncc,
            format!(
                "{label}'s magnitude correlates at {ncc:.3} with {reference}'s after \
                 registration (0.98 on simulated sets); if low, look at the registration \
                 overlay in the report and at both brain masks, and check that the series are \
                 the same head and protocol"
            ),
        ),
        Check::new(
            &format!("head_rotation_degrees_{label}"),
            *angle,
            config.head_rotation_degrees,
            format!(
                "{label}'s head is rotated {angle:.1}° from {reference}'s; registration was \
                 tested up to 30°: beyond, check the registration overlay in the report"
            ),
        ),
    ]
}

/// Side of the isotropic grid on which [`ill_conditioned_fraction`] counts directions.
const CONDITIONING_GRID: usize = 64;

/// The share of k-space directions where `Σᵢ Dᵢ(k)² < floor` for unit B0 directions `b0`
/// (voxel frame, physical axes).
///
/// COSMOS divides by `Σᵢ Dᵢ²` and holds it at `inversion.cosmos.threshold` where it is
/// smaller, so with that floor this is the part of the spectrum the set leaves ill posed:
/// one orientation leaves ≈ 0.175 (the band about its magic-angle cone), two always leave
/// the lines where their cones cross, three or more tilted ≥ 10° about different axes
/// leave none. The worst case, `min Σ D²`, is 0 for every pair of orientations and so
/// cannot grade them; this share can. `D` depends on the direction of `k` only, so the
/// count runs over the ball of frequencies of a small isotropic grid: a property of the
/// directions alone, the same for any data grid, and ≈ 1 ms to compute.
pub fn ill_conditioned_fraction(b0: &[[f64; 3]], floor: f64) -> f64 {
    let n = CONDITIONING_GRID;
    let dims = [n; 3];
    let nh = n / 2 + 1;
    let mut sum = vec![0.0f64; nh * n * n];
    for &b in b0 {
        for (s, d) in sum.iter_mut().zip(dipole_kernel(dims, [1.0; 3], b)) {
            *s += (d as f64).powi(2);
        }
    }
    // Inside the ball below Nyquist (the Nyquist bins average two frequencies), without
    // DC (where D = 0 for every B0: χ's mean is fixed by referencing, not by the field).
    let radius2 = ((n / 2 - 1) * (n / 2 - 1)) as f64;
    let (mut below, mut total) = (0.0f64, 0.0f64);
    for (c, &s) in sum.iter().enumerate() {
        let (i, j, k) = (c % nh, (c / nh) % n, c / (nh * n));
        let (fj, fk) = (signed_index(j, n), signed_index(k, n));
        let r2 = (i * i) as f64 + fj * fj + fk * fk;
        if r2 == 0.0 || r2 > radius2 {
            continue;
        }
        // The half spectrum holds each ±k pair once, except on the i = 0 plane.
        let w = if i == 0 { 0.5 } else { 1.0 };
        total += w;
        if s < floor {
            below += w;
        }
    }
    if total > 0.0 {
        below / total
    } else {
        1.0
    }
}

/// `b0_ill_conditioned_fraction` of a set whose B0 directions are `b0`, with COSMOS's floor.
pub fn conditioning(b0: &[[f64; 3]], floor: f64, config: &Config) -> Check {
    let value = ill_conditioned_fraction(b0, floor);
    let largest = pairwise_degrees(b0)
        .into_iter()
        .map(|(_, d)| d)
        .fold(0.0f64, f64::max);
    Check::new(
        "b0_ill_conditioned_fraction",
        value,
        config.b0_ill_conditioned_fraction,
        format!(
            "{:.1} % of k-space directions have Σ D² below {floor} with these {} B0 directions \
             (largest angle between two: {largest:.1}°; one orientation alone leaves 17.5 %), \
             where COSMOS cannot resolve χ; to shrink that, acquire three or more orientations \
             with the head tilted 15–25° about different axes",
            100.0 * value,
            b0.len()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qc::Verdict;

    /// B0 tilted by `deg` from z towards x (`axis` 0) or y (`axis` 1).
    fn tilted(deg: f64, axis: usize) -> [f64; 3] {
        let (s, c) = deg.to_radians().sin_cos();
        let mut b = [0.0, 0.0, c];
        b[axis] = s;
        b
    }

    #[test]
    fn one_orientation_leaves_the_band_about_its_magic_angle_cone() {
        // |1/3 − cos²θ| < 0.1 for cos θ in (0.483, 0.658): 17.5 % of directions.
        let f = ill_conditioned_fraction(&[[0.0, 0.0, 1.0]], 0.01);
        assert!((f - 0.175).abs() < 0.01, "{f}");
        // Any direction gives the same share: it depends on the directions' geometry only.
        let g = ill_conditioned_fraction(&[[0.3, -0.5, 0.81]], 0.01);
        assert!((f - g).abs() < 0.01, "{f} vs {g}");
    }

    #[test]
    fn nearly_parallel_directions_fail_and_a_spread_set_passes() {
        let config = Config::default();
        let z = [0.0, 0.0, 1.0];
        // An as-scanned session where the head hardly moved.
        let parallel = conditioning(&[z, tilted(2.0, 0), tilted(2.0, 1)], 0.01, &config);
        assert_eq!(parallel.verdict, Verdict::Fail, "{parallel:?}");
        assert!(parallel.message.contains("2.8°"), "{}", parallel.message);
        // The cli test's set: 15° about two axes.
        let spread = conditioning(&[z, tilted(15.0, 0), tilted(-15.0, 1)], 0.01, &config);
        assert_eq!(spread.verdict, Verdict::Pass, "{spread:?}");
        assert!(spread.value < 1e-3, "{}", spread.value);
        // Two orientations always leave the lines where their cones cross: a warning.
        let two = conditioning(&[z, tilted(25.0, 0)], 0.01, &config);
        assert_eq!(two.verdict, Verdict::Warn, "{two:?}");
        // More orientations never make it worse.
        let more = ill_conditioned_fraction(&[z, tilted(25.0, 0), tilted(25.0, 1)], 0.01);
        assert!(more <= two.value, "{more} vs {}", two.value);
    }

    #[test]
    fn members_are_labelled_by_the_entities_the_set_lacks() {
        assert_eq!(member_label("sub-1", "sub-1_acq-ori2"), "acq-ori2");
        assert_eq!(
            member_label("sub-1_ses-a_rec-x", "sub-1_ses-a_acq-b_rec-x_run-2"),
            "acq-b_run-2"
        );
        assert_eq!(member_label("sub-1", "sub-1"), "sub-1");
    }

    #[test]
    fn registration_checks_are_named_per_member_and_graded_at_their_limits() {
        let config = Config::default();
        let member = |ncc, rotation_degrees| Registered {
            label: "acq-ori2".into(),
            ncc_after: ncc,
            rotation_degrees,
        };
        let verdicts = |m: &Registered| -> Vec<(String, Verdict)> {
            registration(m, "sub-1_acq-ori1", &config)
                .into_iter()
                .map(|c| (c.name, c.verdict))
                .collect()
        };
        let name = |s: &str| s.to_string();
        assert_eq!(
            verdicts(&member(0.98, 14.0)),
            [
                (name("registration_ncc_acq-ori2"), Verdict::Pass),
                (name("head_rotation_degrees_acq-ori2"), Verdict::Pass)
            ]
        );
        // At a limit is still on the passing side; just beyond is not.
        let ncc = config.registration_ncc;
        let (warn, fail) = (ncc.warn_below.unwrap(), ncc.fail_below.unwrap());
        assert_eq!(verdicts(&member(warn, 0.0))[0].1, Verdict::Pass);
        assert_eq!(verdicts(&member(warn - 1e-6, 0.0))[0].1, Verdict::Warn);
        assert_eq!(verdicts(&member(fail, 0.0))[0].1, Verdict::Warn);
        assert_eq!(verdicts(&member(fail - 1e-6, 0.0))[0].1, Verdict::Fail);
        let rot = config.head_rotation_degrees.warn_above.unwrap();
        assert_eq!(verdicts(&member(0.98, rot))[1].1, Verdict::Pass);
        assert_eq!(verdicts(&member(0.98, rot + 0.1))[1].1, Verdict::Warn);
        // A large rotation is never a failure: it is what COSMOS wants.
        assert_eq!(verdicts(&member(0.98, 90.0))[1].1, Verdict::Warn);
    }
}
