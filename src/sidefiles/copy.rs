//! Copying the side files into an output, from the handles opened at validation, and
//! writing expo's own files.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::listing::{copy_range, reopen, Opened, Stamp};
use super::{io_err, SideFileError, SideFiles};

impl SideFiles {
    /// Copies the side files into `dest` (creating subdirectories), from the handles opened
    /// at validation, and fsyncs each. Fails, naming the file, if one changed since it was
    /// checked. New files get the usual permissions (0666 less the umask).
    pub fn copy_into(&self, dest: &Path) -> Result<(), SideFileError> {
        crate::failpoint::pause("side-files-copy");
        for (rel, opened) in self.copy.iter().zip(&self.opened) {
            crate::interrupt::check()?;
            let dst = dest.join(rel);
            if let Some(parent) = dst.parent() {
                fs::create_dir_all(parent).map_err(io_err(parent, "create directory"))?;
            }
            let mut output = create_new(&dst)?;
            if let Some(edited) = &opened.edited {
                output.write_all(edited).map_err(io_err(&dst, "write"))?;
                verify(opened, None)?;
            } else {
                let reopened;
                let file = match &opened.file {
                    Some(f) => f,
                    None => {
                        reopened = reopen(opened)?;
                        &reopened
                    }
                };
                copy_range(file, opened, &mut output, &dst)?;
                verify(opened, Some(file))?;
            }
            output.sync_all().map_err(io_err(&dst, "fsync"))?;
        }
        Ok(())
    }
}
/// Fails if the file changed since validation: through its handle (size, mtime), and at
/// its path (removed, or replaced by another file).
fn verify(opened: &Opened, file: Option<&File>) -> Result<(), SideFileError> {
    let changed = |what| SideFileError::Changed {
        path: opened.full.clone(),
        what,
    };
    if let Some(file) = file {
        let meta = file.metadata().map_err(io_err(&opened.full, "stat"))?;
        if let Some(what) = opened.stamp.change(&Stamp::of(&meta)) {
            return Err(changed(what));
        }
    }
    match fs::metadata(&opened.full) {
        Ok(meta) => match opened.stamp.change(&Stamp::of(&meta)) {
            Some(what) => Err(changed(what)),
            None => Ok(()),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(changed("was removed")),
        Err(e) => Err(io_err(&opened.full, "stat")(e)),
    }
}

/// Creates a new file (never overwriting one: two output files with one name are a bug
/// caught here even if [`SideFiles::check_output_names`] was not called).
fn create_new(path: &Path) -> Result<File, SideFileError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io_err(path, "create"))
}

/// Writes `contents` to `dest/name` (a new file) and fsyncs it.
pub fn write_file(dest: &Path, name: &str, contents: &[u8]) -> Result<(), SideFileError> {
    let path = dest.join(name);
    let mut f = create_new(&path)?;
    f.write_all(contents).map_err(io_err(&path, "write"))?;
    f.sync_all().map_err(io_err(&path, "fsync"))
}
