//! NIfTI reading and writing.
//!
//! Reading accepts `.nii` and `.nii.gz`, any on-disk data type, 3D or 4D (echoes along t),
//! applies `scl_slope`/`scl_inter` (a slope of 0 or NaN means "no scaling", as nibabel
//! writes by default) and takes the geometry from the sform when valid, else the qform.
//! Writing produces float32 (or int16 for scanner-style data) with the source geometry,
//! atomically: a temporary name in the same folder, then a rename.

mod json;
mod nifti_io;
pub mod partial;
mod xform;

pub use json::{read_json, write_atomic, write_json};
pub use nifti_io::{read_header, read_image, write_volume, write_volume_i16, Header, Image};
