//! Microsecond-precise sleeps on a monoio io_uring reactor, without spinning.
//!
//! monoio's own timers round every deadline up to the next millisecond,
//! which is far too coarse to model an SSD that answers in 80 µs. A
//! [`PreciseTimer`] keeps its sleepers in a heap ordered by deadline and
//! one `timerfd` armed for the earliest of them; a driver task reads the
//! timerfd through io_uring (so the reactor sleeps in the kernel meanwhile),
//! wakes every sleeper whose deadline has passed and re-arms for the next.
//! The driver runs only while someone sleeps, so an idle timer costs nothing.
//!
//! Every wake-up of a sleeping thread costs CPU (several microseconds in a
//! virtual machine, where programming a timer traps to the hypervisor). A
//! timer with *slack* fires up to that much after the earliest deadline and
//! wakes every sleeper due by then in one go: sleeps never end early, may end
//! up to the slack late, and many sleeps share one wake-up under load.
//!
//! A timer belongs to one reactor thread; it is `!Send` by construction.

use std::cell::{OnceCell, RefCell};
use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// A per-reactor source of precise sleeps. Cloning shares the timer.
#[derive(Clone)]
pub struct PreciseTimer {
    inner: Rc<Inner>,
}

struct Inner {
    fd: RawFd,
    slack: Duration,
    /// The timerfd before the driver first wraps it for io_uring.
    std_file: RefCell<Option<File>>,
    file: OnceCell<monoio::fs::File>,
    state: RefCell<State>,
}

#[derive(Default)]
struct State {
    heap: BinaryHeap<Entry>,
    seq: u64,
    /// The deadline the timerfd is armed for, while the driver waits on it.
    armed: Option<Instant>,
    driving: bool,
    /// The timerfd failed; sleeps then end at once rather than hang.
    failed: bool,
}

struct Entry {
    deadline: Instant,
    seq: u64,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.deadline == other.deadline && self.seq == other.seq
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    /// Reversed, so that the max-heap pops the earliest deadline first.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .deadline
            .cmp(&self.deadline)
            .then(other.seq.cmp(&self.seq))
    }
}

impl PreciseTimer {
    /// Creates a timer without slack. Sleeps must be awaited on a monoio
    /// io_uring runtime.
    pub fn new() -> io::Result<Self> {
        PreciseTimer::with_slack(Duration::ZERO)
    }

    /// Creates a timer that may fire up to `slack` late to serve several
    /// sleepers with one wake-up.
    pub fn with_slack(slack: Duration) -> io::Result<Self> {
        // SAFETY: timerfd_create takes plain integer arguments.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a freshly created descriptor that nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(PreciseTimer {
            inner: Rc::new(Inner {
                fd: owned.as_raw_fd(),
                slack,
                std_file: RefCell::new(Some(File::from(owned))),
                file: OnceCell::new(),
                state: RefCell::new(State::default()),
            }),
        })
    }

    /// A future that completes at `deadline` (at once if it has passed).
    pub fn sleep_until(&self, deadline: Instant) -> Sleep {
        Sleep {
            timer: self.inner.clone(),
            deadline,
        }
    }
}

impl Inner {
    /// Arms the timerfd to fire at `deadline`.
    fn arm(&self, deadline: Instant) -> io::Result<()> {
        let rel = deadline.saturating_duration_since(Instant::now());
        // A zero value would disarm the timer; fire after 1 ns instead.
        let (secs, nanos) = if rel.is_zero() {
            (0, 1)
        } else {
            (rel.as_secs(), rel.subsec_nanos())
        };
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: secs.min(i64::MAX as u64) as libc::time_t,
                tv_nsec: nanos as libc::c_long,
            },
        };
        // SAFETY: fd is our open timerfd; spec points at a live itimerspec;
        // a null old-value pointer is allowed.
        let rc = unsafe { libc::timerfd_settime(self.fd, 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn register(self: &Rc<Self>, deadline: Instant, waker: &Waker) -> bool {
        let mut st = self.state.borrow_mut();
        if st.failed {
            return false;
        }
        st.seq += 1;
        let seq = st.seq;
        st.heap.push(Entry {
            deadline,
            seq,
            waker: waker.clone(),
        });
        if !st.driving {
            st.driving = true;
            st.armed = None;
            drop(st);
            monoio::spawn(drive(self.clone()));
        } else if st.armed.is_some_and(|a| deadline + self.slack < a) {
            if self.arm(deadline + self.slack).is_err() {
                st.failed = true;
                wake_all(&mut st);
                return false;
            }
            st.armed = Some(deadline + self.slack);
        }
        true
    }

    fn uring_file(&self) -> io::Result<&monoio::fs::File> {
        if let Some(f) = self.file.get() {
            return Ok(f);
        }
        let std_file = self
            .std_file
            .borrow_mut()
            .take()
            .ok_or_else(|| io::Error::other("timerfd already consumed"))?;
        let f = monoio::fs::File::from_std(std_file)?;
        Ok(self.file.get_or_init(|| f))
    }
}

fn wake_all(st: &mut State) {
    for e in st.heap.drain() {
        e.waker.wake();
    }
}

/// Wakes expired sleepers, waits on the timerfd for the next deadline, and
/// exits when nobody sleeps.
async fn drive(inner: Rc<Inner>) {
    let mut buf = Some(vec![0u8; 8]);
    loop {
        {
            let mut st = inner.state.borrow_mut();
            let now = Instant::now();
            while st.heap.peek().is_some_and(|e| e.deadline <= now) {
                if let Some(e) = st.heap.pop() {
                    e.waker.wake();
                }
            }
            let Some(next) = st.heap.peek().map(|e| e.deadline) else {
                st.driving = false;
                st.armed = None;
                return;
            };
            let next = next + inner.slack;
            if inner.arm(next).is_err() {
                st.failed = true;
                st.driving = false;
                wake_all(&mut st);
                return;
            }
            st.armed = Some(next);
        }
        let file = match inner.uring_file() {
            Ok(f) => f,
            Err(_) => {
                let mut st = inner.state.borrow_mut();
                st.failed = true;
                st.driving = false;
                wake_all(&mut st);
                return;
            }
        };
        let Some(b) = buf.take() else { return };
        let (r, b) = file.read_at(b, 0).await;
        buf = Some(b);
        match r {
            Ok(_) => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                // Re-armed for an earlier deadline between expiry and read;
                // the loop re-arms and reads again.
            }
            Err(_) => {
                let mut st = inner.state.borrow_mut();
                st.failed = true;
                st.driving = false;
                wake_all(&mut st);
                return;
            }
        }
    }
}

/// A sleep of a [`PreciseTimer`].
pub struct Sleep {
    timer: Rc<Inner>,
    deadline: Instant,
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        if self.timer.register(self.deadline, cx.waker()) {
            Poll::Pending
        } else {
            // No working timerfd: give up the modelled wait rather than hang.
            Poll::Ready(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_are_precise_and_ordered() {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async {
            let timer = PreciseTimer::new().unwrap();
            // One sleep of 200 µs at a time: each ends at or after its
            // deadline and well before monoio's 1 ms tick would.
            let mut total = Duration::ZERO;
            for _ in 0..20 {
                let start = Instant::now();
                timer.sleep_until(start + Duration::from_micros(200)).await;
                let took = start.elapsed();
                assert!(took >= Duration::from_micros(200), "{took:?}");
                total += took;
            }
            let avg = total / 20;
            assert!(avg < Duration::from_micros(900), "average sleep {avg:?}");

            // Concurrent sleepers registered out of order all finish, each
            // not before its own deadline.
            let base = Instant::now();
            let order = Rc::new(RefCell::new(Vec::new()));
            let mut handles = Vec::new();
            for (i, us) in [900u64, 300, 600, 100].into_iter().enumerate() {
                let t = timer.clone();
                let order = order.clone();
                handles.push(monoio::spawn(async move {
                    let d = base + Duration::from_micros(us);
                    t.sleep_until(d).await;
                    assert!(Instant::now() >= d);
                    order.borrow_mut().push(i);
                }));
            }
            for h in handles {
                h.await;
            }
            assert_eq!(*order.borrow(), vec![3, 1, 2, 0]);
            // Past deadlines complete immediately.
            timer.sleep_until(base).await;
        });
    }

    #[test]
    fn slack_batches_wakeups_without_waking_early() {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .build()
            .unwrap();
        rt.block_on(async {
            let timer = PreciseTimer::with_slack(Duration::from_millis(2)).unwrap();
            let base = Instant::now();
            let done = Rc::new(RefCell::new(Vec::new()));
            let mut handles = Vec::new();
            // Deadlines 0.5 ms apart: the first firing, 2 ms after the
            // first deadline, serves the first five together.
            for i in 0..5u64 {
                let t = timer.clone();
                let done = done.clone();
                handles.push(monoio::spawn(async move {
                    let d = base + Duration::from_micros(1000 + 500 * i);
                    t.sleep_until(d).await;
                    let now = Instant::now();
                    assert!(now >= d);
                    done.borrow_mut().push(now);
                }));
            }
            for h in handles {
                h.await;
            }
            let done = done.borrow();
            let first = done[0];
            assert!(first >= base + Duration::from_millis(3));
            let spread = done[4] - first;
            assert!(spread < Duration::from_micros(500), "{spread:?}");
        });
    }
}
