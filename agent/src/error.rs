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
            ControlError::Engine { status, .. } => engine_code(status.code()),
            ControlError::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            ControlError::Store(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}

/// What an engine's gRPC code means to the agent's callers. The engine
/// speaks of its own objects (pools, replicas, nexuses, shares); the agent
/// speaks of volumes and nodes, so no engine code passes through as it is:
///
/// | engine | agent | why |
/// | --- | --- | --- |
/// | UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND | UNAVAILABLE | the engine is unreachable, or its objects are not (yet) what the store says: retry |
/// | ABORTED, CANCELLED, ALREADY_EXISTS | ABORTED | a concurrent or half-done operation on the engine: retry |
/// | RESOURCE_EXHAUSTED | RESOURCE_EXHAUSTED | a pool is out of space |
/// | anything else | INTERNAL | the agent asked something the engine could not do: not the caller's argument, and not a name clash |
pub fn engine_code(code: Code) -> Code {
    match code {
        Code::Unavailable | Code::DeadlineExceeded | Code::NotFound => Code::Unavailable,
        Code::Aborted | Code::Cancelled | Code::AlreadyExists => Code::Aborted,
        Code::ResourceExhausted => Code::ResourceExhausted,
        Code::Ok => Code::Ok,
        Code::InvalidArgument
        | Code::FailedPrecondition
        | Code::OutOfRange
        | Code::Unimplemented
        | Code::Internal
        | Code::Unknown
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::DataLoss => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One row per engine code: the table in [`engine_code`]'s doc.
    #[test]
    fn engine_codes_are_mapped_not_passed_through() {
        let rows = [
            (Code::Unavailable, Code::Unavailable),
            (Code::DeadlineExceeded, Code::Unavailable),
            (Code::NotFound, Code::Unavailable),
            (Code::Aborted, Code::Aborted),
            (Code::Cancelled, Code::Aborted),
            (Code::AlreadyExists, Code::Aborted),
            (Code::ResourceExhausted, Code::ResourceExhausted),
            (Code::InvalidArgument, Code::Internal),
            (Code::FailedPrecondition, Code::Internal),
            (Code::OutOfRange, Code::Internal),
            (Code::Unimplemented, Code::Internal),
            (Code::Internal, Code::Internal),
            (Code::Unknown, Code::Internal),
            (Code::PermissionDenied, Code::Internal),
            (Code::Unauthenticated, Code::Internal),
            (Code::DataLoss, Code::Internal),
        ];
        for (engine, want) in rows {
            let s: Status = ControlError::Engine {
                node: "n".into(),
                status: Status::new(engine, "engine says no"),
            }
            .into();
            assert_eq!(s.code(), want, "engine {engine:?}");
            assert!(s.message().contains("engine says no"), "{}", s.message());
        }
    }

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
        assert_eq!(s.code(), Code::Aborted, "not a CSI name clash");
    }
}
