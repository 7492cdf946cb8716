//! One module per subcommand, each with a `run`.
pub mod extrapolate;
