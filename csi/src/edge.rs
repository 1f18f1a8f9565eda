//! The Controller service's one table from the agent's gRPC codes to the
//! CSI codes each RPC may answer with.
//!
//! CSI gives some codes a meaning of their own: ALREADY_EXISTS is a name
//! clash in CreateVolume, FAILED_PRECONDITION a volume in the wrong state
//! for the call, INVALID_ARGUMENT a request the CO must not retry
//! unchanged. An agent answer never reaches Kubernetes with one of those
//! unless the RPC's error table has it; everything else becomes
//! UNAVAILABLE or ABORTED (the CO retries) or INTERNAL. Codes the agent
//! itself chooses are listed in `cairn_agent::error`.

use tonic::{Code, Status};

/// The Controller RPCs that call the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    /// CreateVolume.
    CreateVolume,
    /// DeleteVolume.
    DeleteVolume,
    /// ControllerPublishVolume.
    Publish,
    /// ControllerUnpublishVolume.
    Unpublish,
    /// ValidateVolumeCapabilities.
    Validate,
    /// ListVolumes.
    ListVolumes,
    /// GetCapacity.
    GetCapacity,
    /// ControllerExpandVolume.
    Expand,
    /// ControllerGetVolume.
    GetVolume,
}

impl Rpc {
    /// The CSI code for the agent's `code` in this RPC.
    pub fn code(self, code: Code) -> Code {
        use Rpc::*;
        match (code, self) {
            (Code::Ok, _) => Code::Ok,
            // The volume or node named by the request does not exist. In
            // CreateVolume and GetCapacity nothing is named: a node that
            // vanished mid-call is the cluster changing under us.
            (Code::NotFound, CreateVolume | GetCapacity | ListVolumes) => Code::Unavailable,
            (Code::NotFound, _) => Code::NotFound,
            // A name clash exists only in CreateVolume.
            (Code::AlreadyExists, CreateVolume) => Code::AlreadyExists,
            (Code::AlreadyExists, _) => Code::Aborted,
            // The agent answers INVALID_ARGUMENT only for the request's
            // own fields (a bad page token is ABORTED).
            (Code::InvalidArgument, _) => Code::InvalidArgument,
            (Code::ResourceExhausted, CreateVolume | Publish | Expand) => Code::ResourceExhausted,
            (Code::ResourceExhausted, _) => Code::Unavailable,
            (Code::FailedPrecondition, DeleteVolume | Publish | Unpublish | Expand) => {
                Code::FailedPrecondition
            }
            (Code::FailedPrecondition, _) => Code::Internal,
            (Code::OutOfRange, CreateVolume | Expand) => Code::OutOfRange,
            (Code::OutOfRange, _) => Code::Internal,
            (Code::Aborted | Code::Cancelled, _) => Code::Aborted,
            (Code::Unavailable | Code::DeadlineExceeded, _) => Code::Unavailable,
            (
                Code::Unknown
                | Code::Internal
                | Code::Unimplemented
                | Code::PermissionDenied
                | Code::Unauthenticated
                | Code::DataLoss,
                _,
            ) => Code::Internal,
        }
    }

    /// The agent's `status` as this RPC's CSI answer (same message).
    pub fn status(self, status: Status) -> Status {
        Status::new(self.code(status.code()), status.message().to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Rpc::*;

    const ALL: [Rpc; 9] = [
        CreateVolume,
        DeleteVolume,
        Publish,
        Unpublish,
        Validate,
        ListVolumes,
        GetCapacity,
        Expand,
        GetVolume,
    ];

    /// Agent code, the RPCs that keep it, and what every other RPC makes
    /// of it.
    const TABLE: &[(Code, &[Rpc], Code)] = &[
        (
            Code::NotFound,
            &[
                DeleteVolume,
                Publish,
                Unpublish,
                Validate,
                Expand,
                GetVolume,
            ],
            Code::Unavailable,
        ),
        (Code::AlreadyExists, &[CreateVolume], Code::Aborted),
        (Code::InvalidArgument, &ALL, Code::Internal),
        (
            Code::ResourceExhausted,
            &[CreateVolume, Publish, Expand],
            Code::Unavailable,
        ),
        (
            Code::FailedPrecondition,
            &[DeleteVolume, Publish, Unpublish, Expand],
            Code::Internal,
        ),
        (Code::OutOfRange, &[CreateVolume, Expand], Code::Internal),
        (Code::Aborted, &ALL, Code::Internal),
        (Code::Unavailable, &ALL, Code::Internal),
        (Code::Internal, &ALL, Code::Internal),
    ];

    #[test]
    fn every_row_of_the_table() {
        for &(agent, keep, other) in TABLE {
            for rpc in ALL {
                let want = if keep.contains(&rpc) { agent } else { other };
                assert_eq!(rpc.code(agent), want, "{agent:?} in {rpc:?}");
            }
        }
    }

    #[test]
    fn retryable_and_internal_codes() {
        for rpc in ALL {
            assert_eq!(rpc.code(Code::Cancelled), Code::Aborted);
            assert_eq!(rpc.code(Code::DeadlineExceeded), Code::Unavailable);
            for c in [
                Code::Unknown,
                Code::Unimplemented,
                Code::PermissionDenied,
                Code::Unauthenticated,
                Code::DataLoss,
            ] {
                assert_eq!(rpc.code(c), Code::Internal, "{c:?} in {rpc:?}");
            }
        }
    }

    #[test]
    fn already_exists_is_a_name_clash_only_in_create_volume() {
        let s = Publish.status(Status::already_exists("nexus exists on node-a"));
        assert_eq!(s.code(), Code::Aborted);
        assert_eq!(s.message(), "nexus exists on node-a");
        assert_eq!(
            CreateVolume
                .status(Status::already_exists("other size"))
                .code(),
            Code::AlreadyExists
        );
    }
}
