//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh folder under cargo's per-target temporary folder, kept for the life of the process
/// (statics are never dropped, so the tests' caches stay inspectable after a failure).
pub fn fresh_dir(name: &str) -> PathBuf {
    let dir = tempfile::Builder::new()
        .prefix(&format!("{name}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temporary folder");
    dir.keep()
}

/// Every entry file below `dir` (everything but `source.rs` and markers).
pub fn entry_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for item in read.flatten() {
            let path = item.path();
            let name = item.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                stack.push(path);
            } else if name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit()) {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// The keys (hex) of every entry stored below `dir`: entry files and live packed entries.
pub fn stored_keys(dir: &Path) -> Vec<String> {
    let mut keys: Vec<String> = entry_files(dir)
        .iter()
        .map(|path| path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for version in version_dirs(dir) {
        keys.extend(
            memo::format::pack::contents(&version, false)
                .entries
                .iter()
                .map(|entry| entry.key.to_hex()),
        );
    }
    keys.sort();
    keys
}

/// The hex key the documented scheme gives for `identity`'s call with `args`.
pub fn scheme_key(
    identity: &str,
    version: &str,
    args: impl FnOnce(&mut memo::format::key::ArgsHasher),
) -> String {
    let mut hasher = memo::format::key::ArgsHasher::new(identity, version);
    args(&mut hasher);
    hasher.finish().unwrap().to_hex()
}

/// Every pack file below `dir`.
pub fn pack_files(dir: &Path) -> Vec<PathBuf> {
    let mut packs: Vec<PathBuf> = version_dirs(dir)
        .iter()
        .flat_map(|version| memo::format::pack::pack_paths(version))
        .collect();
    packs.sort();
    packs
}

/// The folders below `dir` (and `dir` itself) that hold packs.
fn version_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        if dir.join(memo::format::pack::PACK_DIR).is_dir() {
            found.push(dir.clone());
        }
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for item in read.flatten() {
            if item.path().is_dir() {
                stack.push(item.path());
            }
        }
    }
    found
}

/// The number of lines in a file (0 when it does not exist): child processes append one line
/// per computation to such a counter file.
pub fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|text| text.lines().count())
        .unwrap_or(0)
}

/// Appends `line` to the file at `path`, in one write, so that lines appended by concurrent
/// processes or threads never interleave.
pub fn append_line(path: &Path, line: &str) {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    file.write_all(format!("{line}\n").as_bytes()).unwrap();
}

/// This test binary, to run only the `#[ignore]`d test `test` as a child process, with the
/// cache settings of the environment removed.
pub fn child_test(test: &str) -> std::process::Command {
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", test, "--ignored", "--nocapture"])
        .env_remove("MEMO_DIR")
        .env_remove("MEMO_DISABLE");
    command
}

/// Rewrites an uncompressed entry as a valid one (same key, duration and flags, new checksum) with
/// another creation time and/or another payload.
pub fn rewrite_entry(path: &Path, created: Option<std::time::SystemTime>, payload: Option<&[u8]>) {
    use memo::format::entry::{decode_header, encode_header_with_flags, HEADER_LEN};
    let bytes = std::fs::read(path).unwrap();
    let header = decode_header(&bytes).unwrap();
    let flags = u16::from_le_bytes([bytes[6], bytes[7]]);
    let payload = payload.unwrap_or(&bytes[HEADER_LEN..]);
    let created = created.unwrap_or(header.created);
    let mut rewritten =
        encode_header_with_flags(&header.key, created, header.duration, flags, payload).to_vec();
    rewritten.extend_from_slice(payload);
    std::fs::write(path, rewritten).unwrap();
}

/// Sets a file's modification time, which memo reads as an entry's last use.
pub fn set_last_used(path: &Path, when: std::time::SystemTime) {
    std::fs::File::options()
        .write(true)
        .open(path)
        .unwrap()
        .set_modified(when)
        .unwrap();
}

/// Counts how many times a function body ran.
pub struct Counter(AtomicUsize);

impl Counter {
    pub const fn new() -> Self {
        Counter(AtomicUsize::new(0))
    }

    pub fn bump(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The inspector binary, built with the examples by `cargo test`.
pub fn inspector() -> PathBuf {
    let debug = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .to_path_buf();
    let binary = debug
        .join("examples")
        .join(format!("inspect{}", std::env::consts::EXE_SUFFIX));
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds the examples (a filtered `cargo test --test inspect` \
         does not; run `cargo build --example inspect` first)",
        binary.display()
    );
    binary
}
