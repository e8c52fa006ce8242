//! Susceptibility phantoms: a built-in procedural head, or one read from NIfTI files.
//!
//! A phantom holds everything the signal model needs per voxel: the total susceptibility
//! (brain plus skull, soft tissue and air, which together make the background field), the
//! brain-only susceptibility (the ground truth a QSM method should recover), the brain mask,
//! proton density, fat fraction and R2* at 3 T.
//!
//! Heads are realistic where it matters to brain extraction and background removal: scalp
//! (skin, subcutaneous fat, temporal muscle), skull with fatty marrow between its tables,
//! eyes in orbital fat, face and neck all give signal, fat with its chemical shift
//! ([`crate::physics::units::FAT_SHIFT_PPM`]); cortical bone and air give none. The brain mask
//! (the truth) is intracranial: parenchyma and the CSF around it, up to the dura.

use std::path::Path;

use rayon::prelude::*;

use super::rng::Rng;
use crate::volume::voxel_count;
use crate::{Error, Geometry, Result, Volume};

/// A rigid head motion inside the grid: rotation `Q` about the grid centre, then a shift
/// (mm). The default leaves the head upright and centred.
#[derive(Clone, Debug, PartialEq)]
pub struct Pose {
    pub rotation: [[f64; 3]; 3],
    pub shift: [f64; 3],
}

impl Default for Pose {
    fn default() -> Self {
        Pose {
            rotation: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            shift: [0.0; 3],
        }
    }
}

impl Pose {
    /// Where grid point `p` lies in the upright head: `Qᵀ·(p − s)`.
    fn to_head(&self, p: [f64; 3]) -> [f64; 3] {
        let d = [
            p[0] - self.shift[0],
            p[1] - self.shift[1],
            p[2] - self.shift[2],
        ];
        let q = &self.rotation;
        [0, 1, 2].map(|c| q[0][c] * d[0] + q[1][c] * d[1] + q[2][c] * d[2])
    }
}

/// Susceptibilities (ppm, relative to water) of the non-brain compartments.
pub const CHI_BONE: f32 = -2.1;
pub const CHI_AIR: f32 = 9.2;

/// Everything the forward model needs, on one grid.
#[derive(Clone, Debug)]
pub struct Phantom {
    /// Susceptibility of everything (brain, CSF, skull −2.1, soft tissue 0, air 9.2), ppm.
    pub chi_total: Volume,
    /// Brain susceptibility, 0 outside the brain, ppm: the ground truth.
    pub chi_local: Volume,
    pub brain_mask: Vec<bool>,
    /// Proton density, 0..1.
    pub m0: Vec<f32>,
    /// R2* at 3 T, s⁻¹ (the simulator scales it with the field strength).
    pub r2star: Vec<f32>,
    /// Fraction of the proton density that is fat, 0..1 (its signal carries the chemical
    /// shift `FAT_SHIFT_PPM`).
    pub fat_fraction: Vec<f32>,
}

impl Phantom {
    pub fn dims(&self) -> [usize; 3] {
        self.chi_total.dims
    }

    pub fn geometry(&self) -> &Geometry {
        &self.chi_total.geometry
    }

    /// Puts every volume of the phantom on another geometry (same dims): the simulator's
    /// outputs inherit it.
    pub fn set_geometry(&mut self, geometry: Geometry) {
        self.chi_total.geometry = geometry.clone();
        self.chi_local.geometry = geometry;
    }

    /// This head turned by `q` about the grid centre inside the same field of view (tissue at
    /// grid point `p`, mm from the centre, is this head's at `qᵀ·p`): a head rotation as the
    /// scanner images it, for phantoms read from files, which cannot be re-evaluated
    /// analytically as [`Phantom::procedural_posed`] is. Sampled trilinearly on a grid
    /// `subvoxels` times finer per axis (the subvoxel grid of
    /// [`crate::simulate::simulate_series_fine`], coarse voxel `I` covering fine voxels
    /// `sI … sI + s − 1`), so the turned interfaces are not a staircase of the output grid.
    pub fn turned(&self, q: &crate::register::rigid::Mat3, subvoxels: usize) -> Result<Phantom> {
        use crate::register::{self, rigid, Grid, Rigid};
        let s = subvoxels.max(1);
        let dims = self.dims();
        let grid = Grid::new(dims, self.geometry())?;
        let centre = grid.to_world(dims.map(|n| (n as f64 - 1.0) / 2.0));
        let mut fine = self.geometry().clone();
        let first = grid.to_world([0.5 / s as f64 - 0.5; 3]);
        for (r, row) in fine.affine.iter_mut().take(3).enumerate() {
            (0..3).for_each(|c| row[c] /= s as f64);
            row[3] = first[r];
        }
        fine.voxel_size = fine.voxel_size.map(|v| v / s as f64);
        let fdims = dims.map(|n| n * s);
        let fgrid = Grid::new(fdims, &fine)?;
        let t = Rigid {
            rotation: rigid::transpose(q),
            ..Rigid::identity(centre)
        };
        let turn = |d: &[f32], fill: f32| register::resample(d, &grid, &fgrid, &t, fill);
        let mask: Vec<f32> = self.brain_mask.iter().map(|&b| b as u8 as f32).collect();
        Ok(Phantom {
            chi_total: Volume::new(fdims, turn(&self.chi_total.data, CHI_AIR), fine.clone()),
            chi_local: Volume::new(fdims, turn(&self.chi_local.data, 0.0), fine),
            brain_mask: turn(&mask, 0.0).iter().map(|&m| m >= 0.5).collect(),
            m0: turn(&self.m0, 0.0),
            r2star: turn(&self.r2star, 0.0),
            fat_fraction: turn(&self.fat_fraction, 0.0),
        })
    }

    /// A built-in head, deterministic from `seed` (different seeds give slightly different
    /// heads: size, nucleus positions and susceptibilities, texture). Voxel axes are
    /// x = left→right, y = posterior→anterior, z = inferior→superior; the head is scaled down
    /// (never up) to fit the field of view with a margin of air.
    pub fn procedural(dims: [usize; 3], voxel_size: [f64; 3], seed: u64) -> Result<Phantom> {
        Phantom::procedural_posed(dims, voxel_size, seed, &Pose::default())
    }

    /// The built-in head moved inside the grid by `pose` (as a subject tilts the head in the
    /// scanner): tissue at grid point `p` (mm from the grid centre) is that of the upright
    /// head at `Qᵀ·(p − s)`. Evaluated analytically, so no interpolation blurs it.
    pub fn procedural_posed(
        dims: [usize; 3],
        voxel_size: [f64; 3],
        seed: u64,
        pose: &Pose,
    ) -> Result<Phantom> {
        if dims.contains(&0) {
            return Err(Error::Usage(format!(
                "phantom dims must be positive, got {dims:?}"
            )));
        }
        if voxel_size.iter().any(|&v| !(v > 0.0 && v.is_finite())) {
            return Err(Error::Usage(format!(
                "voxel size must be positive, got {voxel_size:?}"
            )));
        }
        let head = Head::new(dims, voxel_size, seed);
        let n = voxel_count(dims);
        let mut chi_total = vec![0.0f32; n];
        let mut chi_local = vec![0.0f32; n];
        let mut mask = vec![false; n];
        let mut m0 = vec![0.0f32; n];
        let mut r2 = vec![0.0f32; n];
        let mut fat = vec![0.0f32; n];
        let slab = dims[0] * dims[1];
        chi_total
            .par_chunks_mut(slab)
            .zip(chi_local.par_chunks_mut(slab))
            .zip(mask.par_chunks_mut(slab))
            .zip(m0.par_chunks_mut(slab).zip(r2.par_chunks_mut(slab)))
            .zip(fat.par_chunks_mut(slab))
            .enumerate()
            .for_each(|(k, ((((ct, cl), mk), (m, r)), f))| {
                for j in 0..dims[1] {
                    for i in 0..dims[0] {
                        let p = [
                            (i as f64 - (dims[0] as f64 - 1.0) / 2.0) * voxel_size[0],
                            (j as f64 - (dims[1] as f64 - 1.0) / 2.0) * voxel_size[1],
                            (k as f64 - (dims[2] as f64 - 1.0) / 2.0) * voxel_size[2],
                        ];
                        let t = head.tissue(pose.to_head(p));
                        let v = i + dims[0] * j;
                        ct[v] = t.chi;
                        if t.brain {
                            cl[v] = t.chi;
                            mk[v] = true;
                        }
                        m[v] = t.m0;
                        r[v] = t.r2star;
                        f[v] = t.fat;
                    }
                }
            });
        let geometry = Geometry::from_voxel_size(voxel_size);
        Ok(Phantom {
            chi_total: Volume::new(dims, chi_total, geometry.clone()),
            chi_local: Volume::new(dims, chi_local, geometry),
            brain_mask: mask,
            m0,
            r2star: r2,
            fat_fraction: fat,
        })
    }

    /// Reads a phantom from NIfTI files (see [`Phantom::from_volumes`]); a mask file is
    /// taken as `value > 0.5`.
    pub fn from_nifti(
        chi_head: &Path,
        chi_brain: Option<&Path>,
        mask: Option<&Path>,
        seg: Option<&Path>,
    ) -> Result<Phantom> {
        let head = read_first(chi_head)?;
        let mut others = Vec::new();
        for p in [chi_brain, mask, seg] {
            others.push(match p {
                Some(p) => {
                    let v = read_first(p)?;
                    if v.dims != head.dims {
                        return Err(Error::input(
                            p,
                            format!(
                                "grid {:?} differs from the susceptibility map's {:?} ({}); \
                                 resample it onto the same grid",
                                v.dims,
                                head.dims,
                                chi_head.display()
                            ),
                        ));
                    }
                    Some(v)
                }
                None => None,
            });
        }
        let seg_v = others.pop().flatten();
        let mask_v = others.pop().flatten();
        let brain_v = others.pop().flatten();
        Phantom::from_volumes(head, brain_v, mask_v, seg_v)
    }

    /// Builds a phantom from a head susceptibility map (ppm) and optional brain-only
    /// susceptibility, brain mask and segmentation (labels of the QSM Challenge 2.0
    /// numbering: 1 caudate … 11 veins, 13 bone, 14 air, 15 soft tissue, 16 calcification,
    /// 17 microbleed), all on one grid.
    ///
    /// Brain mask: the mask when given, else the brain labels of `seg`, else the non-zero
    /// voxels of `chi_brain`. M0 and R2* come from `seg` when given, else from χ (air above
    /// 5 ppm, bone below −1 ppm, tissue otherwise). Non-finite values count as 0.
    pub fn from_volumes(
        chi_head: Volume,
        chi_brain: Option<Volume>,
        mask: Option<Volume>,
        seg: Option<Volume>,
    ) -> Result<Phantom> {
        let dims = chi_head.dims;
        let n = chi_head.len();
        for v in [&chi_brain, &mask, &seg].into_iter().flatten() {
            if v.dims != dims {
                return Err(Error::Usage(format!(
                    "phantom inputs are on different grids: {:?} and {:?}",
                    dims, v.dims
                )));
            }
        }
        let finite = |x: f32| if x.is_finite() { x } else { 0.0 };
        let chi_total: Vec<f32> = chi_head.data.iter().map(|&x| finite(x)).collect();
        let labels: Option<Vec<i32>> = seg.as_ref().map(|s| {
            s.data
                .iter()
                .map(|&x| if x.is_finite() { x.round() as i32 } else { 0 })
                .collect()
        });
        let brain_mask: Vec<bool> = if let Some(m) = &mask {
            m.data.iter().map(|&x| x > 0.5).collect()
        } else if let Some(l) = &labels {
            l.iter().map(|&l| is_brain_label(l)).collect()
        } else if let Some(b) = &chi_brain {
            b.data.iter().map(|&x| x.is_finite() && x != 0.0).collect()
        } else {
            return Err(Error::Usage(
                "a susceptibility map alone does not say where the brain is: give a brain \
                 mask, a segmentation or a brain-only susceptibility map as well"
                    .into(),
            ));
        };
        if !brain_mask.iter().any(|&b| b) {
            return Err(Error::Usage(
                "the brain mask of the phantom is empty".into(),
            ));
        }
        let chi_local: Vec<f32> = match &chi_brain {
            Some(b) => b
                .data
                .iter()
                .zip(&brain_mask)
                .map(|(&x, &m)| if m { finite(x) } else { 0.0 })
                .collect(),
            None => chi_total
                .iter()
                .zip(&brain_mask)
                .map(|(&x, &m)| if m { x } else { 0.0 })
                .collect(),
        };
        let geometry = chi_head.geometry.clone();
        let layers = labels
            .as_ref()
            .map(|l| HeadLayers::new(l, &brain_mask, dims, geometry.voxel_size));
        let mut m0 = vec![0.0f32; n];
        let mut r2 = vec![0.0f32; n];
        let mut fat = vec![0.0f32; n];
        for v in 0..n {
            let by_label = match (&labels, &layers) {
                (Some(l), Some(layers)) => layers.tissue(l[v], v),
                _ => None,
            };
            let t = by_label.unwrap_or_else(|| chi_relaxation(chi_total[v], brain_mask[v]));
            m0[v] = t.m0;
            r2[v] = t.r2star;
            fat[v] = t.fat;
        }
        Ok(Phantom {
            chi_total: Volume::new(dims, chi_total, geometry.clone()),
            chi_local: Volume::new(dims, chi_local, geometry),
            brain_mask,
            m0,
            r2star: r2,
            fat_fraction: fat,
        })
    }
}

fn read_first(path: &Path) -> Result<Volume> {
    let img = crate::io::read_image(path)?;
    if img.frames.len() != 1 {
        return Err(Error::input(
            path,
            format!("expected a 3D image, found {} frames", img.frames.len()),
        ));
    }
    Ok(img.frames.into_iter().next().expect("one frame"))
}

/// Labels inside the brain in the QSM Challenge 2.0 numbering.
fn is_brain_label(l: i32) -> bool {
    (1..=11).contains(&l) || l == 16 || l == 17
}

/// Where each non-brain voxel of a segmented head sits: the soft tissue and bone labels
/// say nothing about skin, fat, muscle, dura or marrow, so depth decides.
struct HeadLayers {
    /// Distance (mm) to the air around the head (air pockets inside, the sinuses, excluded).
    depth: Vec<f32>,
    /// Distance (mm) to the brain.
    to_brain: Vec<f32>,
    /// Distance (mm) from a bone voxel to the nearest voxel that is not bone.
    in_bone: Vec<f32>,
}

impl HeadLayers {
    fn new(labels: &[i32], brain: &[bool], dims: [usize; 3], voxel_size: [f64; 3]) -> Self {
        use crate::preprocess::mask::{fill_holes, squared_distance_to};
        let not_air: Vec<bool> = labels.iter().map(|&l| l != 14).collect();
        let inside = fill_holes(&not_air, dims);
        let outside: Vec<bool> = inside.iter().map(|&i| !i).collect();
        let not_bone: Vec<bool> = labels.iter().map(|&l| l != 13).collect();
        let dist = |set: &[bool]| -> Vec<f32> {
            squared_distance_to(set, dims, voxel_size, false)
                .into_iter()
                .map(f32::sqrt)
                .collect()
        };
        HeadLayers {
            depth: dist(&outside),
            to_brain: dist(brain),
            in_bone: dist(&not_bone),
        }
    }

    /// The tissue of voxel `v` with label `l`; `None` for labels without a known tissue.
    fn tissue(&self, l: i32, v: usize) -> Option<Tissue> {
        Some(match l {
            // Soft tissue nearer the brain than the air is meninges (dura: short T2*);
            // outside the skull, skin over subcutaneous fat over muscle.
            15 if self.to_brain[v] < self.depth[v] => Tissue::DURA,
            15 if self.depth[v] <= SKIN_MM => Tissue::SKIN,
            15 if self.depth[v] <= SKIN_MM + FAT_MM => Tissue::FAT,
            15 => Tissue::MUSCLE,
            // Cancellous bone between the tables holds fatty marrow.
            13 if self.in_bone[v] > TABLE_MM => Tissue::MARROW,
            // Only M0, R2* and the fat fraction are read from here: χ comes from the map.
            _ => {
                let (m0, r2star) = label_relaxation(l)?;
                Tissue::soft(m0, r2star)
            }
        })
    }
}

/// Layer thicknesses (mm) of the realistic head: skin, subcutaneous fat, each skull table.
const SKIN_MM: f32 = 1.5;
const FAT_MM: f32 = 3.0;
const TABLE_MM: f32 = 1.5;

/// (M0, R2* at 3 T) of a segmentation label; `None` for labels without a known tissue.
fn label_relaxation(l: i32) -> Option<(f32, f32)> {
    // Iron-rich nuclei relax faster; the values follow typical 3 T literature ranges.
    Some(match l {
        1 => (0.85, 26.0),   // caudate
        2 => (0.80, 40.0),   // globus pallidus
        3 => (0.85, 28.0),   // putamen
        4 => (0.80, 36.0),   // red nucleus
        5 => (0.80, 38.0),   // dentate
        6 => (0.80, 38.0),   // substantia nigra
        7 => (0.85, 22.0),   // thalamus
        8 => (0.75, 21.0),   // white matter
        9 => (0.90, 16.0),   // grey matter
        10 => (1.00, 4.0),   // CSF
        11 => (0.70, 50.0),  // veins: deoxygenated blood
        13 => (0.05, 300.0), // cortical bone
        14 => (0.0, 0.0),    // air
        15 => (0.70, 30.0),  // soft tissue
        16 => (0.03, 300.0), // calcification
        17 => (0.20, 250.0), // microbleed
        _ => return None,
    })
}

/// The tissue guessed from χ alone (no segmentation).
fn chi_relaxation(chi: f32, brain: bool) -> Tissue {
    let (m0, r2star) = if chi > 5.0 {
        (0.0, 0.0)
    } else if chi < -1.0 {
        (0.05, 300.0)
    } else if brain {
        (0.85, iron_r2star(chi))
    } else {
        (0.70, 30.0)
    };
    Tissue {
        chi,
        m0,
        r2star,
        fat: 0.0,
        brain,
    }
}

/// R2* (3 T) of grey matter rising with its (iron-driven) susceptibility.
fn iron_r2star(chi: f32) -> f32 {
    16.0 + 130.0 * chi.clamp(0.0, 0.2)
}

struct Tissue {
    chi: f32,
    m0: f32,
    r2star: f32,
    /// Fat fraction of the proton density.
    fat: f32,
    brain: bool,
}

impl Tissue {
    /// Outside tissue without fat (χ 0: water-like).
    const fn soft(m0: f32, r2star: f32) -> Tissue {
        Tissue {
            chi: 0.0,
            m0,
            r2star,
            fat: 0.0,
            brain: false,
        }
    }
    const AIR: Tissue = Tissue {
        chi: CHI_AIR,
        ..Tissue::soft(0.0, 0.0)
    };
    // T2* at 3 T: skin ≈ 25 ms, muscle ≈ 28 ms, subcutaneous fat ≈ 20 ms (its several
    // peaks dephase), vitreous humour long.
    const SKIN: Tissue = Tissue::soft(0.7, 40.0);
    const MUSCLE: Tissue = Tissue::soft(0.6, 35.0);
    const FAT: Tissue = Tissue {
        fat: 0.9,
        ..Tissue::soft(0.95, 50.0)
    };
    const VITREOUS: Tissue = Tissue::soft(1.0, 5.0);
    /// Dura and arachnoid: collagen with short T2*.
    const DURA: Tissue = Tissue::soft(0.25, 80.0);
    const BONE: Tissue = Tissue {
        chi: CHI_BONE,
        ..Tissue::soft(0.05, 300.0)
    };
    /// Fatty marrow in trabecular bone: the bone's field gradients shorten T2* (≈ 8 ms).
    const MARROW: Tissue = Tissue {
        chi: CHI_BONE,
        fat: 0.8,
        ..Tissue::soft(0.45, 120.0)
    };
    fn brain(chi: f32, m0: f32, r2star: f32) -> Tissue {
        Tissue {
            chi,
            m0,
            r2star,
            fat: 0.0,
            brain: true,
        }
    }
}

#[derive(Clone, Copy)]
struct Ellipsoid {
    c: [f64; 3],
    r: [f64; 3],
}

impl Ellipsoid {
    /// Squared normalised radius: < 1 inside.
    fn rho2(&self, p: [f64; 3]) -> f64 {
        (0..3)
            .map(|a| ((p[a] - self.c[a]) / self.r[a]).powi(2))
            .sum()
    }
    fn contains(&self, p: [f64; 3]) -> bool {
        self.rho2(p) < 1.0
    }
    fn grown(&self, d: f64) -> Ellipsoid {
        Ellipsoid {
            c: self.c,
            r: self.r.map(|r| r + d),
        }
    }
}

/// A cylinder of radius `r` around the segment a–b.
struct Tube {
    a: [f64; 3],
    b: [f64; 3],
    r: f64,
}

impl Tube {
    fn contains(&self, p: [f64; 3]) -> bool {
        let ab: Vec<f64> = (0..3).map(|i| self.b[i] - self.a[i]).collect();
        let ap: Vec<f64> = (0..3).map(|i| p[i] - self.a[i]).collect();
        let len2: f64 = ab.iter().map(|v| v * v).sum();
        let t = (ap.iter().zip(&ab).map(|(x, y)| x * y).sum::<f64>() / len2).clamp(0.0, 1.0);
        let d2: f64 = (0..3).map(|i| (ap[i] - t * ab[i]).powi(2)).sum();
        d2 < self.r * self.r
    }
}

/// A deep grey nucleus: a pair of ellipsoids mirrored across the midline.
struct Nucleus {
    shapes: [Ellipsoid; 2],
    chi: f32,
    m0: f32,
}

/// The procedural head in mm, centred on the grid. The compartments are nested ellipsoids
/// grown from the brain's: CSF, the skull's inner table, marrow, outer table, then the
/// scalp's muscle, fat and skin.
struct Head {
    brain: Ellipsoid,
    csf: Ellipsoid,
    /// Inner surfaces of the marrow and of the outer table.
    marrow: Ellipsoid,
    outer_table: Ellipsoid,
    skull: Ellipsoid,
    /// Inner surfaces of the subcutaneous fat and of the skin.
    fat: Ellipsoid,
    skin: Ellipsoid,
    scalp: Ellipsoid,
    /// Temporal muscles (left, right): replace the fat over the temples.
    temporalis: [Ellipsoid; 2],
    /// Face below the forehead (soft tissue outside the scalp), eyes and their orbital fat.
    face: Ellipsoid,
    eyes: [Ellipsoid; 2],
    orbits: [Ellipsoid; 2],
    /// Neck: an elliptic cylinder below the head centre (x, y semi-axes, centre y, top z).
    neck: ([f64; 2], f64, f64),
    sinuses: Vec<Ellipsoid>,
    ventricles: Vec<Ellipsoid>,
    nuclei: Vec<Nucleus>,
    veins: Vec<Tube>,
    calcification: Ellipsoid,
    chi_wm: f32,
    chi_gm: f32,
    /// Cortical folding: (wave vector, phase) of the GM/WM boundary ripple.
    folds: Vec<([f64; 3], f64)>,
    /// Smooth χ texture: (wave vector, phase, amplitude).
    texture: Vec<([f64; 3], f64, f32)>,
}

impl Head {
    fn new(dims: [usize; 3], voxel: [f64; 3], seed: u64) -> Head {
        let mut rng = Rng::derived(seed, &[0x4865_6164]);
        // Canonical sizes (mm): brain semi-axes, then CSF, skull and scalp as offsets.
        let brain_r = [64.0, 80.0, 52.0];
        let brain_cz = 4.0;
        let (csf_d, skull_d, scalp_d) = (3.0, 10.0, 15.0);
        // Fit the head into 90% of the field of view (the top of the scalp and its sides).
        let half_fov: Vec<f64> = (0..3).map(|a| dims[a] as f64 * voxel[a] / 2.0).collect();
        let need = [
            brain_r[0] + scalp_d,
            // The face reaches 24 mm in front of the brain.
            brain_r[1] + 24.0,
            brain_r[2] + scalp_d + brain_cz,
        ];
        let fit = (0..3)
            .map(|a| 0.9 * half_fov[a] / need[a])
            .fold(1.0f64, f64::min);
        // Per-subject variation of the head's size along each axis.
        let s: Vec<f64> = (0..3).map(|_| fit * rng.range(0.96, 1.0)).collect();
        let sc = |p: [f64; 3]| [p[0] * s[0], p[1] * s[1], p[2] * s[2]];
        let mean_s = (s[0] + s[1] + s[2]) / 3.0;
        let at = |c: [f64; 3], r: [f64; 3]| Ellipsoid { c: sc(c), r: sc(r) };

        let brain = at([0.0, 0.0, brain_cz], brain_r);
        let grown = |d: f64| brain.grown(d * mean_s);
        let csf = grown(csf_d);
        let skull = grown(skull_d);
        let scalp = grown(scalp_d);
        // Skull 7 mm: 2 mm tables around 3 mm of marrow. Scalp 5 mm: 1.5 mm skin over
        // 2.5 mm fat over 1 mm of galea and muscle.
        let (marrow, outer_table) = (grown(csf_d + 2.0), grown(skull_d - 2.0));
        let (fat, skin) = (grown(skull_d + 1.0), grown(scalp_d - 1.5));
        let temporalis = [-1.0, 1.0].map(|side| at([side * 62.0, 5.0, 5.0], [22.0, 40.0, 35.0]));
        let face = at([0.0, 62.0, brain_cz - 42.0], [58.0, 42.0, 34.0]);
        let eyes = [-1.0, 1.0].map(|side| at([side * 32.0, 88.0, brain_cz - 32.0], [12.0; 3]));
        let orbits = eyes.map(|e| e.grown(3.5 * mean_s));
        let neck = (
            [0.55 * scalp.r[0], 0.5 * scalp.r[1]],
            -0.15 * scalp.r[1],
            brain.c[2] - 0.3 * brain.r[2],
        );
        let sinuses = vec![
            // Frontal sinus: in the bone in front of the lower frontal lobe.
            at([0.0, 80.0 + 7.0, brain_cz - 18.0], [13.0, 5.0, 9.0]),
            // Sphenoid sinus: under the front of the brain.
            at([0.0, 28.0, brain_cz - 52.0 - 7.0], [11.0, 10.0, 7.0]),
        ];
        let ventricles = vec![
            at([-9.0, 5.0, 12.0], [4.5, 22.0, 8.0]),
            at([9.0, 5.0, 12.0], [4.5, 22.0, 8.0]),
            at([0.0, -2.0, 0.0], [1.5, 10.0, 7.0]),
        ];
        let mut jitter = |c: [f64; 3], r: [f64; 3], chi: f32, m0: f32| {
            let d = [
                rng.range(-1.5, 1.5),
                rng.range(-1.5, 1.5),
                rng.range(-1.5, 1.5),
            ];
            let chi = chi * rng.range(0.9, 1.1) as f32;
            let left = at([c[0] + d[0], c[1] + d[1], c[2] + d[2]], r);
            let right = at([-c[0] - d[0], c[1] + d[1], c[2] + d[2]], r);
            Nucleus {
                shapes: [left, right],
                chi,
                m0,
            }
        };
        let nuclei = vec![
            jitter([9.0, -12.0, 3.0], [7.0, 12.0, 7.0], 0.05, 0.85), // thalamus
            jitter([16.0, 18.0, 10.0], [4.0, 10.0, 7.0], 0.07, 0.85), // caudate
            jitter([26.0, 8.0, -2.0], [5.0, 14.0, 9.0], 0.06, 0.85), // putamen
            jitter([19.0, 4.0, -3.0], [3.5, 8.0, 5.0], 0.18, 0.80),  // globus pallidus
            jitter([5.0, -10.0, -14.0], [3.0, 3.0, 3.0], 0.15, 0.80), // red nucleus
            jitter([10.0, -8.0, -19.0], [3.0, 6.0, 2.5], 0.16, 0.80), // substantia nigra
        ];
        let veins = vec![
            // Along the top of the midline, front to back.
            Tube {
                a: sc([0.0, 45.0, 40.0]),
                b: sc([0.0, -50.0, 40.0]),
                r: 2.5 * mean_s,
            },
            // Deep vein running back and up.
            Tube {
                a: sc([0.0, -5.0, 14.0]),
                b: sc([0.0, -55.0, 27.0]),
                r: 2.0 * mean_s,
            },
            // An oblique cortical vein.
            Tube {
                a: sc([30.0, 20.0, 30.0]),
                b: sc([45.0, -20.0, 20.0]),
                r: 1.8 * mean_s,
            },
        ];
        let calcification = at([-22.0, 25.0, 18.0], [3.0, 3.0, 3.0]);
        let chi_wm = -0.03 + rng.range(-0.004, 0.004) as f32;
        let chi_gm = 0.02 + rng.range(-0.004, 0.004) as f32;
        let mut wave = |len: f64| {
            let dir = [
                rng.range(-1.0, 1.0),
                rng.range(-1.0, 1.0),
                rng.range(-1.0, 1.0),
            ];
            let n = dir.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-6);
            let w = 2.0 * std::f64::consts::PI / (len * mean_s);
            (
                dir.map(|v| v / n * w),
                rng.range(0.0, 2.0 * std::f64::consts::PI),
            )
        };
        let folds = (0..3).map(|_| wave(14.0)).collect();
        let mut texture = Vec::new();
        for _ in 0..4 {
            let (k, ph) = wave(35.0);
            texture.push((k, ph, 0.003f32));
        }
        Head {
            brain,
            csf,
            marrow,
            outer_table,
            skull,
            fat,
            skin,
            scalp,
            temporalis,
            face,
            eyes,
            orbits,
            neck,
            sinuses,
            ventricles,
            nuclei,
            veins,
            calcification,
            chi_wm,
            chi_gm,
            folds,
            texture,
        }
    }

    fn tissue(&self, p: [f64; 3]) -> Tissue {
        // The eyes sit in their orbits, in front of and below the intracranial space.
        if !self.csf.contains(p) {
            if self.eyes.iter().any(|e| e.contains(p)) {
                return Tissue::VITREOUS;
            }
            if self.orbits.iter().any(|e| e.contains(p)) {
                return Tissue::FAT;
            }
        }
        let in_neck = {
            let ([a, b], cy, top) = self.neck;
            p[2] < top && (p[0] / a).powi(2) + ((p[1] - cy) / b).powi(2) < 1.0
        };
        if !self.scalp.contains(p) {
            return if in_neck || self.face.contains(p) {
                Tissue::MUSCLE
            } else {
                Tissue::AIR
            };
        }
        if self.sinuses.iter().any(|s| s.contains(p)) {
            return Tissue::AIR;
        }
        if !self.skull.contains(p) {
            return if !self.skin.contains(p) {
                Tissue::SKIN
            } else if self.fat.contains(p) || self.temporalis.iter().any(|t| t.contains(p)) {
                Tissue::MUSCLE
            } else {
                Tissue::FAT
            };
        }
        if !self.csf.contains(p) {
            return if !self.marrow.contains(p) && self.outer_table.contains(p) {
                Tissue::MARROW
            } else {
                Tissue::BONE
            };
        }
        if !self.brain.contains(p) {
            // Subarachnoid CSF: inside the brain mask, as a QSM brain mask holds it.
            return Tissue::brain(0.0, 1.0, 4.0);
        }
        let wave = |k: &[f64; 3], ph: f64| (k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + ph).sin();
        if self.calcification.contains(p) {
            return Tissue::brain(-0.3, 0.03, 300.0);
        }
        if self.veins.iter().any(|v| v.contains(p)) {
            return Tissue::brain(0.3, 0.7, 50.0);
        }
        if self.ventricles.iter().any(|v| v.contains(p)) {
            return Tissue::brain(0.0, 1.0, 4.0);
        }
        let texture: f32 = self
            .texture
            .iter()
            .map(|(k, ph, a)| a * wave(k, *ph) as f32)
            .sum();
        for n in &self.nuclei {
            if n.shapes.iter().any(|e| e.contains(p)) {
                return Tissue::brain(n.chi + texture, n.m0, iron_r2star(n.chi));
            }
        }
        // Cortex: the outer layer of the brain, with a rippled inner boundary for folding.
        let ripple: f64 = self.folds.iter().map(|(k, ph)| wave(k, *ph)).sum::<f64>() / 3.0;
        let rho = self.brain.rho2(p).sqrt();
        if rho > 0.86 + 0.05 * ripple {
            Tissue::brain(self.chi_gm + texture, 0.9, 16.0)
        } else {
            Tissue::brain(self.chi_wm + texture, 0.75, 21.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn procedural_head_has_every_compartment_and_is_deterministic() {
        let dims = [48, 48, 40];
        let p = Phantom::procedural(dims, [4.0; 3], 3).unwrap();
        let q = Phantom::procedural(dims, [4.0; 3], 3).unwrap();
        let r = Phantom::procedural(dims, [4.0; 3], 4).unwrap();
        assert_eq!(p.chi_total.data, q.chi_total.data);
        assert_ne!(p.chi_total.data, r.chi_total.data);
        let has = |x: f32| p.chi_total.data.iter().any(|&v| (v - x).abs() < 1e-6);
        assert!(has(CHI_AIR) && has(CHI_BONE));
        // Corners are air with no signal.
        assert_eq!(p.chi_total.data[0], CHI_AIR);
        assert_eq!(p.m0[0], 0.0);
        let brain: Vec<f32> = (0..p.m0.len())
            .filter(|&v| p.brain_mask[v])
            .map(|v| p.chi_local.data[v])
            .collect();
        assert!(brain.len() > 5000);
        assert!(brain.iter().any(|&c| c > 0.1), "iron-rich nuclei or veins");
        assert!(brain.iter().any(|&c| c < -0.02), "white matter");
        assert!(brain.iter().all(|&c| c.abs() < 0.5));
        // χ_local is χ_total inside the brain and 0 outside.
        for v in 0..p.m0.len() {
            if p.brain_mask[v] {
                assert_eq!(p.chi_local.data[v], p.chi_total.data[v]);
            } else {
                assert_eq!(p.chi_local.data[v], 0.0);
            }
        }
        // The sinus is an air pocket inside the head (air voxels not connected to the
        // corners): look along the midline in front of the brain.
        let (cx, _) = (dims[0] / 2, 0);
        let mut air_inside = false;
        for k in 0..dims[2] {
            let mut seen_tissue = false;
            for j in 0..dims[1] {
                let v = cx + dims[0] * (j + dims[1] * k);
                let c = p.chi_total.data[v];
                if c != CHI_AIR {
                    seen_tissue = true;
                } else if seen_tissue && p.chi_total.data[v + dims[0]] != CHI_AIR {
                    air_inside = true;
                }
            }
        }
        assert!(air_inside, "a sinus pocket");
    }

    #[test]
    fn a_file_phantom_turns_inside_its_grid_and_onto_subvoxels() {
        let n = 24;
        let head = Phantom::procedural([n; 3], [2.0; 3], 3).unwrap();
        let at = |p: &Phantom, d: usize, i: usize, j: usize, k: usize| {
            p.chi_local.data[i + d * (j + d * k)]
        };
        // No turn on the same grid gives the head back exactly.
        let same = head.turned(&crate::register::rigid::IDENTITY, 1).unwrap();
        assert_eq!(same.chi_local.data, head.chi_local.data);
        assert_eq!(same.brain_mask, head.brain_mask);
        // A quarter turn about z maps voxels onto voxels: tissue at p is the head's at qᵀ·p,
        // so voxel (i, j) shows the head's (j, n−1−i).
        let q = [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]];
        let quarter = head.turned(&q, 1).unwrap();
        let mut worst = 0.0f32;
        for k in 0..n {
            for j in 0..n {
                for i in 0..n {
                    let d = at(&quarter, n, i, j, k) - at(&head, n, j, n - 1 - i, k);
                    worst = worst.max(d.abs());
                }
            }
        }
        assert!(worst < 1e-5, "largest difference {worst}");
        // On 2× subvoxels with no turn, each block averages back to the voxel wherever the
        // head is linear across it (trilinear's own guarantee): compare a smooth map.
        let mut smooth = head.clone();
        smooth.chi_local.data = (0..n * n * n)
            .map(|v| ((v % n) as f32 * 0.3 + ((v / n) % n) as f32 * 0.1) * 0.01)
            .collect();
        let fine = smooth.turned(&crate::register::rigid::IDENTITY, 2).unwrap();
        assert_eq!(fine.dims(), [2 * n; 3]);
        assert!((fine.geometry().voxel_size[0] - 1.0).abs() < 1e-12);
        let f = 2 * n;
        for (i, j, k) in [(3, 4, 5), (10, 12, 7), (20, 1, 18)] {
            let mean: f32 = (0..8)
                .map(|b| {
                    at(
                        &fine,
                        f,
                        2 * i + (b & 1),
                        2 * j + ((b >> 1) & 1),
                        2 * k + (b >> 2),
                    )
                })
                .sum::<f32>()
                / 8.0;
            let want = at(&smooth, n, i, j, k);
            assert!(
                (mean - want).abs() < 1e-6,
                "({i},{j},{k}): {mean} vs {want}"
            );
        }
    }

    #[test]
    fn procedural_head_is_realistic_outside_the_brain() {
        let p = Phantom::procedural([96, 112, 90], [2.0; 3], 5).unwrap();
        let n = p.m0.len();
        let outside = |v: usize| !p.brain_mask[v];
        let count = |f: &dyn Fn(usize) -> bool| (0..n).filter(|&v| f(v)).count();
        // Fat with signal in the scalp and orbits, fatty marrow inside the bone.
        let scalp_fat =
            count(&|v| outside(v) && p.fat_fraction[v] > 0.5 && p.chi_total.data[v] == 0.0);
        let marrow = count(&|v| p.fat_fraction[v] > 0.5 && p.chi_total.data[v] == CHI_BONE);
        assert!(
            scalp_fat > 5000 && marrow > 5000,
            "fat {scalp_fat}, marrow {marrow}"
        );
        // Eyes: bright, slowly relaxing water outside the brain.
        let eyes = count(&|v| outside(v) && p.m0[v] == 1.0 && p.r2star[v] < 10.0);
        assert!(eyes > 200, "vitreous {eyes}");
        // Cortical bone and air give no (or almost no) signal; no fat inside the brain.
        assert!((0..n).all(|v| p.chi_total.data[v] != CHI_AIR || p.m0[v] == 0.0));
        assert!((0..n).all(|v| !p.brain_mask[v] || p.fat_fraction[v] == 0.0));
        // The brain mask is intracranial: it holds the CSF around the brain.
        let csf = count(&|v| p.brain_mask[v] && p.m0[v] == 1.0 && p.r2star[v] == 4.0);
        assert!(csf > 5000, "CSF in the mask {csf}");
        // Scalp signal: non-brain tissue with signal is a large part of the head, as in a
        // real scan (fat, skin, muscle, face, eyes).
        let signal_outside = count(&|v| outside(v) && p.m0[v] > 0.3);
        let brain = count(&|v| p.brain_mask[v]);
        assert!(
            signal_outside as f64 > 0.3 * brain as f64,
            "{signal_outside} vs {brain}"
        );
    }

    #[test]
    fn segmented_head_gets_skin_fat_muscle_dura_and_marrow_by_depth() {
        // One line through a head: air | soft tissue ×5 | bone ×5 | soft ×2 | brain.
        let labels = [
            14, 14, 15, 15, 15, 15, 15, 13, 13, 13, 13, 13, 15, 15, 9, 9, 9, 9, 9, 9,
        ];
        let dims = [labels.len(), 1, 1];
        let g = Geometry::from_voxel_size([1.0; 3]);
        let seg = Volume::new(dims, labels.iter().map(|&l| l as f32).collect(), g.clone());
        let head = Volume::new(dims, vec![0.0; labels.len()], g);
        let p = Phantom::from_volumes(head, None, None, Some(seg)).unwrap();
        let is = |v: usize, t: Tissue| {
            (p.m0[v], p.r2star[v], p.fat_fraction[v]) == (t.m0, t.r2star, t.fat)
        };
        assert!(is(2, Tissue::SKIN));
        assert!((3..=5).all(|v| is(v, Tissue::FAT)));
        assert!(is(6, Tissue::MUSCLE));
        assert!(is(7, Tissue::BONE) && is(11, Tissue::BONE));
        assert!((8..=10).all(|v| is(v, Tissue::MARROW)));
        assert!(is(12, Tissue::DURA) && is(13, Tissue::DURA));
        assert_eq!((p.m0[14], p.fat_fraction[14]), (0.90, 0.0));
        assert!(p.brain_mask[14] && !p.brain_mask[13]);
    }

    #[test]
    fn from_volumes_uses_labels_and_falls_back_to_chi() {
        let dims = [4, 1, 1];
        let g = Geometry::from_voxel_size([1.0; 3]);
        let head = Volume::new(dims, vec![9.2, -2.1, 0.15, f32::NAN], g.clone());
        let brain = Volume::new(dims, vec![0.0, 0.0, 0.15, 0.0], g.clone());
        let p = Phantom::from_volumes(head.clone(), Some(brain), None, None).unwrap();
        assert_eq!(p.brain_mask, vec![false, false, true, false]);
        assert_eq!(p.m0[0], 0.0);
        assert_eq!(p.r2star[1], 300.0);
        assert!(p.r2star[2] > 30.0, "iron-rich tissue relaxes fast");
        assert_eq!(p.chi_total.data[3], 0.0, "NaN counts as 0");

        let seg = Volume::new(dims, vec![14.0, 13.0, 2.0, 10.0], g.clone());
        let p = Phantom::from_volumes(head.clone(), None, None, Some(seg)).unwrap();
        assert_eq!(p.brain_mask, vec![false, false, true, true]);
        assert_eq!((p.m0[3], p.r2star[3]), (1.0, 4.0));
        assert_eq!(p.chi_local.data[2], 0.15);

        assert!(Phantom::from_volumes(head, None, None, None).is_err());
    }
}
