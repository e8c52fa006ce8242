//! Voxel-to-world transforms as NIfTI-1 stores them: the sform rows, and the qform
//! (unit quaternion, qfac, pixdim, offset).

/// A 3×3 matrix, rows.
pub(crate) type Mat3 = [[f64; 3]; 3];

pub(crate) fn det3(m: &Mat3) -> f64 {
    m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
        - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
        + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
}

/// The rotation of the unit quaternion (a, b, c, d) whose a ≥ 0 is implied by b, c, d.
pub(crate) fn quaternion_to_rotation(b: f64, c: f64, d: f64) -> Mat3 {
    let s = b * b + c * c + d * d;
    // Stored b, c, d are f32, so |(b,c,d)| can exceed 1 by rounding: treat it as a = 0.
    let (a, b, c, d) = if s >= 1.0 {
        let n = s.sqrt();
        (0.0, b / n, c / n, d / n)
    } else {
        ((1.0 - s).sqrt(), b, c, d)
    };
    [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a + c * c - b * b - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a + d * d - b * b - c * c,
        ],
    ]
}

/// The (b, c, d) of the quaternion of a proper rotation `r` (det +1), with a ≥ 0.
pub(crate) fn rotation_to_quaternion(r: &Mat3) -> [f64; 3] {
    let trace = r[0][0] + r[1][1] + r[2][2];
    // Pick the branch with the largest divisor so the division stays well conditioned.
    let (a, b, c, d) = if trace > 0.0 {
        let s = 2.0 * (1.0 + trace).sqrt(); // 4a
        (
            s / 4.0,
            (r[2][1] - r[1][2]) / s,
            (r[0][2] - r[2][0]) / s,
            (r[1][0] - r[0][1]) / s,
        )
    } else if r[0][0] >= r[1][1] && r[0][0] >= r[2][2] {
        let s = 2.0 * (1.0 + r[0][0] - r[1][1] - r[2][2]).max(0.0).sqrt(); // 4b
        (
            (r[2][1] - r[1][2]) / s,
            s / 4.0,
            (r[0][1] + r[1][0]) / s,
            (r[0][2] + r[2][0]) / s,
        )
    } else if r[1][1] >= r[2][2] {
        let s = 2.0 * (1.0 + r[1][1] - r[0][0] - r[2][2]).max(0.0).sqrt(); // 4c
        (
            (r[0][2] - r[2][0]) / s,
            (r[0][1] + r[1][0]) / s,
            s / 4.0,
            (r[1][2] + r[2][1]) / s,
        )
    } else {
        let s = 2.0 * (1.0 + r[2][2] - r[0][0] - r[1][1]).max(0.0).sqrt(); // 4d
        (
            (r[1][0] - r[0][1]) / s,
            (r[0][2] + r[2][0]) / s,
            (r[1][2] + r[2][1]) / s,
            s / 4.0,
        )
    };
    let n = (a * a + b * b + c * c + d * d).sqrt();
    let sign = if a < 0.0 { -1.0 } else { 1.0 };
    [sign * b / n, sign * c / n, sign * d / n]
}

/// The qform affine (NIfTI method 2): R · diag(dx, dy, qfac·dz), then the offset.
pub(crate) fn qform_affine(
    quat: [f64; 3],
    qfac: f64,
    pixdim: [f64; 3],
    offset: [f64; 3],
) -> [[f64; 4]; 4] {
    let r = quaternion_to_rotation(quat[0], quat[1], quat[2]);
    let scale = [pixdim[0], pixdim[1], qfac * pixdim[2]];
    let mut aff = [[0.0; 4]; 4];
    for row in 0..3 {
        for col in 0..3 {
            aff[row][col] = r[row][col] * scale[col];
        }
        aff[row][3] = offset[row];
    }
    aff[3][3] = 1.0;
    aff
}

/// The qform parameters (quaternion b, c, d; qfac; pixdim; offset) of an affine whose 3×3
/// part is a rotation (or a reflection) times a positive diagonal; `None` when it is sheared
/// or degenerate, since a quaternion cannot express that.
pub(crate) struct QformParams {
    pub quat: [f64; 3],
    pub qfac: f64,
    pub pixdim: [f64; 3],
    pub offset: [f64; 3],
}

pub(crate) fn affine_to_qform(aff: &[[f64; 4]; 4]) -> Option<QformParams> {
    let mut pixdim = [0.0; 3];
    for (c, p) in pixdim.iter_mut().enumerate() {
        *p = (0..3).map(|r| aff[r][c] * aff[r][c]).sum::<f64>().sqrt();
        if !(p.is_finite() && *p > 0.0) {
            return None;
        }
    }
    let mut r: Mat3 = [[0.0; 3]; 3];
    for row in 0..3 {
        for col in 0..3 {
            r[row][col] = aff[row][col] / pixdim[col];
        }
    }
    let qfac = if det3(&r) < 0.0 {
        // A reflection: the quaternion holds the rotation, qfac flips the third axis.
        for row in &mut r {
            row[2] = -row[2];
        }
        -1.0
    } else {
        1.0
    };
    // Columns must be orthonormal; f32 round-off in stored affines is far below this.
    for i in 0..3 {
        for j in 0..3 {
            let dot: f64 = (0..3).map(|k| r[k][i] * r[k][j]).sum();
            let want = if i == j { 1.0 } else { 0.0 };
            if (dot - want).abs() > 1e-4 {
                return None;
            }
        }
    }
    Some(QformParams {
        quat: rotation_to_quaternion(&r),
        qfac,
        pixdim,
        offset: [aff[0][3], aff[1][3], aff[2][3]],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rot_x(t: f64) -> Mat3 {
        [
            [1.0, 0.0, 0.0],
            [0.0, t.cos(), -t.sin()],
            [0.0, t.sin(), t.cos()],
        ]
    }
    fn rot_z(t: f64) -> Mat3 {
        [
            [t.cos(), -t.sin(), 0.0],
            [t.sin(), t.cos(), 0.0],
            [0.0, 0.0, 1.0],
        ]
    }
    fn mul(a: &Mat3, b: &Mat3) -> Mat3 {
        let mut m = [[0.0; 3]; 3];
        for i in 0..3 {
            for j in 0..3 {
                m[i][j] = (0..3).map(|k| a[i][k] * b[k][j]).sum();
            }
        }
        m
    }

    #[test]
    fn quaternion_round_trip_covers_every_branch() {
        // Identity (trace branch), 180° about x/y/z (the three diagonal branches), and oblique.
        let y180 = [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]];
        let cases = [
            rot_x(0.0),
            rot_x(std::f64::consts::PI),
            y180,
            rot_z(std::f64::consts::PI),
            mul(&rot_z(0.7), &rot_x(-0.3)),
            mul(&rot_x(2.9), &rot_z(2.5)),
        ];
        for r in &cases {
            let q = rotation_to_quaternion(r);
            let back = quaternion_to_rotation(q[0], q[1], q[2]);
            for i in 0..3 {
                for j in 0..3 {
                    assert!(
                        (back[i][j] - r[i][j]).abs() < 1e-12,
                        "{r:?} -> {q:?} -> {back:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn sheared_affine_has_no_qform_and_reflection_sets_qfac() {
        let sheared = [
            [1.0, 0.5, 0.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        assert!(affine_to_qform(&sheared).is_none());
        let flipped = [
            [-2.0, 0.0, 0.0, 5.0],
            [0.0, 1.0, 0.0, 6.0],
            [0.0, 0.0, 3.0, 7.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let q = affine_to_qform(&flipped).expect("a reflection is representable");
        assert_eq!(q.qfac, -1.0);
        assert_eq!(q.pixdim, [2.0, 1.0, 3.0]);
        let back = qform_affine(q.quat, q.qfac, q.pixdim, q.offset);
        for i in 0..4 {
            for j in 0..4 {
                assert!((back[i][j] - flipped[i][j]).abs() < 1e-12, "{back:?}");
            }
        }
    }
}
