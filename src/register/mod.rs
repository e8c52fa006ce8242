//! Rigid registration of a multi-orientation set's members to one head frame.
//!
//! A subject who tilts the head is imaged on the scanner's usual axial grid each time: the
//! head turns inside the image while the affines stay nearly the same. Registering each
//! orientation's magnitude to the reference's finds the head rotation `R`; the orientation's
//! field, resampled onto the reference grid, was measured with B0 along its scanner z, which
//! in the reference's world is `Rᵀ·ẑ` (see [`b0_in_reference`]).
//!
//! Coordinates are world (scanner RAS, mm) throughout, so grids of any voxel size, shape or
//! affine register to each other; ITK files store the same transform in LPS ([`itk`]).
//! [`align`] drives the search coarse to fine with one of two similarities, `ncc` for one
//! contrast or `mi` for any; fields are then moved by cubic B-spline ([`bspline`]).

pub mod align;
pub mod bspline;
pub mod itk;
mod mi;
mod ncc;
pub mod pyramid;
pub mod resample;
pub mod rigid;

#[cfg(test)]
mod tests;

pub use align::{register, similarity, Options, Registration, Similarity};
pub use resample::{resample, resample_masked, resample_spline, Grid};
pub use rigid::Rigid;

use crate::Geometry;

/// The B0 direction of a moving image (scanner z of its own world) expressed in the voxel
/// frame of the reference grid, given the registration `t` (reference world → moving world).
///
/// A direction `d` in the reference's world is `R·d` in the moving world, so the moving
/// scanner's ẑ is `Rᵀ·ẑ` in the reference's world; its components along the reference's unit
/// voxel axes are then what the dipole kernel needs (as `physics::b0_direction` does for an
/// unregistered affine).
pub fn b0_in_reference(t: &Rigid, reference: &Geometry) -> [f64; 3] {
    let r = &t.rotation;
    let d = [r[2][0], r[2][1], r[2][2]];
    let a = &reference.affine;
    let mut b = [0.0; 3];
    for (axis, v) in b.iter_mut().enumerate() {
        let col = [a[0][axis], a[1][axis], a[2][axis]];
        let n = rigid::norm(col);
        *v = if n > 0.0 { rigid::dot(col, d) / n } else { 0.0 };
    }
    let n = rigid::norm(b);
    if n > 0.0 && n.is_finite() {
        b.map(|v| v / n)
    } else {
        [0.0, 0.0, 1.0]
    }
}
