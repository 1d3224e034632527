//! What the benchmark programs share.

use std::path::PathBuf;

/// Removes a folder when dropped. Held in `main`, it removes the benchmark's cache at the end,
/// also when a check fails (the panic unwinds through `main`); statics are never dropped, so a
/// `TempDir` in one would stay on disk.
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
