//! A small pool of threads for the device calls that block in the kernel
//! and have no io_uring form on every kernel Cairn runs on: `BLKDISCARD`
//! and `BLKZEROOUT` on block devices, and `fallocate` (punch hole, zero
//! range) on files.
//!
//! A whole-device discard (mkfs sends one) can take seconds; run on a
//! reactor it would stall every queue that reactor serves. Here the reactor
//! hands the call to a pool thread and awaits its answer like any other
//! completion. io_uring's `IORING_OP_FALLOCATE` would cover files only, and
//! its discard command only newer kernels; both would still be punted to
//! io_uring's own workers, so a plain pool costs no more and covers every
//! case the same way. These calls are rare (TRIM, write zeroes, the first
//! write of a thin cluster), so two threads are plenty; a queue behind a
//! long discard waits for it, not the reactor. The threads run at the
//! lowest priority (nice 19): on a busy machine a long zeroing must not take
//! the CPU from the reactors serving other volumes.

use std::sync::OnceLock;

use crate::file::InFlight;
use crate::BdevError;

type Job = Box<dyn FnOnce() + Send>;

/// Threads in the pool.
const THREADS: usize = 2;
/// Their nice value: the lowest priority, so a long zeroing or discard
/// takes only CPU time the reactors leave.
const NICE: libc::c_int = 19;

fn pool() -> Option<&'static flume::Sender<Job>> {
    static POOL: OnceLock<Option<flume::Sender<Job>>> = OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = flume::unbounded::<Job>();
        let mut started = 0;
        for i in 0..THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("cairn-blocking-{i}"))
                .spawn(move || {
                    // Background work: yield the CPU to reactors and to
                    // the I/O they serve. A failure leaves the default.
                    // SAFETY: setpriority takes plain integers; who = 0
                    // is the calling thread on Linux.
                    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                });
            if spawned.is_ok() {
                started += 1;
            }
        }
        (started > 0).then_some(tx)
    })
    .as_ref()
}

/// Runs `f` on the pool and waits for it without blocking the calling
/// thread. If no pool thread could be started, `f` runs here.
pub async fn run<T, F>(f: F) -> Result<T, BdevError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, BdevError> + Send + 'static,
{
    let Some(pool) = pool() else {
        return f();
    };
    let _in_flight = InFlight::new();
    let (tx, rx) = flume::bounded(1);
    let job: Job = Box::new(move || {
        // The waiter may have gone away (its I/O was dropped); nothing to tell.
        let _ = tx.send(f());
    });
    if pool.send(job).is_err() {
        return Err(BdevError::Unavailable {
            reason: "the blocking pool has stopped".into(),
        });
    }
    rx.recv_async().await.unwrap_or_else(|_| {
        Err(BdevError::Unavailable {
            reason: "a blocking pool thread died".into(),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blocked_job_leaves_the_calling_thread_free() {
        let mut rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let (release, wait) = std::sync::mpsc::channel::<()>();
            let blocked = monoio::spawn(run(move || {
                wait.recv_timeout(std::time::Duration::from_secs(20))
                    .map_err(|_| BdevError::Unavailable {
                        reason: "never released".into(),
                    })
            }));
            // The runtime keeps running other work while the job blocks.
            for _ in 0..100 {
                monoio::time::sleep(std::time::Duration::from_micros(10)).await;
            }
            release.send(()).unwrap();
            blocked.await.unwrap();
        });
    }
}
