//! Several nodes on loopback addresses in one process, sharing one state
//! store: volumes with replicas on different nodes, their nexus reaching
//! remote replicas through Cairn's NVMe/TCP initiator.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_agent::control::{Control, ControlConfig, CreateVolume};
use cairn_agent::node::{NodeConfig, PoolConfig};
use cairn_bdev::{BlockDevice, IoBuf};
use cairn_engine::core::Engine;
use cairn_engine::daemon::{self, EngineConfig};
use cairn_engine::initiator::{InitiatorOptions, NvmfDevice};
use cairn_engine::reactor::Reactors;
use cairn_engine::service::EngineService;
use cairn_proto::engine::v1 as epb;

struct Node {
    id: String,
    host_nqn: String,
    engine: Arc<Engine>,
    registrar: tokio::task::JoinHandle<anyhow::Result<()>>,
    server: tokio::task::JoinHandle<()>,
    endpoint: String,
}

async fn start_node(k: u8, dir: &std::path::Path, control: &Control) -> Node {
    let id = format!("node-{k}");
    let cfg = EngineConfig {
        nvmf_listen: SocketAddr::from(([127, 0, 0, k], 0)),
        reactors: 1,
        max_io_queues: 4,
        host_nqn: format!("nqn.2024-01.dev.cairn:engine:{id}"),
        pools: vec![],
        nexus: Default::default(),
        busy_poll: cairn_engine::target::DEFAULT_BUSY_POLL,
    };
    let engine = daemon::start(&cfg, daemon::remote_opener(cfg.host_nqn.clone())).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let svc = EngineService::new(engine.clone()).server();
    let server = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let host_nqn =
        format!("nqn.2014-08.org.nvmexpress:uuid:0000000{k}-0000-0000-0000-000000000000");
    let node = NodeConfig {
        node_id: id.clone(),
        node_address: None,
        engine_endpoint: endpoint.clone(),
        host_nqn: host_nqn.clone(),
        topology: BTreeMap::from([("zone".to_owned(), format!("z{k}"))]),
        pools: vec![PoolConfig {
            name: format!("pool-{k}"),
            device: dir.join(format!("pool-{k}.img")).display().to_string(),
            size: Some(256 << 20),
        }],
        heartbeat: Duration::from_millis(300),
    };
    let registrar = tokio::spawn(cairn_agent::node::run(node, control.clone()));
    Node {
        id,
        host_nqn,
        engine,
        registrar,
        server,
        endpoint,
    }
}

async fn wait_for_nodes(control: &Control, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let nodes = control.nodes().await.unwrap();
        if nodes
            .iter()
            .filter(|x| control.is_online(x) && !x.pools.is_empty())
            .count()
            == n
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nodes did not register: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn pattern(len: usize, seed: u8) -> IoBuf {
    let mut b = IoBuf::zeroed(len);
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
    b
}

/// Connects to a published volume as `host_nqn`, writes then reads back.
fn write_and_verify(
    addr: &str,
    nqn: &str,
    host_nqn: &str,
    seed: u8,
    write: bool,
) -> Result<(), String> {
    let sa: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let mut o = InitiatorOptions::new(sa, nqn, host_nqn);
    o.io_queues = 1;
    let dev = NvmfDevice::connect(o).map_err(|e| e.to_string())?;
    let client = Reactors::start(1, "client").map_err(|e| e.to_string())?;
    let d = dev.clone();
    let r = client
        .run(0, move || async move {
            let q = d.open_channel().map_err(|e| e.to_string())?;
            for i in 0..16u64 {
                let lba = i * 2048; // one per MiB: many clusters
                if write {
                    let (r, _) = q.write(lba, pattern(8192, seed + i as u8), false).await;
                    r.map_err(|e| format!("write {lba}: {e}"))?;
                }
                let (r, got) = q.read(lba, IoBuf::zeroed(8192)).await;
                r.map_err(|e| format!("read {lba}: {e}"))?;
                if got.as_slice() != pattern(8192, seed + i as u8).as_slice() {
                    return Err(format!("data at lba {lba} differs"));
                }
            }
            q.flush().await.map_err(|e| e.to_string())?;
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    dev.disconnect();
    client.shutdown();
    r
}

async fn child_states(endpoint: &str, id: &str) -> Vec<(String, i32)> {
    let mut c = epb::engine_client::EngineClient::connect(endpoint.to_owned())
        .await
        .unwrap();
    let nx = c
        .list_nexuses(epb::ListNexusesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nexuses;
    nx.into_iter()
        .find(|n| n.uuid == id)
        .map(|n| n.children.into_iter().map(|c| (c.uri, c.state)).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_volume_across_nodes_survives_a_lost_replica() {
    let dir = tempfile::tempdir().unwrap();
    let store = cairn_agent::open_store(&dir.path().join("state.redb").display().to_string())
        .await
        .unwrap();
    let control = Control::new(
        store,
        ControlConfig {
            node_lease: Duration::from_secs(3),
            ..ControlConfig::default()
        },
    );
    let mut nodes = Vec::new();
    for k in 2..=4u8 {
        nodes.push(start_node(k, dir.path(), &control).await);
    }
    wait_for_nodes(&control, 3).await;

    // Two replicas on two distinct nodes, kept out of node-2 by topology.
    let vol = control
        .create_volume(CreateVolume {
            name: "mirror".into(),
            size_bytes: 64 << 20,
            min_bytes: 0,
            max_bytes: 0,
            replicas: 2,
            thin: true,
            requisite: vec![
                BTreeMap::from([("zone".to_owned(), "z3".to_owned())]),
                BTreeMap::from([("zone".to_owned(), "z4".to_owned())]),
            ],
            preferred: vec![],
        })
        .await
        .unwrap();
    let mut holders: Vec<&str> = vol.replicas.iter().map(|r| r.node.as_str()).collect();
    holders.sort();
    assert_eq!(holders, vec!["node-3", "node-4"]);

    // Published on node-2, which holds no replica: both children are remote.
    let vol = control.publish_volume(&vol.id, "node-2").await.unwrap();
    let t = vol.target.clone().unwrap();
    let (addr, nqn, host) = (t.address.clone(), t.nqn.clone(), nodes[0].host_nqn.clone());
    tokio::task::spawn_blocking(move || write_and_verify(&addr, &nqn, &host, 1, true))
        .await
        .unwrap()
        .unwrap();
    // Only node-2's host may connect.
    let (addr, nqn) = (t.address.clone(), t.nqn.clone());
    let other = nodes[1].host_nqn.clone();
    let refused =
        tokio::task::spawn_blocking(move || write_and_verify(&addr, &nqn, &other, 1, false))
            .await
            .unwrap();
    assert!(refused.is_err(), "a host not on the allow-list connected");

    // Move the volume to node-3 (local + remote child): the data is there.
    control.unpublish_volume(&vol.id, "").await.unwrap();
    let vol = control.publish_volume(&vol.id, "node-3").await.unwrap();
    let t = vol.target.clone().unwrap();
    let (addr, nqn, host) = (t.address.clone(), t.nqn.clone(), nodes[1].host_nqn.clone());
    tokio::task::spawn_blocking(move || write_and_verify(&addr, &nqn, &host, 1, false))
        .await
        .unwrap()
        .unwrap();

    // Lose node-4: the nexus faults its remote child and keeps serving.
    let lost = nodes.pop().unwrap();
    lost.registrar.abort();
    lost.server.abort();
    lost.engine.shutdown();
    let (addr, nqn, host) = (t.address.clone(), t.nqn.clone(), nodes[1].host_nqn.clone());
    tokio::task::spawn_blocking(move || write_and_verify(&addr, &nqn, &host, 9, true))
        .await
        .unwrap()
        .unwrap();
    let states = child_states(&nodes[1].endpoint, &vol.id).await;
    assert_eq!(states.len(), 2, "{states:?}");
    let faulted = states
        .iter()
        .filter(|(_, s)| *s == epb::ChildState::Faulted as i32)
        .count();
    assert_eq!(faulted, 1, "{states:?}");
    assert!(
        states
            .iter()
            .any(|(u, s)| u.starts_with("replica:///") && *s == epb::ChildState::Healthy as i32),
        "{states:?}"
    );

    control.unpublish_volume(&vol.id, "").await.unwrap();
    for n in &nodes {
        n.registrar.abort();
        n.server.abort();
        n.engine.shutdown();
    }
    assert!(nodes.iter().all(|n| !n.id.is_empty()));
}
