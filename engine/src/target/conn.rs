//! One NVMe/TCP connection (one queue) on its reactor: connection setup,
//! command capsules, R2T and H2CData for writes, C2HData for reads, and the
//! termination request on a fatal transport error.

use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use cairn_bdev::{IoBuf, IoChannel};
use cairn_nvmf::cmd::{Command, ConnectData, DataDesc, DsmRange, Rw};
use cairn_nvmf::digest::crc32c;
use cairn_nvmf::identify::{check_range, check_rw, NsGeometry};
use cairn_nvmf::pdu::{
    self, check_header_digest, CommonHeader, DataHeader, Fes, IcReq, IcResp, PduType, RxLimits,
    TermError, TxLayout, CH_LEN, DIGEST_LEN,
};
use cairn_nvmf::{Cqe, Sqe, Status};
use monoio::net::tcp::TcpOwnedReadHalf;
use monoio::net::TcpStream;

use super::ctrl::{Controller, Reply};
use super::status::bdev_status;
use super::transport::{BufPool, RxBuf, TxQueue};
use super::{ConnHandle, Shared};

/// In-capsule data the admin queue accepts (the Linux host sends up to 8 KiB).
const ADMIN_INCAPSULE: u32 = 8192;
/// Most DSM ranges a command may carry.
const MAX_DSM_RANGES: u32 = 256;

/// Why a queue stopped.
enum End {
    /// The peer closed or the socket was shut down.
    Closed,
    /// Fatal transport error: send a termination request, then close.
    Term(TermError, Vec<u8>),
}

type Res<T> = Result<T, End>;

fn io_end(_: std::io::Error) -> End {
    End::Closed
}

/// A namespace as one I/O queue sees it.
struct NsChan {
    nsid: u32,
    /// Cached geometry; refreshed from `device` when a command reaches past
    /// its end, so a namespace that grew online is seen without a per-I/O
    /// query.
    geo: std::cell::Cell<NsGeometry>,
    device: Arc<dyn cairn_bdev::BlockDevice>,
    chan: Box<dyn IoChannel>,
}

/// What the I/O tasks of one queue share.
struct IoCtx {
    tx: TxQueue,
    pool: Rc<BufPool>,
    layout: TxLayout,
    qid: u16,
    ns: Vec<NsChan>,
    /// The controller, for its volatile write cache setting.
    ctrl: Arc<Controller>,
}

impl IoCtx {
    fn ns(&self, nsid: u32) -> Option<usize> {
        self.ns.iter().position(|n| n.nsid == nsid)
    }

    /// Geometry of namespace `i` for a command ending at block `end`.
    fn geo(&self, i: usize, end: u64) -> NsGeometry {
        let n = &self.ns[i];
        let g = n.geo.get();
        if end <= g.num_blocks {
            return g;
        }
        let info = n.device.info();
        let fresh = NsGeometry {
            block_size: info.block_size,
            num_blocks: info.num_blocks,
        };
        n.geo.set(fresh);
        fresh
    }
}

/// Queues a response capsule, with read data before it.
fn respond(tx: &TxQueue, layout: &TxLayout, cqe: Cqe, data: Option<(IoBuf, usize)>) {
    let cid = cqe.cid;
    tx.with(|b| {
        if let Some((buf, len)) = data {
            if len > 0 {
                let dh = DataHeader {
                    cccid: cid,
                    ttag: 0,
                    offset: 0,
                    len: len as u32,
                };
                b.header(|out| {
                    layout.encode_header(
                        out,
                        PduType::C2hData,
                        pdu::FLAG_DATA_LAST,
                        &dh.bytes(),
                        len,
                    )
                });
                let idx = b.add_buf(buf, 0);
                b.data(idx, 0, len);
                if layout.data_digest(PduType::C2hData) {
                    let d = crc32c(&b.buf(idx)[..len]);
                    b.header(|out| out.extend_from_slice(&d.to_le_bytes()));
                }
            }
        }
        b.header(|out| layout.encode_header(out, PduType::CapsuleResp, 0, &cqe.bytes(), 0));
    });
}

/// A device operation of an I/O command, ready to run.
enum Op {
    Read {
        ns: usize,
        lba: u64,
        len: usize,
    },
    Write {
        ns: usize,
        lba: u64,
        buf: IoBuf,
        fua: bool,
    },
    Compare {
        ns: usize,
        lba: u64,
        buf: IoBuf,
    },
    Flush {
        ns: Option<usize>,
    },
    Zeroes {
        ns: usize,
        lba: u64,
        blocks: u64,
    },
    Deallocate {
        ns: usize,
        ranges: Vec<DsmRange>,
    },
}

async fn exec(ctx: Rc<IoCtx>, cid: u16, sqhd: u16, op: Op) {
    let (status, data) = match op {
        Op::Read { ns, lba, len } => {
            let buf = ctx.pool.get(len);
            let (r, buf) = ctx.ns[ns].chan.read(lba, buf).await;
            match r {
                Ok(()) => (Status::SUCCESS, Some((buf, len))),
                Err(e) => {
                    ctx.pool.put(buf);
                    (bdev_status(&e), None)
                }
            }
        }
        Op::Write { ns, lba, buf, fua } => {
            // With the volatile write cache off every write is FUA.
            let fua = fua || ctx.ctrl.write_through();
            let (r, buf) = ctx.ns[ns].chan.write(lba, buf, fua).await;
            ctx.pool.put(buf);
            (
                r.map_or_else(|e| bdev_status(&e), |()| Status::SUCCESS),
                None,
            )
        }
        Op::Compare { ns, lba, buf } => {
            let got = ctx.pool.get(buf.len());
            let (r, got) = ctx.ns[ns].chan.read(lba, got).await;
            let st = match r {
                Ok(()) if got.as_slice() == buf.as_slice() => Status::SUCCESS,
                Ok(()) => Status::COMPARE_FAILURE,
                Err(e) => bdev_status(&e),
            };
            ctx.pool.put(got);
            ctx.pool.put(buf);
            (st, None)
        }
        Op::Flush { ns } => {
            let mut st = Status::SUCCESS;
            let all: Vec<usize> = match ns {
                Some(i) => vec![i],
                None => (0..ctx.ns.len()).collect(),
            };
            for i in all {
                if let Err(e) = ctx.ns[i].chan.flush().await {
                    st = bdev_status(&e);
                }
            }
            (st, None)
        }
        Op::Zeroes { ns, lba, blocks } => {
            let mut r = ctx.ns[ns].chan.write_zeroes(lba, blocks).await;
            if r.is_ok() && ctx.ctrl.write_through() {
                r = ctx.ns[ns].chan.flush().await;
            }
            (
                r.map_or_else(|e| bdev_status(&e), |()| Status::SUCCESS),
                None,
            )
        }
        Op::Deallocate { ns, ranges } => {
            let mut st = Status::SUCCESS;
            for r in ranges.iter().filter(|r| r.blocks > 0) {
                if let Err(e) = ctx.ns[ns]
                    .chan
                    .deallocate(r.slba, u64::from(r.blocks))
                    .await
                {
                    st = bdev_status(&e);
                    break;
                }
            }
            if st == Status::SUCCESS && ctx.ctrl.write_through() {
                if let Err(e) = ctx.ns[ns].chan.flush().await {
                    st = bdev_status(&e);
                }
            }
            (st, None)
        }
    };
    let cqe = Cqe {
        result: 0,
        sqhd,
        sqid: ctx.qid,
        cid,
        status,
    };
    respond(&ctx.tx, &ctx.layout, cqe, data);
}

/// A command waiting for its data through R2T.
struct Pending {
    sqe: Sqe,
    cmd: Command,
    buf: IoBuf,
    got: usize,
}

enum State {
    /// Waiting for ICReq.
    Init,
    /// Initialized, waiting for Connect.
    Connecting,
    Admin(Arc<Controller>),
    Io(Arc<Controller>, Rc<IoCtx>),
}

struct Queue {
    pool: Rc<BufPool>,
    shared: Arc<Shared>,
    local: SocketAddr,
    handle: Arc<ConnHandle>,
    tx: TxQueue,
    layout: TxLayout,
    lim: Option<RxLimits>,
    state: State,
    qid: u16,
    sqsize: u16,
    sqhd: u16,
    pending: Vec<Option<Pending>>,
    free_ttags: Vec<u16>,
}

/// Serves one connection until it closes.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    handle: Arc<ConnHandle>,
) {
    let local = stream.local_addr().unwrap_or(shared.local);
    let _ = stream.set_nodelay(true);
    let (mut rd, wr) = monoio::io::Splitable::into_split(stream);
    let tx = TxQueue::new();
    let pool = Rc::new(BufPool::default());
    let writer = monoio::spawn(tx.clone().run_writer(wr, pool.clone()));
    let mut q = Queue {
        shared,
        local,
        handle: handle.clone(),
        tx: tx.clone(),
        pool,
        layout: TxLayout::default(),
        lim: None,
        state: State::Init,
        qid: 0,
        sqsize: 0,
        sqhd: 0,
        pending: Vec::new(),
        free_ttags: Vec::new(),
    };
    let mut rx = RxBuf::new();
    let end = q.run(&mut rd, &mut rx).await;
    if let End::Term(err, hdr) = end {
        tracing::warn!(%peer, fes = ?err.fes, fei = err.fei, "fatal NVMe/TCP error from host, terminating");
        tx.with(|b| b.header(|out| pdu::encode_term_req(out, PduType::C2hTermReq, err, &hdr)));
    }
    tx.close();
    let wr = writer.await;
    q.teardown();
    handle.closed();
    drop(rd);
    drop(wr);
}

impl Queue {
    async fn run(&mut self, rd: &mut TcpOwnedReadHalf, rx: &mut RxBuf) -> End {
        loop {
            if let Err(e) = self.one_pdu(rd, rx).await {
                return e;
            }
            if self.tx.failed() {
                return End::Closed;
            }
        }
    }

    async fn one_pdu(&mut self, rd: &mut TcpOwnedReadHalf, rx: &mut RxBuf) -> Res<()> {
        rx.fill(rd, CH_LEN).await.map_err(io_end)?;
        let ch = CommonHeader::parse(rx.peek()).map_err(|e| End::Term(e, Vec::new()))?;
        let echo = |rx: &RxBuf| rx.peek()[..rx.peek().len().min(pdu::TERM_MAX_ECHO)].to_vec();
        let layout = match ch.layout(self.lim.as_ref()) {
            Ok(l) => l,
            Err(e) => return Err(End::Term(e, echo(rx))),
        };
        let hl = layout.header_len();
        rx.fill(rd, hl).await.map_err(io_end)?;
        let mut hdr = [0u8; pdu::IC_LEN + DIGEST_LEN];
        hdr[..hl].copy_from_slice(&rx.peek()[..hl]);
        if layout.hdgst {
            check_header_digest(&hdr[..hl], layout.hlen).map_err(|e| End::Term(e, echo(rx)))?;
        }
        rx.consume(hl);
        let hdr = &hdr[..layout.hlen];
        match layout.pdu_type {
            PduType::IcReq => self.on_icreq(hdr),
            PduType::CapsuleCmd => {
                let sqe = Sqe::from_slice(&hdr[CH_LEN..])
                    .ok_or_else(|| End::Term(TermError::field(2), hdr.to_vec()))?;
                let mut data = None;
                let mut digest_ok = true;
                if layout.data_len > 0 {
                    rx.skip(rd, layout.pad_len()).await.map_err(io_end)?;
                    let buf = self.pool.get(layout.data_len);
                    let (r, buf) = rx.read_into(rd, buf, 0, layout.data_len).await;
                    r.map_err(io_end)?;
                    if layout.ddgst {
                        digest_ok = read_digest(rd, rx, &buf).await?;
                    }
                    data = Some(buf);
                }
                self.on_capsule(sqe, data, digest_ok);
                Ok(())
            }
            PduType::H2cData => self.on_h2c_data(rd, rx, hdr, &layout).await,
            PduType::H2cTermReq => {
                let t = pdu::TermReq::parse(hdr).ok();
                tracing::info!(fes = ?t.map(|t| t.fes), "host terminated the connection");
                Err(End::Closed)
            }
            _ => Err(End::Term(
                TermError::new(Fes::PduSequenceError),
                hdr.to_vec(),
            )),
        }
    }

    fn on_icreq(&mut self, hdr: &[u8]) -> Res<()> {
        if !matches!(self.state, State::Init) {
            return Err(End::Term(
                TermError::new(Fes::PduSequenceError),
                hdr.to_vec(),
            ));
        }
        let req = IcReq::parse(hdr).map_err(|e| End::Term(e, hdr.to_vec()))?;
        let cfg = &self.shared.cfg;
        let resp = IcResp {
            pfv: cairn_nvmf::PFV,
            cpda: 0,
            digests: req.digests,
            maxh2cdata: cfg.maxh2cdata,
        };
        self.layout = TxLayout {
            digests: req.digests,
            pda: req.hpda,
        };
        self.lim = Some(RxLimits {
            digests: req.digests,
            controller: true,
            max_incapsule: cfg.max_incapsule.max(ADMIN_INCAPSULE),
            max_data: cfg.maxh2cdata,
        });
        self.state = State::Connecting;
        self.tx
            .with(|b| b.header(|out| out.extend_from_slice(&resp.encode())));
        Ok(())
    }

    async fn on_h2c_data(
        &mut self,
        rd: &mut TcpOwnedReadHalf,
        rx: &mut RxBuf,
        hdr: &[u8],
        layout: &pdu::PduLayout,
    ) -> Res<()> {
        let dh = DataHeader::parse(hdr).map_err(|e| End::Term(e, hdr.to_vec()))?;
        let term = |e: TermError| End::Term(e, hdr.to_vec());
        if dh.len as usize != layout.data_len {
            return Err(term(TermError::field(16)));
        }
        let slot = usize::from(dh.ttag);
        let Some(mut p) = self.pending.get_mut(slot).and_then(Option::take) else {
            return Err(term(TermError::field(10)));
        };
        if p.sqe.cid() != dh.cccid {
            return Err(term(TermError::field(8)));
        }
        let off = dh.offset as usize;
        let end = off + layout.data_len;
        if off != p.got || end > p.buf.len() {
            return Err(term(TermError::new(Fes::DataOutOfRange)));
        }
        rx.skip(rd, layout.pad_len()).await.map_err(io_end)?;
        let (r, buf) = rx.read_into(rd, p.buf, off, end).await;
        p.buf = buf;
        r.map_err(io_end)?;
        let mut digest_ok = true;
        if layout.ddgst {
            rx.fill(rd, DIGEST_LEN).await.map_err(io_end)?;
            let d = rx.peek();
            let want = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            rx.consume(DIGEST_LEN);
            digest_ok = crc32c(&p.buf[off..end]) == want;
        }
        p.got = end;
        if !digest_ok {
            self.free_ttags.push(dh.ttag);
            let (cid, sqhd) = (p.sqe.cid(), self.sqhd);
            self.reply(cid, sqhd, Reply::status(Status::TRANSIENT_TRANSPORT));
            return Ok(());
        }
        if p.got == p.buf.len() {
            self.free_ttags.push(dh.ttag);
            if let State::Io(_, ctx) = &self.state {
                let ctx = ctx.clone();
                self.io_with_data(&ctx, p.sqe, p.cmd, p.buf);
            }
        } else {
            self.pending[slot] = Some(p);
        }
        Ok(())
    }

    fn reply(&self, cid: u16, sqhd: u16, r: Reply) {
        let data = r.data.map(|d| {
            let len = d.len();
            (IoBuf::from_slice(&d), len)
        });
        let cqe = Cqe {
            result: r.result,
            sqhd,
            sqid: self.qid,
            cid,
            status: r.status,
        };
        respond(&self.tx, &self.layout, cqe, data);
    }

    fn on_capsule(&mut self, sqe: Sqe, data: Option<IoBuf>, digest_ok: bool) {
        if self.sqsize > 0 {
            self.sqhd = (self.sqhd + 1) % (self.sqsize + 1);
        }
        let cid = sqe.cid();
        let sqhd = self.sqhd;
        if !digest_ok {
            return self.reply(cid, sqhd, Reply::status(Status::TRANSIENT_TRANSPORT));
        }
        let admin = !matches!(self.state, State::Io(..));
        let cmd = match Command::parse(&sqe, admin) {
            Ok(c) => c,
            Err(st) => return self.reply(cid, sqhd, Reply::status(st)),
        };
        match &self.state {
            State::Init => {}
            State::Connecting => {
                let r = match cmd {
                    Command::Connect(c) => self.connect(c, data),
                    _ => Reply::status(Status::COMMAND_SEQUENCE),
                };
                let sqhd = self.sqhd;
                self.reply(cid, sqhd, r);
            }
            State::Admin(ctrl) => {
                let ctrl = ctrl.clone();
                ctrl.admin_sqhd.store(sqhd, Ordering::Release);
                match cmd {
                    Command::Connect(_) => {
                        self.reply(cid, sqhd, Reply::status(Status::COMMAND_SEQUENCE))
                    }
                    Command::AsyncEventRequest => {
                        // Held until an event occurs or the queue closes.
                        if !ctrl.hold_aer(cid) {
                            self.reply(cid, sqhd, Reply::status(Status::AER_LIMIT));
                        }
                        for (cid, dw0) in ctrl.due_events(None) {
                            self.reply(cid, sqhd, Reply::ok(u64::from(dw0)));
                        }
                    }
                    _ => {
                        let desc = DataDesc::from_sqe(&sqe);
                        let mut r = ctrl.admin(&self.shared, self.local, &cmd);
                        if let (Some(d), Ok(desc)) = (r.data.as_mut(), desc) {
                            d.truncate(desc.len as usize);
                        }
                        self.reply(cid, sqhd, r);
                    }
                }
            }
            State::Io(_, ctx) => {
                let ctx = ctx.clone();
                match cmd {
                    Command::Connect(_)
                    | Command::PropertyGet { .. }
                    | Command::PropertySet { .. } => {
                        self.reply(cid, sqhd, Reply::status(Status::COMMAND_SEQUENCE))
                    }
                    Command::Disconnect => self.reply(cid, sqhd, Reply::status(Status::SUCCESS)),
                    _ => self.io_cmd(&ctx, sqe, cmd, data),
                }
            }
        }
    }

    fn io_cmd(&mut self, ctx: &Rc<IoCtx>, sqe: Sqe, cmd: Command, data: Option<IoBuf>) {
        let cid = sqe.cid();
        let sqhd = self.sqhd;
        let desc = match DataDesc::from_sqe(&sqe) {
            Ok(d) => d,
            Err(st) => return self.reply(cid, sqhd, Reply::status(st)),
        };
        let geo = |nsid: u32, slba: u64, blocks: u64| {
            ctx.ns(nsid)
                .map(|i| ctx.geo(i, slba.saturating_add(blocks)))
        };
        let need: Result<u32, Status> = match cmd {
            Command::Read(rw) => {
                check_rw(&rw, geo(rw.nsid, rw.slba, u64::from(rw.blocks)), desc.len).and_then(
                    |len| {
                        if u64::from(len) > self.max_transfer() || desc.in_capsule || data.is_some()
                        {
                            Err(Status::INVALID_FIELD)
                        } else {
                            let i = ctx.ns(rw.nsid).unwrap_or(0);
                            self.spawn(
                                ctx,
                                cid,
                                sqhd,
                                Op::Read {
                                    ns: i,
                                    lba: rw.slba,
                                    len: len as usize,
                                },
                            );
                            Ok(0)
                        }
                    },
                )
            }
            Command::Write(rw) | Command::Compare(rw) => {
                check_rw(&rw, geo(rw.nsid, rw.slba, u64::from(rw.blocks)), desc.len)
            }
            Command::DatasetManagement { nsid, ranges, .. } => match geo(nsid, 0, 0) {
                None => Err(Status::INVALID_NS),
                Some(_) if ranges > MAX_DSM_RANGES => Err(Status::INVALID_FIELD),
                Some(_) if desc.len < ranges * 16 || desc.len > 4096 => {
                    Err(Status::SGL_DATA_LENGTH)
                }
                Some(_) => Ok(desc.len),
            },
            Command::Flush { nsid } => {
                if nsid == u32::MAX {
                    self.spawn(ctx, cid, sqhd, Op::Flush { ns: None });
                    Ok(0)
                } else {
                    match ctx.ns(nsid) {
                        Some(i) => {
                            self.spawn(ctx, cid, sqhd, Op::Flush { ns: Some(i) });
                            Ok(0)
                        }
                        None => Err(Status::INVALID_NS),
                    }
                }
            }
            Command::WriteZeroes {
                nsid, slba, blocks, ..
            } => match ctx.ns(nsid) {
                None => Err(Status::INVALID_NS),
                Some(i) => check_range(
                    slba,
                    u64::from(blocks),
                    ctx.geo(i, slba.saturating_add(u64::from(blocks))),
                )
                .map(|()| {
                    self.spawn(
                        ctx,
                        cid,
                        sqhd,
                        Op::Zeroes {
                            ns: i,
                            lba: slba,
                            blocks: u64::from(blocks),
                        },
                    );
                    0
                }),
            },
            _ => Err(Status::INVALID_OPCODE),
        };
        let len = match need {
            Err(st) => return self.reply(cid, sqhd, Reply::status(st)),
            Ok(0) => return,
            Ok(len) => len,
        };
        if u64::from(len) > self.max_transfer() {
            // Larger than MDTS: refuse before allocating anything.
            return self.reply(cid, sqhd, Reply::status(Status::INVALID_FIELD));
        }
        // A command that needs data from the host.
        match data {
            Some(buf) if buf.len() == len as usize => self.io_with_data(ctx, sqe, cmd, buf),
            Some(_) => self.reply(cid, sqhd, Reply::status(Status::SGL_DATA_LENGTH)),
            None if desc.in_capsule => {
                self.reply(cid, sqhd, Reply::status(Status::SGL_DATA_LENGTH))
            }
            None => self.start_r2t(sqe, cmd, len),
        }
    }

    fn start_r2t(&mut self, sqe: Sqe, cmd: Command, len: u32) {
        let cid = sqe.cid();
        let ttag = match self.free_ttags.pop() {
            Some(t) => t,
            None if self.pending.len() < usize::from(self.sqsize) + 1 => {
                self.pending.push(None);
                (self.pending.len() - 1) as u16
            }
            None => {
                let sqhd = self.sqhd;
                return self.reply(cid, sqhd, Reply::status(Status::INTERNAL));
            }
        };
        self.pending[usize::from(ttag)] = Some(Pending {
            sqe,
            cmd,
            buf: self.pool.get(len as usize),
            got: 0,
        });
        let r2t = DataHeader {
            cccid: cid,
            ttag,
            offset: 0,
            len,
        };
        let layout = self.layout;
        self.tx
            .with(|b| b.header(|out| layout.encode_header(out, PduType::R2t, 0, &r2t.bytes(), 0)));
    }

    fn io_with_data(&mut self, ctx: &Rc<IoCtx>, sqe: Sqe, cmd: Command, buf: IoBuf) {
        let cid = sqe.cid();
        let sqhd = self.sqhd;
        let op = match cmd {
            Command::Write(Rw {
                nsid, slba, fua, ..
            }) => ctx.ns(nsid).map(|ns| Op::Write {
                ns,
                lba: slba,
                buf,
                fua,
            }),
            Command::Compare(Rw { nsid, slba, .. }) => {
                ctx.ns(nsid).map(|ns| Op::Compare { ns, lba: slba, buf })
            }
            Command::DatasetManagement {
                nsid,
                ranges,
                deallocate,
            } => {
                let Some(ns) = ctx.ns(nsid) else {
                    return self.reply(cid, sqhd, Reply::status(Status::INVALID_NS));
                };
                let list = DsmRange::parse_all(&buf, ranges);
                for r in &list {
                    let end = r.slba.saturating_add(u64::from(r.blocks));
                    if let Err(st) = check_range(r.slba, u64::from(r.blocks), ctx.geo(ns, end)) {
                        return self.reply(cid, sqhd, Reply::status(st));
                    }
                }
                if !deallocate {
                    return self.reply(cid, sqhd, Reply::status(Status::SUCCESS));
                }
                Some(Op::Deallocate { ns, ranges: list })
            }
            _ => None,
        };
        match op {
            Some(op) => self.spawn(ctx, cid, sqhd, op),
            None => self.reply(cid, sqhd, Reply::status(Status::INVALID_NS)),
        }
    }

    /// The largest transfer a command may ask for (MDTS; 0 means 16 MiB).
    fn max_transfer(&self) -> u64 {
        match self.shared.cfg.mdts {
            0 => 16 << 20,
            m => 4096u64 << m.min(12),
        }
    }

    fn spawn(&self, ctx: &Rc<IoCtx>, cid: u16, sqhd: u16, op: Op) {
        crate::reactor::spawn_local(exec(ctx.clone(), cid, sqhd, op));
    }

    fn connect(&mut self, c: cairn_nvmf::cmd::Connect, data: Option<IoBuf>) -> Reply {
        let ipo_data = |off: u32| (1u64 << 16) | u64::from(off);
        let Some(data) = data else {
            return Reply::status(Status::SGL_DATA_LENGTH);
        };
        if c.recfmt != 0 {
            return Reply::status(Status::CONNECT_FORMAT);
        }
        let d = match ConnectData::parse(&data) {
            Ok(d) => d,
            Err(off) => {
                return Reply {
                    status: Status::CONNECT_INVALID_PARAM,
                    result: ipo_data(off),
                    data: None,
                }
            }
        };
        let shared = self.shared.clone();
        let invalid_sqe_field = |off: u64| Reply {
            status: Status::CONNECT_INVALID_PARAM,
            result: off,
            data: None,
        };
        if c.sqsize == 0 || c.sqsize >= shared.cfg.queue_depth {
            return invalid_sqe_field(44);
        }
        let now = shared.now_ms();
        let (ctrl, io) = if d.subnqn == cairn_nvmf::DISCOVERY_NQN {
            if c.qid != 0 {
                return invalid_sqe_field(42);
            }
            let ctrl = Arc::new(Controller::new(
                shared.alloc_cntlid(),
                None,
                d.hostnqn,
                c.kato,
                now,
            ));
            (ctrl, None)
        } else {
            let Some(sub) = shared.subsystem(&d.subnqn) else {
                return Reply {
                    status: Status::CONNECT_INVALID_PARAM,
                    result: ipo_data(cairn_nvmf::cmd::CONNECT_DATA_SUBNQN),
                    data: None,
                };
            };
            if !sub.host_allowed(&d.hostnqn) {
                tracing::warn!(host = %d.hostnqn, nqn = %d.subnqn, "host not allowed");
                return Reply {
                    status: Status::CONNECT_INVALID_HOST,
                    result: ipo_data(cairn_nvmf::cmd::CONNECT_DATA_HOSTNQN),
                    data: None,
                };
            }
            if c.qid == 0 {
                let ctrl = Arc::new(Controller::new(
                    shared.alloc_cntlid(),
                    Some(sub.clone()),
                    d.hostnqn,
                    c.kato,
                    now,
                ));
                sub.ctrls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(ctrl.cntlid, ctrl.clone());
                (ctrl, None)
            } else {
                let ctrl = sub
                    .ctrls
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&d.cntlid)
                    .cloned();
                let Some(ctrl) = ctrl.filter(|c| c.hostnqn == d.hostnqn) else {
                    return Reply {
                        status: Status::CONNECT_INVALID_PARAM,
                        result: ipo_data(cairn_nvmf::cmd::CONNECT_DATA_CNTLID),
                        data: None,
                    };
                };
                if !ctrl.ready() {
                    return Reply::status(Status::COMMAND_SEQUENCE);
                }
                if c.qid > ctrl.max_qid(&shared) {
                    return Reply {
                        status: Status::INVALID_QID,
                        result: 42,
                        data: None,
                    };
                }
                let mut ns = Vec::with_capacity(sub.namespaces.len());
                for n in &sub.namespaces {
                    match n.device.open_channel() {
                        Ok(chan) => ns.push(NsChan {
                            nsid: n.nsid,
                            geo: std::cell::Cell::new(NsGeometry {
                                block_size: n.info.block_size,
                                num_blocks: n.info.num_blocks,
                            }),
                            device: n.device.clone(),
                            chan,
                        }),
                        Err(e) => {
                            tracing::warn!(nsid = n.nsid, error = %e, "opening a channel failed");
                            return Reply::status(Status::INTERNAL);
                        }
                    }
                }
                (ctrl, Some(ns))
            }
        };
        {
            let mut qs = ctrl.queues.lock().unwrap_or_else(|e| e.into_inner());
            if qs.contains_key(&c.qid) || ctrl.dead.load(Ordering::Acquire) {
                return Reply {
                    status: Status::INVALID_QID,
                    result: 42,
                    data: None,
                };
            }
            qs.insert(c.qid, self.handle.clone());
        }
        self.qid = c.qid;
        self.sqsize = c.sqsize;
        self.sqhd = 0;
        let max_incapsule = if c.qid == 0 {
            ADMIN_INCAPSULE
        } else {
            shared.cfg.max_incapsule
        };
        if let Some(l) = self.lim.as_mut() {
            l.max_incapsule = max_incapsule;
        }
        let cntlid = ctrl.cntlid;
        match io {
            Some(ns) => {
                let ctx = Rc::new(IoCtx {
                    tx: self.tx.clone(),
                    pool: self.pool.clone(),
                    layout: self.layout,
                    qid: c.qid,
                    ns,
                    ctrl: ctrl.clone(),
                });
                self.state = State::Io(ctrl, ctx);
            }
            None => {
                if c.kato > 0 {
                    monoio::spawn(keep_alive_watch(ctrl.clone(), shared.clone()));
                }
                if ctrl.subsys.is_some() {
                    monoio::spawn(deliver_events(ctrl.clone(), self.tx.clone(), self.layout));
                }
                self.state = State::Admin(ctrl);
            }
        }
        Reply {
            status: Status::SUCCESS,
            result: u64::from(cntlid),
            data: None,
        }
    }

    fn teardown(&mut self) {
        match std::mem::replace(&mut self.state, State::Init) {
            State::Admin(ctrl) => ctrl.kill(),
            State::Io(ctrl, _) => {
                let mut qs = ctrl.queues.lock().unwrap_or_else(|e| e.into_inner());
                if qs
                    .get(&self.qid)
                    .is_some_and(|h| Arc::ptr_eq(h, &self.handle))
                {
                    qs.remove(&self.qid);
                }
            }
            _ => {}
        }
    }
}

async fn read_digest(rd: &mut TcpOwnedReadHalf, rx: &mut RxBuf, data: &[u8]) -> Res<bool> {
    rx.fill(rd, DIGEST_LEN).await.map_err(io_end)?;
    let d = rx.peek();
    let want = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
    rx.consume(DIGEST_LEN);
    Ok(crc32c(data) == want)
}

/// Completes held Async Event Requests when a notice is raised from another
/// thread (a namespace grew), until the controller dies.
async fn deliver_events(ctrl: Arc<Controller>, tx: TxQueue, layout: TxLayout) {
    loop {
        let due = poll_fn(|cx| {
            if ctrl.dead.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
            let due = ctrl.due_events(Some(cx.waker()));
            // Killed after the first check: its wake may have found no waker.
            if ctrl.dead.load(Ordering::Acquire) {
                return Poll::Ready(None);
            }
            if due.is_empty() {
                Poll::Pending
            } else {
                Poll::Ready(Some(due))
            }
        })
        .await;
        let Some(due) = due else { return };
        if tx.failed() {
            return;
        }
        for (cid, dw0) in due {
            let cqe = Cqe {
                result: u64::from(dw0),
                sqhd: ctrl.admin_sqhd.load(Ordering::Acquire),
                sqid: 0,
                cid,
                status: Status::SUCCESS,
            };
            respond(&tx, &layout, cqe, None);
        }
    }
}

/// Drops the controller when no admin command arrives for KATO.
async fn keep_alive_watch(ctrl: Arc<Controller>, shared: Arc<Shared>) {
    loop {
        if ctrl.dead.load(Ordering::Acquire) {
            return;
        }
        let kato = u64::from(ctrl.kato_ms.load(Ordering::Acquire));
        if kato == 0 {
            return;
        }
        let idle = shared
            .now_ms()
            .saturating_sub(ctrl.last_ms.load(Ordering::Acquire));
        if idle >= kato {
            tracing::warn!(
                cntlid = ctrl.cntlid,
                host = %ctrl.hostnqn,
                kato_ms = kato,
                "keep-alive timeout, dropping controller"
            );
            ctrl.kill();
            return;
        }
        monoio::time::sleep(Duration::from_millis(kato - idle)).await;
    }
}
