//! A named lease in the state store, held by one agent at a time.
//!
//! The record holds the holder's id and an expiry time. Taking or renewing
//! it is one compare-and-put against the version just read, so two agents
//! never both succeed; another agent takes it only after the expiry has
//! passed. Works the same on every [`crate::store::Store`].

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::ControlError;
use crate::model::LeaseRecord;

use super::Control;

/// The lease whose holder runs the reconcilers.
pub const CONTROL_LEASE: &str = "control";

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Control {
    /// Takes or renews lease `name` for `holder` for the configured
    /// lease time. True when `holder` holds it afterwards.
    pub async fn acquire_lease(&self, name: &str, holder: &str) -> Result<bool, ControlError> {
        let now = now_ms();
        let version = match self.load::<LeaseRecord>(name).await? {
            Some((l, _)) if l.holder != holder && l.expires_ms > now => return Ok(false),
            Some((_, v)) => v,
            None => 0,
        };
        let rec = LeaseRecord {
            name: name.to_owned(),
            holder: holder.to_owned(),
            expires_ms: now + self.cfg.lease_ttl.as_millis() as i64,
        };
        let held = self.save_if(&rec, version).await?.is_some();
        if held && self.note_lease(name, rec.expires_ms) {
            tracing::info!(lease = name, holder, "lease taken");
        }
        Ok(held)
    }

    /// Gives the lease up if `holder` has it, so another agent need not
    /// wait for it to expire.
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), ControlError> {
        if let Some((mut l, v)) = self.load::<LeaseRecord>(name).await? {
            if l.holder == holder {
                l.expires_ms = 0;
                self.save_if(&l, v).await?;
            }
        }
        self.leases.lock().expect("poisoned").remove(name);
        Ok(())
    }

    /// The current record of lease `name`.
    pub async fn lease(&self, name: &str) -> Result<Option<LeaseRecord>, ControlError> {
        Ok(self.load::<LeaseRecord>(name).await?.map(|(l, _)| l))
    }

    /// Whether this process still holds `name` by its own clock (checked
    /// between steps of a long round).
    pub fn holds_lease(&self, name: &str) -> bool {
        self.leases
            .lock()
            .expect("poisoned")
            .get(name)
            .is_some_and(|exp| *exp > now_ms())
    }

    /// Notes a successful acquisition; true if it is a new one.
    fn note_lease(&self, name: &str, expires_ms: i64) -> bool {
        let mut leases = self.leases.lock().expect("poisoned");
        let fresh = leases.get(name).is_none_or(|exp| *exp <= now_ms());
        leases.insert(name.to_owned(), expires_ms);
        fresh
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::control::ControlConfig;
    use crate::store::file::FileStore;

    #[tokio::test]
    async fn one_holder_at_a_time_and_takeover_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn crate::store::Store> =
            Arc::new(FileStore::open(&dir.path().join("s.redb")).unwrap());
        let cfg = ControlConfig {
            lease_ttl: Duration::from_millis(300),
            ..ControlConfig::default()
        };
        let a = Control::new(store.clone(), cfg.clone());
        let b = Control::new(store, cfg);
        assert!(a.acquire_lease(CONTROL_LEASE, "a").await.unwrap());
        assert!(a.holds_lease(CONTROL_LEASE));
        assert!(!b.acquire_lease(CONTROL_LEASE, "b").await.unwrap());
        assert!(!b.holds_lease(CONTROL_LEASE));
        // Renewal keeps it.
        assert!(a.acquire_lease(CONTROL_LEASE, "a").await.unwrap());
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!a.holds_lease(CONTROL_LEASE));
        assert!(b.acquire_lease(CONTROL_LEASE, "b").await.unwrap());
        assert!(!a.acquire_lease(CONTROL_LEASE, "a").await.unwrap());
        assert_eq!(a.lease(CONTROL_LEASE).await.unwrap().unwrap().holder, "b");
        // A released lease is free at once.
        b.release_lease(CONTROL_LEASE, "b").await.unwrap();
        assert!(a.acquire_lease(CONTROL_LEASE, "a").await.unwrap());
    }
}
