//! Choosing a regularisation weight λ: a fixed number, or `auto`, the corner of the L-curve
//! (Hansen 1992): the point of maximum curvature of (log ‖data residual‖, log ‖regulariser‖)
//! over a coarse logarithmic scan of λ.

use serde::{Deserialize, Serialize};

use serde_json::{json, Value};

use crate::{Error, Result};

/// A configured λ: a number, or the word `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Lambda {
    Value(f64),
    Keyword(Keyword),
}

/// The only word λ accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Keyword {
    Auto,
}

impl Lambda {
    pub const AUTO: Lambda = Lambda::Keyword(Keyword::Auto);

    /// The fixed value, `None` for `auto`.
    pub fn value(self) -> Option<f64> {
        match self {
            Lambda::Value(v) => Some(v),
            Lambda::Keyword(Keyword::Auto) => None,
        }
    }
}

/// The λ scan of `auto`: `count` values spaced evenly in log between `min` and `max`, each
/// solved with at most `max_iterations` (the corner needs the curve's shape, not converged
/// maps).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Scan {
    pub min: f64,
    pub max: f64,
    pub count: usize,
    pub max_iterations: usize,
}

impl Default for Scan {
    /// Half-decade steps around TV's default λ (3·10⁻⁴ for fields in ppm).
    fn default() -> Self {
        Scan {
            min: 1e-5,
            max: 1e-2,
            count: 7,
            max_iterations: 30,
        }
    }
}

impl Scan {
    /// Fails with a message naming `section` unless the scan is usable.
    pub fn validate(&self, section: &str) -> Result<()> {
        let ok = self.min > 0.0
            && self.max > self.min
            && self.max.is_finite()
            && self.count >= 3
            && self.max_iterations > 0;
        if ok {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "{section}.lambda_scan: need 0 < min < max, count ≥ 3 and max_iterations ≥ 1, \
                 got min {}, max {}, count {}, max_iterations {}",
                self.min, self.max, self.count, self.max_iterations
            )))
        }
    }

    /// The scanned values, ascending.
    pub fn values(&self) -> Vec<f64> {
        let (a, b) = (self.min.ln(), self.max.ln());
        (0..self.count)
            .map(|i| (a + (b - a) * i as f64 / (self.count - 1) as f64).exp())
            .collect()
    }
}

/// One point of the L-curve.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Point {
    pub lambda: f64,
    /// The data term's norm, e.g. ‖W(Dχ − f)‖₂.
    pub residual: f64,
    /// The regulariser's value, e.g. ‖∇χ‖₁.
    pub regulariser: f64,
}

/// The index of the L-curve's corner among `points` (ascending, evenly spaced in log λ):
/// the interior point of largest signed curvature of (log residual, log regulariser) as
/// functions of log λ, by central differences. The curve falls steeply (regulariser drops,
/// residual flat) and then runs flat (residual grows); the turn between is anticlockwise,
/// so the corner is the largest positive curvature. Returns the index and whether it is a
/// corner: with no positive curvature (the scan misses the corner: the curve only bends
/// the other way) it is the least negative one; with no interior point or a degenerate
/// curve (non-positive values) the middle point.
pub fn corner(points: &[Point]) -> (usize, bool) {
    let n = points.len();
    let mid = n / 2;
    if n < 3
        || points
            .iter()
            .any(|p| !(p.residual > 0.0 && p.regulariser > 0.0))
    {
        return (mid, false);
    }
    let x: Vec<f64> = points.iter().map(|p| p.residual.ln()).collect();
    let y: Vec<f64> = points.iter().map(|p| p.regulariser.ln()).collect();
    let mut best = (mid, f64::NEG_INFINITY);
    for i in 1..n - 1 {
        let (dx, dy) = ((x[i + 1] - x[i - 1]) / 2.0, (y[i + 1] - y[i - 1]) / 2.0);
        let (ddx, ddy) = (
            x[i + 1] - 2.0 * x[i] + x[i - 1],
            y[i + 1] - 2.0 * y[i] + y[i - 1],
        );
        let speed = (dx * dx + dy * dy).powf(1.5);
        let kappa = if speed > 0.0 {
            (dx * ddy - dy * ddx) / speed
        } else {
            f64::NEG_INFINITY
        };
        if kappa > best.1 {
            best = (i, kappa);
        }
    }
    (best.0, best.1 > 0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_parses_numbers_and_auto_and_nothing_else() {
        let v: Lambda = serde_yaml::from_str("0.0003").unwrap();
        assert_eq!(v, Lambda::Value(3e-4));
        let v: Lambda = serde_yaml::from_str("3").unwrap();
        assert_eq!(v.value(), Some(3.0));
        let a: Lambda = serde_yaml::from_str("auto").unwrap();
        assert_eq!(a, Lambda::AUTO);
        assert_eq!(serde_json::to_value(a).unwrap(), serde_json::json!("auto"));
        assert!(serde_yaml::from_str::<Lambda>("often").is_err());
    }

    #[test]
    fn the_corner_of_a_sharp_l_is_found() {
        // Residual flat then growing, regulariser falling then flat: corner at λ = 1e-2.
        let lambdas = [1e-4, 1e-3, 1e-2, 1e-1, 1.0];
        let residual = [1.0, 1.01, 1.05, 3.0, 9.0];
        let regulariser = [100.0, 10.0, 1.0, 0.9, 0.85];
        let points: Vec<Point> = (0..5)
            .map(|i| Point {
                lambda: lambdas[i],
                residual: residual[i],
                regulariser: regulariser[i],
            })
            .collect();
        assert_eq!(corner(&points), (2, true));
        // Degenerate values fall back to the middle.
        let mut bad = points.clone();
        bad[0].regulariser = 0.0;
        assert_eq!(corner(&bad), (2, false));
        // Bending only clockwise (the regulariser falls faster and faster): no corner.
        let convex: Vec<Point> = (0..5)
            .map(|i| Point {
                lambda: lambdas[i],
                residual: (1.0 + i as f64) * 2.0,
                regulariser: 100.0 - (i * i) as f64 * 6.0,
            })
            .collect();
        assert!(!corner(&convex).1);
    }

    #[test]
    fn scan_values_are_log_spaced_and_bad_scans_are_config_errors() {
        let s = Scan {
            min: 1e-4,
            max: 1e-2,
            count: 3,
            max_iterations: 5,
        };
        let v = s.values();
        assert!((v[0] - 1e-4).abs() < 1e-12 && (v[1] - 1e-3).abs() < 1e-10);
        assert!((v[2] - 1e-2).abs() < 1e-9);
        let err = Scan { count: 2, ..s }.validate("inversion.tv").unwrap_err();
        assert!(
            err.to_string().contains("inversion.tv.lambda_scan"),
            "{err}"
        );
    }
}

/// How `auto` chose λ in a solve: the value, whether the scan held a corner, and the scan.
#[derive(Clone, Debug)]
pub struct Choice {
    pub lambda: f64,
    pub corner_found: bool,
    pub scan: Vec<Point>,
}

impl Choice {
    /// The corner of `scan` (in order of rising regularisation), logged for `method`; the
    /// warning when the scan holds no corner names the config `section` to widen.
    pub fn from_scan(scan: Vec<Point>, method: &str, section: &str) -> Choice {
        let (i, corner_found) = corner(&scan);
        let lambda = scan[i].lambda;
        if corner_found {
            tracing::info!(lambda, "{method}: λ from the L-curve corner");
        } else {
            tracing::warn!(
                lambda,
                "{method}: the L-curve has no corner inside {section}.lambda_scan; using its \
                 least bent point (widen the scan or give λ)"
            );
        }
        Choice {
            lambda,
            corner_found,
            scan,
        }
    }
}

/// Adds how λ was chosen to a method's sidecar parameters `v`: `lambda` and
/// `lambda_selection` (the L-curve, described by `curve`, and its scan) for `auto`, or
/// `{method: fixed}` when `configured` is a number.
pub fn record(v: &mut Value, configured: Lambda, choice: Option<&Choice>, curve: &str) {
    match choice {
        Some(c) => {
            v["lambda"] = json!(c.lambda);
            v["lambda_selection"] = json!({
                "method": curve,
                "corner_found": c.corner_found,
                "scan": c.scan,
            });
        }
        None if configured.value().is_some() => {
            v["lambda_selection"] = json!({ "method": "fixed" });
        }
        None => {}
    }
}
