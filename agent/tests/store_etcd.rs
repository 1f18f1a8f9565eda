//! The etcd store against a real etcd server (Debian's `etcd-server`,
//! started by `scripts/start-etcd.sh` on free loopback ports): an outage
//! fails operations quickly instead of hanging them, and a restarted server
//! serves the data it had, to the same store handle.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cairn_agent::store::etcd::{open_etcd, EtcdStore};
use cairn_agent::store::{Store, StoreError};

/// The bound the tests give every store operation.
const OP_TIMEOUT: Duration = Duration::from_secs(2);

/// One etcd member with its data in a temporary directory.
struct Etcd {
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    name: String,
    /// `name=peer_url,...` of every member, for a cluster of several.
    initial_cluster: Option<String>,
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
    fn new(name: &str) -> Etcd {
        Etcd {
            dir: tempfile::tempdir().unwrap(),
            client_port: free_port(),
            peer_port: free_port(),
            name: name.to_owned(),
            initial_cluster: None,
            pid: None,
        }
    }

    /// A single-member cluster.
    fn start() -> Etcd {
        let mut etcd = Etcd::new("solo");
        etcd.restart();
        etcd
    }

    /// A cluster of `n` members, started together (each waits for a quorum).
    fn cluster(n: usize) -> Vec<Etcd> {
        let mut members: Vec<Etcd> = (0..n).map(|i| Etcd::new(&format!("m{i}"))).collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        for m in &mut members {
            m.initial_cluster = Some(initial.clone());
        }
        let starting: Vec<_> = members.iter().map(Etcd::launch).collect();
        for (m, child) in members.iter_mut().zip(starting) {
            m.started(child.wait_with_output().unwrap());
        }
        members
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn spec(&self) -> String {
        format!("etcd://127.0.0.1:{}", self.client_port)
    }

    fn client_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.client_port))
    }

    /// Runs the start script; it exits once the member serves requests.
    fn launch(&self) -> Child {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/start-etcd.sh");
        let mut cmd = Command::new("bash");
        cmd.arg(&script)
            .arg(self.data_dir())
            .arg(self.client_port.to_string())
            .arg(self.peer_port.to_string())
            .env("CAIRN_ETCD_NAME", &self.name)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(initial) = &self.initial_cluster {
            cmd.env("CAIRN_ETCD_INITIAL_CLUSTER", initial);
        }
        cmd.spawn().unwrap()
    }

    fn started(&mut self, out: Output) {
        assert!(
            out.status.success(),
            "could not start etcd (these tests need Debian's etcd-server: \
             `apt-get install -y etcd-server`)\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        self.pid = Some(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }

    /// Starts the server on the same data directory and ports.
    fn restart(&mut self) {
        assert!(self.pid.is_none(), "etcd is already running");
        let out = self.launch().wait_with_output().unwrap();
        self.started(out);
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
    let (listed, _) = until_ok(Duration::from_secs(10), || store.list("/v1/")).await;
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

    let (got, _) = until_ok(Duration::from_secs(10), || store.get("/v1/k")).await;
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
    EtcdStore::connect(&[etcd.url()], Some(timeout))
        .await
        .unwrap()
}

/// Retries `op` until it succeeds, for at most `limit`; returns the value
/// and how many calls failed first.
async fn until_ok<T, Fut>(limit: Duration, mut op: impl FnMut() -> Fut) -> (T, usize)
where
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let deadline = Instant::now() + limit;
    let mut failed = 0;
    loop {
        match op().await {
            Ok(v) => return (v, failed),
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "still failing after {limit:?}: {e}"
                );
                failed += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
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
async fn a_cluster_survives_losing_the_member_in_use() {
    let mut members = Etcd::cluster(3);
    let endpoints: Vec<String> = members.iter().map(Etcd::url).collect();
    let store = EtcdStore::connect(&endpoints, Some(OP_TIMEOUT))
        .await
        .unwrap();
    let v = store.put("/v1/volumes/a", b"a").await.unwrap();

    // The store starts with the first member; losing it (perhaps the
    // leader) may fail calls while the rest elect, but never for long and
    // never with lost data. A read whose connection breaks moves on to the
    // next member within the same call.
    members[0].kill();
    let started = Instant::now();
    let (got, failed) = until_ok(Duration::from_secs(10), || store.get("/v1/volumes/a")).await;
    println!(
        "after losing a member of 3: first success after {:?}, {failed} failed calls",
        started.elapsed()
    );
    assert_eq!(got.map(|g| (g.value, g.version)), Some((b"a".to_vec(), v)));
    let v2 = store
        .compare_and_put("/v1/volumes/a", b"a2", v)
        .await
        .unwrap()
        .unwrap();
    assert!(v2 > v);

    // The lost member comes back and catches up; a store that knows only
    // it reads the newest value.
    members[0].restart();
    let alone = EtcdStore::connect(&[members[0].url()], Some(OP_TIMEOUT))
        .await
        .unwrap();
    let (got, _) = until_ok(Duration::from_secs(10), || alone.get("/v1/volumes/a")).await;
    assert_eq!(
        got.map(|g| (g.value, g.version)),
        Some((b"a2".to_vec(), v2))
    );
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

#[tokio::test]
async fn the_control_lease_has_one_holder_on_etcd_and_passes_on_after_expiry() {
    use cairn_agent::control::lease::CONTROL_LEASE;
    use cairn_agent::control::{Control, ControlConfig};
    use std::sync::Arc;

    let mut etcd = Etcd::start();
    let cfg = ControlConfig {
        lease_ttl: Duration::from_millis(800),
        ..ControlConfig::default()
    };
    let a = Control::new(
        Arc::new(open_etcd_with(&etcd, OP_TIMEOUT).await),
        cfg.clone(),
    );
    let b = Control::new(Arc::new(open_etcd_with(&etcd, OP_TIMEOUT).await), cfg);

    // Both race for it: exactly one wins.
    let (ra, rb) = tokio::join!(
        a.acquire_lease(CONTROL_LEASE, "a"),
        b.acquire_lease(CONTROL_LEASE, "b")
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra ^ rb, "a: {ra}, b: {rb}");
    let (holder, other, other_id) = if ra { (&a, &b, "b") } else { (&b, &a, "a") };
    let holder_id = if ra { "a" } else { "b" };
    // Renewals keep it past the first expiry.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(holder
            .acquire_lease(CONTROL_LEASE, holder_id)
            .await
            .unwrap());
        assert!(!other.acquire_lease(CONTROL_LEASE, other_id).await.unwrap());
    }

    // etcd goes away: the holder cannot renew, says so quickly, and its
    // own clock tells it the lease lapsed.
    etcd.kill();
    fails_fast_control(holder.acquire_lease(CONTROL_LEASE, holder_id)).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(!holder.holds_lease(CONTROL_LEASE));

    // Back, with the old holder silent: the other one takes over.
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !matches!(other.acquire_lease(CONTROL_LEASE, other_id).await, Ok(true)) {
        assert!(Instant::now() < deadline, "no takeover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!holder
        .acquire_lease(CONTROL_LEASE, holder_id)
        .await
        .unwrap());
    assert_eq!(
        other.lease(CONTROL_LEASE).await.unwrap().unwrap().holder,
        other_id
    );
}

async fn fails_fast_control<T: std::fmt::Debug>(
    op: impl std::future::Future<Output = Result<T, cairn_agent::error::ControlError>>,
) {
    let started = Instant::now();
    let r = tokio::time::timeout(OP_TIMEOUT * 3, op)
        .await
        .expect("hung while etcd was down");
    assert!(
        matches!(
            r,
            Err(cairn_agent::error::ControlError::Store(
                StoreError::Unavailable(_)
            ))
        ),
        "{r:?}"
    );
    assert!(started.elapsed() <= OP_TIMEOUT + Duration::from_millis(500));
}

#[tokio::test]
async fn nexus_health_is_unavailable_while_etcd_is_away_so_the_engine_retries() {
    use apb::control_server::Control as _;
    use cairn_agent::control::{Control, ControlConfig};
    use cairn_agent::service::ControlService;
    use cairn_proto::agent::v1 as apb;
    use std::sync::Arc;

    let mut etcd = Etcd::start();
    let store = Arc::new(open_etcd_with(&etcd, OP_TIMEOUT).await);
    let control = Control::new(store, ControlConfig::default());
    let svc = ControlService::new(control.clone());
    let req = || {
        tonic::Request::new(apb::RecordNexusHealthRequest {
            volume_id: "6f1b9c8e-2a44-4c1d-9a57-1d2b3c4d5e6f".into(),
            healthy_children: vec!["replica:///0a0a0a0a-0000-4000-8000-000000000001".into()],
            clean_shutdown: false,
            generation: 3,
            instance: "i".into(),
        })
    };
    etcd.kill();
    let err = svc.record_nexus_health(req()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = svc.record_nexus_health(req()).await {
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        assert!(Instant::now() < deadline, "still failing: {e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A malformed child is the caller's mistake, not worth a retry.
    let mut bad = req();
    bad.get_mut().healthy_children = vec!["bogus".into()];
    let err = svc.record_nexus_health(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}
