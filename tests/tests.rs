//! expo's integration tests, in one test binary (as ripgrep's and xsv's are): every file
//! beside this one is a module of it, and `common` holds what they share. One binary
//! links the crate once instead of once per file, and tests of every file run in one
//! process, in parallel.
//!
//! Run one file's tests with `cargo test --test integration <module>::`, e.g.
//! `cargo test --test integration safety::`.

// Shared builders, readers, the f64 reference and the command runner.
mod common;

// LoRA adapters: built here, PEFT's layout, and written by real PEFT.
mod adapter;
mod adapter_fixtures;
mod adapter_peft;
// The commands and their output.
mod completions;
mod diff;
mod examples;
mod extrapolate;
mod inspect;
mod layout;
mod search;
mod sidefiles;
// Inputs: real writers' layouts, the Hub cache, hostile files, the header rules.
mod fuzz_inputs;
mod header_crate;
mod hub;
mod inputs;
// Limits, failures and what is left behind.
mod engine;
mod errors;
mod safety;
mod staging;
// Random checkpoints against the reference.
mod property;
