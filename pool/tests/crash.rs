//! Crash test: a writer process is killed with SIGKILL at random points,
//! many times; after each kill the checker must find the metadata clean and
//! every acknowledged write must read back.
//!
//! The test binary re-executes itself as the writer (`CAIRN_CRASH_ROLE=writer`).
//! The writer logs `@S blk ver` before it submits a 4 KiB write, `@A blk ver`
//! when it is acknowledged, `@Z cluster ver` / `@Y cluster ver` around a
//! whole-cluster deallocate. It never has two operations on one block in
//! flight, so after a kill every block must hold its last acknowledged
//! version or the one in flight. `CAIRN_CRASH_KILLS` sets the number of kills
//! (default 200).

mod common;

use std::cell::RefCell;
use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use cairn_bdev::{BlockDevice, IoBuf};
use cairn_pool::check;
use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

const CS: u32 = 64 * 1024;
const BLK: usize = 4096;
const REPLICA_SIZE: u64 = 8 * MIB;
const NBLK: u64 = REPLICA_SIZE / BLK as u64;
const BLK_PER_CLUSTER: u64 = CS as u64 / BLK as u64;
const QD: usize = 8;
const SCRATCH_SIZE: u64 = 2 * MIB;

fn content(b: u64, v: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(BLK);
    for _ in 0..BLK / 16 {
        out.extend_from_slice(&b.to_le_bytes());
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// What a block holds: `None` for zeros, `Some(ver)` for a version, or an
/// error for anything else (torn, foreign or misplaced data).
fn decode(b: u64, data: &[u8]) -> Result<Option<u64>, String> {
    if data.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    let mut head = [0u8; 16];
    head.copy_from_slice(&data[..16]);
    let blk = u64::from_le_bytes(head[..8].try_into().unwrap());
    let ver = u64::from_le_bytes(head[8..].try_into().unwrap());
    if blk != b || data.chunks(16).any(|c| c != head) {
        return Err(format!(
            "block {b} holds foreign or torn data (head blk={blk} ver={ver})"
        ));
    }
    Ok(Some(ver))
}

fn writer() {
    let path = std::env::var("CAIRN_CRASH_POOL").unwrap();
    let uuid: Uuid = std::env::var("CAIRN_CRASH_REPLICA")
        .unwrap()
        .parse()
        .unwrap();
    let base: u64 = std::env::var("CAIRN_CRASH_VER").unwrap().parse().unwrap();
    let seed: u64 = std::env::var("CAIRN_CRASH_SEED").unwrap().parse().unwrap();
    let pool = cairn_pool::Pool::import(path.as_ref()).unwrap();
    let rep = pool.replica(uuid).unwrap();
    // Control operations race with the I/O, so kills also land inside
    // thick replica creation and replica destruction.
    let control = pool.clone();
    std::thread::spawn(move || loop {
        let r = control
            .create_replica(thick("scratch", SCRATCH_SIZE))
            .unwrap();
        control.destroy_replica(r.uuid()).unwrap();
    });
    let out = Rc::new(RefCell::new(std::io::stdout()));
    let log = move |s: String| {
        let mut o = out.borrow_mut();
        o.write_all(s.as_bytes()).unwrap();
        o.flush().unwrap();
    };
    on_reactor(async move {
        let ch = Rc::new(rep.open_channel().unwrap());
        let busy: Rc<RefCell<HashSet<u64>>> = Rc::default();
        let ver = Rc::new(RefCell::new(base));
        let rng = Rc::new(RefCell::new(StdRng::seed_from_u64(seed)));
        log("@READY\n".into());
        let mut tasks = Vec::new();
        for _ in 0..QD {
            let (ch, busy, ver, rng, log) = (
                ch.clone(),
                busy.clone(),
                ver.clone(),
                rng.clone(),
                log.clone(),
            );
            tasks.push(monoio::spawn(async move {
                loop {
                    let (op, b, fua) = {
                        let mut r = rng.borrow_mut();
                        (
                            r.gen_range(0..100u32),
                            r.gen_range(0..NBLK),
                            r.gen_bool(0.3),
                        )
                    };
                    let v = {
                        let mut v = ver.borrow_mut();
                        *v += 1;
                        *v
                    };
                    if op < 8 {
                        let c = b / BLK_PER_CLUSTER;
                        let blocks: Vec<u64> =
                            (c * BLK_PER_CLUSTER..(c + 1) * BLK_PER_CLUSTER).collect();
                        if blocks.iter().any(|x| busy.borrow().contains(x)) {
                            continue;
                        }
                        busy.borrow_mut().extend(&blocks);
                        log(format!("@Z {c} {v}\n"));
                        ch.deallocate(c * u64::from(CS) / 512, u64::from(CS) / 512)
                            .await
                            .unwrap();
                        log(format!("@Y {c} {v}\n"));
                        for x in blocks {
                            busy.borrow_mut().remove(&x);
                        }
                    } else if op < 12 {
                        ch.flush().await.unwrap();
                    } else {
                        if !busy.borrow_mut().insert(b) {
                            continue;
                        }
                        log(format!("@S {b} {v}\n"));
                        let (r, _) = ch
                            .write(b * 8, IoBuf::from_slice(&content(b, v)), fua)
                            .await;
                        r.unwrap();
                        log(format!("@A {b} {v}\n"));
                        busy.borrow_mut().remove(&b);
                    }
                }
            }));
        }
        for t in tasks {
            t.await;
        }
    });
}

/// The state of one block in the model.
#[derive(Default, Clone)]
struct Block {
    /// Last acknowledged content (`None` = zeros).
    acked: Option<u64>,
    /// A started, unacknowledged operation: `Some(None)` for a deallocate.
    inflight: Option<Option<u64>>,
}

#[test]
fn crash_kill_loop() {
    if std::env::var("CAIRN_CRASH_ROLE").as_deref() == Ok("writer") {
        writer();
        return;
    }
    let kills: u32 = std::env::var("CAIRN_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let seed: u64 = std::env::var("CAIRN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test: {kills} kills, seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let tp = TestPool::file(64 * MIB);
    let pool = tp.create(CS);
    // Fill the pool with junk from a replica that is then destroyed: its old
    // data must never show through.
    let junk = pool.create_replica(thick("junk", 32 * MIB)).unwrap();
    on_reactor(async {
        let ch = channel(&junk);
        for i in 0..32u64 {
            write(&*ch, i * 2048, &vec![0xEE; MIB as usize])
                .await
                .unwrap();
        }
    });
    pool.destroy_replica(junk.uuid()).unwrap();
    let rep = pool.create_replica(thin("crash", REPLICA_SIZE)).unwrap();
    let uuid = rep.uuid();
    drop(rep);
    pool.export().unwrap();
    drop(pool);

    let mut model = vec![Block::default(); NBLK as usize];
    let exe = std::env::current_exe().unwrap();
    let started = Instant::now();
    let (mut acked_total, mut allocations_seen, mut scratch_seen) = (0u64, 0u64, 0u64);
    for kill in 0..kills {
        let errlog = tp.dir.path().join("writer.stderr");
        let mut child = Command::new(&exe)
            .args([
                "crash_kill_loop",
                "--exact",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("CAIRN_CRASH_ROLE", "writer")
            .env("CAIRN_CRASH_POOL", tp.path())
            .env("CAIRN_CRASH_REPLICA", uuid.to_string())
            .env("CAIRN_CRASH_VER", (u64::from(kill + 1) << 32).to_string())
            .env("CAIRN_CRASH_SEED", rng.gen::<u64>().to_string())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&errlog).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // The test harness may print its own text before ours on a line.
                let line = match line.find('@') {
                    Some(at) => line[at..].to_string(),
                    None => continue,
                };
                if line == "@READY" {
                    let _ = ready_tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "writer did not start: {:?} {}",
                reader
                    .join()
                    .map(|l| l.into_iter().take(20).collect::<Vec<_>>()),
                std::fs::read_to_string(&errlog).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_micros(rng.gen_range(500..25_000)));
        child.kill().unwrap();
        child.wait().unwrap();
        let lines = reader.join().unwrap();

        // Apply the log to the model.
        let mut acked_here = 0;
        for line in &lines {
            let mut it = line.split_whitespace();
            let (Some(tag), Some(a), Some(v)) = (it.next(), it.next(), it.next()) else {
                continue;
            };
            let (Ok(a), Ok(v)) = (a.parse::<u64>(), v.parse::<u64>()) else {
                continue;
            };
            match tag {
                "@S" => model[a as usize].inflight = Some(Some(v)),
                "@A" => {
                    let m = &mut model[a as usize];
                    m.acked = Some(v);
                    m.inflight = None;
                    acked_here += 1;
                }
                "@Z" | "@Y" => {
                    for b in a * BLK_PER_CLUSTER..(a + 1) * BLK_PER_CLUSTER {
                        let m = &mut model[b as usize];
                        if tag == "@Z" {
                            m.inflight = Some(None);
                        } else {
                            m.acked = None;
                            m.inflight = None;
                        }
                    }
                }
                _ => {}
            }
        }
        acked_total += acked_here;

        let report = check(tp.path()).unwrap();
        assert!(
            report.is_clean(),
            "kill {kill}: checker found problems: {report:?}"
        );

        let pool = tp.import();
        let rep = pool.replica(uuid).unwrap();
        let held: u64 = pool.replicas().iter().map(|r| r.allocated_bytes()).sum();
        assert_eq!(
            pool.info().used,
            held,
            "kill {kill}: pool space not all owned by replicas"
        );
        // A scratch replica left by the kill was never written: it must
        // read zeros whatever its clusters held before.
        for s in pool.replicas().into_iter().filter(|r| r.uuid() != uuid) {
            let data = on_reactor(async {
                let ch = channel(&s);
                read(&*ch, 0, SCRATCH_SIZE as usize).await
            });
            assert!(
                data.iter().all(|&x| x == 0),
                "kill {kill}: a new thick replica shows old data"
            );
            scratch_seen += 1;
            pool.destroy_replica(s.uuid()).unwrap();
        }
        allocations_seen += rep.allocated_bytes() / u64::from(CS);
        let data = on_reactor(async {
            let ch = channel(&rep);
            read(&*ch, 0, REPLICA_SIZE as usize).await
        });
        for b in 0..NBLK {
            let got = decode(b, &data[b as usize * BLK..(b as usize + 1) * BLK])
                .unwrap_or_else(|e| panic!("kill {kill} (seed {seed}): {e}"));
            let m = &model[b as usize];
            let ok = got == m.acked || m.inflight.is_some_and(|f| f == got);
            assert!(
                ok,
                "kill {kill} (seed {seed}): block {b} reads {got:?}, acked {:?}, in flight {:?}",
                m.acked, m.inflight
            );
            model[b as usize] = Block {
                acked: got,
                inflight: None,
            };
        }
        drop(rep);
        pool.export().unwrap();
    }
    eprintln!(
        "crash test: {kills} kills, {acked_total} acknowledged writes verified, \
         {allocations_seen} cluster-mappings checked, {scratch_seen} interrupted \
         thick creates read back as zeros, {:.1}s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        acked_total > u64::from(kills),
        "the writer made too little progress"
    );
}
