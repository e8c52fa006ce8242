//! Command-line arguments, BIDS-Apps style: `chimap BIDS_DIR OUTPUT_DIR participant`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::inversion::MethodName;

#[derive(Parser, Debug)]
#[command(
    name = "chimap",
    version,
    about = "Quantitative susceptibility maps (QSM, BIDS Chimap in ppm) from multi-echo gradient-echo phase",
    long_about = "Quantitative susceptibility maps (QSM, BIDS Chimap in ppm) from multi-echo gradient-echo \
                  phase.\n\nRun as a BIDS-App: `chimap BIDS_DIR OUTPUT_DIR participant`. OUTPUT_DIR becomes a \
                  BIDS derivative dataset; nothing is ever written under BIDS_DIR (except its derivatives/ folder \
                  when OUTPUT_DIR is placed there).",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the configuration (YAML).
    Config(ConfigArgs),
    /// Simulate a raw multi-echo BIDS dataset and its ground truth from a χ map.
    Simulate(crate::simulate::SimulateArgs),
    /// Score χ maps against a reference with the QSM challenge metrics.
    Evaluate(crate::evaluate::EvaluateArgs),
    /// Train LP-CNN, LoopNet or the U-net on synthetic (or NIfTI) susceptibility patches.
    Train(crate::train::TrainArgs),
    /// Process one acquisition given as NIfTI files (a workflow step), not a BIDS dataset;
    /// OUTPUT_DIR becomes the same derivative dataset as a participant run's.
    Files(Box<FilesArgs>),
}

/// `chimap files OUTPUT_DIR --phase … --magnitude … --echo-times …`, or a field map with
/// `--local-field`/`--total-field`, `--field-units` and `--mask`.
#[derive(Args, Debug)]
#[command(group(
    clap::ArgGroup::new("input")
        .required(true)
        .args(["phase", "local_field", "total_field"])
))]
pub struct FilesArgs {
    /// Where the derivative dataset is written (created if missing). It may be the inputs'
    /// folder, but no input may lie in OUTPUT_DIR/sub-<label>/, where the outputs go.
    #[arg(value_name = "OUTPUT_DIR")]
    pub output_dir: PathBuf,

    /// Phase images: one 3D file per echo, or one 4D file holding all echoes.
    #[arg(long, value_name = "FILE", num_args = 1.., requires_all = ["magnitude", "echo_times"], help_heading = "Inputs")]
    pub phase: Vec<PathBuf>,

    /// Magnitude images, one per --phase file in the same order (and with as many frames).
    #[arg(long, value_name = "FILE", num_args = 1.., requires = "phase", help_heading = "Inputs")]
    pub magnitude: Vec<PathBuf>,

    /// Echo times in milliseconds, one per echo; with a field map in rad, its one echo time.
    #[arg(long, value_name = "MS", num_args = 1.., help_heading = "Inputs")]
    pub echo_times: Vec<f64>,

    /// A local (tissue) field map: only the dipole inversion runs. Needs --mask and --field-units.
    #[arg(long, value_name = "FILE", requires_all = ["mask", "field_units"], help_heading = "Inputs")]
    pub local_field: Option<PathBuf>,

    /// A total field map: background removal and inversion run. Needs --mask and --field-units.
    #[arg(long, value_name = "FILE", requires_all = ["mask", "field_units"], help_heading = "Inputs")]
    pub total_field: Option<PathBuf>,

    /// Units of --local-field/--total-field.
    #[arg(
        long,
        value_enum,
        value_name = "UNITS",
        ignore_case = true,
        help_heading = "Inputs"
    )]
    pub field_units: Option<FieldUnitsArg>,

    /// Brain mask on the data's grid (3D, 1 inside): replaces the automatic mask of phase
    /// data; required with a field map.
    #[arg(long, value_name = "FILE", help_heading = "Inputs")]
    pub mask: Option<PathBuf>,

    /// BIDS entities naming the outputs, e.g. `sub-01` or `sub-01_ses-2_acq-fast`. Default:
    /// the entities of the first input's name, else `sub-<its letters and digits>`.
    #[arg(long, value_name = "ENTITIES", help_heading = "Inputs")]
    pub name: Option<String>,

    /// Describe the acquisition, then stop.
    #[arg(long)]
    pub dry_run: bool,

    #[command(flatten)]
    pub processing: ProcessingArgs,

    #[command(flatten)]
    pub logging: LoggingArgs,
}

/// `--field-units` of `chimap files`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum FieldUnitsArg {
    Ppm,
    Hz,
    Rad,
    #[value(name = "rad/s")]
    RadPerS,
}

impl From<FieldUnitsArg> for crate::bids::FieldUnits {
    fn from(u: FieldUnitsArg) -> Self {
        match u {
            FieldUnitsArg::Ppm => Self::Ppm,
            FieldUnitsArg::Hz => Self::Hz,
            FieldUnitsArg::Rad => Self::Rad,
            FieldUnitsArg::RadPerS => Self::RadPerSecond,
        }
    }
}

#[derive(Args, Debug)]
pub struct ConfigArgs {
    /// Print the complete default configuration; a config file may set any subset of it.
    #[arg(long)]
    pub default: bool,
    /// Print the default configuration merged with this file (validates the file).
    #[arg(long, value_name = "FILE.yaml", conflicts_with = "default")]
    pub merge: Option<PathBuf>,
}

/// The analysis levels of a BIDS-App.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AnalysisLevel {
    /// Process each selected participant (and session) independently.
    Participant,
    /// Summarise OUTPUT_DIR after the participants: group_qc.tsv and group.html.
    Group,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for workflow engines.
    Json,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// The input BIDS dataset: raw multi-echo GRE (MEGRE), or a derivative dataset of
    /// total/local field maps.
    #[arg(value_name = "BIDS_DIR", required = true)]
    pub bids_dir: Option<PathBuf>,

    /// Where the derivative dataset is written (created if missing). Must not be BIDS_DIR
    /// or inside it, except under BIDS_DIR/derivatives/.
    #[arg(value_name = "OUTPUT_DIR", required = true)]
    pub output_dir: Option<PathBuf>,

    /// Analysis level.
    #[arg(value_name = "ANALYSIS_LEVEL", value_enum, required = true)]
    pub analysis_level: Option<AnalysisLevel>,

    /// Participants to process (with or without `sub-`). Default: all.
    #[arg(long, value_name = "LABEL", num_args = 1.., help_heading = "Selection")]
    pub participant_label: Vec<String>,

    /// Sessions to process (with or without `ses-`). Default: all.
    #[arg(long, value_name = "LABEL", num_args = 1.., help_heading = "Selection")]
    pub session_label: Vec<String>,

    /// List what would be processed, then stop.
    #[arg(long, help_heading = "Selection")]
    pub dry_run: bool,

    /// A BIDS derivative dataset of brain masks, `sub-<label>[_ses-<label>][_acq-<label>][_run-<index>]_desc-brain_mask.nii[.gz]`
    /// on each acquisition's grid (no space- entity, or space-orig): they replace the
    /// automatic masks and the masks beside field maps. The mask naming the most entities of
    /// an acquisition wins; an acquisition without one fails.
    #[arg(long, value_name = "DIR", help_heading = "Processing")]
    pub mask_dir: Option<PathBuf>,

    /// Group level: a folder searched for segmentations named `<acquisition>_*dseg.nii.gz`
    /// (e.g. `sub-1_acq-ori1_desc-aseg_dseg.nii.gz`) on the acquisition's grid; χ is then
    /// summarised per label as well as over the mask.
    #[arg(long, value_name = "DIR", help_heading = "Group level")]
    pub seg_dir: Option<PathBuf>,

    #[command(flatten)]
    pub processing: ProcessingArgs,

    #[command(flatten)]
    pub logging: LoggingArgs,
}

/// Options of the processing itself, shared by the BIDS-App and `chimap files`.
#[derive(Args, Debug)]
pub struct ProcessingArgs {
    /// YAML configuration; may set any subset of `chimap config --default`. Unknown keys are errors.
    #[arg(long, value_name = "FILE.yaml", help_heading = "Processing")]
    pub config: Option<PathBuf>,

    /// Dipole inversion method (overrides `inversion.method` of the config). Default: tkd.
    #[arg(long, value_enum, value_name = "NAME", help_heading = "Processing")]
    pub method: Option<MethodName>,

    /// Weights (safetensors) for --method lpcnn|loopnet|unet, instead of the shipped ones
    /// (overrides `inversion.weights`).
    #[arg(long, value_name = "FILE", help_heading = "Processing")]
    pub weights: Option<PathBuf>,

    /// Where --method lpcnn|loopnet|unet runs (overrides `inversion.device`): auto takes a
    /// CUDA GPU when this binary was built with `--features cuda` and one opens, else the CPU.
    #[arg(long, value_enum, value_name = "DEVICE", help_heading = "Processing")]
    pub device: Option<crate::nn::device::DeviceChoice>,

    /// Memory in GiB for the learned methods' activations, on the CPU or the GPU (overrides
    /// `inversion.max_memory_gib`, default 3); larger volumes run in overlapping tiles.
    #[arg(long, value_name = "GIB", help_heading = "Processing")]
    pub max_memory: Option<f64>,

    /// Folder for intermediates, e.g. node-local scratch (`$TMPDIR`): each acquisition's
    /// local field is kept there until its Chimap is written, so a run killed during the
    /// inversion resumes there when rerun with the same --work-dir. Default: none kept.
    #[arg(long, value_name = "DIR", help_heading = "Processing")]
    pub work_dir: Option<PathBuf>,

    /// Peak memory this run may use, in GiB (e.g. the job's memory request): work estimated
    /// to need more is refused before anything runs (exit status 4), and the learned
    /// methods' tiles shrink to what is left. Default: no bound.
    #[arg(long, value_name = "GIB", help_heading = "Processing")]
    pub mem_gb: Option<f64>,

    /// B0 field strength in tesla for inputs whose sidecars lack `MagneticFieldStrength`
    /// (overrides `field_strength` of the config). Default: taken from the sidecars.
    #[arg(long, value_name = "TESLA", help_heading = "Processing")]
    pub field_strength: Option<f64>,

    /// Worker threads. Default: all available cores.
    #[arg(long, value_name = "N", help_heading = "Processing")]
    pub nthreads: Option<usize>,

    /// Invert acquisitions whose local-field checks fail (they are still recorded in the
    /// `_desc-qc.json` and the report). Default: a failed check stops that acquisition.
    #[arg(long, help_heading = "Processing")]
    pub ignore_qc_failures: bool,

    /// Recompute outputs that already exist. Default: finished acquisitions are skipped.
    #[arg(long, help_heading = "Processing")]
    pub overwrite: bool,
}

#[derive(Args, Debug)]
pub struct LoggingArgs {
    /// More log output (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, help_heading = "Logging")]
    pub verbose: u8,

    /// Only warnings and errors.
    #[arg(short, long, conflicts_with = "verbose", help_heading = "Logging")]
    pub quiet: bool,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", help_heading = "Logging")]
    pub log_format: LogFormat,
}

/// Strips an optional `prefix-` from a BIDS label (`sub-01` → `01`).
pub fn strip_label(label: &str, prefix: &str) -> String {
    label
        .strip_prefix(&format!("{prefix}-"))
        .unwrap_or(label)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bids_app_positionals_and_labels_parse() {
        let cli = Cli::try_parse_from([
            "chimap",
            "in",
            "out",
            "participant",
            "--participant-label",
            "sub-01",
            "02",
            "--session-label",
            "ses-a",
            "--method",
            "tkd",
            "--nthreads",
            "2",
            "--device",
            "cpu",
            "--max-memory",
            "1.5",
            "--overwrite",
            "--log-format",
            "json",
            "-vv",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        let r = cli.run;
        assert_eq!(r.bids_dir.unwrap(), PathBuf::from("in"));
        assert_eq!(r.analysis_level, Some(AnalysisLevel::Participant));
        assert_eq!(r.participant_label, vec!["sub-01", "02"]);
        assert!(r.mask_dir.is_none());
        let p = &r.processing;
        assert_eq!(p.method, Some(MethodName::Tkd));
        assert_eq!(p.nthreads, Some(2));
        assert_eq!(p.device, Some(crate::nn::device::DeviceChoice::Cpu));
        assert_eq!(p.max_memory, Some(1.5));
        assert!(p.overwrite);
        assert_eq!(r.logging.log_format, LogFormat::Json);
        assert_eq!(r.logging.verbose, 2);
        assert_eq!(strip_label("sub-01", "sub"), "01");
        assert_eq!(strip_label("02", "sub"), "02");
        assert_eq!(strip_label("ses-a", "ses"), "a");
    }

    #[test]
    fn missing_positionals_and_bad_level_are_rejected() {
        assert!(Cli::try_parse_from(["chimap", "in", "out"]).is_err());
        assert!(Cli::try_parse_from(["chimap", "in", "out", "everything"]).is_err());
        assert!(Cli::try_parse_from(["chimap", "in", "out", "participant", "-q", "-v"]).is_err());
    }

    #[test]
    fn mask_dir_and_files_mode_parse() {
        let cli =
            Cli::try_parse_from(["chimap", "in", "out", "participant", "--mask-dir", "m"]).unwrap();
        assert_eq!(cli.run.mask_dir, Some(PathBuf::from("m")));
        let cli = Cli::try_parse_from([
            "chimap",
            "files",
            "out",
            "--phase",
            "p.nii.gz",
            "--magnitude",
            "m.nii.gz",
            "--echo-times",
            "4",
            "8",
            "--field-strength",
            "3",
            "--method",
            "tkd",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Files(f)) => {
                assert_eq!(f.echo_times, [4.0, 8.0]);
                assert_eq!(f.processing.field_strength, Some(3.0));
                assert!(f.mask.is_none() && f.local_field.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "chimap",
            "files",
            "out",
            "--local-field",
            "f.nii",
            "--mask",
            "m.nii",
            "--field-units",
            "rad/s",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Files(f)) => assert_eq!(f.field_units, Some(FieldUnitsArg::RadPerS)),
            other => panic!("unexpected {other:?}"),
        }
        // An input is required; a field map needs its mask and units; phase needs the rest.
        assert!(Cli::try_parse_from(["chimap", "files", "out"]).is_err());
        assert!(Cli::try_parse_from([
            "chimap",
            "files",
            "out",
            "--local-field",
            "f.nii",
            "--field-units",
            "ppm"
        ])
        .is_err());
        assert!(
            Cli::try_parse_from(["chimap", "files", "out", "--phase", "p.nii", "--mask", "m"])
                .is_err()
        );
        assert!(Cli::try_parse_from([
            "chimap",
            "files",
            "out",
            "--phase",
            "p",
            "--magnitude",
            "m",
            "--echo-times",
            "4",
            "--total-field",
            "t",
            "--mask",
            "k",
            "--field-units",
            "hz"
        ])
        .is_err());
    }

    #[test]
    fn config_subcommand_parses_without_positionals() {
        let cli = Cli::try_parse_from(["chimap", "config", "--default"]).unwrap();
        match cli.command {
            Some(Command::Config(c)) => assert!(c.default),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn train_subcommand_parses() {
        let cli = Cli::try_parse_from([
            "chimap", "train", "--model", "lpcnn", "--config", "t.yaml", "--out", "o",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Train(t)) => {
                assert_eq!(t.model, Some(crate::train::config::ModelKind::Lpcnn));
                assert_eq!(t.out, Some(PathBuf::from("o")));
                assert!(t.resume.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(Cli::try_parse_from(["chimap", "train", "--model", "resnet"]).is_err());
    }

    #[test]
    fn evaluate_subcommand_takes_a_reference_a_mask_and_maps() {
        let cli = Cli::try_parse_from([
            "chimap",
            "evaluate",
            "--reference",
            "r.nii.gz",
            "--mask",
            "m.nii.gz",
            "a.nii.gz",
            "b.nii.gz",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Evaluate(e)) => {
                assert_eq!(e.maps.len(), 2);
                assert!(e.seg.is_none() && e.json.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        // At least one map, and the reference and mask are required.
        assert!(
            Cli::try_parse_from(["chimap", "evaluate", "--reference", "r", "--mask", "m"]).is_err()
        );
        assert!(Cli::try_parse_from(["chimap", "evaluate", "--mask", "m", "a"]).is_err());
    }
}
