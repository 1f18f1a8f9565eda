//! Submission and completion queue entries and the commands Cairn speaks.

use crate::status::Status;

/// Length of a submission queue entry.
pub const SQE_LEN: usize = 64;
/// Length of a completion queue entry.
pub const CQE_LEN: usize = 16;

/// Admin opcodes.
pub mod admin {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0A;
    pub const ASYNC_EVENT: u8 = 0x0C;
    pub const KEEP_ALIVE: u8 = 0x18;
}

/// NVM command set opcodes.
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DSM: u8 = 0x09;
}

/// The fabrics command opcode, and its command types.
pub mod fabrics {
    pub const OPCODE: u8 = 0x7F;
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const DISCONNECT: u8 = 0x08;
}

/// SGL descriptor type byte: data block, offset (in-capsule data).
pub const SGL_INCAPSULE: u8 = 0x01;
/// SGL descriptor type byte: transport data block (data sent by R2T/C2H).
pub const SGL_TRANSPORT: u8 = 0x5A;

/// Controller property offsets (NVMe over Fabrics 1.1, figure 36).
pub mod prop {
    pub const CAP: u32 = 0x00;
    pub const VS: u32 = 0x08;
    pub const CC: u32 = 0x14;
    pub const CSTS: u32 = 0x1C;
    pub const NSSR: u32 = 0x20;
}

/// A raw submission queue entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sqe(pub [u8; SQE_LEN]);

impl std::fmt::Debug for Sqe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqe")
            .field("opcode", &self.opcode())
            .field("cid", &self.cid())
            .field("nsid", &self.nsid())
            .finish()
    }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from(le32(b, o)) | (u64::from(le32(b, o + 4)) << 32)
}

impl Default for Sqe {
    fn default() -> Self {
        Sqe([0; SQE_LEN])
    }
}

impl Sqe {
    /// From the 64 bytes of a capsule; None if `b` is shorter.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        let a: [u8; SQE_LEN] = b.get(..SQE_LEN)?.try_into().ok()?;
        Some(Sqe(a))
    }
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    pub fn cid(&self) -> u16 {
        le16(&self.0, 2)
    }
    pub fn nsid(&self) -> u32 {
        le32(&self.0, 4)
    }
    /// Command dword `n` (10..=15).
    pub fn cdw(&self, n: usize) -> u32 {
        le32(&self.0, n * 4)
    }
    /// The SGL descriptor's length.
    pub fn sgl_len(&self) -> u32 {
        le32(&self.0, 32)
    }
    /// The SGL descriptor's address (offset for in-capsule data).
    pub fn sgl_addr(&self) -> u64 {
        le64(&self.0, 24)
    }
    /// The SGL descriptor's type byte.
    pub fn sgl_type(&self) -> u8 {
        self.0[39]
    }
    /// Fabrics command type.
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }

    pub fn set_opcode(&mut self, v: u8) {
        self.0[0] = v;
    }
    pub fn set_cid(&mut self, v: u16) {
        self.0[2..4].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_nsid(&mut self, v: u32) {
        self.0[4..8].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        self.0[n * 4..n * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    /// Sets the SGL: in-capsule (offset 0) or transport data block.
    pub fn set_sgl(&mut self, len: u32, in_capsule: bool) {
        // PSDT = 01b: SGLs for data.
        self.0[1] = (self.0[1] & 0x3f) | 0x40;
        self.0[24..32].fill(0);
        self.0[32..36].copy_from_slice(&len.to_le_bytes());
        self.0[36..39].fill(0);
        self.0[39] = if in_capsule {
            SGL_INCAPSULE
        } else {
            SGL_TRANSPORT
        };
    }
}

/// A completion queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cqe {
    /// Command-specific result (dwords 0 and 1).
    pub result: u64,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    pub status: Status,
}

impl Cqe {
    /// The 16 wire bytes (phase bit 0; fabrics do not use it).
    pub fn bytes(&self) -> [u8; CQE_LEN] {
        let mut b = [0u8; CQE_LEN];
        b[0..8].copy_from_slice(&self.result.to_le_bytes());
        b[8..10].copy_from_slice(&self.sqhd.to_le_bytes());
        b[10..12].copy_from_slice(&self.sqid.to_le_bytes());
        b[12..14].copy_from_slice(&self.cid.to_le_bytes());
        b[14..16].copy_from_slice(&self.status.to_field().to_le_bytes());
        b
    }

    /// Parses 16 bytes; None if `b` is shorter.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b = b.get(..CQE_LEN)?;
        Some(Cqe {
            result: le64(b, 0),
            sqhd: le16(b, 8),
            sqid: le16(b, 10),
            cid: le16(b, 12),
            status: Status::from_field(le16(b, 14)),
        })
    }
}

/// How a command moves data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    None,
    /// Host to controller (write-like).
    ToCtrl,
    /// Controller to host (read-like).
    ToHost,
}

/// The data a command carries, from its SGL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataDesc {
    pub len: u32,
    pub in_capsule: bool,
}

impl DataDesc {
    /// Reads and checks the SGL of `sqe`.
    pub fn from_sqe(sqe: &Sqe) -> Result<Self, Status> {
        let len = sqe.sgl_len();
        match sqe.sgl_type() {
            SGL_INCAPSULE => {
                if sqe.sgl_addr() != 0 {
                    return Err(Status::SGL_OFFSET);
                }
                Ok(DataDesc {
                    len,
                    in_capsule: true,
                })
            }
            SGL_TRANSPORT => Ok(DataDesc {
                len,
                in_capsule: false,
            }),
            // A zeroed descriptor is how some hosts say "no data".
            0 if len == 0 => Ok(DataDesc {
                len: 0,
                in_capsule: false,
            }),
            _ => Err(Status::SGL_TYPE),
        }
    }
}

/// Fabrics Connect (NVMe-oF 1.1, figure 19).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect {
    pub recfmt: u16,
    pub qid: u16,
    /// Submission queue size, 0-based.
    pub sqsize: u16,
    pub cattr: u8,
    /// Keep alive timeout in milliseconds.
    pub kato: u32,
}

/// Connect command data (1024 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectData {
    pub hostid: [u8; 16],
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
}

/// Length of the Connect command data.
pub const CONNECT_DATA_LEN: usize = 1024;
/// Offset of SUBNQN in the connect data (for IPO reporting).
pub const CONNECT_DATA_SUBNQN: u32 = 256;
/// Offset of HOSTNQN in the connect data.
pub const CONNECT_DATA_HOSTNQN: u32 = 512;
/// Offset of CNTLID in the connect data.
pub const CONNECT_DATA_CNTLID: u32 = 16;

fn nqn_field(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let s = std::str::from_utf8(&b[..end]).ok()?;
    if s.is_empty() || end > 223 {
        return None;
    }
    Some(s.to_owned())
}

impl ConnectData {
    /// Parses the connect data; the error is the byte offset of the bad field.
    pub fn parse(b: &[u8]) -> Result<Self, u32> {
        if b.len() < CONNECT_DATA_LEN {
            return Err(0);
        }
        let mut hostid = [0u8; 16];
        hostid.copy_from_slice(&b[0..16]);
        let subnqn = nqn_field(&b[256..512]).ok_or(CONNECT_DATA_SUBNQN)?;
        let hostnqn = nqn_field(&b[512..768]).ok_or(CONNECT_DATA_HOSTNQN)?;
        Ok(ConnectData {
            hostid,
            cntlid: le16(b, 16),
            subnqn,
            hostnqn,
        })
    }

    /// The 1024 wire bytes (NQNs longer than 255 bytes are cut).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; CONNECT_DATA_LEN];
        b[0..16].copy_from_slice(&self.hostid);
        b[16..18].copy_from_slice(&self.cntlid.to_le_bytes());
        let s = self.subnqn.as_bytes();
        let n = s.len().min(255);
        b[256..256 + n].copy_from_slice(&s[..n]);
        let h = self.hostnqn.as_bytes();
        let n = h.len().min(255);
        b[512..512 + n].copy_from_slice(&h[..n]);
        b
    }
}

/// A parsed command. Anything not listed is answered with
/// [`Status::INVALID_OPCODE`] by [`Command::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Connect(Connect),
    PropertyGet {
        /// 8-byte property (otherwise 4).
        wide: bool,
        offset: u32,
    },
    PropertySet {
        wide: bool,
        offset: u32,
        value: u64,
    },
    Disconnect,
    Identify {
        cns: u8,
        cntid: u16,
        nsid: u32,
        csi: u8,
    },
    GetLogPage {
        lid: u8,
        lsp: u8,
        /// Retain Asynchronous Event: reading the log does not clear it.
        rae: bool,
        /// Bytes requested.
        len: u32,
        /// Byte offset into the log.
        offset: u64,
        nsid: u32,
    },
    GetFeatures {
        fid: u8,
        sel: u8,
        cdw11: u32,
    },
    SetFeatures {
        fid: u8,
        save: bool,
        cdw11: u32,
    },
    KeepAlive,
    AsyncEventRequest,
    Abort {
        sqid: u16,
        cid: u16,
    },
    Read(Rw),
    Write(Rw),
    Compare(Rw),
    Flush {
        nsid: u32,
    },
    WriteZeroes {
        nsid: u32,
        slba: u64,
        /// Number of blocks (1-based).
        blocks: u32,
        deallocate: bool,
    },
    DatasetManagement {
        nsid: u32,
        /// Number of ranges (1-based).
        ranges: u32,
        deallocate: bool,
    },
}

/// A read, write or compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rw {
    pub nsid: u32,
    pub slba: u64,
    /// Number of blocks (1-based).
    pub blocks: u32,
    pub fua: bool,
}

impl Command {
    /// Parses `sqe` as a command on an admin (`admin`) or I/O queue.
    pub fn parse(sqe: &Sqe, admin: bool) -> Result<Self, Status> {
        let op = sqe.opcode();
        if op == fabrics::OPCODE {
            return Self::parse_fabrics(sqe);
        }
        if admin {
            Self::parse_admin(sqe)
        } else {
            Self::parse_io(sqe)
        }
    }

    fn parse_fabrics(sqe: &Sqe) -> Result<Self, Status> {
        let b = &sqe.0;
        Ok(match sqe.fctype() {
            fabrics::CONNECT => Command::Connect(Connect {
                recfmt: le16(b, 40),
                qid: le16(b, 42),
                sqsize: le16(b, 44),
                cattr: b[46],
                kato: le32(b, 48),
            }),
            fabrics::PROPERTY_GET => Command::PropertyGet {
                wide: b[40] & 0x7 == 1,
                offset: le32(b, 44),
            },
            fabrics::PROPERTY_SET => Command::PropertySet {
                wide: b[40] & 0x7 == 1,
                offset: le32(b, 44),
                value: le64(b, 48),
            },
            fabrics::DISCONNECT => Command::Disconnect,
            _ => return Err(Status::INVALID_OPCODE),
        })
    }

    fn parse_admin(sqe: &Sqe) -> Result<Self, Status> {
        let c10 = sqe.cdw(10);
        let c11 = sqe.cdw(11);
        Ok(match sqe.opcode() {
            admin::IDENTIFY => Command::Identify {
                cns: (c10 & 0xff) as u8,
                cntid: (c10 >> 16) as u16,
                nsid: sqe.nsid(),
                csi: (c11 >> 24) as u8,
            },
            admin::GET_LOG_PAGE => {
                let numdl = c10 >> 16;
                let numdu = c11 & 0xffff;
                let numd = u64::from((numdu << 16) | numdl) + 1;
                let len = u32::try_from(numd * 4).map_err(|_| Status::INVALID_FIELD)?;
                Command::GetLogPage {
                    lid: (c10 & 0xff) as u8,
                    lsp: ((c10 >> 8) & 0x7f) as u8,
                    rae: c10 & (1 << 15) != 0,
                    len,
                    offset: u64::from(sqe.cdw(12)) | (u64::from(sqe.cdw(13)) << 32),
                    nsid: sqe.nsid(),
                }
            }
            admin::GET_FEATURES => Command::GetFeatures {
                fid: (c10 & 0xff) as u8,
                sel: ((c10 >> 8) & 0x7) as u8,
                cdw11: c11,
            },
            admin::SET_FEATURES => Command::SetFeatures {
                fid: (c10 & 0xff) as u8,
                save: c10 & (1 << 31) != 0,
                cdw11: c11,
            },
            admin::KEEP_ALIVE => Command::KeepAlive,
            admin::ASYNC_EVENT => Command::AsyncEventRequest,
            admin::ABORT => Command::Abort {
                sqid: (c10 & 0xffff) as u16,
                cid: (c10 >> 16) as u16,
            },
            _ => return Err(Status::INVALID_OPCODE),
        })
    }

    fn parse_io(sqe: &Sqe) -> Result<Self, Status> {
        let nsid = sqe.nsid();
        let slba = u64::from(sqe.cdw(10)) | (u64::from(sqe.cdw(11)) << 32);
        let c12 = sqe.cdw(12);
        let blocks = (c12 & 0xffff) + 1;
        let rw = Rw {
            nsid,
            slba,
            blocks,
            fua: c12 & (1 << 30) != 0,
        };
        Ok(match sqe.opcode() {
            io::READ => Command::Read(rw),
            io::WRITE => Command::Write(rw),
            io::COMPARE => Command::Compare(rw),
            io::FLUSH => Command::Flush { nsid },
            io::WRITE_ZEROES => Command::WriteZeroes {
                nsid,
                slba,
                blocks,
                deallocate: c12 & (1 << 25) != 0,
            },
            io::DSM => Command::DatasetManagement {
                nsid,
                ranges: (sqe.cdw(10) & 0xff) + 1,
                deallocate: sqe.cdw(11) & (1 << 2) != 0,
            },
            _ => return Err(Status::INVALID_OPCODE),
        })
    }

    /// Which way data moves for this command.
    pub fn data_dir(&self) -> DataDir {
        match self {
            Command::Connect(_)
            | Command::Write(_)
            | Command::Compare(_)
            | Command::DatasetManagement { .. } => DataDir::ToCtrl,
            Command::Identify { .. }
            | Command::GetLogPage { .. }
            | Command::Read(_)
            | Command::GetFeatures { .. } => DataDir::ToHost,
            _ => DataDir::None,
        }
    }
}

/// One Dataset Management range (16 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsmRange {
    pub attributes: u32,
    pub blocks: u32,
    pub slba: u64,
}

impl DsmRange {
    /// Parses the ranges in `b` (at most `n`); fewer if `b` is short.
    pub fn parse_all(b: &[u8], n: u32) -> Vec<DsmRange> {
        b.chunks_exact(16)
            .take(n as usize)
            .map(|r| DsmRange {
                attributes: le32(r, 0),
                blocks: le32(r, 4),
                slba: le64(r, 8),
            })
            .collect()
    }

    /// The 16 wire bytes.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.attributes.to_le_bytes());
        b[4..8].copy_from_slice(&self.blocks.to_le_bytes());
        b[8..16].copy_from_slice(&self.slba.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_opcodes_are_invalid_opcode() {
        let mut s = Sqe::default();
        s.set_opcode(0x55);
        assert_eq!(Command::parse(&s, false), Err(Status::INVALID_OPCODE));
        assert_eq!(Command::parse(&s, true), Err(Status::INVALID_OPCODE));
        // An admin opcode on an I/O queue is unknown there.
        s.set_opcode(admin::IDENTIFY);
        assert_eq!(Command::parse(&s, false), Err(Status::INVALID_OPCODE));
        s.set_opcode(fabrics::OPCODE);
        s.0[4] = 0x33;
        assert_eq!(Command::parse(&s, true), Err(Status::INVALID_OPCODE));
    }

    #[test]
    fn read_write_fields() {
        let mut s = Sqe::default();
        s.set_opcode(io::WRITE);
        s.set_nsid(1);
        s.set_cdw(10, 0x10);
        s.set_cdw(11, 0x1);
        s.set_cdw(12, 7 | (1 << 30));
        assert_eq!(
            Command::parse(&s, false),
            Ok(Command::Write(Rw {
                nsid: 1,
                slba: 0x1_0000_0010,
                blocks: 8,
                fua: true
            }))
        );
    }

    #[test]
    fn log_page_length_is_dwords() {
        let mut s = Sqe::default();
        s.set_opcode(admin::GET_LOG_PAGE);
        s.set_cdw(10, 0x70 | (255 << 16));
        s.set_cdw(12, 1024);
        match Command::parse(&s, true).unwrap() {
            Command::GetLogPage {
                lid,
                len,
                offset,
                rae,
                ..
            } => {
                assert_eq!(lid, 0x70);
                assert_eq!(len, 1024);
                assert_eq!(offset, 1024);
                assert!(!rae);
            }
            c => panic!("unexpected {c:?}"),
        }
        // Retain Asynchronous Event is bit 15, beside the log specific field.
        s.set_cdw(10, 0x04 | (1 << 15) | (1023 << 16));
        match Command::parse(&s, true).unwrap() {
            Command::GetLogPage { lid, lsp, rae, .. } => {
                assert_eq!((lid, lsp, rae), (0x04, 0, true));
            }
            c => panic!("unexpected {c:?}"),
        }
    }

    #[test]
    fn sgl_descriptor_checks() {
        let mut s = Sqe::default();
        s.set_sgl(4096, true);
        assert_eq!(
            DataDesc::from_sqe(&s),
            Ok(DataDesc {
                len: 4096,
                in_capsule: true
            })
        );
        s.0[24] = 8; // non-zero in-capsule offset
        assert_eq!(DataDesc::from_sqe(&s), Err(Status::SGL_OFFSET));
        s.0[39] = 0x33;
        assert_eq!(DataDesc::from_sqe(&s), Err(Status::SGL_TYPE));
    }

    #[test]
    fn connect_data_roundtrip_and_bad_nqn() {
        let d = ConnectData {
            hostid: [3; 16],
            cntlid: 0xffff,
            subnqn: "nqn.2024-01.dev.cairn:vol:x".into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:1".into(),
        };
        let b = d.encode();
        assert_eq!(ConnectData::parse(&b), Ok(d));
        let mut bad = b.clone();
        bad[256..512].fill(0);
        assert_eq!(ConnectData::parse(&bad), Err(CONNECT_DATA_SUBNQN));
        let mut bad = b;
        bad[512] = 0xff;
        assert_eq!(ConnectData::parse(&bad), Err(CONNECT_DATA_HOSTNQN));
        assert_eq!(ConnectData::parse(&[0u8; 10]), Err(0));
    }

    #[test]
    fn cqe_roundtrip() {
        let c = Cqe {
            result: 0x1234_5678_9abc,
            sqhd: 3,
            sqid: 1,
            cid: 77,
            status: Status::LBA_RANGE,
        };
        assert_eq!(Cqe::parse(&c.bytes()), Some(c));
        assert_eq!(Cqe::parse(&[0u8; 3]), None);
    }
}
