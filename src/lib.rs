//! expo: model extrapolation (ExPO) for safetensors checkpoints.
pub mod alpha;
pub mod checkpoint;
pub mod cli;
pub mod cmd;
pub mod dtype;
pub mod engine;
pub mod failpoint;
pub mod header;
pub mod hub;
pub mod interrupt;
pub mod kernel;
pub mod output;
pub mod plan;
pub mod report;
pub mod sidefiles;
pub mod size;
pub mod stats;
