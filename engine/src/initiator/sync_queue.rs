//! A blocking NVMe/TCP queue over a std socket: connection setup (ICReq and
//! Connect) for every queue, and the admin queue's few, small commands.
//! Used from control threads; an I/O queue is handed to a reactor right
//! after its Connect.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use cairn_nvmf::cmd::{fabrics, ConnectData, Sqe};
use cairn_nvmf::digest::crc32c;
use cairn_nvmf::pdu::{
    self, check_header_digest, CommonHeader, DataHeader, Digests, IcReq, IcResp, PduType, RxLimits,
    TxLayout, CH_LEN,
};
use cairn_nvmf::{Cqe, Status};

use super::InitiatorError;

/// Largest response data the admin queue accepts.
const MAX_ADMIN_DATA: u32 = 1 << 20;

pub(crate) struct SyncQueue {
    pub sock: TcpStream,
    pub layout: TxLayout,
    pub lim: RxLimits,
    pub maxh2cdata: u32,
    pub qid: u16,
    next_cid: u16,
}

fn io_err(e: std::io::Error) -> InitiatorError {
    InitiatorError::Io(e)
}

impl SyncQueue {
    /// Connects a TCP socket, exchanges ICReq/ICResp and sends Connect;
    /// returns the queue and the controller id.
    #[allow(clippy::too_many_arguments)] // the Connect command's own fields
    pub fn connect(
        addr: SocketAddr,
        timeout: Duration,
        digests: Digests,
        qid: u16,
        sqsize: u16,
        kato_ms: u32,
        data: &ConnectData,
    ) -> Result<(SyncQueue, u16), InitiatorError> {
        let sock = TcpStream::connect_timeout(&addr, timeout).map_err(io_err)?;
        sock.set_nodelay(true).map_err(io_err)?;
        sock.set_read_timeout(Some(timeout)).map_err(io_err)?;
        sock.set_write_timeout(Some(timeout)).map_err(io_err)?;
        let mut q = SyncQueue {
            sock,
            layout: TxLayout::default(),
            lim: RxLimits {
                digests: Digests::default(),
                controller: false,
                max_incapsule: 0,
                max_data: MAX_ADMIN_DATA.max(16 << 20),
            },
            maxh2cdata: 0,
            qid,
            next_cid: 0,
        };
        let req = IcReq {
            pfv: cairn_nvmf::PFV,
            hpda: 0,
            digests,
            maxr2t: 0,
        };
        q.sock.write_all(&req.encode()).map_err(io_err)?;
        let mut b = [0u8; pdu::IC_LEN];
        q.sock.read_exact(&mut b).map_err(io_err)?;
        let ch = CommonHeader::parse(&b)?;
        let l = ch.layout(None)?;
        if l.pdu_type != PduType::IcResp {
            return Err(InitiatorError::Protocol("expected ICResp"));
        }
        let resp = IcResp::parse(&b)?;
        q.layout = TxLayout {
            digests: resp.digests,
            pda: resp.cpda,
        };
        q.lim.digests = resp.digests;
        q.maxh2cdata = resp.maxh2cdata;
        let mut sqe = Sqe::default();
        sqe.set_opcode(fabrics::OPCODE);
        sqe.0[4] = fabrics::CONNECT;
        sqe.0[42..44].copy_from_slice(&qid.to_le_bytes());
        sqe.0[44..46].copy_from_slice(&sqsize.to_le_bytes());
        sqe.0[48..52].copy_from_slice(&kato_ms.to_le_bytes());
        let (cqe, _) = q.submit(sqe, Some(&data.encode()), 0)?;
        if !cqe.status.is_success() {
            return Err(InitiatorError::Connect {
                status: cqe.status,
                result: cqe.result as u32,
            });
        }
        Ok((q, cqe.result as u16))
    }

    /// Sends one command and waits for its completion; `data_in` bytes of
    /// response data are collected.
    pub fn submit(
        &mut self,
        mut sqe: Sqe,
        data_out: Option<&[u8]>,
        data_in: usize,
    ) -> Result<(Cqe, Vec<u8>), InitiatorError> {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        sqe.set_cid(cid);
        let out_len = data_out.map_or(0, <[u8]>::len);
        if out_len > 0 {
            sqe.set_sgl(out_len as u32, true);
        } else {
            sqe.set_sgl(data_in as u32, false);
        }
        let mut wire = Vec::with_capacity(128 + out_len);
        self.layout
            .encode_header(&mut wire, PduType::CapsuleCmd, 0, &sqe.0, out_len);
        if let Some(d) = data_out.filter(|d| !d.is_empty()) {
            wire.extend_from_slice(d);
            if self.layout.data_digest(PduType::CapsuleCmd) {
                wire.extend_from_slice(&crc32c(d).to_le_bytes());
            }
        }
        self.sock.write_all(&wire).map_err(io_err)?;
        let mut data = vec![0u8; data_in];
        loop {
            let (ty, hdr, payload) = self.read_pdu()?;
            match ty {
                PduType::CapsuleResp => {
                    let cqe = Cqe::parse(&hdr[CH_LEN..])
                        .ok_or(InitiatorError::Protocol("short response"))?;
                    if cqe.cid == cid {
                        return Ok((cqe, data));
                    }
                }
                PduType::C2hData => {
                    let dh = DataHeader::parse(&hdr)?;
                    let off = dh.offset as usize;
                    let end = off + payload.len();
                    if dh.cccid != cid || end > data.len() {
                        return Err(InitiatorError::Protocol("C2HData out of range"));
                    }
                    data[off..end].copy_from_slice(&payload);
                    if hdr[1] & pdu::FLAG_DATA_SUCCESS != 0 && hdr[1] & pdu::FLAG_DATA_LAST != 0 {
                        let cqe = Cqe {
                            result: 0,
                            sqhd: 0,
                            sqid: self.qid,
                            cid,
                            status: Status::SUCCESS,
                        };
                        return Ok((cqe, data));
                    }
                }
                PduType::C2hTermReq => {
                    return Err(InitiatorError::Protocol("controller terminated the queue"))
                }
                _ => return Err(InitiatorError::Protocol("unexpected PDU")),
            }
        }
    }

    fn read_pdu(&mut self) -> Result<(PduType, Vec<u8>, Vec<u8>), InitiatorError> {
        let mut ch = [0u8; CH_LEN];
        self.sock.read_exact(&mut ch).map_err(io_err)?;
        let l = CommonHeader::parse(&ch)?.layout(Some(&self.lim))?;
        let mut hdr = vec![0u8; l.header_len()];
        hdr[..CH_LEN].copy_from_slice(&ch);
        self.sock.read_exact(&mut hdr[CH_LEN..]).map_err(io_err)?;
        if l.hdgst {
            check_header_digest(&hdr, l.hlen)?;
        }
        let mut payload = Vec::new();
        if l.data_len > 0 {
            let mut rest = vec![0u8; l.plen - l.header_len()];
            self.sock.read_exact(&mut rest).map_err(io_err)?;
            let d = &rest[l.pad_len()..l.pad_len() + l.data_len];
            if l.ddgst {
                let g = &rest[l.pad_len() + l.data_len..];
                let want = u32::from_le_bytes([g[0], g[1], g[2], g[3]]);
                if crc32c(d) != want {
                    return Err(InitiatorError::Protocol("data digest mismatch"));
                }
            }
            payload = d.to_vec();
        }
        hdr.truncate(l.hlen);
        Ok((l.pdu_type, hdr, payload))
    }
}
