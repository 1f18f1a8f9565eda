//! Disks named by URI, the way pools are configured everywhere (the
//! engine's CreatePool, `cairn --pool-disk`, the agent's pool list):
//!
//! - `/path` or `aio:///path`: a file or block device. I/O goes through
//!   io_uring, except on file systems that cannot do non-blocking I/O
//!   (tmpfs), where it is copied inline (see [`crate::file`]).
//! - `uring:///dev/...`: a block device that must take `O_DIRECT`; opening
//!   anything else is refused.
//! - `malloc:///NAME?size_mb=N`: a RAM disk of `N` MiB held by this process
//!   (see [`crate::malloc`]), created on first use and found again by name.

use std::fmt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::BdevError;

/// A disk URI that could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// The URI is empty.
    #[error("empty disk URI")]
    Empty,
    /// The scheme is not one Cairn knows.
    #[error(
        "disk URI {uri:?}: unknown scheme {scheme:?} (use a path, aio://, uring:// or malloc://)"
    )]
    UnknownScheme { uri: String, scheme: String },
    /// A path scheme without an absolute path (`aio://dev/x` lacks a slash).
    #[error("disk URI {uri:?}: the path must be absolute (aio:///path)")]
    NotAbsolute { uri: String },
    /// `malloc://` without a name.
    #[error("disk URI {uri:?}: a malloc disk needs a name (malloc:///NAME?size_mb=N)")]
    MissingName { uri: String },
    /// A malloc name with characters other than letters, digits, `-`, `_`, `.`.
    #[error("disk URI {uri:?}: malloc disk name {name:?} may hold only letters, digits, '-', '_' and '.'")]
    BadName { uri: String, name: String },
    /// `malloc://` without `size_mb`.
    #[error("disk URI {uri:?}: a malloc disk needs its size (?size_mb=N)")]
    MissingSize { uri: String },
    /// A parameter whose value is not valid.
    #[error("disk URI {uri:?}: {param}={value:?} is not valid: {reason}")]
    BadParam {
        uri: String,
        param: String,
        value: String,
        reason: &'static str,
    },
    /// A parameter this scheme does not take.
    #[error("disk URI {uri:?}: unknown parameter {param:?}")]
    UnknownParam { uri: String, param: String },
}

/// A parsed disk URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskUri {
    /// A file or block device (a plain path or `aio:///path`).
    Aio(PathBuf),
    /// A block device through io_uring with `O_DIRECT` (`uring:///dev/...`).
    Uring(PathBuf),
    /// A RAM disk of this process (`malloc:///NAME?size_mb=N`).
    Malloc { name: String, size_mb: u64 },
}

impl FromStr for DiskUri {
    type Err = UriError;

    fn from_str(s: &str) -> Result<DiskUri, UriError> {
        DiskUri::parse(s)
    }
}

impl DiskUri {
    /// Parses `s`; see the module documentation for the forms.
    pub fn parse(s: &str) -> Result<DiskUri, UriError> {
        if s.is_empty() {
            return Err(UriError::Empty);
        }
        let Some((scheme, rest)) = s.split_once("://") else {
            return Ok(DiskUri::Aio(PathBuf::from(s)));
        };
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let params = parse_query(s, query)?;
        match scheme {
            "aio" | "uring" => {
                if let Some((k, _)) = params.first() {
                    return Err(UriError::UnknownParam {
                        uri: s.into(),
                        param: (*k).into(),
                    });
                }
                if !path.starts_with('/') || path.len() < 2 {
                    return Err(UriError::NotAbsolute { uri: s.into() });
                }
                let p = PathBuf::from(path);
                Ok(if scheme == "aio" {
                    DiskUri::Aio(p)
                } else {
                    DiskUri::Uring(p)
                })
            }
            "malloc" => {
                let name = path.strip_prefix('/').unwrap_or(path);
                if name.is_empty() {
                    return Err(UriError::MissingName { uri: s.into() });
                }
                if !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                {
                    return Err(UriError::BadName {
                        uri: s.into(),
                        name: name.into(),
                    });
                }
                let mut size_mb = None;
                for (k, v) in params {
                    match k {
                        "size_mb" => {
                            let n = v.parse::<u64>().map_err(|_| UriError::BadParam {
                                uri: s.into(),
                                param: k.into(),
                                value: v.into(),
                                reason: "not a whole number",
                            })?;
                            if n == 0 || n > (1 << 30) {
                                return Err(UriError::BadParam {
                                    uri: s.into(),
                                    param: k.into(),
                                    value: v.into(),
                                    reason: "must be between 1 and 2^30",
                                });
                            }
                            size_mb = Some(n);
                        }
                        _ => {
                            return Err(UriError::UnknownParam {
                                uri: s.into(),
                                param: k.into(),
                            })
                        }
                    }
                }
                let size_mb = size_mb.ok_or_else(|| UriError::MissingSize { uri: s.into() })?;
                Ok(DiskUri::Malloc {
                    name: name.into(),
                    size_mb,
                })
            }
            other => Err(UriError::UnknownScheme {
                uri: s.into(),
                scheme: other.into(),
            }),
        }
    }

    /// The path a pool opens for this disk: the file or device itself, or
    /// the RAM disk's descriptor, which is created here on first use. A
    /// `uring://` disk is checked to be a block device that takes
    /// `O_DIRECT`.
    pub fn resolve(&self) -> Result<PathBuf, BdevError> {
        match self {
            DiskUri::Aio(p) => Ok(p.clone()),
            DiskUri::Uring(p) => {
                check_uring(p)?;
                Ok(p.clone())
            }
            DiskUri::Malloc { name, size_mb } => {
                crate::malloc::get_or_create(name, size_mb << 20).map(|d| d.path())
            }
        }
    }

    /// Whether the disk is a RAM disk of this process (gone when it exits).
    pub fn is_malloc(&self) -> bool {
        matches!(self, DiskUri::Malloc { .. })
    }
}

impl fmt::Display for DiskUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DiskUri::Aio(p) => write!(f, "{}", p.display()),
            DiskUri::Uring(p) => write!(f, "uring://{}", p.display()),
            DiskUri::Malloc { name, size_mb } => write!(f, "malloc:///{name}?size_mb={size_mb}"),
        }
    }
}

fn parse_query<'a>(uri: &str, query: Option<&'a str>) -> Result<Vec<(&'a str, &'a str)>, UriError> {
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=').ok_or_else(|| UriError::BadParam {
                uri: uri.into(),
                param: kv.into(),
                value: String::new(),
                reason: "expected NAME=VALUE",
            })
        })
        .collect()
}

fn check_uring(p: &Path) -> Result<(), BdevError> {
    let meta = std::fs::metadata(p).map_err(|e| BdevError::io("stat", e))?;
    if !meta.file_type().is_block_device() {
        return Err(BdevError::Unsupported {
            op: "uring:// on anything but a block device",
        });
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(p)
        .map(drop)
        .map_err(|e| BdevError::io("open O_DIRECT", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_schemes_parse() {
        assert_eq!(
            DiskUri::parse("/var/lib/cairn/pool0.img").unwrap(),
            DiskUri::Aio("/var/lib/cairn/pool0.img".into())
        );
        assert_eq!(
            DiskUri::parse("aio:///dev/sdb").unwrap(),
            DiskUri::Aio("/dev/sdb".into())
        );
        assert_eq!(
            DiskUri::parse("uring:///dev/nvme0n1").unwrap(),
            DiskUri::Uring("/dev/nvme0n1".into())
        );
        assert_eq!(
            DiskUri::parse("malloc:///ram0?size_mb=64").unwrap(),
            DiskUri::Malloc {
                name: "ram0".into(),
                size_mb: 64
            }
        );
        for s in ["/x/y", "uring:///dev/nvme0n1", "malloc:///ram0?size_mb=64"] {
            assert_eq!(DiskUri::parse(s).unwrap().to_string(), s);
        }
    }

    #[test]
    fn malformed_uris_are_typed_errors() {
        let e = |s: &str| DiskUri::parse(s).unwrap_err();
        assert_eq!(e(""), UriError::Empty);
        assert!(
            matches!(e("nvme:///dev/x"), UriError::UnknownScheme { scheme, .. } if scheme == "nvme")
        );
        assert!(matches!(e("aio://dev/x"), UriError::NotAbsolute { .. }));
        assert!(matches!(e("uring://"), UriError::NotAbsolute { .. }));
        assert!(
            matches!(e("aio:///x?direct=1"), UriError::UnknownParam { param, .. } if param == "direct")
        );
        assert!(matches!(
            e("malloc:///?size_mb=4"),
            UriError::MissingName { .. }
        ));
        assert!(matches!(
            e("malloc:///a/b?size_mb=4"),
            UriError::BadName { .. }
        ));
        assert!(matches!(e("malloc:///ram0"), UriError::MissingSize { .. }));
        assert!(
            matches!(e("malloc:///ram0?size_mb=lots"), UriError::BadParam { param, .. } if param == "size_mb")
        );
        assert!(matches!(
            e("malloc:///ram0?size_mb=0"),
            UriError::BadParam { .. }
        ));
        assert!(matches!(
            e("malloc:///ram0?size_mb"),
            UriError::BadParam { .. }
        ));
        assert!(matches!(
            e("malloc:///ram0?size_mb=4&x=1"),
            UriError::UnknownParam { .. }
        ));
        // The message names the URI and what to write instead.
        let msg = e("malloc:///ram0").to_string();
        assert!(
            msg.contains("malloc:///ram0") && msg.contains("size_mb"),
            "{msg}"
        );
    }

    #[test]
    fn uring_refuses_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let uri = DiskUri::parse(&format!("uring://{}", p.display())).unwrap();
        assert!(matches!(uri.resolve(), Err(BdevError::Unsupported { .. })));
    }
}
