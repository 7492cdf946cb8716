//! One module per subcommand, each with a `run`.
pub mod completions;
pub mod extrapolate;
pub mod man;
