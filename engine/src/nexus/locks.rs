//! Segment locks between writes and a rebuild's copies, taken only while a
//! rebuild runs. Writes share a segment; a copy holds it alone. A copy first
//! bars new writes from the segment and then waits for the writes already
//! in it, so it cannot starve. Both sides wait by polling on a short timer:
//! they run on different reactors, and this path is only taken during a
//! rebuild.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

const POLL: Duration = Duration::from_micros(200);

#[derive(Default)]
struct Table {
    writers: HashMap<u64, u32>,
    copying: HashSet<u64>,
}

#[derive(Default)]
pub(crate) struct RangeLocks {
    table: Mutex<Table>,
}

/// Segments a write holds; released on drop.
pub(crate) struct WriteHold<'a> {
    locks: &'a RangeLocks,
    first: u64,
    last: u64,
}

impl Drop for WriteHold<'_> {
    fn drop(&mut self) {
        let mut t = self.locks.table.lock().expect("poisoned");
        for seg in self.first..=self.last {
            if let Some(n) = t.writers.get_mut(&seg) {
                *n -= 1;
                if *n == 0 {
                    t.writers.remove(&seg);
                }
            }
        }
    }
}

/// A segment a copy holds; released on drop.
pub(crate) struct CopyHold<'a> {
    locks: &'a RangeLocks,
    seg: u64,
}

impl Drop for CopyHold<'_> {
    fn drop(&mut self) {
        self.locks
            .table
            .lock()
            .expect("poisoned")
            .copying
            .remove(&self.seg);
    }
}

impl RangeLocks {
    /// Shares segments `first..=last` with other writes, once no copy holds
    /// any of them.
    pub(crate) async fn write(&self, first: u64, last: u64) -> WriteHold<'_> {
        loop {
            {
                let mut t = self.table.lock().expect("poisoned");
                if !(first..=last).any(|s| t.copying.contains(&s)) {
                    for seg in first..=last {
                        *t.writers.entry(seg).or_insert(0) += 1;
                    }
                    return WriteHold {
                        locks: self,
                        first,
                        last,
                    };
                }
            }
            monoio::time::sleep(POLL).await;
        }
    }

    /// Holds segment `seg` alone: bars new writes, then waits for the
    /// writes in it to finish.
    pub(crate) async fn copy(&self, seg: u64) -> CopyHold<'_> {
        self.table.lock().expect("poisoned").copying.insert(seg);
        let hold = CopyHold { locks: self, seg };
        while self
            .table
            .lock()
            .expect("poisoned")
            .writers
            .contains_key(&seg)
        {
            monoio::time::sleep(POLL).await;
        }
        hold
    }
}
