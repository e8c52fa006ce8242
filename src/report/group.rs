//! The group level: every acquisition of OUTPUT_DIR in one table (`group_qc.tsv`: QC values
//! and verdicts, χ statistics over the mask or per label of a segmentation) and one page
//! (`group.html`) with a dot plot per value across acquisitions, robust outliers ringed.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use super::html::{escape, head};
use super::{find_outputs, read_map, Found};
use crate::preprocess::util::quantile;
use crate::qc::{self, Limits, Verdict};
use crate::{io, Error, Result};

/// One acquisition's row.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub subject: String,
    pub session: String,
    pub acquisition: String,
    pub verdict: String,
    /// Column → value, in column order of first appearance across rows.
    pub values: Vec<(String, f64)>,
    pub verdicts: BTreeMap<String, Verdict>,
    pub limits: BTreeMap<String, Limits>,
}

/// χ summary statistics of `chi` over `region`: mean, sd, 5th, 50th, 95th percentile.
pub fn chi_stats(chi: &[f32], region: &[bool]) -> Option<[f64; 5]> {
    let sel: Vec<f64> = chi
        .iter()
        .zip(region)
        .filter(|(_, &m)| m)
        .map(|(&v, _)| v as f64)
        .collect();
    if sel.is_empty() {
        return None;
    }
    let n = sel.len() as f64;
    let mean = sel.iter().sum::<f64>() / n;
    let sd = (sel.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    let q = |p| quantile(chi, Some(region), p).map_or(f64::NAN, |v| v as f64);
    Some([mean, sd, q(0.05), q(0.5), q(0.95)])
}

/// A segmentation for `prefix` in `seg_dir`: a file named `<prefix>_…dseg.nii.gz`.
fn find_seg(seg_dir: &Path, prefix: &str) -> Option<PathBuf> {
    walkdir::WalkDir::new(seg_dir)
        .into_iter()
        .filter_map(|e| e.ok())
        .map(|e| e.into_path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&format!("{prefix}_")) && n.ends_with("dseg.nii.gz")
            })
        })
}

fn row_of(found: &Found, seg_dir: Option<&Path>) -> Result<Row> {
    let mut row = Row {
        subject: found.entity("sub").unwrap_or_default(),
        session: found.entity("ses").unwrap_or_default(),
        acquisition: found.prefix.clone(),
        verdict: "none".into(),
        ..Row::default()
    };
    if let Some(p) = &found.qc {
        let (_, checks) = qc::read_json(p)?;
        row.verdict = qc::overall(&checks).as_str().into();
        for c in checks {
            row.values.push((c.name.clone(), c.value));
            row.verdicts.insert(c.name.clone(), c.verdict);
            row.limits.insert(c.name, c.threshold);
        }
    }
    let mask_path = found
        .map("eroded", "mask")
        .or_else(|| found.map("brain", "mask"));
    let mask = mask_path.as_deref().and_then(read_map);
    let seg = match (seg_dir, &mask) {
        (Some(dir), _) => match find_seg(dir, &found.prefix) {
            Some(p) => Some((
                read_map(&p).ok_or_else(|| {
                    Error::input(&p, "cannot be read as a segmentation (integer labels, 3D)")
                })?,
                p,
            )),
            None => None,
        },
        _ => None,
    };
    for (method, path) in &found.chimaps {
        let Some(chi) = read_map(path) else { continue };
        let region: Vec<bool> = match &mask {
            Some(m) if m.len() == chi.len() => m.data.iter().map(|&v| v > 0.5).collect(),
            _ => chi.data.iter().map(|&v| v != 0.0).collect(),
        };
        if let Some(s) = chi_stats(&chi.data, &region) {
            for (name, v) in ["mean", "sd", "p05", "median", "p95"].iter().zip(s) {
                row.values.push((format!("chi_{method}_{name}"), v));
            }
        }
        if let Some((seg, seg_path)) = &seg {
            if seg.dims != chi.dims {
                return Err(Error::input(
                    seg_path,
                    format!(
                        "grid {:?} differs from the Chimap's {:?}: resample the segmentation \
                         to the acquisition's grid",
                        seg.dims, chi.dims
                    ),
                ));
            }
            let labels: std::collections::BTreeSet<i64> = seg
                .data
                .iter()
                .map(|&v| v.round() as i64)
                .filter(|&l| l > 0)
                .collect();
            for l in labels {
                let region: Vec<bool> = seg.data.iter().map(|&v| v.round() as i64 == l).collect();
                if let Some(s) = chi_stats(&chi.data, &region) {
                    row.values
                        .push((format!("chi_{method}_label{l}_mean"), s[0]));
                    row.values.push((format!("chi_{method}_label{l}_sd"), s[1]));
                }
            }
        }
    }
    Ok(row)
}

/// Every column, in order of first appearance.
fn columns(rows: &[Row]) -> Vec<String> {
    let mut cols: Vec<String> = Vec::new();
    for r in rows {
        for (c, _) in &r.values {
            if !cols.contains(c) {
                cols.push(c.clone());
            }
        }
    }
    cols
}

fn value(row: &Row, col: &str) -> Option<f64> {
    row.values.iter().find(|(c, _)| c == col).map(|(_, v)| *v)
}

/// The TSV: fixed columns, then each value (and, for checks, its verdict).
pub fn tsv(rows: &[Row]) -> String {
    let cols = columns(rows);
    let mut head = vec!["subject", "session", "acquisition", "qc_verdict"]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
    for c in &cols {
        head.push(c.clone());
        if rows.iter().any(|r| r.verdicts.contains_key(c)) {
            head.push(format!("{c}_verdict"));
        }
    }
    let mut s = head.join("\t") + "\n";
    for r in rows {
        let mut cells = vec![
            r.subject.clone(),
            r.session.clone(),
            r.acquisition.clone(),
            r.verdict.clone(),
        ];
        for c in &cols {
            cells.push(value(r, c).map_or("n/a".into(), |v| format!("{v}")));
            if rows.iter().any(|r| r.verdicts.contains_key(c)) {
                cells.push(r.verdicts.get(c).map_or("n/a", |v| v.as_str()).into());
            }
        }
        s.push_str(&cells.join("\t"));
        s.push('\n');
    }
    s
}

/// Indices of robust outliers: beyond 3 scaled median absolute deviations from the median
/// (with at least 4 values; none when the spread is zero).
pub fn outliers(values: &[f64]) -> Vec<usize> {
    let finite: Vec<f32> = values
        .iter()
        .filter(|v| v.is_finite())
        .map(|&v| v as f32)
        .collect();
    if finite.len() < 4 {
        return Vec::new();
    }
    let med = quantile(&finite, None, 0.5).unwrap_or(0.0) as f64;
    let dev: Vec<f32> = finite
        .iter()
        .map(|&v| (v as f64 - med).abs() as f32)
        .collect();
    let mad = 1.4826 * quantile(&dev, None, 0.5).unwrap_or(0.0) as f64;
    if mad <= 0.0 {
        return Vec::new();
    }
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| v.is_finite() && (*v - med).abs() > 3.0 * mad)
        .map(|(i, _)| i)
        .collect()
}

fn verdict_colour(v: Option<&Verdict>) -> &'static str {
    match v {
        Some(Verdict::Pass) => "#3c763d",
        Some(Verdict::Warn) => "#c09853",
        Some(Verdict::Fail) => "#b94a48",
        None => "#31708f",
    }
}

/// An inline SVG dot plot of one column across rows, limits dashed, outliers ringed.
fn plot(rows: &[Row], col: &str) -> String {
    let (w, h, left, pad) = (640.0, 160.0, 70.0, 14.0);
    let vals: Vec<f64> = rows
        .iter()
        .map(|r| value(r, col).unwrap_or(f64::NAN))
        .collect();
    let limits = rows.iter().find_map(|r| r.limits.get(col)).copied();
    let mut ys: Vec<f64> = vals.iter().copied().filter(|v| v.is_finite()).collect();
    if let Some(l) = limits {
        // Show a limit only when it is near the data, so the points keep their spread.
        ys.extend(
            [l.warn_below, l.warn_above, l.fail_below, l.fail_above]
                .into_iter()
                .flatten(),
        );
    }
    let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi - lo <= 1e-12 * hi.abs().max(1e-12) {
        (lo - 0.5 * lo.abs().max(1.0), hi + 0.5 * hi.abs().max(1.0))
    } else {
        (lo, hi)
    };
    let y_of = |v: f64| pad + (h - 2.0 * pad) * (1.0 - (v - lo) / (hi - lo));
    let x_of = |i: usize| left + (w - left - pad) * (i as f64 + 0.5) / vals.len().max(1) as f64;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" role=\"img\" \
         aria-label=\"{0}\"><rect x=\"{left}\" y=\"0\" width=\"{1}\" height=\"{h}\" fill=\"#fafafa\" \
         stroke=\"#ccc\"/><text x=\"4\" y=\"{2}\" font-size=\"10\">{3}</text>\
         <text x=\"4\" y=\"{4}\" font-size=\"10\">{5}</text>",
        escape(col),
        w - left,
        y_of(hi) + 4.0,
        qc::format_value(hi),
        y_of(lo),
        qc::format_value(lo)
    );
    if let Some(l) = limits {
        for (v, colour) in [
            (l.warn_below, "#c09853"),
            (l.warn_above, "#c09853"),
            (l.fail_below, "#b94a48"),
            (l.fail_above, "#b94a48"),
        ] {
            if let Some(v) = v {
                let _ = write!(
                    s,
                    "<line x1=\"{left}\" x2=\"{w}\" y1=\"{0}\" y2=\"{0}\" stroke=\"{colour}\" \
                     stroke-dasharray=\"4 3\"/>",
                    y_of(v)
                );
            }
        }
    }
    let out = outliers(&vals);
    for (i, (v, r)) in vals.iter().zip(rows).enumerate() {
        if !v.is_finite() {
            continue;
        }
        let (x, y) = (x_of(i), y_of(*v));
        let _ = write!(
            s,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{}\"><title>{}: {}</title></circle>",
            verdict_colour(r.verdicts.get(col)),
            escape(&r.acquisition),
            qc::format_value(*v)
        );
        if out.contains(&i) {
            let _ = write!(
                s,
                "<circle class=\"outlier\" cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"8\" fill=\"none\" \
                 stroke=\"#d9534f\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\" \
                 font-size=\"10\" fill=\"#d9534f\">{}</text>",
                x + 9.0,
                y + 3.0,
                escape(&r.acquisition)
            );
        }
    }
    s.push_str("</svg>");
    s
}

/// The group page: the table, then one plot per column.
pub fn page(rows: &[Row]) -> String {
    let cols = columns(rows);
    let mut s = head("chimap group report");
    let _ = writeln!(
        s,
        "<h1>chimap {}: group report</h1><p>{} acquisition(s). Dots are coloured by verdict \
         (green pass, amber warn, red fail, blue: no check); dashed lines are the limits; \
         ringed dots lie more than 3 robust SDs from the median.</p>",
        crate::VERSION,
        rows.len()
    );
    s.push_str("<table><tr><th>acquisition</th><th>verdict</th></tr>\n");
    for r in rows {
        let _ = writeln!(
            s,
            "<tr class=\"{0}\"><td><a href=\"sub-{1}.html#{2}\">{2}</a></td><td>{0}</td></tr>",
            escape(&r.verdict),
            escape(&r.subject),
            escape(&r.acquisition)
        );
    }
    s.push_str("</table>\n");
    for c in &cols {
        let _ = writeln!(s, "<h2>{}</h2>\n{}", escape(c), plot(rows, c));
    }
    s.push_str("</body></html>\n");
    s
}

/// `chimap BIDS_DIR OUTPUT_DIR group`: reads OUTPUT_DIR, writes `group_qc.tsv` and
/// `group.html` there; returns their paths.
pub fn run(output_dir: &Path, seg_dir: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    if !output_dir.is_dir() {
        return Err(Error::Usage(format!(
            "OUTPUT_DIR {} does not exist: run the participant level first",
            output_dir.display()
        )));
    }
    let found: Vec<Found> = find_outputs(output_dir);
    if found.is_empty() {
        return Err(Error::Usage(format!(
            "OUTPUT_DIR {} holds no chimap outputs (no *_desc-qc.json or *_Chimap.nii.gz): \
             run the participant level first",
            output_dir.display()
        )));
    }
    let rows = found
        .iter()
        .map(|f| row_of(f, seg_dir))
        .collect::<Result<Vec<Row>>>()?;
    let tsv_path = output_dir.join("group_qc.tsv");
    io::write_atomic(&tsv_path, tsv(&rows).as_bytes())?;
    let html_path = output_dir.join("group.html");
    io::write_atomic(&html_path, page(&rows).as_bytes())?;
    Ok((tsv_path, html_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_stats_match_a_direct_computation() {
        let chi = [1.0f32, 2.0, 3.0, 4.0, 100.0];
        let region = [true, true, true, true, false];
        let s = chi_stats(&chi, &region).unwrap();
        assert!((s[0] - 2.5).abs() < 1e-12);
        assert!((s[1] - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(s[3], 3.0); // the median as the shared quantile helper rounds it
        assert!(chi_stats(&chi, &[false; 5]).is_none());
    }

    #[test]
    fn outliers_are_robust_and_need_spread() {
        let v = [1.0, 1.1, 0.9, 1.05, 0.95, 5.0, f64::NAN];
        assert_eq!(outliers(&v), vec![5]);
        assert!(outliers(&[1.0, 1.0, 1.0, 9.0]).is_empty());
        assert!(outliers(&[1.0, 9.0]).is_empty());
    }

    #[test]
    fn tsv_has_one_row_per_acquisition_and_n_a_for_missing_values() {
        let mut a = Row {
            subject: "1".into(),
            acquisition: "sub-1_acq-a".into(),
            verdict: "pass".into(),
            ..Row::default()
        };
        a.values.push(("residual_background".into(), 0.1));
        a.verdicts
            .insert("residual_background".into(), Verdict::Pass);
        let mut b = a.clone();
        b.acquisition = "sub-1_acq-b".into();
        b.values.push(("chi_tkd_mean".into(), 0.01));
        let t = tsv(&[a, b]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            "subject\tsession\tacquisition\tqc_verdict\tresidual_background\tresidual_background_verdict\tchi_tkd_mean"
        );
        assert!(lines[1].ends_with("\t0.1\tpass\tn/a"), "{}", lines[1]);
        assert!(lines[2].ends_with("\t0.01"), "{}", lines[2]);
        let html = page(&[]);
        assert!(html.contains("0 acquisition(s)"));
    }
}
