//! The embedded store: one redb file, crash-safe through redb's own
//! copy-on-write commits. For a single machine.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Store, StoreError, Versioned};

/// key -> (version, value)
const KV: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("kv");
/// The single key of META holds the last version handed out.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const LAST_VERSION: &str = "last_version";

/// A store in one local file.
#[derive(Clone)]
pub struct FileStore {
    db: Arc<Database>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl FileStore {
    /// Opens the store at `path`, creating it if absent.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::Storage(redb::StorageError::Corrupted(m)) => {
                StoreError::Corrupt(format!("{}: {m}", path.display()))
            }
            other => StoreError::Unavailable(format!("{}: {other}", path.display())),
        })?;
        let txn = db.begin_write().map_err(unavailable)?;
        {
            txn.open_table(KV).map_err(unavailable)?;
            txn.open_table(META).map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)?;
        Ok(FileStore { db: Arc::new(db) })
    }

    /// Runs blocking redb work off the async runtime's worker.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(unavailable)?
    }

    fn write(
        db: &Database,
        key: &str,
        value: Option<&[u8]>,
        expected: Option<u64>,
        guard: Option<(&str, u64)>,
    ) -> Result<Option<u64>, StoreError> {
        let txn = db.begin_write().map_err(unavailable)?;
        let result = {
            let mut kv = txn.open_table(KV).map_err(unavailable)?;
            if let Some((gkey, gversion)) = guard {
                let at = kv
                    .get(gkey)
                    .map_err(unavailable)?
                    .map(|g| g.value().0)
                    .unwrap_or(0);
                if at != gversion {
                    return Ok(None);
                }
            }
            let current = kv
                .get(key)
                .map_err(unavailable)?
                .map(|g| g.value().0)
                .unwrap_or(0);
            if expected.is_some_and(|e| e != current) {
                return Ok(None);
            }
            match value {
                Some(v) => {
                    let mut meta = txn.open_table(META).map_err(unavailable)?;
                    let last = meta
                        .get(LAST_VERSION)
                        .map_err(unavailable)?
                        .map(|g| g.value());
                    let next = last.unwrap_or(0) + 1;
                    meta.insert(LAST_VERSION, next).map_err(unavailable)?;
                    kv.insert(key, (next, v)).map_err(unavailable)?;
                    Some(next)
                }
                None => kv.remove(key).map_err(unavailable)?.map(|g| g.value().0),
            }
        };
        txn.commit().map_err(unavailable)?;
        Ok(result)
    }
}

#[async_trait]
impl Store for FileStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let key = key.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let kv = txn.open_table(KV).map_err(unavailable)?;
            Ok(kv.get(key.as_str()).map_err(unavailable)?.map(|g| {
                let (version, value) = g.value();
                Versioned {
                    value: value.to_vec(),
                    version,
                }
            }))
        })
        .await
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.blocking(move |db| {
            FileStore::write(db, &key, Some(&value), None, None)?
                .ok_or_else(|| StoreError::Unavailable("unconditional put lost".into()))
        })
        .await
    }

    async fn compare_and_put(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
    ) -> Result<Option<u64>, StoreError> {
        let (key, value) = (key.to_owned(), value.to_vec());
        self.blocking(move |db| FileStore::write(db, &key, Some(&value), Some(expected), None))
            .await
    }

    async fn compare_and_put_guarded(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
        guard: &str,
        guard_version: u64,
    ) -> Result<Option<u64>, StoreError> {
        let (key, value, guard) = (key.to_owned(), value.to_vec(), guard.to_owned());
        self.blocking(move |db| {
            FileStore::write(
                db,
                &key,
                Some(&value),
                Some(expected),
                Some((&guard, guard_version)),
            )
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_owned();
        self.blocking(move |db| Ok(FileStore::write(db, &key, None, None, None)?.is_some()))
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        let prefix = prefix.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let kv = txn.open_table(KV).map_err(unavailable)?;
            let mut out = Vec::new();
            for item in kv.range(prefix.as_str()..).map_err(unavailable)? {
                let (k, v) = item.map_err(unavailable)?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let (version, value) = v.value();
                out.push((
                    key.to_owned(),
                    Versioned {
                        value: value.to_vec(),
                        version,
                    },
                ));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_store_conforms_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let store = FileStore::open(&path).unwrap();
            crate::store::conformance::run(&store).await;
        }
        let reopened = FileStore::open(&path).unwrap();
        assert_eq!(reopened.get("/a").await.unwrap().unwrap().value, b"two");
    }

    #[test]
    fn garbage_file_is_reported_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        assert!(FileStore::open(&path).is_err());
    }
}
