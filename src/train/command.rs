//! `chimap train`: runs the epochs, validates after each, and writes the checkpoint, the CSV
//! log, the loss plot and finally the weights with a JSON summary.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::config::{ModelKind, TrainConfig};
use super::plot;
use super::trainer::{Trainer, Validation};
use crate::{Error, Result};

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Network to train (with --resume: taken from the checkpoint).
    #[arg(long, value_enum, value_name = "NAME")]
    pub model: Option<ModelKind>,
    /// Training configuration (YAML); may set any subset of --print-default-config.
    #[arg(long, value_name = "FILE.yaml")]
    pub config: Option<PathBuf>,
    /// Continue the run saved in this checkpoint (OUT/checkpoint.safetensors).
    #[arg(long, value_name = "CKPT")]
    pub resume: Option<PathBuf>,
    /// Train a LoopNet that starts as this trained U-net (its weights or checkpoint, same
    /// channels and start): the LoopNet's training continues the U-net's step, schedule and
    /// clock instead of starting from random weights.
    #[arg(long, value_name = "UNET.safetensors", conflicts_with = "resume")]
    pub grow_from: Option<PathBuf>,
    /// Output folder: checkpoint, log, loss plot, final weights.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Where the model trains: auto takes a CUDA GPU when this binary was built with
    /// `--features cuda` and one opens, else the CPU.
    #[arg(long, value_enum, value_name = "DEVICE", default_value = "auto")]
    pub device: crate::nn::device::DeviceChoice,
    /// Stop after this much wall time (e.g. `45m`, `2h`, `1h30m`), with a checkpoint and a
    /// validation row; `--resume OUT/checkpoint.safetensors` continues the run exactly.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub time_budget: Option<f64>,
    /// Stop after this much CPU time of this process (all threads), e.g. `45m`: a budget that
    /// means the same on a busy shared node as on an idle one, for comparing models fairly.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub cpu_budget: Option<f64>,
    /// Lower the learning rate linearly from the schedule's value to zero over this run's
    /// budget (--time-budget or --cpu-budget), so the run ends converged at its budget
    /// rather than mid-schedule. A run resumed with --anneal anneals again over its own budget.
    #[arg(long)]
    pub anneal: bool,
    /// Minutes between checkpoints within an epoch (one is also written after each epoch).
    #[arg(long, value_name = "MINUTES", default_value_t = 5.0)]
    pub checkpoint_minutes: f64,
    /// Print the complete default training configuration and stop.
    #[arg(long)]
    pub print_default_config: bool,
}

/// Seconds in a duration such as `90s`, `45m`, `2h`, `1h30m` or a bare number of seconds.
pub fn parse_duration(text: &str) -> std::result::Result<f64, String> {
    let bad = || format!("`{text}` is not a duration; write e.g. 90s, 45m, 2h or 1h30m");
    let t = text.trim();
    if let Ok(s) = t.parse::<f64>() {
        return (s > 0.0).then_some(s).ok_or_else(bad);
    }
    let (mut total, mut number) = (0.0, String::new());
    for c in t.chars() {
        match c {
            '0'..='9' | '.' => number.push(c),
            'h' | 'm' | 's' => {
                let v: f64 = number.parse().map_err(|_| bad())?;
                total += v * match c {
                    'h' => 3600.0,
                    'm' => 60.0,
                    _ => 1.0,
                };
                number.clear();
            }
            _ => return Err(bad()),
        }
    }
    if !number.is_empty() || total <= 0.0 {
        return Err(bad());
    }
    Ok(total)
}

/// CPU time of this process (all threads) in seconds, where the system reports it.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the file, 12 and 13 after the name.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clock_ticks_per_second())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn clock_ticks_per_second() -> f64 {
    100.0
}

/// Files written under `--out`.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
pub const FINAL: &str = "final.safetensors";
/// The weights at the latest checkpoint, usable while a long run continues.
pub const LATEST: &str = "latest.safetensors";
const LOG: &str = "train_log.csv";
const PLOT: &str = "loss.png";
const HEADER: &str =
    "epoch,step,lr,train_loss,val_loss,val_nrmse,val_hfen,val_ssim,seconds,cpu_seconds";

/// One line of the CSV log (one epoch).
#[derive(Clone, Debug, PartialEq)]
struct Row {
    epoch: usize,
    step: u64,
    lr: f64,
    train_loss: f64,
    val: Validation,
    seconds: f64,
    /// CPU time of the whole run so far (NaN where the system does not report it).
    cpu_seconds: f64,
}

impl Row {
    fn csv(&self) -> String {
        let v = &self.val;
        format!(
            "{},{},{:e},{:e},{:e},{:.4},{:.4},{:.5},{:.1},{:.1}",
            self.epoch,
            self.step,
            self.lr,
            self.train_loss,
            v.loss,
            v.nrmse,
            v.hfen,
            v.ssim,
            self.seconds,
            self.cpu_seconds
        )
    }

    fn parse(line: &str) -> Option<Row> {
        let f: Vec<&str> = line.split(',').collect();
        let n = |i: usize| f.get(i)?.parse::<f64>().ok();
        Some(Row {
            epoch: f.first()?.parse().ok()?,
            step: f.get(1)?.parse().ok()?,
            lr: n(2)?,
            train_loss: n(3)?,
            val: Validation {
                loss: n(4)?,
                nrmse: n(5)?,
                hfen: n(6)?,
                ssim: n(7)?,
            },
            seconds: n(8)?,
            // Logs written before CPU time was recorded lack the column.
            cpu_seconds: n(9).unwrap_or(f64::NAN),
        })
    }
}

pub fn run(args: &TrainArgs) -> Result<()> {
    if args.print_default_config {
        print!(
            "# chimap {} training configuration; a --config file may set any subset of these keys.\n{}",
            crate::VERSION,
            TrainConfig::default().to_yaml()
        );
        return Ok(());
    }
    let out = args
        .out
        .as_deref()
        .ok_or_else(|| Error::Usage("chimap train needs --out DIR".into()))?;
    let cfg = args
        .config
        .as_deref()
        .map(TrainConfig::from_file)
        .transpose()?;
    if args.anneal && args.time_budget.is_none() && args.cpu_budget.is_none() {
        return Err(Error::Usage(
            "--anneal lowers the learning rate over a budget; add --time-budget or --cpu-budget"
                .into(),
        ));
    }
    if args.cpu_budget.is_some() && process_cpu_seconds().is_none() {
        return Err(Error::Usage(
            "this system does not report the process's CPU time; use --time-budget instead".into(),
        ));
    }
    let device = crate::nn::device::open(args.device)?;
    tracing::info!("training on {}", crate::nn::device::name(&device));
    let mut t = match (&args.resume, &args.grow_from) {
        (Some(ckpt), _) => Trainer::resume(ckpt, args.model, cfg.as_ref(), &device)?,
        (None, Some(unet)) => {
            if args.model.is_some_and(|k| k != ModelKind::Loopnet) {
                return Err(Error::Usage(
                    "--grow-from grows a LoopNet from a U-net; use --model loopnet".into(),
                ));
            }
            Trainer::grow(unet, &cfg.unwrap_or_default(), &device)?
        }
        (None, None) => {
            let kind = args.model.ok_or_else(|| {
                Error::Usage("chimap train needs --model lpcnn|loopnet|unet (or --resume)".into())
            })?;
            Trainer::new(kind, &cfg.unwrap_or_default(), &device)?
        }
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::io::write_atomic(&out.join("config.yaml"), t.config().to_yaml().as_bytes())?;
    // A resumed run keeps the log rows up to its checkpoint.
    let mut rows: Vec<Row> = match std::fs::read_to_string(out.join(LOG)) {
        Ok(text) if args.resume.is_some() => text
            .lines()
            .filter_map(Row::parse)
            .filter(|r| r.step <= t.step())
            .collect(),
        _ => Vec::new(),
    };
    tracing::info!(
        "training {} ({} parameters) for {} epochs of {} steps, from step {}",
        t.kind().as_str(),
        t.parameters(),
        t.config().epochs,
        t.config().steps_per_epoch,
        t.step()
    );
    if let Some((name, v)) = t.validate_warm_start()? {
        tracing::info!(
            "validation of the warm start alone ({name}): loss {:.3e}, NRMSE {:.1} %, HFEN {:.1} %, \
             SSIM {:.3}: the network must beat these",
            v.loss,
            v.nrmse,
            v.hfen,
            v.ssim
        );
    }
    let started = Instant::now();
    // Training time before this invocation: the log's, or a grown net's U-net's.
    let (prior, prior_cpu) = rows
        .last()
        .map(|r| (r.seconds, r.cpu_seconds))
        .or(t.clock())
        .map_or((0.0, 0.0), |(wall, cpu)| {
            (wall, if cpu.is_finite() { cpu } else { 0.0 })
        });
    let cpu_at_start = process_cpu_seconds();
    // CPU seconds of this invocation (NaN where the system does not report them).
    let cpu_this_run = || match (process_cpu_seconds(), cpu_at_start) {
        (Some(now), Some(start)) => now - start,
        _ => f64::NAN,
    };
    let cpu_now = || prior_cpu + cpu_this_run();
    let every = std::time::Duration::from_secs_f64(args.checkpoint_minutes.max(0.1) * 60.0);
    let mut last_checkpoint = Instant::now();
    let mut bar = Progress::new(t.total_steps() - t.step());
    let mut epoch_loss = (0.0, 0usize);
    let mut out_of_time = false;
    let spent = || {
        budget_spent(
            args.time_budget,
            args.cpu_budget,
            started.elapsed().as_secs_f64(),
            cpu_this_run(),
        )
    };
    while t.step() < t.total_steps() {
        let epoch = t.epoch();
        if args.anneal {
            t.set_lr_scale(anneal_scale(spent()));
        }
        let lr = t.learning_rate();
        let loss = t.train_step()?;
        epoch_loss = (epoch_loss.0 + loss, epoch_loss.1 + 1);
        bar.tick(epoch, loss);
        out_of_time = spent() >= 1.0;
        let epoch_end =
            t.step() % t.config().steps_per_epoch as u64 == 0 || t.step() == t.total_steps();
        if epoch_end || out_of_time {
            bar.clear();
            let val = t.validate()?;
            let row = Row {
                epoch: epoch + 1,
                step: t.step(),
                lr,
                train_loss: epoch_loss.0 / epoch_loss.1.max(1) as f64,
                val,
                seconds: prior + started.elapsed().as_secs_f64(),
                cpu_seconds: cpu_now(),
            };
            tracing::info!(
                "epoch {}{}: train loss {:.3e}, validation loss {:.3e}, NRMSE {:.1} %, HFEN {:.1} %, SSIM {:.3}",
                row.epoch,
                if epoch_end { "" } else { " (partial)" },
                row.train_loss,
                val.loss,
                val.nrmse,
                val.hfen,
                val.ssim
            );
            rows.push(row);
            epoch_loss = (0.0, 0);
            write_log(out, &rows)?;
        }
        if epoch_end || out_of_time || last_checkpoint.elapsed() >= every {
            t.set_clock(prior + started.elapsed().as_secs_f64(), cpu_now());
            t.save_checkpoint(&out.join(CHECKPOINT))?;
            t.save_weights(&out.join(LATEST))?;
            last_checkpoint = Instant::now();
        }
        if out_of_time {
            break;
        }
    }
    bar.clear();
    if out_of_time && t.step() < t.total_steps() {
        tracing::info!(
            "time budget reached at step {} of {}; continue with `chimap train --resume {} --out {}`",
            t.step(),
            t.total_steps(),
            out.join(CHECKPOINT).display(),
            out.display()
        );
        return Ok(());
    }
    t.set_clock(prior + started.elapsed().as_secs_f64(), cpu_now());
    t.save_weights(&out.join(FINAL))?;
    write_summary(out, &t, rows.last())?;
    tracing::info!("weights written to {}", out.join(FINAL).display());
    Ok(())
}

/// Fraction of this run's budget spent after `wall` and `cpu` seconds: the larger of the
/// two where both budgets are set, 0 where none is.
fn budget_spent(wall_budget: Option<f64>, cpu_budget: Option<f64>, wall: f64, cpu: f64) -> f64 {
    let wall = wall_budget.map_or(0.0, |b| wall / b);
    let cpu = cpu_budget.map_or(0.0, |b| cpu / b);
    wall.max(cpu)
}

/// Factor on the learning rate after `spent` of the budget: linear from 1 to 0.
fn anneal_scale(spent: f64) -> f64 {
    (1.0 - spent).clamp(0.0, 1.0)
}

fn write_log(out: &Path, rows: &[Row]) -> Result<()> {
    let mut text = String::from(HEADER);
    text.push('\n');
    for r in rows {
        text.push_str(&r.csv());
        text.push('\n');
    }
    crate::io::write_atomic(&out.join(LOG), text.as_bytes())?;
    let series = |f: fn(&Row) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.epoch as f64, f(r))).collect()
    };
    plot::write(
        &out.join(PLOT),
        &[series(|r| r.train_loss), series(|r| r.val.loss)],
    )
}

/// `final.json`: what the weights are and how they were made.
fn write_summary(out: &Path, t: &Trainer, last: Option<&Row>) -> Result<()> {
    let cfg = t.config();
    let value = serde_json::json!({
        "Model": t.kind().as_str(),
        "Parameters": t.parameters(),
        "Seed": cfg.seed,
        "Epochs": cfg.epochs,
        "Steps": t.step(),
        "BatchSize": cfg.batch_size,
        "PatchSize": cfg.data.patch,
        "WallTimeSeconds": last.map(|r| r.seconds),
        "CpuHours": last.and_then(|r| r.cpu_seconds.is_finite().then_some(r.cpu_seconds / 3600.0)),
        "Threads": rayon::current_num_threads(),
        "FinalValidation": last.map(|r| serde_json::json!({
            "Loss": r.val.loss, "NRMSE": r.val.nrmse, "HFEN": r.val.hfen, "SSIM": r.val.ssim,
        })),
        "Config": serde_yaml::from_str::<serde_json::Value>(&cfg.to_yaml()).ok(),
        "ChimapVersion": crate::VERSION,
    });
    crate::io::write_json(&out.join("final.json"), &value)
}

/// A one-line progress bar with the loss and ETA, drawn only on a terminal (as the
/// pipeline's stage display).
struct Progress {
    tty: bool,
    total: u64,
    done: u64,
    started: Instant,
}

impl Progress {
    fn new(total: u64) -> Self {
        Progress {
            tty: std::io::stderr().is_terminal(),
            total,
            done: 0,
            started: Instant::now(),
        }
    }

    fn tick(&mut self, epoch: usize, loss: f64) {
        self.done += 1;
        if !self.tty {
            return;
        }
        let frac = self.done as f64 / self.total.max(1) as f64;
        let eta = self.started.elapsed().as_secs_f64() / frac * (1.0 - frac);
        let filled = (frac * 30.0).round() as usize;
        let mut err = std::io::stderr();
        let _ = write!(
            err,
            "\r\x1b[Kepoch {} [{}{}] {}/{} loss {loss:.3e} ETA {}",
            epoch + 1,
            "#".repeat(filled),
            " ".repeat(30 - filled.min(30)),
            self.done,
            self.total,
            clock(eta)
        );
        let _ = err.flush();
    }

    fn clear(&self) {
        if self.tty {
            let _ = write!(std::io::stderr(), "\r\x1b[K");
        }
    }
}

/// `1h02m`, `3m05s`, `12s`.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arguments as `chimap train ARGV` parses them, defaults included, so a new option
    /// needs no edit here.
    fn train_args(argv: &[&str]) -> TrainArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            train: TrainArgs,
        }
        let argv = std::iter::once("train").chain(argv.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().train
    }

    #[test]
    fn log_rows_round_trip_and_clock_reads_well() {
        let r = Row {
            epoch: 3,
            step: 150,
            lr: 1e-3,
            train_loss: 2.5e-3,
            val: Validation {
                loss: 3.25e-3,
                nrmse: 41.5,
                hfen: 38.25,
                ssim: 0.8125,
            },
            seconds: 12.5,
            cpu_seconds: 24.5,
        };
        assert_eq!(Row::parse(&r.csv()), Some(r));
        assert_eq!(Row::parse(HEADER), None);
        assert_eq!(clock(12.4), "12s");
        assert_eq!(clock(185.0), "3m05s");
        assert_eq!(clock(3720.0), "1h02m");
    }

    #[test]
    fn durations_parse_and_nonsense_is_refused() {
        assert_eq!(parse_duration("90s"), Ok(90.0));
        assert_eq!(parse_duration("45m"), Ok(2700.0));
        assert_eq!(parse_duration("2h"), Ok(7200.0));
        assert_eq!(parse_duration("1h30m"), Ok(5400.0));
        assert_eq!(parse_duration("0.5h"), Ok(1800.0));
        assert_eq!(parse_duration("120"), Ok(120.0));
        for bad in ["", "2x", "h", "1h30", "-5", "0m"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("1h30m"), "{bad}: {err}");
        }
    }

    /// A run out of time stops with a checkpoint, the latest weights and a validation row
    /// but no final weights; resuming finishes it.
    #[test]
    fn a_time_budget_stops_with_a_checkpoint_and_resume_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("train.yaml");
        let yaml =
            "epochs: 1\nsteps_per_epoch: 3\nvalidation_batches: 1\nnormalisation_batches: 1\n\
                    data:\n  patch: 16\nmodel:\n  lpcnn:\n    channels: 4\n    blocks: 1\n";
        std::fs::write(&cfg_path, yaml).unwrap();
        let out = dir.path().join("run");
        // Out of time after the first step.
        let args = train_args(&[
            "--model=lpcnn",
            &format!("--config={}", cfg_path.display()),
            &format!("--out={}", out.display()),
            "--device=cpu",
            "--time-budget=1e-9",
        ]);
        run(&args).unwrap();
        assert!(out.join(CHECKPOINT).is_file() && out.join(LATEST).is_file());
        assert!(!out.join(FINAL).exists());
        let rows = |out: &Path| -> Vec<Row> {
            std::fs::read_to_string(out.join(LOG))
                .unwrap()
                .lines()
                .filter_map(Row::parse)
                .collect()
        };
        assert_eq!(
            rows(&out).iter().map(|r| r.step).collect::<Vec<_>>(),
            vec![1]
        );
        // The process clock ticks in 10 ms, so one tiny step may read 0: finite, not NaN.
        let first_cpu = rows(&out)[0].cpu_seconds;
        assert!(first_cpu.is_finite() && first_cpu >= 0.0, "{first_cpu}");
        let resumed = TrainArgs {
            model: None,
            config: None,
            resume: Some(out.join(CHECKPOINT)),
            grow_from: None,
            time_budget: None,
            ..args
        };
        run(&resumed).unwrap();
        assert!(out.join(FINAL).is_file());
        let steps: Vec<u64> = rows(&out).iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![1, 3]);
        // CPU time is summed over the resumed run, never restarted.
        let cpu: Vec<f64> = rows(&out).iter().map(|r| r.cpu_seconds).collect();
        assert!(cpu[1] >= cpu[0] && cpu[1] > 0.0, "{cpu:?}");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("final.json")).unwrap())
                .unwrap();
        assert!(summary["CpuHours"].as_f64().unwrap() > 0.0);
    }

    #[test]
    fn the_budget_spent_is_the_larger_fraction_and_annealing_is_linear() {
        assert_eq!(budget_spent(None, None, 1e6, 1e6), 0.0);
        assert_eq!(budget_spent(Some(100.0), None, 25.0, 90.0), 0.25);
        assert_eq!(budget_spent(None, Some(100.0), 25.0, 90.0), 0.9);
        assert_eq!(budget_spent(Some(100.0), Some(200.0), 60.0, 100.0), 0.6);
        assert_eq!(anneal_scale(0.0), 1.0);
        assert_eq!(anneal_scale(0.25), 0.75);
        assert_eq!(anneal_scale(1.5), 0.0);
    }

    /// --anneal reaches the optimiser: with the whole budget spent at the first step the
    /// learning rate is zero, the log says so and the weights stay as initialised; without
    /// a budget it is a usage error.
    #[test]
    fn annealing_over_a_spent_budget_stops_learning() {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("train.yaml");
        let yaml =
            "epochs: 1\nsteps_per_epoch: 3\nvalidation_batches: 1\nnormalisation_batches: 1\n\
                    data:\n  patch: 16\nmodel:\n  unet:\n    channels: [4, 8]\n    loops: 1\n";
        std::fs::write(&cfg_path, yaml).unwrap();
        let args = |out: &Path, anneal: bool, budget: Option<f64>| TrainArgs {
            time_budget: budget,
            anneal,
            ..train_args(&[
                "--model=unet",
                &format!("--config={}", cfg_path.display()),
                &format!("--out={}", out.display()),
                "--device=cpu",
            ])
        };
        let err = run(&args(&dir.path().join("none"), true, None)).unwrap_err();
        assert!(err.to_string().contains("--time-budget"), "{err}");
        // --grow-from grows a LoopNet: another --model is a usage error.
        let grow = TrainArgs {
            grow_from: Some(dir.path().join("unet.safetensors")),
            ..args(&dir.path().join("grown"), false, None)
        };
        let err = run(&grow).unwrap_err();
        assert!(err.to_string().contains("--model loopnet"), "{err}");
        let log_lr = |out: &Path| -> Vec<f64> {
            std::fs::read_to_string(out.join(LOG))
                .unwrap()
                .lines()
                .filter_map(Row::parse)
                .map(|r| r.lr)
                .collect()
        };
        let weights = |out: &Path| crate::nn::weights::read(&out.join(LATEST)).unwrap().0;
        let (plain, annealed) = (dir.path().join("plain"), dir.path().join("annealed"));
        run(&args(&plain, false, Some(1e-9))).unwrap();
        run(&args(&annealed, true, Some(1e-9))).unwrap();
        assert_eq!(log_lr(&annealed), vec![0.0]);
        assert!(log_lr(&plain)[0] > 0.0);
        // Same seed, same first batch: only the step size differs.
        let initial = dir.path().join("initial.safetensors");
        Trainer::new(
            ModelKind::Unet,
            &TrainConfig::from_file(&cfg_path).unwrap(),
            &candle_core::Device::Cpu,
        )
        .unwrap()
        .save_weights(&initial)
        .unwrap();
        let values =
            |t: &candle_core::Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let (p, a) = (weights(&plain), weights(&annealed));
        let i = crate::nn::weights::read(&initial).unwrap().0;
        let mut moved = 0;
        for (name, v) in &a {
            if !crate::train::adam::is_trainable(name) {
                continue;
            }
            assert_eq!(
                values(v),
                values(&i[name]),
                "{name} moved with a zero learning rate"
            );
            moved += usize::from(values(&p[name]) != values(&i[name]));
        }
        assert!(moved > 0, "the plain run moved no weight");
    }

    /// The command end to end on a tiny configuration, then resumed for one more epoch.
    #[test]
    fn writes_weights_log_plot_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("train.yaml");
        let yaml = "epochs: 1\nsteps_per_epoch: 2\nvalidation_batches: 1\nnormalisation_batches: 1\n\
                    data:\n  patch: 16\nmodel:\n  unet:\n    channels: [4, 8]\n    loops: 1\n    ghpa: false\n";
        std::fs::write(&cfg_path, yaml).unwrap();
        let out = dir.path().join("run");
        let args = train_args(&[
            "--model=unet",
            &format!("--config={}", cfg_path.display()),
            &format!("--out={}", out.display()),
            "--device=cpu",
        ]);
        run(&args).unwrap();
        for f in [CHECKPOINT, FINAL, LOG, PLOT, "final.json", "config.yaml"] {
            assert!(out.join(f).is_file(), "{f}");
        }
        let log = std::fs::read_to_string(out.join(LOG)).unwrap();
        assert_eq!(log.lines().count(), 2);
        // Two epochs now: the resumed run adds one row after the first.
        let more = dir.path().join("more.yaml");
        std::fs::write(&more, yaml.replace("epochs: 1", "epochs: 2")).unwrap();
        let resumed = TrainArgs {
            model: None,
            config: Some(more),
            resume: Some(out.join(CHECKPOINT)),
            grow_from: None,
            ..args
        };
        run(&resumed).unwrap();
        let log = std::fs::read_to_string(out.join(LOG)).unwrap();
        let rows: Vec<Row> = log.lines().filter_map(Row::parse).collect();
        assert_eq!(rows.iter().map(|r| r.step).collect::<Vec<_>>(), vec![2, 4]);
        // A learned method reads the weights with their architecture from the metadata.
        let meta = crate::nn::weights::metadata(&out.join(FINAL)).unwrap();
        assert_eq!(meta[crate::nn::weights::MODEL_KEY], "unet");
        // ... and how they were made, with the time of both runs summed.
        let made = crate::nn::weights::Provenance::from_metadata(&meta);
        assert_eq!(made.steps, Some(4));
        let wall = made.wall_seconds.unwrap();
        assert!(
            (wall - rows[1].seconds).abs() <= 1.0,
            "{wall} s vs the log's {}",
            rows[1].seconds
        );
        assert!(wall >= rows[0].seconds.floor(), "{wall} s");
        if rows[1].cpu_seconds.is_finite() {
            assert!(made.cpu_seconds.is_some());
        }
    }
}
