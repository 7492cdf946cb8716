//! One `expo extrapolate` run as data: the validated inputs and outputs, each output's
//! plan, and what writing them produced. Built and consumed by
//! [`crate::cmd::extrapolate`]'s steps, printed by [`crate::report::extrapolate`].

use anyhow::Result;

use crate::checkpoint::Checkpoint;
use crate::cli::ExtrapolateArgs;
use crate::engine::MappedCheckpoint;
use crate::hub::ResolvedInput;
use crate::output::OutputTarget;
use crate::plan::{AlphaRule, Plan};
use crate::sidefiles::{RuleRecord, SideFiles};

/// One input checkpoint: its flag, the opened checkpoint and where it was resolved to.
#[derive(Debug)]
pub struct Input {
    pub flag: &'static str,
    pub checkpoint: Checkpoint,
    pub resolved: ResolvedInput,
}

/// One output of the run: its α, its validated location and its plan.
#[derive(Debug)]
pub struct Output {
    pub alpha: f64,
    pub target: OutputTarget,
    pub plan: Plan,
}

/// Everything validated before any work ([`prepare`]'s result).
pub struct Prepared<'a> {
    pub args: &'a ExtrapolateArgs,
    /// `--sft` and `--aligned`.
    pub inputs: [Input; 2],
    /// `--skip` rules, then `--alpha-for` rules: the first that matches sets a tensor's α.
    pub rules: Vec<AlphaRule>,
    /// How many tensors each rule set the α of.
    pub matches: Vec<usize>,
    /// One per α, in the order given. All share one layout; only α differs.
    pub outputs: Vec<Output>,
    pub side: SideFiles,
    /// The inputs' data, mapped; released once the outputs are written.
    pub(crate) maps: Option<[MappedCheckpoint; 2]>,
}

impl Prepared<'_> {
    /// `--aligned`: θ1.
    pub fn aligned(&self) -> &Checkpoint {
        &self.inputs[1].checkpoint
    }

    /// The rules with the α each gives in an output with `alpha`, and how many tensors
    /// each matched.
    pub fn rule_records(&self, alpha: f64) -> Vec<RuleRecord> {
        self.rules
            .iter()
            .zip(&self.matches)
            .map(|(r, &tensors)| RuleRecord {
                rule: r.spelling.clone(),
                alpha: r.alpha(alpha),
                tensors,
            })
            .collect()
    }
}

/// What [`produce`] did.
#[derive(Debug)]
pub struct Produced {
    /// One result per output, in order: `Ok` once the output is committed in place.
    pub results: Vec<Result<()>>,
    /// ‖θ1 − θ0‖/‖θ0‖ over the extrapolated tensors; `None` when not finite (an input holds
    /// inf or NaN) or when the read failed.
    pub relative_change: Option<f64>,
    /// The relative change is above `--warn-relative-change`.
    pub doubtful: bool,
}
