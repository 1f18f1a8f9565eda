//! The one place a block device error becomes an NVMe status.

use cairn_bdev::BdevError;
use cairn_nvmf::Status;

/// The NVMe status a host sees for a failed device operation.
pub fn bdev_status(e: &BdevError) -> Status {
    match e {
        BdevError::OutOfRange { .. } => Status::LBA_RANGE,
        BdevError::Misaligned { .. } => Status::INVALID_FIELD,
        BdevError::NoSpace => Status::CAPACITY_EXCEEDED,
        BdevError::ReadOnly => Status::NS_WRITE_PROTECTED,
        // Retryable: the host retries (or fails over) without DNR.
        BdevError::Unavailable { .. } => Status::NS_NOT_READY,
        BdevError::Unsupported { .. } => Status::INVALID_OPCODE,
        BdevError::Integrity { .. } => Status::UNRECOVERED_READ,
        BdevError::Io { .. } => Status::INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let oor = BdevError::OutOfRange {
            lba: 1,
            blocks: 2,
            capacity: 2,
        };
        assert_eq!(bdev_status(&oor), Status::LBA_RANGE);
        assert_eq!(bdev_status(&BdevError::NoSpace).sc, 0x81);
        assert_eq!(
            bdev_status(&BdevError::ReadOnly),
            Status::NS_WRITE_PROTECTED
        );
        let un = bdev_status(&BdevError::Unavailable { reason: "x".into() });
        assert!(!un.dnr);
        let io = BdevError::Io {
            op: "read",
            source: std::io::Error::other("x"),
        };
        assert_eq!(bdev_status(&io), Status::INTERNAL);
    }
}
