//! An I/O queue on a reactor: many outstanding commands matched by CID, one
//! reader task dispatching responses, C2HData received straight into the
//! caller's buffer, and writes sent in-capsule or through R2T/H2CData from
//! the caller's buffer.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use cairn_bdev::{BdevError, BufResult, IoBuf, IoChannel, IoFuture};
use cairn_nvmf::cmd::{io as op, DsmRange, Sqe};
use cairn_nvmf::digest::crc32c;
use cairn_nvmf::pdu::{
    self, check_header_digest, CommonHeader, DataHeader, PduType, RxLimits, TxLayout, CH_LEN,
    DIGEST_LEN,
};
use cairn_nvmf::{Cqe, Status};
use monoio::net::tcp::TcpOwnedReadHalf;

use super::{status_error, DevInner, InitiatorError};
use crate::target::transport::{RxBuf, SentSink, TxQueue};

#[derive(Default)]
struct Slot {
    active: bool,
    /// The caller dropped the future; free the CID on completion.
    abandoned: bool,
    buf: Option<IoBuf>,
    /// The buffer is queued for sending.
    lent: bool,
    /// An R2T that arrived while the buffer was still lent.
    r2t: Option<DataHeader>,
    cqe: Option<Cqe>,
    waker: Option<Waker>,
}

pub(crate) struct Queue {
    tx: TxQueue,
    layout: TxLayout,
    lim: RxLimits,
    qid: u16,
    nsid: u32,
    block_size: u32,
    /// The namespace's live size, shared with the device.
    num_blocks: Arc<AtomicU64>,
    max_incapsule: usize,
    maxh2cdata: usize,
    max_transfer: usize,
    slots: RefCell<Vec<Slot>>,
    free: RefCell<Vec<u16>>,
    cid_waiters: RefCell<VecDeque<Waker>>,
    dead: Cell<bool>,
    fd: Cell<Option<RawFd>>,
}

struct Sink(std::rc::Weak<Queue>);

impl SentSink for Sink {
    fn buf_sent(&self, tag: u32, buf: IoBuf) {
        if let Some(q) = self.0.upgrade() {
            q.buf_returned(tag as u16, buf);
        }
    }
}

/// How often a channel whose connection dropped tries to reconnect.
const RECONNECT_INTERVAL: Duration = Duration::from_secs(1);

type Reconnect = flume::Receiver<Result<QueueParts, InitiatorError>>;

/// The `IoChannel` of an [`super::NvmfDevice`]. When its connection drops,
/// I/O fails as unavailable while a helper thread reconnects the queue (at
/// most once a second); the reactor itself never blocks on it.
pub struct NvmfChannel {
    q: RefCell<Rc<Queue>>,
    dev: Arc<DevInner>,
    qid: u16,
    pending: RefCell<Option<Reconnect>>,
    last_try: Cell<Option<Instant>>,
}

impl Queue {
    fn buf_returned(&self, cid: u16, buf: IoBuf) {
        let pending_r2t = {
            let mut slots = self.slots.borrow_mut();
            let Some(s) = slots.get_mut(usize::from(cid)) else {
                return;
            };
            s.lent = false;
            s.buf = Some(buf);
            let r = s.r2t.take();
            if r.is_none() {
                self.finish_if_done(s, cid);
            }
            r
        };
        if let Some(r) = pending_r2t {
            self.on_r2t(r);
        }
    }

    fn finish_if_done(&self, s: &mut Slot, cid: u16) {
        if s.cqe.is_some() && !s.lent {
            if s.abandoned {
                *s = Slot::default();
                self.free.borrow_mut().push(cid);
                if let Some(w) = self.cid_waiters.borrow_mut().pop_front() {
                    w.wake();
                }
            } else if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }

    fn fail(&self) {
        if self.dead.replace(true) {
            return;
        }
        self.tx.close();
        for s in self.slots.borrow_mut().iter_mut() {
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
        for w in self.cid_waiters.borrow_mut().drain(..) {
            w.wake();
        }
        self.shutdown_socket();
    }

    fn shutdown_socket(&self) {
        if let Some(fd) = self.fd.take() {
            // SAFETY: the fd stays open until the reader task, which holds
            // the read half, ends; it ends only after this shutdown.
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
            }
        }
    }

    fn push_h2c(&self, cid: u16, buf: IoBuf, r2t: DataHeader) {
        let layout = self.layout;
        let max = self.maxh2cdata;
        let start = r2t.offset as usize;
        let end = start + r2t.len as usize;
        let ok = self.tx.with(|b| {
            let idx = b.add_buf(buf, u32::from(cid));
            let mut off = start;
            while off < end {
                let n = (end - off).min(max);
                let dh = DataHeader {
                    cccid: cid,
                    ttag: r2t.ttag,
                    offset: off as u32,
                    len: n as u32,
                };
                let flags = if off + n == end {
                    pdu::FLAG_DATA_LAST
                } else {
                    0
                };
                b.header(|out| layout.encode_header(out, PduType::H2cData, flags, &dh.bytes(), n));
                b.data(idx, off, off + n);
                if layout.data_digest(PduType::H2cData) {
                    let d = crc32c(&b.buf(idx)[off..off + n]);
                    b.header(|out| out.extend_from_slice(&d.to_le_bytes()));
                }
                off += n;
            }
        });
        if !ok {
            self.fail();
        }
    }

    fn on_r2t(&self, r2t: DataHeader) {
        let cid = r2t.cccid;
        let buf = {
            let mut slots = self.slots.borrow_mut();
            let Some(s) = slots.get_mut(usize::from(cid)).filter(|s| s.active) else {
                drop(slots);
                return self.fail();
            };
            let fits = s
                .buf
                .as_ref()
                .is_some_and(|b| r2t.offset as usize + r2t.len as usize <= b.len());
            if s.lent {
                s.r2t = Some(r2t);
                return;
            }
            if !fits {
                drop(slots);
                return self.fail();
            }
            s.lent = true;
            s.buf.take()
        };
        if let Some(buf) = buf {
            self.push_h2c(cid, buf, r2t);
        }
    }

    async fn acquire(&self) -> Result<u16, BdevError> {
        poll_fn(|cx| {
            if self.dead.get() {
                return Poll::Ready(Err(unavailable()));
            }
            if let Some(cid) = self.free.borrow_mut().pop() {
                return Poll::Ready(Ok(cid));
            }
            self.cid_waiters.borrow_mut().push_back(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Sends one command and waits for its completion. `buf` is the data to
    /// write (`write`) or the buffer to read into; it always comes back.
    async fn submit(
        &self,
        mut sqe: Sqe,
        mut buf: Option<IoBuf>,
        write: bool,
    ) -> (Result<Cqe, BdevError>, Option<IoBuf>) {
        let cid = match self.acquire().await {
            Ok(c) => c,
            Err(e) => return (Err(e), buf),
        };
        sqe.set_cid(cid);
        let len = buf.as_ref().map_or(0, |b| b.len());
        let in_capsule = write && len > 0 && len <= self.max_incapsule;
        sqe.set_sgl(len as u32, in_capsule);
        {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[usize::from(cid)];
            *s = Slot {
                active: true,
                ..Slot::default()
            };
            if in_capsule {
                s.lent = true;
            } else {
                s.buf = buf.take();
            }
        }
        let layout = self.layout;
        let ok = if in_capsule {
            let buf = buf.unwrap_or_else(|| IoBuf::zeroed(0));
            self.tx.with(|b| {
                b.header(|out| layout.encode_header(out, PduType::CapsuleCmd, 0, &sqe.0, len));
                let idx = b.add_buf(buf, u32::from(cid));
                b.data(idx, 0, len);
                if layout.data_digest(PduType::CapsuleCmd) {
                    let d = crc32c(&b.buf(idx)[..len]);
                    b.header(|out| out.extend_from_slice(&d.to_le_bytes()));
                }
            })
        } else {
            self.tx.with(|b| {
                b.header(|out| layout.encode_header(out, PduType::CapsuleCmd, 0, &sqe.0, 0))
            })
        };
        if !ok {
            self.fail();
        }
        let mut guard = Abandon {
            q: self,
            cid,
            done: false,
        };
        let res = poll_fn(|cx| {
            let mut slots = self.slots.borrow_mut();
            let s = &mut slots[usize::from(cid)];
            if !s.lent {
                if let Some(cqe) = s.cqe.take() {
                    return Poll::Ready(Ok((cqe, s.buf.take())));
                }
            }
            if self.dead.get() {
                return Poll::Ready(Err(s.buf.take()));
            }
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        guard.done = true;
        drop(guard);
        match res {
            Ok((cqe, buf)) => {
                self.release(cid);
                (Ok(cqe), buf)
            }
            Err(buf) => {
                // The queue is dead; its CIDs are never reused.
                (Err(unavailable()), buf)
            }
        }
    }

    fn release(&self, cid: u16) {
        self.slots.borrow_mut()[usize::from(cid)] = Slot::default();
        self.free.borrow_mut().push(cid);
        if let Some(w) = self.cid_waiters.borrow_mut().pop_front() {
            w.wake();
        }
    }

    fn on_resp(&self, cqe: Cqe) -> Result<(), &'static str> {
        let mut slots = self.slots.borrow_mut();
        let cid = cqe.cid;
        let Some(s) = slots.get_mut(usize::from(cid)).filter(|s| s.active) else {
            return Err("response for an unknown command");
        };
        s.cqe = Some(cqe);
        self.finish_if_done(s, cid);
        Ok(())
    }

    async fn reader(self: Rc<Self>, mut rd: TcpOwnedReadHalf) {
        let mut rx = RxBuf::new();
        loop {
            if let Err(why) = self.one_pdu(&mut rd, &mut rx).await {
                if !self.dead.get() {
                    tracing::warn!(qid = self.qid, reason = why, "NVMe/TCP queue failed");
                }
                self.fail();
                return;
            }
        }
    }

    async fn one_pdu(&self, rd: &mut TcpOwnedReadHalf, rx: &mut RxBuf) -> Result<(), &'static str> {
        rx.fill(rd, CH_LEN).await.map_err(|_| "connection closed")?;
        let ch = CommonHeader::parse(rx.peek()).map_err(|_| "bad header")?;
        let l = ch.layout(Some(&self.lim)).map_err(|_| "malformed PDU")?;
        let hl = l.header_len();
        rx.fill(rd, hl).await.map_err(|_| "connection closed")?;
        let mut hdr = [0u8; 64];
        if hl > hdr.len() {
            return Err("header too long");
        }
        hdr[..hl].copy_from_slice(&rx.peek()[..hl]);
        if l.hdgst {
            check_header_digest(&hdr[..hl], l.hlen).map_err(|_| "header digest")?;
        }
        rx.consume(hl);
        match l.pdu_type {
            PduType::CapsuleResp => {
                let cqe = Cqe::parse(&hdr[CH_LEN..]).ok_or("short response")?;
                self.on_resp(cqe)
            }
            PduType::R2t => {
                let r = DataHeader::parse(&hdr).map_err(|_| "bad R2T")?;
                self.on_r2t(r);
                Ok(())
            }
            PduType::C2hData => {
                let dh = DataHeader::parse(&hdr).map_err(|_| "bad C2HData")?;
                if dh.len as usize != l.data_len {
                    return Err("C2HData length mismatch");
                }
                let cid = usize::from(dh.cccid);
                let buf = {
                    let mut slots = self.slots.borrow_mut();
                    let s = slots
                        .get_mut(cid)
                        .filter(|s| s.active && !s.lent)
                        .ok_or("C2HData for an unknown command")?;
                    s.buf.take().ok_or("C2HData without a buffer")?
                };
                let off = dh.offset as usize;
                let end = off + l.data_len;
                if end > buf.len() {
                    self.slots.borrow_mut()[cid].buf = Some(buf);
                    return Err("C2HData past the buffer");
                }
                rx.skip(rd, l.pad_len())
                    .await
                    .map_err(|_| "connection closed")?;
                let (r, buf) = rx.read_into(rd, buf, off, end).await;
                let digest_ok = if l.ddgst && r.is_ok() {
                    rx.fill(rd, DIGEST_LEN)
                        .await
                        .map_err(|_| "connection closed")?;
                    let d = rx.peek();
                    let want = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
                    rx.consume(DIGEST_LEN);
                    crc32c(&buf[off..end]) == want
                } else {
                    true
                };
                self.slots.borrow_mut()[cid].buf = Some(buf);
                r.map_err(|_| "connection closed")?;
                if !digest_ok {
                    return Err("data digest mismatch");
                }
                let flags = hdr[1];
                if flags & pdu::FLAG_DATA_SUCCESS != 0 && flags & pdu::FLAG_DATA_LAST != 0 {
                    self.on_resp(Cqe {
                        result: 0,
                        sqhd: 0,
                        sqid: self.qid,
                        cid: dh.cccid,
                        status: Status::SUCCESS,
                    })?;
                }
                Ok(())
            }
            PduType::C2hTermReq => Err("controller terminated the queue"),
            _ => Err("unexpected PDU"),
        }
    }
}

struct Abandon<'a> {
    q: &'a Queue,
    cid: u16,
    done: bool,
}

impl Drop for Abandon<'_> {
    fn drop(&mut self) {
        if !self.done {
            let mut slots = self.q.slots.borrow_mut();
            if let Some(s) = slots.get_mut(usize::from(self.cid)) {
                s.abandoned = true;
                s.waker = None;
            }
        }
    }
}

fn unavailable() -> BdevError {
    BdevError::Unavailable {
        reason: "NVMe/TCP queue disconnected".into(),
    }
}

/// Everything needed to start an I/O queue on the current reactor.
pub(crate) struct QueueParts {
    pub sock: std::net::TcpStream,
    pub layout: TxLayout,
    pub lim: RxLimits,
    pub qid: u16,
    pub nsid: u32,
    pub block_size: u32,
    pub num_blocks: Arc<AtomicU64>,
    pub depth: u16,
    pub max_incapsule: usize,
    pub maxh2cdata: usize,
    pub max_transfer: usize,
}

fn spawn_queue(p: QueueParts) -> Result<Rc<Queue>, BdevError> {
    use std::os::fd::AsRawFd;
    let fd = p.sock.as_raw_fd();
    p.sock
        .set_read_timeout(None)
        .and_then(|()| p.sock.set_write_timeout(None))
        .map_err(|e| BdevError::io("adopting NVMe/TCP queue", e))?;
    let stream = monoio::net::TcpStream::from_std(p.sock)
        .map_err(|e| BdevError::io("adopting NVMe/TCP queue", e))?;
    let (rd, wr) = monoio::io::Splitable::into_split(stream);
    let q = Rc::new(Queue {
        tx: TxQueue::new(),
        layout: p.layout,
        lim: p.lim,
        qid: p.qid,
        nsid: p.nsid,
        block_size: p.block_size,
        num_blocks: p.num_blocks,
        max_incapsule: p.max_incapsule,
        maxh2cdata: p.maxh2cdata.max(4096),
        max_transfer: p.max_transfer,
        slots: RefCell::new((0..p.depth).map(|_| Slot::default()).collect()),
        free: RefCell::new((0..p.depth).rev().collect()),
        cid_waiters: RefCell::new(VecDeque::new()),
        dead: Cell::new(false),
        fd: Cell::new(Some(fd)),
    });
    let sink: Rc<dyn SentSink> = Rc::new(Sink(Rc::downgrade(&q)));
    monoio::spawn(q.tx.clone().run_writer(wr, sink));
    monoio::spawn(q.clone().reader(rd));
    Ok(q)
}

impl NvmfChannel {
    /// Adopts a connected queue on the calling reactor.
    pub(crate) fn start(p: QueueParts, dev: Arc<DevInner>) -> Result<Self, BdevError> {
        let qid = p.qid;
        let q = spawn_queue(p)?;
        Ok(NvmfChannel {
            q: RefCell::new(q),
            dev,
            qid,
            pending: RefCell::new(None),
            last_try: Cell::new(None),
        })
    }

    /// The live queue; while it is dead, drives reconnection without
    /// blocking.
    fn queue(&self) -> Rc<Queue> {
        let q = self.q.borrow().clone();
        if !q.dead.get() {
            return q;
        }
        let done = self.pending.borrow().as_ref().map(|rx| rx.try_recv());
        match done {
            Some(Ok(Ok(parts))) => {
                self.pending.replace(None);
                match spawn_queue(parts) {
                    Ok(nq) => {
                        tracing::info!(qid = self.qid, "NVMe/TCP queue reconnected");
                        self.q.replace(nq.clone());
                        return nq;
                    }
                    Err(e) => tracing::warn!(qid = self.qid, error = %e, "adopting queue failed"),
                }
            }
            Some(Ok(Err(e))) => {
                self.pending.replace(None);
                tracing::debug!(qid = self.qid, error = %e, "queue reconnect failed");
            }
            Some(Err(flume::TryRecvError::Disconnected)) => {
                self.pending.replace(None);
            }
            Some(Err(flume::TryRecvError::Empty)) => {}
            None => {
                let due = self
                    .last_try
                    .get()
                    .is_none_or(|t| t.elapsed() >= RECONNECT_INTERVAL);
                if due {
                    self.last_try.set(Some(Instant::now()));
                    let (tx, rx) = flume::bounded(1);
                    let dev = self.dev.clone();
                    let qid = self.qid;
                    let spawned = std::thread::Builder::new()
                        .name("nvmf-reconnect".into())
                        .spawn(move || {
                            let _ = tx.send(dev.connect_io(qid));
                        });
                    if spawned.is_ok() {
                        self.pending.replace(Some(rx));
                    }
                }
            }
        }
        q
    }

    /// Whether the queue's connection is gone.
    pub fn is_dead(&self) -> bool {
        self.q.borrow().dead.get()
    }

    fn check(&self, lba: u64, blocks: u64) -> Result<(), BdevError> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.queue().num_blocks.load(AtomicOrdering::Acquire) => Ok(()),
            _ => Err(BdevError::OutOfRange {
                lba,
                blocks,
                capacity: self.queue().num_blocks.load(AtomicOrdering::Acquire),
            }),
        }
    }

    fn rw_sqe(&self, opcode: u8, lba: u64, len: usize, fua: bool) -> Result<Sqe, BdevError> {
        let bs = self.queue().block_size as usize;
        if len == 0 || !len.is_multiple_of(bs) {
            return Err(BdevError::Misaligned {
                len,
                block_size: self.queue().block_size,
            });
        }
        if len > self.queue().max_transfer {
            return Err(BdevError::Unsupported {
                op: "transfer larger than the controller's MDTS",
            });
        }
        let blocks = (len / bs) as u64;
        self.check(lba, blocks)?;
        let mut sqe = Sqe::default();
        sqe.set_opcode(opcode);
        sqe.set_nsid(self.queue().nsid);
        sqe.set_cdw(10, lba as u32);
        sqe.set_cdw(11, (lba >> 32) as u32);
        sqe.set_cdw(12, (blocks - 1) as u32 | if fua { 1 << 30 } else { 0 });
        Ok(sqe)
    }

    async fn simple(
        &self,
        sqe: Sqe,
        op_name: &'static str,
        lba: u64,
        blocks: u64,
    ) -> Result<(), BdevError> {
        let (r, _) = self.queue().submit(sqe, None, false).await;
        let cqe = r?;
        status_error(
            cqe.status,
            op_name,
            lba,
            blocks,
            self.queue().num_blocks.load(AtomicOrdering::Acquire),
        )
    }

    async fn zeroes(&self, mut lba: u64, blocks: u64) -> Result<(), BdevError> {
        self.check(lba, blocks)?;
        let end = lba + blocks;
        while lba < end {
            let n = (end - lba).min(65536);
            let mut sqe = Sqe::default();
            sqe.set_opcode(op::WRITE_ZEROES);
            sqe.set_nsid(self.queue().nsid);
            sqe.set_cdw(10, lba as u32);
            sqe.set_cdw(11, (lba >> 32) as u32);
            sqe.set_cdw(12, (n - 1) as u32);
            self.simple(sqe, "write zeroes", lba, n).await?;
            lba += n;
        }
        Ok(())
    }

    async fn dealloc(&self, mut lba: u64, blocks: u64) -> Result<(), BdevError> {
        self.check(lba, blocks)?;
        let end = lba + blocks;
        while lba < end {
            // Up to 256 ranges of up to 2^32-1 blocks per command.
            let mut data = Vec::new();
            let mut n = 0u32;
            let first = lba;
            while lba < end && n < 256 {
                let len = (end - lba).min(u64::from(u32::MAX));
                data.extend_from_slice(
                    &DsmRange {
                        attributes: 0,
                        blocks: len as u32,
                        slba: lba,
                    }
                    .bytes(),
                );
                lba += len;
                n += 1;
            }
            let mut sqe = Sqe::default();
            sqe.set_opcode(op::DSM);
            sqe.set_nsid(self.queue().nsid);
            sqe.set_cdw(10, n - 1);
            sqe.set_cdw(11, 1 << 2);
            let (r, _) = self
                .queue()
                .submit(sqe, Some(IoBuf::from_slice(&data)), true)
                .await;
            status_error(
                r?.status,
                "deallocate",
                first,
                lba - first,
                self.queue().num_blocks.load(AtomicOrdering::Acquire),
            )?;
        }
        Ok(())
    }
}

impl Drop for NvmfChannel {
    fn drop(&mut self) {
        self.q.borrow().fail();
        self.dev.release_qid(self.qid);
    }
}

impl IoChannel for NvmfChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            let sqe = match self.rw_sqe(op::READ, lba, buf.len(), false) {
                Ok(s) => s,
                Err(e) => return (Err(e), buf),
            };
            let blocks = (buf.len() / self.queue().block_size as usize) as u64;
            let fallback_len = buf.len();
            let (r, b) = self.queue().submit(sqe, Some(buf), false).await;
            let b = b.unwrap_or_else(|| IoBuf::zeroed(fallback_len));
            let r = r.and_then(|c| {
                status_error(
                    c.status,
                    "read",
                    lba,
                    blocks,
                    self.queue().num_blocks.load(AtomicOrdering::Acquire),
                )
            });
            (r, b)
        })
    }

    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            let sqe = match self.rw_sqe(op::WRITE, lba, buf.len(), fua) {
                Ok(s) => s,
                Err(e) => return (Err(e), buf),
            };
            let blocks = (buf.len() / self.queue().block_size as usize) as u64;
            let fallback_len = buf.len();
            let (r, b) = self.queue().submit(sqe, Some(buf), true).await;
            let b = b.unwrap_or_else(|| IoBuf::zeroed(fallback_len));
            let r = r.and_then(|c| {
                status_error(
                    c.status,
                    "write",
                    lba,
                    blocks,
                    self.queue().num_blocks.load(AtomicOrdering::Acquire),
                )
            });
            (r, b)
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(async move {
            let mut sqe = Sqe::default();
            sqe.set_opcode(op::FLUSH);
            sqe.set_nsid(self.queue().nsid);
            self.simple(sqe, "flush", 0, 0).await
        })
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.zeroes(lba, blocks))
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.dealloc(lba, blocks))
    }
}
