//! A published nexus grows online: a host's next Identify reports the new
//! size, and I/O beyond the old end then succeeds.

use std::sync::Arc;

use cairn_bdev::ram::RamDevice;
use cairn_bdev::{BdevError, BlockDevice, IoBuf};
use cairn_engine::initiator::{InitiatorOptions, NvmfDevice};
use cairn_engine::nexus::Nexus;
use cairn_engine::reactor::Reactors;
use cairn_engine::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use uuid::Uuid;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:22222222-2222-3333-4444-555555555555";

/// Writes then reads 4 KiB at `lba` through a fresh queue.
fn write_read(client: &Reactors, dev: &NvmfDevice, lba: u64) -> Result<(), BdevError> {
    let d = dev.clone();
    client
        .run(0, move || async move {
            let q = d.open_channel()?;
            let (r, _) = q.write(lba, IoBuf::from_slice(&[0x5a; 4096]), false).await;
            r?;
            let (r, got) = q.read(lba, IoBuf::zeroed(4096)).await;
            r?;
            assert!(got.iter().all(|&b| b == 0x5a), "data differs at {lba}");
            Ok(())
        })
        .expect("client reactor runs")
}

#[test]
fn nexus_grows_online_while_published() {
    let target = Target::start(TargetConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        reactors: 1,
        ..TargetConfig::default()
    })
    .unwrap();
    let child: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(512, 8192)); // 4 MiB
    let nexus = Arc::new(Nexus::new(1 << 20, vec![("ram".into(), child)]).unwrap());
    let uuid = Uuid::new_v4();
    let nqn = cairn_nvmf::volume_nqn(&uuid);
    target
        .add_subsystem(SubsystemConfig {
            nqn: nqn.clone(),
            serial: "grow".into(),
            model: None,
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                uuid,
                device: nexus.clone(),
            }],
            allowed_hosts: None,
        })
        .unwrap();
    let connect = || {
        let mut o = InitiatorOptions::new(target.local_addr(), &nqn, HOST);
        o.io_queues = 1;
        NvmfDevice::connect(o).unwrap()
    };
    let client = Reactors::start(1, "client").unwrap();
    let before = connect();
    assert_eq!(before.info().num_blocks, 2048);
    write_read(&client, &before, 1000).unwrap();
    assert!(matches!(
        write_read(&client, &before, 4000),
        Err(BdevError::OutOfRange { .. })
    ));

    // Grow while the first host stays connected.
    nexus.resize(4 << 20).unwrap();
    let after = connect();
    assert_eq!(after.info().num_blocks, 8192);
    write_read(&client, &after, 4000).unwrap();
    write_read(&client, &after, 8184).unwrap();
    assert!(matches!(
        write_read(&client, &after, 8190),
        Err(BdevError::OutOfRange { .. })
    ));
    // The first host's data is intact.
    write_read(&client, &before, 1000).unwrap();

    after.disconnect();
    before.disconnect();
    client.shutdown();
    target.shutdown();
}

/// A nexus whose child is remote (reached through the initiator) grows once
/// the remote volume has: the child is asked for its size again.
#[test]
fn nexus_with_a_remote_child_grows_after_it() {
    let target = Target::start(TargetConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        reactors: 1,
        ..TargetConfig::default()
    })
    .unwrap();
    // The remote side: a 1 MiB volume over 4 MiB of RAM, exported.
    let ram: Arc<dyn BlockDevice> = Arc::new(RamDevice::new(512, 8192));
    let remote = Arc::new(Nexus::new(1 << 20, vec![("ram".into(), ram)]).unwrap());
    let uuid = Uuid::new_v4();
    let nqn = cairn_nvmf::replica_nqn(&uuid);
    target
        .add_subsystem(SubsystemConfig {
            nqn: nqn.clone(),
            serial: "remote".into(),
            model: None,
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                uuid,
                device: remote.clone(),
            }],
            allowed_hosts: None,
        })
        .unwrap();
    let mut o = InitiatorOptions::new(target.local_addr(), &nqn, HOST);
    o.io_queues = 1;
    let child = NvmfDevice::connect(o).unwrap();
    let local = Nexus::new(
        1 << 20,
        vec![("nvmf://remote".into(), Arc::new(child.clone()))],
    )
    .unwrap();
    assert!(
        local.resize(4 << 20).is_err(),
        "the child has not grown yet"
    );
    remote.resize(4 << 20).unwrap();
    local.resize(4 << 20).unwrap();
    assert_eq!(local.info().num_blocks, 8192);
    let client = Reactors::start(1, "client").unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(local);
    client
        .run(0, move || async move {
            let q = dev.open_channel().unwrap();
            let (r, _) = q.write(8000, IoBuf::from_slice(&[7; 4096]), false).await;
            r.unwrap();
        })
        .unwrap();
    child.disconnect();
    client.shutdown();
    target.shutdown();
}
