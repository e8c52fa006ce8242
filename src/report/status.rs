//! Which acquisitions of the input dataset have a finished `Chimap` in OUTPUT_DIR, and why
//! the others do not: the group level's answer to "which array jobs must I rerun?".

use std::path::Path;

use crate::bids::{Discovery, Entities};
use crate::qc::{self, Verdict};
use crate::Result;

/// Where one acquisition stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A `Chimap` with its sidecar exists.
    Done,
    /// Outputs exist but no `Chimap`: the run failed (a QC check, or a later stage).
    Failed,
    /// A run holds the acquisition's lock now.
    Running,
    /// Nothing in OUTPUT_DIR: never run, or killed before its first output.
    Missing,
    /// The inputs cannot be processed (discovery said why).
    Unusable,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Done => "done",
            State::Failed => "failed",
            State::Running => "running",
            State::Missing => "missing",
            State::Unusable => "unusable",
        }
    }
}

/// One row of `group_status.tsv`.
#[derive(Clone, Debug)]
pub struct Status {
    pub participant: String,
    pub acquisition: String,
    pub state: State,
    pub detail: String,
}

/// The state of every acquisition (and unusable series) of `discovery` in `output_dir`.
pub fn of_dataset(discovery: &Discovery, output_dir: &Path) -> Vec<Status> {
    let mut rows = Vec::new();
    for (i, acq) in discovery.acquisitions.iter().enumerate() {
        // A member of an orientation set is also done when the set's joint map exists.
        let sets = discovery
            .orientation_sets
            .iter()
            .filter(|s| s.members.contains(&i))
            .map(|s| &s.entities);
        let (state, detail) = state(output_dir, &acq.entities, sets);
        rows.push(Status {
            participant: format!("sub-{}", acq.entities.sub),
            acquisition: acq.name(),
            state,
            detail,
        });
    }
    for (name, e) in &discovery.problems {
        rows.push(Status {
            participant: name.split('_').next().unwrap_or_default().to_string(),
            acquisition: name.clone(),
            state: State::Unusable,
            detail: e.to_string(),
        });
    }
    rows
}

fn state<'a>(
    output_dir: &Path,
    entities: &Entities,
    sets: impl Iterator<Item = &'a Entities>,
) -> (State, String) {
    let mut folder = output_dir.join(format!("sub-{}", entities.sub));
    if let Some(ses) = &entities.ses {
        folder = folder.join(format!("ses-{ses}"));
    }
    let folder = folder.join("anat");
    let names: Vec<String> = std::fs::read_dir(&folder)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let prefix = entities.prefix();
    let chimap_of = |p: &str| {
        names.iter().find(|n| {
            n.strip_prefix(p)
                .and_then(|rest| rest.strip_prefix("_desc-"))
                .is_some_and(|rest| rest.ends_with("_Chimap.json"))
                && names.contains(&n.replace(".json", ".nii.gz"))
        })
    };
    if let Some(found) = chimap_of(&prefix) {
        return (State::Done, found.replace(".json", ".nii.gz"));
    }
    let sets: Vec<String> = sets.map(Entities::prefix).collect();
    for set in &sets {
        if let Some(found) = chimap_of(set) {
            return (State::Done, found.replace(".json", ".nii.gz"));
        }
    }
    if crate::derivatives::Lock::is_held(&folder.join(format!(".{prefix}.lock"))) {
        return (State::Running, "a run holds its lock now".into());
    }
    // A set's own checks (registration, B0 conditioning) stop all its members.
    for set in &sets {
        let set_qc = folder.join(format!("{set}_desc-qc.json"));
        let failed = failed_checks(&set_qc);
        if !failed.is_empty() {
            let why = format!(
                "QC of orientation set {set} failed: {} (see {}; --ignore-qc-failures inverts \
                 anyway)",
                failed.join(", "),
                set_qc.display()
            );
            return (State::Failed, why);
        }
    }
    let qc_path = folder.join(format!("{prefix}_desc-qc.json"));
    if qc_path.is_file() {
        let failed = failed_checks(&qc_path);
        let why = if failed.is_empty() {
            "no Chimap: a stage after the checks failed; see that run's log".to_string()
        } else {
            format!(
                "QC failed: {} (see {}; --ignore-qc-failures inverts anyway)",
                failed.join(", "),
                qc_path.display()
            )
        };
        return (State::Failed, why);
    }
    let started = names
        .iter()
        .any(|n| n.starts_with(&format!("{prefix}_")) && !n.starts_with('.'));
    if started {
        return (
            State::Failed,
            "outputs without a Chimap: the run failed or was killed; rerun it".into(),
        );
    }
    (
        State::Missing,
        "no outputs: not run yet, or killed before its first output".into(),
    )
}

/// Names of the failed checks in a qc json (none when it is missing or unreadable).
fn failed_checks(path: &Path) -> Vec<String> {
    qc::read_json(path)
        .map(|(_, checks)| {
            checks
                .into_iter()
                .filter(|c| c.verdict == Verdict::Fail)
                .map(|c| c.name)
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `group_status.tsv` (atomically).
pub fn write_tsv(rows: &[Status], path: &Path) -> Result<()> {
    let clean = |s: &str| s.replace(['\t', '\n'], " ");
    let mut text = String::from("participant_id\tacquisition\tstatus\tdetail\n");
    for r in rows {
        text.push_str(&format!(
            "{}\t{}\t{}\t{}\n",
            r.participant,
            r.acquisition,
            r.state.as_str(),
            clean(&r.detail)
        ));
    }
    crate::io::write_atomic(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qc::{Check, Limits};

    fn entities(name: &str) -> Entities {
        Entities::parse(name).expect("a BIDS name").0
    }

    #[test]
    fn a_member_of_a_set_whose_own_checks_failed_names_them() {
        let dir = tempfile::tempdir().unwrap();
        let anat = dir.path().join("sub-1/anat");
        std::fs::create_dir_all(&anat).unwrap();
        let member = entities("sub-1_acq-ori2_MEGRE.json");
        let set = entities("sub-1_MEGRE.json");
        // The member's own checks passed; the set's registration check failed.
        let pass = Check::new("echo_count", 3.0, Limits::default(), "ok".into());
        qc::write_json(
            &anat.join("sub-1_acq-ori2_desc-qc.json"),
            "m",
            &[pass],
            false,
        )
        .unwrap();
        let (state_now, why) = state(dir.path(), &member, [&set].into_iter());
        assert_eq!(state_now, State::Failed);
        assert!(!why.contains("registration"), "{why}");
        let fail = Check::new(
            "registration_ncc_acq-ori2",
            0.3,
            Limits {
                fail_below: Some(0.7),
                ..Limits::default()
            },
            "low".into(),
        );
        qc::write_json(&anat.join("sub-1_desc-qc.json"), "sub-1", &[fail], false).unwrap();
        let (state_now, why) = state(dir.path(), &member, [&set].into_iter());
        assert_eq!(state_now, State::Failed);
        assert!(
            why.contains("orientation set sub-1") && why.contains("registration_ncc_acq-ori2"),
            "{why}"
        );
    }
}
