//! The visual QC report: one self-contained HTML page per subject, `OUTPUT_DIR/sub-<label>.html`,
//! with its PNG figures in `OUTPUT_DIR/sub-<label>/figures/`, and the group level
//! (`group_qc.tsv`, `group.html`).
//!
//! Everything is built from what is on disk in the derivative dataset (maps, sidecars, qc
//! json), so a rerun that skipped finished acquisitions still gets a complete report. The
//! magnitude comes from the source dataset, found through the `bids:raw:` URIs in `Sources`.
//!
//! - [`figure`]: montages (three planes) and colour maps, written as PNG.
//! - Registration of an as-scanned orientation set: a colour overlay per member of its
//!   magnitude in the reference grid (`*_space-ref_desc-rss_magnitude`, written by the
//!   pipeline for this) on the reference's. The pipeline writes the image, not the
//!   figure, so that this page, like the rest, is drawn from the derivative files alone.
//! - [`html`]: the subject page.
//! - [`group`]: the group table and page.

pub mod figure;
pub mod group;
pub mod html;
pub mod status;

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::derivatives::sidecar_path;
use crate::{io, qc, Error, Result, Volume};

/// The outputs of one acquisition (or orientation set) found on disk.
#[derive(Clone, Debug, Default)]
pub struct Found {
    /// `sub-1_acq-ori1` (the name before `_desc-`).
    pub prefix: String,
    pub folder: PathBuf,
    pub qc: Option<PathBuf>,
    /// `(method, path)` of every Chimap.
    pub chimaps: Vec<(String, PathBuf)>,
}

impl Found {
    /// `<prefix>_desc-<desc>_<suffix>.nii.gz` if it exists.
    pub fn map(&self, desc: &str, suffix: &str) -> Option<PathBuf> {
        let p = self
            .folder
            .join(format!("{}_desc-{desc}_{suffix}.nii.gz", self.prefix));
        p.is_file().then_some(p)
    }

    /// Subject and session labels from the prefix.
    pub fn entity(&self, key: &str) -> Option<String> {
        self.prefix
            .split('_')
            .find_map(|p| p.strip_prefix(&format!("{key}-")).map(str::to_string))
    }
}

/// Every acquisition with a qc json or a Chimap under `dir`, sorted by name.
pub fn find_outputs(dir: &Path) -> Vec<Found> {
    let mut found: std::collections::BTreeMap<(PathBuf, String), Found> = Default::default();
    for entry in walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let folder = entry.path().parent().unwrap_or(dir).to_path_buf();
        let (prefix, what) = if let Some(p) = name.strip_suffix("_desc-qc.json") {
            (p.to_string(), None)
        } else if let Some(stem) = name.strip_suffix("_Chimap.nii.gz") {
            match stem.rsplit_once("_desc-") {
                Some((p, method)) => (p.to_string(), Some(method.to_string())),
                None => continue,
            }
        } else {
            continue;
        };
        let f = found
            .entry((folder.clone(), prefix.clone()))
            .or_insert_with(|| Found {
                prefix,
                folder,
                ..Found::default()
            });
        match what {
            None => f.qc = Some(entry.path().to_path_buf()),
            Some(m) => f.chimaps.push((m, entry.path().to_path_buf())),
        }
    }
    let mut out: Vec<Found> = found.into_values().collect();
    for f in &mut out {
        f.chimaps.sort();
    }
    out
}

/// Reads a map; `None` when it is missing, with a warning when it is unreadable.
pub(crate) fn read_map(path: &Path) -> Option<Volume> {
    match io::read_image(path) {
        Ok(mut img) if !img.frames.is_empty() => Some(img.frames.swap_remove(0)),
        Ok(_) => None,
        Err(e) => {
            tracing::warn!("report: {e}");
            None
        }
    }
}

/// The sidecar of a map, or an empty object.
pub(crate) fn read_sidecar(path: &Path) -> Value {
    io::read_json(&sidecar_path(path)).unwrap_or(Value::Null)
}

/// The first magnitude (echo 1 when named) among the `bids:raw:` sources, in `bids_root`.
fn magnitude_source(sidecar: &Value, bids_root: &Path) -> Option<PathBuf> {
    let prefix = format!("bids:{}:", crate::derivatives::SOURCE_LINK);
    let mut mags: Vec<PathBuf> = sidecar["Sources"]
        .as_array()?
        .iter()
        .filter_map(|s| s.as_str()?.strip_prefix(&prefix).map(str::to_string))
        .filter(|s| s.contains("part-mag"))
        .map(|s| bids_root.join(s))
        .collect();
    mags.sort();
    mags.into_iter().find(|p| p.is_file())
}

/// One figure of the page: file name under `figures/`, caption, colour range and units.
#[derive(Clone, Debug)]
pub struct Figure {
    pub file: String,
    pub caption: String,
    pub range: (f32, f32),
    pub units: String,
    pub diverging: bool,
    /// Axial minimum-intensity projections over slabs, not the three planes.
    pub projection: bool,
}

/// Thickness and number of the axial slabs of the minimum-intensity projections.
const MIP_SLAB_MM: f64 = 10.0;
const MIP_SLABS: usize = 4;

/// Renders the figures of one acquisition into `fig_dir`; missing maps are skipped.
fn figures(found: &Found, bids_root: &Path, fig_dir: &Path) -> Result<Vec<Figure>> {
    use figure::Style;
    let brain = found
        .map("brain", "mask")
        .or_else(|| found.map("eroded", "mask"))
        .and_then(|p| read_map(&p))
        .map(|v| v.data.iter().map(|&x| x > 0.5).collect::<Vec<bool>>());
    let eroded = found
        .map("eroded", "mask")
        .and_then(|p| read_map(&p))
        .map(|v| v.data.iter().map(|&x| x > 0.5).collect::<Vec<bool>>());
    let local = found.map("local", "fieldmap");
    let total = found.map("total", "fieldmap");
    let sidecar_source = total
        .as_ref()
        .or(found.chimaps.first().map(|c| &c.1))
        .map(|p| read_sidecar(p))
        .unwrap_or(Value::Null);
    let mut items: Vec<(String, PathBuf, Style, &str, String)> = Vec::new();
    if let Some(m) = magnitude_source(&sidecar_source, bids_root) {
        items.push((
            "magnitude".into(),
            m,
            Style::Grey,
            "",
            "Magnitude (first echo), outline: brain mask".into(),
        ));
    }
    if let Some(p) = total {
        items.push((
            "total".into(),
            p,
            Style::Diverging,
            "Hz",
            "Total field (echo fit)".into(),
        ));
    }
    if let Some(p) = local {
        items.push((
            "local".into(),
            p,
            Style::Diverging,
            "ppm",
            "Local field, outline: mask after background removal".into(),
        ));
    }
    for (method, p) in &found.chimaps {
        items.push((
            format!("chi-{method}"),
            p.clone(),
            Style::Diverging,
            "ppm",
            format!("χ, {method}"),
        ));
    }
    let mut out = Vec::new();
    for (tag, path, style, units, caption) in items {
        let Some(v) = read_map(&path) else { continue };
        let mask_ok = |m: &Option<Vec<bool>>| m.as_ref().filter(|m| m.len() == v.len()).cloned();
        let (brain, eroded) = (mask_ok(&brain), mask_ok(&eroded));
        let centre = figure::centre_of(brain.as_deref().unwrap_or(&[]), v.dims);
        let range = figure::display_range(&v, style, eroded.as_deref().or(brain.as_deref()));
        let outline = match tag.as_str() {
            "local" => eroded.as_deref(),
            // Where the brain extraction put the edge, over the image it was made from.
            "magnitude" => brain.as_deref(),
            _ => None,
        };
        let img = figure::montage(&v, style, range, centre, outline);
        let file = format!("{}_{tag}.png", found.prefix);
        img.write_png(&fig_dir.join(&file))?;
        out.push(Figure {
            file,
            caption: caption.clone(),
            range,
            units: units.to_string(),
            diverging: style == Style::Diverging,
            projection: false,
        });
        // Minimum-intensity projections of the magnitude (veins as connected dark lines) and
        // of χ (diamagnetic tissue, negative streaks), over the brain only.
        if tag == "magnitude" || tag.starts_with("chi-") {
            let slabs = figure::slabs(
                v.dims,
                v.geometry.voxel_size,
                MIP_SLAB_MM,
                MIP_SLABS,
                centre[2],
            );
            let img = figure::min_projection_row(&v, style, range, brain.as_deref(), &slabs);
            let file = format!("{}_{tag}-mip.png", found.prefix);
            img.write_png(&fig_dir.join(&file))?;
            let thickness =
                (slabs.first().map_or(0, |s| s.1 - s.0)) as f64 * v.geometry.voxel_size[2];
            let what = match tag.strip_prefix("chi-") {
                Some(method) => format!("χ, {method}"),
                None => "Magnitude (first echo)".to_string(),
            };
            out.push(Figure {
                file,
                caption: format!("{what}: minimum-intensity projections over {} axial slabs of {thickness} mm inside the brain mask", slabs.len()),
                range,
                units: units.to_string(),
                diverging: style == Style::Diverging,
                projection: true,
            });
        }
    }
    Ok(out)
}

/// The file-name tail of a member's magnitude in its set's reference grid (written by the
/// registration of an as-scanned set, `pipeline::register::registered_magnitude_path`).
const REGISTERED_MAGNITUDE: &str = "_space-ref_desc-rss_magnitude.nii.gz";

/// The registered magnitudes of the set `found` in its folder, each with its sidecar's
/// `Orientation` and `Reference`, reference first; empty for anything but an as-scanned set.
fn registered_magnitudes(found: &Found) -> Vec<(PathBuf, String, String)> {
    let Ok(dir) = std::fs::read_dir(&found.folder) else {
        return Vec::new();
    };
    let mut out: Vec<(PathBuf, String, String)> = dir
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with(REGISTERED_MAGNITUDE))
        })
        .filter_map(|p| {
            let side = read_sidecar(&p);
            (side["OrientationSet"].as_str()? == found.prefix).then(|| {
                let text = |k: &str| side[k].as_str().unwrap_or_default().to_string();
                (p.clone(), text("Orientation"), text("Reference"))
            })
        })
        .collect();
    // The reference first, then the members by name.
    out.sort_by_key(|(_, o, r)| (o != r, o.clone()));
    out
}

/// A colour overlay of every registered member of the set `found` on the reference (the
/// reference in magenta, the member in green: grey where they agree), written into
/// `fig_dir`; none for anything but an as-scanned set.
fn registration_figures(found: &Found, fig_dir: &Path) -> Result<Vec<Figure>> {
    let mags = registered_magnitudes(found);
    let Some(((ref_path, ref_name, _), members)) = mags.split_first().filter(|(r, _)| r.1 == r.2)
    else {
        return Ok(Vec::new());
    };
    let Some(reference) = read_map(ref_path) else {
        return Ok(Vec::new());
    };
    let brain = read_map(
        &found
            .folder
            .join(format!("{ref_name}_desc-brain_mask.nii.gz")),
    )
    .filter(|m| m.len() == reference.len())
    .map(|m| m.data.iter().map(|&x| x > 0.5).collect::<Vec<bool>>());
    let centre = figure::centre_of(brain.as_deref().unwrap_or(&[]), reference.dims);
    let mut out = Vec::new();
    for (path, name, _) in members {
        let Some(moving) = read_map(path).filter(|m| m.dims == reference.dims) else {
            tracing::warn!(
                "report: {} is missing or not on {ref_name}'s grid; rerun the set with                  --overwrite to rewrite it",
                path.display()
            );
            continue;
        };
        let label = qc::orientations::member_label(&found.prefix, name);
        let range = |v: &Volume| figure::display_range(v, figure::Style::Grey, None);
        let img = figure::fusion_montage(
            &reference,
            &moving,
            range(&reference),
            range(&moving),
            centre,
        );
        let file = format!("{}_registration-{label}.png", found.prefix);
        img.write_png(&fig_dir.join(&file))?;
        out.push(Figure {
            file,
            caption: format!(
                "{name} (green) registered onto {ref_name} (magenta), echo-combined \
                 magnitudes: grey where they agree, coloured fringes where edges are apart"
            ),
            range: (0.0, 1.0),
            units: String::new(),
            diverging: false,
            projection: false,
        });
    }
    Ok(out)
}

/// Writes `OUTPUT_DIR/sub-<label>.html` and its figures from what is on disk; returns the
/// page's path.
pub fn subject(output_dir: &Path, bids_root: &Path, label: &str) -> Result<PathBuf> {
    let sub_dir = output_dir.join(format!("sub-{label}"));
    let fig_dir = sub_dir.join("figures");
    std::fs::create_dir_all(&fig_dir).map_err(|e| Error::io(&fig_dir, e))?;
    crate::io::partial::remove_stale_in(&fig_dir);
    let mut sections = Vec::new();
    for found in find_outputs(&sub_dir) {
        let checks = match &found.qc {
            Some(p) => qc::read_json(p)?.1,
            None => Vec::new(),
        };
        let figs = figures(&found, bids_root, &fig_dir)?;
        let registration = registration_figures(&found, &fig_dir)?;
        let chimaps: Vec<(String, Value)> = found
            .chimaps
            .iter()
            .map(|(m, p)| (m.clone(), read_sidecar(p)))
            .collect();
        sections.push(html::Section {
            name: found.prefix.clone(),
            checks,
            figures: figs,
            registration,
            chimaps,
        });
    }
    let page = html::subject_page(label, &sections);
    let path = output_dir.join(format!("sub-{label}.html"));
    io::write_atomic(&path, page.as_bytes())?;
    Ok(path)
}
