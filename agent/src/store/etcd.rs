//! The cluster store: etcd's v3 KV API.
//!
//! A key's version is its etcd `mod_revision`, the cluster-wide revision of
//! its last write, so versions only grow and a deleted and re-created key
//! never reuses an old one. [`Store::compare_and_put`] is one etcd
//! transaction: `mod_revision == expected`, or `create_revision == 0` (the
//! key is absent) when `expected` is 0.
//!
//! Every operation is bounded by the store's timeout: when no member
//! answers, the call fails with [`StoreError::Unavailable`] rather than
//! waiting for etcd to come back. The clients reconnect by themselves, so
//! the same [`EtcdStore`] works again once etcd does.
//!
//! With several endpoints the store talks to one member at a time. Within
//! one call, a read that fails moves on to the next member, and so does a
//! write that provably never took effect (the connection could not be made,
//! or the member has no leader). A write whose outcome is unknown (it timed
//! out or the connection broke) fails, and the next call starts at the next
//! member.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KvClient, ResponseHeader, Txn, TxnOp,
};
use tokio::time::Instant;

use super::{Store, StoreError, Versioned};

/// How long one operation may take when the caller gives no timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The scheme of a store spec naming etcd: `etcd://host:port[,host:port...]`.
pub const SPEC_SCHEME: &str = "etcd://";

/// The shortest connect attempt to one member.
const MIN_CONNECT_TIMEOUT: Duration = Duration::from_millis(200);

/// Largest response the store accepts (a `list` of many records).
const MAX_RESPONSE_BYTES: usize = 64 << 20;

/// A store spec that does not name etcd endpoints.
#[derive(Debug, thiserror::Error)]
#[error("bad etcd store spec {spec:?}: {reason}")]
pub struct SpecError {
    pub spec: String,
    pub reason: String,
}

/// Parses `etcd://h1:p1,etcd://h2:p2` or `etcd://h1:p1,h2:p2` into client
/// URLs (`http://h1:p1`, ...). Hosts may be names, IPv4 addresses or
/// bracketed IPv6 addresses; every endpoint needs an explicit port.
pub fn parse_spec(spec: &str) -> Result<Vec<String>, SpecError> {
    let bad = |reason: String| SpecError {
        spec: spec.to_owned(),
        reason,
    };
    let rest = spec
        .strip_prefix(SPEC_SCHEME)
        .ok_or_else(|| bad(format!("does not start with {SPEC_SCHEME}")))?;
    let mut endpoints = Vec::new();
    for part in rest.split(',') {
        let part = part.trim();
        let hostport = part.strip_prefix(SPEC_SCHEME).unwrap_or(part);
        let hostport = hostport.strip_suffix('/').unwrap_or(hostport);
        if hostport.is_empty() {
            return Err(bad("empty endpoint".into()));
        }
        let (host, port) = hostport
            .rsplit_once(':')
            .ok_or_else(|| bad(format!("endpoint {hostport:?} has no port")))?;
        let host_ok = if let Some(inner) = host.strip_prefix('[') {
            inner
                .strip_suffix(']')
                .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
        } else {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_')
        };
        if !host_ok {
            return Err(bad(format!("endpoint {hostport:?} has a bad host")));
        }
        match port.parse::<u16>() {
            Ok(p) if p != 0 => {}
            _ => return Err(bad(format!("endpoint {hostport:?} has a bad port"))),
        }
        endpoints.push(format!("http://{host}:{port}"));
    }
    Ok(endpoints)
}

/// Opens the etcd store named by a spec such as `etcd://10.0.0.1:2379,10.0.0.2:2379`,
/// with [`DEFAULT_TIMEOUT`]. Fails with [`StoreError::Unavailable`] when the
/// spec is malformed or no endpoint answers.
pub async fn open_etcd(spec: &str) -> Result<EtcdStore, StoreError> {
    let endpoints = parse_spec(spec).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    EtcdStore::connect(&endpoints, None).await
}

/// A store in an etcd cluster.
#[derive(Clone)]
pub struct EtcdStore {
    members: Arc<[Member]>,
    /// The member the next call starts with.
    preferred: Arc<AtomicUsize>,
    timeout: Duration,
}

/// One etcd member's client.
struct Member {
    url: String,
    kv: KvClient,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints())
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A version as etcd compares it, or `None` for one no key can have.
fn revision(version: u64) -> Option<i64> {
    i64::try_from(version).ok()
}

/// An etcd revision as a store version. etcd revisions start at 1 and
/// never go negative; a negative one means the reply is broken.
fn version(key: &str, revision: i64) -> Result<u64, StoreError> {
    u64::try_from(revision)
        .ok()
        .filter(|&v| v > 0)
        .ok_or_else(|| StoreError::Corrupt(format!("etcd returned revision {revision} for {key}")))
}

fn header_version(key: &str, header: Option<&ResponseHeader>) -> Result<u64, StoreError> {
    let header = header
        .ok_or_else(|| StoreError::Unavailable(format!("etcd reply for {key} has no header")))?;
    version(key, header.revision())
}

/// Whether a failed request certainly did not take effect, so that sending
/// it to another member cannot apply it twice: no connection could be made,
/// or the member refused it for want of a leader.
fn never_applied(e: &etcd_client::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(status) => {
            if status.code() == tonic::Code::Unavailable
                && status.message().contains("etcdserver: no leader")
            {
                return true;
            }
            Some(status)
        }
        etcd_client::Error::TransportError(t) => Some(t),
        _ => None,
    };
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether a request changes the store, and so must not be repeated when
/// its outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`) and
    /// checks that some member answers. `timeout` bounds every operation,
    /// this one included ([`DEFAULT_TIMEOUT`] if `None`).
    pub async fn connect(
        endpoints: &[impl AsRef<str>],
        timeout: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let timeout = timeout.unwrap_or(DEFAULT_TIMEOUT);
        if endpoints.is_empty() {
            return Err(StoreError::Unavailable("no etcd endpoints given".into()));
        }
        // Leave time in one call to try the other members when one cannot
        // be reached at all.
        let members_n = u32::try_from(endpoints.len()).unwrap_or(u32::MAX);
        let connect_timeout = (timeout / members_n).max(MIN_CONNECT_TIMEOUT);
        let options = ConnectOptions::new()
            .with_connect_timeout(connect_timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(10), timeout)
            // A member cut off from the majority answers at once instead of
            // holding the request until its timeout.
            .with_require_leader(true);
        let mut members = Vec::with_capacity(endpoints.len());
        for url in endpoints {
            let url = url.as_ref().to_owned();
            // Connecting only sets the client up; the first request dials.
            let client =
                tokio::time::timeout(timeout, Client::connect([&url], Some(options.clone())))
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable(format!("etcd at {url}: connect timed out"))
                    })?
                    .map_err(|e| StoreError::Unavailable(format!("etcd at {url}: {e}")))?;
            let kv = client
                .kv_client()
                .max_decoding_message_size(MAX_RESPONSE_BYTES);
            members.push(Member { url, kv });
        }
        let store = EtcdStore {
            members: members.into(),
            preferred: Arc::new(AtomicUsize::new(0)),
            timeout,
        };
        // One read tells a wrong address or a stopped cluster now rather
        // than at the first real operation.
        store
            .bounded("connect", Op::Read, |mut kv| async move {
                kv.get("/", Some(GetOptions::new().with_count_only())).await
            })
            .await?;
        Ok(store)
    }

    /// The endpoints this store was opened with.
    pub fn endpoints(&self) -> Vec<&str> {
        self.members.iter().map(|m| m.url.as_str()).collect()
    }

    /// The bound on each operation.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs one request within the store's timeout, starting at the
    /// preferred member and moving on while the request certainly never
    /// took effect (a read may always move on). Every failure is
    /// [`StoreError::Unavailable`].
    async fn bounded<T, F, Fut>(&self, what: &str, op: Op, f: F) -> Result<T, StoreError>
    where
        F: Fn(KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        let n = self.members.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut errors = Vec::new();
        for i in (0..n).map(|k| (first + k) % n) {
            let member = &self.members[i];
            match tokio::time::timeout_at(deadline, f(member.kv.clone())).await {
                Ok(Ok(v)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) if op == Op::Read || never_applied(&e) => {
                    errors.push(format!("{}: {e}", member.url));
                }
                outcome => {
                    // The outcome is unknown: fail this call, and start the
                    // next one elsewhere in case this member is stuck.
                    self.preferred.store((i + 1) % n, Ordering::Relaxed);
                    let reason = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => format!("no answer within {:?}", self.timeout),
                    };
                    return Err(StoreError::Unavailable(format!(
                        "etcd {what} at {}: {reason}",
                        member.url
                    )));
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "etcd {what}: no member reachable: {}",
            errors.join("; ")
        )))
    }
}

/// The comparison "`key` is at `version`" (0: absent); `None` for a version
/// etcd cannot express (no key is ever at it).
fn version_is(key: &str, version: u64) -> Option<Compare> {
    if version == 0 {
        return Some(Compare::create_revision(key, CompareOp::Equal, 0));
    }
    revision(version).map(|rev| Compare::mod_revision(key, CompareOp::Equal, rev))
}

impl EtcdStore {
    /// Puts `key` in one transaction if every comparison holds.
    async fn put_when(
        &self,
        key: &str,
        value: &[u8],
        compares: Vec<Compare>,
    ) -> Result<Option<u64>, StoreError> {
        let txn = Txn::new()
            .when(compares)
            .and_then([TxnOp::put(key, value, None)]);
        let resp = self
            .bounded("compare-and-put", Op::Write, |mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        if !resp.succeeded() {
            return Ok(None);
        }
        header_version(key, resp.header()).map(Some)
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let resp = self
            .bounded(
                "get",
                Op::Read,
                |mut kv| async move { kv.get(key, None).await },
            )
            .await?;
        match resp.kvs().first() {
            None => Ok(None),
            Some(kv) => Ok(Some(Versioned {
                value: kv.value().to_vec(),
                version: version(key, kv.mod_revision())?,
            })),
        }
    }

    async fn put(&self, key: &str, value: &[u8]) -> Result<u64, StoreError> {
        let resp = self
            .bounded("put", Op::Write, |mut kv| async move {
                kv.put(key, value, None).await
            })
            .await?;
        header_version(key, resp.header())
    }

    async fn compare_and_put(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
    ) -> Result<Option<u64>, StoreError> {
        let Some(compare) = version_is(key, expected) else {
            return Ok(None);
        };
        self.put_when(key, value, vec![compare]).await
    }

    async fn compare_and_put_guarded(
        &self,
        key: &str,
        value: &[u8],
        expected: u64,
        guard: &str,
        guard_version: u64,
    ) -> Result<Option<u64>, StoreError> {
        let (Some(own), Some(theirs)) =
            (version_is(key, expected), version_is(guard, guard_version))
        else {
            return Ok(None);
        };
        self.put_when(key, value, vec![own, theirs]).await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let resp = self
            .bounded("delete", Op::Write, |mut kv| async move {
                kv.delete(key, None).await
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>, StoreError> {
        // etcd returns a range in ascending key (byte) order by default,
        // which is the order of the keys as strings.
        let resp = self
            .bounded("list", Op::Read, |mut kv| async move {
                kv.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        resp.kvs()
            .iter()
            .map(|kv| {
                let key = kv
                    .key_str()
                    .map_err(|e| StoreError::Decode {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        reason: format!("key is not UTF-8: {e}"),
                    })?
                    .to_owned();
                let version = version(&key, kv.mod_revision())?;
                Ok((
                    key,
                    Versioned {
                        value: kv.value().to_vec(),
                        version,
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_forms_parse_to_http_endpoints() {
        assert_eq!(
            parse_spec("etcd://127.0.0.1:2379").unwrap(),
            vec!["http://127.0.0.1:2379"]
        );
        assert_eq!(
            parse_spec("etcd://a:1,etcd://b.example:2").unwrap(),
            vec!["http://a:1", "http://b.example:2"]
        );
        assert_eq!(
            parse_spec("etcd://a:1, b:2,[::1]:3").unwrap(),
            vec!["http://a:1", "http://b:2", "http://[::1]:3"]
        );
    }

    #[test]
    fn bad_specs_are_rejected() {
        for spec in [
            "",
            "etcd://",
            "http://a:1",
            "etcd://a",
            "etcd://a:",
            "etcd://a:0",
            "etcd://a:70000",
            "etcd://a:1,",
            "etcd://:1",
            "etcd://a b:1",
            "etcd://[zz]:1",
            "etcd://a:1,etcd://",
        ] {
            assert!(parse_spec(spec).is_err(), "{spec:?} was accepted");
        }
    }

    #[test]
    fn versions_beyond_etcd_range_never_match() {
        assert_eq!(revision(u64::MAX), None);
        assert_eq!(revision(7), Some(7));
        assert!(version("/k", 0).is_err());
        assert!(version("/k", -3).is_err());
        assert_eq!(version("/k", 9).unwrap(), 9);
    }

    #[tokio::test]
    async fn refused_connections_are_known_not_applied() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let client = Client::connect([format!("http://127.0.0.1:{port}")], None)
            .await
            .unwrap();
        let err = client
            .kv_client()
            .put("/k", "v", None)
            .await
            .expect_err("nothing listens there");
        assert!(never_applied(&err), "{err:?}");

        let no_leader = tonic::Status::unavailable("etcdserver: no leader");
        assert!(never_applied(&etcd_client::Error::GRpcStatus(no_leader)));
        let timed_out = tonic::Status::unavailable("etcdserver: request timed out");
        assert!(!never_applied(&etcd_client::Error::GRpcStatus(timed_out)));
        let unknown = tonic::Status::unknown("transport error");
        assert!(!never_applied(&etcd_client::Error::GRpcStatus(unknown)));
    }

    /// One etcd server on free loopback ports, started by
    /// `scripts/start-etcd.sh` and killed when dropped.
    struct Etcd {
        pid: String,
        _dir: tempfile::TempDir,
        client_url: String,
    }

    impl Etcd {
        fn start() -> Etcd {
            let dir = tempfile::tempdir().unwrap();
            let free = || {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            };
            let (client, peer) = (free(), free());
            let script =
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/start-etcd.sh");
            let out = std::process::Command::new("bash")
                .arg(&script)
                .arg(dir.path().join("data"))
                .arg(client.to_string())
                .arg(peer.to_string())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "start-etcd.sh failed (install etcd with `apt-get install -y etcd-server`):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            Etcd {
                pid: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
                _dir: dir,
                client_url: format!("http://127.0.0.1:{client}"),
            }
        }
    }

    impl Drop for Etcd {
        fn drop(&mut self) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.pid])
                .status();
        }
    }

    #[tokio::test]
    async fn etcd_store_conforms() {
        let etcd = Etcd::start();
        let store = EtcdStore::connect(&[&etcd.client_url], Some(Duration::from_secs(3)))
            .await
            .unwrap();
        crate::store::conformance::run(&store).await;

        // Versions are etcd revisions: a re-created key gets a new, larger one.
        let before = store.get("/a").await.unwrap().unwrap().version;
        assert!(store.delete("/a").await.unwrap());
        let again = store
            .compare_and_put("/a", b"back", 0)
            .await
            .unwrap()
            .unwrap();
        assert!(again > before);
        assert_eq!(
            store.compare_and_put("/a", b"x", before).await.unwrap(),
            None
        );
        assert_eq!(
            store.compare_and_put("/a", b"x", u64::MAX).await.unwrap(),
            None
        );

        // The empty prefix lists everything, in key order.
        let all: Vec<String> = store
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(all, vec!["/a", "/b", "/c", "/g", "/p/2", "/q/1"]);
    }
}
