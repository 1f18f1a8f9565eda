//! NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0, section 3.6).
//!
//! Every PDU starts with an 8-byte common header; the header length (`hlen`),
//! the data offset (`pdo`) and the total length (`plen`) come from the peer
//! and are never trusted: [`CommonHeader::layout`] checks them against the
//! PDU type, the negotiated digests and the negotiated limits before anything
//! is read past the common header.

use crate::digest::crc32c;

/// Length of the common header.
pub const CH_LEN: usize = 8;
/// Length of the ICReq and ICResp PDUs.
pub const IC_LEN: usize = 128;
/// Header length of a command capsule (common header + SQE).
pub const CAPSULE_CMD_HLEN: usize = 72;
/// Header length of a response capsule (common header + CQE).
pub const CAPSULE_RESP_HLEN: usize = 24;
/// Header length of H2CData, C2HData and R2T.
pub const DATA_HLEN: usize = 24;
/// Header length of a termination request.
pub const TERM_HLEN: usize = 24;
/// The largest offending header a termination request echoes back.
pub const TERM_MAX_ECHO: usize = 128;
/// Length of a header or data digest.
pub const DIGEST_LEN: usize = 4;
/// The smallest MAXH2CDATA a controller may announce.
pub const MIN_MAXH2CDATA: u32 = 4096;

/// Flag: a header digest follows the header.
pub const FLAG_HDGSTF: u8 = 0x01;
/// Flag: a data digest follows the data.
pub const FLAG_DDGSTF: u8 = 0x02;
/// Flag (H2CData/C2HData): last data PDU of the transfer.
pub const FLAG_DATA_LAST: u8 = 0x04;
/// Flag (C2HData): the command completed successfully; no response capsule.
pub const FLAG_DATA_SUCCESS: u8 = 0x08;

/// ICReq/ICResp digest bit: header digest.
pub const DGST_HEADER: u8 = 0x01;
/// ICReq/ICResp digest bit: data digest.
pub const DGST_DATA: u8 = 0x02;

/// PDU types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PduType {
    IcReq = 0x00,
    IcResp = 0x01,
    H2cTermReq = 0x02,
    C2hTermReq = 0x03,
    CapsuleCmd = 0x04,
    CapsuleResp = 0x05,
    H2cData = 0x06,
    C2hData = 0x07,
    R2t = 0x09,
}

impl PduType {
    /// The type for a raw byte, if it is one.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0x00 => Self::IcReq,
            0x01 => Self::IcResp,
            0x02 => Self::H2cTermReq,
            0x03 => Self::C2hTermReq,
            0x04 => Self::CapsuleCmd,
            0x05 => Self::CapsuleResp,
            0x06 => Self::H2cData,
            0x07 => Self::C2hData,
            0x09 => Self::R2t,
            _ => return None,
        })
    }

    /// Whether a host sends this type (otherwise a controller does).
    pub fn from_host(self) -> bool {
        matches!(
            self,
            Self::IcReq | Self::H2cTermReq | Self::CapsuleCmd | Self::H2cData
        )
    }

    /// The fixed header length of this type.
    pub fn hlen(self) -> usize {
        match self {
            Self::IcReq | Self::IcResp => IC_LEN,
            Self::CapsuleCmd => CAPSULE_CMD_HLEN,
            Self::CapsuleResp => CAPSULE_RESP_HLEN,
            Self::H2cData | Self::C2hData | Self::R2t => DATA_HLEN,
            Self::H2cTermReq | Self::C2hTermReq => TERM_HLEN,
        }
    }

    /// Whether PDUs of this type may carry data.
    pub fn has_data(self) -> bool {
        matches!(
            self,
            Self::CapsuleCmd | Self::H2cData | Self::C2hData | Self::H2cTermReq | Self::C2hTermReq
        )
    }

    /// Whether digests apply to this type once negotiated.
    pub fn digests_apply(self) -> bool {
        !matches!(
            self,
            Self::IcReq | Self::IcResp | Self::H2cTermReq | Self::C2hTermReq
        )
    }
}

/// Fatal error status of a termination request (NVMe/TCP 1.0, figure 21).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Fes {
    InvalidHeaderField = 0x01,
    PduSequenceError = 0x02,
    HeaderDigestError = 0x03,
    DataOutOfRange = 0x04,
    DataLimitExceeded = 0x05,
    UnsupportedParameter = 0x06,
}

/// A fatal transport error: the connection must be terminated with a
/// termination request carrying `fes` and `fei`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("fatal NVMe/TCP transport error {fes:?} (field info {fei:#x})")]
pub struct TermError {
    pub fes: Fes,
    /// Field error information: for an invalid header field, the byte offset
    /// of the field in the PDU header.
    pub fei: u32,
}

impl TermError {
    /// An invalid header field at byte `offset`.
    pub fn field(offset: u32) -> Self {
        TermError {
            fes: Fes::InvalidHeaderField,
            fei: offset,
        }
    }

    /// A fatal error with no field information.
    pub fn new(fes: Fes) -> Self {
        TermError { fes, fei: 0 }
    }
}

/// Digests negotiated on a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    /// From the ICReq/ICResp digest byte.
    pub fn from_bits(b: u8) -> Self {
        Digests {
            header: b & DGST_HEADER != 0,
            data: b & DGST_DATA != 0,
        }
    }

    /// To the ICReq/ICResp digest byte.
    pub fn bits(self) -> u8 {
        (if self.header { DGST_HEADER } else { 0 }) | (if self.data { DGST_DATA } else { 0 })
    }
}

/// What one side accepts from its peer after connection setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxLimits {
    /// Negotiated digests.
    pub digests: Digests,
    /// Whether we are the controller (we accept host PDUs) or the host.
    pub controller: bool,
    /// The largest data in a command capsule (controller side; ioccsz*16-64).
    pub max_incapsule: u32,
    /// The largest data in one H2CData (controller) or C2HData (host) PDU.
    pub max_data: u32,
}

/// The common header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommonHeader {
    pub pdu_type: u8,
    pub flags: u8,
    pub hlen: u8,
    pub pdo: u8,
    pub plen: u32,
}

/// Where the parts of a PDU lie, relative to its first byte; all checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PduLayout {
    pub pdu_type: PduType,
    /// Header length (common plus type-specific).
    pub hlen: usize,
    /// Whether a header digest follows the header.
    pub hdgst: bool,
    /// Offset of the data (0 if none).
    pub data_offset: usize,
    /// Length of the data.
    pub data_len: usize,
    /// Whether a data digest follows the data.
    pub ddgst: bool,
    /// Total length.
    pub plen: usize,
}

impl PduLayout {
    /// Bytes of header plus header digest (what to read before parsing).
    pub fn header_len(&self) -> usize {
        self.hlen + if self.hdgst { DIGEST_LEN } else { 0 }
    }

    /// Padding between the header digest and the data.
    pub fn pad_len(&self) -> usize {
        if self.data_len == 0 {
            0
        } else {
            self.data_offset - self.header_len()
        }
    }
}

impl CommonHeader {
    /// Parses the common header from the first 8 bytes of `b`.
    pub fn parse(b: &[u8]) -> Result<Self, TermError> {
        if b.len() < CH_LEN {
            return Err(TermError::new(Fes::PduSequenceError));
        }
        Ok(CommonHeader {
            pdu_type: b[0],
            flags: b[1],
            hlen: b[2],
            pdo: b[3],
            plen: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
        })
    }

    /// Writes the common header into the first 8 bytes of `b`.
    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.pdu_type;
        b[1] = self.flags;
        b[2] = self.hlen;
        b[3] = self.pdo;
        b[4..8].copy_from_slice(&self.plen.to_le_bytes());
    }

    /// Checks the header against the PDU type and the negotiated limits and
    /// returns where its parts lie. Before connection setup (`lim` is None)
    /// only an initialize request/response is accepted.
    pub fn layout(&self, lim: Option<&RxLimits>) -> Result<PduLayout, TermError> {
        let Some(ty) = PduType::from_u8(self.pdu_type) else {
            return Err(TermError::field(0));
        };
        let expect_from_host = lim.map(|l| l.controller);
        match lim {
            None => {
                if !matches!(ty, PduType::IcReq | PduType::IcResp) {
                    return Err(TermError::new(Fes::PduSequenceError));
                }
            }
            Some(_) => {
                if matches!(ty, PduType::IcReq | PduType::IcResp)
                    || Some(ty.from_host()) != expect_from_host
                {
                    return Err(TermError::new(Fes::PduSequenceError));
                }
            }
        }
        let hlen = usize::from(self.hlen);
        if hlen != ty.hlen() {
            return Err(TermError::field(2));
        }
        let plen = self.plen as usize;
        let digests = lim.map(|l| l.digests).unwrap_or_default();
        let applies = ty.digests_apply();
        let hdgst = applies && digests.header;
        if applies && (self.flags & FLAG_HDGSTF != 0) != digests.header {
            return Err(TermError::field(1));
        }
        let header_len = hlen + if hdgst { DIGEST_LEN } else { 0 };
        if plen < header_len {
            return Err(TermError::field(4));
        }
        let is_term = matches!(ty, PduType::H2cTermReq | PduType::C2hTermReq);
        if is_term {
            // Termination requests carry the offending header as data,
            // right after their own header, never digests.
            if plen > TERM_HLEN + TERM_MAX_ECHO + 24 {
                return Err(TermError::field(4));
            }
            return Ok(PduLayout {
                pdu_type: ty,
                hlen,
                hdgst: false,
                data_offset: hlen,
                data_len: plen - hlen,
                ddgst: false,
                plen,
            });
        }
        if plen == header_len {
            if self.pdo != 0 && usize::from(self.pdo) != plen {
                // A PDO with no data must be zero (or point at the end).
                return Err(TermError::field(3));
            }
            if self.flags & FLAG_DDGSTF != 0 {
                return Err(TermError::field(1));
            }
            if matches!(ty, PduType::H2cData | PduType::C2hData) {
                // Data PDUs without data are meaningless.
                return Err(TermError::field(4));
            }
            return Ok(PduLayout {
                pdu_type: ty,
                hlen,
                hdgst,
                data_offset: 0,
                data_len: 0,
                ddgst: false,
                plen,
            });
        }
        // The PDU carries data.
        if !ty.has_data() {
            return Err(TermError::field(4));
        }
        let pdo = usize::from(self.pdo);
        if pdo < header_len || pdo >= plen {
            return Err(TermError::field(3));
        }
        let ddgst = applies && digests.data;
        if applies && (self.flags & FLAG_DDGSTF != 0) != digests.data {
            return Err(TermError::field(1));
        }
        let tail = if ddgst { DIGEST_LEN } else { 0 };
        if plen < pdo + tail + 1 {
            return Err(TermError::field(4));
        }
        let data_len = plen - pdo - tail;
        if let Some(l) = lim {
            let max = match ty {
                PduType::CapsuleCmd => l.max_incapsule,
                _ => l.max_data,
            };
            if data_len > max as usize {
                return Err(TermError::new(Fes::DataLimitExceeded));
            }
        }
        Ok(PduLayout {
            pdu_type: ty,
            hlen,
            hdgst,
            data_offset: pdo,
            data_len,
            ddgst,
            plen,
        })
    }
}

/// Checks the header digest at `hdr[hlen..hlen+4]`.
pub fn check_header_digest(hdr: &[u8], hlen: usize) -> Result<(), TermError> {
    let Some(d) = hdr.get(hlen..hlen + DIGEST_LEN) else {
        return Err(TermError::new(Fes::HeaderDigestError));
    };
    let want = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    if crc32c(&hdr[..hlen]) != want {
        return Err(TermError::new(Fes::HeaderDigestError));
    }
    Ok(())
}

/// Initialize connection request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcReq {
    pub pfv: u16,
    /// Host PDU data alignment, 0-based in dwords.
    pub hpda: u8,
    pub digests: Digests,
    /// Maximum outstanding R2Ts per command, 0-based.
    pub maxr2t: u32,
}

/// Initialize connection response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcResp {
    pub pfv: u16,
    /// Controller PDU data alignment, 0-based in dwords.
    pub cpda: u8,
    pub digests: Digests,
    /// Maximum data in one H2CData PDU.
    pub maxh2cdata: u32,
}

fn ic_encode(ty: PduType, pfv: u16, pda: u8, dg: u8, last: u32) -> [u8; IC_LEN] {
    let mut b = [0u8; IC_LEN];
    CommonHeader {
        pdu_type: ty as u8,
        flags: 0,
        hlen: IC_LEN as u8,
        pdo: 0,
        plen: IC_LEN as u32,
    }
    .write(&mut b);
    b[8..10].copy_from_slice(&pfv.to_le_bytes());
    b[10] = pda;
    b[11] = dg;
    b[12..16].copy_from_slice(&last.to_le_bytes());
    b
}

fn ic_fields(b: &[u8]) -> Result<(u16, u8, u8, u32), TermError> {
    if b.len() < IC_LEN {
        return Err(TermError::field(4));
    }
    Ok((
        u16::from_le_bytes([b[8], b[9]]),
        b[10],
        b[11],
        u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
    ))
}

impl IcReq {
    /// Parses a whole ICReq PDU (128 bytes); the common header was checked.
    pub fn parse(b: &[u8]) -> Result<Self, TermError> {
        let (pfv, hpda, dg, maxr2t) = ic_fields(b)?;
        if pfv != crate::PFV {
            return Err(TermError::field(8));
        }
        if hpda > 31 {
            return Err(TermError::field(10));
        }
        if dg & !(DGST_HEADER | DGST_DATA) != 0 {
            return Err(TermError::field(11));
        }
        Ok(IcReq {
            pfv,
            hpda,
            digests: Digests::from_bits(dg),
            maxr2t,
        })
    }

    /// The PDU bytes.
    pub fn encode(&self) -> [u8; IC_LEN] {
        ic_encode(
            PduType::IcReq,
            self.pfv,
            self.hpda,
            self.digests.bits(),
            self.maxr2t,
        )
    }
}

impl IcResp {
    /// Parses a whole ICResp PDU.
    pub fn parse(b: &[u8]) -> Result<Self, TermError> {
        let (pfv, cpda, dg, maxh2cdata) = ic_fields(b)?;
        if pfv != crate::PFV {
            return Err(TermError::field(8));
        }
        if cpda > 31 {
            return Err(TermError::field(10));
        }
        if maxh2cdata < MIN_MAXH2CDATA || maxh2cdata % 4 != 0 {
            return Err(TermError::field(12));
        }
        Ok(IcResp {
            pfv,
            cpda,
            digests: Digests::from_bits(dg),
            maxh2cdata,
        })
    }

    /// The PDU bytes.
    pub fn encode(&self) -> [u8; IC_LEN] {
        ic_encode(
            PduType::IcResp,
            self.pfv,
            self.cpda,
            self.digests.bits(),
            self.maxh2cdata,
        )
    }
}

/// The type-specific header of H2CData, C2HData and R2T.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// Command capsule CID.
    pub cccid: u16,
    /// Transfer tag (H2CData, R2T); reserved in C2HData.
    pub ttag: u16,
    /// Offset of the data in the command's transfer.
    pub offset: u32,
    /// Length of the data.
    pub len: u32,
}

impl DataHeader {
    /// Parses from a PDU header (at least 24 bytes).
    pub fn parse(b: &[u8]) -> Result<Self, TermError> {
        if b.len() < DATA_HLEN {
            return Err(TermError::field(2));
        }
        Ok(DataHeader {
            cccid: u16::from_le_bytes([b[8], b[9]]),
            ttag: u16::from_le_bytes([b[10], b[11]]),
            offset: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
            len: u32::from_le_bytes([b[16], b[17], b[18], b[19]]),
        })
    }

    /// The 16 type-specific bytes.
    pub fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..2].copy_from_slice(&self.cccid.to_le_bytes());
        b[2..4].copy_from_slice(&self.ttag.to_le_bytes());
        b[4..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// A termination request's type-specific fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TermReq {
    pub fes: u16,
    pub fei: u32,
}

impl TermReq {
    /// Parses from a PDU header (at least 24 bytes).
    pub fn parse(b: &[u8]) -> Result<Self, TermError> {
        if b.len() < TERM_HLEN {
            return Err(TermError::field(2));
        }
        Ok(TermReq {
            fes: u16::from_le_bytes([b[8], b[9]]),
            fei: u32::from_le_bytes([b[10], b[11], b[12], b[13]]),
        })
    }
}

/// Appends a termination request PDU of type `ty` to `out`, echoing up to
/// [`TERM_MAX_ECHO`] bytes of the offending header.
pub fn encode_term_req(out: &mut Vec<u8>, ty: PduType, err: TermError, offending: &[u8]) {
    let echo = &offending[..offending.len().min(TERM_MAX_ECHO)];
    let start = out.len();
    out.resize(start + TERM_HLEN, 0);
    let b = &mut out[start..];
    CommonHeader {
        pdu_type: ty as u8,
        flags: 0,
        hlen: TERM_HLEN as u8,
        pdo: 0,
        plen: (TERM_HLEN + echo.len()) as u32,
    }
    .write(b);
    b[8..10].copy_from_slice(&(err.fes as u16).to_le_bytes());
    b[10..14].copy_from_slice(&err.fei.to_le_bytes());
    out.extend_from_slice(echo);
}

/// How a side lays out the PDUs it sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxLayout {
    pub digests: Digests,
    /// Data alignment the peer asked for, 0-based dwords (HPDA or CPDA).
    pub pda: u8,
}

impl TxLayout {
    /// Appends a PDU header (common header, `psh` type-specific bytes, header
    /// digest, padding) for `data_len` bytes of data that the caller sends
    /// next, followed by [`TxLayout::data_digest`] if data digests are on.
    pub fn encode_header(
        &self,
        out: &mut Vec<u8>,
        ty: PduType,
        mut flags: u8,
        psh: &[u8],
        data_len: usize,
    ) {
        let hlen = CH_LEN + psh.len();
        let hdgst = self.digests.header && ty.digests_apply();
        let ddgst = self.digests.data && ty.digests_apply() && data_len > 0;
        let hend = hlen + if hdgst { DIGEST_LEN } else { 0 };
        let pdo = if data_len > 0 {
            let align = (usize::from(self.pda) + 1) * 4;
            hend.div_ceil(align) * align
        } else {
            0
        };
        let plen = if data_len > 0 {
            pdo + data_len + if ddgst { DIGEST_LEN } else { 0 }
        } else {
            hend
        };
        if hdgst {
            flags |= FLAG_HDGSTF;
        }
        if ddgst {
            flags |= FLAG_DDGSTF;
        }
        let start = out.len();
        out.resize(start + CH_LEN, 0);
        CommonHeader {
            pdu_type: ty as u8,
            flags,
            hlen: hlen as u8,
            pdo: pdo as u8,
            plen: plen as u32,
        }
        .write(&mut out[start..]);
        out.extend_from_slice(psh);
        if hdgst {
            let d = crc32c(&out[start..start + hlen]);
            out.extend_from_slice(&d.to_le_bytes());
        }
        if data_len > 0 {
            out.resize(start + pdo, 0);
        }
    }

    /// Whether a data digest must follow the data of a PDU of type `ty`.
    pub fn data_digest(&self, ty: PduType) -> bool {
        self.digests.data && ty.digests_apply()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctrl_limits(digests: Digests) -> RxLimits {
        RxLimits {
            digests,
            controller: true,
            max_incapsule: 8192,
            max_data: 128 * 1024,
        }
    }

    fn hdr(ty: PduType, flags: u8, hlen: u8, pdo: u8, plen: u32) -> CommonHeader {
        CommonHeader {
            pdu_type: ty as u8,
            flags,
            hlen,
            pdo,
            plen,
        }
    }

    #[test]
    fn icreq_roundtrip_and_rejects_bad_fields() {
        let r = IcReq {
            pfv: 0,
            hpda: 0,
            digests: Digests {
                header: true,
                data: false,
            },
            maxr2t: 0,
        };
        let b = r.encode();
        let ch = CommonHeader::parse(&b).unwrap();
        let l = ch.layout(None).unwrap();
        assert_eq!(l.plen, 128);
        assert_eq!(IcReq::parse(&b).unwrap(), r);
        let mut bad = b;
        bad[8] = 1;
        assert_eq!(IcReq::parse(&bad), Err(TermError::field(8)));
        let mut bad = b;
        bad[10] = 32;
        assert_eq!(IcReq::parse(&bad), Err(TermError::field(10)));
    }

    #[test]
    fn bad_header_length_is_invalid_field() {
        let lim = ctrl_limits(Digests::default());
        let e = hdr(PduType::CapsuleCmd, 0, 70, 0, 72).layout(Some(&lim));
        assert_eq!(e, Err(TermError::field(2)));
        let e = hdr(PduType::H2cData, 0, 0, 0, 24).layout(Some(&lim));
        assert_eq!(e, Err(TermError::field(2)));
        // Shorter total length than its header.
        let e = hdr(PduType::CapsuleCmd, 0, 72, 0, 40).layout(Some(&lim));
        assert_eq!(e, Err(TermError::field(4)));
    }

    #[test]
    fn data_offset_past_pdu_is_invalid_field() {
        let lim = ctrl_limits(Digests::default());
        // pdo beyond plen.
        let e = hdr(PduType::CapsuleCmd, 0, 72, 200, 100).layout(Some(&lim));
        assert_eq!(e, Err(TermError::field(3)));
        // pdo inside the header.
        let e = hdr(PduType::CapsuleCmd, 0, 72, 16, 100).layout(Some(&lim));
        assert_eq!(e, Err(TermError::field(3)));
        let ok = hdr(PduType::CapsuleCmd, 0, 72, 72, 100)
            .layout(Some(&lim))
            .unwrap();
        assert_eq!(ok.data_len, 28);
        assert_eq!(ok.data_offset, 72);
    }

    #[test]
    fn data_longer_than_negotiated_is_limit_exceeded() {
        let lim = ctrl_limits(Digests::default());
        let plen = 24 + 128 * 1024 + 4;
        let e = hdr(PduType::H2cData, 0, 24, 24, plen).layout(Some(&lim));
        assert_eq!(e, Err(TermError::new(Fes::DataLimitExceeded)));
        let e = hdr(PduType::CapsuleCmd, 0, 72, 72, 72 + 8192 + 1).layout(Some(&lim));
        assert_eq!(e, Err(TermError::new(Fes::DataLimitExceeded)));
        assert!(hdr(PduType::H2cData, 0, 24, 24, 24 + 128 * 1024)
            .layout(Some(&lim))
            .is_ok());
    }

    #[test]
    fn unknown_or_misdirected_pdu_types_are_rejected() {
        let lim = ctrl_limits(Digests::default());
        let e = hdr(PduType::CapsuleCmd, 0, 72, 0, 72);
        let mut unknown = e;
        unknown.pdu_type = 0x08;
        assert_eq!(unknown.layout(Some(&lim)), Err(TermError::field(0)));
        unknown.pdu_type = 0xff;
        assert_eq!(unknown.layout(Some(&lim)), Err(TermError::field(0)));
        // A controller-to-host PDU sent to the controller.
        let e = hdr(PduType::C2hData, 0, 24, 24, 40).layout(Some(&lim));
        assert_eq!(e, Err(TermError::new(Fes::PduSequenceError)));
        // A second ICReq after setup.
        let e = hdr(PduType::IcReq, 0, 128, 0, 128).layout(Some(&lim));
        assert_eq!(e, Err(TermError::new(Fes::PduSequenceError)));
        // A capsule before setup.
        let e = hdr(PduType::CapsuleCmd, 0, 72, 0, 72).layout(None);
        assert_eq!(e, Err(TermError::new(Fes::PduSequenceError)));
    }

    #[test]
    fn digest_flags_must_match_negotiation() {
        let on = ctrl_limits(Digests {
            header: true,
            data: true,
        });
        let e = hdr(PduType::CapsuleCmd, 0, 72, 0, 76).layout(Some(&on));
        assert_eq!(e, Err(TermError::field(1)));
        let l = hdr(
            PduType::CapsuleCmd,
            FLAG_HDGSTF | FLAG_DDGSTF,
            72,
            76,
            76 + 512 + 4,
        )
        .layout(Some(&on))
        .unwrap();
        assert_eq!(l.data_len, 512);
        assert!(l.hdgst && l.ddgst);
        assert_eq!(l.header_len(), 76);
    }

    #[test]
    fn header_digest_is_checked() {
        let tx = TxLayout {
            digests: Digests {
                header: true,
                data: false,
            },
            pda: 0,
        };
        let mut out = Vec::new();
        tx.encode_header(&mut out, PduType::CapsuleResp, 0, &[7u8; 16], 0);
        assert_eq!(out.len(), 28);
        assert!(check_header_digest(&out, 24).is_ok());
        out[10] ^= 1;
        assert_eq!(
            check_header_digest(&out, 24),
            Err(TermError::new(Fes::HeaderDigestError))
        );
    }

    #[test]
    fn encoded_headers_parse_back_with_padding() {
        let tx = TxLayout {
            digests: Digests {
                header: true,
                data: true,
            },
            pda: 7, // 32-byte alignment
        };
        let mut out = Vec::new();
        let dh = DataHeader {
            cccid: 5,
            ttag: 0,
            offset: 0,
            len: 100,
        };
        tx.encode_header(&mut out, PduType::C2hData, FLAG_DATA_LAST, &dh.bytes(), 100);
        assert_eq!(out.len(), 32);
        let ch = CommonHeader::parse(&out).unwrap();
        let lim = RxLimits {
            digests: tx.digests,
            controller: false,
            max_incapsule: 0,
            max_data: 1 << 20,
        };
        let l = ch.layout(Some(&lim)).unwrap();
        assert_eq!(l.data_offset, 32);
        assert_eq!(l.data_len, 100);
        assert_eq!(l.pad_len(), 4);
        assert_eq!(DataHeader::parse(&out).unwrap(), dh);
    }

    #[test]
    fn term_req_echoes_bounded_header() {
        let mut out = Vec::new();
        encode_term_req(
            &mut out,
            PduType::C2hTermReq,
            TermError::field(3),
            &[0xAA; 300],
        );
        assert_eq!(out.len(), TERM_HLEN + TERM_MAX_ECHO);
        let ch = CommonHeader::parse(&out).unwrap();
        assert_eq!(ch.pdu_type, PduType::C2hTermReq as u8);
        assert_eq!(ch.plen as usize, out.len());
        let t = TermReq::parse(&out).unwrap();
        assert_eq!(t.fes, Fes::InvalidHeaderField as u16);
        assert_eq!(t.fei, 3);
    }
}
