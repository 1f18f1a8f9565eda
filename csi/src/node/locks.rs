//! One operation at a time per volume; different volumes run in parallel.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex, PoisonError},
};

use super::error::NodeError;

/// The set of volumes with an operation in flight.
#[derive(Debug, Clone, Default)]
pub struct VolumeLocks {
    busy: Arc<Mutex<HashSet<String>>>,
}

/// Held while an operation on one volume runs; releases the volume on drop.
#[derive(Debug)]
pub struct VolumeGuard {
    busy: Arc<Mutex<HashSet<String>>>,
    volume_id: String,
}

impl VolumeLocks {
    /// Claims `volume_id`, or fails with ABORTED if another call holds it.
    pub fn try_lock(&self, volume_id: &str) -> Result<VolumeGuard, NodeError> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        if !busy.insert(volume_id.to_owned()) {
            return Err(NodeError::OperationPending(volume_id.to_owned()));
        }
        Ok(VolumeGuard {
            busy: Arc::clone(&self.busy),
            volume_id: volume_id.to_owned(),
        })
    }

    /// Whether an operation on `volume_id` is in flight (for tests that
    /// must act while one is).
    #[cfg(test)]
    pub fn is_held(&self, volume_id: &str) -> bool {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(volume_id)
    }
}

impl Drop for VolumeGuard {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.volume_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_volume_is_aborted_other_volumes_proceed() {
        let locks = VolumeLocks::default();
        let a = locks.try_lock("a").expect("first claim");
        let err = locks.try_lock("a").expect_err("second claim on a");
        assert!(matches!(err, NodeError::OperationPending(ref v) if v == "a"));
        let b = locks.try_lock("b").expect("b is independent");
        drop(a);
        let _a2 = locks
            .try_lock("a")
            .expect("a is free after its guard drops");
        drop(b);
    }

    #[test]
    fn guards_from_many_threads_never_overlap() {
        let locks = VolumeLocks::default();
        let inside = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let wins = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (locks, inside, wins) = (locks.clone(), inside.clone(), wins.clone());
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        if let Ok(_g) = locks.try_lock("v") {
                            use std::sync::atomic::Ordering::SeqCst;
                            assert_eq!(inside.fetch_add(1, SeqCst), 0, "two holders at once");
                            wins.fetch_add(1, SeqCst);
                            inside.fetch_sub(1, SeqCst);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        assert!(wins.load(std::sync::atomic::Ordering::SeqCst) > 0);
    }
}
