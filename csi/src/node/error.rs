//! The node service's errors and their one mapping to CSI gRPC codes.

use std::{io, path::PathBuf, time::Duration};

use tonic::{Code, Status};

/// Everything a Node RPC can fail with. Each variant maps to exactly one
/// gRPC code in [`From<NodeError> for Status`], following the CSI spec's
/// error tables for the Node service.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A REQUIRED request field is empty or absent.
    #[error("{0} is required")]
    Missing(&'static str),

    /// A field is present but its value is not acceptable.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The request field.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },

    /// Another call on the same volume is still running.
    #[error("operation pending for volume {0}")]
    OperationPending(String),

    /// The volume, device or path the call refers to does not exist.
    #[error("{0}")]
    NotFound(String),

    /// The volume is already staged or published incompatibly.
    #[error("{0}")]
    AlreadyExists(String),

    /// The call came in the wrong order (e.g. publish before stage).
    #[error("{0}")]
    FailedPrecondition(String),

    /// The block device of an attached volume did not show up in time.
    #[error("no block device with namespace uuid {uuid} appeared within {waited:?}")]
    DeviceTimeout {
        /// Namespace UUID (= volume id) looked for.
        uuid: String,
        /// How long we waited.
        waited: Duration,
    },

    /// `nvme connect` failed: the target is unreachable or refused us.
    #[error("nvme connect to {target} failed: {detail}")]
    Connect {
        /// `nqn@address:port`.
        target: String,
        /// Exit status and stderr of nvme-cli.
        detail: String,
    },

    /// A helper program (mount, mkfs, resize2fs, ...) failed.
    #[error("{program} failed: {detail}")]
    Command {
        /// The program and its arguments.
        program: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },

    /// A filesystem operation on a path failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we tried.
        op: &'static str,
        /// On which path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },

    /// A blocking worker could not be joined.
    #[error("worker task failed: {0}")]
    Worker(String),
}

impl NodeError {
    /// Shorthand for [`NodeError::Invalid`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        NodeError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`NodeError::Io`].
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        NodeError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            NodeError::Missing(_) | NodeError::Invalid { .. } => Code::InvalidArgument,
            NodeError::OperationPending(_) => Code::Aborted,
            NodeError::NotFound(_) => Code::NotFound,
            NodeError::AlreadyExists(_) => Code::AlreadyExists,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::DeviceTimeout { .. } => Code::DeadlineExceeded,
            NodeError::Connect { .. } => Code::Unavailable,
            NodeError::Command { .. } | NodeError::Io { .. } | NodeError::Worker(_) => {
                Code::Internal
            }
        }
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Self {
        Status::new(e.code(), e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_csi_node_error_tables() {
        let cases = [
            (NodeError::Missing("volume_id"), Code::InvalidArgument),
            (
                NodeError::invalid("fs_type", "btrfs"),
                Code::InvalidArgument,
            ),
            (NodeError::OperationPending("v".into()), Code::Aborted),
            (NodeError::NotFound("gone".into()), Code::NotFound),
            (
                NodeError::AlreadyExists("other".into()),
                Code::AlreadyExists,
            ),
            (
                NodeError::FailedPrecondition("not staged".into()),
                Code::FailedPrecondition,
            ),
            (
                NodeError::DeviceTimeout {
                    uuid: "u".into(),
                    waited: Duration::from_secs(1),
                },
                Code::DeadlineExceeded,
            ),
            (
                NodeError::Connect {
                    target: "t".into(),
                    detail: "refused".into(),
                },
                Code::Unavailable,
            ),
            (
                NodeError::Command {
                    program: "mount".into(),
                    detail: "exit 32".into(),
                },
                Code::Internal,
            ),
            (
                NodeError::io(
                    "stat",
                    "/x",
                    io::Error::from(io::ErrorKind::PermissionDenied),
                ),
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            let msg = err.to_string();
            let status = Status::from(err);
            assert_eq!(status.code(), code, "{msg}");
            assert_eq!(status.message(), msg);
        }
    }

    #[test]
    fn pending_message_names_the_volume() {
        let s = Status::from(NodeError::OperationPending("vol-7".into()));
        assert_eq!(s.message(), "operation pending for volume vol-7");
    }
}
