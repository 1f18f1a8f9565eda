//! A nexus over a local replica and a remote one (reached through Cairn's
//! NVMe/TCP initiator) under faults, with a host writing through NVMe/TCP
//! and a verifying writer: every block carries the LBA and sequence number
//! of the write that put it there, and every acknowledged write is checked
//! at the end.
//!
//! - The remote replica's engine goes away mid-write: the volume keeps
//!   serving, the nexus records its shrunken healthy set, and when the
//!   engine is back only the segments written meanwhile are copied.
//! - The nexus's own engine crashes mid-write: a new nexus is built from the
//!   recorded healthy set alone, the other replica is rebuilt whole.
//!
//! Both end with the two replicas compared block by block.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_bdev::{BlockDevice, IoBuf};
use cairn_engine::core::Engine;
use cairn_engine::daemon::{self, EngineConfig};
use cairn_engine::initiator::{InitiatorOptions, NvmfDevice};
use cairn_engine::nexus::{ChildState, HealthDone, HealthRecord, HealthRecorder, NexusConfig};
use cairn_engine::reactor::Reactors;
use uuid::Uuid;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:33333333-2222-3333-4444-555555555555";
const VOLUME: u64 = 64 << 20;
const SEGMENT: u64 = 256 << 10;
const BLOCK: usize = 4096;
/// The writer's region: a sixteenth of the volume.
const HOT_BLOCKS: u64 = (4 << 20) / BLOCK as u64;

/// Keeps the latest health record of each nexus instance, as the agent's
/// store would.
#[derive(Default)]
struct Recorded {
    latest: Mutex<Option<HealthRecord>>,
}

struct MemRecorder(Arc<Recorded>);

impl HealthRecorder for MemRecorder {
    fn record(&self, rec: HealthRecord, done: HealthDone) {
        let mut latest = self.0.latest.lock().unwrap();
        let newer = latest
            .as_ref()
            .is_none_or(|l| l.instance != rec.instance || l.generation <= rec.generation);
        if newer {
            *latest = Some(rec);
        }
        done(Ok(()));
    }
}

fn free_port(ip: [u8; 4]) -> SocketAddr {
    let l = std::net::TcpListener::bind(SocketAddr::from((ip, 0))).unwrap();
    l.local_addr().unwrap()
}

fn start_engine(addr: SocketAddr, pool: &Path, name: &str) -> Arc<Engine> {
    let cfg = EngineConfig {
        nvmf_listen: addr,
        reactors: 1,
        max_io_queues: 4,
        host_nqn: format!("nqn.2024-01.dev.cairn:engine:{name}"),
        pools: vec![],
        nexus: NexusConfig {
            io_timeout: Duration::from_secs(2),
            pause: Duration::from_secs(2),
            segment_bytes: SEGMENT,
            ..NexusConfig::default()
        },
        busy_poll: cairn_engine::target::DEFAULT_BUSY_POLL,
    };
    // A restarted engine may find its port in TIME_WAIT for a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let engine = loop {
        match daemon::start(&cfg, daemon::remote_opener(cfg.host_nqn.clone())) {
            Ok(e) => break e,
            Err(e) if Instant::now() < deadline => {
                eprintln!("engine {name} not up yet: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("engine {name}: {e}"),
        }
    };
    let size = if pool.exists() { 0 } else { 256 << 20 };
    engine.create_pool("pool", pool, size, 0).unwrap();
    engine
}

fn tagged(lba: u64, seq: u64) -> IoBuf {
    let mut b = IoBuf::zeroed(BLOCK);
    for (i, chunk) in b.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&lba.to_le_bytes());
        chunk[8..].copy_from_slice(&(seq ^ i as u64).to_le_bytes());
    }
    b
}

/// What each written block may hold: the sequence number of the last
/// acknowledged write, then those of later writes that failed (a failed
/// write may or may not have landed). [`NEVER`] stands for the zeros of a
/// block no acknowledged write reached.
type Model = HashMap<u64, Vec<u64>>;
const NEVER: u64 = u64::MAX;

/// A host writing tagged blocks through NVMe/TCP until stopped.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    model: Arc<Mutex<Model>>,
    done: flume::Receiver<u64>,
}

impl Writer {
    /// Starts writing on top of what `prior` says the blocks hold.
    fn start(client: &Reactors, dev: &NvmfDevice, seed: u64, prior: Model) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let model = Arc::new(Mutex::new(prior));
        let (tx, done) = flume::bounded(1);
        let (d, s, a, m) = (dev.clone(), stop.clone(), acked.clone(), model.clone());
        client
            .spawn(0, move || async move {
                let q = d.open_channel().unwrap();
                let per = BLOCK as u64 / u64::from(d.info().block_size);
                let mut x = seed;
                let mut failed = 0u64;
                let mut seq = seed << 32;
                while !s.load(Ordering::SeqCst) {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let lba = (x >> 33) % HOT_BLOCKS * per;
                    seq += 1;
                    let (r, _) = q.write(lba, tagged(lba, seq), false).await;
                    match r {
                        Ok(()) => {
                            m.lock().unwrap().insert(lba, vec![seq]);
                            a.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(_) => {
                            m.lock()
                                .unwrap()
                                .entry(lba)
                                .or_insert_with(|| vec![NEVER])
                                .push(seq);
                            failed += 1;
                        }
                    }
                }
                let _ = tx.send(failed);
            })
            .unwrap();
        Writer {
            stop,
            acked,
            model,
            done,
        }
    }

    /// Waits until `n` more writes were acknowledged.
    fn wait_for(&self, n: u64) {
        let target = self.acked.load(Ordering::SeqCst) + n;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.acked.load(Ordering::SeqCst) < target {
            assert!(Instant::now() < deadline, "the writer stalled");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the writer; returns the writes that failed.
    fn stop(self) -> (Model, u64) {
        self.stop.store(true, Ordering::SeqCst);
        let failed = self.done.recv().unwrap();
        (self.model.lock().unwrap().clone(), failed)
    }
}

fn connect_host(addr: SocketAddr, vol: &Uuid) -> NvmfDevice {
    let mut o = InitiatorOptions::new(addr, &cairn_nvmf::volume_nqn(vol), HOST);
    o.io_queues = 1;
    NvmfDevice::connect(o).unwrap()
}

/// Checks every acknowledged write through the host's connection.
fn verify(client: &Reactors, dev: &NvmfDevice, model: Model) {
    let d = dev.clone();
    client
        .run(0, move || async move {
            let q = d.open_channel().unwrap();
            for (lba, seqs) in model {
                let (r, got) = q.read(lba, IoBuf::zeroed(BLOCK)).await;
                r.unwrap();
                let found_lba = u64::from_le_bytes(got[..8].try_into().unwrap());
                let found_seq = u64::from_le_bytes(got[8..16].try_into().unwrap());
                let holds = |seq: u64| {
                    if seq == NEVER {
                        got.iter().all(|&x| x == 0)
                    } else {
                        got.as_slice() == tagged(lba, seq).as_slice()
                    }
                };
                assert!(
                    seqs.iter().any(|&seq| holds(seq)),
                    "block {lba}: lost write {seqs:?}; found lba {found_lba} seq {found_seq}"
                );
            }
        })
        .unwrap();
}

/// Compares two replicas block by block.
fn assert_identical(client: &Reactors, a: Arc<dyn BlockDevice>, b: Arc<dyn BlockDevice>) {
    client
        .run(0, move || async move {
            let (qa, qb) = (a.open_channel().unwrap(), b.open_channel().unwrap());
            let chunk = 1 << 20;
            let bs = u64::from(a.info().block_size);
            for off in (0..VOLUME).step_by(chunk) {
                let lba = off / bs;
                let (r, x) = qa.read(lba, IoBuf::zeroed(chunk)).await;
                r.unwrap();
                let (r, y) = qb.read(lba, IoBuf::zeroed(chunk)).await;
                r.unwrap();
                assert!(
                    x.as_slice() == y.as_slice(),
                    "replicas differ in the MiB at {off}"
                );
            }
        })
        .unwrap();
}

fn child_state(engine: &Engine, uri: &str) -> (ChildState, u64, String) {
    engine
        .nexuses(|n| {
            n.nexus
                .children()
                .iter()
                .find(|c| c.uri() == uri)
                .map(|c| (c.state(), c.last_rebuild_bytes(), c.fault_reason()))
        })
        .into_iter()
        .flatten()
        .next()
        .expect("child present")
}

fn wait_state(engine: &Engine, uri: &str, want: ChildState) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s, copied, why) = child_state(engine, uri);
        if s == want {
            return copied;
        }
        assert!(
            Instant::now() < deadline,
            "child {uri} stuck in {s:?} ({why})"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn replica(engine: &Engine, id: &Uuid) -> Arc<dyn BlockDevice> {
    engine.replica(id).unwrap().1
}

#[test]
fn nexus_survives_losing_a_remote_replica_and_its_own_engine() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = tempfile::tempdir().unwrap();
    let (pool_a, pool_b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    let (addr_a, addr_b) = (free_port([127, 0, 0, 1]), free_port([127, 0, 0, 2]));
    let a = start_engine(addr_a, &pool_a, "a");
    let b = start_engine(addr_b, &pool_b, "b");
    let (ra, rb, vol) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    a.create_replica("pool", &ra.to_string(), "v", VOLUME, true)
        .unwrap();
    b.create_replica("pool", &rb.to_string(), "v", VOLUME, true)
        .unwrap();
    let a_host = a.host_nqn().to_owned();
    let share = |b: &Engine| {
        b.share_replica(&rb.to_string(), vec![a_host.clone()])
            .unwrap();
    };
    share(&b);
    let uri_a = format!("replica:///{ra}");
    let uri_b = format!("nvmf://{addr_b}/{}", cairn_nvmf::replica_nqn(&rb));
    let recorded = Arc::new(Recorded::default());
    a.set_health_recorder(Arc::new(MemRecorder(recorded.clone())));
    a.create_nexus(
        &vol.to_string(),
        VOLUME,
        &[uri_a.clone(), uri_b.clone()],
        vec![],
    )
    .unwrap();
    let client = Reactors::start(1, "host").unwrap();
    let host = connect_host(addr_a, &vol);

    // 1. The remote replica's engine goes away mid-write.
    let writer = Writer::start(&client, &host, 1, Model::new());
    writer.wait_for(300);
    b.shutdown();
    drop(b);
    writer.wait_for(300);
    assert_eq!(child_state(&a, &uri_b).0, ChildState::Faulted);
    let rec = recorded.latest.lock().unwrap().clone().unwrap();
    assert_eq!(rec.healthy, vec![uri_a.clone()], "{rec:?}");
    assert_eq!(rec.nexus, vol);

    // It comes back, while the host keeps writing. Its engine restarted
    // (its pool was imported again, a new incarnation, which the nexus
    // learns from the namespace's EUI64): the stale map cannot vouch for
    // writes it may have lost, so it is copied whole.
    let b = start_engine(addr_b, &pool_b, "b");
    share(&b);
    a.online_child(&vol.to_string(), &uri_b).unwrap();
    let copied = wait_state(&a, &uri_b, ChildState::Healthy);
    writer.wait_for(200);
    let (model, failed) = writer.stop();
    assert_eq!(failed, 0, "the host saw write errors");
    assert_eq!(copied, VOLUME, "a restarted replica is copied whole");
    verify(&client, &host, model.clone());
    assert_identical(&client, replica(&a, &ra), replica(&b, &rb));

    // It leaves again without restarting (its share is cut off and given
    // back): only what was written meanwhile is copied.
    let writer = Writer::start(&client, &host, 3, model.clone());
    writer.wait_for(100);
    a.fault_child(&vol.to_string(), &uri_b).unwrap();
    writer.wait_for(300);
    a.online_child(&vol.to_string(), &uri_b).unwrap();
    let copied = wait_state(&a, &uri_b, ChildState::Healthy);
    writer.wait_for(100);
    let (model, failed) = writer.stop();
    assert_eq!(failed, 0, "the host saw write errors");
    assert!(copied > 0, "nothing was resynced");
    assert!(
        copied <= HOT_BLOCKS * BLOCK as u64 && copied * 8 <= VOLUME,
        "resync copied {copied} bytes of a {VOLUME}-byte volume"
    );
    eprintln!("partial resync copied {copied} of {VOLUME} bytes");
    verify(&client, &host, model.clone());
    assert_identical(&client, replica(&a, &ra), replica(&b, &rb));

    // 2. The remote replica leaves again, then the nexus's own engine
    // crashes mid-write.
    let writer = Writer::start(&client, &host, 2, model.clone());
    writer.wait_for(200);
    b.shutdown();
    drop(b);
    writer.wait_for(200);
    a.shutdown(); // no clean-shutdown record: a crash
    drop(a);
    let (model, _failed) = writer.stop();
    host.disconnect();
    let rec = recorded.latest.lock().unwrap().clone().unwrap();
    assert_eq!(rec.healthy, vec![uri_a.clone()]);
    assert!(!rec.clean_shutdown);

    // Restart from the recorded healthy set: the stale replica is not a
    // source; it joins as a new child and is rebuilt whole.
    let a = start_engine(addr_a, &pool_a, "a");
    let b = start_engine(addr_b, &pool_b, "b");
    share(&b);
    a.set_health_recorder(Arc::new(MemRecorder(recorded.clone())));
    a.create_nexus(&vol.to_string(), VOLUME, &rec.healthy, vec![])
        .unwrap();
    let host = connect_host(addr_a, &vol);
    verify(&client, &host, model.clone());
    a.add_child(&vol.to_string(), &uri_b).unwrap();
    let copied = wait_state(&a, &uri_b, ChildState::Healthy);
    assert_eq!(
        copied, VOLUME,
        "a child the log cannot vouch for is copied whole"
    );
    verify(&client, &host, model);
    assert_identical(&client, replica(&a, &ra), replica(&b, &rb));

    host.disconnect();
    client.shutdown();
    a.shutdown();
    b.shutdown();
}
