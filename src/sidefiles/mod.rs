//! Files beside the weights: θ1's configuration and tokenizer files copied byte for byte,
//! and the model card and provenance record expo writes itself.
//!
//! Side files are opened and checked when the inputs are validated ([`open_side_files`]):
//! only regular files are accepted (opened without blocking, checked with `fstat` after
//! opening, so a FIFO or a link to `/dev/zero` is refused by name, never read), and each
//! file's device, inode, size and modification time are recorded. The copy at the end
//! ([`SideFiles::copy_into`]) reads from the handle opened then, and fails if the file
//! changed in between (rewritten in place, renamed over, removed), like a changed weight file.

pub mod card;
pub mod config_dtype;
mod copy;
mod listing;
pub mod provenance;

use std::io;
use std::path::{Path, PathBuf};

pub use crate::text::shell_join;
pub use card::CardMetadata;
pub use copy::write_file;
pub use listing::{list_side_files, open_side_files, SideFiles};
pub use provenance::{InputRecord, Provenance, RuleRecord, TensorCounts, FORMULA, PAPER_URL};

/// Name of the provenance record written into the output.
pub const PROVENANCE_NAME: &str = "expo.json";
/// Name of the model card written into the output.
pub const MODEL_CARD_NAME: &str = "README.md";
/// Name of the configuration whose dtype `--dtype` updates.
pub const CONFIG_NAME: &str = "config.json";

/// Errors about side files. Each names the file; an I/O error is the `source()` of
/// [`SideFileError::Io`], not repeated in its message, so `{:#}` prints the cause once.
#[derive(Debug, thiserror::Error)]
pub enum SideFileError {
    #[error("{}: cannot {op}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is {kind}, not a regular file; expo copies only regular files from --aligned: remove it from the checkpoint directory, or replace it with the file it stands for",
        path.display()
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{} {what} after expo checked it; side files must not change while expo runs (is another program writing --aligned?); run again once it is complete",
        path.display()
    )]
    Changed { path: PathBuf, what: &'static str },
    #[error(
        "{first} and {second} would both be written to {name} in the output; rename the file in --aligned (and its entry in the index)"
    )]
    Collision {
        name: String,
        first: String,
        second: String,
    },
    #[error(transparent)]
    Interrupted(#[from] crate::interrupt::Interrupted),
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> SideFileError + 'a {
    move |source| SideFileError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}
