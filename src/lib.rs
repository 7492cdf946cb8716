//! expo: model extrapolation (ExPO) for safetensors checkpoints and LoRA adapters.
//!
//! The library below the `expo` command line. It takes typed settings ([`build::Settings`],
//! [`search::Config`], …), returns results, and never prints: what happens while it runs
//! reaches the caller through one [`reporter::Reporter`]. See ARCHITECTURE.md for the layers.
pub mod adapter;
pub mod alpha;
pub mod build;
pub mod checkpoint;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod finish;
pub mod header;
pub mod hub;
pub mod interrupt;
pub mod kernel;
pub mod maps;
pub mod output;
pub mod pairing;
pub mod plan;
pub mod pool;
pub mod reporter;
pub mod search;
pub mod settings;
pub mod sidefiles;
pub mod size;
pub mod stats;
pub mod sys;
pub mod text;
pub mod writer;
