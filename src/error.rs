//! Errors that several modules share. Each concern's own errors (headers, pairing, the
//! writer, output locations, side files) stay in its module; these are the kinds the
//! command line turns into exit codes.

pub use crate::interrupt::Interrupted;

/// A usage error found after parsing: a flag's value, or a combination of flags, that
/// cannot work. The command line exits with 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);
