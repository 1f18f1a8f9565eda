//! The etcd store against a real etcd server (Debian's `etcd-server`,
//! started by `scripts/start-etcd.sh` on free loopback ports): an outage
//! fails operations quickly instead of hanging them, and a restarted server
//! serves the data it had, to the same store handle.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cairn_agent::store::etcd::{open_etcd, EtcdStore};
use cairn_agent::store::{Store, StoreError};

/// The bound the tests give every store operation.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// One single-member etcd with its data in a temporary directory.
struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    pid: Option<String>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    fn start() -> Etcd {
        let mut etcd = Etcd {
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            pid: None,
        };
        etcd.restart();
        etcd
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spec(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// Starts the server on the same data directory and ports.
    fn restart(&mut self) {
        assert!(self.pid.is_none(), "etcd is already running");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/start-etcd.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(self.data_dir())
            .arg(self.client_port.to_string())
            .arg(self.peer_port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "could not start etcd; these tests need Debian's etcd-server: \
             run `apt-get install -y etcd-server`\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.pid = Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }

    /// Sends `signal` (a `kill` name such as `STOP`) to the server.
    fn signal(&self, signal: &str) {
        let pid = self.pid.as_deref().expect("etcd is not running");
        let status = Command::new("kill")
            .args([&format!("-{signal}"), pid])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// SIGKILLs the server and waits until its client port is closed.
    fn kill(&mut self) {
        let Some(pid) = self.pid.take() else { return };
        let status = Command::new("kill").args(["-KILL", &pid]).status().unwrap();
        assert!(status.success(), "kill {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&self.client_addr(), Duration::from_millis(100)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "etcd {pid} still listens after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            // A stopped process dies on SIGKILL too.
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
    }
}

/// Runs `op`, asserting it fails with `Unavailable` within the bound.
async fn fails_fast<T: std::fmt::Debug>(
    what: &str,
    op: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Duration {
    let started = Instant::now();
    // The outer limit turns a hang into a failure instead of a stuck test.
    let result = tokio::time::timeout(OP_TIMEOUT * 3, op)
        .await
        .unwrap_or_else(|_| panic!("{what} hung while etcd was unreachable"));
    let took = started.elapsed();
    match result {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("{what} with etcd unreachable gave {other:?}, not Unavailable"),
    }
    assert!(
        took <= OP_TIMEOUT + Duration::from_millis(500),
        "{what} took {took:?} to fail, more than the {OP_TIMEOUT:?} bound"
    );
    took
}

#[tokio::test]
async fn outage_fails_fast_and_restart_keeps_the_data() {
    let mut etcd = Etcd::start();
    let store = open_etcd_with(&etcd, OP_TIMEOUT).await;

    let v_vol = store.put("/v1/volumes/a", b"volume a").await.unwrap();
    let v_node = store
        .compare_and_put("/v1/nodes/n1", b"node 1", 0)
        .await
        .unwrap()
        .unwrap();
    assert!(v_node > v_vol);

    etcd.kill();
    let mut slowest = Duration::ZERO;
    slowest = slowest.max(fails_fast("get", store.get("/v1/volumes/a")).await);
    slowest = slowest.max(fails_fast("put", store.put("/v1/volumes/b", b"b")).await);
    slowest = slowest.max(
        fails_fast(
            "compare_and_put",
            store.compare_and_put("/v1/volumes/a", b"x", v_vol),
        )
        .await,
    );
    slowest = slowest.max(fails_fast("delete", store.delete("/v1/nodes/n1")).await);
    slowest = slowest.max(fails_fast("list", store.list("/v1/")).await);
    println!("slowest failure with etcd down: {slowest:?}");
    // A new store cannot open while nothing answers, and says so quickly.
    let spec = etcd.spec();
    fails_fast("open_etcd", open_etcd(&spec)).await;

    etcd.restart();
    // The same handle reconnects by itself; allow it a few tries while its
    // connection comes back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let listed = loop {
        match store.list("/v1/").await {
            Ok(listed) => break listed,
            Err(e) => {
                assert!(Instant::now() < deadline, "store did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let keys: Vec<(&str, &[u8], u64)> = listed
        .iter()
        .map(|(k, v)| (k.as_str(), v.value.as_slice(), v.version))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("/v1/nodes/n1", &b"node 1"[..], v_node),
            ("/v1/volumes/a", &b"volume a"[..], v_vol),
        ],
        "nothing written while etcd was down may appear, nothing before may be lost"
    );

    // Versions carry on across the restart: the old one still guards writes.
    assert_eq!(
        store
            .compare_and_put("/v1/volumes/a", b"x", v_vol + 1)
            .await
            .unwrap(),
        None
    );
    let v_new = store
        .compare_and_put("/v1/volumes/a", b"volume a2", v_vol)
        .await
        .unwrap()
        .unwrap();
    assert!(v_new > v_node);

    // A store opened from the CLI form sees the same data.
    let reopened = open_etcd(&format!("{spec},etcd://127.0.0.1:{}", etcd.client_port))
        .await
        .unwrap();
    let got = reopened.get("/v1/volumes/a").await.unwrap().unwrap();
    assert_eq!(
        (got.value.as_slice(), got.version),
        (&b"volume a2"[..], v_new)
    );
}

#[tokio::test]
async fn frozen_etcd_times_out_then_recovers() {
    // A stopped server keeps its connections open but never answers: only
    // the store's own bound ends the wait.
    let etcd = Etcd::start();
    let store = open_etcd_with(&etcd, OP_TIMEOUT).await;
    let v = store.put("/v1/k", b"before").await.unwrap();

    etcd.signal("STOP");
    let took_get = fails_fast("get", store.get("/v1/k")).await;
    let took_cas = fails_fast("compare_and_put", store.compare_and_put("/v1/k", b"x", v)).await;
    println!("frozen etcd: get failed after {took_get:?}, compare_and_put after {took_cas:?}");
    assert!(took_get >= OP_TIMEOUT - Duration::from_millis(100));
    etcd.signal("CONT");

    let deadline = Instant::now() + Duration::from_secs(10);
    let got = loop {
        match store.get("/v1/k").await {
            Ok(got) => break got,
            Err(e) => {
                assert!(Instant::now() < deadline, "store did not recover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    // The timed-out compare-and-put may or may not have reached etcd before
    // it froze; either way the key holds one of the two values, consistently.
    let got = got.unwrap();
    if got.version == v {
        assert_eq!(got.value, b"before");
    } else {
        assert!(got.version > v);
        assert_eq!(got.value, b"x");
    }
}

async fn open_etcd_with(etcd: &Etcd, timeout: Duration) -> EtcdStore {
    let endpoints = [format!("http://127.0.0.1:{}", etcd.client_port)];
    EtcdStore::connect(&endpoints, Some(timeout)).await.unwrap()
}

#[tokio::test]
async fn an_unreachable_member_is_skipped() {
    // The first endpoint has nothing behind it; every call must still
    // succeed through the live one, and without waiting out the timeout.
    let etcd = Etcd::start();
    let dead = free_port();
    let spec = format!("etcd://127.0.0.1:{dead},127.0.0.1:{}", etcd.client_port);
    let store = open_etcd(&spec).await.unwrap();
    let started = Instant::now();
    let mut last = 0;
    for i in 0..20u32 {
        let v = store
            .compare_and_put("/v1/counter", &i.to_be_bytes(), last)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("write {i} lost its compare"));
        assert!(v > last);
        last = v;
    }
    let got = store.get("/v1/counter").await.unwrap().unwrap();
    assert_eq!(
        (got.value, got.version),
        (19u32.to_be_bytes().to_vec(), last)
    );
    assert_eq!(store.list("/v1/").await.unwrap().len(), 1);
    assert!(store.delete("/v1/counter").await.unwrap());
    let took = started.elapsed();
    println!("23 calls with one dead member listed first: {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn nothing_listening_is_unavailable_not_a_hang() {
    let port = free_port();
    let started = Instant::now();
    let result = EtcdStore::connect(
        &[format!("http://127.0.0.1:{port}")],
        Some(Duration::from_secs(1)),
    )
    .await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));

    for bad in ["etcd://", "etcd://host", "file:///x", "etcd://a:1,,b:2"] {
        assert!(
            matches!(open_etcd(bad).await, Err(StoreError::Unavailable(_))),
            "{bad:?} was accepted"
        );
    }
}
