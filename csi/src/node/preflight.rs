//! Start-up check of what the node plugin needs from the host.

use std::{
    env,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

/// Programs the node service runs.
pub const REQUIRED_PROGRAMS: &[&str] = &[
    "nvme",
    "blkid",
    "mount",
    "umount",
    "mkfs.ext4",
    "mkfs.xfs",
    "resize2fs",
    "xfs_growfs",
];

/// Open files the node plugin wants (mount points, device nodes, children).
pub const MIN_OPEN_FILES: u64 = 1024;

/// Raises the soft open-file limit to the hard one; returns the limit if it
/// is still below `min`.
fn open_files_short(min: u64) -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a pointer to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit through a pointer to a live local.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    (lim.rlim_cur < min).then_some(lim.rlim_cur)
}

/// What is missing on this host, as a one-line error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node plugin cannot start, missing: {}", missing.join("; "))]
pub struct HostCheckError {
    /// One entry per missing piece.
    pub missing: Vec<String>,
}

fn find_in_path(program: &str, path_var: &str) -> Option<PathBuf> {
    env::split_paths(path_var)
        .map(|d| d.join(program))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether the nvme-tcp initiator is loaded (`/sys/module/nvme_tcp`) or
/// loadable (`modprobe --dry-run nvme-tcp`).
fn nvme_tcp_available(sysfs: &Path, path_var: &str) -> bool {
    if sysfs.join("module/nvme_tcp").exists() {
        return true;
    }
    find_in_path("modprobe", path_var).is_some_and(|m| {
        duct::cmd(m, ["--dry-run", "nvme-tcp"])
            .stdout_null()
            .stderr_null()
            .unchecked()
            .run()
            .is_ok_and(|o| o.status.success())
    })
}

/// Checks programs on `path_var` (a `PATH` value) and the nvme-tcp module
/// under `sysfs`.
pub fn check_host_with(sysfs: &Path, path_var: &str) -> Result<(), HostCheckError> {
    let mut missing: Vec<String> = REQUIRED_PROGRAMS
        .iter()
        .filter(|p| find_in_path(p, path_var).is_none())
        .map(|p| {
            let pkg = match *p {
                "nvme" => "nvme-cli",
                "blkid" | "mount" | "umount" => "util-linux/mount",
                "mkfs.ext4" | "resize2fs" => "e2fsprogs",
                _ => "xfsprogs",
            };
            format!("program {p} (package {pkg})")
        })
        .collect();
    if !nvme_tcp_available(sysfs, path_var) {
        missing.push(
            "kernel module nvme_tcp (not loaded under /sys/module and `modprobe --dry-run nvme-tcp` fails)"
                .into(),
        );
    }
    if let Some(limit) = open_files_short(MIN_OPEN_FILES) {
        missing.push(format!(
            "open files: the limit is {limit} and cannot be raised to {MIN_OPEN_FILES}"
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(HostCheckError { missing })
    }
}

/// [`check_host_with`] for this process's `PATH` and `/sys`.
pub fn check_host() -> Result<(), HostCheckError> {
    check_host_with(Path::new("/sys"), &env::var("PATH").unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// Writes an executable script from a child shell, so this process
    /// never holds a write descriptor that a concurrent fork could inherit
    /// (which would make exec fail with ETXTBSY).
    fn script(path: &Path, body: &str) {
        let status = std::process::Command::new("sh")
            .args([
                "-c",
                "printf '%s' \"$2\" > \"$1\" && chmod 755 \"$1\"",
                "sh",
            ])
            .arg(path)
            .arg(body)
            .status()
            .unwrap();
        assert!(status.success());
    }

    fn exe(dir: &Path, name: &str) {
        script(&dir.join(name), "#!/bin/sh\nexit 0\n");
    }

    #[test]
    fn reports_exactly_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        let sys = tmp.path().join("sys");
        fs::create_dir_all(&bin).unwrap();
        fs::create_dir_all(&sys).unwrap();
        for p in REQUIRED_PROGRAMS.iter().filter(|p| **p != "nvme") {
            exe(&bin, p);
        }
        let path_var = bin.to_string_lossy().into_owned();
        let err = check_host_with(&sys, &path_var).expect_err("nvme and module missing");
        assert_eq!(err.missing.len(), 2, "{err}");
        assert!(err.missing[0].contains("nvme-cli"));
        assert!(err.missing[1].contains("nvme_tcp"));
        let line = err.to_string();
        assert!(!line.contains('\n'), "one line: {line}");

        // A non-executable file does not count as the program.
        fs::write(bin.join("nvme"), "").unwrap();
        assert!(check_host_with(&sys, &path_var).is_err());

        exe(&bin, "nvme");
        fs::create_dir_all(sys.join("module/nvme_tcp")).unwrap();
        check_host_with(&sys, &path_var).expect("everything present");
    }

    #[test]
    fn modprobe_dry_run_counts_as_available() {
        let tmp = tempfile::tempdir().unwrap();
        exe(tmp.path(), "modprobe");
        let path_var = tmp.path().to_string_lossy().into_owned();
        assert!(nvme_tcp_available(&tmp.path().join("nosys"), &path_var));
        script(&tmp.path().join("modprobe"), "#!/bin/sh\nexit 1\n");
        assert!(!nvme_tcp_available(&tmp.path().join("nosys"), &path_var));
    }
}
