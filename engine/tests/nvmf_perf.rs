//! Quick sanity numbers for the NVMe/TCP data path over loopback: 4 KiB
//! random reads at queue depth 64 and at queue depth 1, Cairn's initiator on
//! one reactor against the target on one reactor, RAM-backed. Not a
//! benchmark; ignored by default. Run on a quiet machine with
//! `cargo test --release -p cairn-engine --test nvmf_perf -- --ignored --nocapture`.

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use cairn_bdev::ram::RamDevice;
use cairn_bdev::{BlockDevice, IoBuf};
use cairn_engine::initiator::{InitiatorOptions, NvmfDevice};
use cairn_engine::reactor::Reactors;
use cairn_engine::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use futures::stream::{FuturesUnordered, StreamExt};

const BLOCKS_4K: u64 = 64 * 1024; // 256 MiB

#[test]
#[ignore = "performance sanity check; run by hand on a quiet machine"]
fn random_read_4k_qd64_and_qd1() -> Result<()> {
    let target = Target::start(TargetConfig {
        listen: "127.0.0.1:0".parse()?,
        reactors: 1,
        ..TargetConfig::default()
    })?;
    let uuid = uuid::Uuid::new_v4();
    let nqn = cairn_nvmf::volume_nqn(&uuid);
    let ram = RamDevice::new(4096, BLOCKS_4K);
    target.add_subsystem(SubsystemConfig {
        nqn: nqn.clone(),
        serial: "perf".into(),
        model: None,
        namespaces: vec![NamespaceConfig {
            nsid: 1,
            uuid,
            device: Arc::new(ram),
        }],
        allowed_hosts: None,
    })?;
    let opts = InitiatorOptions::new(
        target.local_addr(),
        &nqn,
        "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00000000beef",
    );
    let dev = NvmfDevice::connect(opts)?;
    let client = Reactors::start(1, "perf-client")?;
    let (iops, qd1_us) = client.run(0, move || async move {
        let ch = dev.open_channel().expect("open channel");
        let ch = &ch;
        // Fill the device so reads copy real data.
        let mut lba = 0;
        while lba < BLOCKS_4K {
            let (r, _) = ch.write(lba, IoBuf::zeroed(1 << 20), false).await;
            r.expect("fill");
            lba += 256;
        }
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next_lba = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % BLOCKS_4K
        };
        // Buffers are reused, as a real client's would be.
        let free = RefCell::new(Vec::<IoBuf>::new());
        let free = &free;
        let read = |lba: u64| async move {
            let b = free
                .borrow_mut()
                .pop()
                .unwrap_or_else(|| IoBuf::zeroed(4096));
            let (r, b) = ch.read(lba, b).await;
            r.expect("read");
            free.borrow_mut().push(b);
        };
        // QD64 for 3 seconds.
        let mut inflight = FuturesUnordered::new();
        for _ in 0..64 {
            inflight.push(read(next_lba()));
        }
        let start = Instant::now();
        let mut done = 0u64;
        while let Some(()) = inflight.next().await {
            done += 1;
            if start.elapsed() < Duration::from_secs(3) {
                inflight.push(read(next_lba()));
            }
        }
        let iops = done as f64 / start.elapsed().as_secs_f64();
        // QD1 for 2 seconds.
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(2) {
            read(next_lba()).await;
            n += 1;
        }
        let qd1_us = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        (iops, qd1_us)
    })?;
    println!("4K random read: QD64 {iops:.0} IOPS, QD1 average latency {qd1_us:.1} us");
    assert!(iops > 1000.0, "QD64 IOPS {iops}");
    client.shutdown();
    Ok(())
}
