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

/// A boolean mask on a grid, stored like `Volume` (x-fastest).
pub type Mask = Vec<bool>;

/// Number of voxels of a grid.
pub fn voxel_count(dims: [usize; 3]) -> usize {
    dims[0] * dims[1] * dims[2]
}
