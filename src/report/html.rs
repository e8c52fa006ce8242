//! The subject page: one section per acquisition with its QC table, figures, parameters,
//! provenance and stage times. Plain HTML with inline CSS; nothing is fetched from elsewhere.

use std::fmt::Write;

use serde_json::Value;

use super::Figure;
use crate::qc::{self, Check, Verdict};

/// What one acquisition contributes to the page.
pub struct Section {
    pub name: String,
    pub checks: Vec<Check>,
    pub figures: Vec<Figure>,
    /// Overlays of an as-scanned set's registered members on its reference.
    pub registration: Vec<Figure>,
    /// `(method, sidecar)` of every Chimap.
    pub chimaps: Vec<(String, Value)>,
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

pub const STYLE: &str = "body{font-family:sans-serif;margin:1.5em;max-width:1200px;color:#222}\
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em}\
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .5em;\
text-align:left;font-size:.9em;vertical-align:top}th{background:#f4f4f4}\
.pass{background:#dff0d8}.warn{background:#fcf8e3}.fail{background:#f2dede}\
figure{display:table;margin:.5em 0 1em 0}figcaption{display:table-caption;\
caption-side:bottom;font-size:.9em}.bar{display:flex;\
justify-content:space-between;font-size:.8em;color:#444}pre{background:#f8f8f8;padding:.5em;\
overflow:auto;font-size:.8em}.verdict{font-weight:bold;padding:0 .4em}";

/// The opening of a page with `title`.
pub fn head(title: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n",
        escape(title)
    )
}

fn limits_text(c: &Check) -> String {
    let l = &c.threshold;
    let mut parts = Vec::new();
    let f = qc::format_value;
    if let Some(v) = l.fail_below {
        parts.push(format!("fail &lt; {}", f(v)));
    }
    if let Some(v) = l.warn_below {
        parts.push(format!("warn &lt; {}", f(v)));
    }
    if let Some(v) = l.warn_above {
        parts.push(format!("warn &gt; {}", f(v)));
    }
    if let Some(v) = l.fail_above {
        parts.push(format!("fail &gt; {}", f(v)));
    }
    parts.join(", ")
}

/// The QC table of one acquisition.
pub fn qc_table(checks: &[Check]) -> String {
    let mut s = String::from(
        "<table><tr><th>check</th><th>value</th><th>limits</th><th>verdict</th><th>detail</th></tr>\n",
    );
    for c in checks {
        let v = c.verdict.as_str();
        let _ = writeln!(
            s,
            "<tr class=\"{v}\"><td>{}</td><td>{}</td><td>{}</td><td>{v}</td><td>{}</td></tr>",
            escape(&c.name),
            qc::format_value(c.value),
            limits_text(c),
            escape(&c.message)
        );
    }
    s.push_str("</table>\n");
    s
}

fn figure_html(label: &str, f: &Figure) -> String {
    let src = format!("sub-{label}/figures/{}", f.file);
    let scale = if f.diverging {
        format!(
            "<div class=\"bar\"><span>{}</span><span>0 {}</span><span>{}</span></div>",
            qc::format_value(f.range.0 as f64),
            escape(&f.units),
            qc::format_value(f.range.1 as f64)
        )
    } else {
        String::new()
    };
    format!(
        "<figure><img src=\"{}\" alt=\"{}\">{scale}<figcaption>{}{}{}</figcaption></figure>\n",
        escape(&src),
        escape(&f.caption),
        escape(&f.caption),
        if f.projection {
            " (inferior to superior, left to right)"
        } else {
            " (axial, coronal, sagittal through the mask's centre)"
        },
        if f.diverging {
            format!(
                "; colour range ± {} {}",
                qc::format_value(f.range.1 as f64),
                escape(&f.units)
            )
        } else {
            String::new()
        }
    )
}

/// Stage times and provenance of one Chimap.
fn chimap_html(method: &str, sidecar: &Value) -> String {
    let mut s = format!("<h3>χ by {}</h3>\n", escape(method));
    if let Some(times) = sidecar["ProcessingTimeSeconds"].as_object() {
        s.push_str("<table><tr><th>stage</th><th>seconds</th></tr>\n");
        for (stage, t) in times {
            let _ = writeln!(s, "<tr><td>{}</td><td>{}</td></tr>", escape(stage), t);
        }
        s.push_str("</table>\n");
    }
    let mut prov = Vec::new();
    for key in [
        "ChimapVersion",
        "MagneticFieldStrength",
        "EchoTime",
        "B0Direction",
        "ReferenceRegion",
        "ReferenceValueRemoved",
    ] {
        if let Some(v) = sidecar.get(key) {
            prov.push(format!(
                "<tr><th>{key}</th><td>{}</td></tr>",
                escape(&v.to_string())
            ));
        }
    }
    if let Some(src) = sidecar["Sources"].as_array() {
        let list: Vec<String> = src.iter().filter_map(|v| v.as_str()).map(escape).collect();
        prov.push(format!(
            "<tr><th>Sources</th><td>{}</td></tr>",
            list.join("<br>")
        ));
    }
    if !prov.is_empty() {
        let _ = writeln!(s, "<table>{}</table>", prov.join("\n"));
    }
    for (key, title) in [
        ("MethodParameters", "Inversion parameters"),
        ("Preprocessing", "Preprocessing parameters"),
    ] {
        if let Some(v) = sidecar.get(key) {
            let text = serde_json::to_string_pretty(v).unwrap_or_default();
            let _ = writeln!(
                s,
                "<details><summary>{title}</summary><pre>{}</pre></details>",
                escape(&text)
            );
        }
    }
    s
}

/// The heading of an as-scanned set's registration figures.
const REGISTRATION_INTRO: &str = "<h3 class=\"registration\">Registration to the reference \
orientation</h3>\n<p>Each orientation's magnitude (green) moved into the reference's grid and laid \
over the reference's (magenta): grey where they agree; green or magenta fringes along edges mean \
a poor registration. The <code>registration_ncc_*</code> and \
<code>head_rotation_degrees_*</code> checks above grade it; \
<code>b0_ill_conditioned_fraction</code> says whether the orientations are far enough apart \
for the joint inversion.</p>\n";

/// The whole subject page.
pub fn subject_page(label: &str, sections: &[Section]) -> String {
    let mut s = head(&format!("chimap report: sub-{label}"));
    let _ = writeln!(
        s,
        "<h1>chimap {}: sub-{}</h1>\n<p>{} acquisition(s). Quality checks run on the local \
         field before inversion; a failed check stops an acquisition unless \
         <code>--ignore-qc-failures</code>.</p>",
        crate::VERSION,
        escape(label),
        sections.len()
    );
    for sec in sections {
        let verdict = qc::overall(&sec.checks);
        let status = if sec.checks.is_empty() {
            String::new()
        } else {
            format!(
                " <span class=\"verdict {}\">{}</span>",
                verdict.as_str(),
                verdict.as_str()
            )
        };
        let _ = writeln!(s, "<h2 id=\"{0}\">{0}{status}</h2>", escape(&sec.name));
        if !sec.checks.is_empty() {
            s.push_str(&qc_table(&sec.checks));
        }
        if sec.chimaps.is_empty() && verdict == Verdict::Fail {
            s.push_str("<p>No χ map: a check failed, so the inversion did not run.</p>\n");
        }
        if !sec.registration.is_empty() {
            s.push_str(REGISTRATION_INTRO);
            for f in &sec.registration {
                s.push_str(&figure_html(label, f));
            }
        }
        for f in &sec.figures {
            s.push_str(&figure_html(label, f));
        }
        for (method, sidecar) in &sec.chimaps {
            s.push_str(&chimap_html(method, sidecar));
        }
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qc::Limits;

    #[test]
    fn page_escapes_text_links_figures_and_colours_verdicts() {
        let sec = Section {
            name: "sub-1_acq-<x>".into(),
            checks: vec![Check::new(
                "residual_background",
                0.9,
                Limits {
                    warn_above: Some(0.4),
                    fail_above: Some(0.7),
                    ..Limits::default()
                },
                "a & b".into(),
            )],
            figures: vec![Figure {
                projection: false,
                file: "sub-1_local.png".into(),
                caption: "Local field".into(),
                range: (-0.1, 0.1),
                units: "ppm".into(),
                diverging: true,
            }],
            registration: vec![Figure {
                projection: false,
                file: "sub-1_registration-acq-ori2.png".into(),
                caption: "acq-ori2 registered onto acq-ori1".into(),
                range: (0.0, 1.0),
                units: String::new(),
                diverging: false,
            }],
            chimaps: vec![(
                "tkd".into(),
                serde_json::json!({"ProcessingTimeSeconds": {"load": 0.5, "total": 1.0},
                                   "MethodParameters": {"threshold": 0.15}}),
            )],
        };
        let page = subject_page("1", &[sec]);
        assert!(page.contains("sub-1_acq-&lt;x&gt;") && !page.contains("<x>"));
        assert!(page.contains("a &amp; b"));
        assert!(page.contains("<tr class=\"fail\">"));
        assert!(page.contains("src=\"sub-1/figures/sub-1_local.png\""));
        assert!(page.contains("<td>load</td><td>0.5</td>"));
        assert!(page.contains("fail &gt; 0.7"));
        let reg = page.find("Registration to the reference").unwrap();
        let fig = page
            .find("src=\"sub-1/figures/sub-1_registration-acq-ori2.png\"")
            .unwrap();
        assert!(
            reg < fig,
            "the registration heading comes before its figure"
        );
        assert!(!page.contains("http"), "no external resources");
    }
}
