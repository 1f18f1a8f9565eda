//! A nexus's I/O path on one reactor.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_bdev::{BdevError, BufResult, IoBuf, IoChannel, IoFuture};
use futures::future::join_all;

use super::locks::WriteHold;
use super::{is_child_failure, no_child, Child, ChildState, Shared};

/// How often I/O that waits for a healthy child looks again.
const PAUSE_POLL: Duration = Duration::from_millis(10);

/// One child's channel on this reactor.
struct Leg {
    child: Arc<Child>,
    ch: Box<dyn IoChannel>,
    /// Reads outstanding on this leg from this channel.
    outstanding: Cell<u32>,
}

type Legs = Rc<Vec<Rc<Leg>>>;

pub(crate) struct NexusChannel {
    sh: Arc<Shared>,
    legs: RefCell<Legs>,
    /// The nexus generation `legs` was opened for.
    generation: Cell<u64>,
    next: Cell<usize>,
}

/// A write in flight: counted in its epoch (so a rebuild can wait for it)
/// and, while a rebuild runs, holding its segments.
struct Ticket<'a> {
    sh: &'a Shared,
    slot: usize,
    _hold: Option<WriteHold<'a>>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.sh.inflight[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one leg of a mirrored operation did.
struct Outcome {
    leg: Rc<Leg>,
    /// The child was healthy (not rebuilding) when the I/O was sent.
    healthy: bool,
    result: Result<(), BdevError>,
}

fn timed_out(after: Duration) -> BdevError {
    BdevError::Unavailable {
        reason: format!("no answer within {after:?}"),
    }
}

impl NexusChannel {
    pub(crate) fn open(sh: Arc<Shared>) -> Result<Self, BdevError> {
        let ch = NexusChannel {
            sh,
            legs: RefCell::new(Rc::new(Vec::new())),
            generation: Cell::new(0),
            next: Cell::new(0),
        };
        if !ch
            .legs()
            .iter()
            .any(|l| l.child.state() == ChildState::Healthy)
        {
            return Err(no_child());
        }
        Ok(ch)
    }

    /// The legs for the nexus's current children, reopened when the set
    /// changed.
    fn legs(&self) -> Legs {
        loop {
            let g = self.sh.generation.load(Ordering::SeqCst);
            if g == self.generation.get() {
                return self.legs.borrow().clone();
            }
            self.refresh();
            self.generation.set(g);
        }
    }

    fn refresh(&self) {
        let children = self.sh.children();
        let old = self.legs.borrow().clone();
        let mut legs = Vec::with_capacity(children.len());
        for c in children.iter() {
            if c.state() == ChildState::Faulted {
                continue;
            }
            if let Some(l) = old.iter().find(|l| Arc::ptr_eq(&l.child, c)) {
                legs.push(l.clone());
                continue;
            }
            match c.device.open_channel() {
                Ok(ch) => legs.push(Rc::new(Leg {
                    child: c.clone(),
                    ch,
                    outstanding: Cell::new(0),
                })),
                Err(e) => {
                    self.sh
                        .fault_io(c, &format!("opening an I/O channel failed: {e}"));
                }
            }
        }
        *self.legs.borrow_mut() = Rc::new(legs);
    }

    /// Runs a child's I/O, bounded by the I/O timeout for remote children
    /// (local ones rely on the kernel's own timeouts).
    async fn timed<T>(&self, leg: &Leg, fut: impl Future<Output = T>) -> Option<T> {
        if leg.child.local {
            return Some(fut.await);
        }
        // Boxed: a timer is large, and keeping it out of line keeps every
        // nexus I/O future small enough for the allocator's fast path.
        Box::pin(monoio::time::timeout(self.sh.cfg.io_timeout, fut))
            .await
            .ok()
    }

    /// Counts a write in its epoch, so that a rebuild starting now waits
    /// for it; takes no segment locks.
    fn enter_write(&self) -> Ticket<'_> {
        let sh = &*self.sh;
        let slot = loop {
            let e = sh.epoch.load(Ordering::SeqCst);
            let slot = (e & 1) as usize;
            sh.inflight[slot].fetch_add(1, Ordering::SeqCst);
            if sh.epoch.load(Ordering::SeqCst) == e {
                break slot;
            }
            sh.inflight[slot].fetch_sub(1, Ordering::SeqCst);
        };
        Ticket {
            sh,
            slot,
            _hold: None,
        }
    }

    async fn begin_write(&self, first: u64, last: u64) -> Ticket<'_> {
        let mut ticket = self.enter_write();
        if self.sh.rebuilding.load(Ordering::SeqCst) > 0 {
            // Boxed, as every rare path here: see `timed`.
            ticket._hold = Some(Box::pin(self.sh.locks.write(first, last)).await);
        }
        ticket
    }

    /// The leg of a nexus whose only child is healthy and local: most I/O
    /// takes this path, which skips the general one's bookkeeping (no
    /// choice of child, no fan-out, no timer).
    fn sole_local_leg(&self) -> Option<Rc<Leg>> {
        let legs = self.legs();
        match legs.as_slice() {
            [leg] if leg.child.local && leg.child.state() == ChildState::Healthy => {
                Some(leg.clone())
            }
            _ => None,
        }
    }

    /// Folds a mirrored operation's outcomes. The one rule that keeps the
    /// legs alike: a child that fails a mutation another healthy child took
    /// no longer holds what the mirror answers, so it is faulted, whatever
    /// its error (an I/O error, or a request error such as no space on an
    /// over-committed pool); the operation succeeds from the others. When
    /// no healthy child took it, the error is the host's: a request error
    /// (out of range, no space) as is, and a rebuilding child that took it
    /// anyway gets the segments back in its stale map and is faulted.
    /// Children that did not take a write get its segments in their stale
    /// map before the write is acknowledged, and the acknowledgement waits
    /// for the health record of any child this write faulted.
    async fn settle(
        &self,
        outcomes: &mut [Outcome],
        segments: Option<(u64, u64)>,
    ) -> Result<(), BdevError> {
        if let Some((first, last)) = segments {
            let took_it = outcomes.iter().filter(|o| o.result.is_ok()).count();
            // Every child took it (the common case) unless fewer legs
            // succeeded than there are children.
            if took_it < self.sh.child_count.load(Ordering::SeqCst) {
                let took = |c: &Arc<Child>| {
                    outcomes
                        .iter()
                        .any(|o| o.result.is_ok() && Arc::ptr_eq(&o.leg.child, c))
                };
                for c in self.sh.children().iter().filter(|c| !took(c)) {
                    c.mark_stale(first, last);
                }
            }
        }
        let ok = outcomes.iter().any(|o| o.healthy && o.result.is_ok());
        let mut request_error = None;
        let mut last = None;
        for o in outcomes.iter_mut() {
            match std::mem::replace(&mut o.result, Ok(())) {
                Ok(()) if !ok && !o.healthy && segments.is_some() => {
                    // A rebuilding child took a write the healthy set did
                    // not: it must not keep it.
                    if let Some((first, last)) = segments {
                        o.leg.child.mark_stale(first, last);
                    }
                    self.sh
                        .fault(&o.leg.child, "took a write the healthy children failed");
                }
                Ok(()) => {}
                Err(e) if is_child_failure(&e) || ok => {
                    self.sh.fault_io(&o.leg.child, &e.to_string());
                    last = Some(e);
                }
                Err(e) => request_error = Some(e),
            }
        }
        match (request_error, ok) {
            (Some(e), _) => Err(e),
            (None, true) if self.sh.health_pending() => Box::pin(self.sh.health_settled()).await,
            (None, true) => Ok(()),
            (None, false) => Err(last.unwrap_or_else(no_child)),
        }
    }

    /// The legs a mutation goes to (healthy and rebuilding children), with
    /// whether each was healthy.
    fn targets(legs: &Legs) -> Vec<(Rc<Leg>, bool)> {
        legs.iter()
            .filter_map(|l| match l.child.state() {
                ChildState::Healthy => Some((l.clone(), true)),
                ChildState::Rebuilding => Some((l.clone(), false)),
                ChildState::Faulted => None,
            })
            .collect()
    }

    /// Sends an operation without a buffer to every target leg.
    async fn mutate<F>(&self, segments: Option<(u64, u64)>, op: F) -> Result<(), BdevError>
    where
        F: for<'a> Fn(&'a dyn IoChannel) -> IoFuture<'a, Result<(), BdevError>>,
    {
        let _ticket = match segments {
            Some((first, last)) => Some(self.begin_write(first, last).await),
            None => None,
        };
        let legs = self.legs();
        let targets = Self::targets(&legs);
        let futs = targets.into_iter().map(|(leg, healthy)| {
            let op = &op;
            async move {
                let result = match self.timed(&leg, op(leg.ch.as_ref())).await {
                    Some(r) => r,
                    None => Err(timed_out(self.sh.cfg.io_timeout)),
                };
                Outcome {
                    leg,
                    healthy,
                    result,
                }
            }
        });
        let outcomes = join_all(futs).await;
        let mut outcomes = outcomes;
        self.settle(&mut outcomes, segments).await
    }

    async fn read_once(&self, lba: u64, buf: IoBuf) -> BufResult {
        let legs = self.legs();
        let len = buf.len();
        if let [leg] = legs.as_slice() {
            // One child: read from it if it is healthy.
            if leg.child.state() != ChildState::Healthy {
                return (Err(no_child()), buf);
            }
            let e = match self.timed(leg, leg.ch.read(lba, buf)).await {
                Some((Err(e), b)) if is_child_failure(&e) => (e, b),
                Some(r) => return r,
                None => (timed_out(self.sh.cfg.io_timeout), IoBuf::zeroed(len)),
            };
            self.sh.fault_io(&leg.child, &e.0.to_string());
            return (Err(e.0), e.1);
        }
        let mut buf = buf;
        let mut tried = 0u64;
        let mut last = None;
        loop {
            // The healthy leg with the fewest reads outstanding, local
            // first on a tie, rotating the start for fairness.
            let n = legs.len().min(64);
            let start = self.next.get();
            self.next.set(start.wrapping_add(1));
            let mut best: Option<usize> = None;
            for k in 0..n {
                let i = (start + k) % n;
                let l = &legs[i];
                if tried & (1 << i) != 0 || l.child.state() != ChildState::Healthy {
                    continue;
                }
                let key = (l.outstanding.get(), !l.child.local);
                best = match best {
                    Some(b) if (legs[b].outstanding.get(), !legs[b].child.local) <= key => Some(b),
                    _ => Some(i),
                };
            }
            let Some(i) = best else {
                return (Err(last.unwrap_or_else(no_child)), buf);
            };
            tried |= 1 << i;
            let leg = &legs[i];
            leg.outstanding.set(leg.outstanding.get() + 1);
            let res = self.timed(leg, leg.ch.read(lba, buf)).await;
            leg.outstanding.set(leg.outstanding.get() - 1);
            let e = match res {
                Some((Ok(()), b)) => return (Ok(()), b),
                Some((Err(e), b)) if is_child_failure(&e) => {
                    buf = b;
                    e
                }
                Some((Err(e), b)) => return (Err(e), b),
                None => {
                    buf = IoBuf::zeroed(len);
                    timed_out(self.sh.cfg.io_timeout)
                }
            };
            self.sh.fault_io(&leg.child, &e.to_string());
            last = Some(e);
        }
    }

    async fn write_once(&self, lba: u64, blocks: u64, buf: IoBuf, fua: bool) -> BufResult {
        let segments = self.sh.segments(lba, blocks);
        let ticket = self.begin_write(segments.0, segments.1).await;
        let legs = self.legs();
        let len = buf.len();
        if let [leg] = legs.as_slice() {
            // One child: no copies, no fan-out, no allocation.
            let healthy = match leg.child.state() {
                ChildState::Healthy => true,
                ChildState::Rebuilding => false,
                ChildState::Faulted => {
                    let r = self.settle(&mut [], Some(segments)).await;
                    return (r, buf);
                }
            };
            let (result, buf) = match self.timed(leg, leg.ch.write(lba, buf, fua)).await {
                Some((r, b)) => (r, b),
                None => (Err(timed_out(self.sh.cfg.io_timeout)), IoBuf::zeroed(len)),
            };
            let mut one = [Outcome {
                leg: leg.clone(),
                healthy,
                result,
            }];
            let r = self.settle(&mut one, Some(segments)).await;
            drop(ticket);
            return (r, buf);
        }
        // Kept out of line (boxed) so that the one-child path above does
        // not carry the fan-out's state in every write's future.
        let r = Box::pin(self.write_many(&legs, lba, buf, fua, segments)).await;
        drop(ticket);
        r
    }

    /// The part of [`Self::write_once`] for two or more legs: every target
    /// gets the write, in parallel.
    async fn write_many(
        &self,
        legs: &Legs,
        lba: u64,
        buf: IoBuf,
        fua: bool,
        segments: (u64, u64),
    ) -> BufResult {
        let len = buf.len();
        let targets = Self::targets(legs);
        // Every other leg gets its own copy; the caller's buffer goes to
        // the first and comes back to the caller.
        let copies: Vec<IoBuf> = targets.iter().skip(1).map(|_| buf.clone()).collect();
        let others = targets
            .iter()
            .skip(1)
            .zip(copies)
            .map(|((leg, healthy), copy)| {
                let (leg, healthy) = (leg.clone(), *healthy);
                async move {
                    let result = match self.timed(&leg, leg.ch.write(lba, copy, fua)).await {
                        Some((r, _)) => r,
                        None => Err(timed_out(self.sh.cfg.io_timeout)),
                    };
                    Outcome {
                        leg,
                        healthy,
                        result,
                    }
                }
            });
        let first = async {
            let Some((leg, healthy)) = targets.first() else {
                return (None, buf);
            };
            let (result, buf) = match self.timed(leg, leg.ch.write(lba, buf, fua)).await {
                Some((r, b)) => (r, b),
                None => (Err(timed_out(self.sh.cfg.io_timeout)), IoBuf::zeroed(len)),
            };
            let o = Outcome {
                leg: leg.clone(),
                healthy: *healthy,
                result,
            };
            (Some(o), buf)
        };
        let ((first, buf), mut outcomes) = futures::join!(first, join_all(others));
        outcomes.extend(first);
        let r = self.settle(&mut outcomes, Some(segments)).await;
        (r, buf)
    }

    /// [`Self::mutate`] over `range` (blocks at an LBA; none for a flush),
    /// retried while [`Self::should_wait`] says so.
    async fn mutate_within_pause<F>(
        &self,
        range: Option<(u64, u64)>,
        op: F,
    ) -> Result<(), BdevError>
    where
        F: for<'a> Fn(&'a dyn IoChannel) -> IoFuture<'a, Result<(), BdevError>>,
    {
        let segments = match range {
            Some((lba, blocks)) => {
                self.sh.geometry().check_range(lba, blocks)?;
                Some(self.sh.segments(lba, blocks))
            }
            None => None,
        };
        let mut deadline = None;
        loop {
            let r = self.mutate(segments, &op).await;
            if !self.should_wait(&r, &mut deadline) {
                return r;
            }
            Box::pin(monoio::time::sleep(PAUSE_POLL)).await;
        }
    }

    /// Whether to retry an operation that no healthy child completed: until
    /// the last healthy child answers again, or one comes back, or the
    /// pause is over.
    fn should_wait(&self, r: &Result<(), BdevError>, deadline: &mut Option<Instant>) -> bool {
        if !matches!(r, Err(e) if is_child_failure(e)) {
            return false;
        }
        let now = Instant::now();
        now < *deadline.get_or_insert(now + self.sh.cfg.pause)
    }
}

impl NexusChannel {
    /// Runs `attempt` until it succeeds, or fails for a reason other than
    /// the children, or no healthy child is left and the pause is over;
    /// `first` is the outcome of an attempt already made.
    async fn retrying<F, Fut>(
        &self,
        mut buf: IoBuf,
        mut first: Option<Result<(), BdevError>>,
        mut attempt: F,
    ) -> BufResult
    where
        F: FnMut(IoBuf) -> Fut,
        Fut: Future<Output = BufResult>,
    {
        let mut deadline = None;
        loop {
            let r = match first.take() {
                Some(r) => r,
                None => {
                    let (r, b) = attempt(buf).await;
                    buf = b;
                    r
                }
            };
            if !self.should_wait(&r, &mut deadline) {
                return (r, buf);
            }
            Box::pin(monoio::time::sleep(PAUSE_POLL)).await;
        }
    }
}

impl IoChannel for NexusChannel {
    fn read(&self, lba: u64, buf: IoBuf) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            if let Err(e) = self.sh.geometry().check_buf(lba, buf.len()) {
                return (Err(e), buf);
            }
            let mut first = None;
            let mut buf = buf;
            if let Some(leg) = self.sole_local_leg() {
                // What `read_once` does with one leg, without its layers.
                let (r, b) = leg.ch.read(lba, buf).await;
                match r {
                    Err(e) if is_child_failure(&e) => {
                        self.sh.fault_io(&leg.child, &e.to_string());
                        first = Some(Err(e));
                        buf = b;
                    }
                    r => return (r, b),
                }
            }
            Box::pin(self.retrying(buf, first, |b| self.read_once(lba, b))).await
        })
    }

    fn write(&self, lba: u64, buf: IoBuf, fua: bool) -> IoFuture<'_, BufResult> {
        Box::pin(async move {
            let blocks = match self.sh.geometry().check_buf(lba, buf.len()) {
                Ok(b) => b,
                Err(e) => return (Err(e), buf),
            };
            let mut first = None;
            let mut buf = buf;
            // What `write_once` does with one healthy local child and no
            // rebuild, without its layers; in the same order (the ticket
            // first, so that a rebuild starting meanwhile waits for it).
            let ticket = self.enter_write();
            let fast = self.sh.rebuilding.load(Ordering::SeqCst) == 0
                && self.sh.child_count.load(Ordering::SeqCst) == 1;
            match fast.then(|| self.sole_local_leg()).flatten() {
                Some(leg) => {
                    let (result, b) = leg.ch.write(lba, buf, fua).await;
                    buf = b;
                    if result.is_ok() && !self.sh.health_pending() {
                        return (result, buf);
                    }
                    let mut one = [Outcome {
                        leg,
                        healthy: true,
                        result,
                    }];
                    let segments = self.sh.segments(lba, blocks);
                    let r = Box::pin(self.settle(&mut one, Some(segments))).await;
                    drop(ticket);
                    first = Some(r);
                }
                None => drop(ticket),
            }
            Box::pin(self.retrying(buf, first, |b| self.write_once(lba, blocks, b, fua))).await
        })
    }

    fn flush(&self) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(self.mutate_within_pause(None, |ch| ch.flush()))
    }

    fn write_zeroes(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(
            self.mutate_within_pause(Some((lba, blocks)), move |ch| ch.write_zeroes(lba, blocks)),
        )
    }

    fn deallocate(&self, lba: u64, blocks: u64) -> IoFuture<'_, Result<(), BdevError>> {
        Box::pin(
            self.mutate_within_pause(Some((lba, blocks)), move |ch| ch.deallocate(lba, blocks)),
        )
    }
}
