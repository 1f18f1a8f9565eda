//! Pool and replica behaviour on real files through io_uring.

mod common;

use cairn_bdev::{BdevError, BlockDevice};
use cairn_pool::{check, Pool, PoolCreate, PoolError, ReplicaCreate};
use common::*;
use uuid::Uuid;

const CS: u32 = 64 * 1024;

#[test]
fn import_after_clean_export_finds_everything() {
    let tp = TestPool::file(64 * MIB);
    let pool = tp.create(CS);
    let a = pool.create_replica(thin("a", 8 * MIB)).unwrap();
    let b = pool.create_replica(thick("b", MIB)).unwrap();
    assert_eq!(b.allocated_bytes(), MIB);
    let (ua, ub) = (a.uuid(), b.uuid());
    on_reactor(async {
        let ca = channel(&a);
        let cb = channel(&b);
        write(&*ca, 0, &pattern(4096, 1)).await.unwrap();
        write(&*ca, 5000, &pattern(3 * 65536, 2)).await.unwrap();
        write(&*cb, 100, &pattern(512, 3)).await.unwrap();
        ca.flush().await.unwrap();
    });
    let info = pool.info();
    assert_eq!(info.replicas, 2);
    assert_eq!(info.committed, 9 * MIB);
    let used_before = info.used;
    assert_eq!(used_before, a.allocated_bytes() + b.allocated_bytes());
    pool.export().unwrap();
    assert!(matches!(
        pool.create_replica(thin("c", MIB)),
        Err(PoolError::Closed { .. })
    ));
    drop((a, b, pool));

    let report = check(tp.path()).unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert!(report.orphaned.is_empty());

    let pool = tp.import();
    let info = pool.info();
    assert_eq!(info.replicas, 2);
    assert_eq!(info.used, used_before);
    let a = pool.replica(ua).unwrap();
    let b = pool.replica(ub).unwrap();
    assert_eq!(a.size(), 8 * MIB);
    assert!(a.is_thin() && !b.is_thin());
    on_reactor(async {
        let ca = channel(&a);
        let cb = channel(&b);
        assert_eq!(read(&*ca, 0, 4096).await, pattern(4096, 1));
        assert_eq!(read(&*ca, 5000, 3 * 65536).await, pattern(3 * 65536, 2));
        assert_eq!(read(&*cb, 100, 512).await, pattern(512, 3));
        // Unwritten space reads zeros.
        assert!(read(&*ca, 8, 4096).await.iter().all(|&x| x == 0));
        assert!(read(&*cb, 0, 512).await.iter().all(|&x| x == 0));
    });
    let s = a.stats();
    assert_eq!(s.reads, 3);
    assert_eq!(s.bytes_read, 4096 * 2 + 3 * 65536);
}

#[test]
fn destroy_returns_space_and_a_reused_cluster_reads_zeros() {
    let tp = TestPool::file(16 * MIB);
    let pool = tp.create(CS);
    let capacity = pool.info().capacity;
    let old = pool.create_replica(thick("old", capacity)).unwrap();
    assert_eq!(pool.info().used, capacity);
    on_reactor(async {
        let ch = channel(&old);
        let blocks = capacity / 512;
        let chunk = 1024 * 1024;
        let mut lba = 0;
        while lba < blocks {
            let n = (chunk as u64 / 512).min(blocks - lba);
            write(&*ch, lba, &vec![0xAA; (n * 512) as usize])
                .await
                .unwrap();
            lba += n;
        }
    });
    // Busy while a channel is open.
    on_reactor(async {
        let _ch = channel(&old);
        assert!(matches!(
            pool.destroy_replica(old.uuid()),
            Err(PoolError::Busy { .. })
        ));
    });
    pool.destroy_replica(old.uuid()).unwrap();
    pool.destroy_replica(old.uuid()).unwrap(); // idempotent
    on_reactor(async { assert!(old.open_channel().is_err()) });
    assert_eq!(pool.info().used, 0);
    assert_eq!(pool.info().replicas, 0);

    let new = pool.create_replica(thin("new", 4 * MIB)).unwrap();
    on_reactor(async {
        let ch = channel(&new);
        // A small write into the middle of each cluster; the rest of every
        // cluster, all of which held 0xAA, must read zeros.
        for c in 0..8u64 {
            write(&*ch, c * 128 + 40, &pattern(1024, c)).await.unwrap();
        }
        for c in 0..8u64 {
            let data = read(&*ch, c * 128, CS as usize).await;
            assert!(data[..40 * 512].iter().all(|&x| x == 0));
            assert_eq!(&data[40 * 512..42 * 512], &pattern(1024, c)[..]);
            assert!(data[42 * 512..].iter().all(|&x| x == 0));
        }
    });
    assert_eq!(new.allocated_bytes(), 8 * u64::from(CS));
    // A live pool cannot be checked or imported a second time.
    assert!(matches!(check(tp.path()), Err(PoolError::Busy { .. })));
    pool.export().unwrap();
    let r = check(tp.path()).unwrap();
    assert!(r.is_clean() && r.orphaned.is_empty(), "{r:?}");
}

#[test]
fn resize_grows_and_refuses_shrink() {
    let tp = TestPool::file(32 * MIB);
    let pool = tp.create(CS);
    let r = pool.create_replica(thin("r", MIB)).unwrap();
    let t = pool.create_replica(thick("t", MIB)).unwrap();
    on_reactor(async {
        let ch = channel(&r);
        let e = write(&*ch, 2048, &pattern(512, 1)).await;
        assert!(matches!(e, Err(BdevError::OutOfRange { .. })));
    });
    assert!(matches!(
        pool.resize_replica(r.uuid(), MIB / 2),
        Err(PoolError::ShrinkRefused { .. })
    ));
    pool.resize_replica(r.uuid(), 4 * MIB).unwrap();
    pool.resize_replica(t.uuid(), 2 * MIB).unwrap();
    assert_eq!(r.info().num_blocks, 8192);
    assert_eq!(t.allocated_bytes(), 2 * MIB);
    // A channel opened before the resize sees the new size.
    on_reactor(async {
        let ch = channel(&r);
        write(&*ch, 8000, &pattern(4096, 9)).await.unwrap();
        assert_eq!(read(&*ch, 8000, 4096).await, pattern(4096, 9));
        let ct = channel(&t);
        write(&*ct, 4000, &pattern(512, 2)).await.unwrap();
    });
    assert!(matches!(
        pool.resize_replica(t.uuid(), 64 * MIB),
        Err(PoolError::NoSpace { .. })
    ));
    assert!(matches!(
        pool.resize_replica(Uuid::new_v4(), MIB),
        Err(PoolError::ReplicaNotFound { .. })
    ));
    let (ru, tu) = (r.uuid(), t.uuid());
    pool.export().unwrap();
    let pool = tp.import();
    assert_eq!(pool.replica(ru).unwrap().size(), 4 * MIB);
    assert_eq!(pool.replica(tu).unwrap().allocated_bytes(), 2 * MIB);
    on_reactor(async {
        let ch = channel(&pool.replica(ru).unwrap());
        assert_eq!(read(&*ch, 8000, 4096).await, pattern(4096, 9));
    });
}

#[test]
fn deallocate_releases_clusters_and_write_zeroes_zeroes() {
    let tp = TestPool::file(32 * MIB);
    let pool = tp.create(CS);
    let r = pool.create_replica(thin("r", 4 * MIB)).unwrap();
    let cb = u64::from(CS) / 512;
    on_reactor(async {
        let ch = channel(&r);
        write(&*ch, 0, &pattern(4 * CS as usize, 5)).await.unwrap();
        assert_eq!(r.allocated_bytes(), 4 * u64::from(CS));
        // Clusters 1 and 2 whole, plus half of cluster 3.
        ch.deallocate(cb, 2 * cb + cb / 2).await.unwrap();
        assert_eq!(r.allocated_bytes(), 2 * u64::from(CS));
        let data = read(&*ch, 0, 4 * CS as usize).await;
        let p = pattern(4 * CS as usize, 5);
        let cs = CS as usize;
        assert_eq!(&data[..cs], &p[..cs]);
        assert!(data[cs..3 * cs + cs / 2].iter().all(|&x| x == 0));
        assert_eq!(&data[3 * cs + cs / 2..], &p[3 * cs + cs / 2..]);
        // Write zeroes of a whole cluster releases it too.
        ch.write_zeroes(0, cb).await.unwrap();
        assert_eq!(r.allocated_bytes(), u64::from(CS));
        assert!(read(&*ch, 0, cs).await.iter().all(|&x| x == 0));
        // Released space can be written again.
        write(&*ch, cb + 3, &pattern(512, 6)).await.unwrap();
        assert_eq!(read(&*ch, cb + 3, 512).await, pattern(512, 6));
        assert!(read(&*ch, cb, 512).await.iter().all(|&x| x == 0));
    });
    assert_eq!(pool.info().used, 2 * u64::from(CS));
    pool.export().unwrap();
    let r2 = check(tp.path()).unwrap();
    assert!(r2.is_clean(), "{r2:?}");
    assert_eq!(r2.used_clusters, 2);
}

#[test]
fn replica_create_is_idempotent_and_conflicts_are_typed() {
    let tp = TestPool::file(32 * MIB);
    let pool = tp.create(CS);
    let req = thin("v", 2 * MIB);
    let a = pool.create_replica(req.clone()).unwrap();
    let b = pool.create_replica(req.clone()).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    let other = ReplicaCreate {
        size: 4 * MIB,
        ..req.clone()
    };
    assert!(matches!(
        pool.create_replica(other),
        Err(PoolError::AlreadyExists { .. })
    ));
    assert!(matches!(
        pool.create_replica(thick("big", 64 * MIB)),
        Err(PoolError::NoSpace { .. })
    ));
    assert!(matches!(
        pool.create_replica(thin("odd", 1000)),
        Err(PoolError::InvalidArgument { .. })
    ));
    assert_eq!(pool.replicas().len(), 1);
    // While imported, the device is locked.
    assert!(matches!(
        Pool::import(tp.path()),
        Err(PoolError::Busy { .. })
    ));
    // Creating the same pool again imports it; another pool is refused.
    pool.export().unwrap();
    let pool = Pool::create(
        tp.path(),
        PoolCreate {
            name: "p0".into(),
            uuid: pool.uuid(),
            cluster_size: CS,
        },
    )
    .unwrap();
    let a = pool.replica(a.uuid()).unwrap();
    pool.export().unwrap();
    let other = Pool::create(
        tp.path(),
        PoolCreate {
            name: "p1".into(),
            uuid: Uuid::new_v4(),
            cluster_size: CS,
        },
    );
    assert!(matches!(other, Err(PoolError::AlreadyExists { .. })));
    let pool = tp.import();
    let a = pool.replica(a.uuid()).unwrap();
    // Pool destroy is refused while a replica is open.
    on_reactor(async {
        let _ch = channel(&a);
        assert!(matches!(pool.destroy(), Err(PoolError::Busy { .. })));
        assert!(matches!(pool.export(), Err(PoolError::Busy { .. })));
    });
    pool.destroy().unwrap();
    assert!(matches!(
        Pool::import(tp.path()),
        Err(PoolError::BadMagic { .. })
    ));
}

#[test]
fn grow_takes_in_new_device_space() {
    let tp = TestPool::file(8 * MIB);
    let pool = tp.create(CS);
    let cap = pool.info().capacity;
    let r = pool.create_replica(thin("r", 64 * MIB)).unwrap();
    let blocks_fill = cap / 512;
    on_reactor(async {
        let ch = channel(&r);
        write(&*ch, 0, &vec![7u8; cap as usize]).await.unwrap();
        let e = write(&*ch, blocks_fill, &pattern(512, 1)).await;
        assert!(matches!(e, Err(BdevError::NoSpace)));
    });
    std::fs::OpenOptions::new()
        .write(true)
        .open(tp.path())
        .unwrap()
        .set_len(32 * MIB)
        .unwrap();
    let new_cap = pool.grow().unwrap();
    assert!(new_cap > cap + 16 * MIB, "{new_cap} vs {cap}");
    assert_eq!(pool.info().capacity, new_cap);
    on_reactor(async {
        let ch = channel(&r);
        let more = (new_cap - cap) as usize;
        write(&*ch, blocks_fill, &pattern(more, 3)).await.unwrap();
        assert_eq!(read(&*ch, blocks_fill, more).await, pattern(more, 3));
    });
    pool.export().unwrap();
    let pool = tp.import();
    assert_eq!(pool.info().capacity, new_cap);
    assert_eq!(pool.info().used, new_cap);
}

#[test]
fn concurrent_reactors_allocate_without_conflict() {
    let tp = TestPool::file(64 * MIB);
    let pool = tp.create(CS);
    let r = pool.create_replica(thin("r", 16 * MIB)).unwrap();
    let threads: Vec<_> = (0..3u64)
        .map(|t| {
            let r = r.clone();
            std::thread::spawn(move || {
                on_reactor(async move {
                    let ch = std::rc::Rc::new(channel(&r));
                    // Interleaved 4 KiB writes: every thread touches every
                    // cluster, so first writes race, also within a reactor.
                    let mut tasks = Vec::new();
                    for i in 0..96u64 {
                        let lba = (i * 3 + t) * 8 * 4;
                        let ch = ch.clone();
                        tasks.push(monoio::spawn(async move {
                            write(&**ch, lba, &pattern(4096, lba)).await.unwrap();
                        }));
                    }
                    for task in tasks {
                        task.await;
                    }
                    for i in 0..96u64 {
                        let lba = (i * 3 + t) * 8 * 4;
                        assert_eq!(read(&**ch, lba, 4096).await, pattern(4096, lba));
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    drop(r);
    pool.export().unwrap();
    let rep = check(tp.path()).unwrap();
    assert!(rep.is_clean(), "{rep:?}");
    assert_eq!(rep.used_clusters, 288 * 16 * 1024 / u64::from(CS));
}

#[test]
fn thick_replica_keeps_its_space_on_deallocate_and_counts_io() {
    let tp = TestPool::file(32 * MIB);
    let pool = tp.create(CS);
    let t = pool.create_replica(thick("t", MIB)).unwrap();
    let cb = u64::from(CS) / 512;
    on_reactor(async {
        let ch = channel(&t);
        write(&*ch, 0, &pattern(2 * CS as usize, 4)).await.unwrap();
        ch.deallocate(0, cb).await.unwrap();
        ch.write_zeroes(cb + 1, 1).await.unwrap();
        ch.flush().await.unwrap();
        let data = read(&*ch, 0, 2 * CS as usize).await;
        let p = pattern(2 * CS as usize, 4);
        let cs = CS as usize;
        assert!(data[..cs].iter().all(|&x| x == 0));
        assert_eq!(&data[cs..cs + 512], &p[cs..cs + 512]);
        assert!(data[cs + 512..cs + 1024].iter().all(|&x| x == 0));
        assert_eq!(&data[cs + 1024..], &p[cs + 1024..]);
    });
    // Thick space stays allocated.
    assert_eq!(t.allocated_bytes(), MIB);
    let s = t.stats();
    assert_eq!((s.writes, s.reads, s.unmaps, s.flushes), (1, 1, 2, 1));
    assert_eq!(s.bytes_written, 2 * u64::from(CS));
    assert_eq!(s.allocated, MIB);
    let info = t.replica_info();
    assert_eq!(
        (info.size, info.thin, info.pool_uuid),
        (MIB, false, pool.uuid())
    );
}

#[test]
fn writes_into_allocated_clusters_touch_no_metadata() {
    use cairn_bdev::file::{FileDevice, FileOptions};
    use std::time::Instant;
    let tp = TestPool::file(64 * MIB);
    let pool = tp.create(CS);
    let r = pool.create_replica(thin("r", 8 * MIB)).unwrap();
    const N: u64 = 2000;
    let (via_replica, first) = on_reactor(async {
        let ch = channel(&r);
        let before = pool.metadata_writes();
        let t = Instant::now();
        for c in 0..32u64 {
            write(&*ch, c * 128, &pattern(4096, c)).await.unwrap();
        }
        let first = t.elapsed() / 32;
        let allocations = pool.metadata_writes() - before;
        assert_eq!(allocations, 32, "one group write per allocation");
        let before = pool.metadata_writes();
        let t = Instant::now();
        for i in 0..N {
            let lba = (i * 8) % (32 * 128);
            write(&*ch, lba, &pattern(4096, i)).await.unwrap();
        }
        let el = t.elapsed();
        assert_eq!(pool.metadata_writes(), before, "fast path wrote metadata");
        (el / N as u32, first)
    });
    // The same writes straight to a file device, for comparison.
    let raw = tp.dir.path().join("raw.img");
    let dev = FileDevice::create(&raw, 8 * MIB, FileOptions::default()).unwrap();
    let direct = on_reactor(async {
        let ch = dev.open_channel().unwrap();
        let t = Instant::now();
        for i in 0..N {
            write(&*ch, (i * 8) % (32 * 128), &pattern(4096, i))
                .await
                .unwrap();
        }
        t.elapsed() / N as u32
    });
    eprintln!(
        "4 KiB QD1 write: replica (allocated) {via_replica:?}, file device {direct:?}, \
         first write (allocation) {first:?}"
    );
}
