//! A small tmpfs mounted for one test: a disk that really fills up (ENOSPC), for the fault
//! suite. Mounting needs root (CI runs as root); without it the test fails and says so rather
//! than skip.

use std::path::Path;
use std::process::Command;

/// A tmpfs of a fixed size on a temporary directory, unmounted when dropped.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `bytes` on a new temporary directory.
    pub fn mount(bytes: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount(8)");
        assert!(
            output.status.success(),
            "cannot mount a {bytes}-byte tmpfs on {} (the disk-full tests need root, as CI has): {}",
            dir.path().display(),
            String::from_utf8_lossy(&output.stderr)
        );
        Tmpfs { dir }
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills it with a file of zeros until the disk is full, leaving `spare` bytes free (about:
    /// the file system rounds to pages). Returns the filler's path: removing it frees the space.
    pub fn fill(&self, spare: u64) -> std::path::PathBuf {
        let filler = self.path().join("filler");
        // SAFETY: statvfs on a NUL-terminated path, into a zeroed struct it fills.
        let free = unsafe {
            let path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
            let mut stat: libc::statvfs = std::mem::zeroed();
            assert_eq!(libc::statvfs(path.as_ptr(), &mut stat), 0, "statvfs");
            stat.f_bavail as u64 * stat.f_frsize as u64
        };
        let size = free.saturating_sub(spare) as usize;
        std::fs::write(&filler, vec![0u8; size]).expect("writing the filler");
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a process of the test may still have a file open there.
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
