//! The node's view of the host: NVMe-oF attachments through nvme-cli, block
//! devices found through sysfs, filesystems through blkid/mkfs, mounts
//! through mount(8) and /proc/self/mountinfo.
//!
//! Everything here blocks (child processes, polling); the service calls it
//! from `spawn_blocking`, never on the async runtime's worker threads.

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, fs::FileTypeExt, fs::MetadataExt},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use uuid::Uuid;

use super::{context::ConnectParams, error::NodeError, validate::FsType};

/// Where the host's interfaces live (overridable so tests can point at a
/// fabricated sysfs tree) and how long to wait for devices.
#[derive(Debug, Clone)]
pub struct Host {
    /// sysfs mount, normally `/sys`.
    pub sysfs: PathBuf,
    /// Mount table, normally `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
    /// Device directory, normally `/dev`.
    pub dev: PathBuf,
    /// Upper bound on waiting for a block device to appear or grow.
    pub device_timeout: Duration,
    /// Interval between sysfs scans while waiting.
    pub poll_interval: Duration,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            sysfs: PathBuf::from("/sys"),
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            dev: PathBuf::from("/dev"),
            device_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_millis(200),
        }
    }
}

/// A namespace's block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDev {
    /// Kernel name, e.g. `nvme1n1`.
    pub name: String,
    /// Device node, e.g. `/dev/nvme1n1`.
    pub path: PathBuf,
    /// `major:minor`.
    pub dev_t: String,
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the mounted filesystem's device.
    pub dev_t: String,
    /// Root of the mount within the filesystem.
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,relatime`, ...).
    pub options: String,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (device path for block filesystems).
    pub source: String,
}

impl MountEntry {
    /// Mounted read-only.
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Filesystem usage from statvfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Size in bytes.
    pub total_bytes: u64,
    /// Bytes available to unprivileged users.
    pub available_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Inode count.
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
    /// Inodes in use.
    pub used_inodes: u64,
}

/// Runs `program args`, returning stdout. `shown` is how the command
/// appears in errors (mount options may be sensitive, so callers leave them
/// out).
pub fn run(program: &str, args: &[&str], shown: &str) -> Result<String, NodeError> {
    let out = duct::cmd(program, args)
        .stdout_capture()
        .stderr_capture()
        .unchecked()
        .run()
        .map_err(|e| NodeError::Command {
            program: shown.to_owned(),
            detail: format!("cannot run: {e}"),
        })?;
    if !out.status.success() {
        return Err(NodeError::Command {
            program: shown.to_owned(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `nvme<digits>n<digits>`: a namespace head node. Per-path nodes
/// (`nvme0c1n1`) are hidden and have no device node.
fn is_namespace_disk(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("nvme") else {
        return false;
    };
    let Some((ctrl, ns)) = rest.split_once('n') else {
        return false;
    };
    !ctrl.is_empty()
        && !ns.is_empty()
        && ctrl.bytes().all(|b| b.is_ascii_digit())
        && ns.bytes().all(|b| b.is_ascii_digit())
}

fn read_trimmed(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_owned())
}

/// Decodes the octal escapes mountinfo uses for space, tab, newline and `\`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses /proc/self/mountinfo (proc(5)); malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountEntry {
                dev_t: l[2].to_owned(),
                root: unescape(l[3]),
                mount_point: PathBuf::from(unescape(l[4])),
                options: l[5].to_owned(),
                fstype: r[0].to_owned(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// Splits a Linux `dev_t` into `major:minor` (glibc's encoding).
pub fn dev_t_string(rdev: u64) -> String {
    let major = ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff);
    let minor = ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff);
    format!("{major}:{minor}")
}

impl Host {
    /// The block device whose namespace UUID (sysfs `uuid`, `nguid` or
    /// `wwid` = `uuid.<uuid>`) is `uuid`.
    pub fn find_device(&self, uuid: &Uuid) -> Option<BlockDev> {
        let want = uuid.hyphenated().to_string();
        let block = self.sysfs.join("block");
        let entries = fs::read_dir(&block).ok()?;
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| is_namespace_disk(n))
            .collect();
        names.sort();
        names.into_iter().find_map(|name| {
            let dir = block.join(&name);
            let matches = ["uuid", "nguid"]
                .iter()
                .filter_map(|f| read_trimmed(&dir.join(f)))
                .any(|v| v.eq_ignore_ascii_case(&want))
                || read_trimmed(&dir.join("wwid"))
                    .is_some_and(|w| w.eq_ignore_ascii_case(&format!("uuid.{want}")));
            if !matches {
                return None;
            }
            let dev_t = read_trimmed(&dir.join("dev"))?;
            Some(BlockDev {
                path: self.dev.join(&name),
                name,
                dev_t,
            })
        })
    }

    /// Waits (bounded) until the device for `uuid` exists in sysfs and has
    /// its device node.
    pub fn wait_device(&self, uuid: &Uuid) -> Result<BlockDev, NodeError> {
        let start = Instant::now();
        loop {
            if let Some(d) = self.find_device(uuid) {
                if d.path.exists() {
                    return Ok(d);
                }
            }
            if start.elapsed() >= self.device_timeout {
                return Err(NodeError::DeviceTimeout {
                    uuid: uuid.to_string(),
                    waited: start.elapsed(),
                });
            }
            thread::sleep(self.poll_interval);
        }
    }

    /// Controllers (`nvme3`, ...) connected to subsystem `nqn`, with their
    /// state (`live`, `connecting`, ...).
    pub fn controllers(&self, nqn: &str) -> Vec<(String, String)> {
        let class = self.sysfs.join("class/nvme");
        let Ok(entries) = fs::read_dir(&class) else {
            return Vec::new();
        };
        let mut out: Vec<(String, String)> = entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let dir = class.join(&name);
                (read_trimmed(&dir.join("subsysnqn"))? == nqn).then(|| {
                    let state = read_trimmed(&dir.join("state")).unwrap_or_default();
                    (name, state)
                })
            })
            .collect();
        out.sort();
        out
    }

    /// `nvme connect` for one volume.
    pub fn nvme_connect(&self, p: &ConnectParams, host_nqn: Option<&str>) -> Result<(), NodeError> {
        let args = p.connect_args(host_nqn);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        run("nvme", &argv, "nvme connect").map_err(|e| NodeError::Connect {
            target: p.target(),
            detail: e.to_string(),
        })?;
        Ok(())
    }

    /// `nvme disconnect -n nqn`, only if a controller of `nqn` exists.
    pub fn nvme_disconnect(&self, nqn: &str) -> Result<(), NodeError> {
        if self.controllers(nqn).is_empty() {
            return Ok(());
        }
        match run("nvme", &["disconnect", "-n", nqn], "nvme disconnect") {
            Ok(_) => Ok(()),
            // Gone meanwhile (e.g. ctrl-loss-tmo expired): nothing to undo.
            Err(_) if self.controllers(nqn).is_empty() => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Asks every controller of `nqn` to rescan its namespaces (picks up a
    /// resized namespace).
    pub fn nvme_ns_rescan(&self, nqn: &str) -> Result<(), NodeError> {
        for (ctrl, _) in self.controllers(nqn) {
            let dev = self.dev.join(&ctrl);
            run(
                "nvme",
                &["ns-rescan", &dev.to_string_lossy()],
                "nvme ns-rescan",
            )?;
        }
        Ok(())
    }

    /// Size in bytes of the block device `dev_t` (`major:minor`).
    pub fn device_size(&self, dev_t: &str) -> Result<u64, NodeError> {
        let p = self.sysfs.join("dev/block").join(dev_t).join("size");
        let sectors = fs::read_to_string(&p).map_err(|e| NodeError::io("read", &p, e))?;
        let sectors: u64 = sectors.trim().parse().map_err(|_| {
            NodeError::io(
                "parse",
                &p,
                io::Error::new(io::ErrorKind::InvalidData, "not a sector count"),
            )
        })?;
        Ok(sectors.saturating_mul(512))
    }

    /// The filesystem type blkid finds on `dev`, or `None` for a blank
    /// device.
    pub fn fs_type(&self, dev: &Path) -> Result<Option<String>, NodeError> {
        let d = dev.to_string_lossy();
        let out = duct::cmd("blkid", ["-p", "-s", "TYPE", "-o", "value", d.as_ref()])
            .stdout_capture()
            .stderr_capture()
            .unchecked()
            .run()
            .map_err(|e| NodeError::Command {
                program: "blkid".into(),
                detail: format!("cannot run: {e}"),
            })?;
        match out.status.code() {
            Some(0) => {
                let t = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                Ok((!t.is_empty()).then_some(t))
            }
            // blkid(8): exit 2 means no recognisable signature.
            Some(2) => Ok(None),
            _ => Err(NodeError::Command {
                program: format!("blkid {d}"),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            }),
        }
    }

    /// Creates a filesystem on a blank device.
    pub fn mkfs(&self, dev: &Path, fs: FsType) -> Result<(), NodeError> {
        let d = dev.to_string_lossy();
        match fs {
            FsType::Ext4 => run("mkfs.ext4", &["-q", "-F", &d], &format!("mkfs.ext4 {d}"))?,
            FsType::Xfs => run("mkfs.xfs", &["-q", &d], &format!("mkfs.xfs {d}"))?,
        };
        Ok(())
    }

    /// Grows the filesystem on `dev` (mounted at `mount_point`) to the
    /// device's size.
    pub fn grow_fs(&self, dev: &Path, mount_point: &Path, fs: &str) -> Result<(), NodeError> {
        let d = dev.to_string_lossy();
        let m = mount_point.to_string_lossy();
        match fs {
            "ext4" | "ext3" | "ext2" => run("resize2fs", &[&d], &format!("resize2fs {d}"))?,
            "xfs" => run("xfs_growfs", &[&m], &format!("xfs_growfs {m}"))?,
            other => {
                return Err(NodeError::FailedPrecondition(format!(
                    "cannot grow a {other} filesystem"
                )))
            }
        };
        Ok(())
    }

    /// The mounts whose mount point is exactly `path` (top-most last).
    pub fn mounts_at(&self, path: &Path) -> Result<Vec<MountEntry>, NodeError> {
        let text = fs::read_to_string(&self.mountinfo)
            .map_err(|e| NodeError::io("read", &self.mountinfo, e))?;
        Ok(parse_mountinfo(&text)
            .into_iter()
            .filter(|m| m.mount_point == path)
            .collect())
    }

    /// `mount -t fs -o opts dev target`.
    pub fn mount(
        &self,
        dev: &Path,
        target: &Path,
        fs: &str,
        opts: &[String],
    ) -> Result<(), NodeError> {
        let d = dev.to_string_lossy();
        let t = target.to_string_lossy();
        let joined = opts.join(",");
        let mut args = vec!["-t", fs];
        if !joined.is_empty() {
            args.extend(["-o", joined.as_str()]);
        }
        args.extend([d.as_ref(), t.as_ref()]);
        run("mount", &args, &format!("mount {d} {t}"))?;
        Ok(())
    }

    /// Bind-mounts `src` onto `target`, then makes it read-only if asked
    /// (a bind mount ignores `ro` on the first call).
    pub fn bind_mount(&self, src: &Path, target: &Path, readonly: bool) -> Result<(), NodeError> {
        let s = src.to_string_lossy();
        let t = target.to_string_lossy();
        run(
            "mount",
            &["--bind", &s, &t],
            &format!("mount --bind {s} {t}"),
        )?;
        if readonly {
            if let Err(e) = run(
                "mount",
                &["-o", "remount,bind,ro", &t],
                &format!("mount -o remount,bind,ro {t}"),
            ) {
                // Never leave a writable mount behind a read-only request.
                let _ = run("umount", &[&t], "umount");
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unmounts everything stacked on `path`.
    pub fn unmount_all(&self, path: &Path) -> Result<(), NodeError> {
        let t = path.to_string_lossy();
        // Bounded: a path rarely has more than one or two stacked mounts.
        for _ in 0..8 {
            if self.mounts_at(path)?.is_empty() {
                return Ok(());
            }
            run("umount", &[&t], &format!("umount {t}"))?;
        }
        Err(NodeError::Command {
            program: format!("umount {t}"),
            detail: "still mounted after 8 unmounts".into(),
        })
    }

    /// statvfs(3) of `path`.
    pub fn statvfs(&self, path: &Path) -> Result<FsStats, NodeError> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| NodeError::invalid("volume_path", "contains a NUL byte"))?;
        // SAFETY: all-zero bytes are a valid `statvfs` (plain integers).
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid NUL-terminated string and `st` a valid,
        // writable statvfs for the duration of the call.
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        if rc != 0 {
            return Err(NodeError::io("statvfs", path, io::Error::last_os_error()));
        }
        let frsize = st.f_frsize;
        let blocks = st.f_blocks;
        Ok(FsStats {
            total_bytes: blocks.saturating_mul(frsize),
            available_bytes: st.f_bavail.saturating_mul(frsize),
            used_bytes: blocks.saturating_sub(st.f_bfree).saturating_mul(frsize),
            total_inodes: st.f_files,
            free_inodes: st.f_ffree,
            used_inodes: st.f_files.saturating_sub(st.f_ffree),
        })
    }

    /// Size of the block device node at `path` (e.g. a published block
    /// volume), or `None` if `path` is not a block device.
    pub fn block_size_at(&self, path: &Path) -> Result<Option<u64>, NodeError> {
        match self.block_dev_at(path)? {
            Some(dev_t) => self.device_size(&dev_t).map(Some),
            None => Ok(None),
        }
    }

    /// `major:minor` of the block device node at `path`, or `None` if
    /// `path` is not a block device.
    pub fn block_dev_at(&self, path: &Path) -> Result<Option<String>, NodeError> {
        let md = fs::metadata(path).map_err(|e| NodeError::io("stat", path, e))?;
        Ok(md
            .file_type()
            .is_block_device()
            .then(|| dev_t_string(md.rdev())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const U1: &str = "0b4b6a4e-1f0e-4b0c-9d3e-7f1f0d6c2a11";

    fn fake_sysfs() -> (tempfile::TempDir, Host) {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        let disk = |name: &str, files: &[(&str, &str)]| {
            let d = root.join("sys/block").join(name);
            fs::create_dir_all(&d).unwrap();
            for (f, v) in files {
                fs::write(d.join(f), format!("{v}\n")).unwrap();
            }
        };
        disk("sda", &[("dev", "8:0")]);
        disk(
            "nvme0n1",
            &[
                ("dev", "259:0"),
                ("uuid", "00000000-0000-0000-0000-000000000000"),
            ],
        );
        // Hidden per-path node of the same namespace: never chosen.
        disk("nvme1c1n1", &[("dev", "259:9"), ("uuid", U1)]);
        disk("nvme1n1", &[("dev", "259:1"), ("uuid", U1)]);
        disk(
            "nvme2n1",
            &[
                ("dev", "259:2"),
                ("wwid", "uuid.7e57d004-2b97-0e7a-b45f-5387367791cd"),
            ],
        );
        let sizes = root.join("sys/dev/block/259:1");
        fs::create_dir_all(&sizes).unwrap();
        fs::write(sizes.join("size"), "2097152\n").unwrap();
        for (ctrl, nqn, state) in [
            ("nvme1", format!("nqn.2024-01.dev.cairn:vol:{U1}"), "live"),
            ("nvme0", "nqn.other".to_owned(), "live"),
        ] {
            let d = root.join("sys/class/nvme").join(ctrl);
            fs::create_dir_all(&d).unwrap();
            fs::write(d.join("subsysnqn"), format!("{nqn}\n")).unwrap();
            fs::write(d.join("state"), format!("{state}\n")).unwrap();
        }
        fs::create_dir_all(root.join("dev")).unwrap();
        fs::write(root.join("dev/nvme1n1"), "").unwrap();
        let host = Host {
            sysfs: root.join("sys"),
            mountinfo: root.join("mountinfo"),
            dev: root.join("dev"),
            device_timeout: Duration::from_millis(300),
            poll_interval: Duration::from_millis(20),
        };
        (tmp, host)
    }

    #[test]
    fn finds_the_namespace_head_by_uuid_or_wwid() {
        let (_tmp, host) = fake_sysfs();
        let u1 = Uuid::parse_str(U1).unwrap();
        let d = host.find_device(&u1).expect("found");
        assert_eq!(d.name, "nvme1n1");
        assert_eq!(d.dev_t, "259:1");
        assert_eq!(d.path, host.dev.join("nvme1n1"));
        let u2 = Uuid::parse_str("7E57D004-2B97-0E7A-B45F-5387367791CD").unwrap();
        assert_eq!(host.find_device(&u2).expect("by wwid").name, "nvme2n1");
        assert_eq!(
            host.find_device(&Uuid::nil()).map(|d| d.name),
            Some("nvme0n1".into())
        );
        assert!(host.find_device(&Uuid::from_u128(42)).is_none());
    }

    #[test]
    fn waiting_for_a_missing_device_is_bounded() {
        let (_tmp, host) = fake_sysfs();
        let start = Instant::now();
        let err = host
            .wait_device(&Uuid::from_u128(42))
            .expect_err("never appears");
        assert!(matches!(err, NodeError::DeviceTimeout { .. }));
        assert!(start.elapsed() < Duration::from_secs(5));
        // Present in sysfs but without a device node yet: also waits.
        let u2 = Uuid::parse_str("7e57d004-2b97-0e7a-b45f-5387367791cd").unwrap();
        assert!(host.wait_device(&u2).is_err());
        let u1 = Uuid::parse_str(U1).unwrap();
        assert_eq!(host.wait_device(&u1).expect("present").name, "nvme1n1");
    }

    #[test]
    fn controllers_and_sizes_come_from_sysfs() {
        let (_tmp, host) = fake_sysfs();
        assert_eq!(
            host.controllers(&format!("nqn.2024-01.dev.cairn:vol:{U1}")),
            [("nvme1".to_owned(), "live".to_owned())]
        );
        assert!(host.controllers("nqn.none").is_empty());
        // Disconnecting a subsystem with no controller is a no-op success.
        host.nvme_disconnect("nqn.none").expect("idempotent");
        assert_eq!(host.device_size("259:1").unwrap(), 1 << 30);
        assert_eq!(
            host.device_size("259:7").unwrap_err().code(),
            tonic::Code::Internal
        );
    }

    #[test]
    fn namespace_disk_names() {
        for ok in ["nvme0n1", "nvme12n3"] {
            assert!(is_namespace_disk(ok), "{ok}");
        }
        for bad in ["nvme0", "nvme0c0n1", "nvmen1", "sda", "nvme0n", "nvme0n1p1"] {
            assert!(!is_namespace_disk(bad), "{bad}");
        }
    }

    #[test]
    fn mountinfo_is_parsed_with_escapes() {
        let text = "\
36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue
40 36 259:1 / /var/lib/kubelet/staging\\040dir rw,relatime shared:5 - ext4 /dev/nvme1n1 rw
41 36 259:1 / /pods/x/vol ro,relatime - ext4 /dev/nvme1n1 rw
bad line
";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/var/lib/kubelet/staging dir")
        );
        assert_eq!(m[1].dev_t, "259:1");
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[1].source, "/dev/nvme1n1");
        assert!(!m[1].read_only());
        assert!(m[2].read_only());
        assert_eq!(m[0].root, "/mnt1");
    }

    #[test]
    fn mounts_at_reads_the_table() {
        let (tmp, host) = fake_sysfs();
        fs::write(
            tmp.path().join("mountinfo"),
            "40 36 259:1 / /stage rw,relatime - ext4 /dev/nvme1n1 rw\n",
        )
        .unwrap();
        assert_eq!(host.mounts_at(Path::new("/stage")).unwrap().len(), 1);
        assert!(host.mounts_at(Path::new("/other")).unwrap().is_empty());
        host.unmount_all(Path::new("/other"))
            .expect("nothing mounted: no-op");
    }

    #[test]
    fn dev_t_encoding_matches_glibc() {
        assert_eq!(dev_t_string(0x0000_0000_0000_0801), "8:1");
        // major 259, minor 1 (large major encoding)
        let rdev: u64 = (259 & 0xfff) << 8 | 1;
        assert_eq!(dev_t_string(rdev), "259:1");
        let big: u64 = (0x1234u64 & 0xfffff000) << 32
            | (0x1234 & 0xfff) << 8
            | (0x56789 & 0xffffff00) << 12
            | (0x56789 & 0xff);
        assert_eq!(dev_t_string(big), format!("{}:{}", 0x1234, 0x56789));
    }

    #[test]
    fn statvfs_reports_a_real_filesystem() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Host::default().statvfs(tmp.path()).expect("statvfs");
        assert!(s.total_bytes > 0);
        assert!(s.available_bytes <= s.total_bytes);
        assert!(s.used_bytes <= s.total_bytes);
        assert_eq!(s.used_inodes, s.total_inodes - s.free_inodes);
        let err = Host::default()
            .statvfs(&tmp.path().join("missing"))
            .expect_err("missing path");
        assert_eq!(err.code(), tonic::Code::Internal);
    }

    #[test]
    fn failing_commands_report_program_and_stderr() {
        let err = run("sh", &["-c", "echo boom >&2; exit 3"], "sh test").expect_err("exit 3");
        let msg = err.to_string();
        assert!(msg.contains("sh test") && msg.contains("boom"), "{msg}");
        let err = run("/nonexistent/cairn-tool", &[], "cairn-tool").expect_err("no binary");
        assert!(err.to_string().contains("cannot run"));
        assert_eq!(run("sh", &["-c", "printf ok"], "sh").unwrap(), "ok");
    }
}
