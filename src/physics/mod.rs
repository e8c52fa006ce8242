//! Physics conventions, written down once and tested: the FFT layout, the dipole kernel and
//! forward model, the SMV and Laplacian kernels, units, and the B0 direction from the affine.

pub mod b0;
pub mod dipole;
pub mod fft;
pub mod gradient;
pub mod kernels;
pub mod units;

pub use b0::{b0_direction, geometry_with_b0, tilt_degrees};
pub use dipole::{dipole_kernel, DipoleOperator};
pub use fft::{ComplexFft3, Fft3};
pub use units::GAMMA_BAR_HZ_PER_T;
