//! ITK text transform files (`#Insight Transform File V1.0`), as ANTs and fMRIPrep read them.
//!
//! ITK works in LPS world coordinates, NIfTI (and chimap) in RAS: the two differ by
//! `F = diag(−1, −1, 1)`, so the file holds `F·R·F`, `F·t` and the centre `F·c`. ITK's
//! `AffineTransform` maps `x ↦ M·(x − c) + c + t`, from the fixed (reference) space to the
//! moving one, which is the direction of [`Rigid`] — the transform that resamples the
//! orientation onto the reference.

use std::path::Path;

use super::rigid::Rigid;
use crate::{Error, Result};

const MAGIC: &str = "#Insight Transform File V1.0";
const KIND: &str = "AffineTransform_double_3_3";
const FLIP: [f64; 3] = [-1.0, -1.0, 1.0];

/// The file's text.
pub fn to_text(t: &Rigid) -> String {
    let mut params = Vec::with_capacity(12);
    for r in 0..3 {
        for c in 0..3 {
            params.push(FLIP[r] * t.rotation[r][c] * FLIP[c]);
        }
    }
    params.extend((0..3).map(|a| FLIP[a] * t.translation[a]));
    let fixed: Vec<f64> = (0..3).map(|a| FLIP[a] * t.centre[a]).collect();
    let join = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.17e}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    format!(
        "{MAGIC}\n#Transform 0\nTransform: {KIND}\nParameters: {}\nFixedParameters: {}\n",
        join(&params),
        join(&fixed)
    )
}

/// Reads a file written by [`to_text`] (or by ITK, for an affine that is a rotation).
pub fn from_text(text: &str, path: &Path) -> Result<Rigid> {
    let bad = |what: &str| Error::input(path, format!("is not a rigid ITK transform: {what}"));
    if text.lines().next().map(str::trim) != Some(MAGIC) {
        return Err(bad("the first line is not '#Insight Transform File V1.0'"));
    }
    let field = |key: &str| -> Result<Vec<f64>> {
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .ok_or_else(|| bad(&format!("no '{key}' line")))?;
        line.split_whitespace()
            .map(|w| {
                w.parse::<f64>()
                    .map_err(|_| bad(&format!("'{w}' in '{key}' is not a number")))
            })
            .collect()
    };
    let kind = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Transform:"))
        .map(str::trim)
        .ok_or_else(|| bad("no 'Transform:' line"))?;
    if kind != KIND && kind != "MatrixOffsetTransformBase_double_3_3" {
        return Err(bad(&format!("type {kind}, expected {KIND}")));
    }
    let p = field("Parameters:")?;
    let c = field("FixedParameters:")?;
    if p.len() != 12 || c.len() != 3 || p.iter().chain(&c).any(|v| !v.is_finite()) {
        return Err(bad("expected 12 finite parameters and 3 fixed parameters"));
    }
    let mut rotation = [[0.0; 3]; 3];
    for r in 0..3 {
        for col in 0..3 {
            rotation[r][col] = FLIP[r] * p[3 * r + col] * FLIP[col];
        }
    }
    // A rotation has orthonormal rows and determinant +1; anything else is not ours to reuse.
    let rt = super::rigid::mul(&rotation, &super::rigid::transpose(&rotation));
    let off = (0..3)
        .flat_map(|i| (0..3).map(move |j| (i, j)))
        .map(|(i, j)| (rt[i][j] - if i == j { 1.0 } else { 0.0 }).abs())
        .fold(0.0f64, f64::max);
    if off > 1e-6 {
        return Err(bad("the matrix is not a rotation (scaling or shear)"));
    }
    Ok(Rigid {
        rotation,
        translation: [0, 1, 2].map(|a| FLIP[a] * p[9 + a]),
        centre: [0, 1, 2].map(|a| FLIP[a] * c[a]),
    })
}

pub fn read(path: &Path) -> Result<Rigid> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    from_text(&text, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_is_in_lps() {
        let t =
            Rigid::from_rotation_vector([0.1, 0.2, -0.05], [1.5, -2.0, 3.0], [10.0, 20.0, 30.0]);
        let text = to_text(&t);
        assert!(text.starts_with(MAGIC));
        let back = from_text(&text, Path::new("x.txt")).unwrap();
        let p = [3.0, -7.0, 11.0];
        let (a, b) = (t.apply(p), back.apply(p));
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-9));
        // The centre is stored in LPS: x and y negated.
        let fixed = text
            .lines()
            .find(|l| l.starts_with("FixedParameters"))
            .unwrap();
        let c: Vec<f64> = fixed[16..]
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        assert_eq!(c, vec![-10.0, -20.0, 30.0]);
        // An LPS point mapped by the file's matrix equals the flipped RAS result.
        let lps = |v: [f64; 3]| [-v[0], -v[1], v[2]];
        let params: Vec<f64> = text.lines().find(|l| l.starts_with("Parameters")).unwrap()[11..]
            .split_whitespace()
            .map(|w| w.parse().unwrap())
            .collect();
        let x = lps(p);
        let cl = lps(t.centre);
        let mapped: Vec<f64> = (0..3)
            .map(|r| {
                (0..3)
                    .map(|k| params[3 * r + k] * (x[k] - cl[k]))
                    .sum::<f64>()
                    + cl[r]
                    + params[9 + r]
            })
            .collect();
        let want = lps(a);
        assert!(mapped.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-9));
    }

    #[test]
    fn damaged_files_are_errors_naming_the_file() {
        let p = Path::new("sub-01_xfm.txt");
        for text in [
            "hello",
            "#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: 1 0 0\nFixedParameters: 0 0 0\n",
            "#Insight Transform File V1.0\nTransform: AffineTransform_double_3_3\nParameters: 2 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n",
            "#Insight Transform File V1.0\nTransform: BSplineTransform_double_3_3\nParameters: 1 0 0 0 1 0 0 0 1 0 0 0\nFixedParameters: 0 0 0\n",
        ] {
            let e = from_text(text, p).unwrap_err().to_string();
            assert!(e.contains("sub-01_xfm.txt"), "{e}");
        }
    }
}
