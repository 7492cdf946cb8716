//! `expo search`: find the best α by running the user's own evaluator.
pub mod rule;
