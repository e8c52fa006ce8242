//! Training on user data: a BIDS derivative dataset of local field maps
//! (`*_desc-local_fieldmap`, any sidecar `Units`), brain masks and reference `Chimap`s
//! (e.g. from COSMOS), found by the project's BIDS discovery and read with the pipeline's
//! loaders. Every session becomes a list of patches cut on a stride grid (kept when they
//! hold enough brain, LP-CNN's rule); the orientations of a session (a BIDS orientation
//! set) give multi-orientation samples, each channel with its own B0 direction.
//!
//! Subjects are split once into training and held-out validation subjects.

use std::collections::BTreeSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::synth::Batch;
use crate::bids::{self, Acquisition, FieldKind, Filter, Source};
use crate::pipeline::fields::{load_field_ppm, load_mask, same_grid};
use crate::simulate::rng::Rng;
use crate::{Error, Result};

/// The `data.derivatives` section of the training config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DerivativesConfig {
    /// Root of the derivative dataset (`DatasetType: derivative`).
    pub root: PathBuf,
    /// Subjects held out for validation (labels, with or without `sub-`).
    pub validation_subjects: Vec<String>,
    /// Without `validation_subjects`: this fraction of the subjects (the last in sorted
    /// order, at least one when there are two or more) is held out.
    pub validation_fraction: f64,
    /// Step between patch origins, voxels (default: half the patch).
    pub stride: Option<usize>,
    /// A patch is kept when more than this fraction of it is brain.
    pub min_brain_fraction: f64,
    /// Fraction of training batches cut from this dataset; the rest are synthetic.
    pub fraction: f64,
    /// `desc-` label of the reference `Chimap` when there are several beside a field map.
    pub reference_desc: Option<String>,
}

impl Default for DerivativesConfig {
    fn default() -> Self {
        DerivativesConfig {
            root: PathBuf::new(),
            validation_subjects: Vec::new(),
            validation_fraction: 0.2,
            stride: None,
            min_brain_fraction: 0.125,
            fraction: 1.0,
            reference_desc: None,
        }
    }
}

/// One orientation of a session: its B0 direction and local field (ppm, 0 outside the mask).
struct Orientation {
    b0: [f64; 3],
    field: Vec<f32>,
}

/// The volumes of one session on one grid, with the origins of its kept patches.
struct Session {
    subject: String,
    dims: [usize; 3],
    voxel_size: [f64; 3],
    /// Reference χ (ppm), 0 outside the mask.
    chi: Vec<f32>,
    /// Brain in every orientation.
    mask: Vec<bool>,
    orientations: Vec<Orientation>,
    origins: Vec<[usize; 3]>,
}

/// The sessions of a derivative dataset, split into training and validation subjects.
pub struct UserData {
    train: Vec<Session>,
    validation: Vec<Session>,
    patch: usize,
}

impl UserData {
    /// Discovers and reads the dataset; every problem is an error naming its file.
    pub fn load(cfg: &DerivativesConfig, patch: usize) -> Result<UserData> {
        check(cfg)?;
        let root = &cfg.root;
        let found = bids::discover(root, &Filter::default())?;
        if let Some((name, e)) = found.problems.first() {
            return Err(Error::Config(format!(
                "training data {}: {name}: {e}{}",
                root.display(),
                match found.problems.len() {
                    1 => String::new(),
                    n => format!(" (and {} more problems)", n - 1),
                }
            )));
        }
        let local: Vec<usize> = (0..found.acquisitions.len())
            .filter(|&i| {
                matches!(
                    found.acquisitions[i].source,
                    Source::FieldMap {
                        kind: FieldKind::Local,
                        ..
                    }
                )
            })
            .collect();
        if local.is_empty() {
            return Err(Error::input(
                root,
                "holds no *_desc-local_fieldmap.nii[.gz]: training needs local fields with \
                 a reference *_Chimap.nii[.gz] and a *_desc-brain_mask.nii[.gz] beside each",
            ));
        }
        // Sessions: the orientation sets, then every other local field map on its own.
        let mut groups: Vec<Vec<usize>> = found
            .orientation_sets
            .iter()
            .map(|s| s.members.clone())
            .filter(|m| m.iter().all(|i| local.contains(i)))
            .collect();
        let grouped: BTreeSet<usize> = groups.iter().flatten().copied().collect();
        groups.extend(
            local
                .iter()
                .filter(|i| !grouped.contains(i))
                .map(|&i| vec![i]),
        );
        let stride = cfg.stride.unwrap_or((patch / 2).max(1));
        let mut sessions = Vec::new();
        for members in &groups {
            let accs: Vec<&Acquisition> = members.iter().map(|&i| &found.acquisitions[i]).collect();
            let mut s = read_session(&accs, cfg.reference_desc.as_deref(), patch)?;
            s.origins = patch_origins(&s.mask, s.dims, patch, stride, cfg.min_brain_fraction);
            sessions.push(s);
        }
        let subjects: BTreeSet<String> = sessions.iter().map(|s| s.subject.clone()).collect();
        let held = held_out(cfg, &subjects, root)?;
        let (validation, train): (Vec<Session>, Vec<Session>) = sessions
            .into_iter()
            .filter(|s| !s.origins.is_empty())
            .partition(|s| held.contains(&s.subject));
        if train.is_empty() {
            return Err(Error::input(
                root,
                format!(
                    "no training patch: no {patch}³ patch of the training subjects holds more \
                     than {:.1} % brain; lower data.patch or \
                     data.derivatives.min_brain_fraction, or hold out fewer subjects",
                    100.0 * cfg.min_brain_fraction
                ),
            ));
        }
        tracing::info!(
            "training data {}: {} training sessions ({} patches), {} validation sessions",
            root.display(),
            train.len(),
            train.iter().map(|s| s.origins.len()).sum::<usize>(),
            validation.len()
        );
        Ok(UserData {
            train,
            validation,
            patch,
        })
    }

    /// Whether held-out subjects give validation batches.
    pub fn has_validation(&self) -> bool {
        !self.validation.is_empty()
    }

    /// `n` patches of one session with 1..=`max_orientations` of its orientations drawn
    /// from `rng`: sessions weighted by their patch counts.
    pub fn batch(
        &self,
        validation: bool,
        rng: &mut Rng,
        n: usize,
        max_orientations: usize,
    ) -> Batch {
        let sessions = if validation && self.has_validation() {
            &self.validation
        } else {
            &self.train
        };
        let total: usize = sessions.iter().map(|s| s.origins.len()).sum();
        let mut pick = (rng.next_u64() % total as u64) as usize;
        let s = sessions
            .iter()
            .find(|s| {
                let here = pick < s.origins.len();
                if !here {
                    pick -= s.origins.len();
                }
                here
            })
            .expect("pick < total");
        let available = s.orientations.len().min(max_orientations.max(1));
        let count = 1 + (rng.next_u64() % available as u64) as usize;
        // A random subset of the orientations (partial Fisher–Yates).
        let mut order: Vec<usize> = (0..s.orientations.len()).collect();
        for i in 0..count {
            let j = i + (rng.next_u64() % (order.len() - i) as u64) as usize;
            order.swap(i, j);
        }
        let chosen = &order[..count];
        let p = self.patch;
        let mut b = Batch {
            dims: [p; 3],
            voxel_size: s.voxel_size,
            b0: chosen.iter().map(|&o| s.orientations[o].b0).collect(),
            n,
            chi: Vec::with_capacity(n * p * p * p),
            mask: Vec::with_capacity(n * p * p * p),
            fields: Vec::with_capacity(n * count * p * p * p),
        };
        for _ in 0..n {
            let origin = s.origins[(rng.next_u64() % s.origins.len() as u64) as usize];
            let mask = cut(&s.mask, s.dims, origin, p);
            b.chi.extend(cut(&s.chi, s.dims, origin, p));
            for &o in chosen {
                b.fields
                    .extend(cut(&s.orientations[o].field, s.dims, origin, p));
            }
            b.mask.extend(mask.iter().map(|&m| m as u8 as f32));
        }
        b
    }
}

fn check(cfg: &DerivativesConfig) -> Result<()> {
    let bad = |m: &str| Err(Error::Config(format!("data.derivatives: {m}")));
    if cfg.root.as_os_str().is_empty() {
        return bad("root must name the derivative dataset");
    }
    if !(0.0..1.0).contains(&cfg.validation_fraction) {
        return bad("validation_fraction must be in [0, 1)");
    }
    if !(0.0..1.0).contains(&cfg.min_brain_fraction) {
        return bad("min_brain_fraction must be in [0, 1)");
    }
    if !(0.0..=1.0).contains(&cfg.fraction) {
        return bad("fraction must be in [0, 1]");
    }
    if cfg.stride == Some(0) {
        return bad("stride must be at least 1");
    }
    Ok(())
}

/// The validation subjects: those named, else the last `validation_fraction` of them.
fn held_out(
    cfg: &DerivativesConfig,
    subjects: &BTreeSet<String>,
    root: &std::path::Path,
) -> Result<BTreeSet<String>> {
    if !cfg.validation_subjects.is_empty() {
        let mut held = BTreeSet::new();
        for s in &cfg.validation_subjects {
            let label = s.strip_prefix("sub-").unwrap_or(s);
            if !subjects.contains(label) {
                return Err(Error::input(
                    root,
                    format!(
                        "has no training data for validation subject sub-{label} (subjects: {}): \
                         fix data.derivatives.validation_subjects",
                        subjects
                            .iter()
                            .map(|s| format!("sub-{s}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ));
            }
            held.insert(label.to_string());
        }
        return Ok(held);
    }
    let n = subjects.len();
    let mut k = (cfg.validation_fraction * n as f64).round() as usize;
    if n >= 2 && cfg.validation_fraction > 0.0 {
        k = k.clamp(1, n - 1);
    } else {
        k = 0;
    }
    Ok(subjects.iter().skip(n - k).cloned().collect())
}

/// Reads the field maps, masks and reference of one session; all must share one grid.
fn read_session(accs: &[&Acquisition], desc: Option<&str>, patch: usize) -> Result<Session> {
    let first = accs[0];
    let reference = bids::companion(first, "Chimap", desc)?;
    let mut chi_vol = crate::io::read_image(&reference)?;
    if chi_vol.frames.len() != 1 {
        return Err(Error::input(&reference, "expected a 3D χ map"));
    }
    let chi_vol = chi_vol.frames.swap_remove(0);
    let mut mask: Vec<bool> = vec![true; chi_vol.data.len()];
    let mut orientations = Vec::new();
    for a in accs {
        let Source::FieldMap {
            field,
            units,
            mask: mask_path,
            echo_time,
            ..
        } = &a.source
        else {
            unreachable!("only field maps are grouped");
        };
        let f = load_field_ppm(field, *units, *echo_time, a.field_strength)?;
        same_grid(&chi_vol, &f, &reference, field)?;
        let m = load_mask(mask_path, &f, field)?;
        mask.iter_mut().zip(&m).for_each(|(a, &b)| *a &= b);
        orientations.push((a.b0_direction, f.data));
    }
    if chi_vol.dims.iter().any(|&d| d < patch) {
        return Err(Error::input(
            &reference,
            format!(
                "grid {:?} is smaller than the {patch}³ training patch; lower data.patch",
                chi_vol.dims
            ),
        ));
    }
    let zero_outside = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .zip(&mask)
            .map(|(&x, &m)| if m && x.is_finite() { x } else { 0.0 })
            .collect()
    };
    Ok(Session {
        subject: first.entities.sub.clone(),
        dims: chi_vol.dims,
        voxel_size: chi_vol.geometry.voxel_size,
        chi: zero_outside(&chi_vol.data),
        orientations: orientations
            .into_iter()
            .map(|(b0, field)| Orientation {
                b0,
                field: zero_outside(&field),
            })
            .collect(),
        mask,
        origins: Vec::new(),
    })
}

/// Patch origins on a stride grid (plus the last position of each axis, so the edges are
/// covered) whose patch holds more than `min_fraction` brain.
fn patch_origins(
    mask: &[bool],
    dims: [usize; 3],
    p: usize,
    stride: usize,
    min_fraction: f64,
) -> Vec<[usize; 3]> {
    let starts = |n: usize| -> Vec<usize> {
        let mut v: Vec<usize> = (0..=n - p).step_by(stride).collect();
        if v.last() != Some(&(n - p)) {
            v.push(n - p);
        }
        v
    };
    let (sx, sy, sz) = (starts(dims[0]), starts(dims[1]), starts(dims[2]));
    let mut out = Vec::new();
    for &z in &sz {
        for &y in &sy {
            for &x in &sx {
                let o = [x, y, z];
                let inside = cut(mask, dims, o, p).iter().filter(|&&m| m).count();
                if inside as f64 > min_fraction * (p * p * p) as f64 {
                    out.push(o);
                }
            }
        }
    }
    out
}

/// The `p³` block at `origin` of an x-fastest volume.
fn cut<T: Copy>(v: &[T], dims: [usize; 3], origin: [usize; 3], p: usize) -> Vec<T> {
    crate::volume::crop_at(v, dims, origin, [p; 3])
}

/// A tiny derivative dataset from `chimap simulate`'s ground truth: two subjects, two head
/// orientations each, 32×32×24 voxels of 3 mm, local fields in ppm.
#[cfg(test)]
pub(crate) fn simulated_derivatives(dir: &std::path::Path) -> PathBuf {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: crate::simulate::SimulateArgs,
    }
    let out = dir.join("sim");
    let argv = [
        "simulate",
        out.to_str().unwrap(),
        "--dims",
        "32",
        "32",
        "24",
        "--echo-times",
        "5",
        "10",
        "--oversample",
        "1",
        "--subjects",
        "2",
        "--b0-direction",
        "0",
        "0",
        "1",
        "--b0-direction",
        "0.35",
        "0",
        "0.937",
    ];
    crate::simulate::run(&Cli::try_parse_from(argv).unwrap().args).unwrap();
    out.join("derivatives/chimap-truth")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{read_header, read_image, write_volume};
    use crate::physics::b0_direction;

    fn config(root: PathBuf) -> DerivativesConfig {
        DerivativesConfig {
            root,
            validation_subjects: vec!["sub-2".into()],
            stride: Some(8),
            ..DerivativesConfig::default()
        }
    }

    fn anat(root: &std::path::Path, sub: usize) -> PathBuf {
        root.join(format!("sub-{sub}/anat"))
    }

    /// The volumes of one subject read independently of the loader: χ, the intersection of
    /// the masks, and (B0 direction, field) per orientation.
    #[allow(clippy::type_complexity)]
    fn source(
        root: &std::path::Path,
        sub: usize,
    ) -> (Vec<f32>, Vec<bool>, Vec<([f64; 3], Vec<f32>)>, [usize; 3]) {
        let dir = anat(root, sub);
        let read = |name: String| read_image(&dir.join(name)).unwrap().frames.remove(0);
        let chi = read(format!("sub-{sub}_acq-ori1_Chimap.nii.gz"));
        let mut mask = vec![true; chi.data.len()];
        let mut fields = Vec::new();
        for o in 1..=2 {
            let m = read(format!("sub-{sub}_acq-ori{o}_desc-brain_mask.nii.gz"));
            mask.iter_mut()
                .zip(&m.data)
                .for_each(|(a, &b)| *a &= b > 0.5);
            let name = format!("sub-{sub}_acq-ori{o}_desc-local_fieldmap.nii.gz");
            let b0 = b0_direction(&read_header(&dir.join(&name)).unwrap().geometry);
            fields.push((b0, read(name).data));
        }
        (chi.data, mask, fields, chi.dims)
    }

    /// Where in the source the patch lies (any origin, not only the stride grid).
    fn locate(
        patch: &[f32],
        chi: &[f32],
        mask: &[bool],
        dims: [usize; 3],
        p: usize,
    ) -> Option<[usize; 3]> {
        let masked: Vec<f32> = chi
            .iter()
            .zip(mask)
            .map(|(&c, &m)| if m { c } else { 0.0 })
            .collect();
        for z in 0..=dims[2] - p {
            for y in 0..=dims[1] - p {
                for x in 0..=dims[0] - p {
                    if cut(&masked, dims, [x, y, z], p) == patch {
                        return Some([x, y, z]);
                    }
                }
            }
        }
        None
    }

    #[test]
    fn patches_are_cut_from_the_sessions_with_their_b0_directions() {
        let dir = tempfile::tempdir().unwrap();
        let root = simulated_derivatives(dir.path());
        let p = 16;
        let data = UserData::load(&config(root.clone()), p).unwrap();
        assert_eq!((data.train.len(), data.validation.len()), (1, 1));
        assert_eq!(data.train[0].subject, "1");
        assert_eq!(data.train[0].orientations.len(), 2);
        let (chi, mask, fields, dims) = source(&root, 1);
        let nv = p * p * p;
        let mut counts = BTreeSet::new();
        for index in 0..12 {
            let b = data.batch(false, &mut Rng::new(index), 2, 3);
            assert_eq!((b.dims, b.voxel_size), ([p; 3], [3.0; 3]));
            counts.insert(b.b0.len());
            for i in 0..b.n {
                let c = &b.chi[i * nv..][..nv];
                let o = locate(c, &chi, &mask, dims, p).expect("the χ patch lies in the source");
                assert!(
                    o.iter().zip(dims).all(|(&o, n)| o % 8 == 0 || o == n - p),
                    "{o:?}"
                );
                let m: Vec<bool> = b.mask[i * nv..][..nv].iter().map(|&v| v == 1.0).collect();
                assert_eq!(m, cut(&mask, dims, o, p));
                assert!(m.iter().filter(|&&v| v).count() * 8 > nv);
                for (ch, dir) in b.b0.iter().enumerate() {
                    // The field of the orientation whose affine gives this direction.
                    let (_, f) = fields
                        .iter()
                        .find(|(d, _)| (0..3).all(|a| (d[a] - dir[a]).abs() < 1e-9))
                        .expect("a direction of the source");
                    let want: Vec<f32> = cut(f, dims, o, p)
                        .iter()
                        .zip(&m)
                        .map(|(&v, &m)| if m { v } else { 0.0 })
                        .collect();
                    assert_eq!(&b.fields[(i * b.b0.len() + ch) * nv..][..nv], &want[..]);
                }
            }
            if b.b0.len() == 2 {
                assert!(b.b0[0] != b.b0[1], "two distinct orientations");
            }
        }
        assert_eq!(
            counts,
            BTreeSet::from([1, 2]),
            "1- and 2-orientation samples"
        );
        // Validation batches come from the held-out subject only.
        let (chi2, mask2, _, _) = source(&root, 2);
        let v = data.batch(true, &mut Rng::new(1), 1, 1);
        assert!(locate(&v.chi, &chi2, &mask2, dims, p).is_some());
        // Without named subjects, the last of the two is held out by the fraction.
        let by_fraction = DerivativesConfig {
            validation_subjects: Vec::new(),
            validation_fraction: 0.2,
            ..config(root)
        };
        let data = UserData::load(&by_fraction, p).unwrap();
        assert_eq!(data.validation[0].subject, "2");
    }

    #[test]
    fn problems_are_errors_naming_the_file_and_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let root = simulated_derivatives(dir.path());
        let a1 = anat(&root, 1);
        let err = |cfg: &DerivativesConfig| UserData::load(cfg, 16).err().unwrap().to_string();
        // An unknown validation subject.
        let e = err(&DerivativesConfig {
            validation_subjects: vec!["9".into()],
            ..config(root.clone())
        });
        assert!(
            e.contains("sub-9") && e.contains("validation_subjects"),
            "{e}"
        );
        // A patch larger than the grid.
        let e = UserData::load(&config(root.clone()), 28)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("Chimap.nii.gz") && e.contains("data.patch"),
            "{e}"
        );
        // A reference on another grid.
        let chi = a1.join("sub-1_acq-ori1_Chimap.nii.gz");
        let small = crate::Volume::new(
            [32, 32, 20],
            vec![0.0; 32 * 32 * 20],
            crate::Geometry::from_voxel_size([3.0; 3]),
        );
        write_volume(&chi, &small).unwrap();
        let e = err(&config(root.clone()));
        assert!(
            e.contains("sub-1_acq-ori1_desc-local_fieldmap") && e.contains("grid"),
            "{e}"
        );
        // No reference at all.
        std::fs::remove_file(&chi).unwrap();
        let e = err(&config(root.clone()));
        assert!(
            e.contains("sub-1_acq-ori1_desc-local_fieldmap.nii.gz")
                && e.contains("sub-1_acq-ori1_Chimap.nii.gz"),
            "{e}"
        );
        // A field map without units.
        let sidecar = a1.join("sub-1_acq-ori2_desc-local_fieldmap.json");
        std::fs::write(&sidecar, "{\"MagneticFieldStrength\": 3.0}").unwrap();
        let e = err(&config(root));
        assert!(
            e.contains("sub-1_acq-ori2_desc-local_fieldmap") && e.contains("Units"),
            "{e}"
        );
    }
}
