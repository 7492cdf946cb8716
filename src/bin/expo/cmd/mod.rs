//! One module per subcommand, each with a `run`.
pub mod completions;
pub mod diff;
pub mod extrapolate;
pub mod inspect;
pub mod man;
pub mod search;
