//! Stage timing, the memory peak after each stage, and a one-line progress display. The display is drawn only when stderr is a
//! terminal, so workflow engines and log files see plain log lines.

use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Every stage name, in the order data flows through them (readers of the sidecar's
/// `ProcessingTimeSeconds`, whose keys are sorted, restore the order from this).
pub const STAGE_ORDER: &[&str] = &[
    "load",
    "phase scaling",
    "echo fit and magnitude mask",
    "mask refinement",
    "signal voids",
    "background removal",
    "void sources",
    "checks",
    "registration",
    "inversion",
];

/// Times the stages of one acquisition and shows which one is running.
pub struct Stages {
    name: String,
    tty: bool,
    started: Instant,
    current: Option<(&'static str, Instant)>,
    /// (stage, seconds), in order.
    pub times: Vec<(&'static str, f64)>,
    /// (stage, the process's peak resident bytes when it ended), in order: the stage where
    /// the value grows is the one that set the peak. Empty where the system does not say.
    pub peaks: Vec<(&'static str, u64)>,
}

impl Stages {
    pub fn new(name: &str) -> Self {
        Stages {
            name: name.to_string(),
            tty: std::io::stderr().is_terminal(),
            started: Instant::now(),
            current: None,
            times: Vec::new(),
            peaks: Vec::new(),
        }
    }

    /// Ends the running stage (if any) and starts `stage`.
    pub fn start(&mut self, stage: &'static str) {
        debug_assert!(
            STAGE_ORDER.contains(&stage),
            "stage {stage} missing from STAGE_ORDER"
        );
        self.finish();
        tracing::debug!("{}: {stage}", self.name);
        if self.tty {
            let mut err = std::io::stderr();
            let _ = write!(err, "\r\x1b[K{}: {stage}…", self.name);
            let _ = err.flush();
        }
        self.current = Some((stage, Instant::now()));
    }

    /// Ends the running stage.
    pub fn finish(&mut self) {
        if let Some((stage, t)) = self.current.take() {
            self.times.push((stage, t.elapsed().as_secs_f64()));
            if let Some(peak) = super::memory::peak_resident_bytes() {
                self.peaks.push((stage, peak));
            }
        }
        if self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }

    pub fn total_seconds(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Stage times for the sidecar, in seconds rounded to ms.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for (s, t) in &self.times {
            m.insert(
                (*s).to_string(),
                serde_json::json!((t * 1000.0).round() / 1000.0),
            );
        }
        m.insert(
            "total".into(),
            serde_json::json!((self.total_seconds() * 1000.0).round() / 1000.0),
        );
        serde_json::Value::Object(m)
    }

    /// The peak resident memory after each stage for the sidecar, in GiB rounded to MiB, and
    /// the run's as `peak`; `None` where it is not measured. The process's peak is never
    /// reset, so what schedulers and `time -v` report stays true.
    pub fn peaks_json(&self) -> Option<serde_json::Value> {
        let gib = |b: u64| ((b as f64 / (1u64 << 20) as f64).round() / 1024.0 * 1e4).round() / 1e4;
        let peak = self.peaks.iter().map(|p| p.1).max()?;
        let mut m = serde_json::Map::new();
        for (s, b) in &self.peaks {
            m.insert((*s).to_string(), serde_json::json!(gib(*b)));
        }
        m.insert("peak".into(), serde_json::json!(gib(peak)));
        Some(serde_json::Value::Object(m))
    }
}
