//! The typed settings of a build: what `expo extrapolate`'s flags (or a search) ask for,
//! validated as far as can be without touching the disk.

use std::path::PathBuf;

use crate::pairing::DtypeChoice;
use crate::plan::AlphaRule;

/// What `--aligned` as a LoRA adapter becomes (`--as`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsKind {
    /// A new adapter whose `lora_B` factors are scaled by 1 + α.
    Adapter,
    /// A full checkpoint: θ0 + (1 + α)·ΔW, merged.
    Model,
}

/// One build, typed and validated as far as can be without touching the disk: what the
/// command line's flags (or a search) ask for.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--sft`: θ0, a directory, file or Hub id.
    pub sft: PathBuf,
    /// `--aligned`: θ1, or a LoRA adapter trained on θ0.
    pub aligned: PathBuf,
    /// One output per α, in this order.
    pub alphas: Vec<f64>,
    /// `--skip` rules (α = 0), tried before the `--alpha-for` rules.
    pub skip: Vec<AlphaRule>,
    /// `--alpha-for` rules: the first that matches a tensor sets its α.
    pub alpha_for: Vec<AlphaRule>,
    /// Where each output goes; holds `{alpha}` when there are several α.
    pub output: PathBuf,
    pub max_shard_size: Option<u64>,
    pub dtype: DtypeChoice,
    /// Replace an existing output checkpoint.
    pub force: bool,
    pub threads: Option<u16>,
    /// Warn when ‖θ1 − θ0‖/‖θ0‖ is above this.
    pub warn_relative_change: f64,
    /// For an adapter as `--aligned`: what to write (`None`: refused, the user must say).
    pub as_kind: Option<AsKind>,
    /// The command line recorded in each output's provenance.
    pub command: Vec<String>,
}

impl Settings {
    /// `--skip` then `--alpha-for`: the first rule that matches a tensor sets its α.
    pub fn rules(&self) -> Vec<AlphaRule> {
        crate::plan::rule_chain(&self.skip, &self.alpha_for)
    }
}
