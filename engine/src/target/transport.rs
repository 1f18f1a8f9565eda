//! Socket plumbing shared by the target and the initiator: a read-ahead
//! receive buffer that hands large data straight to the caller's [`IoBuf`],
//! and a send queue whose single writer task gathers every queued PDU into
//! one vectored write (headers from one byte vector, data from the
//! caller's buffers, no copies).
//!
//! Both live on one reactor thread: they use `Rc`/`RefCell`, never locks.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::rc::Rc;
use std::task::{Poll, Waker};

use cairn_bdev::IoBuf;
use monoio::buf::{IoBufMut, IoVecBuf};
use monoio::io::{AsyncReadRent, AsyncWriteRent};
use monoio::net::tcp::{TcpOwnedReadHalf, TcpOwnedWriteHalf};

/// Size of the receive read-ahead buffer.
const RX_BUF: usize = 64 * 1024;

/// A read-ahead buffer over the read half of a socket.
pub struct RxBuf {
    buf: Option<IoBuf>,
    start: usize,
    end: usize,
}

impl Default for RxBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl RxBuf {
    pub fn new() -> Self {
        RxBuf {
            buf: Some(IoBuf::zeroed(RX_BUF)),
            start: 0,
            end: 0,
        }
    }

    /// The buffered bytes.
    pub fn peek(&self) -> &[u8] {
        match &self.buf {
            Some(b) => &b[self.start..self.end],
            None => &[],
        }
    }

    /// Drops `n` buffered bytes.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads until at least `need` bytes are buffered (`need` <= 64 KiB).
    /// Returns `UnexpectedEof` if the peer closes first.
    pub async fn fill(&mut self, rd: &mut TcpOwnedReadHalf, need: usize) -> io::Result<()> {
        if need > RX_BUF {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "header too long",
            ));
        }
        while self.end - self.start < need {
            let Some(mut b) = self.buf.take() else {
                return Err(io::Error::other("receive buffer lost"));
            };
            if self.end + (need - (self.end - self.start)) > RX_BUF || self.end == RX_BUF {
                b.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            let end = self.end;
            let (res, slice) = rd.read(b.slice_mut(end..RX_BUF)).await;
            self.buf = Some(slice.into_inner());
            match res {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.end += n;
                    crate::reactor::note_activity();
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Fills `buf[range]` with the next bytes of the stream: first from the
    /// read-ahead, then straight from the socket into `buf`.
    pub async fn read_into(
        &mut self,
        rd: &mut TcpOwnedReadHalf,
        mut buf: IoBuf,
        mut at: usize,
        end: usize,
    ) -> (io::Result<()>, IoBuf) {
        let have = (self.end - self.start).min(end - at);
        if have > 0 {
            buf[at..at + have].copy_from_slice(&self.peek()[..have]);
            self.consume(have);
            at += have;
        }
        while at < end {
            let (res, slice) = rd.read(buf.slice_mut(at..end)).await;
            buf = slice.into_inner();
            match res {
                Ok(0) => return (Err(io::ErrorKind::UnexpectedEof.into()), buf),
                Ok(n) => {
                    at += n;
                    crate::reactor::note_activity();
                }
                Err(e) => return (Err(e), buf),
            }
        }
        (Ok(()), buf)
    }

    /// Discards the next `n` bytes of the stream.
    pub async fn skip(&mut self, rd: &mut TcpOwnedReadHalf, mut n: usize) -> io::Result<()> {
        while n > 0 {
            let step = n.min(RX_BUF / 2);
            self.fill(rd, step).await?;
            self.consume(step);
            n -= step;
        }
        Ok(())
    }
}

enum Seg {
    Hdr {
        start: usize,
        end: usize,
    },
    Data {
        idx: usize,
        start: usize,
        end: usize,
    },
}

/// What to do with a data buffer once it has been sent.
pub trait SentSink {
    /// `buf` was queued with `tag` and is on the wire now.
    fn buf_sent(&self, tag: u32, buf: IoBuf);
}

/// Drops sent buffers.
pub struct DropSink;

impl SentSink for DropSink {
    fn buf_sent(&self, _tag: u32, _buf: IoBuf) {}
}

/// One batch of PDUs.
#[derive(Default)]
struct Batch {
    hdr: Vec<u8>,
    segs: Vec<Seg>,
    bufs: Vec<(IoBuf, u32)>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }
}

struct TxState {
    cur: Batch,
    spare: Batch,
    waker: Option<Waker>,
    closed: bool,
    /// Set when the socket failed: producers stop queueing.
    failed: bool,
}

/// The send side of a connection: producers queue PDUs, one writer task
/// sends everything queued so far in one vectored write.
#[derive(Clone)]
pub struct TxQueue {
    st: Rc<RefCell<TxState>>,
}

impl Default for TxQueue {
    fn default() -> Self {
        Self::new()
    }
}

/// Appends PDUs to the current batch; dropped at the end of a
/// [`TxQueue::with`] call, which wakes the writer.
pub struct TxBatch<'a> {
    b: &'a mut Batch,
}

impl TxBatch<'_> {
    /// Appends header bytes written by `f`.
    pub fn header(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        let start = self.b.hdr.len();
        f(&mut self.b.hdr);
        let end = self.b.hdr.len();
        if end == start {
            return;
        }
        if let Some(Seg::Hdr { end: e, .. }) = self.b.segs.last_mut() {
            if *e == start {
                *e = end;
                return;
            }
        }
        self.b.segs.push(Seg::Hdr { start, end });
    }

    /// Hands `buf` to the queue; returns its index for [`TxBatch::data`].
    pub fn add_buf(&mut self, buf: IoBuf, tag: u32) -> usize {
        self.b.bufs.push((buf, tag));
        self.b.bufs.len() - 1
    }

    /// The bytes of buffer `idx` in `start..end`.
    pub fn buf(&self, idx: usize) -> &[u8] {
        &self.b.bufs[idx].0
    }

    /// Sends `start..end` of buffer `idx` next.
    pub fn data(&mut self, idx: usize, start: usize, end: usize) {
        if end > start {
            self.b.segs.push(Seg::Data { idx, start, end });
        }
    }
}

impl TxQueue {
    pub fn new() -> Self {
        TxQueue {
            st: Rc::new(RefCell::new(TxState {
                cur: Batch::default(),
                spare: Batch::default(),
                waker: None,
                closed: false,
                failed: false,
            })),
        }
    }

    /// Queues PDUs; returns false (and queues nothing) if the queue is
    /// closed or the socket failed.
    pub fn with(&self, f: impl FnOnce(&mut TxBatch<'_>)) -> bool {
        let mut st = self.st.borrow_mut();
        if st.closed || st.failed {
            return false;
        }
        f(&mut TxBatch { b: &mut st.cur });
        if let Some(w) = st.waker.take() {
            w.wake();
        }
        true
    }

    /// Stops accepting PDUs; the writer sends what is queued and ends.
    pub fn close(&self) {
        let mut st = self.st.borrow_mut();
        st.closed = true;
        if let Some(w) = st.waker.take() {
            w.wake();
        }
    }

    /// Whether the writer failed to send.
    pub fn failed(&self) -> bool {
        self.st.borrow().failed
    }

    async fn next_batch(&self) -> Option<Batch> {
        poll_fn(|cx| {
            let mut st = self.st.borrow_mut();
            if !st.cur.is_empty() {
                let spare = std::mem::take(&mut st.spare);
                return Poll::Ready(Some(std::mem::replace(&mut st.cur, spare)));
            }
            if st.closed {
                return Poll::Ready(None);
            }
            st.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// The writer task body: sends batches until closed or the socket fails,
    /// then gives the write half back.
    pub async fn run_writer(
        self,
        mut wr: TcpOwnedWriteHalf,
        sink: Rc<dyn SentSink>,
    ) -> TcpOwnedWriteHalf {
        let mut iov_spare: Vec<libc::iovec> = Vec::new();
        while let Some(batch) = self.next_batch().await {
            let mut out = Gather::new(batch, std::mem::take(&mut iov_spare));
            let mut ok = true;
            while out.remaining() > 0 {
                let (res, o) = wr.writev(out).await;
                out = o;
                match res {
                    Ok(0) | Err(_) => {
                        ok = false;
                        break;
                    }
                    Ok(n) => out.advance(n),
                }
            }
            crate::reactor::note_activity();
            let Gather { mut batch, iov, .. } = out;
            iov_spare = iov;
            for (buf, tag) in batch.bufs.drain(..) {
                sink.buf_sent(tag, buf);
            }
            batch.hdr.clear();
            batch.segs.clear();
            let mut st = self.st.borrow_mut();
            st.spare = batch;
            if !ok {
                st.failed = true;
                // Give queued buffers back too; nothing more will be sent.
                let mut cur = std::mem::take(&mut st.cur);
                drop(st);
                for (buf, tag) in cur.bufs.drain(..) {
                    sink.buf_sent(tag, buf);
                }
                break;
            }
        }
        wr
    }
}

/// A batch laid out as iovecs for one `writev`.
struct Gather {
    batch: Batch,
    iov: Vec<libc::iovec>,
    pos: usize,
    remaining: usize,
}

impl Gather {
    fn new(batch: Batch, mut iov: Vec<libc::iovec>) -> Self {
        iov.clear();
        let mut remaining = 0;
        for s in &batch.segs {
            let (ptr, len) = match *s {
                Seg::Hdr { start, end } => (batch.hdr[start..end].as_ptr(), end - start),
                Seg::Data { idx, start, end } => {
                    (batch.bufs[idx].0[start..end].as_ptr(), end - start)
                }
            };
            remaining += len;
            iov.push(libc::iovec {
                iov_base: ptr as *mut libc::c_void,
                iov_len: len,
            });
        }
        Gather {
            batch,
            iov,
            pos: 0,
            remaining,
        }
    }

    fn remaining(&self) -> usize {
        self.remaining
    }

    fn advance(&mut self, mut n: usize) {
        self.remaining -= n.min(self.remaining);
        while n > 0 && self.pos < self.iov.len() {
            let v = &mut self.iov[self.pos];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.pos += 1;
            } else {
                // SAFETY: n < iov_len, so the new base stays inside the
                // segment the iovec describes.
                v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
                v.iov_len -= n;
                n = 0;
            }
        }
    }
}

// SAFETY: the iovecs point into `batch.hdr` and the heap allocations of
// `batch.bufs`, which Gather owns and does not touch while the runtime owns
// it; neither the iovec array nor the memory it describes moves when the
// Gather value moves. `pos..` are valid iovecs.
unsafe impl IoVecBuf for Gather {
    fn read_iovec_ptr(&self) -> *const libc::iovec {
        self.iov[self.pos..].as_ptr()
    }

    fn read_iovec_len(&self) -> usize {
        // Linux caps a writev at IOV_MAX (1024) segments; the caller loops.
        (self.iov.len() - self.pos).min(1024)
    }
}

/// Buffers kept per size class (4 KiB .. 1 MiB, powers of two).
const POOL_CLASSES: usize = 9;
/// Buffers kept per class.
const POOL_DEPTH: usize = 128;

/// A reactor-local free list of I/O buffers, so the data path does not
/// allocate (and the allocator does not fault pages in) per command.
/// Buffers come back with stale contents; every user fills the whole length
/// before reading it.
#[derive(Default)]
pub struct BufPool {
    classes: RefCell<[Vec<IoBuf>; POOL_CLASSES]>,
}

impl BufPool {
    fn class(cap: usize) -> Option<usize> {
        if cap < cairn_bdev::buf::ALIGN || !cap.is_power_of_two() {
            return None;
        }
        let c = (cap / cairn_bdev::buf::ALIGN).trailing_zeros() as usize;
        (c < POOL_CLASSES).then_some(c)
    }

    /// A buffer of `len` bytes (contents unspecified).
    pub fn get(&self, len: usize) -> IoBuf {
        let cap = len.max(1).next_power_of_two().max(cairn_bdev::buf::ALIGN);
        if let Some(c) = Self::class(cap) {
            if let Some(mut b) = self.classes.borrow_mut()[c].pop() {
                b.set_len(len);
                return b;
            }
            let mut b = IoBuf::zeroed(cap);
            b.set_len(len);
            return b;
        }
        IoBuf::zeroed(len)
    }

    /// Gives a buffer back.
    pub fn put(&self, buf: IoBuf) {
        if let Some(c) = Self::class(buf.capacity()) {
            let mut classes = self.classes.borrow_mut();
            if classes[c].len() < POOL_DEPTH {
                classes[c].push(buf);
            }
        }
    }
}

impl SentSink for BufPool {
    fn buf_sent(&self, _tag: u32, buf: IoBuf) {
        self.put(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_reuses_by_size_class() {
        let p = BufPool::default();
        let b = p.get(4096);
        let ptr = b.as_ptr();
        assert_eq!(b.len(), 4096);
        p.put(b);
        let b = p.get(512);
        assert_eq!(b.as_ptr(), ptr, "a 4 KiB buffer serves a 512-byte request");
        assert_eq!(b.len(), 512);
        let big = p.get(3 << 20);
        assert_eq!(big.len(), 3 << 20);
        p.put(big); // beyond the classes: dropped
        assert!(p.classes.borrow().iter().all(|c| c.is_empty()));
    }
}
