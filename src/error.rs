//! Errors that several modules share. Each concern's own errors (headers, pairing, the
//! writer, output locations, side files) stay in its module; these are the kinds the
//! command line turns into exit codes.

use std::path::PathBuf;

pub use crate::interrupt::Interrupted;
use crate::text::short_number;

/// A usage error found after parsing: a flag's value, or a combination of flags, that
/// cannot work. The command line exits with 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Errors while reading inputs or writing the output.
///
/// The I/O error of [`EngineError::Io`] is its `source()`, not part of its message, so that
/// `{:#}` prints it once.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{path}: {op} failed")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    NoSpace { path: PathBuf, reason: String },
    #[error(
        "{path} changed since its header was read (it is now {actual} bytes, expected {expected}, or it was replaced or modified); inputs must not be modified during a run"
    )]
    InputChanged {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },
    #[error("{path} {what} while expo was reading it; inputs must not be modified during a run")]
    InputModified { path: PathBuf, what: &'static str },
    #[error("tensor `{tensor}` ({dtype}) is not float, so it must be identical in both checkpoints, but it differs (first at byte {offset}); are these two checkpoints of the same model?")]
    ExactTensorDiffers {
        tensor: String,
        dtype: crate::dtype::Dtype,
        offset: u64,
    },
    #[error("tensor `{tensor}`: {count} of {elements} values become infinite or NaN in {dtype} at alpha = {alpha} although the inputs are finite; use a smaller --alpha{}", if *wider_dtype { " or a wider --dtype (e.g. f32)" } else { "" }, alpha = short_number(*alpha))]
    Overflow {
        tensor: String,
        count: u64,
        elements: u64,
        dtype: crate::dtype::FloatDtype,
        alpha: f64,
        /// Whether a wider `--dtype` is a way out (not for an adapter, whose output keeps
        /// each tensor's dtype).
        wider_dtype: bool,
    },
    #[error("adapter tensor `{tensor}` holds {count} infinite or NaN values, so the merged weights would too; the adapter is damaged (check how it was trained and saved)")]
    NonFiniteFactor { tensor: String, count: u64 },
    #[error("tensor `{tensor}`: {count} of {elements} values do not fit in {dtype} (they become infinite) although --aligned's are finite; choose a wider --dtype")]
    CastOverflow {
        tensor: String,
        count: u64,
        elements: u64,
        dtype: crate::dtype::FloatDtype,
    },
    #[error("writing {outputs} outputs at once keeps at least {needed} files open, but the open-files limit is {limit} (`ulimit -n`; {open} are open already); raise the limit (e.g. `ulimit -n {suggest}`) or write fewer outputs per run (at most {fit})")]
    TooManyOpenFiles {
        outputs: usize,
        needed: u64,
        limit: u64,
        open: u64,
        suggest: u64,
        fit: u64,
    },
    #[error("{path} was replaced or removed while expo was writing it; another process is changing expo's temporary directory")]
    OutputReplaced { path: PathBuf },
    #[error("interrupted")]
    Interrupted,
}
