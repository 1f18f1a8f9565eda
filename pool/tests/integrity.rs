//! Damaged metadata is detected and reported, never served; thin pools
//! overcommit and fail cleanly with `NoSpace` when full.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use cairn_bdev::BdevError;
use cairn_pool::format::{block_crc, group_offset, replica_offset, MD_BLOCK};
use cairn_pool::{check, Pool, PoolError};
use common::*;

const CS: u32 = 64 * 1024;

/// A pool with one written replica, exported.
fn written_pool() -> (TestPool, uuid::Uuid) {
    let tp = TestPool::file(32 * MIB);
    let pool = tp.create(CS);
    let r = pool.create_replica(thin("r", 4 * MIB)).unwrap();
    on_reactor(async {
        let ch = channel(&r);
        write(&*ch, 0, &pattern(3 * CS as usize, 1)).await.unwrap();
    });
    let uuid = r.uuid();
    drop(r);
    pool.export().unwrap();
    (tp, uuid)
}

/// Copies the pool and applies `damage` to the copy.
fn damaged_copy(tp: &TestPool, damage: impl FnOnce(&std::fs::File)) -> std::path::PathBuf {
    let copy = tp.dir.path().join("copy.img");
    std::fs::copy(tp.path(), &copy).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&copy)
        .unwrap();
    damage(&f);
    f.sync_all().unwrap();
    copy
}

fn flip(f: &std::fs::File, off: u64) {
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    b[0] ^= 0x5a;
    f.write_all_at(&b, off).unwrap();
}

fn read_back(path: &Path, uuid: uuid::Uuid) -> Vec<u8> {
    let pool = Pool::import(path).unwrap();
    let r = pool.replica(uuid).unwrap();
    on_reactor(async {
        let ch = channel(&r);
        read(&*ch, 0, 3 * CS as usize).await
    })
}

#[test]
fn one_damaged_superblock_copy_is_reported_and_the_other_used() {
    let (tp, uuid) = written_pool();
    let copy = damaged_copy(&tp, |f| flip(f, 40));
    let report = check(&copy).unwrap();
    assert!(!report.is_clean());
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].location.offset, 0);
    assert!(report.damaged[0].reason.contains("checksum"), "{report:?}");
    assert_eq!(read_back(&copy, uuid), pattern(3 * CS as usize, 1));
}

#[test]
fn both_superblock_copies_damaged_is_an_error() {
    let (tp, _) = written_pool();
    let copy = damaged_copy(&tp, |f| {
        flip(f, 60);
        flip(f, MD_BLOCK + 60);
    });
    let err = Pool::import(&copy).unwrap_err();
    assert!(matches!(err, PoolError::BadSuperblock { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("offset 0") && msg.contains("offset 4096"),
        "{msg}"
    );
    assert!(check(&copy).is_err());

    // Wrong magic in both: not a pool at all.
    let copy = damaged_copy(&tp, |f| {
        f.write_all_at(b"XXXXXXXX", 0).unwrap();
        f.write_all_at(b"XXXXXXXX", MD_BLOCK).unwrap();
    });
    assert!(matches!(
        Pool::import(&copy),
        Err(PoolError::BadMagic { .. })
    ));

    // A newer format version, correctly checksummed, is refused.
    let copy = damaged_copy(&tp, |f| {
        for off in [0, MD_BLOCK] {
            let mut b = vec![0u8; MD_BLOCK as usize];
            f.read_exact_at(&mut b, off).unwrap();
            b[8..12].copy_from_slice(&99u32.to_le_bytes());
            let crc = block_crc(&b);
            b[12..16].copy_from_slice(&crc.to_le_bytes());
            f.write_all_at(&b, off).unwrap();
        }
    });
    assert!(matches!(
        Pool::import(&copy),
        Err(PoolError::UnsupportedVersion { version: 99 })
    ));
}

/// Reads every replica in `good` and counts the bytes that differ from what
/// was written to it (`seed` per replica).
fn changed_bytes(pool: &Pool, good: &[(uuid::Uuid, u64, u64)]) -> usize {
    let mut changed = 0;
    for &(u, size, seed) in good {
        let r = pool.replica(u).unwrap();
        let got = on_reactor(async {
            let ch = channel(&r);
            read(&*ch, 0, size as usize).await
        });
        let want = pattern(size as usize, seed);
        changed += got.iter().zip(&want).filter(|(a, b)| a != b).count();
    }
    changed
}

/// One damaged group header no longer takes the pool down: it imports, the
/// replicas that may have owned the group's clusters are faulted (durably:
/// also after a repair and another import) and fail I/O, every other
/// replica serves its data unchanged, and `Pool::check` reports the header
/// and rewrites it.
#[test]
fn damaged_cluster_group_faults_only_the_replicas_it_may_have_covered() {
    let tp = TestPool::file(32 * MIB);
    let pool = tp.create(CS);
    // Group 0 holds clusters 0..127, group 1 127..254.
    let a = pool.create_replica(thick("a", 2 * MIB)).unwrap(); // 0..32
    let e = pool.create_replica(thick("e", 2 * MIB)).unwrap(); // 32..64
    let b = pool.create_replica(thin("b", 4 * MIB)).unwrap();
    let c = pool.create_replica(thin("c", 4 * MIB)).unwrap();
    on_reactor(async {
        write(&*channel(&a), 0, &pattern(2 * MIB as usize, 1))
            .await
            .unwrap();
        write(&*channel(&e), 0, &pattern(2 * MIB as usize, 2))
            .await
            .unwrap();
        write(&*channel(&b), 0, &pattern(3 * CS as usize, 3))
            .await
            .unwrap(); // 64..67
    });
    let d = pool.create_replica(thick("d", 8 * MIB)).unwrap(); // 67..195
    let ids = [a.uuid(), e.uuid(), b.uuid(), c.uuid(), d.uuid()];
    drop((a, e, b, c, d));
    pool.export().unwrap();
    drop(pool);
    let g1 = group_offset(CS, 1);
    let copy = damaged_copy(&tp, |f| flip(f, g1 + 40));
    let [a, e, b, c, d] = ids;
    let mut faulted = vec![b, c, d];
    faulted.sort();

    // The offline checker says the same before anything is changed.
    let report = check(&copy).unwrap();
    assert_eq!(report.damaged.len(), 1);
    assert_eq!(report.damaged[0].location.offset, g1);
    let mut got = report.faulted_replicas.clone();
    got.sort();
    assert_eq!(got, faulted);

    let pool = Pool::import(&copy).expect("a damaged group header must not refuse import");
    let good = [(a, 2 * MIB, 1), (e, 2 * MIB, 2)];
    let lost = changed_bytes(&pool, &good);
    println!("acknowledged bytes lost or changed on healthy replicas: {lost}");
    assert_eq!(lost, 0);
    for u in ids {
        let r = pool.replica(u).unwrap();
        assert_eq!(r.is_faulted(), faulted.contains(&u), "replica {u}");
        assert_eq!(r.replica_info().faulted, faulted.contains(&u));
        if faulted.contains(&u) {
            let res = on_reactor(async {
                let ch = channel(&r);
                let (res, _) = ch.read(0, cairn_bdev::IoBuf::zeroed(4096)).await;
                res
            });
            assert!(
                matches!(res, Err(BdevError::Unavailable { .. })),
                "faulted replica {u} served a read: {res:?}"
            );
        }
    }
    let before = pool.info().used;
    let chk = pool.check(false).unwrap();
    assert_eq!(chk.damaged.len(), 1);
    assert_eq!(chk.damaged[0].location.offset, g1);
    assert!(chk.repaired.is_empty());
    let mut got = chk.faulted_replicas.clone();
    got.sort();
    assert_eq!(got, faulted);

    let chk = pool.check(true).unwrap();
    assert!(chk.damaged.is_empty(), "{chk:?}");
    assert_eq!(chk.repaired.len(), 1);
    assert_eq!(chk.repaired[0].location.offset, g1);
    // The group's clusters are free again (D's mapped ones stay D's).
    assert!(pool.info().used < before);
    assert!(pool.check(true).unwrap().repaired.is_empty());
    // New writes may take the repaired group's clusters.
    let f = pool.create_replica(thick("f", 4 * MIB)).unwrap();
    on_reactor(async {
        write(&*channel(&f), 0, &pattern(4 * MIB as usize, 6))
            .await
            .unwrap();
    });
    let fu = f.uuid();
    drop(f);
    pool.export().unwrap();
    drop(pool);

    let report = check(&copy).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let mut got = report.faulted_replicas.clone();
    got.sort();
    assert_eq!(got, faulted, "the fault survives the repair");
    let pool = Pool::import(&copy).unwrap();
    assert!(pool.check(false).unwrap().damaged.is_empty());
    for u in ids {
        assert_eq!(pool.replica(u).unwrap().is_faulted(), faulted.contains(&u));
    }
    let good = [(a, 2 * MIB, 1), (e, 2 * MIB, 2), (fu, 4 * MIB, 6)];
    let lost = changed_bytes(&pool, &good);
    println!("after repair and import, bytes lost or changed: {lost}");
    assert_eq!(lost, 0);
    // A faulted replica is destroyed as usual (its peers rebuild it elsewhere).
    for u in faulted {
        pool.destroy_replica(u).unwrap();
    }
    pool.export().unwrap();
    assert!(check(&copy).unwrap().faulted_replicas.is_empty());
    // The original is untouched and clean.
    assert!(check(tp.path()).unwrap().is_clean());
}

#[test]
fn damaged_replica_record_is_detected_with_its_location() {
    let (tp, _) = written_pool();
    let off = replica_offset(0);
    let copy = damaged_copy(&tp, |f| flip(f, off + 45));
    match Pool::import(&copy) {
        Err(PoolError::Corrupt { location, .. }) => {
            assert_eq!(location.offset, off);
            assert!(location.what.contains("replica slot 0"));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(!check(&copy).unwrap().is_clean());
}

#[test]
fn thin_pool_overcommits_and_fails_cleanly_when_full() {
    let tp = TestPool::file(GIB);
    let cs: u32 = 4 << 20;
    let pool = tp.create(cs);
    let capacity = pool.info().capacity;
    let clusters = capacity / u64::from(cs);
    let reps: Vec<_> = (0..10)
        .map(|i| pool.create_replica(thin(&format!("r{i}"), GIB)).unwrap())
        .collect();
    let info = pool.info();
    assert_eq!(info.committed, 10 * GIB);
    assert!(info.committed > info.capacity);
    let cb = u64::from(cs) / 512;
    let placed: Vec<(usize, u64)> = on_reactor(async {
        let chans: Vec<_> = reps.iter().map(channel).collect();
        let mut placed = Vec::new();
        let mut failures = 0;
        // Round-robin 4 KiB writes, one per cluster, until space runs out.
        'outer: for c in 0..GIB / u64::from(cs) {
            for (i, ch) in chans.iter().enumerate() {
                let lba = c * cb + (i as u64 * 8) % cb;
                match write(&**ch, lba, &pattern(4096, lba ^ i as u64)).await {
                    Ok(()) => placed.push((i, lba)),
                    Err(BdevError::NoSpace) => {
                        failures += 1;
                        if failures > 20 {
                            break 'outer;
                        }
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }
        assert_eq!(placed.len() as u64, clusters);
        // Writes into clusters already held still succeed.
        let (i, lba) = placed[0];
        write(&*chans[i], lba + 8, &pattern(4096, 77))
            .await
            .unwrap();
        // A write spanning a held and a new cluster fails with NoSpace for
        // the part that cannot be placed.
        let (i, lba) = *placed.last().unwrap();
        let start = (lba / cb + 1) * cb - 8;
        let r = write(&*chans[i], start, &vec![1u8; 8192]).await;
        assert!(matches!(r, Err(BdevError::NoSpace)), "{r:?}");
        // Everything written before reads back.
        for &(i, lba) in &placed {
            let got = read(&*chans[i], lba, 4096).await;
            assert_eq!(got, pattern(4096, lba ^ i as u64), "replica {i} lba {lba}");
        }
        // The part that could be placed was written; the rest reads zeros.
        assert_eq!(read(&*chans[i], start, 4096).await, vec![1u8; 4096]);
        assert_eq!(read(&*chans[i], start + 8, 4096).await, vec![0u8; 4096]);
        placed
    });
    assert_eq!(pool.info().used, capacity);
    // Destroying a replica returns its space: writing works again.
    let victim = placed[0].0;
    let freed = reps[victim].allocated_bytes();
    assert!(freed > 0);
    let other = (victim + 1) % 10;
    let victim_uuid = reps[victim].uuid();
    pool.destroy_replica(victim_uuid).unwrap();
    assert_eq!(pool.info().used, capacity - freed);
    on_reactor(async {
        let ch = channel(&reps[other]);
        write(&*ch, GIB / 512 - 8, &pattern(4096, 5)).await.unwrap();
        assert_eq!(read(&*ch, GIB / 512 - 8, 4096).await, pattern(4096, 5));
    });
    drop(reps);
    pool.export().unwrap();
    let report = check(tp.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
}
