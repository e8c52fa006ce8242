//! The in-memory image type shared by every stage.
//!
//! Voxels are stored x-fastest (NIfTI/Fortran order): index = i + nx·(j + ny·k). This is the
//! order NIfTI files use on disk, so reading and writing need no transposition, and the
//! contiguous x-lines are where the real-to-complex FFT runs.

/// Where the voxel grid sits in the scanner: the voxel-to-world affine (mm), rows of a 4×4.
#[derive(Clone, Debug, PartialEq)]
pub struct Geometry {
    pub affine: [[f64; 4]; 4],
    /// Voxel size in mm along the three voxel axes (the column norms of the affine).
    pub voxel_size: [f64; 3],
}

impl Geometry {
    /// An axis-aligned grid with the given voxel size and the origin at voxel (0,0,0).
    pub fn from_voxel_size(voxel_size: [f64; 3]) -> Self {
        let mut affine = [[0.0; 4]; 4];
        for (a, (row, &v)) in affine.iter_mut().zip(voxel_size.iter()).enumerate() {
            row[a] = v;
        }
        affine[3][3] = 1.0;
        Geometry { affine, voxel_size }
    }

    /// Builds a geometry from an affine, deriving the voxel size from its column norms.
    pub fn from_affine(affine: [[f64; 4]; 4]) -> Self {
        let mut voxel_size = [0.0; 3];
        for (c, v) in voxel_size.iter_mut().enumerate() {
            *v = (0..3)
                .map(|r| affine[r][c] * affine[r][c])
                .sum::<f64>()
                .sqrt();
        }
        Geometry { affine, voxel_size }
    }
}

/// A 3D volume of `f32` with its geometry.
#[derive(Clone, Debug)]
pub struct Volume {
    pub dims: [usize; 3],
    pub data: Vec<f32>,
    pub geometry: Geometry,
}

impl Volume {
    pub fn new(dims: [usize; 3], data: Vec<f32>, geometry: Geometry) -> Self {
        assert_eq!(
            data.len(),
            dims[0] * dims[1] * dims[2],
            "volume data does not match dims"
        );
        Volume {
            dims,
            data,
            geometry,
        }
    }

    pub fn zeros(dims: [usize; 3], geometry: Geometry) -> Self {
        Volume::new(dims, vec![0.0; dims[0] * dims[1] * dims[2]], geometry)
    }

    /// A volume on the same grid holding other data.
    pub fn with_data(&self, data: Vec<f32>) -> Self {
        Volume::new(self.dims, data, self.geometry.clone())
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    #[inline]
    pub fn index(&self, i: usize, j: usize, k: usize) -> usize {
        i + self.dims[0] * (j + self.dims[1] * k)
    }

    #[inline]
    pub fn at(&self, i: usize, j: usize, k: usize) -> f32 {
        self.data[self.index(i, j, k)]
    }
}

impl Volume {
    /// This volume zero-padded at the high end of each axis to `dims` (voxel (0,0,0) and
    /// the affine stay where they are).
    pub fn padded(&self, dims: [usize; 3]) -> Volume {
        Volume::new(
            dims,
            pad(&self.data, self.dims, dims, 0.0),
            self.geometry.clone(),
        )
    }

    /// The first `dims` voxels along each axis: the inverse of `padded`.
    pub fn cropped(&self, dims: [usize; 3]) -> Volume {
        Volume::new(
            dims,
            crop(&self.data, self.dims, dims),
            self.geometry.clone(),
        )
    }
}

/// Copies `data` (grid `from`) into a grid `to` ≥ `from`, filling the rest with `fill`.
pub fn pad<T: Copy>(data: &[T], from: [usize; 3], to: [usize; 3], fill: T) -> Vec<T> {
    assert!(
        from.iter().zip(&to).all(|(f, t)| f <= t),
        "pad target is smaller than the source"
    );
    let mut out = vec![fill; to[0] * to[1] * to[2]];
    for k in 0..from[2] {
        for j in 0..from[1] {
            let src = from[0] * (j + from[1] * k);
            let dst = to[0] * (j + to[1] * k);
            out[dst..dst + from[0]].copy_from_slice(&data[src..src + from[0]]);
        }
    }
    out
}

/// The first `to` voxels along each axis of `data` (grid `from`).
pub fn crop<T: Copy>(data: &[T], from: [usize; 3], to: [usize; 3]) -> Vec<T> {
    crop_at(data, from, [0; 3], to)
}

/// The `to`-sized block of `data` (grid `from`) whose first voxel is `origin`.
pub fn crop_at<T: Copy>(
    data: &[T],
    from: [usize; 3],
    origin: [usize; 3],
    to: [usize; 3],
) -> Vec<T> {
    assert!(
        (0..3).all(|a| origin[a] + to[a] <= from[a]),
        "crop block reaches beyond the source"
    );
    let mut out = Vec::with_capacity(to[0] * to[1] * to[2]);
    for k in 0..to[2] {
        for j in 0..to[1] {
            let src = origin[0] + from[0] * (origin[1] + j + from[1] * (origin[2] + k));
            out.extend_from_slice(&data[src..src + to[0]]);
        }
    }
    out
}

/// A boolean mask on a grid, stored like `Volume` (x-fastest).
pub type Mask = Vec<bool>;

/// Number of voxels of a grid.
pub fn voxel_count(dims: [usize; 3]) -> usize {
    dims[0] * dims[1] * dims[2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pad_then_crop_is_identity_and_pads_with_fill() {
        let dims = [3, 2, 2];
        let v = Volume::new(
            dims,
            (0..12).map(|x| x as f32).collect(),
            Geometry::from_voxel_size([1.0; 3]),
        );
        let p = v.padded([4, 3, 2]);
        assert_eq!(p.at(2, 1, 1), v.at(2, 1, 1));
        assert_eq!(p.at(3, 0, 0), 0.0);
        assert_eq!(p.at(0, 2, 1), 0.0);
        assert_eq!(p.cropped(dims).data, v.data);
        let m = pad(&[true; 12], dims, [4, 3, 2], false);
        assert_eq!(m.iter().filter(|&&b| b).count(), 12);
    }

    #[test]
    fn crop_at_takes_the_block_at_its_origin() {
        let from = [5, 4, 3];
        let data: Vec<usize> = (0..60).collect();
        let (origin, to) = ([2, 1, 1], [3, 2, 2]);
        let block = crop_at(&data, from, origin, to);
        let mut want = vec![];
        for k in 0..to[2] {
            for j in 0..to[1] {
                for i in 0..to[0] {
                    let (x, y, z) = (origin[0] + i, origin[1] + j, origin[2] + k);
                    want.push(x + from[0] * (y + from[1] * z));
                }
            }
        }
        assert_eq!(block, want);
    }
}
