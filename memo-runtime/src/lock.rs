//! Cross-process single flight: a lock per key being computed.
//!
//! On Linux a key's lock is one byte of a per-version lock file (`.locks`), locked with an
//! open-file-description lock (`F_OFD_SETLK`): one `fcntl` to take, one to release, no file
//! created or deleted per key. The byte's offset is 62 bits of the key, so two keys share a byte
//! with negligible probability (and then only wait for each other). Like `flock`, such a lock
//! belongs to the open file, and the kernel releases it when its process dies. After locking,
//! the holder checks that the path still names the file it locked (the version folder may have
//! been removed and made again), and starts again otherwise; that check is made at most every
//! [`range::CHECK_EVERY`] per open lock file (two `stat` calls per lock were ~8 µs of the ~20 µs
//! memo spent on a miss in a VM: ~1 % of a 1 ms computation), so a process may go on locking a
//! removed file for that long after the folder was made again: two processes may then compute
//! one key at once (extra work, never a wrong value: entries are still written atomically).
//!
//! Elsewhere, one lock file per key:
//! A process that misses takes an exclusive lock (`flock` on Unix, `LockFileEx` on Windows) on
//! `<entry>.lock` before computing; a second process that misses on the same key waits for that
//! lock, then finds the value stored. The operating system releases the lock of a process that
//! dies, however it dies, so a killed holder never blocks anyone: the next waiter takes the lock
//! over at once. A waiter that waits longer than the memory's lock timeout computes by itself.
//!
//! The holder deletes the lock file before releasing it. A waiter may then hold a lock on a
//! deleted file, so after locking it checks that the path still names the file it locked (same
//! inode), and starts again otherwise.
//!
//! On NFS, `flock` is emulated with byte-range locks by the Linux client (since 2.6.12) and works
//! across machines when the server runs the lock manager (NFSv3 `lockd`, or NFSv4); without it,
//! locking fails and memo computes without the cross-process guarantee (a duplicate computation,
//! never a wrong value: entries are still written atomically).

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// A held lock, released when dropped.
#[derive(Debug)]
pub(crate) enum KeyLock {
    /// A lock file of its own, deleted on release (not Linux).
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    File { path: PathBuf, file: File },
    /// One byte of a shared lock file.
    #[cfg(target_os = "linux")]
    Range {
        file: std::sync::Arc<range::LockFile>,
        offset: i64,
    },
    /// The local lock plus a lease on the key in a remote store (released after the local
    /// lock: fields drop in order).
    #[cfg(feature = "remote")]
    #[allow(dead_code, reason = "held for what their drops release")]
    Remote {
        local: Box<KeyLock>,
        lease: Option<crate::remote::Lease>,
    },
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        match self {
            KeyLock::File { path, file } => {
                // Delete first, release second: nobody can lock the file between the two and
                // believe it is current, because they check the path afterwards.
                let _ = fs::remove_file(path);
                let _ = file.unlock();
            }
            #[cfg(target_os = "linux")]
            KeyLock::Range { file, offset } => {
                let _ = range::set(&file.file, *offset, libc::F_UNLCK);
            }
            // Both parts release themselves when dropped.
            #[cfg(feature = "remote")]
            KeyLock::Remote { .. } => {}
        }
    }
}

/// Open-file-description byte-range locks (Linux).
#[cfg(target_os = "linux")]
pub(crate) mod range {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::{Duration, Instant};

    use super::{Acquired, KeyLock};

    /// How long a lock file found where it was opened is trusted to be there still.
    pub(crate) const CHECK_EVERY: Duration = Duration::from_millis(100);

    /// A lock file kept open, with what tells whether its path still names it.
    #[derive(Debug)]
    pub(crate) struct LockFile {
        pub(crate) file: File,
        /// Device and inode of the open file.
        identity: (u64, u64),
        opened: Instant,
        /// When the path was last found to name this file, in nanoseconds after `opened`
        /// (`u64::MAX`: never).
        checked: AtomicU64,
    }

    impl LockFile {
        /// Opens (creating it if needed) the lock file at `path`.
        pub(crate) fn open(path: &Path) -> io::Result<LockFile> {
            let file = super::open(path)?;
            let meta = file.metadata()?;
            Ok(LockFile {
                file,
                identity: (meta.dev(), meta.ino()),
                opened: Instant::now(),
                checked: AtomicU64::new(u64::MAX),
            })
        }

        /// Whether `path` still names this file: looked at on the disk at most every
        /// [`CHECK_EVERY`].
        fn still_current(&self, path: &Path) -> io::Result<bool> {
            let now = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
            let checked = self.checked.load(Ordering::Relaxed);
            if checked != u64::MAX && now.saturating_sub(checked) < CHECK_EVERY.as_nanos() as u64 {
                return Ok(true);
            }
            let current = super::names(path, self.identity)?;
            if current {
                self.checked.store(now, Ordering::Relaxed);
            }
            Ok(current)
        }
    }

    /// The byte of the lock file that stands for a key: 62 bits of it.
    pub(crate) fn offset(key: &[u8; 32]) -> i64 {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&key[..8]);
        (u64::from_le_bytes(bytes) >> 2) as i64
    }

    /// Sets (`F_WRLCK`) or clears (`F_UNLCK`) the lock on one byte without waiting; `Ok(false)`
    /// when another open file holds it.
    pub(crate) fn set(file: &File, offset: i64, kind: libc::c_int) -> io::Result<bool> {
        // SAFETY: an all-zero `flock` is a valid value of this plain C struct.
        let mut request: libc::flock = unsafe { std::mem::zeroed() };
        request.l_type = kind as libc::c_short;
        request.l_whence = libc::SEEK_SET as libc::c_short;
        request.l_start = offset;
        request.l_len = 1;
        // SAFETY: a valid descriptor and a pointer to an initialized `flock` that outlives the call.
        let done = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &request) };
        if done == 0 {
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
            _ => Err(error),
        }
    }

    /// What [`acquire`] needs from its caller: the lock file as currently open, and a way to
    /// open it again when the path no longer names it.
    pub(crate) fn acquire(
        path: &Path,
        open: impl Fn(bool) -> io::Result<Arc<LockFile>>,
        offset: i64,
        timeout: Option<Duration>,
    ) -> io::Result<Acquired> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        let mut waited = false;
        let mut reopen = false;
        loop {
            let file = open(reopen)?;
            if set(&file.file, offset, libc::F_WRLCK)? {
                if file.still_current(path)? {
                    return Ok(Acquired::Lock {
                        lock: KeyLock::Range { file, offset },
                        waited,
                    });
                }
                // The folder was removed (and perhaps made again): lock the file there now.
                let _ = set(&file.file, offset, libc::F_UNLCK);
                reopen = true;
                continue;
            }
            waited = true;
            if timeout.is_some_and(|limit| started.elapsed() >= limit) {
                return Ok(Acquired::TimedOut);
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

/// The result of [`acquire`].
#[derive(Debug)]
pub(crate) enum Acquired {
    /// This process holds the key. `waited` says whether another process held it first (so the
    /// value may be stored now).
    Lock { lock: KeyLock, waited: bool },
    /// The timeout passed while another process held the key.
    TimedOut,
}

/// Opens (creating it if needed) a lock file, without following a link.
pub(crate) fn open(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    options.open(path)
}

/// Whether `path` names the file of this device and inode (not through a link).
#[cfg(unix)]
fn names(path: &Path, identity: (u64, u64)) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    match fs::symlink_metadata(path) {
        Ok(named) => Ok((named.dev(), named.ino()) == identity),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether `path` still names the file `file` is open on.
fn still_current(path: &Path, file: &File) -> io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let open = file.metadata()?;
        names(path, (open.dev(), open.ino()))
    }
    #[cfg(not(unix))]
    {
        // Elsewhere an open file cannot be deleted, so the path always names it.
        let _ = (path, file);
        Ok(true)
    }
}

/// Takes the lock at `path` (its folder must exist), waiting while another process holds it, for
/// at most `timeout`.
#[cfg_attr(target_os = "linux", allow(dead_code))]
pub(crate) fn acquire(path: &Path, timeout: Option<Duration>) -> io::Result<Acquired> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(1);
    let mut waited = false;
    loop {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => {
                if still_current(path, &file)? {
                    let path = path.to_path_buf();
                    return Ok(Acquired::Lock {
                        lock: KeyLock::File { path, file },
                        waited,
                    });
                }
                // Locked a file its holder deleted on release: the key was just finished.
                waited = true;
                continue;
            }
            Err(TryLockError::WouldBlock) => {}
            Err(TryLockError::Error(error)) => return Err(error),
        }
        waited = true;
        if timeout.is_some_and(|limit| started.elapsed() >= limit) {
            return Ok(Acquired::TimedOut);
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Deletes `path` if it is a lock file nobody holds (left by a process that died holding it).
pub(crate) fn remove_if_abandoned(path: &Path) -> io::Result<bool> {
    let file = open(path)?;
    match file.try_lock() {
        Ok(()) => {
            if still_current(path, &file)? {
                fs::remove_file(path)?;
            }
            let _ = file.unlock();
            Ok(true)
        }
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(error)) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn folder() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn a_second_taker_waits_until_the_first_releases() {
        let dir = folder();
        let path = dir.path().join("k.lock");
        let Acquired::Lock { lock, waited } = acquire(&path, None).unwrap() else {
            panic!("free lock");
        };
        assert!(!waited);
        thread::scope(|scope| {
            let second = scope.spawn(|| acquire(&path, None).unwrap());
            thread::sleep(Duration::from_millis(100));
            assert!(!second.is_finished(), "must wait while the lock is held");
            drop(lock);
            match second.join().unwrap() {
                Acquired::Lock { waited, .. } => assert!(waited),
                Acquired::TimedOut => panic!("no timeout was set"),
            }
        });
        assert!(!path.exists(), "the last holder deletes the lock file");
    }

    #[test]
    fn waiting_gives_up_after_the_timeout() {
        let dir = folder();
        let path = dir.path().join("k.lock");
        let _held = acquire(&path, None).unwrap();
        let started = Instant::now();
        let outcome = acquire(&path, Some(Duration::from_millis(50))).unwrap();
        assert!(matches!(outcome, Acquired::TimedOut));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_byte_range_lock_excludes_other_open_files_and_follows_a_replaced_file() {
        use std::sync::Arc;
        let dir = folder();
        let path = dir.path().join(".locks");
        let mine =
            || -> io::Result<Arc<range::LockFile>> { range::LockFile::open(&path).map(Arc::new) };
        let (first, second) = (mine().unwrap(), mine().unwrap());
        let Acquired::Lock { lock, waited } =
            range::acquire(&path, |_| Ok(Arc::clone(&first)), 5, None).unwrap()
        else {
            panic!("free lock");
        };
        assert!(!waited);
        // Another open file (as another process has) cannot take the same byte, but can another.
        let outcome =
            range::acquire(&path, |_| Ok(Arc::clone(&second)), 5, Some(Duration::ZERO)).unwrap();
        assert!(matches!(outcome, Acquired::TimedOut));
        assert!(matches!(
            range::acquire(&path, |_| Ok(Arc::clone(&second)), 6, None).unwrap(),
            Acquired::Lock { waited: false, .. }
        ));
        drop(lock);
        assert!(matches!(
            range::acquire(&path, |_| Ok(Arc::clone(&second)), 5, None).unwrap(),
            Acquired::Lock { .. }
        ));
        // The file replaced under a holder of an old descriptor: it reopens.
        std::fs::remove_file(&path).unwrap();
        let stale = mine().unwrap();
        std::fs::remove_file(&path).unwrap();
        let reopened = std::cell::Cell::new(false);
        let outcome = range::acquire(
            &path,
            |again| {
                if again {
                    reopened.set(true);
                    mine()
                } else {
                    Ok(Arc::clone(&stale))
                }
            },
            9,
            None,
        )
        .unwrap();
        assert!(matches!(outcome, Acquired::Lock { .. }));
        assert!(reopened.get() && path.exists());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_lock_file_found_in_place_is_looked_at_again_after_a_while() {
        use std::sync::Arc;
        let dir = folder();
        let path = dir.path().join(".locks");
        let kept = Arc::new(range::LockFile::open(&path).unwrap());
        let reopened = std::cell::Cell::new(0);
        let take = |offset| {
            let open = |again: bool| {
                if again {
                    reopened.set(reopened.get() + 1);
                    range::LockFile::open(&path).map(Arc::new)
                } else {
                    Ok(Arc::clone(&kept))
                }
            };
            match range::acquire(&path, open, offset, None).unwrap() {
                Acquired::Lock { lock, .. } => drop(lock),
                Acquired::TimedOut => panic!("no timeout was set"),
            }
        };
        // Found in place (and so trusted for a while).
        take(1);
        assert_eq!(reopened.get(), 0);
        // The folder made again: once the while is over, the next lock sees it and reopens.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"").unwrap();
        thread::sleep(range::CHECK_EVERY + Duration::from_millis(20));
        take(2);
        assert_eq!(reopened.get(), 1);
    }

    #[test]
    fn an_abandoned_lock_file_is_removed_and_a_held_one_is_not() {
        let dir = folder();
        let path = dir.path().join("k.lock");
        std::fs::write(&path, b"").unwrap();
        assert!(remove_if_abandoned(&path).unwrap());
        assert!(!path.exists());
        let _held = acquire(&path, None).unwrap();
        assert!(!remove_if_abandoned(&path).unwrap());
        assert!(path.exists());
    }
}
