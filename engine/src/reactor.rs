//! Reactors: the engine's I/O threads.
//!
//! Each reactor is one OS thread running a monoio runtime on its own
//! io_uring. A reactor owns the TCP connections (one NVMe queue each) and the
//! device channels placed on it, and nothing it owns is shared with another
//! thread. Work reaches a reactor as a boxed closure over a channel; the
//! closure runs on the reactor and usually spawns a local task.
//!
//! An idle reactor sleeps in `io_uring_enter` with no timeout and no
//! periodic timer, so an idle engine uses no CPU. Timers exist only where the
//! protocol needs them (keep-alive, at the scale of seconds).
//!
//! A busy reactor polls for a short window (see [`busy_poll`]): after each
//! PDU received or batch sent it keeps entering the kernel without sleeping
//! for `poll` (50 µs by default), so the next command of a host at queue
//! depth 1 is picked up without a wake-up. Waking a sleeping thread on
//! another core costs tens of microseconds on virtual machines, more than the
//! rest of an I/O's path; the window bounds what polling costs when the
//! traffic stops.
//!
//! ```text
//!   control thread ──Job──▶ [reactor 0: monoio + io_uring] ─ tasks: queues, I/O
//!                  ──Job──▶ [reactor 1: monoio + io_uring] ─ tasks: queues, I/O
//! ```

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// How long a stopping reactor lets its tasks finish (I/O in flight
/// completes, connections that were shut down notice) before it drops them.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

thread_local! {
    /// Tasks spawned through [`spawn_local`] on this reactor and not
    /// finished yet.
    static LIVE_TASKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// I/O events seen on this thread (see [`note_activity`]).
    static ACTIVITY: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// The parked [`busy_poll`] task of this thread, if any.
    static POLLER: std::cell::RefCell<Option<std::task::Waker>> =
        const { std::cell::RefCell::new(None) };
}

/// Records network activity on the calling thread (a PDU received, a batch
/// sent): a [`busy_poll`] task on it, if any, starts or extends its window.
#[inline]
pub fn note_activity() {
    ACTIVITY.with(|a| a.set(a.get().wrapping_add(1)));
    POLLER.with(|p| {
        if let Some(w) = p.borrow_mut().take() {
            w.wake();
        }
    });
}

/// Keeps the calling monoio runtime from sleeping while it is active: after
/// any [`note_activity`] it keeps one trivial io_uring operation (a read of
/// `/dev/zero`, completed at submission) in flight, so the runtime enters
/// the kernel for completions without waiting, until `window` passes with no
/// new activity; then it parks until the next one. One operation per turn
/// of the runtime: the other tasks run as usual between turns.
///
/// Polling only pays when the core would otherwise go idle, so it stops for
/// the window (parks until the next activity):
/// - while file or block-device I/O of this thread is in flight
///   ([`cairn_bdev::file::io_in_flight`]): its completion comes from this
///   core (its io_uring workers), which polling would only compete with;
/// - once the thread has been preempted since the window began: another
///   thread on this core needed it, so the core is not idling, a wake-up
///   costs no more than polling, and polling would take its time.
///
/// Runs forever; [`polling`] runs it beside a future.
async fn busy_poll(window: std::time::Duration) {
    let zero = match std::fs::File::open("/dev/zero").and_then(monoio::fs::File::from_std) {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open /dev/zero: reactor will not poll");
            return;
        }
    };
    let mut buf = vec![0u8; 1];
    let mut seen = ACTIVITY.with(|a| a.get());
    loop {
        std::future::poll_fn(|cx| {
            if ACTIVITY.with(|a| a.get()) != seen {
                return std::task::Poll::Ready(());
            }
            POLLER.with(|p| *p.borrow_mut() = Some(cx.waker().clone()));
            std::task::Poll::Pending
        })
        .await;
        seen = ACTIVITY.with(|a| a.get());
        let mut last = std::time::Instant::now();
        let preempted = involuntary_switches();
        loop {
            // One turn: the read completes once every task already queued
            // (the commands that woke this poller among them) has run and
            // the runtime has entered the kernel.
            let (r, b) = zero.read_at(buf, 0).await;
            buf = b;
            if let Err(e) = r {
                tracing::warn!(error = %e, "reading /dev/zero failed: reactor stops polling");
                return;
            }
            if cairn_bdev::file::io_in_flight() > 0 {
                // The device's completion wakes this thread from its own
                // core; the window restarts with the next activity.
                break;
            }
            if involuntary_switches() != preempted {
                // Another thread on this core needed it: the core is not
                // going idle, so a wake-up costs no more than polling, and
                // polling would take time from that thread.
                break;
            }
            let now = ACTIVITY.with(|a| a.get());
            if now != seen {
                seen = now;
                last = std::time::Instant::now();
            } else if last.elapsed() >= window {
                break;
            }
        }
    }
}

/// How many times the calling thread has been preempted.
fn involuntary_switches() -> i64 {
    // SAFETY: all-zero bytes are a valid `rusage` (plain integers).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage for the call.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    if rc == 0 {
        ru.ru_nivcsw
    } else {
        0
    }
}

/// Runs `fut` on the calling monoio runtime with a [`busy_poll`] task beside
/// it (none when `window` is zero). The poller is spawned, so it is dropped
/// with the runtime; its parked waker is dropped here, while the runtime
/// still exists.
pub async fn polling<F: Future>(window: std::time::Duration, fut: F) -> F::Output {
    if !window.is_zero() {
        monoio::spawn(busy_poll(window));
    }
    let out = fut.await;
    POLLER.with(|p| p.borrow_mut().take());
    out
}

/// Spawns a task on the calling reactor, counted so that a stopping
/// reactor lets it finish (see [`STOP_GRACE`]). Every task on a reactor is
/// spawned through here.
pub fn spawn_local<F>(fut: F)
where
    F: Future<Output = ()> + 'static,
{
    let live = LiveTask::new();
    monoio::spawn(async move {
        let _live = live;
        fut.await
    });
}

/// Counts a task as live until it finishes or is dropped.
struct LiveTask;

impl LiveTask {
    fn new() -> Self {
        LIVE_TASKS.with(|n| n.set(n.get() + 1));
        LiveTask
    }
}

impl Drop for LiveTask {
    fn drop(&mut self) {
        LIVE_TASKS.with(|n| n.set(n.get() - 1));
    }
}

/// io_uring submission queue size per reactor.
const RING_ENTRIES: u32 = 1024;

/// Errors of the reactor pool.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// The reactor thread could not be started.
    #[error("starting reactor {index}: {source}")]
    Start {
        index: usize,
        #[source]
        source: io::Error,
    },
    /// The reactor has stopped.
    #[error("reactor {index} has stopped")]
    Stopped { index: usize },
}

/// A fixed set of reactor threads.
pub struct Reactors {
    senders: Mutex<Vec<flume::Sender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    count: usize,
    next: AtomicUsize,
}

impl Reactors {
    /// Starts `count` reactors (at least one), named `{name}-{i}`, that
    /// sleep as soon as they have nothing to do.
    pub fn start(count: usize, name: &str) -> Result<Reactors, ReactorError> {
        Self::start_polling(count, name, std::time::Duration::ZERO)
    }

    /// Starts `count` reactors that poll for `poll` after each burst of
    /// network activity before they sleep (see [`busy_poll`]); zero never
    /// polls.
    pub fn start_polling(
        count: usize,
        name: &str,
        poll: std::time::Duration,
    ) -> Result<Reactors, ReactorError> {
        let count = count.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, rx) = flume::unbounded::<Job>();
            let (ready_tx, ready_rx) = flume::bounded::<io::Result<()>>(1);
            let t = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || reactor_main(rx, ready_tx, poll))
                .map_err(|source| ReactorError::Start { index, source })?;
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(source)) => return Err(ReactorError::Start { index, source }),
                Err(_) => {
                    return Err(ReactorError::Start {
                        index,
                        source: io::Error::other("reactor thread exited"),
                    })
                }
            }
            senders.push(tx);
            threads.push(t);
        }
        Ok(Reactors {
            senders: Mutex::new(senders),
            threads: Mutex::new(threads),
            count,
            next: AtomicUsize::new(0),
        })
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Always false: a pool has at least one reactor.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Picks a reactor round robin.
    pub fn next_index(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.count
    }

    /// Runs `f` on reactor `index` and spawns the future it returns there.
    pub fn spawn<F, Fut>(&self, index: usize, f: F) -> Result<(), ReactorError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + 'static,
    {
        let job: Job = Box::new(move || spawn_local(f()));
        let senders = self.senders.lock().unwrap_or_else(|e| e.into_inner());
        let tx = senders
            .get(index % self.count.max(1))
            .ok_or(ReactorError::Stopped { index })?;
        tx.send(job).map_err(|_| ReactorError::Stopped { index })
    }

    /// Runs `f` on reactor `index` and waits for its result. Never call it
    /// from a reactor thread (it blocks).
    pub fn run<F, Fut, R>(&self, index: usize, f: F) -> Result<R, ReactorError>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = R> + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = flume::bounded(1);
        self.spawn(index, move || async move {
            let _ = tx.send(f().await);
        })?;
        rx.recv().map_err(|_| ReactorError::Stopped { index })
    }

    /// Stops every reactor (their tasks are dropped) and joins the threads.
    pub fn shutdown(&self) {
        self.senders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        let me = std::thread::current().id();
        for t in threads {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn reactor_main(
    rx: flume::Receiver<Job>,
    ready: flume::Sender<io::Result<()>>,
    poll: std::time::Duration,
) {
    let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(RING_ENTRIES)
        .uring_builder(uring_builder())
        .enable_timer()
        .build();
    let mut rt = match rt {
        Ok(rt) => {
            let _ = ready.send(Ok(()));
            rt
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    rt.block_on(polling(poll, async move {
        while let Ok(job) = rx.recv_async().await {
            job();
        }
        // Stopping: a task dropped mid-I/O would leave its device channels
        // open (an io_uring operation in flight is never cancelled), so
        // give the tasks a bounded time to finish first.
        let deadline = std::time::Instant::now() + STOP_GRACE;
        while LIVE_TASKS.with(|n| n.get()) > 0 && std::time::Instant::now() < deadline {
            monoio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let left = LIVE_TASKS.with(|n| n.get());
        if left > 0 {
            tracing::warn!(tasks = left, "reactor stopped with tasks still running");
        }
    }));
}

/// The io_uring set-up of reactors: completions are delivered when the
/// reactor next enters the kernel (`COOP_TASKRUN`) instead of by
/// interrupting it, which a polling reactor does every turn anyway and a
/// sleeping one is woken for.
pub fn uring_builder() -> io_uring::Builder {
    let mut b = io_uring::IoUring::builder();
    b.setup_coop_taskrun();
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn thread_cpu() -> Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec for the call.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0);
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }

    /// CPU time of this thread while it waits `wall` on a timer.
    async fn cpu_over(wall: Duration) -> Duration {
        let t = thread_cpu();
        monoio::time::sleep(wall).await;
        thread_cpu() - t
    }

    #[test]
    fn busy_poll_spins_only_within_its_window() {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .uring_builder(uring_builder())
            .enable_timer()
            .build()
            .unwrap();
        let window = Duration::from_millis(40);
        rt.block_on(polling(window, async {
            // Nothing happened yet: the thread sleeps on its timer.
            let idle = cpu_over(Duration::from_millis(100)).await;
            assert!(
                idle < Duration::from_millis(10),
                "idle thread used {idle:?}"
            );
            // Activity opens the window: the thread stays on the CPU. A
            // preemption (other tests run alongside) ends a window early, so
            // activity is noted every millisecond, as traffic would, and the
            // bound is loose.
            let t = thread_cpu();
            for _ in 0..40 {
                note_activity();
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
            let busy = thread_cpu() - t;
            assert!(
                busy >= Duration::from_millis(10),
                "polling used only {busy:?}"
            );
            // Then the window closes and the thread sleeps again.
            monoio::time::sleep(Duration::from_millis(80)).await;
            let after = cpu_over(Duration::from_millis(100)).await;
            assert!(
                after < Duration::from_millis(10),
                "window did not close: {after:?}"
            );
            // File I/O in flight stops the polling at once.
            let f = tempfile::tempfile().unwrap();
            let f = monoio::fs::File::from_std(f).unwrap();
            note_activity();
            let t = thread_cpu();
            let (r, _) =
                cairn_bdev::file::write_at(&f, 0, cairn_bdev::IoBuf::zeroed(4096), true).await;
            r.unwrap();
            monoio::time::sleep(Duration::from_millis(100)).await;
            let with_io = thread_cpu() - t;
            assert!(
                with_io < Duration::from_millis(10),
                "polled through file I/O: {with_io:?}"
            );
        }));
    }

    #[test]
    fn jobs_run_on_their_reactor() {
        let r = Reactors::start(2, "test-reactor").unwrap();
        let a = r
            .run(0, || async {
                std::thread::current().name().map(String::from)
            })
            .unwrap();
        let b = r
            .run(1, || async {
                std::thread::current().name().map(String::from)
            })
            .unwrap();
        assert_eq!(a.as_deref(), Some("test-reactor-0"));
        assert_eq!(b.as_deref(), Some("test-reactor-1"));
        let slept = r
            .run(1, || async {
                let t = std::time::Instant::now();
                monoio::time::sleep(std::time::Duration::from_millis(20)).await;
                t.elapsed()
            })
            .unwrap();
        assert!(slept >= std::time::Duration::from_millis(20));
        r.shutdown();
        assert!(matches!(
            r.spawn(0, || async {}),
            Err(ReactorError::Stopped { .. })
        ));
    }
}
