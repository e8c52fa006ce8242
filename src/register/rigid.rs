//! Rigid transforms in world (scanner, RAS mm) coordinates.
//!
//! A [`Rigid`] maps a point `y` of the reference's world to the moving image's world:
//! `T(y) = R·(y − c) + c + t`, with `c` the reference's brain centre. Sampling the moving
//! image at `T(y)` puts it on the reference grid. This is the direction ITK stores (a
//! transform from the fixed to the moving space), so the written files need no inversion.

/// A 3×3 matrix, rows.
pub type Mat3 = [[f64; 3]; 3];

pub const IDENTITY: Mat3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

#[derive(Clone, Debug, PartialEq)]
pub struct Rigid {
    pub rotation: Mat3,
    /// mm.
    pub translation: [f64; 3],
    /// Centre of rotation in the reference's world, mm.
    pub centre: [f64; 3],
}

impl Rigid {
    pub fn identity(centre: [f64; 3]) -> Self {
        Rigid {
            rotation: IDENTITY,
            translation: [0.0; 3],
            centre,
        }
    }

    /// A rotation by the vector `omega` (axis × angle, radians) about `centre`, then a shift.
    pub fn from_rotation_vector(omega: [f64; 3], translation: [f64; 3], centre: [f64; 3]) -> Self {
        Rigid {
            rotation: rotation_from_vector(omega),
            translation,
            centre,
        }
    }

    pub fn apply(&self, y: [f64; 3]) -> [f64; 3] {
        let q = mul_vec(&self.rotation, sub(y, self.centre));
        add(add(q, self.centre), self.translation)
    }

    /// The moving→reference transform: `y = Rᵀ·(x − c′) + c′ − t` with `c′ = c + t`.
    pub fn inverse(&self) -> Rigid {
        let c = add(self.centre, self.translation);
        Rigid {
            rotation: transpose(&self.rotation),
            translation: self.translation.map(|v| -v),
            centre: c,
        }
    }

    /// The rotation angle in degrees (whatever the axis).
    pub fn angle_degrees(&self) -> f64 {
        rotation_angle(&self.rotation).to_degrees()
    }

    /// Euler angles in degrees about x, y, z with `R = Rz·Ry·Rx` (for reports).
    pub fn euler_degrees(&self) -> [f64; 3] {
        let r = &self.rotation;
        let ry = (-r[2][0]).clamp(-1.0, 1.0).asin();
        let rx = r[2][1].atan2(r[2][2]);
        let rz = r[1][0].atan2(r[0][0]);
        [rx.to_degrees(), ry.to_degrees(), rz.to_degrees()]
    }

    /// Rotates the transform by `omega` (applied after the current rotation) and shifts it by
    /// `dt`: the update of the optimizer, whose Jacobian is taken at `omega = 0`.
    pub fn updated(&self, omega: [f64; 3], dt: [f64; 3]) -> Rigid {
        Rigid {
            rotation: mul(&rotation_from_vector(omega), &self.rotation),
            translation: add(self.translation, dt),
            centre: self.centre,
        }
    }
}

/// Rodrigues' formula: the rotation by |ω| radians about ω/|ω|.
pub fn rotation_from_vector(omega: [f64; 3]) -> Mat3 {
    let theta = norm(omega);
    if theta < 1e-15 {
        return IDENTITY;
    }
    let k = omega.map(|v| v / theta);
    let (s, c) = theta.sin_cos();
    let kx = [[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]];
    let mut r = IDENTITY;
    for i in 0..3 {
        for j in 0..3 {
            let kk: f64 = (0..3).map(|m| kx[i][m] * kx[m][j]).sum();
            r[i][j] += s * kx[i][j] + (1.0 - c) * kk;
        }
    }
    r
}

/// Angle of a rotation matrix, radians.
pub fn rotation_angle(r: &Mat3) -> f64 {
    let tr = r[0][0] + r[1][1] + r[2][2];
    ((tr - 1.0) / 2.0).clamp(-1.0, 1.0).acos()
}

pub fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
    let mut out = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..3 {
            out[i][j] = (0..3).map(|m| a[i][m] * b[m][j]).sum();
        }
    }
    out
}

pub fn mul_vec(a: &Mat3, v: [f64; 3]) -> [f64; 3] {
    [0, 1, 2].map(|i| a[i][0] * v[0] + a[i][1] * v[1] + a[i][2] * v[2])
}

pub fn transpose(a: &Mat3) -> Mat3 {
    [0, 1, 2].map(|i| [a[0][i], a[1][i], a[2][i]])
}

/// Inverse of a 3×3 matrix, `None` when (nearly) singular.
pub fn invert(a: &Mat3) -> Option<Mat3> {
    let c = |i: usize, j: usize| {
        let (i1, i2) = ((i + 1) % 3, (i + 2) % 3);
        let (j1, j2) = ((j + 1) % 3, (j + 2) % 3);
        a[i1][j1] * a[i2][j2] - a[i1][j2] * a[i2][j1]
    };
    let det = a[0][0] * c(0, 0) + a[0][1] * c(0, 1) + a[0][2] * c(0, 2);
    let scale = a.iter().flatten().fold(0.0f64, |m, v| m.max(v.abs()));
    if det.is_nan() || det.abs() <= 1e-12 * scale.powi(3) {
        return None;
    }
    // The inverse is the transposed cofactor matrix over the determinant.
    Some([0, 1, 2].map(|i| [0, 1, 2].map(|j| c(j, i) / det)))
}

pub fn add(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] + b[0], a[1] + b[1], a[2] + b[2]]
}

pub fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

pub fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

pub fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

pub fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}

/// Angle between two directions in degrees.
pub fn angle_between_degrees(a: [f64; 3], b: [f64; 3]) -> f64 {
    (dot(a, b) / (norm(a) * norm(b)))
        .clamp(-1.0, 1.0)
        .acos()
        .to_degrees()
}

/// The angle (degrees) between every pair `[i, j]`, `i < j`, of `directions`.
pub fn pairwise_degrees(directions: &[[f64; 3]]) -> Vec<([usize; 2], f64)> {
    let mut out = Vec::new();
    for i in 0..directions.len() {
        for j in i + 1..directions.len() {
            out.push(([i, j], angle_between_degrees(directions[i], directions[j])));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: [f64; 3], b: [f64; 3], tol: f64) -> bool {
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() < tol)
    }

    #[test]
    fn rodrigues_quarter_turn_about_z_takes_x_to_y() {
        let r = rotation_from_vector([0.0, 0.0, std::f64::consts::FRAC_PI_2]);
        assert!(close(mul_vec(&r, [1.0, 0.0, 0.0]), [0.0, 1.0, 0.0], 1e-12));
        assert!((rotation_angle(&r).to_degrees() - 90.0).abs() < 1e-9);
    }

    #[test]
    fn inverse_undoes_the_transform_and_euler_angles_read_back() {
        let t = Rigid::from_rotation_vector([0.1, -0.2, 0.3], [1.0, 2.0, -3.0], [5.0, 6.0, 7.0]);
        let p = [10.0, -4.0, 2.5];
        assert!(close(t.inverse().apply(t.apply(p)), p, 1e-9));
        assert!(close(t.apply(t.inverse().apply(p)), p, 1e-9));
        // A pure rotation about x reads back as (angle, 0, 0).
        let rx = Rigid::from_rotation_vector([0.3, 0.0, 0.0], [0.0; 3], [0.0; 3]);
        assert!(close(
            rx.euler_degrees(),
            [0.3f64.to_degrees(), 0.0, 0.0],
            1e-9
        ));
        let m = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 1.0]];
        let mi = invert(&m).unwrap();
        let id = mul(&m, &mi);
        for i in 0..3 {
            assert!(close(id[i], IDENTITY[i], 1e-12));
        }
        assert!(invert(&[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 0.0, 1.0]]).is_none());
    }
}
