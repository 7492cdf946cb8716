//! The command line, as clap parses it. Values that can be checked without touching the
//! disk (α, sizes, thread counts) are parsed here so that mistakes are usage errors (exit 2).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum, ValueHint};

use expo::dtype::FloatDtype;
use expo::plan::{AlphaRule, DtypeChoice};

/// Make a better-aligned model from an SFT and an aligned checkpoint, with no training.
///
/// ExPO (model extrapolation, Zheng et al. 2024): θ2 = θ1 + α·(θ1 − θ0), where θ0 is the SFT
/// checkpoint and θ1 the model trained from it with DPO/RLHF.
#[derive(Debug, Parser)]
#[command(
    name = "expo",
    version,
    propagate_version = true,
    arg_required_else_help = true
)]
#[command(after_help = "Exit status: 0 success, 1 failure, 2 usage error, 130 interrupted.")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write θ1 + α·(θ1 − θ0) as a new checkpoint.
    #[command(
        long_about = "Write θ2 = θ1 + α·(θ1 − θ0) as a new Hugging Face checkpoint.\n\n\
            Every float element is computed in float64 and rounded once to the output dtype \
            (round to nearest even), so the result is bit-identical to a float64 reference. \
            Non-float tensors must be identical in both inputs and are copied. θ1's config, \
            tokenizer and other side files are copied byte for byte. The output appears \
            atomically: nothing is at --output until everything is written and synced.",
        after_help = "Examples:\n  expo extrapolate --sft zephyr-sft --aligned zephyr-dpo --alpha 0.3 --output zephyr-expo\n  expo extrapolate --sft sft --aligned dpo --alpha 0.5 --output out --max-shard-size 5GB --dry-run\n  expo extrapolate --sft sft --aligned dpo --alpha 0.1:0.5:0.1 --output 'runs/expo-{alpha}'\n  expo extrapolate --sft sft --aligned dpo --alpha 0.3 --skip 'embed_tokens|lm_head' --alpha-for 'self_attn=x0.5' --output out"
    )]
    Extrapolate(ExtrapolateArgs),

    /// Find the best α by building candidates and running your own evaluator on each.
    #[command(
        long_about = "Find the α that your own evaluator scores best, as the ExPO paper does by hand: \
            build candidates θ1 + α·(θ1 − θ0) with the same engine as `expo extrapolate`, run \
            --eval on each (and on --aligned itself as the α = 0 baseline), then bracket the best \
            α and zoom in on a decimal lattice. Up to --jobs evaluations run at once; every start \
            and result goes to RUN/ledger.jsonl, so --resume continues an interrupted search \
            without evaluating any finished α again.\n\n\
            The evaluator runs under `sh -c` with {alpha} {output} {workdir} {slot} {trial} \
            replaced (shell-quoted) and EXPO_ALPHA, EXPO_OUTPUT, EXPO_WORKDIR, EXPO_SLOT, \
            EXPO_TRIAL set. Exit 0 with a score (the last non-empty stdout line, or --score-json) \
            is a result; 125 marks α unusable; 126/127 abort the search; anything else is retried.",
        after_help = "Examples:\n  expo search --sft sft --aligned dpo --eval './eval.sh {output}'\n  expo search --sft sft --aligned dpo -j 4 --eval 'CUDA_VISIBLE_DEVICES={slot} ./eval.sh {output}'\n  expo search --sft sft --aligned dpo --eval 'lm_eval --model hf --model_args pretrained={output} --tasks gsm8k --output_path {workdir}/r.json' --score-file '{workdir}/r.json' --score-json '/results/gsm8k/exact_match,strict-match'\n  expo search --run runs/zephyr --resume ...   (continue after Ctrl-C)"
    )]
    Search(Box<SearchArgs>),

    /// Print a shell completion script (bash, zsh, fish, powershell, elvish) on stdout.
    #[command(
        long_about = "Print a completion script for SHELL on stdout, generated from expo's own \
            command-line definition.",
        after_help = "Install:\n  \
            bash:        echo 'source <(expo completions bash)' >> ~/.bashrc\n  \
            zsh:         expo completions zsh > ~/.zfunc/_expo   (with fpath+=(~/.zfunc) before compinit in ~/.zshrc)\n  \
            fish:        expo completions fish > ~/.config/fish/completions/expo.fish\n  \
            powershell:  expo completions powershell | Out-String | Invoke-Expression   (in $PROFILE)"
    )]
    Completions(CompletionsArgs),

    /// Print expo's man page (roff) on stdout, or write all of them with --dir.
    #[command(after_help = "Examples:\n  \
        expo man | man -l -\n  \
        expo man extrapolate > expo-extrapolate.1\n  \
        expo man --dir ~/.local/share/man/man1")]
    Man(ManArgs),

    /// Measure how far training moved a model: ‖θ1 − θ0‖, cosine, changed elements.
    #[command(
        long_about = "Measure Δθ = θ1 − θ0 between two checkpoints, as in the ExPO paper's \
            Table 1: per tensor the Frobenius norm ‖Δ‖, the normalized norm ‖Δ‖/√n, the \
            relative change ‖Δ‖/‖θ0‖, the cosine similarity of θ0 and θ1 and the fraction of \
            elements changed; a whole-model summary with a check of ExPO's premise (Δθ small); \
            the tensors that changed most; and a per-layer roll-up. Everything is accumulated \
            in float64 with compensated summation.\n\n\
            With three or more checkpoints (e.g. pre-trained, SFT, DPO) prints the summary of \
            each consecutive pair and of the first and last, like Table 1.",
        after_help = "Examples:\n  expo diff --sft zephyr-sft --aligned zephyr-dpo\n  expo diff mistral-7b zephyr-sft zephyr-dpo\n  expo diff --sft sft --aligned dpo --top 20 --json | jq .summary"
    )]
    Diff(DiffArgs),

    /// List a checkpoint's tensors (name, dtype, shape, file, bytes) and totals per dtype.
    #[command(
        after_help = "Examples:\n  expo inspect zephyr-dpo\n  expo inspect model.safetensors --json | jq '.dtypes'"
    )]
    Inspect(InspectArgs),
}

/// Arguments of `expo completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to generate completions for.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: clap_complete::Shell,
}

/// Arguments of `expo man`.
#[derive(Debug, Args)]
pub struct ManArgs {
    /// The subcommand whose page to print (expo-SUBCOMMAND(1)); default: expo(1).
    #[arg(value_name = "SUBCOMMAND", conflicts_with = "dir")]
    pub subcommand: Option<String>,

    /// Write expo.1 and expo-SUBCOMMAND.1 for every subcommand into DIR instead.
    #[arg(long, value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub dir: Option<PathBuf>,
}

/// Arguments of `expo extrapolate`.
#[derive(Debug, Args)]
pub struct ExtrapolateArgs {
    /// The SFT checkpoint θ0: a directory, a .safetensors file, or a Hub id org/name[@REV]
    /// found in the local Hugging Face cache.
    #[arg(long, value_name = "PATH", value_hint = ValueHint::AnyPath)]
    pub sft: PathBuf,

    /// The aligned (DPO/RLHF) checkpoint θ1 trained from --sft: a directory, a .safetensors
    /// file, or a Hub id org/name[@REV] found in the local Hugging Face cache.
    #[arg(long, value_name = "PATH", value_hint = ValueHint::AnyPath)]
    pub aligned: PathBuf,

    /// Extrapolation strength: 0.1–0.5 for fully trained models, larger for partially
    /// trained ones; between -1 and 0 interpolates; 0 reproduces --aligned. A list
    /// (0.1,0.2,0.3), an inclusive range (0.1:0.5:0.1) or both make one output per value,
    /// all from one pass over the inputs; --output must then contain {alpha}.
    #[arg(long, short = 'a', value_name = "ALPHA", allow_hyphen_values = true, value_parser = parse_alpha_list)]
    pub alpha: AlphaList,

    /// Per-module α: tensors whose name matches REGEX get VALUE, a number or xF (F times
    /// the run's α). Repeatable; the first matching rule wins (after --skip).
    #[arg(long, value_name = "REGEX=VALUE", value_parser = expo::alpha::parse_rule)]
    pub alpha_for: Vec<AlphaRule>,

    /// Tensors whose name matches REGEX get α = 0: --aligned's values, unchanged (converted
    /// only if --dtype asks for another dtype).
    /// Repeatable; checked before --alpha-for.
    #[arg(long, value_name = "REGEX", value_parser = expo::alpha::parse_skip)]
    pub skip: Vec<AlphaRule>,

    /// The directory to create. Must not exist or be empty, unless --force.
    #[arg(long, short = 'o', value_name = "DIR", value_hint = ValueHint::DirPath)]
    pub output: PathBuf,

    /// Re-shard the output into files of at most SIZE tensor bytes (5GB, 500MB, 2GiB, bytes).
    /// Default: mirror --aligned's files.
    #[arg(long, value_name = "SIZE", value_parser = parse_shard_size)]
    pub max_shard_size: Option<u64>,

    /// Dtype of the extrapolated tensors; `auto` keeps --aligned's dtype per tensor.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto, value_name = "DTYPE")]
    pub dtype: DtypeArg,

    /// Replace --output if it exists (only once the new checkpoint is complete).
    #[arg(long, short = 'f')]
    pub force: bool,

    /// Validate everything and print the plan, without writing anything.
    #[arg(long, short = 'n')]
    pub dry_run: bool,

    /// Number of worker threads [default: all cores].
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// No progress bar and no summary (warnings and errors are still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,

    /// Print a JSON summary (or, with --dry-run, the plan) on stdout.
    #[arg(long)]
    pub json: bool,

    /// Warn when the whole-model ‖θ1 − θ0‖/‖θ0‖ exceeds R: past it, the premise that
    /// alignment moved the model only a little is doubtful (see `expo diff`).
    #[arg(long, value_name = "R", default_value_t = expo::stats::DEFAULT_RELATIVE_CHANGE_WARNING, value_parser = parse_ratio)]
    pub warn_relative_change: f64,

    /// When --aligned is a LoRA adapter: write θ2 as an adapter (B factors × (1+α)), or
    /// as a full checkpoint laid out like --sft [default: the kind of --aligned].
    #[arg(long = "as", value_enum, value_name = "KIND")]
    pub as_kind: Option<AsKindArg>,
}

/// Values of `--as`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AsKindArg {
    Adapter,
    Model,
}

/// The θ2 options of a search (the same meaning as in `expo extrapolate`).
#[derive(Debug, Args)]
pub struct ThetaArgs {
    /// The SFT checkpoint θ0: a directory, a .safetensors file, or a Hub id org/name[@REV]
    /// found in the local Hugging Face cache.
    #[arg(long, value_name = "PATH", value_hint = ValueHint::AnyPath)]
    pub sft: PathBuf,

    /// The aligned (DPO/RLHF) checkpoint θ1 trained from --sft; also the α = 0 baseline.
    #[arg(long, value_name = "PATH", value_hint = ValueHint::AnyPath)]
    pub aligned: PathBuf,

    /// Per-module α: tensors whose name matches REGEX get VALUE, a number or xF (F times
    /// each candidate's α). Repeatable; the first matching rule wins (after --skip).
    #[arg(long, value_name = "REGEX=VALUE", value_parser = expo::alpha::parse_rule)]
    pub alpha_for: Vec<AlphaRule>,

    /// Tensors whose name matches REGEX get α = 0 (--aligned's values). Repeatable.
    #[arg(long, value_name = "REGEX", value_parser = expo::alpha::parse_skip)]
    pub skip: Vec<AlphaRule>,

    /// Re-shard candidates into files of at most SIZE tensor bytes (5GB, 500MB, 2GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_shard_size)]
    pub max_shard_size: Option<u64>,

    /// Dtype of the extrapolated tensors; `auto` keeps --aligned's dtype per tensor.
    #[arg(long, value_enum, default_value_t = DtypeArg::Auto, value_name = "DTYPE")]
    pub dtype: DtypeArg,

    /// Worker threads for building candidates [default: all cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,
}

/// Arguments of `expo search`.
#[derive(Debug, Args)]
pub struct SearchArgs {
    #[command(flatten)]
    pub theta: ThetaArgs,

    /// The evaluator: a shell command run once per candidate, with {alpha} {output}
    /// {workdir} {slot} {trial} replaced (shell-quoted; {{ and }} are literal braces).
    #[arg(long, value_name = "CMD")]
    pub eval: String,

    /// The first batch of α (a list or START:END:STEP), evaluated with θ1 (α = 0).
    #[arg(long, short = 'a', value_name = "ALPHA", default_value = "0.1:0.5:0.1", allow_hyphen_values = true, value_parser = parse_alpha_list)]
    pub alpha: AlphaList,

    /// The range the search may explore [default: 0 to 8 × the first batch's largest α].
    #[arg(long, value_name = "MIN:MAX", allow_hyphen_values = true, value_parser = expo::search::parse_bounds)]
    pub bounds: Option<expo::search::Bounds>,

    /// Do not evaluate --aligned itself (α = 0) as the baseline.
    #[arg(long)]
    pub no_baseline: bool,

    /// The step at which the search stops zooming: `auto` (the 1-2-5 value nearest
    /// 0.1·(1 + |α|): 0.1 near 0.3, 0.5 near 2.5) or a fixed step such as 0.05.
    #[arg(long, value_name = "auto|X", default_value = "auto", value_parser = expo::search::parse_resolution)]
    pub resolution: expo::search::Resolution,

    /// Most evaluations (retries included).
    #[arg(long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10000))]
    pub max_evals: u32,

    /// Read the score from the JSON document on stdout (or in --score-file) at this RFC 6901
    /// pointer, e.g. '/results/gsm8k/acc,none' (~1 is `/`, ~0 is `~`).
    #[arg(long, value_name = "POINTER", value_parser = expo::search::evaluator::parse_pointer)]
    pub score_json: Option<String>,

    /// Read the score from this file (placeholders as in --eval) instead of stdout.
    #[arg(long, value_name = "TEMPLATE")]
    pub score_file: Option<String>,

    /// Lower scores are better (a loss, a perplexity).
    #[arg(long)]
    pub minimize: bool,

    /// Tie tolerance: the search is `flat` when the best α's neighbours score within X of
    /// it, and `no-gain` when θ1 (α = 0) does. Equal scores go to the smaller α.
    #[arg(long, value_name = "X", default_value_t = 0.0, value_parser = parse_ratio)]
    pub tie: f64,

    /// Evaluations run at once (one per GPU, say); a slot is refilled as soon as it frees.
    #[arg(long, short = 'j', value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub jobs: u16,

    /// Stop an evaluation after DUR (90s, 30m, 2h) and count it as failed.
    #[arg(long, value_name = "DUR", value_parser = expo::search::parse_timeout)]
    pub timeout: Option<std::time::Duration>,

    /// After SIGTERM (timeout or Ctrl-C), SIGKILL the evaluator's process group after DUR.
    #[arg(long, value_name = "DUR", default_value = "10s", value_parser = expo::search::parse_duration)]
    pub kill_after: std::time::Duration,

    /// Run each trial as a Slurm batch job submitted with `sbatch --parsable OPTIONS`
    /// (shell syntax; '' for Slurm's defaults). expo follows the jobs with squeue, cancels
    /// them with scancel (TERM first, the hard cancel after --kill-after) and counts
    /// --timeout from when a job runs. The run and candidate directories must be on a file
    /// system the compute nodes share.
    #[arg(long, value_name = "SBATCH OPTIONS", allow_hyphen_values = true)]
    pub slurm: Option<String>,

    /// With --slurm: stop the search when a job waits in the queue longer than DUR
    /// [default: no limit].
    #[arg(long, value_name = "DUR", value_parser = expo::search::parse_duration, requires = "slurm")]
    pub queue_timeout: Option<std::time::Duration>,

    /// Runs again a failed evaluation (an exit code other than 0/125/126/127, a timeout, no
    /// score) this many times before leaving a hole.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub retries: u32,

    /// Stop (exit 1) once N α values failed even after their retries.
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_failures: u32,

    /// Where candidates are written; must contain {alpha} [default: RUN/alpha-{alpha}].
    #[arg(long, short = 'o', value_name = "TEMPLATE", value_hint = ValueHint::DirPath)]
    pub output: Option<PathBuf>,

    /// How many of the best candidates stay on disk (`all` keeps every one); the others
    /// are deleted once out of contention. Only candidates this search built are deleted.
    #[arg(long, value_name = "K|all", default_value = "1", value_parser = expo::search::parse_keep)]
    pub keep: expo::search::Keep,

    /// The run directory: ledger, per-trial logs and work directories, plot, summary.
    #[arg(long, value_name = "DIR", default_value = "expo-search", value_hint = ValueHint::DirPath)]
    pub run: PathBuf,

    /// Continue the search recorded in --run: finished trials are not run again.
    #[arg(long)]
    pub resume: bool,

    /// Print the summary (RUN/summary.json) on stdout.
    #[arg(long)]
    pub json: bool,

    /// Check the inputs, the free disk space and the run directory, and print the
    /// evaluator commands of the first batch, without running anything.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
}

/// Values of `--dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Auto,
    Bf16,
    F16,
    F32,
    F64,
}

impl DtypeArg {
    /// The planning choice this stands for.
    pub fn choice(self) -> DtypeChoice {
        match self {
            DtypeArg::Auto => DtypeChoice::Auto,
            DtypeArg::Bf16 => DtypeChoice::Fixed(FloatDtype::BF16),
            DtypeArg::F16 => DtypeChoice::Fixed(FloatDtype::F16),
            DtypeArg::F32 => DtypeChoice::Fixed(FloatDtype::F32),
            DtypeArg::F64 => DtypeChoice::Fixed(FloatDtype::F64),
        }
    }
}

fn parse_ratio(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if r >= 0.0 && r.is_finite() => Ok(r),
        _ => Err(format!("`{s}` is not a non-negative number (e.g. 2e-3)")),
    }
}

/// The values of `--alpha`, in the order given, without duplicates.
#[derive(Debug, Clone, PartialEq)]
pub struct AlphaList(pub Vec<f64>);

fn parse_alpha_list(s: &str) -> Result<AlphaList, String> {
    expo::alpha::parse_alphas(s).map(AlphaList)
}

fn parse_shard_size(s: &str) -> Result<u64, String> {
    expo::size::parse_size(s)
}

/// Arguments of `expo diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// θ0, the checkpoint trained from (e.g. SFT): a directory, a .safetensors file, or a
    /// Hub id org/name[@REV] found in the local Hugging Face cache.
    #[arg(
        long,
        value_name = "PATH",
        value_hint = ValueHint::AnyPath,
        requires = "aligned",
        conflicts_with = "paths"
    )]
    pub sft: Option<PathBuf>,

    /// θ1, the checkpoint trained from --sft (e.g. DPO/RLHF); the same kinds of argument.
    #[arg(
        long,
        value_name = "PATH",
        value_hint = ValueHint::AnyPath,
        requires = "sft",
        conflicts_with = "paths"
    )]
    pub aligned: Option<PathBuf>,

    /// Checkpoints in training order instead of --sft/--aligned: two (θ0 θ1), or three or
    /// more (e.g. pre-trained SFT DPO) for the pairwise summary table.
    #[arg(
        value_name = "PATH",
        value_hint = ValueHint::AnyPath,
        num_args = 2..,
        required_unless_present = "sft"
    )]
    pub paths: Vec<PathBuf>,

    /// How many of the most-changed tensors (by ‖Δ‖/‖θ0‖) to list: a number or `all`.
    #[arg(long, value_name = "K", default_value = "10", value_parser = parse_top)]
    pub top: usize,

    /// Print everything (summary, every tensor, layers) as JSON on stdout.
    #[arg(long)]
    pub json: bool,

    /// Number of worker threads [default: all cores].
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub threads: Option<u16>,

    /// No progress bar and no timing line on stderr (warnings are still printed).
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

impl DiffArgs {
    /// The checkpoints to compare, θ0 first.
    pub fn inputs(&self) -> Vec<PathBuf> {
        match (&self.sft, &self.aligned) {
            (Some(sft), Some(aligned)) => vec![sft.clone(), aligned.clone()],
            _ => self.paths.clone(),
        }
    }
}

/// Arguments of `expo inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The checkpoint: a directory, a .safetensors file, a *.safetensors.index.json, or a
    /// Hub id org/name[@REV] found in the local Hugging Face cache.
    #[arg(value_name = "PATH", value_hint = ValueHint::AnyPath)]
    pub path: PathBuf,

    /// Print the listing as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

fn parse_top(s: &str) -> Result<usize, String> {
    if s.trim().eq_ignore_ascii_case("all") {
        return Ok(usize::MAX);
    }
    s.trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a count (e.g. 10) or `all`"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn negative_alpha_parses() {
        let cli = Cli::try_parse_from([
            "expo",
            "extrapolate",
            "--sft",
            "a",
            "--aligned",
            "b",
            "--alpha",
            "-0.5",
            "-o",
            "c",
        ])
        .unwrap();
        let Command::Extrapolate(args) = cli.command else {
            panic!("parsed as another subcommand");
        };
        assert_eq!(args.alpha, AlphaList(vec![-0.5]));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        for bad in [
            &["--alpha", "nan"][..],
            &["--alpha", "inf"],
            &["--alpha", "x"],
            &["--alpha", "0.3", "--threads", "0"],
            &["--alpha", "0.3", "--max-shard-size", "5XB"],
            &["--alpha", "0.3", "--dtype", "f8"],
        ] {
            let mut argv = vec![
                "expo",
                "extrapolate",
                "--sft",
                "a",
                "--aligned",
                "b",
                "-o",
                "c",
            ];
            argv.extend_from_slice(bad);
            let err = Cli::try_parse_from(argv).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}");
        }
    }
}
