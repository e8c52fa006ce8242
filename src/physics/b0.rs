//! B0 direction in the voxel frame, from the affine.
//!
//! The affine maps voxel indices to scanner coordinates (mm), whose z axis is B0 for data
//! converted from DICOM. The component of B0 along voxel axis `a` is the z component of
//! that axis's unit vector: `b_a = A[2][a] / |A[·][a]|`. A tilted head shows up as a tilted
//! affine, so every stage that uses the dipole kernel reads the direction from here.

use crate::Geometry;

/// Unit B0 direction in the voxel frame.
pub fn b0_direction(geometry: &Geometry) -> [f64; 3] {
    let a = &geometry.affine;
    let mut b = [0.0; 3];
    for (axis, v) in b.iter_mut().enumerate() {
        let norm = (0..3).map(|r| a[r][axis] * a[r][axis]).sum::<f64>().sqrt();
        *v = if norm > 0.0 { a[2][axis] / norm } else { 0.0 };
    }
    let n = b.iter().map(|v| v * v).sum::<f64>().sqrt();
    if n > 0.0 && n.is_finite() {
        b.map(|v| v / n)
    } else {
        [0.0, 0.0, 1.0]
    }
}

/// Angle in degrees between the B0 direction and the nearest voxel axis.
pub fn tilt_degrees(b0: [f64; 3]) -> f64 {
    let m = b0.iter().fold(0.0f64, |m, v| m.max(v.abs())).min(1.0);
    m.acos().to_degrees()
}

/// A geometry for `dims` with `voxel_size` whose B0 direction (in the voxel frame) is `b0`:
/// the voxel axes are rotated in the scanner so that scanner z has components `b0` along
/// them. The grid's centre sits at the scanner origin.
pub fn geometry_with_b0(dims: [usize; 3], voxel_size: [f64; 3], b0: [f64; 3]) -> Geometry {
    let r = rotation_with_last_row(b0);
    let mut affine = [[0.0; 4]; 4];
    for row in 0..3 {
        for col in 0..3 {
            affine[row][col] = r[row][col] * voxel_size[col];
        }
    }
    for row in 0..3 {
        affine[row][3] = -(0..3)
            .map(|c| affine[row][c] * (dims[c] as f64 - 1.0) / 2.0)
            .sum::<f64>();
    }
    affine[3][3] = 1.0;
    Geometry { affine, voxel_size }
}

/// A proper rotation matrix whose third row is the unit vector `b`: the rotation closest
/// to the identity that does so (Rodrigues' rotation taking `b` to z).
pub fn rotation_with_last_row(b: [f64; 3]) -> [[f64; 3]; 3] {
    let n: f64 = (b[0] * b[0] + b[1] * b[1] + b[2] * b[2]).sqrt();
    let b = if n > 0.0 {
        b.map(|v| v / n)
    } else {
        [0.0, 0.0, 1.0]
    };
    let z = [0.0, 0.0, 1.0];
    // R maps b to z; then row 2 of R is b (since R b = z ⇒ z·R b = 1 ⇒ row2 · b = 1).
    let c = b[2];
    let v = [
        b[1] * z[2] - b[2] * z[1],
        b[2] * z[0] - b[0] * z[2],
        b[0] * z[1] - b[1] * z[0],
    ];
    let s2 = v[0] * v[0] + v[1] * v[1] + v[2] * v[2];
    let mut r = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    if s2 < 1e-24 {
        if c < 0.0 {
            // b = −z: a half turn about x.
            r = [[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]];
        }
        return r;
    }
    let vx = [[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]];
    let f = (1.0 - c) / s2;
    for i in 0..3 {
        for j in 0..3 {
            let vx2: f64 = (0..3).map(|m| vx[i][m] * vx[m][j]).sum();
            r[i][j] += vx[i][j] + f * vx2;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: [f64; 3], b: [f64; 3]) -> bool {
        a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-9)
    }

    #[test]
    fn axis_aligned_affine_gives_z() {
        let g = Geometry::from_voxel_size([0.5, 0.5, 2.0]);
        assert!(close(b0_direction(&g), [0.0, 0.0, 1.0]));
        assert!(tilt_degrees([0.0, 0.0, 1.0]).abs() < 1e-9);
    }

    #[test]
    fn sagittal_slices_put_b0_on_the_second_axis() {
        // Voxel axes: i → scanner y, j → scanner z, k → scanner x (a sagittal stack).
        let mut a = [[0.0; 4]; 4];
        a[1][0] = 1.0;
        a[2][1] = 0.8;
        a[0][2] = 3.0;
        a[3][3] = 1.0;
        let g = Geometry::from_affine(a);
        assert!(close(b0_direction(&g), [0.0, 1.0, 0.0]));
    }

    #[test]
    fn geometry_with_b0_round_trips_any_direction() {
        for b in [
            [0.0, 0.0, 1.0],
            [0.2588, 0.0, 0.9659],
            [-0.1413, 0.1058, 0.9843],
            [0.0, 0.0, -1.0],
            [1.0, 0.0, 0.0],
        ] {
            let n = f64::sqrt(b[0] * b[0] + b[1] * b[1] + b[2] * b[2]);
            let b = [b[0] / n, b[1] / n, b[2] / n];
            let g = geometry_with_b0([10, 12, 8], [1.0, 1.5, 2.0], b);
            assert!(
                close(b0_direction(&g), b),
                "{b:?} -> {:?}",
                b0_direction(&g)
            );
            assert!(close(
                g.voxel_size,
                Geometry::from_affine(g.affine).voxel_size
            ));
        }
        let t = tilt_degrees([0.2588, 0.0, 0.9659]);
        assert!((t - 15.0).abs() < 0.01, "{t}");
    }
}
