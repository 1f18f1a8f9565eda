//! NVMe completion status (NVMe Base 2.0, figure 101 onwards).

/// Status code type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Sct {
    Generic = 0,
    CommandSpecific = 1,
    Media = 2,
    Path = 3,
}

/// A completion status: status code type, status code and Do Not Retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub sct: Sct,
    pub sc: u8,
    pub dnr: bool,
}

macro_rules! statuses {
    ($($(#[$m:meta])* $name:ident = ($sct:ident, $sc:expr, $dnr:expr);)*) => {
        impl Status {
            $($(#[$m])* pub const $name: Status = Status { sct: Sct::$sct, sc: $sc, dnr: $dnr };)*
        }
    };
}

statuses! {
    /// Successful completion.
    SUCCESS = (Generic, 0x00, false);
    /// Invalid command opcode.
    INVALID_OPCODE = (Generic, 0x01, true);
    /// Invalid field in command.
    INVALID_FIELD = (Generic, 0x02, true);
    /// Command ID conflict.
    CID_CONFLICT = (Generic, 0x03, true);
    /// Data transfer error.
    DATA_TRANSFER_ERROR = (Generic, 0x04, false);
    /// Internal error.
    INTERNAL = (Generic, 0x06, false);
    /// Command abort requested.
    ABORT_REQUESTED = (Generic, 0x07, false);
    /// Invalid namespace or format.
    INVALID_NS = (Generic, 0x0B, true);
    /// Command sequence error.
    COMMAND_SEQUENCE = (Generic, 0x0C, true);
    /// Data SGL length invalid.
    SGL_DATA_LENGTH = (Generic, 0x0F, true);
    /// SGL descriptor type invalid.
    SGL_TYPE = (Generic, 0x11, true);
    /// SGL offset invalid.
    SGL_OFFSET = (Generic, 0x16, true);
    /// Namespace is write protected.
    NS_WRITE_PROTECTED = (Generic, 0x20, true);
    /// Transient transport error.
    TRANSIENT_TRANSPORT = (Generic, 0x22, false);
    /// LBA out of range.
    LBA_RANGE = (Generic, 0x80, true);
    /// Capacity exceeded.
    CAPACITY_EXCEEDED = (Generic, 0x81, true);
    /// Namespace not ready (retry may succeed).
    NS_NOT_READY = (Generic, 0x82, false);
    /// Invalid queue identifier.
    INVALID_QID = (CommandSpecific, 0x01, true);
    /// Invalid queue size.
    INVALID_QUEUE_SIZE = (CommandSpecific, 0x02, true);
    /// Asynchronous event request limit exceeded.
    AER_LIMIT = (CommandSpecific, 0x05, true);
    /// Invalid log page.
    INVALID_LOG_PAGE = (CommandSpecific, 0x09, true);
    /// Feature identifier not saveable.
    FEATURE_NOT_SAVEABLE = (CommandSpecific, 0x0D, true);
    /// Connect: incompatible format.
    CONNECT_FORMAT = (CommandSpecific, 0x80, true);
    /// Connect: controller busy.
    CONNECT_CTRL_BUSY = (CommandSpecific, 0x81, false);
    /// Connect: invalid parameters.
    CONNECT_INVALID_PARAM = (CommandSpecific, 0x82, true);
    /// Connect: invalid host.
    CONNECT_INVALID_HOST = (CommandSpecific, 0x84, true);
    /// Compare failure.
    COMPARE_FAILURE = (Media, 0x85, true);
    /// Unrecovered read error.
    UNRECOVERED_READ = (Media, 0x81, false);
    /// Internal path error.
    INTERNAL_PATH = (Path, 0x00, false);
}

impl Status {
    /// The 15-bit status field of a CQE (without the phase bit), shifted
    /// into place: bits 15:1 of CQE dword 3's upper half.
    pub fn to_field(self) -> u16 {
        let v = u16::from(self.sc) | (u16::from(self.sct as u8) << 8) | (u16::from(self.dnr) << 14);
        v << 1
    }

    /// Parses the status field of a CQE (phase bit ignored).
    pub fn from_field(f: u16) -> Self {
        let v = f >> 1;
        let sct = match (v >> 8) & 0x7 {
            0 => Sct::Generic,
            1 => Sct::CommandSpecific,
            2 => Sct::Media,
            _ => Sct::Path,
        };
        Status {
            sct,
            sc: (v & 0xff) as u8,
            dnr: v & (1 << 14) != 0,
        }
    }

    /// Whether this is a success.
    pub fn is_success(self) -> bool {
        self.sct == Sct::Generic && self.sc == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_field_roundtrip() {
        for s in [
            Status::SUCCESS,
            Status::LBA_RANGE,
            Status::CONNECT_INVALID_HOST,
            Status::COMPARE_FAILURE,
            Status::INTERNAL_PATH,
            Status::NS_NOT_READY,
        ] {
            assert_eq!(Status::from_field(s.to_field()), s);
        }
        // LBA out of range with DNR, as the Linux host decodes it.
        assert_eq!(Status::LBA_RANGE.to_field() >> 1, 0x4080);
        assert_eq!(Status::CONNECT_INVALID_HOST.to_field() >> 1, 0x4184);
    }
}
