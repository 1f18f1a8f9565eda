//! The NVMe/TCP wire protocol: PDUs, submission and completion queue entries,
//! status codes, the admin, fabrics and NVM command sets, and the data
//! structures a controller returns (identify, log pages).
//!
//! Pure: no I/O, no allocation on the parse path, and no length or offset from
//! the wire is used before it is checked. The target and initiator in
//! `cairn-engine` drive these types over sockets.
//!
//! WHEN CHANGING THE WIRE FORMAT: this crate speaks NVMe/TCP protocol format
//! version [`PFV`] 0 (NVMe/TCP 1.0), which is what the Linux host and target
//! send in ICReq/ICResp. It cannot change without breaking every host;
//! `tests::protocol_version_is_pinned` fails if it does.

pub mod cmd;
pub mod digest;
pub mod identify;
pub mod pdu;
pub mod status;

pub use cmd::{Command, Cqe, Sqe};
pub use pdu::{Fes, PduType, TermError};
pub use status::Status;

/// NVMe/TCP PDU format version carried in ICReq and ICResp.
pub const PFV: u16 = 0;

/// NQN of the discovery subsystem.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// Default NVMe/TCP port.
pub const DEFAULT_PORT: u16 = 8420;

/// NQN of the subsystem exporting a volume.
pub fn volume_nqn(uuid: &uuid::Uuid) -> String {
    format!("nqn.2024-01.dev.cairn:vol:{uuid}")
}

/// NQN of the subsystem exporting a replica to a nexus on another node.
pub fn replica_nqn(uuid: &uuid::Uuid) -> String {
    format!("nqn.2024-01.dev.cairn:replica:{uuid}")
}

/// The serial number reported for a volume's controller: 20 hex digits of
/// its UUID, stable across engine restarts and unique per volume.
pub fn volume_serial(uuid: &uuid::Uuid) -> String {
    uuid.simple().to_string()[..20].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_version_is_pinned() {
        assert_eq!(PFV, 0);
        assert_eq!(DISCOVERY_NQN.len(), 36);
        let u = uuid::Uuid::nil();
        let v = uuid::Uuid::from_u128(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        assert_eq!(volume_serial(&v), "0123456789abcdef0011");
        assert_eq!(
            volume_nqn(&u),
            "nqn.2024-01.dev.cairn:vol:00000000-0000-0000-0000-000000000000"
        );
    }
}
