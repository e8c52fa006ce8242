//! `--mask-dir`: brain masks the user brings, as a BIDS derivative dataset of
//! `*_desc-brain_mask.nii[.gz]` files, matched to acquisitions by their entities.
//!
//! - A mask serves an acquisition when every entity of its name (but `desc` and `space`) has
//!   the same value in the acquisition's (`echo`/`part` excluded): `sub-1_ses-1_desc-brain_mask`
//!   serves every series of that session, `sub-1_ses-1_acq-ori1_desc-brain_mask` only acq-ori1.
//! - The mask naming the most entities wins; two naming as many is an error naming both.
//! - `space-` absent, `orig` or `native` means the acquisition's own grid; a mask in any other
//!   space (a template, `T1w`) is not on the gradient-echo grid and is ignored.
//! - The grid itself is checked when the mask is loaded (`fields::load_user_mask`), so a mask
//!   on another grid fails its acquisition with both files named.

use std::path::{Path, PathBuf};

use super::{Entities, UserMask};
use crate::{Error, Result};

/// Name of the mask dataset in BIDS URIs (`bids:masks:sub-01/anat/…`) and `DatasetLinks`.
pub const MASK_LINK: &str = "masks";

/// `space-` labels that mean the acquisition's own voxel grid.
const NATIVE_SPACES: &[&str] = &["orig", "native"];

/// The brain masks found under a `--mask-dir`.
#[derive(Debug)]
pub struct MaskIndex {
    root: PathBuf,
    /// Each usable mask with its entities, `desc` and `space` removed.
    masks: Vec<(Entities, PathBuf)>,
    /// Masks skipped for their `space-`, kept to explain a missing match.
    other_space: Vec<(Entities, PathBuf)>,
}

impl MaskIndex {
    /// Every `sub-*_desc-brain_mask.nii[.gz]` under `dir` (hidden folders, `derivatives/`,
    /// `sourcedata/` and `code/` skipped). Fails when `dir` is not a folder or holds none.
    pub fn scan(dir: &Path) -> Result<MaskIndex> {
        if !dir.is_dir() {
            return Err(Error::Usage(format!(
                "--mask-dir {} is not a folder: give the root of a derivative dataset of \
                 *_desc-brain_mask.nii[.gz] files",
                dir.display()
            )));
        }
        let mut index = MaskIndex {
            root: dir.to_path_buf(),
            masks: Vec::new(),
            other_space: Vec::new(),
        };
        for entry in super::discover::dataset_walk(dir).flatten() {
            if !entry.file_type().is_file() {
                continue;
            }
            let Some(name) = entry.file_name().to_str() else {
                continue;
            };
            let Some((mut entities, suffix, ext)) = Entities::parse(name) else {
                continue;
            };
            if suffix != "mask"
                || entities.desc.as_deref() != Some("brain")
                || entities.sub.is_empty()
                || !(ext == ".nii" || ext == ".nii.gz")
            {
                continue;
            }
            entities.desc = None;
            let space = entities.other.remove("space");
            let path = entry.into_path();
            match space {
                Some(s) if !NATIVE_SPACES.contains(&s.as_str()) => {
                    index.other_space.push((entities, path))
                }
                _ => index.masks.push((entities, path)),
            }
        }
        if index.masks.is_empty() {
            let skipped = if index.other_space.is_empty() {
                String::new()
            } else {
                format!(
                    " (found only masks in another space, e.g. {}: chimap needs masks on the \
                     acquisition's grid, named without space- or with space-orig)",
                    index.other_space[0].1.display()
                )
            };
            return Err(Error::Usage(format!(
                "--mask-dir {} holds no sub-<label>[_ses-<label>][_acq-<label>]_desc-brain_mask.nii[.gz] \
                 files{skipped}",
                dir.display()
            )));
        }
        Ok(index)
    }

    /// The mask for an acquisition with these entities: the matching mask that names the
    /// most entities. Errors name the acquisition, and the candidates when two tie.
    pub fn resolve(&self, acquisition: &Entities) -> Result<UserMask> {
        let target = Entities {
            desc: None,
            ..acquisition.without_echo_part()
        };
        let specificity = |e: &Entities| e.pairs().len();
        let matching: Vec<&(Entities, PathBuf)> = self
            .masks
            .iter()
            .filter(|(e, _)| e.is_subset_of(&target))
            .collect();
        let Some(best) = matching.iter().map(|(e, _)| specificity(e)).max() else {
            return Err(self.missing(&target));
        };
        let winners: Vec<&PathBuf> = matching
            .iter()
            .filter(|(e, _)| specificity(e) == best)
            .map(|(_, p)| p)
            .collect();
        if winners.len() > 1 {
            return Err(Error::input(
                winners[0],
                format!(
                    "and {} both match {} equally well: keep one of them, or name the \
                     acquisition (acq-/run-) in the one meant for it",
                    winners[1].display(),
                    target.prefix()
                ),
            ));
        }
        let path = winners[0].clone();
        let relative = path.strip_prefix(&self.root).unwrap_or(&path);
        Ok(UserMask {
            uri: crate::derivatives::dataset_uri(MASK_LINK, relative),
            path,
        })
    }

    fn missing(&self, target: &Entities) -> Error {
        let mut folder = PathBuf::from(format!("sub-{}", target.sub));
        if let Some(ses) = &target.ses {
            folder.push(format!("ses-{ses}"));
        }
        folder.push("anat");
        let other = self
            .other_space
            .iter()
            .find(|(e, _)| e.is_subset_of(target))
            .map(|(_, p)| {
                format!(
                    " ({} is in another space; chimap needs the acquisition's own grid)",
                    p.display()
                )
            })
            .unwrap_or_default();
        Error::input(
            &self.root,
            format!(
                "--mask-dir has no brain mask for {}{other}: add {}/{}_desc-brain_mask.nii.gz \
                 (or one for the whole session, named with sub-/ses- only) on its grid",
                target.prefix(),
                folder.display(),
                target.prefix()
            ),
        )
    }
}
