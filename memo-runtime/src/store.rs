//! The storage layer: where entries live and how they are written and read.
//!
//! Layout of the default directory store (see `docs/FORMAT.md`):
//!
//! ```text
//! <root>/                       MEMO_DIR, or the default location
//!   .gitignore, CACHEDIR.TAG    written when memo creates the root
//!   v1/                         layout version
//!     .gitignore                always: `*`
//!     <function>/               e.g. `my_crate.physics.simulate` (module path, `::` -> `.`)
//!       <version>/              first 16 hex digits of the function-version hash
//!         source.rs             the source text that version was compiled from
//!         <kk>/<key>            one entry per call: `kk` = first two hex digits of the key
//! ```
//!
//! Entries are immutable: each is written to a temporary file in its final folder and renamed
//! into place, so a reader sees either no entry or a complete one.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::key::CacheKey;

/// Name of the layout folder under the root; bumped when the layout changes.
pub const LAYOUT_DIR: &str = "v1";
/// File holding a function version's source text.
pub const SOURCE_FILE: &str = "source.rs";
/// How many hex digits of the version hash name a version's folder. The full hash is part of
/// every entry's key, so two versions that shared a folder could still never read each other.
pub const VERSION_DIR_DIGITS: usize = 16;
const TEMP_PREFIX: &str = ".tmp-";

/// Where one entry lives, independent of the storage backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EntryAddress<'a> {
    /// The function's folder name, from [`function_dir_name`].
    pub function: &'a str,
    /// The full version hash (hex).
    pub version: &'a str,
    /// The entry's key.
    pub key: &'a CacheKey,
}

/// The operations memo needs from a storage backend. Generated code never sees this trait, so
/// the layout can change without touching the macro.
pub(crate) trait Store: Send + Sync {
    /// Where the entry lives, for messages.
    fn describe(&self, at: &EntryAddress<'_>) -> PathBuf;
    /// Where the entries of one function version live.
    fn version_location(&self, function: &str, version: &str) -> PathBuf;
    /// The stored bytes of an entry, or `None` when there is none.
    fn read(&self, at: &EntryAddress<'_>) -> Result<Option<Vec<u8>>, Error>;
    /// Stores an entry atomically: readers see the old state or the complete new entry.
    fn write(&self, at: &EntryAddress<'_>, header: &[u8], payload: &[u8]) -> Result<(), Error>;
    /// Records the source text of a function version, if it is not recorded yet.
    fn save_source(&self, function: &str, version: &str, text: &str) -> Result<(), Error>;
    /// Removes every entry of every version of a function.
    fn clear_function(&self, function: &str) -> Result<(), Error>;
    /// Removes everything memo stored.
    fn clear(&self) -> Result<(), Error>;
}

/// The folder name of a function identity (`crate::module::name`): `::` becomes `.`, and any
/// character outside `[A-Za-z0-9_]` is escaped as `%XX` per UTF-8 byte, so the mapping is
/// injective (identifiers never contain `.` or `%`).
pub fn function_dir_name(identity: &str) -> String {
    let mut name = String::with_capacity(identity.len());
    for (i, segment) in identity.split("::").enumerate() {
        if i > 0 {
            name.push('.');
        }
        for ch in segment.chars() {
            if ch.is_ascii_alphanumeric() || ch == '_' {
                name.push(ch);
            } else {
                let mut utf8 = [0u8; 4];
                for byte in ch.encode_utf8(&mut utf8).bytes() {
                    name.push_str(&format!("%{byte:02X}"));
                }
            }
        }
    }
    name
}

/// The default backend: one file per entry under a local folder.
#[derive(Debug)]
pub(crate) struct DirStore {
    root: PathBuf,
    base: PathBuf,
}

impl DirStore {
    pub(crate) fn new(root: PathBuf) -> Self {
        let base = root.join(LAYOUT_DIR);
        DirStore { root, base }
    }

    fn version_dir(&self, function: &str, version: &str) -> PathBuf {
        let short = version.get(..VERSION_DIR_DIGITS).unwrap_or(version);
        self.base.join(function).join(short)
    }

    /// `<base>/<function>/<version>/<kk>/<key>`, built in one allocation: it is on every hit.
    fn entry_path(&self, at: &EntryAddress<'_>) -> PathBuf {
        let hex = at.key.to_hex();
        let short = at.version.get(..VERSION_DIR_DIGITS).unwrap_or(at.version);
        let len = self.base.as_os_str().len() + at.function.len() + short.len() + 2 + hex.len();
        let mut path = PathBuf::with_capacity(len + 4);
        path.push(&self.base);
        path.push(at.function);
        path.push(short);
        path.push(&hex[..2]);
        path.push(&hex);
        path
    }

    /// Creates `dir` and its parents; when the root itself is new, marks it as a cache folder.
    fn create_dir(&self, dir: &Path) -> Result<(), Error> {
        if !self.base.is_dir() {
            let root_is_new = !self.root.exists();
            create_private_dir(&self.base)
                .map_err(|e| Error::io("creating cache folder", &self.base, e))?;
            if root_is_new {
                write_marker(&self.root.join(".gitignore"), b"*\n");
                write_marker(&self.root.join("CACHEDIR.TAG"), CACHEDIR_TAG);
            }
            write_marker(&self.base.join(".gitignore"), b"*\n");
        }
        create_private_dir(dir).map_err(|e| Error::io("creating cache folder", dir, e))
    }

    /// Writes `parts` to a temporary file in `dir` and renames it to `path`.
    fn write_atomic(&self, dir: &Path, path: &Path, parts: &[&[u8]]) -> Result<(), Error> {
        let mut file = match tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dir(dir)?;
                tempfile::Builder::new()
                    .prefix(TEMP_PREFIX)
                    .tempfile_in(dir)
                    .map_err(|e| Error::io("creating temporary file in", dir, e))?
            }
            Err(e) => return Err(Error::io("creating temporary file in", dir, e)),
        };
        for part in parts {
            file.write_all(part)
                .map_err(|e| Error::io("writing cache entry", file.path(), e))?;
        }
        // On failure the temporary file is removed when `file` drops: no partial entry remains.
        file.persist(path)
            .map_err(|e| Error::io("renaming cache entry into place at", path, e.error))?;
        Ok(())
    }
}

const CACHEDIR_TAG: &[u8] = b"Signature: 8a477f597d28d172789f06886806bc55\n\
# This file is a cache directory tag created by memo.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";

fn write_marker(path: &Path, contents: &[u8]) {
    // Best effort: the markers help people and tools, the cache works without them.
    if let Ok(mut file) = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        let _ = file.write_all(contents);
    }
}

/// Creates a folder (and parents) readable only by the current user on Unix: cached results can
/// be as private as the data they were computed from.
fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn remove_dir(dir: &Path) -> Result<(), Error> {
    match fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("removing cache folder", dir, e)),
    }
}

impl Store for DirStore {
    fn describe(&self, at: &EntryAddress<'_>) -> PathBuf {
        self.entry_path(at)
    }

    fn version_location(&self, function: &str, version: &str) -> PathBuf {
        self.version_dir(function, version)
    }

    fn read(&self, at: &EntryAddress<'_>) -> Result<Option<Vec<u8>>, Error> {
        let path = self.entry_path(at);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            // A missing folder on the way (or a file where the folder should be): no entry.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(Error::io("reading cache entry", path, e)),
        }
    }

    fn write(&self, at: &EntryAddress<'_>, header: &[u8], payload: &[u8]) -> Result<(), Error> {
        let path = self.entry_path(at);
        let dir = path.parent().unwrap_or(&self.base).to_path_buf();
        self.write_atomic(&dir, &path, &[header, payload])
    }

    fn save_source(&self, function: &str, version: &str, text: &str) -> Result<(), Error> {
        let dir = self.version_dir(function, version);
        let path = dir.join(SOURCE_FILE);
        if path.is_file() {
            return Ok(());
        }
        self.write_atomic(&dir, &path, &[text.as_bytes()])
    }

    fn clear_function(&self, function: &str) -> Result<(), Error> {
        remove_dir(&self.base.join(function))
    }

    fn clear(&self) -> Result<(), Error> {
        remove_dir(&self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn function_dir_names_are_readable_and_injective() {
        assert_eq!(function_dir_name("my_crate::a::f"), "my_crate.a.f");
        assert_eq!(function_dir_name("c::résumé"), "c.r%C3%A9sum%C3%A9");
        assert_ne!(function_dir_name("a::b_c"), function_dir_name("a_b::c"));
    }

    #[test]
    fn entry_paths_follow_the_documented_layout() {
        let store = DirStore::new(PathBuf::from("/cache"));
        let key = CacheKey::from_bytes([0xab; 32]);
        let version = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let path = store.entry_path(&EntryAddress {
            function: "k.f",
            version,
            key: &key,
        });
        let hex = "ab".repeat(32);
        assert_eq!(
            path,
            PathBuf::from(format!("/cache/v1/k.f/0123456789abcdef/ab/{hex}"))
        );
    }
}
