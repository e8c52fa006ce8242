//! CONTRACT STUB: to be implemented (see io/mod.rs for the behaviour).
use std::path::Path;

use crate::{Geometry, Result, Volume};

/// What a NIfTI header says about the grid, without reading voxels.
#[derive(Clone, Debug)]
pub struct Header {
    /// Spatial dims and, for 4D files, the number of frames (1 for 3D files).
    pub dims: [usize; 3],
    pub frames: usize,
    pub geometry: Geometry,
    /// The on-disk data type is an integer type (before scaling).
    pub integer_type: bool,
}

/// A whole image: one or more 3D frames on one grid, values scaled to f32.
#[derive(Clone, Debug)]
pub struct Image {
    pub header: Header,
    /// One `Volume` per frame (a 3D file gives one).
    pub frames: Vec<Volume>,
}

pub fn read_header(path: &Path) -> Result<Header> {
    let _ = path;
    unimplemented!("io::read_header")
}

pub fn read_image(path: &Path) -> Result<Image> {
    let _ = path;
    unimplemented!("io::read_image")
}

/// Writes `vol` as float32 with its geometry (sform and qform), atomically.
pub fn write_volume(path: &Path, vol: &Volume) -> Result<()> {
    let _ = (path, vol);
    unimplemented!("io::write_volume")
}

/// Writes `frames` (one or more volumes on one grid) rounded to int16, atomically; a 4D file
/// when there are several frames.
pub fn write_volume_i16(path: &Path, frames: &[&Volume]) -> Result<()> {
    let _ = (path, frames);
    unimplemented!("io::write_volume_i16")
}
