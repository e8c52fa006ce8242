//! `chimap evaluate`: reads the reference, the mask, an optional segmentation and the maps,
//! checks that they share one grid and hold numbers, scores every map, prints a table and
//! optionally writes the scores as JSON.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::metrics::{self, Scores};
use crate::{io, Error, Geometry, Result, Volume};

#[derive(clap::Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// The reference χ map (ground truth), ppm.
    #[arg(long, value_name = "REF.nii.gz")]
    pub reference: PathBuf,
    /// Evaluation mask: voxels > 0.5 are scored.
    #[arg(long, value_name = "MASK.nii.gz")]
    pub mask: PathBuf,
    /// Integer label map (0 = background): adds per-label mean χ of every map and of the
    /// reference, and the slope of map means against reference means.
    #[arg(long, value_name = "SEG.nii.gz")]
    pub seg: Option<PathBuf>,
    /// Also write the scores to this JSON file (written atomically).
    #[arg(long, value_name = "OUT.json")]
    pub json: Option<PathBuf>,
    /// The χ maps to score, ppm, on the reference's grid.
    #[arg(value_name = "CHI.nii.gz", required = true)]
    pub maps: Vec<PathBuf>,
}

/// One scored map.
pub struct Evaluation {
    pub path: PathBuf,
    pub scores: Scores,
}

/// Runs the command: scores, table on stdout, JSON if asked.
pub fn run(args: &EvaluateArgs) -> Result<()> {
    let (results, mask_voxels) = evaluate(args)?;
    print!("{}", table(&results, args.seg.is_some()));
    if let Some(path) = &args.json {
        io::write_json(path, &to_json(args, &results, mask_voxels))?;
    }
    Ok(())
}

/// Reads every input and scores every map; returns the evaluations and the mask size.
pub fn evaluate(args: &EvaluateArgs) -> Result<(Vec<Evaluation>, usize)> {
    let reference = read_map(&args.reference)?;
    let mask_vol = read_3d(&args.mask)?;
    same_grid(&reference, &args.reference, &mask_vol, &args.mask)?;
    let mask: Vec<bool> = mask_vol.data.iter().map(|&v| v > 0.5).collect();
    let mask_voxels = mask.iter().filter(|&&m| m).count();
    if mask_voxels == 0 {
        return Err(Error::input(
            &args.mask,
            "the mask is empty: it must mark the voxels to score with values of 1",
        ));
    }
    if mask_voxels < 2 {
        return Err(Error::input(
            &args.mask,
            "the mask marks a single voxel: NRMSE and correlation need at least two",
        ));
    }
    let labels = match &args.seg {
        Some(p) => {
            let seg = read_3d(p)?;
            same_grid(&reference, &args.reference, &seg, p)?;
            let labels = labels_of(&seg, p)?;
            if !labels.iter().zip(&mask).any(|(&l, &m)| m && l > 0) {
                return Err(Error::input(
                    p,
                    "has no label > 0 inside the mask: label the regions to average with 1, 2, …",
                ));
            }
            Some(labels)
        }
        None => None,
    };
    check_reference(&reference, &args.reference, &mask)?;
    // Check every map before the slow part, so a bad file fails fast.
    for path in &args.maps {
        same_grid_header(&reference, &args.reference, path)?;
    }
    let prepared = metrics::Reference::new(&reference.data, &mask, reference.dims);
    let mut out = Vec::with_capacity(args.maps.len());
    for path in &args.maps {
        let map = read_map(path)?;
        same_grid(&reference, &args.reference, &map, path)?;
        let scores = prepared.score(&map.data, labels.as_deref());
        out.push(Evaluation {
            path: path.clone(),
            scores,
        });
    }
    Ok((out, mask_voxels))
}

fn read_3d(path: &Path) -> Result<Volume> {
    let mut image = io::read_image(path)?;
    if image.frames.len() != 1 {
        return Err(Error::input(
            path,
            format!(
                "is 4D ({} volumes): pass one 3D volume per file",
                image.frames.len()
            ),
        ));
    }
    Ok(image.frames.remove(0))
}

/// A χ map: 3D, finite everywhere.
fn read_map(path: &Path) -> Result<Volume> {
    let v = read_3d(path)?;
    if let Some(bad) = v.data.iter().position(|x| !x.is_finite()) {
        let [nx, ny, _] = v.dims;
        let (i, j, k) = (bad % nx, (bad / nx) % ny, bad / (nx * ny));
        return Err(Error::input(
            path,
            format!(
                "contains NaN or Inf (first at voxel ({i}, {j}, {k})): set voxels without a value to 0"
            ),
        ));
    }
    Ok(v)
}

fn check_reference(reference: &Volume, path: &Path, mask: &[bool]) -> Result<()> {
    let mut inside = reference.data.iter().zip(mask).filter(|(_, &m)| m);
    let first = inside.next().map(|(&v, _)| v).unwrap_or(0.0);
    if inside.all(|(&v, _)| v == first) {
        return Err(Error::input(
            path,
            "the reference is constant inside the mask: the metrics need a reference with contrast; check the mask and the reference",
        ));
    }
    Ok(())
}

/// Labels as integers; anything else is an error naming the file.
fn labels_of(seg: &Volume, path: &Path) -> Result<Vec<u32>> {
    seg.data
        .iter()
        .map(|&v| {
            let r = v.round();
            if v.is_finite() && (v - r).abs() <= 1e-3 && (0.0..=u32::MAX as f32).contains(&r) {
                Ok(r as u32)
            } else {
                Err(Error::input(
                    path,
                    format!("holds {v}, not a label: a segmentation holds integers ≥ 0 (0 = background)"),
                ))
            }
        })
        .collect()
}

/// The grid check from the header alone (no voxels read).
fn same_grid_header(a: &Volume, path_a: &Path, path_b: &Path) -> Result<()> {
    let h = io::read_header(path_b)?;
    grid_matches(a, path_a, h.dims, &h.geometry, path_b)?;
    if h.frames != 1 {
        return Err(Error::input(
            path_b,
            format!("is 4D ({} volumes): pass one 3D volume per file", h.frames),
        ));
    }
    Ok(())
}

/// Errors unless `b` has the grid of `a` (dims and, within 0.1 %, voxel size).
fn same_grid(a: &Volume, path_a: &Path, b: &Volume, path_b: &Path) -> Result<()> {
    grid_matches(a, path_a, b.dims, &b.geometry, path_b)
}

fn grid_matches(
    a: &Volume,
    path_a: &Path,
    dims: [usize; 3],
    geometry: &Geometry,
    path_b: &Path,
) -> Result<()> {
    let vox_ok = a
        .geometry
        .voxel_size
        .iter()
        .zip(&geometry.voxel_size)
        .all(|(x, y)| (x - y).abs() <= 1e-3 * x.abs().max(1e-6));
    if a.dims != dims || !vox_ok {
        return Err(Error::input(
            path_b,
            format!(
                "grid {:?} with voxels {:?} mm does not match the reference {} ({:?}, {:?} mm): \
                 resample the maps, mask and segmentation onto the reference grid",
                dims,
                geometry.voxel_size,
                path_a.display(),
                a.dims,
                a.geometry.voxel_size
            ),
        ));
    }
    Ok(())
}

fn cell(v: f64, decimals: usize) -> String {
    if v.is_finite() {
        format!("{v:.decimals$}")
    } else {
        "n/a".into()
    }
}

/// The scores as aligned text: one row per map; with labels, a second table of label means.
pub fn table(results: &[Evaluation], with_labels: bool) -> String {
    let mut head = vec![
        "map",
        "RMSE%",
        "dNRMSE%",
        "detNRMSE%",
        "HFEN%",
        "SSIM",
        "XSIM",
        "corr",
    ];
    if with_labels {
        head.push("slope");
    }
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|s| s.to_string()).collect()];
    for e in results {
        let s = &e.scores;
        let mut row = vec![
            e.path.display().to_string(),
            cell(s.rmse, 2),
            cell(s.nrmse_demeaned, 2),
            cell(s.nrmse_detrended, 2),
            cell(s.hfen, 2),
            cell(s.ssim, 4),
            cell(s.xsim, 4),
            cell(s.correlation, 4),
        ];
        if with_labels {
            row.push(cell(s.label_slope.unwrap_or(f64::NAN), 3));
        }
        rows.push(row);
    }
    let mut out = aligned(&rows);
    if with_labels {
        if let Some(first) = results.first() {
            let mut head = vec!["label".to_string(), "voxels".into(), "reference".into()];
            head.extend(results.iter().map(|e| e.path.display().to_string()));
            let mut rows = vec![head];
            for (i, l) in first.scores.labels.iter().enumerate() {
                let mut row = vec![
                    l.label.to_string(),
                    l.voxels.to_string(),
                    cell(l.reference, 4),
                ];
                row.extend(results.iter().map(|e| cell(e.scores.labels[i].map, 4)));
                rows.push(row);
            }
            out.push_str("\nmean χ (ppm) per label, inside the mask:\n");
            out.push_str(&aligned(&rows));
        }
    }
    out
}

/// First column left-aligned, the others right-aligned, two spaces apart.
fn aligned(rows: &[Vec<String>]) -> String {
    let ncol = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let width: Vec<usize> = (0..ncol)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (c, s) in r.iter().enumerate() {
            let pad = width[c] - s.chars().count();
            if c == 0 {
                let _ = write!(line, "{s}{}", " ".repeat(pad));
            } else {
                let _ = write!(line, "  {}{s}", " ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// NaN becomes `null` (JSON has no NaN).
fn num(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// The scores as JSON, with the inputs and the metric settings.
pub fn to_json(args: &EvaluateArgs, results: &[Evaluation], mask_voxels: usize) -> Value {
    let maps: Vec<Value> = results
        .iter()
        .map(|e| {
            let s = &e.scores;
            let mut m = json!({
                "path": e.path.display().to_string(),
                "rmse": num(s.rmse),
                "nrmse_demeaned": num(s.nrmse_demeaned),
                "nrmse_detrended": num(s.nrmse_detrended),
                "detrend_scale": num(s.detrend_scale),
                "hfen": num(s.hfen),
                "ssim": num(s.ssim),
                "xsim": num(s.xsim),
                "correlation": num(s.correlation),
            });
            if let Some(slope) = s.label_slope {
                m["label_slope"] = num(slope);
                m["labels"] = s
                    .labels
                    .iter()
                    .map(|l| json!({"label": l.label, "mean": num(l.map)}))
                    .collect();
            }
            m
        })
        .collect();
    let mut out = json!({
        "chimap_version": crate::VERSION,
        "reference": args.reference.display().to_string(),
        "mask": args.mask.display().to_string(),
        "mask_voxels": mask_voxels,
        "units": {"rmse": "%", "nrmse_demeaned": "%", "nrmse_detrended": "%", "hfen": "%", "means": "ppm"},
        "settings": {
            "hfen": {"log_sigma_voxels": metrics::HFEN_SIGMA, "kernel_size": 2 * metrics::HFEN_HALF_WIDTH + 1},
            "ssim": {"k1": metrics::SSIM.k1, "k2": metrics::SSIM.k2, "scaling": "reference range in the mask to [0, 1], clipped",
                     "window_sigma_voxels": metrics::SSIM.sigma, "window_size": 2 * metrics::SSIM.half_width + 1},
            "xsim": {"k1": metrics::XSIM.k1, "k2": metrics::XSIM.k2, "range_ppm": metrics::XSIM.range,
                     "window_sigma_voxels": metrics::XSIM.sigma, "window_size": 2 * metrics::XSIM.half_width + 1},
        },
        "maps": maps,
    });
    if let (Some(seg), Some(first)) = (&args.seg, results.first()) {
        out["seg"] = json!(seg.display().to_string());
        out["labels"] = first
            .scores
            .labels
            .iter()
            .map(|l| json!({"label": l.label, "voxels": l.voxels, "reference_mean": num(l.reference)}))
            .collect();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, dims: [usize; 3], data: Vec<f32>) -> PathBuf {
        let p = dir.join(name);
        io::write_volume(
            &p,
            &Volume::new(dims, data, Geometry::from_voxel_size([1.0; 3])),
        )
        .unwrap();
        p
    }

    fn args(reference: &Path, mask: &Path, seg: Option<&Path>, maps: &[&Path]) -> EvaluateArgs {
        EvaluateArgs {
            reference: reference.into(),
            mask: mask.into(),
            seg: seg.map(Into::into),
            json: None,
            maps: maps.iter().map(|p| p.to_path_buf()).collect(),
        }
    }

    #[test]
    fn bad_inputs_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let dims = [4, 4, 4];
        let r: Vec<f32> = (0..64).map(|i| (i % 5) as f32 * 0.01).collect();
        let rp = write(d, "ref.nii.gz", dims, r.clone());
        let mp = write(d, "mask.nii.gz", dims, vec![1.0; 64]);
        let empty = write(d, "empty.nii.gz", dims, vec![0.0; 64]);
        let small = write(d, "small.nii.gz", [4, 4, 3], vec![0.0; 48]);
        let mut nan = r.clone();
        nan[1 + 4 * (2 + 4 * 3)] = f32::NAN;
        let nanp = write(d, "nan.nii.gz", dims, nan);
        let badseg = write(d, "seg.nii.gz", dims, vec![0.5; 64]);

        let err = |a: EvaluateArgs| evaluate(&a).err().expect("should fail").to_string();
        let e = err(args(&rp, &empty, None, &[&rp]));
        assert!(e.contains("empty.nii.gz") && e.contains("empty"), "{e}");
        let e = err(args(&rp, &mp, None, &[&small]));
        assert!(
            e.contains("small.nii.gz") && e.contains("ref.nii.gz"),
            "{e}"
        );
        let e = err(args(&rp, &small, None, &[&rp]));
        assert!(e.contains("small.nii.gz"), "{e}");
        let e = err(args(&rp, &mp, None, &[&rp, &nanp]));
        assert!(
            e.contains("nan.nii.gz") && e.contains("NaN") && e.contains("(1, 2, 3)"),
            "{e}"
        );
        let e = err(args(&nanp, &mp, None, &[&rp]));
        assert!(e.contains("nan.nii.gz"), "{e}");
        let e = err(args(&rp, &mp, Some(&badseg), &[&rp]));
        assert!(e.contains("seg.nii.gz") && e.contains("label"), "{e}");
        let e = err(args(&rp, &mp, Some(&small), &[&rp]));
        assert!(e.contains("small.nii.gz"), "{e}");
        let flat = write(d, "flat.nii.gz", dims, vec![0.2; 64]);
        let e = err(args(&flat, &mp, None, &[&rp]));
        assert!(e.contains("flat.nii.gz") && e.contains("constant"), "{e}");
        let zeros = write(d, "zeros.nii.gz", dims, vec![0.0; 64]);
        let e = err(args(&rp, &mp, Some(&zeros), &[&rp]));
        assert!(e.contains("zeros.nii.gz") && e.contains("no label"), "{e}");
    }

    #[test]
    fn table_aligns_columns_and_prints_undefined_values_as_na() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let dims = [4, 4, 4];
        let r: Vec<f32> = (0..64).map(|i| (i % 7) as f32 * 0.01).collect();
        let rp = write(d, "ref.nii.gz", dims, r.clone());
        let mp = write(d, "mask.nii.gz", dims, vec![1.0; 64]);
        let zp = write(d, "a_much_longer_name.nii.gz", dims, vec![0.0; 64]);
        let seg: Vec<f32> = (0..64).map(|i| (i % 3) as f32).collect();
        let sp = write(d, "seg.nii.gz", dims, seg);
        let (res, n) = evaluate(&args(&rp, &mp, Some(&sp), &[&rp, &zp])).unwrap();
        assert_eq!(n, 64);
        let t = table(&res, true);
        let lines: Vec<&str> = t.lines().collect();
        // Header and two rows of the same width, then the label table.
        assert_eq!(lines[0].len(), lines[1].len(), "{t}");
        // Maps are named as given on the command line.
        assert!(lines[1].starts_with(&format!("{} ", rp.display())), "{t}");
        assert!(lines[2].starts_with(&zp.display().to_string()), "{t}");
        // The zero map has no correlation.
        assert!(lines[2].contains("n/a"), "{t}");
        assert!(t.contains("mean χ (ppm) per label"), "{t}");
        let v = to_json(&args(&rp, &mp, Some(&sp), &[&rp, &zp]), &res, n);
        assert!(v["maps"][1]["correlation"].is_null());
        assert_eq!(v["maps"][0]["correlation"], 1.0);
        assert_eq!(v["labels"].as_array().unwrap().len(), 2);
    }
}
