//! RAM disks by name (`malloc:///NAME?size_mb=N`), the like-for-like
//! partner of SPDK's malloc bdev.
//!
//! A disk is an anonymous shared-memory file (`memfd_create`) of a fixed
//! size, sealed against shrinking and growing, held in a process-wide table
//! by name. Everything that opens files opens it through its
//! `/proc/self/fd/N` path: the pool's metadata I/O, its `flock`, and its
//! data path, which sees a file system that cannot do non-blocking I/O
//! (shmem) and so copies inline on the reactor instead of handing every
//! I/O to a kernel worker (see [`crate::file`]). The memory lives until
//! [`remove`] or the end of the process.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::BdevError;

/// One RAM disk.
#[derive(Debug)]
pub struct MallocDisk {
    name: String,
    file: File,
    size: u64,
}

impl MallocDisk {
    /// The disk's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A path that opens this disk (valid in this process only).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

static DISKS: Mutex<BTreeMap<String, Arc<MallocDisk>>> = Mutex::new(BTreeMap::new());

/// The disk called `name`, created with `size` bytes if there is none. An
/// existing disk of another size is refused rather than resized under its
/// pool.
pub fn get_or_create(name: &str, size: u64) -> Result<Arc<MallocDisk>, BdevError> {
    let mut disks = DISKS.lock().expect("poisoned");
    if let Some(d) = disks.get(name) {
        if d.size != size {
            return Err(BdevError::io(
                "malloc disk",
                io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "malloc disk {name} exists with {} MiB, not {} MiB",
                        d.size >> 20,
                        size >> 20
                    ),
                ),
            ));
        }
        return Ok(d.clone());
    }
    let disk = Arc::new(create(name, size)?);
    disks.insert(name.to_owned(), disk.clone());
    Ok(disk)
}

/// The disk called `name`, if it exists.
pub fn get(name: &str) -> Option<Arc<MallocDisk>> {
    DISKS.lock().expect("poisoned").get(name).cloned()
}

/// The `malloc://` URI of the disk that `path` (from [`MallocDisk::path`])
/// opens, if it is one.
pub fn uri_of(path: &std::path::Path) -> Option<String> {
    let disks = DISKS.lock().expect("poisoned");
    disks
        .values()
        .find(|d| d.path() == path)
        .map(|d| format!("malloc:///{}?size_mb={}", d.name, d.size >> 20))
}

/// Forgets the disk called `name`; its memory is freed once nothing has it
/// open. Returns whether it existed.
pub fn remove(name: &str) -> bool {
    DISKS.lock().expect("poisoned").remove(name).is_some()
}

fn create(name: &str, size: u64) -> Result<MallocDisk, BdevError> {
    let cname = std::ffi::CString::new(format!("cairn-malloc-{name}")).map_err(|e| {
        BdevError::io(
            "memfd_create",
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })?;
    // SAFETY: the name is a live NUL-terminated string; the flags are plain
    // integers.
    let fd =
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(BdevError::io("memfd_create", io::Error::last_os_error()));
    }
    // SAFETY: memfd_create returned a new descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| BdevError::io("memfd size", e))?;
    // SAFETY: fcntl takes plain integers; the descriptor is open.
    let rc = unsafe {
        libc::fcntl(
            file.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if rc != 0 {
        return Err(BdevError::io("memfd seal", io::Error::last_os_error()));
    }
    Ok(MallocDisk {
        name: name.to_owned(),
        file,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_disk_is_found_by_name_and_keeps_its_size() {
        let a = get_or_create("malloc-test-a", 4 << 20).unwrap();
        let again = get_or_create("malloc-test-a", 4 << 20).unwrap();
        assert_eq!(a.path(), again.path());
        assert_eq!(
            uri_of(&a.path()).as_deref(),
            Some("malloc:///malloc-test-a?size_mb=4")
        );
        assert!(get_or_create("malloc-test-a", 8 << 20).is_err());
        // Data written through one open of the path is read through another.
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(a.path())
            .unwrap();
        w.write_all_at(b"cairn", 4096).unwrap();
        let r = File::open(again.path()).unwrap();
        let mut back = [0u8; 5];
        r.read_exact_at(&mut back, 4096).unwrap();
        assert_eq!(&back, b"cairn");
        // The size is sealed.
        assert!(w.set_len(1 << 20).is_err());
        assert_eq!(r.metadata().unwrap().len(), 4 << 20);
        assert!(remove("malloc-test-a"));
        assert!(get("malloc-test-a").is_none());
        assert!(!remove("malloc-test-a"));
    }
}
