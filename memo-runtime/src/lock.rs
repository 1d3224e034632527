//! Cross-process single flight: one lock file per key being computed.
//!
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

/// A held lock; deleting its file and releasing it when dropped.
#[derive(Debug)]
pub(crate) struct KeyLock {
    path: PathBuf,
    file: File,
}

impl Drop for KeyLock {
    fn drop(&mut self) {
        // Delete first, release second: nobody can lock the file between the two and believe it
        // is current, because they check the path afterwards.
        let _ = fs::remove_file(&self.path);
        let _ = self.file.unlock();
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

fn open(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.read(true).write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600).custom_flags(libc::O_NOFOLLOW);
    }
    options.open(path)
}

/// Whether `path` still names the file `file` is open on.
fn still_current(path: &Path, file: &File) -> io::Result<bool> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let open = file.metadata()?;
        match fs::symlink_metadata(path) {
            Ok(named) => Ok(named.ino() == open.ino() && named.dev() == open.dev()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
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
                        lock: KeyLock { path, file },
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
