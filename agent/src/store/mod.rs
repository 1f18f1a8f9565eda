//! The cluster state store: one trait, real implementations behind it.
//!
//! Keys are strings under a versioned prefix (see [`crate::model`]); values
//! are opaque bytes with a per-key version used for compare-and-swap. The
//! embedded [`file::FileStore`] is the default on one machine; a cluster
//! uses etcd.

pub mod etcd;
pub mod file;

use async_trait::async_trait;

/// A value and the version it was stored at. Versions only grow; 0 means
/// "absent" in [`Store::compare_and_put`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    pub version: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store unavailable: {0}")]
    Unavailable(String),
    #[error("state store is corrupt: {0}")]
    Corrupt(String),
    #[error("record {key} cannot be decoded: {reason}")]
    Decode { key: String, reason: String },
}

/// A strongly consistent key-value store.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError>;

    /// Writes one key unconditionally; returns the new version.
    async fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError>;

    /// Writes one key if its current version is `expected` (0: absent).
    /// Returns the new version, or `None` if the version did not match.
    async fn compare_and_put(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
    ) -> Result<Option<u64>, StoreError>;

    /// Writes one key if its current version is `expected` (0: absent)
    /// and key `guard` is at version `guard_version` (0: absent), both
    /// compared in the same transaction as the write. Returns the new
    /// version, or `None` if either version did not match.
    async fn compare_and_put_guarded(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
        guard: &str,
        guard_version: u64,
    ) -> Result<Option<u64>, StoreError>;

    /// Deletes one key; returns whether it existed.
    async fn delete(&self, key: &str) -> Result<bool, StoreError>;

    /// Every key with `prefix`, in key order.
    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError>;
}

#[cfg(test)]
pub(crate) mod conformance {
    //! Behaviour every [`Store`] implementation must show.
    use super::*;

    pub async fn run(store: &dyn Store) {
        assert_eq!(store.get("/a").await.unwrap(), None);
        let v1 = store.put("/a", b"one").await.unwrap();
        let got = store.get("/a").await.unwrap().unwrap();
        assert_eq!(got.value, b"one");
        assert_eq!(got.version, v1);

        // Compare-and-put succeeds only against the current version.
        assert_eq!(
            store.compare_and_put("/a", b"x", v1 + 100).await.unwrap(),
            None
        );
        let v2 = store
            .compare_and_put("/a", b"two", v1)
            .await
            .unwrap()
            .unwrap();
        assert!(v2 > v1);
        assert!(store
            .compare_and_put("/b", b"new", 0)
            .await
            .unwrap()
            .is_some());
        assert_eq!(
            store.compare_and_put("/b", b"again", 0).await.unwrap(),
            None
        );

        // A guarded write needs both its own and the guard's version.
        let g = store.put("/g", b"guard").await.unwrap();
        let b = store.get("/b").await.unwrap().unwrap().version;
        assert_eq!(
            store
                .compare_and_put_guarded("/b", b"x", b, "/g", g + 100)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .compare_and_put_guarded("/b", b"x", b + 100, "/g", g)
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            store
                .compare_and_put_guarded("/b", b"x", b, "/nope", 1)
                .await
                .unwrap(),
            None
        );
        assert_eq!(store.get("/b").await.unwrap().unwrap().value, b"new");
        let b2 = store
            .compare_and_put_guarded("/b", b"guarded", b, "/g", g)
            .await
            .unwrap()
            .unwrap();
        assert!(b2 > b);
        assert!(store
            .compare_and_put_guarded("/c", b"c", 0, "/absent", 0)
            .await
            .unwrap()
            .is_some());
        assert_eq!(store.get("/b").await.unwrap().unwrap().value, b"guarded");
        // The guard itself is untouched.
        assert_eq!(store.get("/g").await.unwrap().unwrap().version, g);

        store.put("/p/2", b"2").await.unwrap();
        store.put("/p/1", b"1").await.unwrap();
        store.put("/q/1", b"q").await.unwrap();
        let listed: Vec<String> = store
            .list("/p/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(listed, vec!["/p/1", "/p/2"]);

        assert!(store.delete("/p/1").await.unwrap());
        assert!(!store.delete("/p/1").await.unwrap());
        assert_eq!(store.list("/p/").await.unwrap().len(), 1);
    }
}
