//! Control-plane errors, mapped to gRPC status codes once, here.

use tonic::{Code, Status};

use crate::store::StoreError;

/// Why a control operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("{kind} {id} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("volume {name} already exists with {existing}")]
    AlreadyExists { name: String, existing: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cannot place {wanted} replica(s) of {size} bytes: {reason}")]
    NoCapacity {
        wanted: u32,
        size: u64,
        reason: String,
    },
    #[error("volume {id} is published on node {node}")]
    PublishedElsewhere { id: String, node: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("an operation on volume {id} is already in progress")]
    Busy { id: String },
    #[error("engine on node {node}: {status}")]
    Engine { node: String, status: Status },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        let code = match &e {
            ControlError::NotFound { .. } => Code::NotFound,
            ControlError::AlreadyExists { .. } => Code::AlreadyExists,
            ControlError::InvalidArgument(_) => Code::InvalidArgument,
            ControlError::NoCapacity { .. } => Code::ResourceExhausted,
            ControlError::PublishedElsewhere { .. } | ControlError::FailedPrecondition(_) => {
                Code::FailedPrecondition
            }
            ControlError::Busy { .. } => Code::Aborted,
            // An engine's own answer keeps its code, except that a missing
            // engine object during a volume operation is the cluster's
            // inconsistency, reported as unavailable so callers retry.
            ControlError::Engine { status, .. } => match status.code() {
                Code::NotFound => Code::Unavailable,
                c => c,
            },
            ControlError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            ControlError::Store(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let s: Status = ControlError::Busy { id: "v".into() }.into();
        assert_eq!(s.code(), Code::Aborted);
        let s: Status = ControlError::NoCapacity {
            wanted: 2,
            size: 1,
            reason: "one node".into(),
        }
        .into();
        assert_eq!(s.code(), Code::ResourceExhausted);
        let s: Status = ControlError::Engine {
            node: "n".into(),
            status: Status::already_exists("x"),
        }
        .into();
        assert_eq!(s.code(), Code::AlreadyExists);
    }
}
