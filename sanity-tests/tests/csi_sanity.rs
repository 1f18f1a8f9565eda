//! CSI conformance of Cairn's driver, in the spirit of kubernetes-csi's
//! csi-sanity: a whole single-node Cairn (engine, agent, store, pool, CSI
//! services) runs in this process on a temporary data directory and
//! ephemeral ports, and every check talks CSI gRPC over its Unix socket as
//! a container orchestrator would. Error codes are those of the CSI spec
//! (v1.12.0, what the Kubernetes sidecars and the upstream csi-sanity are
//! built against) error tables; each test states the rule it checks.
//!
//! Node-service checks here need no kernel (argument checks, info,
//! capabilities); `vm_csi.rs` runs the node service against a real kernel.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use cairn_cli::system::{System, SystemConfig};
use cairn_proto::agent::v1 as apb;
use cairn_proto::csi::v1 as csi;
use cairn_proto::engine::v1 as epb;
use cairn_sanity_tests::csi::{
    block_cap, create_request, ext4_rwo, mount_cap, params, range, CsiClients,
};
use csi::volume_capability::access_mode::Mode;
use tonic::{Code, Response, Status};

const MIB: i64 = 1 << 20;
const NODE: &str = "sanity-node-1";
const TOPOLOGY_KEY: &str = "topology.csi.cairn.dev/node";

/// What a test body gets: CSI clients and the system's endpoints.
#[derive(Clone)]
struct Ctx {
    csi: CsiClients,
    node_id: String,
    agent_endpoint: String,
    engine_endpoint: String,
    nvmf_port: u16,
    dir: PathBuf,
}

/// Starts a system on a fresh data dir (1 GiB pool), runs `body` against
/// it on a client runtime, then stops the system. The body's error wins;
/// a failed stop is reported too.
fn with_system<F, Fut>(body: F) -> Result<()>
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    with_nodes(0, body)
}

/// Like [`with_system`], with `replica_nodes` more nodes in the cluster.
fn with_nodes<F, Fut>(replica_nodes: u8, body: F) -> Result<()>
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    with_config(|cfg| cfg.replica_nodes = replica_nodes, body)
}

/// Like [`with_system`], with the system's configuration adjusted by `tune`.
fn with_config<F, Fut>(tune: impl FnOnce(&mut SystemConfig), body: F) -> Result<()>
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let dir = tempfile::tempdir().context("tempdir")?;
    let mut cfg = SystemConfig::ephemeral(dir.path().to_path_buf());
    cfg.pool_size = 1 << 30;
    tune(&mut cfg);
    cfg.node_id = Some(NODE.into());
    cfg.host_nqn = Some(format!(
        "nqn.2014-08.org.nvmexpress:uuid:{}",
        uuid::Uuid::new_v4()
    ));
    let sys = System::start(cfg).context("starting the system")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let csi = CsiClients::connect(&sys.csi_socket)
            .await
            .context("connecting to the CSI socket")?;
        let ctx = Ctx {
            csi,
            node_id: sys.node_id.clone(),
            agent_endpoint: sys.agent_endpoint.clone(),
            engine_endpoint: sys.engine_endpoint.clone(),
            nvmf_port: sys.nvmf_addr.port(),
            dir: dir.path().to_path_buf(),
        };
        tokio::time::timeout(Duration::from_secs(240), body(ctx))
            .await
            .context("test body timed out")?
    });
    drop(rt);
    let stopped = sys.stop();
    result?;
    stopped.context("stopping the system")
}

/// The gRPC code of a call's outcome (`Ok` for success).
fn code<T>(r: &Result<Response<T>, Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Asserts a call failed with `want`, naming the case.
fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: Result<Response<T>, Status>,
    want: Code,
) -> Result<()> {
    match r {
        Ok(resp) if want == Code::Ok => {
            let _ = resp;
            Ok(())
        }
        Ok(resp) => bail!("{what}: expected {want:?}, got OK: {:?}", resp.into_inner()),
        Err(s) if s.code() == want => Ok(()),
        Err(s) => bail!(
            "{what}: expected {want:?}, got {:?}: {}",
            s.code(),
            s.message()
        ),
    }
}

async fn create(ctx: &Ctx, req: csi::CreateVolumeRequest) -> Result<csi::Volume> {
    let name = req.name.clone();
    ctx.csi
        .controller
        .clone()
        .create_volume(req)
        .await
        .with_context(|| format!("CreateVolume {name}"))?
        .into_inner()
        .volume
        .context("CreateVolume answered without a volume")
}

async fn delete(ctx: &Ctx, id: &str) -> Result<()> {
    ctx.csi
        .controller
        .clone()
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: id.into(),
            secrets: HashMap::new(),
        })
        .await
        .with_context(|| format!("DeleteVolume {id}"))?;
    Ok(())
}

fn publish_req(id: &str, node: &str) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(ext4_rwo()),
        ..Default::default()
    }
}

fn unpublish_req(id: &str, node: &str) -> csi::ControllerUnpublishVolumeRequest {
    csi::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        secrets: HashMap::new(),
    }
}

async fn get_volume(ctx: &Ctx, id: &str) -> Result<csi::ControllerGetVolumeResponse> {
    Ok(ctx
        .csi
        .controller
        .clone()
        .controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: id.into(),
        })
        .await
        .with_context(|| format!("ControllerGetVolume {id}"))?
        .into_inner())
}

fn unknown_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

async fn controller_caps(ctx: &Ctx) -> Result<BTreeSet<i32>> {
    use csi::controller_service_capability::Type;
    let caps = ctx
        .csi
        .controller
        .clone()
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities;
    let mut out = BTreeSet::new();
    for c in caps {
        match c.r#type {
            Some(Type::Rpc(r)) => {
                ensure!(out.insert(r.r#type), "capability {} listed twice", r.r#type);
            }
            None => bail!("controller capability without a type"),
        }
    }
    Ok(out)
}

async fn node_caps(ctx: &Ctx) -> Result<BTreeSet<i32>> {
    use csi::node_service_capability::Type;
    let caps = ctx
        .csi
        .node
        .clone()
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await?
        .into_inner()
        .capabilities;
    let mut out = BTreeSet::new();
    for c in caps {
        match c.r#type {
            Some(Type::Rpc(r)) => {
                ensure!(out.insert(r.r#type), "capability {} listed twice", r.r#type);
            }
            None => bail!("node capability without a type"),
        }
    }
    Ok(out)
}

/// Volume ids the agent knows, and replica uuids the engine holds.
async fn backend_state(ctx: &Ctx) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let mut agent = apb::control_client::ControlClient::connect(ctx.agent_endpoint.clone()).await?;
    let vols = agent
        .list_volumes(apb::ListVolumesRequest {
            max_entries: 0,
            starting_token: String::new(),
        })
        .await?
        .into_inner();
    ensure!(
        vols.next_token.is_empty(),
        "max_entries 0 must list everything"
    );
    let mut engine = epb::engine_client::EngineClient::connect(ctx.engine_endpoint.clone()).await?;
    let reps = engine
        .list_replicas(epb::ListReplicasRequest {
            pool: String::new(),
        })
        .await?
        .into_inner();
    Ok((
        vols.volumes.into_iter().map(|v| v.id).collect(),
        reps.replicas.into_iter().map(|r| r.uuid).collect(),
    ))
}

// ---- Identity -----------------------------------------------------------

#[test]
fn identity_info_capabilities_probe() -> Result<()> {
    with_system(|ctx| async move {
        use csi::plugin_capability::{service::Type as Svc, Type};
        let mut id = ctx.csi.identity.clone();
        let info = id
            .get_plugin_info(csi::GetPluginInfoRequest {})
            .await?
            .into_inner();
        ensure!(info.name == "csi.cairn.dev", "plugin name {:?}", info.name);
        ensure!(
            info.vendor_version == env!("CARGO_PKG_VERSION"),
            "vendor version {:?}",
            info.vendor_version
        );

        let caps = id
            .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
            .await?
            .into_inner()
            .capabilities;
        let services: Vec<i32> = caps
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(Type::Service(s)) => Some(s.r#type),
                _ => None,
            })
            .collect();
        ensure!(
            services.contains(&(Svc::ControllerService as i32)),
            "CONTROLLER_SERVICE not advertised: {caps:?}"
        );
        // VOLUME_ACCESSIBILITY_CONSTRAINTS obliges NodeGetInfo to report a
        // topology.
        if services.contains(&(Svc::VolumeAccessibilityConstraints as i32)) {
            let info = ctx
                .csi
                .node
                .clone()
                .node_get_info(csi::NodeGetInfoRequest {})
                .await?
                .into_inner();
            ensure!(
                info.accessible_topology
                    .is_some_and(|t| !t.segments.is_empty()),
                "VOLUME_ACCESSIBILITY_CONSTRAINTS advertised but NodeGetInfo has no topology"
            );
        }

        let probe = id.probe(csi::ProbeRequest {}).await?.into_inner();
        ensure!(probe.ready == Some(true), "probe: {probe:?}");
        Ok(())
    })
}

// ---- Capabilities: everything advertised answers ------------------------

/// For every advertised controller and node capability, one RPC that
/// belongs to it answers with something other than UNIMPLEMENTED.
#[test]
fn every_advertised_capability_is_implemented() -> Result<()> {
    with_system(every_capability_answers)
}

#[test]
fn every_advertised_alpha_capability_is_implemented() -> Result<()> {
    with_config(|cfg| cfg.csi_alpha = true, every_capability_answers)
}

/// Rule: only capabilities CSI v1.12.0 defines are advertised (csi-sanity
/// fails on any other value), and its alpha ones only when asked for.
#[test]
fn advertised_capabilities_are_csi_v1_12_ga_unless_alpha_is_asked_for() -> Result<()> {
    use csi::controller_service_capability::rpc::Type as C;
    use csi::node_service_capability::rpc::Type as N;
    let ga_controller: BTreeSet<i32> = [
        C::CreateDeleteVolume,
        C::PublishUnpublishVolume,
        C::ListVolumes,
        C::GetCapacity,
        C::ExpandVolume,
        C::ListVolumesPublishedNodes,
        C::SingleNodeMultiWriter,
    ]
    .into_iter()
    .map(|c| c as i32)
    .collect();
    let ga_node: BTreeSet<i32> = [
        N::StageUnstageVolume,
        N::GetVolumeStats,
        N::ExpandVolume,
        N::SingleNodeMultiWriter,
    ]
    .into_iter()
    .map(|c| c as i32)
    .collect();
    let (c_ga, n_ga) = (ga_controller.clone(), ga_node.clone());
    with_system(|ctx| async move {
        ensure!(controller_caps(&ctx).await? == c_ga, "controller");
        ensure!(node_caps(&ctx).await? == n_ga, "node");
        Ok(())
    })?;
    with_config(
        |cfg| cfg.csi_alpha = true,
        |ctx| async move {
            let mut c = ga_controller;
            c.extend([C::GetVolume as i32, C::VolumeCondition as i32]);
            let mut n = ga_node;
            n.insert(N::VolumeCondition as i32);
            ensure!(controller_caps(&ctx).await? == c, "controller, alpha");
            ensure!(node_caps(&ctx).await? == n, "node, alpha");
            // With VOLUME_CONDITION, ListVolumes and ControllerGetVolume
            // report each volume's condition.
            let vol = create(&ctx, create_request("cond-vol", 16 * MIB, &[])).await?;
            let got = get_volume(&ctx, &vol.volume_id).await?;
            let cond = got
                .status
                .and_then(|s| s.volume_condition)
                .context("no volume condition")?;
            ensure!(!cond.abnormal, "a new volume is normal: {cond:?}");
            let list = ctx
                .csi
                .controller
                .clone()
                .list_volumes(csi::ListVolumesRequest::default())
                .await?
                .into_inner();
            ensure!(
                list.entries.iter().all(|e| e
                    .status
                    .as_ref()
                    .is_some_and(|s| s.volume_condition.is_some())),
                "ListVolumes entries without a condition"
            );
            delete(&ctx, &vol.volume_id).await
        },
    )
}

async fn every_capability_answers(ctx: Ctx) -> Result<()> {
    {
        use csi::controller_service_capability::rpc::Type as C;
        use csi::node_service_capability::rpc::Type as N;
        let mut ctl = ctx.csi.controller.clone();
        let mut node = ctx.csi.node.clone();
        let vol = create(&ctx, create_request("caps-vol", 16 * MIB, &[])).await?;
        let id = vol.volume_id.clone();
        let staging = ctx.dir.join("staging-caps");
        let target = ctx.dir.join("target-caps");

        let ccaps = controller_caps(&ctx).await?;
        for want in [C::CreateDeleteVolume, C::PublishUnpublishVolume] {
            ensure!(ccaps.contains(&(want as i32)), "{want:?} not advertised");
        }
        for cap in &ccaps {
            let c = C::try_from(*cap).with_context(|| format!("unknown capability {cap}"))?;
            let got = match c {
                C::CreateDeleteVolume => code(
                    &ctl.create_volume(create_request("caps-vol", 16 * MIB, &[]))
                        .await,
                ),
                C::PublishUnpublishVolume => {
                    let r = code(&ctl.controller_publish_volume(publish_req(&id, NODE)).await);
                    ensure!(r == Code::Ok, "ControllerPublishVolume: {r:?}");
                    code(
                        &ctl.controller_unpublish_volume(unpublish_req(&id, NODE))
                            .await,
                    )
                }
                C::ListVolumes | C::ListVolumesPublishedNodes => {
                    code(&ctl.list_volumes(csi::ListVolumesRequest::default()).await)
                }
                C::GetCapacity => code(&ctl.get_capacity(csi::GetCapacityRequest::default()).await),
                C::ExpandVolume => code(
                    &ctl.controller_expand_volume(csi::ControllerExpandVolumeRequest {
                        volume_id: id.clone(),
                        capacity_range: range(32 * MIB, 0),
                        volume_capability: Some(ext4_rwo()),
                        ..Default::default()
                    })
                    .await,
                ),
                C::GetVolume => code(
                    &ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
                        volume_id: id.clone(),
                    })
                    .await,
                ),
                C::VolumeCondition => {
                    let r = ctl
                        .controller_get_volume(csi::ControllerGetVolumeRequest {
                            volume_id: id.clone(),
                        })
                        .await;
                    if let Ok(v) = &r {
                        let cond = v
                            .get_ref()
                            .status
                            .as_ref()
                            .and_then(|s| s.volume_condition.clone());
                        ensure!(cond.is_some(), "VOLUME_CONDITION without a condition");
                    }
                    code(&r)
                }
                C::SingleNodeMultiWriter => code(
                    &ctl.validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
                        volume_id: id.clone(),
                        volume_capabilities: vec![mount_cap("ext4", Mode::SingleNodeMultiWriter)],
                        ..Default::default()
                    })
                    .await,
                ),
                C::CreateDeleteSnapshot | C::ListSnapshots | C::CloneVolume | C::GetSnapshot => {
                    code(
                        &ctl.list_snapshots(csi::ListSnapshotsRequest::default())
                            .await,
                    )
                }
                C::ModifyVolume => code(
                    &ctl.controller_modify_volume(csi::ControllerModifyVolumeRequest {
                        volume_id: id.clone(),
                        ..Default::default()
                    })
                    .await,
                ),
                other => {
                    bail!("capability {other:?} is advertised but this suite has no check for it")
                }
            };
            ensure!(
                got == Code::Ok,
                "controller capability {c:?} is advertised; its RPC answered {got:?}"
            );
        }

        let ncaps = node_caps(&ctx).await?;
        ensure!(
            ncaps.contains(&(N::StageUnstageVolume as i32)),
            "STAGE_UNSTAGE_VOLUME not advertised"
        );
        for cap in &ncaps {
            let c = N::try_from(*cap).with_context(|| format!("unknown capability {cap}"))?;
            // Without a kernel these cannot succeed; they must answer with
            // the code the spec gives for the situation, never UNIMPLEMENTED.
            let (got, want) = match c {
                N::StageUnstageVolume => (
                    code(
                        &node
                            .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                                volume_id: id.clone(),
                                staging_target_path: staging.display().to_string(),
                            })
                            .await,
                    ),
                    vec![Code::Ok],
                ),
                N::GetVolumeStats => (
                    code(
                        &node
                            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                                volume_id: id.clone(),
                                volume_path: target.display().to_string(),
                                staging_target_path: String::new(),
                            })
                            .await,
                    ),
                    vec![Code::NotFound],
                ),
                N::ExpandVolume => (
                    code(
                        &node
                            .node_expand_volume(csi::NodeExpandVolumeRequest {
                                volume_id: id.clone(),
                                volume_path: target.display().to_string(),
                                capacity_range: range(32 * MIB, 0),
                                ..Default::default()
                            })
                            .await,
                    ),
                    vec![Code::NotFound],
                ),
                // The condition comes with the stats, which need the volume
                // published at the path.
                N::VolumeCondition => (
                    code(
                        &node
                            .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                                volume_id: id.clone(),
                                volume_path: target.display().to_string(),
                                staging_target_path: String::new(),
                            })
                            .await,
                    ),
                    vec![Code::NotFound],
                ),
                N::SingleNodeMultiWriter => (
                    code(
                        &node
                            .node_publish_volume(csi::NodePublishVolumeRequest {
                                volume_id: id.clone(),
                                staging_target_path: staging.display().to_string(),
                                target_path: target.display().to_string(),
                                volume_capability: Some(mount_cap(
                                    "ext4",
                                    Mode::SingleNodeMultiWriter,
                                )),
                                ..Default::default()
                            })
                            .await,
                    ),
                    // Accepted mode; fails only because nothing is staged.
                    vec![Code::FailedPrecondition],
                ),
                other => bail!("node capability {other:?} is advertised but has no check here"),
            };
            ensure!(
                want.contains(&got),
                "node capability {c:?}: expected {want:?}, got {got:?}"
            );
        }
        delete(&ctx, &id).await
    }
}

// ---- CreateVolume ------------------------------------------------------

#[test]
fn create_volume_argument_errors() -> Result<()> {
    with_system(|ctx| async move {
        let mut ctl = ctx.csi.controller.clone();
        let base = create_request("args-vol", 16 * MIB, &[]);
        let mut cases: Vec<(&str, csi::CreateVolumeRequest, Code)> = Vec::new();
        let mut r = base.clone();
        r.name.clear();
        cases.push(("missing name", r, Code::InvalidArgument));
        let mut r = base.clone();
        r.volume_capabilities.clear();
        cases.push(("missing capabilities", r, Code::InvalidArgument));
        let mut r = base.clone();
        r.volume_capabilities = vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)];
        cases.push(("MULTI_NODE_MULTI_WRITER", r, Code::InvalidArgument));
        let mut r = base.clone();
        r.volume_capabilities = vec![ext4_rwo(), block_cap(Mode::MultiNodeReaderOnly)];
        cases.push(("one unsupported mode of two", r, Code::InvalidArgument));
        let mut r = base.clone();
        r.volume_capabilities = vec![mount_cap("btrfs", Mode::SingleNodeWriter)];
        cases.push(("unsupported fs type", r, Code::InvalidArgument));
        let mut r = base.clone();
        r.volume_capabilities = vec![csi::VolumeCapability {
            access_mode: None,
            ..ext4_rwo()
        }];
        cases.push(("capability without access mode", r, Code::InvalidArgument));
        for (k, v) in [
            ("bogus", "1"),
            ("repl", "x"),
            ("repl", "0"),
            ("thin", "yes"),
            ("fsType", "btrfs"),
            ("protocol", "iscsi"),
            ("nrIoQueues", "-1"),
        ] {
            let mut r = base.clone();
            r.parameters = params(&[(k, v)]);
            expect_code(
                &format!("parameter {k}={v}"),
                ctl.create_volume(r).await,
                Code::InvalidArgument,
            )?;
        }
        let mut r = base.clone();
        r.capacity_range = range(64 * MIB, 32 * MIB);
        cases.push(("limit below required", r, Code::OutOfRange));
        let mut r = base.clone();
        r.capacity_range = range(-1, 0);
        cases.push(("negative required", r, Code::InvalidArgument));
        let mut r = base.clone();
        r.parameters = params(&[("repl", "2")]);
        cases.push(("repl=2 on one node", r, Code::ResourceExhausted));
        let mut r = base.clone();
        r.capacity_range = range(64 << 30, 0);
        r.parameters = params(&[("thin", "false")]);
        cases.push(("thick 64 GiB in a 1 GiB pool", r, Code::ResourceExhausted));
        for (what, req, want) in cases {
            expect_code(what, ctl.create_volume(req).await, want)?;
        }
        // None of the failures left a volume behind.
        let (vols, reps) = backend_state(&ctx).await?;
        ensure!(
            vols.is_empty() && reps.is_empty(),
            "left behind: {vols:?} {reps:?}"
        );
        // CO-added metadata parameters are accepted.
        let mut r = base.clone();
        r.parameters = params(&[("csi.storage.k8s.io/pvc/name", "data"), ("repl", "1")]);
        let v = create(&ctx, r).await?;
        delete(&ctx, &v.volume_id).await
    })
}

#[test]
fn create_volume_honours_the_capacity_range() -> Result<()> {
    with_system(|ctx| async move {
        let mut n = 0;
        for (req, lim) in [
            (10 * MIB + 1, 0),
            (10 * MIB + 1, 20 * MIB),
            (0, 5 * MIB),
            (3 * MIB, 3 * MIB),
            (0, 0),
        ] {
            n += 1;
            let mut r = create_request(&format!("range-{n}"), 0, &[]);
            r.capacity_range = if req == 0 && lim == 0 {
                None
            } else {
                range(req, lim)
            };
            let v = create(&ctx, r).await?;
            ensure!(
                v.capacity_bytes > 0,
                "{req}/{lim}: capacity {}",
                v.capacity_bytes
            );
            ensure!(
                v.capacity_bytes >= req,
                "{req}/{lim}: {} < required",
                v.capacity_bytes
            );
            ensure!(
                lim == 0 || v.capacity_bytes <= lim,
                "{req}/{lim}: {} > limit",
                v.capacity_bytes
            );
            let g = get_volume(&ctx, &v.volume_id).await?;
            ensure!(
                g.volume.as_ref().map(|x| x.capacity_bytes) == Some(v.capacity_bytes),
                "ControllerGetVolume size differs: {g:?}"
            );
            delete(&ctx, &v.volume_id).await?;
        }
        // No multiple of the allocation unit inside [1, 1000].
        expect_code(
            "range [1, 1000]",
            ctx.csi
                .controller
                .clone()
                .create_volume(csi::CreateVolumeRequest {
                    capacity_range: range(1, 1000),
                    ..create_request("range-tiny", 0, &[])
                })
                .await,
            Code::OutOfRange,
        )
    })
}

#[test]
fn create_volume_is_idempotent_by_name() -> Result<()> {
    with_system(|ctx| async move {
        let req = create_request("idem", 32 * MIB, &[("fsType", "xfs"), ("nrIoQueues", "2")]);
        let a = create(&ctx, req.clone()).await?;
        let b = create(&ctx, req.clone()).await?;
        ensure!(a == b, "second CreateVolume differs:\n{a:?}\n{b:?}");
        ensure!(
            a.volume_context.get("fsType").map(String::as_str) == Some("xfs"),
            "fsType missing from the volume context: {a:?}"
        );
        let mut bigger = req.clone();
        bigger.capacity_range = range(64 * MIB, 0);
        expect_code(
            "same name, different size",
            ctx.csi.controller.clone().create_volume(bigger).await,
            Code::AlreadyExists,
        )?;
        let mut thick = req.clone();
        thick.parameters.insert("thin".into(), "false".into());
        expect_code(
            "same name, thick instead of thin",
            ctx.csi.controller.clone().create_volume(thick).await,
            Code::AlreadyExists,
        )?;
        // Other names are other volumes.
        let c = create(&ctx, create_request("idem-2", 32 * MIB, &[])).await?;
        ensure!(c.volume_id != a.volume_id, "two names, one volume id");
        delete(&ctx, &a.volume_id).await?;
        delete(&ctx, &c.volume_id).await
    })
}

// ---- DeleteVolume ------------------------------------------------------

#[test]
fn delete_volume_is_idempotent() -> Result<()> {
    with_system(|ctx| async move {
        let mut ctl = ctx.csi.controller.clone();
        expect_code(
            "missing volume id",
            ctl.delete_volume(csi::DeleteVolumeRequest::default()).await,
            Code::InvalidArgument,
        )?;
        delete(&ctx, &unknown_id()).await.context("unknown uuid")?;
        delete(&ctx, "not-a-cairn-volume")
            .await
            .context("unknown id")?;
        let v = create(&ctx, create_request("del", 16 * MIB, &[])).await?;
        delete(&ctx, &v.volume_id).await?;
        delete(&ctx, &v.volume_id).await.context("second delete")?;
        expect_code(
            "ControllerGetVolume after delete",
            ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: v.volume_id.clone(),
            })
            .await,
            Code::NotFound,
        )?;
        let (vols, reps) = backend_state(&ctx).await?;
        ensure!(
            vols.is_empty() && reps.is_empty(),
            "left behind: {vols:?} {reps:?}"
        );
        // The name is free again.
        let again = create(&ctx, create_request("del", 32 * MIB, &[])).await?;
        ensure!(again.capacity_bytes == 32 * MIB, "{again:?}");
        delete(&ctx, &again.volume_id).await
    })
}

// ---- ControllerPublish / Unpublish -------------------------------------

#[test]
fn controller_publish_and_unpublish() -> Result<()> {
    with_system(|ctx| async move {
        let mut ctl = ctx.csi.controller.clone();
        let v = create(
            &ctx,
            create_request("pub", 16 * MIB, &[("nrIoQueues", "2")]),
        )
        .await?;
        let id = v.volume_id.clone();

        let mut r = publish_req(&id, NODE);
        r.volume_id.clear();
        expect_code(
            "missing volume id",
            ctl.controller_publish_volume(r).await,
            Code::InvalidArgument,
        )?;
        let mut r = publish_req(&id, NODE);
        r.node_id.clear();
        expect_code(
            "missing node id",
            ctl.controller_publish_volume(r).await,
            Code::InvalidArgument,
        )?;
        let mut r = publish_req(&id, NODE);
        r.volume_capability = None;
        expect_code(
            "missing capability",
            ctl.controller_publish_volume(r).await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "unknown volume",
            ctl.controller_publish_volume(publish_req(&unknown_id(), NODE))
                .await,
            Code::NotFound,
        )?;
        expect_code(
            "unknown node",
            ctl.controller_publish_volume(publish_req(&id, "no-such-node"))
                .await,
            Code::NotFound,
        )?;

        let mut req = publish_req(&id, &ctx.node_id);
        req.volume_context = v.volume_context.clone();
        let a = ctl
            .controller_publish_volume(req.clone())
            .await?
            .into_inner();
        let b = ctl.controller_publish_volume(req).await?.into_inner();
        ensure!(a == b, "publish twice differs:\n{a:?}\n{b:?}");
        let pc = &a.publish_context;
        ensure!(
            pc.get("address").map(String::as_str) == Some("127.0.0.1"),
            "address: {pc:?}"
        );
        ensure!(
            pc.get("port") == Some(&ctx.nvmf_port.to_string()),
            "port (target listens on {}): {pc:?}",
            ctx.nvmf_port
        );
        ensure!(
            pc.get("nqn") == Some(&format!("nqn.2024-01.dev.cairn:vol:{id}")),
            "nqn: {pc:?}"
        );
        ensure!(
            pc.get("nrIoQueues").map(String::as_str) == Some("2"),
            "tunables: {pc:?}"
        );

        let g = get_volume(&ctx, &id).await?;
        ensure!(
            g.status.as_ref().map(|s| s.published_node_ids.clone()) == Some(vec![NODE.to_owned()]),
            "ControllerGetVolume status: {g:?}"
        );
        let list = ctl
            .list_volumes(csi::ListVolumesRequest::default())
            .await?
            .into_inner();
        let entry = list
            .entries
            .iter()
            .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == id))
            .context("published volume not listed")?;
        ensure!(
            entry.status.as_ref().map(|s| s.published_node_ids.clone())
                == Some(vec![NODE.to_owned()]),
            "ListVolumes status: {entry:?}"
        );

        let mut r = unpublish_req(&id, NODE);
        r.volume_id.clear();
        expect_code(
            "unpublish without volume id",
            ctl.controller_unpublish_volume(r).await,
            Code::InvalidArgument,
        )?;
        ctl.controller_unpublish_volume(unpublish_req(&id, NODE))
            .await?;
        ctl.controller_unpublish_volume(unpublish_req(&id, NODE))
            .await
            .context("second unpublish")?;
        ctl.controller_unpublish_volume(unpublish_req(&unknown_id(), NODE))
            .await
            .context("unpublish of an unknown volume")?;
        let g = get_volume(&ctx, &id).await?;
        ensure!(
            g.status
                .as_ref()
                .is_none_or(|s| s.published_node_ids.is_empty()),
            "still published after unpublish: {g:?}"
        );
        // Publish again after unpublish, then unpublish from every node.
        ctl.controller_publish_volume(publish_req(&id, NODE))
            .await?;
        ctl.controller_unpublish_volume(unpublish_req(&id, ""))
            .await?;
        let g = get_volume(&ctx, &id).await?;
        ensure!(
            g.status
                .as_ref()
                .is_none_or(|s| s.published_node_ids.is_empty()),
            "unpublish with no node id left it published: {g:?}"
        );
        delete(&ctx, &id).await
    })
}

// ---- ValidateVolumeCapabilities ----------------------------------------

#[test]
fn validate_volume_capabilities() -> Result<()> {
    with_system(|ctx| async move {
        let mut ctl = ctx.csi.controller.clone();
        let v = create(&ctx, create_request("validate", 16 * MIB, &[])).await?;
        let req =
            |id: &str, caps: Vec<csi::VolumeCapability>| csi::ValidateVolumeCapabilitiesRequest {
                volume_id: id.into(),
                volume_capabilities: caps,
                ..Default::default()
            };
        expect_code(
            "missing id",
            ctl.validate_volume_capabilities(req("", vec![ext4_rwo()]))
                .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "missing capabilities",
            ctl.validate_volume_capabilities(req(&v.volume_id, vec![]))
                .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "unknown volume",
            ctl.validate_volume_capabilities(req(&unknown_id(), vec![ext4_rwo()]))
                .await,
            Code::NotFound,
        )?;
        for caps in [
            vec![ext4_rwo()],
            vec![mount_cap("xfs", Mode::SingleNodeSingleWriter)],
            vec![mount_cap("", Mode::SingleNodeReaderOnly)],
            vec![
                block_cap(Mode::SingleNodeWriter),
                block_cap(Mode::SingleNodeMultiWriter),
            ],
        ] {
            let r = ctl
                .validate_volume_capabilities(req(&v.volume_id, caps.clone()))
                .await?
                .into_inner();
            let confirmed = r
                .confirmed
                .with_context(|| format!("{caps:?} not confirmed: {}", r.message))?;
            ensure!(
                confirmed.volume_capabilities == caps,
                "confirmed other capabilities: {confirmed:?}"
            );
        }
        for caps in [
            vec![mount_cap("ext4", Mode::MultiNodeMultiWriter)],
            vec![ext4_rwo(), block_cap(Mode::MultiNodeMultiWriter)],
            vec![mount_cap("btrfs", Mode::SingleNodeWriter)],
        ] {
            let r = ctl
                .validate_volume_capabilities(req(&v.volume_id, caps.clone()))
                .await?
                .into_inner();
            ensure!(r.confirmed.is_none(), "{caps:?} confirmed");
            ensure!(!r.message.is_empty(), "{caps:?}: no reason given");
        }
        delete(&ctx, &v.volume_id).await
    })
}

// ---- ListVolumes, GetVolume -----------------------------------------------

#[test]
fn list_volumes_paginates() -> Result<()> {
    with_system(|ctx| async move {
        let mut ctl = ctx.csi.controller.clone();
        let mut ids = BTreeSet::new();
        for i in 0..5 {
            let v = create(&ctx, create_request(&format!("list-{i}"), 16 * MIB, &[])).await?;
            ids.insert(v.volume_id);
        }
        for page_size in [1, 2, 3, 5, 7] {
            let mut seen = Vec::new();
            let mut token = String::new();
            for _ in 0..10 {
                let r = ctl
                    .list_volumes(csi::ListVolumesRequest {
                        max_entries: page_size,
                        starting_token: token.clone(),
                    })
                    .await?
                    .into_inner();
                ensure!(
                    r.entries.len() <= page_size as usize,
                    "page of {} entries for max_entries {page_size}",
                    r.entries.len()
                );
                for e in &r.entries {
                    let v = e.volume.as_ref().context("entry without volume")?;
                    ensure!(v.capacity_bytes == 16 * MIB, "{v:?}");
                    seen.push(v.volume_id.clone());
                }
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            let unique: BTreeSet<String> = seen.iter().cloned().collect();
            ensure!(
                unique.len() == seen.len(),
                "max_entries {page_size}: duplicates in {seen:?}"
            );
            ensure!(
                unique == ids,
                "max_entries {page_size}: listed {unique:?}, created {ids:?}"
            );
        }
        let all = ctl
            .list_volumes(csi::ListVolumesRequest::default())
            .await?
            .into_inner();
        ensure!(
            all.entries.len() == 5 && all.next_token.is_empty(),
            "unpaged: {all:?}"
        );
        expect_code(
            "bad starting token",
            ctl.list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: "no-such-token".into(),
            })
            .await,
            Code::Aborted,
        )?;
        expect_code(
            "negative max_entries",
            ctl.list_volumes(csi::ListVolumesRequest {
                max_entries: -1,
                starting_token: String::new(),
            })
            .await,
            Code::InvalidArgument,
        )?;

        // Without the alpha capabilities, no volume condition is reported.
        ensure!(
            all.entries.iter().all(|e| e
                .status
                .as_ref()
                .is_some_and(|s| s.volume_condition.is_none())),
            "a volume condition without VOLUME_CONDITION"
        );
        expect_code(
            "get an unknown volume",
            ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: unknown_id(),
            })
            .await,
            Code::NotFound,
        )?;
        expect_code(
            "get without volume id",
            ctl.controller_get_volume(csi::ControllerGetVolumeRequest::default())
                .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "ControllerGetVolume of an unknown volume",
            ctl.controller_get_volume(csi::ControllerGetVolumeRequest {
                volume_id: unknown_id(),
            })
            .await,
            Code::NotFound,
        )?;
        for id in &ids {
            delete(&ctx, id).await?;
        }
        Ok(())
    })
}

// ---- GetCapacity -------------------------------------------------------

#[test]
fn get_capacity_tracks_thick_volumes() -> Result<()> {
    with_system(|ctx| async move {
        let mut ctl = ctx.csi.controller.clone();
        let cap = |ctl: &mut csi::controller_client::ControllerClient<_>| {
            let mut ctl = ctl.clone();
            async move {
                anyhow::Ok(
                    ctl.get_capacity(csi::GetCapacityRequest {
                        volume_capabilities: vec![ext4_rwo()],
                        ..Default::default()
                    })
                    .await?
                    .into_inner(),
                )
            }
        };
        let before = cap(&mut ctl).await?;
        ensure!(before.available_capacity > 0, "{before:?}");
        ensure!(
            before
                .maximum_volume_size
                .is_none_or(|m| m > 0 && m <= 1 << 30),
            "maximum_volume_size beyond the 1 GiB pool: {before:?}"
        );
        let size = 256 * MIB;
        let v = create(&ctx, create_request("thick", size, &[("thin", "false")])).await?;
        // Pool usage reaches the agent with the node's heartbeat (1 s here),
        // so GetCapacity follows within a few seconds.
        let t0 = std::time::Instant::now();
        let mut after = cap(&mut ctl).await?;
        while after.available_capacity > before.available_capacity - size
            && t0.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            after = cap(&mut ctl).await?;
        }
        eprintln!(
            "capacity reflected the thick volume after {:?}",
            t0.elapsed()
        );
        ensure!(
            after.available_capacity <= before.available_capacity - size,
            "a thick {size}-byte volume took {} bytes of capacity",
            before.available_capacity - after.available_capacity
        );
        // Parameters no volume can be made with: nothing to report. The
        // spec has the plugin report the capacity usable for them, so 0 or
        // INVALID_ARGUMENT both say it; anything positive would be wrong.
        for p in [&[("bogus", "1")][..], &[("repl", "0")][..]] {
            let r = ctl
                .get_capacity(csi::GetCapacityRequest {
                    parameters: params(p),
                    ..Default::default()
                })
                .await;
            match r {
                Ok(c) => ensure!(
                    c.get_ref().available_capacity == 0,
                    "{p:?}: capacity {:?}",
                    c.get_ref()
                ),
                Err(s) => ensure!(s.code() == Code::InvalidArgument, "{p:?}: {s:?}"),
            }
        }
        delete(&ctx, &v.volume_id).await?;
        let t0 = std::time::Instant::now();
        let mut back = cap(&mut ctl).await?;
        while back.available_capacity != before.available_capacity
            && t0.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            back = cap(&mut ctl).await?;
        }
        eprintln!("capacity restored {:?} after the delete", t0.elapsed());
        ensure!(
            back.available_capacity == before.available_capacity,
            "capacity after delete {} != before {}",
            back.available_capacity,
            before.available_capacity
        );
        Ok(())
    })
}

// ---- ControllerExpandVolume --------------------------------------------

fn expand_req(
    id: &str,
    bytes: i64,
    cap: csi::VolumeCapability,
) -> csi::ControllerExpandVolumeRequest {
    csi::ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: range(bytes, 0),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

#[test]
fn controller_expand_volume() -> Result<()> {
    with_system(|ctx| async move {
        let mut ctl = ctx.csi.controller.clone();
        let v = create(&ctx, create_request("grow", 32 * MIB, &[])).await?;
        let id = v.volume_id.clone();
        let r = ctl
            .controller_expand_volume(expand_req(&id, 64 * MIB, ext4_rwo()))
            .await?
            .into_inner();
        ensure!(r.capacity_bytes >= 64 * MIB, "{r:?}");
        ensure!(
            r.node_expansion_required,
            "a filesystem volume needs the node to grow it"
        );
        let g = get_volume(&ctx, &id).await?;
        ensure!(
            g.volume.map(|v| v.capacity_bytes) == Some(r.capacity_bytes),
            "size not recorded"
        );
        // Same size again: idempotent.
        let again = ctl
            .controller_expand_volume(expand_req(&id, 64 * MIB, ext4_rwo()))
            .await?
            .into_inner();
        ensure!(again.capacity_bytes == r.capacity_bytes, "{again:?}");
        // Block: nothing to do on the node.
        let b = ctl
            .controller_expand_volume(expand_req(&id, 80 * MIB, block_cap(Mode::SingleNodeWriter)))
            .await?
            .into_inner();
        ensure!(
            b.capacity_bytes >= 80 * MIB && !b.node_expansion_required,
            "{b:?}"
        );

        // ONLINE expansion is advertised: a published volume grows too.
        ctl.controller_publish_volume(publish_req(&id, NODE))
            .await?;
        let on = ctl
            .controller_expand_volume(expand_req(&id, 96 * MIB, ext4_rwo()))
            .await;
        ctl.controller_unpublish_volume(unpublish_req(&id, NODE))
            .await?;
        let on = on
            .context("expanding a published volume (ONLINE advertised)")?
            .into_inner();
        ensure!(on.capacity_bytes >= 96 * MIB, "{on:?}");

        expect_code(
            "unknown volume",
            ctl.controller_expand_volume(expand_req(&unknown_id(), 64 * MIB, ext4_rwo()))
                .await,
            Code::NotFound,
        )?;
        expect_code(
            "missing volume id",
            ctl.controller_expand_volume(expand_req("", 64 * MIB, ext4_rwo()))
                .await,
            Code::InvalidArgument,
        )?;
        let mut r = expand_req(&id, 0, ext4_rwo());
        r.capacity_range = None;
        expect_code(
            "missing capacity range",
            ctl.controller_expand_volume(r).await,
            Code::InvalidArgument,
        )?;
        // Shrinking must fail, whatever the code (see the next test).
        let s = code(
            &ctl.controller_expand_volume(expand_req(&id, 16 * MIB, ext4_rwo()))
                .await,
        );
        ensure!(s != Code::Ok, "shrinking succeeded");
        let g = get_volume(&ctx, &id).await?;
        ensure!(
            g.volume.map(|v| v.capacity_bytes) == Some(on.capacity_bytes),
            "shrink changed the size"
        );
        delete(&ctx, &id).await
    })
}

/// CSI spec, ControllerExpandVolume errors: a capacity range the plugin
/// does not allow is OUT_OF_RANGE ("Unsupported capacity_range");
/// FAILED_PRECONDITION there means "published, and no ONLINE expansion".
#[test]
fn controller_expand_volume_shrink_is_out_of_range() -> Result<()> {
    with_system(|ctx| async move {
        let v = create(&ctx, create_request("shrink", 32 * MIB, &[])).await?;
        let r = ctx
            .csi
            .controller
            .clone()
            .controller_expand_volume(expand_req(&v.volume_id, 16 * MIB, ext4_rwo()))
            .await;
        delete(&ctx, &v.volume_id).await?;
        expect_code("shrink 32 MiB -> 16 MiB", r, Code::OutOfRange)
    })
}

// ---- Node service without a kernel -------------------------------------

#[test]
fn node_argument_checks_info_and_capabilities() -> Result<()> {
    with_system(|ctx| async move {
        let mut node = ctx.csi.node.clone();
        let id = unknown_id();
        let staging = ctx.dir.join("stage").display().to_string();
        let target = ctx.dir.join("pod/mount").display().to_string();
        let pc = params(&[
            ("address", "127.0.0.1"),
            ("port", "8420"),
            ("nqn", "nqn.2024-01.dev.cairn:vol:x"),
        ]);
        let stage = csi::NodeStageVolumeRequest {
            volume_id: id.clone(),
            publish_context: pc.clone(),
            staging_target_path: staging.clone(),
            volume_capability: Some(ext4_rwo()),
            ..Default::default()
        };
        let publish = csi::NodePublishVolumeRequest {
            volume_id: id.clone(),
            publish_context: pc.clone(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(ext4_rwo()),
            ..Default::default()
        };
        let mut s = stage.clone();
        s.volume_id.clear();
        expect_code(
            "stage: no volume id",
            node.node_stage_volume(s).await,
            Code::InvalidArgument,
        )?;
        let mut s = stage.clone();
        s.staging_target_path.clear();
        expect_code(
            "stage: no staging path",
            node.node_stage_volume(s).await,
            Code::InvalidArgument,
        )?;
        let mut s = stage.clone();
        s.volume_capability = None;
        expect_code(
            "stage: no capability",
            node.node_stage_volume(s).await,
            Code::InvalidArgument,
        )?;
        let mut s = stage.clone();
        s.volume_capability = Some(mount_cap("ext4", Mode::MultiNodeMultiWriter));
        expect_code(
            "stage: unsupported mode",
            node.node_stage_volume(s).await,
            Code::InvalidArgument,
        )?;
        let mut s = stage.clone();
        s.publish_context.remove("nqn");
        expect_code(
            "stage: publish context without nqn",
            node.node_stage_volume(s).await,
            Code::InvalidArgument,
        )?;

        let mut p = publish.clone();
        p.volume_id.clear();
        expect_code(
            "publish: no volume id",
            node.node_publish_volume(p).await,
            Code::InvalidArgument,
        )?;
        let mut p = publish.clone();
        p.target_path.clear();
        expect_code(
            "publish: no target path",
            node.node_publish_volume(p).await,
            Code::InvalidArgument,
        )?;
        let mut p = publish.clone();
        p.volume_capability = None;
        expect_code(
            "publish: no capability",
            node.node_publish_volume(p).await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "publish: not staged",
            node.node_publish_volume(publish.clone()).await,
            Code::FailedPrecondition,
        )?;

        expect_code(
            "unpublish: no volume id",
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: String::new(),
                target_path: target.clone(),
            })
            .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "unpublish: no target path",
            node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: id.clone(),
                target_path: String::new(),
            })
            .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "unstage: no volume id",
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: String::new(),
                staging_target_path: staging.clone(),
            })
            .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "unstage: no staging path",
            node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: id.clone(),
                staging_target_path: String::new(),
            })
            .await,
            Code::InvalidArgument,
        )?;
        // Nothing there: unpublish and unstage are already done.
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.clone(),
        })
        .await
        .context("unpublish of a path never published")?;
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
        })
        .await
        .context("unstage of a volume never staged")?;

        expect_code(
            "stats: no volume id",
            node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_path: target.clone(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "stats: no path",
            node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "stats: path does not exist",
            node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: target.clone(),
                ..Default::default()
            })
            .await,
            Code::NotFound,
        )?;
        expect_code(
            "expand: no volume id",
            node.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_path: target.clone(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "expand: no path",
            node.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        )?;

        let info = node
            .node_get_info(csi::NodeGetInfoRequest {})
            .await?
            .into_inner();
        ensure!(info.node_id == NODE, "{info:?}");
        ensure!(info.max_volumes_per_node >= 0, "{info:?}");
        let topo = info.accessible_topology.context("no topology")?;
        ensure!(
            topo.segments == HashMap::from([(TOPOLOGY_KEY.to_owned(), NODE.to_owned())]),
            "{topo:?}"
        );
        let caps = node_caps(&ctx).await?;
        use csi::node_service_capability::rpc::Type as N;
        for want in [N::StageUnstageVolume, N::GetVolumeStats, N::ExpandVolume] {
            ensure!(
                caps.contains(&(want as i32)),
                "{want:?} missing from {caps:?}"
            );
        }
        Ok(())
    })
}

/// CSI spec, NodePublishVolume errors: "Staging target path not set |
/// FAILED_PRECONDITION | STAGE_UNSTAGE_VOLUME capability is set but no
/// staging_target_path was set".
#[test]
fn node_publish_without_staging_path_is_failed_precondition() -> Result<()> {
    with_system(|ctx| async move {
        let r = ctx
            .csi
            .node
            .clone()
            .node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: unknown_id(),
                target_path: ctx.dir.join("t").display().to_string(),
                volume_capability: Some(ext4_rwo()),
                ..Default::default()
            })
            .await;
        expect_code("publish without staging path", r, Code::FailedPrecondition)
    })
}

// ---- Concurrency -------------------------------------------------------

#[test]
fn concurrent_create_of_one_name() -> Result<()> {
    with_system(|ctx| async move {
        let req = create_request("race", 16 * MIB, &[]);
        let (mut c1, mut c2) = (ctx.csi.controller.clone(), ctx.csi.controller.clone());
        let (a, b) = tokio::join!(c1.create_volume(req.clone()), c2.create_volume(req.clone()),);
        let ids: Vec<String> = [&a, &b]
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|r| {
                r.get_ref()
                    .volume
                    .as_ref()
                    .map(|v| v.volume_id.clone())
                    .unwrap_or_default()
            })
            .collect();
        let codes = [code(&a), code(&b)];
        match codes {
            [Code::Ok, Code::Ok] => ensure!(
                ids[0] == ids[1] && !ids[0].is_empty(),
                "two volumes for one name: {ids:?}"
            ),
            [Code::Ok, Code::Aborted] | [Code::Aborted, Code::Ok] => {}
            other => bail!("concurrent CreateVolume answered {other:?} ({a:?} / {b:?})"),
        }
        // Retrying after ABORTED gives the same volume.
        let v = create(&ctx, req).await?;
        ensure!(v.volume_id == ids[0], "retry gave another volume");
        let (vols, reps) = backend_state(&ctx).await?;
        ensure!(vols.len() == 1 && reps.len() == 1, "{vols:?} {reps:?}");
        delete(&ctx, &v.volume_id).await
    })
}

#[test]
fn twenty_volumes_in_parallel() -> Result<()> {
    with_system(|ctx| async move {
        let mut tasks = Vec::new();
        for i in 0..20 {
            let ctx = ctx.clone();
            tasks.push(tokio::spawn(async move {
                create(&ctx, create_request(&format!("par-{i:02}"), 8 * MIB, &[])).await
            }));
        }
        let mut ids = BTreeSet::new();
        for t in tasks {
            ids.insert(t.await??.volume_id);
        }
        ensure!(ids.len() == 20, "{} distinct volumes", ids.len());
        let (vols, reps) = backend_state(&ctx).await?;
        ensure!(vols == ids, "agent lists {vols:?}");
        ensure!(reps.len() == 20, "engine holds {} replicas", reps.len());

        let mut tasks = Vec::new();
        for id in ids.clone() {
            let ctx = ctx.clone();
            tasks.push(tokio::spawn(async move { delete(&ctx, &id).await }));
        }
        for t in tasks {
            t.await??;
        }
        let (vols, reps) = backend_state(&ctx).await?;
        ensure!(vols.is_empty(), "volumes left: {vols:?}");
        ensure!(reps.is_empty(), "replicas left: {reps:?}");
        let list = ctx
            .csi
            .controller
            .clone()
            .list_volumes(csi::ListVolumesRequest::default())
            .await?
            .into_inner();
        ensure!(
            list.entries.is_empty(),
            "ListVolumes after delete: {list:?}"
        );
        Ok(())
    })
}

// ---- Topology ----------------------------------------------------------

fn segment(node: &str) -> csi::Topology {
    csi::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_owned(), node.to_owned())]),
    }
}

/// VOLUME_ACCESSIBILITY_CONSTRAINTS is advertised: CreateVolume honours
/// requisite segments (RESOURCE_EXHAUSTED when none can hold the volume)
/// and GetCapacity answers per segment.
#[test]
fn topology_constraints() -> Result<()> {
    with_system(|ctx| async move {
        let mut ctl = ctx.csi.controller.clone();
        let mut req = create_request("topo", 16 * MIB, &[]);
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![segment("elsewhere")],
            preferred: vec![],
        });
        expect_code(
            "requisite segment without nodes",
            ctl.create_volume(req.clone()).await,
            Code::ResourceExhausted,
        )?;
        req.accessibility_requirements = Some(csi::TopologyRequirement {
            requisite: vec![segment("elsewhere"), segment(NODE)],
            preferred: vec![segment(NODE)],
        });
        let v = create(&ctx, req).await?;
        ensure!(
            !v.accessible_topology.is_empty()
                && v.accessible_topology
                    .iter()
                    .all(|t| [segment("elsewhere"), segment(NODE)].contains(t)),
            "accessible_topology outside the requisite: {:?}",
            v.accessible_topology
        );

        let here = ctl
            .get_capacity(csi::GetCapacityRequest {
                accessible_topology: Some(segment(NODE)),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(here.available_capacity > 0, "this node's segment: {here:?}");
        let nowhere = ctl
            .get_capacity(csi::GetCapacityRequest {
                accessible_topology: Some(segment("elsewhere")),
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            nowhere.available_capacity == 0,
            "a segment without nodes has capacity: {nowhere:?}"
        );
        delete(&ctx, &v.volume_id).await
    })
}

// ---- CreateVolume idempotency against compatible requests ---------------

/// CSI spec, CreateVolume: "If a volume corresponding to the specified
/// volume name already exists, is accessible from accessibility_requirements,
/// and is compatible with the specified capacity_range, ... the Plugin MUST
/// reply 0 OK with the corresponding CreateVolumeResponse." A 32 MiB volume
/// is compatible with the range [16 MiB, 64 MiB].
#[test]
fn create_volume_existing_volume_within_a_new_range_is_ok() -> Result<()> {
    with_system(|ctx| async move {
        let first = create(&ctx, create_request("compat", 32 * MIB, &[])).await?;
        let mut again = create_request("compat", 0, &[]);
        again.capacity_range = range(16 * MIB, 64 * MIB);
        let r = ctx.csi.controller.clone().create_volume(again).await;
        delete(&ctx, &first.volume_id).await?;
        let v = r
            .context("compatible retry")?
            .into_inner()
            .volume
            .context("no volume")?;
        ensure!(
            v.volume_id == first.volume_id && v.capacity_bytes == 32 * MIB,
            "{v:?}"
        );
        Ok(())
    })
}

/// Unsupported content sources are INVALID_ARGUMENT ("Source incompatible
/// or not supported") and leave nothing behind.
#[test]
fn create_volume_from_a_source_is_invalid() -> Result<()> {
    with_system(|ctx| async move {
        use csi::volume_content_source::{SnapshotSource, Type};
        let mut req = create_request("from-snap", 16 * MIB, &[]);
        req.volume_content_source = Some(csi::VolumeContentSource {
            r#type: Some(Type::Snapshot(SnapshotSource {
                snapshot_id: "snap-1".into(),
            })),
        });
        expect_code(
            "content source",
            ctx.csi.controller.clone().create_volume(req).await,
            Code::InvalidArgument,
        )?;
        let (vols, _) = backend_state(&ctx).await?;
        ensure!(vols.is_empty(), "{vols:?}");
        Ok(())
    })
}

/// A single-writer volume published on one node cannot be published on
/// another: FAILED_PRECONDITION ("Volume published to another node").
#[test]
fn publish_to_a_second_node_is_failed_precondition() -> Result<()> {
    with_nodes(1, |ctx| async move {
        let v = create(
            &ctx,
            create_request("two-nodes", 16 * MIB, &[("repl", "2")]),
        )
        .await?;
        let other = format!("{}-1", ctx.node_id);
        let mut ctl = ctx.csi.controller.clone();
        ctl.controller_publish_volume(publish_req(&v.volume_id, &ctx.node_id))
            .await
            .context("first publish")?;
        let second = ctl
            .controller_publish_volume(publish_req(&v.volume_id, &other))
            .await;
        expect_code("publish on a second node", second, Code::FailedPrecondition)?;
        // Once unpublished from the first node it may move.
        ctl.controller_unpublish_volume(unpublish_req(&v.volume_id, &ctx.node_id))
            .await
            .context("unpublish")?;
        ctl.controller_publish_volume(publish_req(&v.volume_id, &other))
            .await
            .context("publish after moving")?;
        ctl.controller_unpublish_volume(unpublish_req(&v.volume_id, &other))
            .await
            .context("unpublish from the second node")?;
        delete(&ctx, &v.volume_id).await
    })
}

// ---- Node requests in the upstream suite's own shapes -------------------

/// Rules: every argument is checked before the volume is looked up, and a
/// path that does not hold the volume is NOT_FOUND whatever its form. The
/// requests are those csi-sanity sends: generated volume ids that are not
/// UUIDs (`fake-vol-id-…`), the relative path `some/path`, and a publish
/// context of its own (`device`).
#[test]
fn node_requests_in_the_upstream_suites_shapes() -> Result<()> {
    with_system(|ctx| async move {
        let mut node = ctx.csi.node.clone();
        let fake = format!(
            "fake-vol-id-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let staging = ctx.dir.join("staging").display().to_string();
        let target = ctx.dir.join("target").display().to_string();
        let device = params(&[("device", "/dev/mock")]);
        expect_code(
            "NodeStageVolume without a staging path",
            node.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: fake.clone(),
                volume_capability: Some(ext4_rwo()),
                publish_context: device.clone(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "NodePublishVolume without a target path",
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: fake.clone(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "NodePublishVolume without a capability",
            node.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: fake.clone(),
                target_path: format!("{target}/target"),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        )?;
        expect_code(
            "NodeGetVolumeStats of an unknown volume",
            node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: fake.clone(),
                volume_path: "some/path".into(),
                staging_target_path: String::new(),
            })
            .await,
            Code::NotFound,
        )?;
        expect_code(
            "NodeExpandVolume of an unknown volume",
            node.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: fake.clone(),
                volume_path: "some/path".into(),
                ..Default::default()
            })
            .await,
            Code::NotFound,
        )?;
        // A volume that exists, at a path that does not hold it.
        let vol = create(&ctx, create_request("where-vol", 16 * MIB, &[])).await?;
        for path in ["some/path".to_owned(), staging.clone(), target] {
            expect_code(
                &format!("NodeGetVolumeStats at {path}"),
                node.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: vol.volume_id.clone(),
                    volume_path: path.clone(),
                    staging_target_path: String::new(),
                })
                .await,
                Code::NotFound,
            )?;
        }
        expect_code(
            "NodeExpandVolume without a path",
            node.node_expand_volume(csi::NodeExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                volume_capability: Some(ext4_rwo()),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
        )?;
        delete(&ctx, &vol.volume_id).await
    })
}
