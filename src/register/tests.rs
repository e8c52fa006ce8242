//! Registration against heads moved analytically (the phantom is evaluated at the rotated
//! coordinates, not resampled), so the recovered motion is checked against the truth.

use super::rigid::{
    angle_between_degrees, mul, mul_vec, norm, rotation_from_vector, sub, transpose, Mat3,
};
use super::*;
use crate::physics::DipoleOperator;
use crate::simulate::phantom::{Phantom, Pose};
use crate::{Geometry, Volume};

const DIMS: [usize; 3] = [48, 48, 48];
const VOXEL: [f64; 3] = [1.5, 1.5, 1.5];

/// A head on the 48³ grid with partial-volume edges, as a scanner's band-limited image has:
/// the phantom is evaluated at twice the resolution and averaged over 2×2×2 blocks (point
/// samples of sharp edges alias differently in every pose, which no registration can undo).
struct Head {
    /// Proton density of the whole head (standing in for the echo-combined magnitude).
    magnitude: Volume,
    mask: Vec<bool>,
    /// Brain χ, ppm.
    chi: Vec<f32>,
}

fn head(pose: &Pose) -> Head {
    let fine_dims = DIMS.map(|n| 2 * n);
    let p = Phantom::procedural_posed(fine_dims, VOXEL.map(|v| v / 2.0), 3, pose).unwrap();
    let n: usize = DIMS.iter().product();
    let (mut mag, mut inside, mut chi) = (vec![0.0f32; n], vec![0.0f32; n], vec![0.0f32; n]);
    let [fx, fy, _] = fine_dims;
    for (i, ((&m, &b), &c)) in
        p.m0.iter()
            .zip(&p.brain_mask)
            .zip(&p.chi_local.data)
            .enumerate()
    {
        let (x, y, z) = (i % fx, (i / fx) % fy, i / (fx * fy));
        let o = x / 2 + DIMS[0] * (y / 2 + DIMS[1] * (z / 2));
        mag[o] += m / 8.0;
        if b {
            inside[o] += 1.0 / 8.0;
        }
        chi[o] += c / 8.0;
    }
    // Coarse voxel I covers fine voxels 2I and 2I+1, centred ¼ coarse voxel further on.
    let mut g = Geometry::from_voxel_size(VOXEL);
    (0..3).for_each(|a| g.affine[a][3] = VOXEL[a] / 4.0);
    let mask: Vec<bool> = inside.iter().map(|&w| w >= 0.5).collect();
    Head {
        magnitude: Volume::new(DIMS, mag, g),
        mask,
        chi,
    }
}

/// The grid centre in world coordinates: the phantom's poses turn about it.
fn grid_centre(g: &Geometry) -> [f64; 3] {
    let grid = Grid::new(DIMS, g).unwrap();
    grid.to_world(DIMS.map(|n| (n as f64 - 1.0) / 2.0))
}

/// The true reference→moving transform of a pose: `x = Q·(y − C) + C + s`.
fn truth(pose: &Pose, g: &Geometry) -> Rigid {
    Rigid {
        rotation: pose.rotation,
        translation: pose.shift,
        centre: grid_centre(g),
    }
}

/// Rotation error (degrees) and the largest displacement error (mm) over the brain.
fn errors(found: &Rigid, want: &Rigid, brain: &[bool], g: &Geometry) -> (f64, f64) {
    let rot = super::rigid::rotation_angle(&mul(&found.rotation, &transpose(&want.rotation)));
    let grid = Grid::new(DIMS, g).unwrap();
    let [nx, ny, _] = DIMS;
    let mut worst = 0.0f64;
    for (i, _) in brain.iter().enumerate().filter(|(_, &b)| b).step_by(7) {
        let y = grid.to_world([
            (i % nx) as f64,
            ((i / nx) % ny) as f64,
            (i / (nx * ny)) as f64,
        ]);
        worst = worst.max(norm(sub(found.apply(y), want.apply(y))));
    }
    (rot.to_degrees(), worst)
}

fn pose(omega_deg: [f64; 3], shift: [f64; 3]) -> Pose {
    Pose {
        rotation: rotation_from_vector(omega_deg.map(f64::to_radians)),
        shift,
    }
}

#[test]
fn identity_stays_identity() {
    let h = head(&Pose::default());
    let (m, mask) = (&h.magnitude, &h.mask);
    let r = register(m, mask, m, mask, &Options::default()).unwrap();
    let (rot, shift) = errors(&r.transform, &Rigid::identity([0.0; 3]), mask, &m.geometry);
    assert!(
        rot < 0.05 && shift < 0.05,
        "rotation {rot}°, shift {shift} mm"
    );
    assert!(r.ncc_after > 0.999, "{}", r.ncc_after);
}

#[test]
fn known_rotations_and_shifts_are_recovered() {
    let fixed = head(&Pose::default());
    let (f, fmask) = (&fixed.magnitude, &fixed.mask);
    for (omega, shift) in [
        ([12.0, 0.0, 0.0], [0.0, 0.0, 0.0]),
        ([-8.0, 6.0, 10.0], [3.0, -2.0, 1.5]),
        ([0.0, -15.0, 4.0], [-1.0, 2.5, -2.0]),
    ] {
        let pz = pose(omega, shift);
        let moving = head(&pz);
        let r = register(
            f,
            fmask,
            &moving.magnitude,
            &moving.mask,
            &Options::default(),
        )
        .unwrap();
        let (rot, disp) = errors(&r.transform, &truth(&pz, &f.geometry), fmask, &f.geometry);
        eprintln!(
            "{omega:?}: {rot:.3}° {disp:.3} mm, {} its, {:.2} s",
            r.iterations, r.seconds
        );
        assert!(
            rot <= 0.5 && disp <= 0.3 * 2.0,
            "{omega:?}° {shift:?} mm: rotation error {rot:.3}°, displacement error {disp:.3} mm (NCC {:.4} → {:.4})",
            r.ncc_before,
            r.ncc_after
        );
        // The translation at the brain's centre, the quantity the 0.3 mm bound is about.
        let c = r.transform.centre;
        let centre_err = norm(sub(r.transform.apply(c), truth(&pz, &f.geometry).apply(c)));
        assert!(
            centre_err <= 0.3,
            "{omega:?}: centre off by {centre_err:.3} mm"
        );
        assert!(r.ncc_after > r.ncc_before);
        // A reused transform's similarity, recomputed, is what registration reported.
        let again = similarity(
            f,
            fmask,
            &moving.magnitude,
            &r.transform,
            Options::default().max_samples,
        )
        .unwrap()
        .unwrap();
        assert!(
            (again - r.ncc_after).abs() < 1e-6,
            "{again} vs {}",
            r.ncc_after
        );
    }
    // A transform that moves the head off the image leaves no similarity to measure.
    let away = Rigid {
        translation: [1e4, 0.0, 0.0],
        ..Rigid::identity([0.0; 3])
    };
    let off = similarity(
        f,
        fmask,
        &fixed.magnitude,
        &away,
        Options::default().max_samples,
    )
    .unwrap();
    assert!(off.is_none(), "{off:?}");
}

#[test]
fn resampling_there_and_back_returns_the_interior() {
    // A smooth image, so two trilinear passes change it little.
    let g = Geometry::from_voxel_size(VOXEL);
    let grid = Grid::new(DIMS, &g).unwrap();
    let c = grid_centre(&g);
    let mut data = vec![0.0f32; DIMS.iter().product()];
    for (i, v) in data.iter_mut().enumerate() {
        let y = grid.to_world([(i % 48) as f64, ((i / 48) % 48) as f64, (i / 2304) as f64]);
        let d = sub(y, c);
        *v = ((d[0] / 9.0).sin() * (d[1] / 11.0).cos() + (-norm(d) / 20.0).exp()) as f32;
    }
    let t = Rigid::from_rotation_vector([0.2, -0.1, 0.3], [2.0, -1.0, 0.5], c);
    let there = resample(&data, &grid, &grid, &t, f32::NAN);
    let back = resample(&there, &grid, &grid, &t.inverse(), f32::NAN);
    let (mut err, mut n) = (0.0f64, 0);
    for (i, (&a, &b)) in data.iter().zip(&back).enumerate() {
        let y = grid.to_world([(i % 48) as f64, ((i / 48) % 48) as f64, (i / 2304) as f64]);
        if norm(sub(y, c)) < 20.0 {
            assert!(b.is_finite(), "interior voxel {i} left the grid");
            err = err.max((a - b).abs() as f64);
            n += 1;
        }
    }
    assert!(n > 1000);
    // Two trilinear passes blur the curvature a little: under 2% of the image's range (≈ 3).
    assert!(err < 0.06, "largest round-trip error {err}");
}

#[test]
fn field_of_a_rotated_head_gives_the_rotated_b0_after_registration() {
    // The subject turns the head by Q inside an axial grid; B0 is the grid's z for both.
    let q_pose = pose([14.0, -9.0, 5.0], [1.0, -1.5, 0.5]);
    let reference = head(&Pose::default());
    let moving = head(&q_pose);
    let (f, fmask) = (&reference.magnitude, &reference.mask);
    let field = DipoleOperator::new(DIMS, VOXEL, [0.0, 0.0, 1.0]).forward(&moving.chi);

    let r = register(
        f,
        fmask,
        &moving.magnitude,
        &moving.mask,
        &Options::default(),
    )
    .unwrap();
    let b = b0_in_reference(&r.transform, &f.geometry);
    // In the head's (reference) frame the scanner's z is Qᵀ·ẑ.
    let q: Mat3 = q_pose.rotation;
    let want = mul_vec(&transpose(&q), [0.0, 0.0, 1.0]);
    let err = angle_between_degrees(b, want);
    assert!(err < 0.5, "B0 {b:?}, expected {want:?}: {err:.3}° off");

    // The resampled field is the forward model of the upright head with that B0, and not
    // with the opposite rotation (a transposed R would give Q·ẑ).
    let grid = Grid::new(DIMS, &f.geometry).unwrap();
    let (on_ref, ref_mask) = resample_masked(&field, &moving.mask, &grid, &grid, &r.transform);
    let misfit = |dir: [f64; 3]| {
        let model = DipoleOperator::new(DIMS, VOXEL, dir).forward(&reference.chi);
        let (mut e, mut s) = (0.0f64, 0.0f64);
        for i in 0..model.len() {
            if ref_mask[i] && fmask[i] {
                e += ((on_ref[i] - model[i]) as f64).powi(2);
                s += (model[i] as f64).powi(2);
            }
        }
        (e / s).sqrt()
    };
    // The floor is set by resampling and the FFT model, so compare with the true direction.
    let right = misfit(b);
    let exact = misfit(want);
    let wrong = misfit(mul_vec(&q, [0.0, 0.0, 1.0]));
    assert!(
        right < exact * 1.05 + 0.01 && right < 0.5 * wrong,
        "misfit {right:.3} with the found B0, {exact:.3} with the true one, {wrong:.3} with Q·z"
    );
}

/// The posed head's magnitude seen with another contrast: bright where the reference is dark
/// (the brain inverted against the scalp) and shaded by a receive profile fixed to the
/// scanner, so intensities follow the reference's through no linear map.
fn other_contrast(m: &Volume) -> Volume {
    let max = m.data.iter().cloned().fold(0.0f32, f32::max);
    let [nx, ny, _] = m.dims;
    let data = m
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let x = (i % nx) as f32 / nx as f32;
            let shade = 1.0 + 0.25 * (x - 0.5) + 0.1 * ((i / nx) % ny) as f32 / ny as f32;
            let inside = if v > 0.02 * max {
                (1.2 - v / max).powf(1.5)
            } else {
                0.0
            };
            inside * shade
        })
        .collect();
    m.with_data(data)
}

#[test]
fn mutual_information_registers_a_head_of_another_contrast() {
    let fixed = head(&Pose::default());
    let (f, fmask) = (&fixed.magnitude, &fixed.mask);
    let pz = pose([-8.0, 6.0, 10.0], [3.0, -2.0, 1.5]);
    let moving = head(&pz);
    let want = truth(&pz, &f.geometry);
    let mi = Options {
        similarity: Similarity::MutualInformation,
        ..Options::default()
    };
    // A few voxels 50× brighter than the head (vessels, artefacts) would squeeze the head
    // into a couple of bins without the winsorised ranges.
    let mut specks = other_contrast(&moving.magnitude);
    let max = specks.data.iter().cloned().fold(0.0f32, f32::max);
    let n = specks.data.len();
    for i in 0..40 {
        specks.data[n / 3 + i * 997] = 50.0 * max;
    }
    // Same contrast and another contrast: MI finds the pose in both.
    for (label, m) in [
        ("same contrast", moving.magnitude.clone()),
        ("other contrast", other_contrast(&moving.magnitude)),
        ("other contrast with bright specks", specks),
    ] {
        let r = register(f, fmask, &m, &moving.mask, &mi).unwrap();
        let (rot, disp) = errors(&r.transform, &want, fmask, &f.geometry);
        let c = r.transform.centre;
        let centre_err = norm(sub(r.transform.apply(c), want.apply(c)));
        eprintln!(
            "MI, {label}: {rot:.3}° {disp:.3} mm (centre {centre_err:.3} mm), {} its, {:.2} s, MI {:?} → {:?}",
            r.iterations, r.seconds, r.mi_before, r.mi_after
        );
        assert!(
            rot <= 0.5 && centre_err <= 0.3,
            "{label}: rotation error {rot:.3}°, centre off by {centre_err:.3} mm"
        );
        assert!(r.mi_after.unwrap() > r.mi_before.unwrap());
        assert_eq!(r.similarity, Similarity::MutualInformation);
    }
    // NCC, which assumes one contrast, does not find it across contrasts: why MI is offered.
    let other = other_contrast(&moving.magnitude);
    let ncc = register(f, fmask, &other, &moving.mask, &Options::default());
    let rot = ncc.map_or(f64::INFINITY, |r| {
        errors(&r.transform, &want, fmask, &f.geometry).0
    });
    assert!(rot > 1.0, "NCC across contrasts was {rot:.3}° off");
}

#[test]
fn unusable_registration_settings_are_refused_naming_the_key() {
    let h = head(&Pose::default());
    for (options, key) in [
        (
            Options {
                bins: 3,
                ..Options::default()
            },
            "registration.bins",
        ),
        (
            Options {
                levels: 0,
                ..Options::default()
            },
            "registration.levels",
        ),
    ] {
        let err = register(&h.magnitude, &h.mask, &h.magnitude, &h.mask, &options)
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{err}");
    }
}
