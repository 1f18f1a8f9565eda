//! A file or block device served through io_uring with `O_DIRECT`.
//!
//! Each [`IoChannel`] holds its own descriptor (a `dup` of the device's) on
//! the reactor that opened it, so reactors never contend on anything but the
//! device itself. Filesystems that refuse `O_DIRECT` (older tmpfs) are opened
//! buffered instead, and flushes then do the work that `O_DIRECT` would.
//!
//! A file system that cannot do non-blocking I/O (tmpfs, and the shared
//! memory behind [`crate::malloc`] disks) makes io_uring hand every request
//! to a kernel worker thread: a wake-up and a context switch per 4 KiB. Its
//! I/O is a memory copy that never waits for a device, so [`FileIo`] does it
//! inline on the reactor with `pread`/`pwrite` instead (see [`IoMode`]).
//!
//! Discard and write zeroes block in the kernel; they run on the
//! [`crate::blocking`] pool, never on the reactor.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{BdevError, BlockDevice, BufResult, DeviceInfo, IoBuf, IoChannel, IoFuture};

/// `BLKGETSIZE64`: size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKDISCARD`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT`: zero a byte range of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// `TMPFS_MAGIC`: tmpfs and shmem (memfd) report it from `statfs`.
const TMPFS_MAGIC: libc::c_long = 0x0102_1994;

/// How a channel moves data for reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoMode {
    /// Inline on memory-backed file systems (tmpfs), io_uring elsewhere.
    #[default]
    Auto,
    /// Always io_uring.
    Uring,
    /// Always `pread`/`pwrite` on the calling thread (blocks it for as long
    /// as the kernel takes: for memory-backed files only).
    Inline,
}

impl std::str::FromStr for IoMode {
    type Err = String;

    fn from_str(s: &str) -> Result<IoMode, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" => Ok(IoMode::Uring),
            "inline" => Ok(IoMode::Inline),
            _ => Err(format!("unknown I/O mode {s:?} (auto, uring, inline)")),
        }
    }
}

/// Whether `file` lives in memory (tmpfs or shmem), where I/O never waits
/// for a device and io_uring cannot complete it without a worker thread.
pub fn is_memory_backed(file: &File) -> bool {
    // SAFETY: statfs is plain data, for which all-zero bytes are valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs through the pointer, which points at
    // a live local; the descriptor is open.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    #[allow(clippy::unnecessary_cast)]
    let magic = st.f_type as libc::c_long;
    rc == 0 && magic == TMPFS_MAGIC
}

/// The read/write half of a channel on one descriptor: io_uring, or inline
/// copies for memory-backed files.
pub enum FileIo {
    /// Through this thread's io_uring.
    Uring(monoio::fs::File),
    /// `pread`/`pwrite` on this thread.
    Inline(File),
}

impl FileIo {
    /// Wraps `file` for I/O on the calling thread, choosing by `mode`.
    pub fn new(file: File, mode: IoMode) -> Result<FileIo, BdevError> {
        let inline = match mode {
            IoMode::Auto => is_memory_backed(&file),
            IoMode::Uring => false,
            IoMode::Inline => true,
        };
        if inline {
            return Ok(FileIo::Inline(file));
        }
        monoio::fs::File::from_std(file)
            .map(FileIo::Uring)
            .map_err(|e| BdevError::io("register", e))
    }

    /// Whether reads and writes are copied inline.
    pub fn is_inline(&self) -> bool {
        matches!(self, FileIo::Inline(_))
    }

    /// Reads `buf.len()` bytes at byte offset `off`.
    pub async fn read_at(&self, off: u64, mut buf: IoBuf) -> BufResult {
        match self {
            FileIo::Uring(f) => read_at(f, off, buf).await,
            FileIo::Inline(f) => {
                use std::os::unix::fs::FileExt;
                let r = f
                    .read_exact_at(buf.as_mut_slice(), off)
                    .map_err(|e| BdevError::io("read", e));
                (r, buf)
            }
        }
    }

    /// Writes `buf` at byte offset `off`; with `fua`, durably.
    pub async fn write_at(&self, off: u64, buf: IoBuf, fua: bool) -> BufResult {
        match self {
            FileIo::Uring(f) => write_at(f, off, buf, fua).await,
            FileIo::Inline(f) => {
                use std::os::unix::fs::FileExt;
                let mut r = f
                    .write_all_at(buf.as_slice(), off)
                    .map_err(|e| BdevError::io("write", e));
                if r.is_ok() && fua {
                    r = f.sync_data().map_err(|e| BdevError::io("fdatasync", e));
                }
                (r, buf)
            }
        }
    }

    /// Makes every completed write durable.
    pub async fn sync_data(&self) -> Result<(), BdevError> {
        match self {
            FileIo::Uring(f) => f.sync_data().await,
            FileIo::Inline(f) => f.sync_data(),
        }
        .map_err(|e| BdevError::io("fdatasync", e))
    }
}

/// Zeroes (`discard == false`) or discards `len` bytes at byte offset
/// `off` of `file`: `BLKZEROOUT`/`BLKDISCARD` on a block device, a zero
/// range or punched hole on a file. Blocks; run it on [`crate::blocking`].
pub fn zero_or_discard_sync(
    file: &File,
    is_block: bool,
    off: u64,
    len: u64,
    discard: bool,
) -> Result<(), BdevError> {
    #[cfg(test)]
    tests::hook::call(len);
    if len == 0 {
        return Ok(());
    }
    let fd = file.as_raw_fd();
    if is_block {
        let range: [u64; 2] = [off, len];
        let req = if discard { BLKDISCARD } else { BLKZEROOUT };
        // SAFETY: both ioctls read a [u64; 2] (offset, length) through the
        // pointer, which points at a live local; the descriptor is open.
        let rc = unsafe { libc::ioctl(fd, req, range.as_ptr()) };
        if rc != 0 {
            let op = if discard { "discard" } else { "write zeroes" };
            return Err(BdevError::io(op, io::Error::last_os_error()));
        }
        return Ok(());
    }
    let mode = if discard {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    };
    let (Ok(off_t), Ok(len_t)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return Err(BdevError::io(
            "fallocate",
            io::Error::from_raw_os_error(libc::EFBIG),
        ));
    };
    // SAFETY: fallocate takes plain integers; the descriptor is open.
    let rc = unsafe { libc::fallocate(fd, mode, off_t, len_t) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EOPNOTSUPP) {
        if discard {
            // Punching holes is a hint; a filesystem without it keeps data.
            return Err(BdevError::Unsupported { op: "deallocate" });
        }
        // No zero range (tmpfs and memfd RAM disks): write zeros here, on
        // the blocking thread, so no reactor ever does it.
        return write_zeros_sync(file, off, len);
    }
    Err(BdevError::io("fallocate", err))
}

/// Writes `len` zero bytes at `off`, in 1 MiB pieces from one aligned
/// buffer (the descriptor may be `O_DIRECT`). Blocks.
fn write_zeros_sync(file: &File, off: u64, len: u64) -> Result<(), BdevError> {
    use std::os::unix::fs::FileExt;
    const PIECE: u64 = 1 << 20;
    let zeros = IoBuf::zeroed(PIECE as usize);
    let mut at = off;
    while at < off + len {
        let n = PIECE.min(off + len - at) as usize;
        file.write_all_at(&zeros.as_slice()[..n], at)
            .map_err(|e| BdevError::io("write zeroes", e))?;
        at += n as u64;
    }
    Ok(())
}

/// How to open a [`FileDevice`].
#[derive(Debug, Clone)]
pub struct FileOptions {
    /// Logical block size exposed to users (512 or 4096).
    pub block_size: u32,
    /// Try `O_DIRECT` first (falls back to buffered I/O if refused).
    pub direct: bool,
    /// How channels move data.
    pub io: IoMode,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions {
            block_size: 512,
            direct: true,
            io: IoMode::Auto,
        }
    }
}

/// A regular file or a block device.
pub struct FileDevice {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    file: Arc<File>,
    info: DeviceInfo,
    is_block: bool,
    direct: bool,
    io: IoMode,
}

impl FileDevice {
    /// Creates (or truncates to) a sparse file of `size` bytes and opens it.
    pub fn create(path: &Path, size: u64, opts: FileOptions) -> Result<Self, BdevError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| BdevError::io("create", e))?;
        f.set_len(size).map_err(|e| BdevError::io("set_len", e))?;
        drop(f);
        FileDevice::open(path, opts)
    }

    /// Opens an existing file or block device.
    pub fn open(path: &Path, opts: FileOptions) -> Result<Self, BdevError> {
        if opts.block_size != 512 && opts.block_size != 4096 {
            return Err(BdevError::Misaligned {
                len: opts.block_size as usize,
                block_size: 512,
            });
        }
        let mut direct = opts.direct;
        let file = loop {
            let mut oo = OpenOptions::new();
            oo.read(true).write(true);
            if direct {
                oo.custom_flags(libc::O_DIRECT);
            }
            match oo.open(path) {
                Ok(f) => break f,
                Err(e) if direct && e.raw_os_error() == Some(libc::EINVAL) => direct = false,
                Err(e) => return Err(BdevError::io("open", e)),
            }
        };
        let meta = file.metadata().map_err(|e| BdevError::io("stat", e))?;
        let is_block = meta.file_type().is_block_device();
        let size = if is_block {
            let mut bytes: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
            // points at a live local; the descriptor is open.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut bytes) };
            if rc != 0 {
                return Err(BdevError::io("BLKGETSIZE64", io::Error::last_os_error()));
            }
            bytes
        } else {
            meta.len()
        };
        let info = DeviceInfo {
            block_size: opts.block_size,
            num_blocks: size / u64::from(opts.block_size),
            volatile_write_cache: true,
            dealloc_reads_zeroes: !is_block,
        };
        Ok(FileDevice {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                file: Arc::new(file),
                info,
                is_block,
                direct,
                io: opts.io,
            }),
        })
    }

    /// The path this device was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether channels copy reads and writes inline rather than through
    /// io_uring (see [`IoMode`]).
    pub fn copies_inline(&self) -> bool {
        match self.inner.io {
            IoMode::Auto => is_memory_backed(&self.inner.file),
            IoMode::Uring => false,
            IoMode::Inline => true,
        }
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.inner.direct
    }
}

impl BlockDevice for FileDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info.clone()
    }

    fn open_channel(&self) -> Result<Box<dyn IoChannel>, BdevError> {
        let dup = self
            .inner
            .file
            .try_clone()
            .map_err(|e| BdevError::io("dup", e))?;
        Ok(Box::new(FileChannel {
            dev: self.inner.clone(),
            file: FileIo::new(dup, self.inner.io)?,
        }))
    }
}

struct FileChannel {
    dev: Arc<Inner>,
    file: FileIo,
}

impl FileChannel {
    fn byte_offset(&self, lba: u64) -> u64 {
        lba * u64::from(self.dev.info.block_size)
    }

    async fn zero_or_discard(&self, lba: u64, blocks: u64, discard: bool) -> Result<(), BdevError> {
        self.dev.info.check_range(lba, blocks)?;
        if blocks == 0 {
            return Ok(());
        }
        let off = self.byte_offset(lba);
        let len = blocks * u64::from(self.dev.info.block_size);
        let (file, is_block) = (self.dev.file.clone(), self.dev.is_block);
        crate::blocking::run(move || zero_or_discard_sync(&file, is_block, off, len, discard)).await
    }
}

thread_local! {
    /// File and block-device I/Os in flight on this thread (see
    /// [`io_in_flight`]).
    static IN_FLIGHT: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// File and block-device I/Os started on this thread through [`read_at`] and
/// [`write_at`] and not finished. Their completions come from this core's
/// io_uring (or its workers), so a reactor waiting for them gains nothing by
/// polling and would only compete with those workers for the core.
pub fn io_in_flight() -> usize {
    IN_FLIGHT.with(|n| n.get())
}

/// Counts one I/O in [`io_in_flight`] while it lives. [`read_at`] and
/// [`write_at`] hold one; so should any other device whose completions do
/// not come over the network (a model of a drive, for one).
pub struct InFlight;

impl InFlight {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        IN_FLIGHT.with(|n| n.set(n.get() + 1));
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.with(|n| n.set(n.get() - 1));
    }
}

/// Reads `buf.len()` bytes at byte offset `off` of `file` through io_uring.
pub async fn read_at(file: &monoio::fs::File, off: u64, buf: IoBuf) -> BufResult {
    let _in_flight = InFlight::new();
    let (r, buf) = file.read_exact_at(buf, off).await;
    (r.map_err(|e| BdevError::io("read", e)), buf)
}

/// Writes `buf` at byte offset `off` of `file` through io_uring; with
/// `fua`, durably (an `fdatasync` follows).
pub async fn write_at(file: &monoio::fs::File, off: u64, buf: IoBuf, fua: bool) -> BufResult {
    let _in_flight = InFlight::new();
    let (r, buf) = file.write_all_at(buf, off).await;
    if let Err(e) = r {
        return (Err(BdevError::io("write", e)), buf);
    }
    if fua {
        if let Err(e) = file.sync_data().await {
            return (Err(BdevError::io("fdatasync", e)), buf);
        }
    }
    (Ok(()), buf)
}

impl IoChannel for FileChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            if let Err(e) = self.dev.info.check_buf(lba, buf.len()) {
                return (Err(e), buf);
            }
            self.file.read_at(self.byte_offset(lba), buf).await
        })
    }

    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            if let Err(e) = self.dev.info.check_buf(lba, buf.len()) {
                return (Err(e), buf);
            }
            self.file.write_at(self.byte_offset(lba), buf, fua).await
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.file.sync_data())
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.zero_or_discard(lba, blocks, false))
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.zero_or_discard(lba, blocks, true))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A test's way to make one zero or discard call block until it says so.
    pub(crate) mod hook {
        use std::sync::Mutex;

        type Hook = Box<dyn FnOnce() + Send>;

        static HOOK: Mutex<Option<(u64, Hook)>> = Mutex::new(None);

        /// Runs `f` inside the next zero or discard of exactly `len` bytes.
        pub(crate) fn set(len: u64, f: impl FnOnce() + Send + 'static) {
            *HOOK.lock().unwrap() = Some((len, Box::new(f)));
        }

        pub(crate) fn call(len: u64) {
            let mut h = HOOK.lock().unwrap();
            if h.as_ref().is_some_and(|(l, _)| *l == len) {
                let (_, f) = h.take().unwrap();
                drop(h);
                f();
            }
        }
    }

    fn runtime() -> monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>> {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
    }

    #[test]
    fn reads_complete_while_a_discard_is_blocked() {
        let dir = tempfile::tempdir().unwrap();
        let dev =
            FileDevice::create(&dir.path().join("d"), 8 << 20, FileOptions::default()).unwrap();
        // The discard of the whole device blocks until the reads are done.
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let (report, outcome) = std::sync::mpsc::channel::<bool>();
        hook::set(8 << 20, move || {
            let released = wait
                .recv_timeout(std::time::Duration::from_secs(20))
                .is_ok();
            report.send(released).unwrap();
        });
        runtime().block_on(async {
            let discarding = dev.open_channel().unwrap();
            let reader = dev.open_channel().unwrap();
            let blocks = dev.info().num_blocks;
            let discard = monoio::spawn(async move { discarding.deallocate(0, blocks).await });
            // Let the discard start.
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            let mut reads = 0;
            for i in 0..64 {
                let (r, _) = reader.read(i * 8, IoBuf::zeroed(4096)).await;
                r.unwrap();
                reads += 1;
            }
            // (On a reactor that ran the discard itself, the hook has timed
            // out and gone by now.)
            let _ = release.send(());
            discard.await.unwrap();
            assert_eq!(reads, 64);
        });
        assert!(
            outcome.recv().unwrap(),
            "the reads did not complete while the discard was in progress"
        );
    }

    /// tmpfs has no zero range: the zeros are written by the blocking
    /// call itself (so a thick replica's TRIM never falls back to writes
    /// on its reactor).
    #[test]
    fn zeroing_a_file_without_zero_range_writes_zeros() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("z");
        let f = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&vec![0xab; 3 << 20], 0).unwrap();
        zero_or_discard_sync(&f, false, 4096, (2 << 20) + 8192, false).unwrap();
        let mut back = vec![0u8; 3 << 20];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0xab));
        assert!(back[4096..4096 + (2 << 20) + 8192].iter().all(|&b| b == 0));
        assert!(back[4096 + (2 << 20) + 8192..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn memory_backed_files_are_copied_inline() {
        let Ok(dir) = tempfile::tempdir_in("/dev/shm") else {
            return; // no tmpfs here
        };
        let path = dir.path().join("shm.img");
        let dev = FileDevice::create(&path, 1 << 20, FileOptions::default()).unwrap();
        runtime().block_on(async {
            let ch = dev.open_channel().unwrap();
            let data: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
            let (r, _) = ch.write(8, IoBuf::from_slice(&data), true).await;
            r.unwrap();
            // Inline: nothing is left in flight on this thread's io_uring.
            assert_eq!(io_in_flight(), 0);
            let (r, back) = ch.read(8, IoBuf::zeroed(8192)).await;
            r.unwrap();
            assert_eq!(back.as_slice(), &data[..]);
            ch.deallocate(8, 8).await.unwrap();
            let (_, back) = ch.read(8, IoBuf::zeroed(8192)).await;
            assert!(back[..4096].iter().all(|&b| b == 0));
            assert_eq!(&back[4096..], &data[4096..]);
        });
        let f = File::open(&path).unwrap();
        assert!(is_memory_backed(&f));
        // The working directory is on a disk (the crate's own sources).
        let here = File::open(env!("CARGO_MANIFEST_DIR")).unwrap();
        assert!(!is_memory_backed(&here));
    }

    #[test]
    fn file_roundtrip_zeroes_and_punch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.img");
        let dev = FileDevice::create(&path, 1 << 20, FileOptions::default()).unwrap();
        assert_eq!(dev.info().num_blocks, 2048);
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async {
            let ch = dev.open_channel().unwrap();
            let data: Vec<u8> = (0..8192).map(|i| (i % 253) as u8).collect();
            let (r, _) = ch.write(8, IoBuf::from_slice(&data), true).await;
            r.unwrap();
            let (r, back) = ch.read(8, IoBuf::zeroed(8192)).await;
            r.unwrap();
            assert_eq!(back.as_slice(), &data[..]);
            ch.write_zeroes(8, 8).await.unwrap();
            let (_, back) = ch.read(8, IoBuf::zeroed(8192)).await;
            assert!(back[..4096].iter().all(|&b| b == 0));
            assert_eq!(&back[4096..], &data[4096..]);
            ch.flush().await.unwrap();
            let (r, _) = ch.write(2047, IoBuf::zeroed(1024), false).await;
            assert!(matches!(r, Err(BdevError::OutOfRange { .. })));
        });
    }
}
