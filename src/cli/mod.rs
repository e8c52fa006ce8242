//! The command line: arguments, configuration merge, logging setup and exit codes. Nothing
//! below this module prints to stdout or exits.

mod allocator;
pub mod args;
mod logging;

pub use allocator::use_one_malloc_arena;

use std::process::ExitCode;

use clap::Parser;

use crate::bids::{self, Filter};
use crate::pipeline::{self, Config, Settings};
use crate::report::status::{State, Status};
use crate::{Error, Result};
use args::{Cli, Command, FilesArgs, ProcessingArgs, RunArgs};

/// Exit status for runs where some acquisitions failed (the others are done).
const EXIT_FAILED: u8 = 1;
/// Exit status for unusable arguments, configuration or output location.
const EXIT_USAGE: u8 = 2;
/// Exit status when the dataset or OUTPUT_DIR cannot be read or used (nothing was processed).
const EXIT_INPUT: u8 = 3;
/// Exit status when the work needs more memory than `--mem-gb` allows (nothing was processed).
const EXIT_MEMORY: u8 = 4;

/// The exit status a run-level error maps to, so a scheduler can tell bad arguments from a
/// broken dataset or a job sized too small.
fn exit_status(e: &Error) -> u8 {
    match e {
        Error::Usage(_) | Error::Config(_) => EXIT_USAGE,
        Error::Input { .. } | Error::Io { .. } | Error::Numerics(_) => EXIT_INPUT,
        Error::Memory(_) => EXIT_MEMORY,
    }
}

/// Parses the process arguments and runs; returns the exit status.
pub fn main() -> ExitCode {
    use_one_malloc_arena();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Config(c)) => finish(print_config(&c)),
        Some(Command::Simulate(s)) => {
            logging::init(args::LogFormat::Text, 0, false);
            finish(crate::simulate::run(&s))
        }
        Some(Command::Evaluate(e)) => {
            logging::init(args::LogFormat::Text, 0, false);
            finish(crate::evaluate::run(&e))
        }
        Some(Command::Train(t)) => {
            logging::init(args::LogFormat::Text, 0, false);
            finish(crate::train::run(&t))
        }
        Some(Command::Files(f)) => run_files(*f),
        None => run_participants(cli.run),
    }
}

/// Text logging at info level, for tools built on the library (examples, benchmarks).
pub fn init_logging_for_tools() {
    logging::init(args::LogFormat::Text, 0, false);
}

fn finish(result: Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chimap: error: {e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn print_config(c: &args::ConfigArgs) -> Result<()> {
    let config = match &c.merge {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    print!(
        "# chimap {} configuration; a --config file may set any subset of these keys.\n{}",
        crate::VERSION,
        config.to_yaml()
    );
    Ok(())
}

/// The group level: which acquisitions of BIDS_DIR are done in OUTPUT_DIR
/// (`group_status.tsv`), then `group_qc.tsv` and `group.html` from what is there. Exits 1
/// when some acquisition is not done, naming each.
fn run_group(run: &RunArgs, format: args::LogFormat, started: std::time::Instant) -> ExitCode {
    let result = (|| -> Result<Vec<Status>> {
        let s = settings(run)?;
        if let Some(dir) = &run.seg_dir {
            if !dir.is_dir() {
                return Err(Error::Usage(format!(
                    "--seg-dir {} is not a folder",
                    dir.display()
                )));
            }
        }
        if !s.output_dir.is_dir() {
            return Err(Error::Usage(format!(
                "OUTPUT_DIR {} does not exist: run the participant level first",
                s.output_dir.display()
            )));
        }
        let discovery = bids::discover(&s.bids_dir, &s.discovery_filter())?;
        let rows = crate::report::status::of_dataset(&discovery, &s.output_dir);
        let tsv = s.output_dir.join("group_status.tsv");
        crate::report::status::write_tsv(&rows, &tsv)?;
        for r in rows.iter().filter(|r| r.state != State::Done) {
            tracing::warn!("{}: {}: {}", r.acquisition, r.state.as_str(), r.detail);
        }
        tracing::info!(
            "group level: {} of {} acquisitions done ({})",
            rows.iter().filter(|r| r.state == State::Done).count(),
            rows.len(),
            tsv.display()
        );
        if rows.iter().any(|r| r.state == State::Done) {
            let (tsv, html) = crate::report::group::run(&s.output_dir, run.seg_dir.as_deref())?;
            tracing::info!("group level: {} and {}", tsv.display(), html.display());
        }
        Ok(rows)
    })();
    let (rows, error) = match result {
        Ok(rows) => (rows, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    let status = match &error {
        Some(e) => exit_status(e),
        None if rows.iter().all(|r| r.state == State::Done) => 0,
        None => EXIT_FAILED,
    };
    match format {
        args::LogFormat::Text => {
            if let Some(e) = &error {
                eprintln!("chimap: error: {e}");
            }
            for r in rows.iter().filter(|r| r.state != State::Done) {
                eprintln!(
                    "chimap: {}: {}: {}",
                    r.state.as_str(),
                    r.acquisition,
                    r.detail
                );
            }
            if error.is_none() && !rows.iter().any(|r| r.state == State::Done) {
                eprintln!(
                    "chimap: error: no acquisition is done in OUTPUT_DIR: run the participant level first"
                );
            }
        }
        args::LogFormat::Json => {
            let names = |state: State| -> Vec<&str> {
                rows.iter()
                    .filter(|r| r.state == state)
                    .map(|r| r.acquisition.as_str())
                    .collect()
            };
            let participants = |states: &[State]| -> Vec<&str> {
                let mut p: Vec<&str> = rows
                    .iter()
                    .filter(|r| states.contains(&r.state))
                    .map(|r| r.participant.as_str())
                    .collect();
                p.dedup();
                p
            };
            let record = serde_json::json!({
                "level": if status == 0 { "INFO" } else { "ERROR" },
                "event": "summary",
                "analysis_level": "group",
                "exit_status": status,
                "done": names(State::Done),
                "running": names(State::Running),
                "missing": names(State::Missing),
                "failed": rows
                    .iter()
                    .filter(|r| matches!(r.state, State::Failed | State::Unusable))
                    .map(|r| serde_json::json!({ "name": r.acquisition, "error": r.detail }))
                    .collect::<Vec<_>>(),
                "participants_missing": participants(&[State::Missing]),
                "participants_failed": participants(&[State::Failed, State::Unusable]),
                "error": error.as_ref().map(|e| e.to_string()),
                "elapsed_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            });
            eprintln!("{record}");
        }
    }
    ExitCode::from(status)
}

/// The configuration file merged with the options that override it, validated.
fn config(run: &ProcessingArgs) -> Result<Config> {
    let mut config = match &run.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(m) = run.method {
        config.inversion.method = m;
    }
    if let Some(w) = &run.weights {
        config.inversion.weights = Some(w.clone());
    }
    if let Some(d) = run.device {
        config.inversion.device = d;
    }
    if let Some(m) = run.max_memory {
        crate::nn::device::budget_bytes(m)?;
        config.inversion.max_memory_gib = m;
    }
    if run.ignore_qc_failures {
        config.qc.ignore_failures = true;
    }
    // Fail before any processing when a learned method lacks its weights.
    config.inversion.method()?;
    if let Some(t) = run.field_strength {
        if !(t > 0.0 && t.is_finite()) {
            return Err(Error::Usage(format!(
                "--field-strength must be a positive number of tesla, got {t}"
            )));
        }
        config.field_strength = Some(t);
    }
    Ok(config)
}

/// Turns the arguments into validated settings.
pub fn settings(run: &RunArgs) -> Result<Settings> {
    let (Some(bids_dir), Some(output_dir)) = (run.bids_dir.clone(), run.output_dir.clone()) else {
        return Err(Error::Usage("BIDS_DIR and OUTPUT_DIR are required".into()));
    };
    let config = config(&run.processing)?;
    if !bids_dir.is_dir() {
        return Err(Error::Usage(format!(
            "BIDS_DIR {} is not a folder",
            bids_dir.display()
        )));
    }
    Ok(Settings {
        bids_dir,
        output_dir,
        filter: Filter {
            participants: run
                .participant_label
                .iter()
                .map(|l| args::strip_label(l, "sub"))
                .collect(),
            sessions: run
                .session_label
                .iter()
                .map(|l| args::strip_label(l, "ses"))
                .collect(),
            ..Filter::default()
        },
        config,
        overwrite: run.processing.overwrite,
        dry_run: run.dry_run,
        mask_dir: run.mask_dir.clone(),
        command_line: std::env::args().collect::<Vec<_>>().join(" "),
        mem_gb: mem_gb(&run.processing)?,
        work_dir: run.processing.work_dir.clone(),
    })
}

/// `--mem-gb`, checked.
fn mem_gb(p: &ProcessingArgs) -> Result<Option<f64>> {
    match p.mem_gb {
        Some(g) if !(g.is_finite() && g > 0.0) => Err(Error::Usage(format!(
            "--mem-gb must be a positive number of GiB, got {g}"
        ))),
        g => Ok(g),
    }
}

/// Sizes the global thread pool (`--nthreads`).
fn init_threads(nthreads: Option<usize>) -> Result<()> {
    if let Some(n) = nthreads {
        if n == 0
            || rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .is_err()
        {
            return Err(Error::Usage(
                "--nthreads must be a positive number of threads".into(),
            ));
        }
    }
    Ok(())
}

fn run_participants(run: RunArgs) -> ExitCode {
    let l = &run.logging;
    logging::init(l.log_format, l.verbose, l.quiet);
    if let Err(e) = init_threads(run.processing.nthreads) {
        return finish(Err(e));
    }
    let started = std::time::Instant::now();
    if run.analysis_level == Some(args::AnalysisLevel::Group) {
        return run_group(&run, l.log_format, started);
    }
    report_summary(
        settings(&run).and_then(|s| Ok((pipeline::run(&s)?, s.dry_run))),
        l.log_format,
        started,
    )
}

/// `chimap files`: the file-mode acquisition through the participant pipeline.
fn run_files(f: FilesArgs) -> ExitCode {
    let l = &f.logging;
    logging::init(l.log_format, l.verbose, l.quiet);
    let started = std::time::Instant::now();
    if let Err(e) = init_threads(f.processing.nthreads) {
        return finish(Err(e));
    }
    let run = || -> Result<(pipeline::Summary, bool)> {
        let config = config(&f.processing)?;
        let ms = |t: f64| -> Result<f64> {
            if t > 0.0 && t <= 1000.0 {
                Ok(t * 1e-3)
            } else {
                Err(Error::Usage(format!(
                    "--echo-times takes milliseconds between 0 and 1000, got {t}"
                )))
            }
        };
        let echo_times: Vec<f64> = f.echo_times.iter().map(|&t| ms(t)).collect::<Result<_>>()?;
        let field = f
            .local_field
            .clone()
            .map(|p| (bids::FieldKind::Local, p))
            .or(f.total_field.clone().map(|p| (bids::FieldKind::Total, p)));
        let source = match field {
            Some((kind, field)) => {
                if echo_times.len() > 1 {
                    return Err(Error::Usage(
                        "a field map takes at most one --echo-times value (for rad units)".into(),
                    ));
                }
                bids::files::FileSource::FieldMap {
                    kind,
                    field,
                    units: f
                        .field_units
                        .map(Into::into)
                        .unwrap_or(bids::FieldUnits::Ppm),
                    echo_time: echo_times.first().copied(),
                }
            }
            None => bids::files::FileSource::Raw {
                phase: f.phase.clone(),
                magnitude: f.magnitude.clone(),
                echo_times,
            },
        };
        let discovery = bids::files::from_files(&bids::files::FileInputs {
            source,
            mask: f.mask.clone(),
            name: f.name.clone(),
        })?;
        pipeline::check_files_output(&f.output_dir, &discovery)?;
        let settings = Settings {
            bids_dir: discovery.root.clone(),
            output_dir: f.output_dir.clone(),
            filter: Filter::default(),
            config,
            overwrite: f.processing.overwrite,
            dry_run: f.dry_run,
            mask_dir: None,
            command_line: std::env::args().collect::<Vec<_>>().join(" "),
            mem_gb: mem_gb(&f.processing)?,
            work_dir: f.processing.work_dir.clone(),
        };
        Ok((pipeline::run_discovered(&settings, discovery)?, f.dry_run))
    };
    report_summary(run(), f.logging.log_format, started)
}

/// Logs the outcome of a participant-level run and turns it into the exit status. With
/// `--log-format json` the last line on stderr is one summary record
/// (`"event": "summary"`) holding the exit status and every acquisition's outcome.
fn report_summary(
    result: Result<(pipeline::Summary, bool)>,
    format: args::LogFormat,
    started: std::time::Instant,
) -> ExitCode {
    let (summary, dry_run, status, error) = match result {
        Ok((summary, dry_run)) => {
            let status = if summary.success() { 0 } else { EXIT_FAILED };
            (summary, dry_run, status, None)
        }
        Err(e) => {
            let status = exit_status(&e);
            (pipeline::Summary::default(), false, status, Some(e))
        }
    };
    match format {
        args::LogFormat::Text => {
            if let Some(e) = &error {
                eprintln!("chimap: error: {e}");
            } else if !dry_run {
                tracing::info!(
                    "processed {}, skipped {} (already done), failed {}",
                    summary.processed.len(),
                    summary.skipped.len(),
                    summary.failed.len()
                );
                for (name, e) in &summary.failed {
                    eprintln!("chimap: failed: {name}: {e}");
                }
            }
        }
        args::LogFormat::Json => {
            let record = summary_record(&summary, error.as_ref(), status, started);
            eprintln!("{record}");
        }
    }
    ExitCode::from(status)
}

/// The final JSON-lines record of a run.
fn summary_record(
    summary: &pipeline::Summary,
    error: Option<&Error>,
    status: u8,
    started: std::time::Instant,
) -> serde_json::Value {
    let message = match error {
        Some(e) => format!("error: {e}"),
        None => format!(
            "processed {}, skipped {} (already done), failed {}",
            summary.processed.len(),
            summary.skipped.len(),
            summary.failed.len()
        ),
    };
    serde_json::json!({
        "level": if status == 0 { "INFO" } else { "ERROR" },
        "event": "summary",
        "message": message,
        "exit_status": status,
        "processed": summary.processed,
        "skipped": summary.skipped,
        "failed": summary
            .failed
            .iter()
            .map(|(name, e)| serde_json::json!({ "name": name, "error": e.to_string() }))
            .collect::<Vec<_>>(),
        "error": error.map(|e| e.to_string()),
        "elapsed_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "pid": std::process::id(),
        "host": crate::io::partial::host_name(),
    })
}
