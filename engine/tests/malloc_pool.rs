//! A pool on a `malloc://` RAM disk works end to end: pool, thick replica,
//! nexus, export over NVMe/TCP; a TRIM through the thick replica reads back
//! as zeros; the pool exports and imports again with its data.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use cairn_bdev::uri::UriError;
use cairn_bdev::{BlockDevice, IoBuf};
use cairn_engine::core::EngineError;
use cairn_engine::daemon::{self, EngineConfig};
use cairn_engine::initiator::{InitiatorOptions, NvmfDevice};
use cairn_engine::nexus::NexusConfig;
use cairn_engine::reactor::Reactors;
use uuid::Uuid;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:44444444-2222-3333-4444-555555555555";
const DISK: &str = "malloc:///engine-test?size_mb=64";

fn pattern(lba: u64) -> IoBuf {
    let mut b = IoBuf::zeroed(4096);
    for (i, c) in b.chunks_mut(8).enumerate() {
        c.copy_from_slice(&(lba * 1000 + i as u64).to_le_bytes());
    }
    b
}

#[test]
fn a_malloc_pool_serves_a_published_volume() {
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let cfg = EngineConfig {
        nvmf_listen: addr,
        reactors: 1,
        max_io_queues: 4,
        host_nqn: "nqn.2024-01.dev.cairn:engine:malloc".into(),
        pools: vec![],
        nexus: NexusConfig::default(),
        busy_poll: Duration::ZERO,
    };
    let engine = daemon::start(&cfg, daemon::remote_opener(cfg.host_nqn.clone())).unwrap();

    // Malformed URIs are typed errors, and nothing is created.
    assert!(matches!(
        engine.create_pool_uri("ram", "malloc:///engine-test", 0, 0),
        Err(EngineError::DiskUri(UriError::MissingSize { .. }))
    ));
    assert!(matches!(
        engine.create_pool_uri("ram", "tape:///x", 0, 0),
        Err(EngineError::DiskUri(UriError::UnknownScheme { .. }))
    ));
    assert!(engine.pools().is_empty());

    let pool = engine.create_pool_uri("ram", DISK, 0, 0).unwrap();
    assert!(pool.info().capacity >= 48 << 20, "{:?}", pool.info());
    // The same URI again is the same pool; another size of that disk is not.
    engine.create_pool_uri("ram", DISK, 0, 0).unwrap();
    assert!(engine
        .create_pool_uri("ram2", "malloc:///engine-test?size_mb=32", 0, 0)
        .is_err());

    let replica = Uuid::new_v4();
    engine
        .create_replica("ram", &replica.to_string(), "r", 16 << 20, false)
        .unwrap();
    let volume = Uuid::new_v4();
    engine
        .create_nexus(
            &volume.to_string(),
            16 << 20,
            &[format!("replica:///{replica}")],
            vec![HOST.into()],
        )
        .unwrap();

    let mut o = InitiatorOptions::new(
        engine.target().local_addr(),
        &cairn_nvmf::volume_nqn(&volume),
        HOST,
    );
    o.io_queues = 1;
    let dev = NvmfDevice::connect(o).unwrap();
    let per = 4096 / u64::from(dev.info().block_size);
    let client = Reactors::start(1, "client").unwrap();
    let d = dev.clone();
    let (mismatches, trimmed_nonzero) = client
        .run(0, move || async move {
            let q = d.open_channel().unwrap();
            let lbas: Vec<u64> = (0..64).map(|i| i * 37 * per).collect();
            for &lba in &lbas {
                let (r, _) = q.write(lba, pattern(lba), false).await;
                r.unwrap();
            }
            q.flush().await.unwrap();
            let mut mismatches = 0;
            for &lba in &lbas {
                let (r, got) = q.read(lba, IoBuf::zeroed(4096)).await;
                r.unwrap();
                if got.as_slice() != pattern(lba).as_slice() {
                    mismatches += 1;
                }
            }
            // TRIM the first written block of a thick replica: zeros.
            q.deallocate(lbas[1], per).await.unwrap();
            let (r, got) = q.read(lbas[1], IoBuf::zeroed(4096)).await;
            r.unwrap();
            let nonzero = got.iter().filter(|&&b| b != 0).count();
            (mismatches, nonzero)
        })
        .unwrap();
    println!("acknowledged writes read back wrong: {mismatches}");
    assert_eq!(mismatches, 0);
    assert_eq!(trimmed_nonzero, 0);
    drop(dev);

    // Export and import again: the RAM disk keeps the pool and its data.
    engine.destroy_nexus(&volume.to_string()).unwrap();
    // The nexus's reactors close their replica channels after it is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match engine.export_pool("ram") {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not exported yet: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("export: {e}"),
        }
    }
    assert!(engine.pools().is_empty());
    let pool = engine.import_pool_uri(DISK).unwrap();
    assert_eq!(pool.name(), "ram");
    assert_eq!(pool.replicas().len(), 1);
    engine.shutdown();
}
