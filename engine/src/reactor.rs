//! Reactors: the engine's I/O threads.
//!
//! Each reactor is one OS thread running a monoio runtime on its own
//! io_uring. A reactor owns the TCP connections (one NVMe queue each) and the
//! device channels placed on it, and nothing it owns is shared with another
//! thread. Work reaches a reactor as a boxed closure over a channel; the
//! closure runs on the reactor and usually spawns a local task.
//!
//! An idle reactor sleeps in `io_uring_enter` with no timeout: there is no
//! polling and no periodic timer, so an idle engine uses no CPU. Timers exist
//! only where the protocol needs them (keep-alive, at the scale of seconds).
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
    /// Starts `count` reactors (at least one), named `{name}-{i}`.
    pub fn start(count: usize, name: &str) -> Result<Reactors, ReactorError> {
        let count = count.max(1);
        let mut senders = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let (tx, rx) = flume::unbounded::<Job>();
            let (ready_tx, ready_rx) = flume::bounded::<io::Result<()>>(1);
            let t = std::thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || reactor_main(rx, ready_tx))
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

fn reactor_main(rx: flume::Receiver<Job>, ready: flume::Sender<io::Result<()>>) {
    let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .with_entries(RING_ENTRIES)
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
    rt.block_on(async move {
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
    });
}

#[cfg(test)]
mod tests {
    use super::*;

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
