//! One owner of a data folder at a time: an exclusive, non-blocking `flock` on `LOCK` inside it.
//!
//! `flock` locks belong to an open file description, so a second opener is refused whether it
//! is another process or another instance in this process (an actor restarted while its old
//! instance's tasks still run). The lock goes with the last handle: on drop, or when the
//! process dies, kill -9 included.
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::IndexError;

/// An exclusive lock on a data folder, held while this value lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    dir: PathBuf,
}

impl DirLock {
    /// Takes the lock on `dir` (created if missing); [`IndexError::Locked`] if another owner
    /// holds it.
    pub fn acquire(dir: &Path) -> Result<DirLock, IndexError> {
        std::fs::create_dir_all(dir).map_err(|e| IndexError::io(dir, e))?;
        let path = dir.join("LOCK");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| IndexError::io(&path, e))?;
        // SAFETY: flock on a file descriptor this function owns
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(IndexError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            return Err(IndexError::io(&path, err));
        }
        Ok(DirLock {
            _file: file,
            dir: dir.to_path_buf(),
        })
    }

    /// The locked folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let a = DirLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            DirLock::acquire(dir.path()),
            Err(IndexError::Locked { .. })
        ));
        drop(a);
        DirLock::acquire(dir.path()).unwrap();
    }
}
