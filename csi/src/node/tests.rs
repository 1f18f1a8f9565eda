//! Node service tests that need no kernel support: argument checks and
//! codes through the gRPC trait, per-volume exclusion, and the idempotent
//! paths, against a fabricated sysfs and mount table in a temp dir.

use std::{fs, path::PathBuf, time::Duration};

use cairn_proto::csi::v1 as csi;
use csi::node_server::Node;
use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::{Code, Request};

use super::*;

const U1: &str = "0b4b6a4e-1f0e-4b0c-9d3e-7f1f0d6c2a11";
const U2: &str = "7e57d004-2b97-0e7a-b45f-5387367791cd";

struct Fixture {
    tmp: tempfile::TempDir,
    svc: NodeService,
}

impl Fixture {
    /// U1 is attached as nvme1n1 (1 GiB, 259:1); U2 has no device.
    fn new() -> Self {
        Self::with_alpha(false)
    }

    /// Like [`Fixture::new`], with the alpha capabilities on or off.
    fn with_alpha(alpha_capabilities: bool) -> Self {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path();
        let d = root.join("sys/block/nvme1n1");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("uuid"), format!("{U1}\n")).unwrap();
        fs::write(d.join("dev"), "259:1\n").unwrap();
        let s = root.join("sys/dev/block/259:1");
        fs::create_dir_all(&s).unwrap();
        fs::write(s.join("size"), "2097152\n").unwrap();
        fs::create_dir_all(root.join("dev")).unwrap();
        fs::write(root.join("dev/nvme1n1"), "").unwrap();
        fs::write(root.join("mountinfo"), "").unwrap();
        let host = Host {
            sysfs: root.join("sys"),
            mountinfo: root.join("mountinfo"),
            dev: root.join("dev"),
            device_timeout: Duration::from_millis(800),
            poll_interval: Duration::from_millis(20),
        };
        let svc = NodeService::with_host(
            NodeConfig {
                node_id: "node-a".into(),
                host_nqn: Some("nqn.2014-08.org.nvmexpress:uuid:node-a".into()),
                max_volumes_per_node: 128,
                alpha_capabilities,
            },
            host,
        );
        Fixture { tmp, svc }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    fn set_mounts(&self, lines: &[String]) {
        fs::write(self.path("mountinfo"), lines.join("\n") + "\n").unwrap();
    }

    fn set_controller(&self, name: &str, volume: &str, state: &str) {
        let d = self.path("sys/class/nvme").join(name);
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("subsysnqn"), context::volume_nqn(volume) + "\n").unwrap();
        fs::write(d.join("state"), format!("{state}\n")).unwrap();
    }
}

fn mount_line(dev_t: &str, at: &std::path::Path, opts: &str) -> String {
    format!(
        "50 1 {dev_t} / {} {opts} - ext4 /dev/nvme1n1 rw",
        at.display()
    )
}

fn cap(access: AccessType, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(access),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn mount(fs: &str) -> AccessType {
    AccessType::Mount(MountVolume {
        fs_type: fs.into(),
        mount_flags: vec![],
        volume_mount_group: String::new(),
    })
}

fn block() -> AccessType {
    AccessType::Block(BlockVolume {})
}

fn publish_ctx() -> HashMap<String, String> {
    HashMap::from([
        (context::ADDRESS.to_owned(), "127.0.0.1".to_owned()),
        (context::PORT.to_owned(), "8420".to_owned()),
        (context::NQN.to_owned(), context::volume_nqn(U1)),
    ])
}

fn stage_req(f: &Fixture, access: AccessType) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: U1.into(),
        publish_context: publish_ctx(),
        staging_target_path: f.path("staging").to_string_lossy().into_owned(),
        volume_capability: Some(cap(access, Mode::SingleNodeWriter)),
        secrets: HashMap::new(),
        volume_context: HashMap::new(),
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, Status>) -> Code {
    r.expect_err("must fail").code()
}

#[tokio::test]
async fn stage_argument_errors_have_spec_codes() {
    let f = Fixture::new();
    let mut r = stage_req(&f, mount("ext4"));
    r.volume_id.clear();
    assert_eq!(
        code(f.svc.node_stage_volume(Request::new(r)).await),
        Code::InvalidArgument
    );

    let mut r = stage_req(&f, mount("ext4"));
    r.staging_target_path.clear();
    assert_eq!(
        code(f.svc.node_stage_volume(Request::new(r)).await),
        Code::InvalidArgument
    );

    let mut r = stage_req(&f, mount("ext4"));
    r.volume_capability = None;
    assert_eq!(
        code(f.svc.node_stage_volume(Request::new(r)).await),
        Code::InvalidArgument
    );

    let mut r = stage_req(&f, mount("ext4"));
    r.publish_context.remove(context::NQN);
    assert_eq!(
        code(f.svc.node_stage_volume(Request::new(r)).await),
        Code::InvalidArgument
    );

    let mut r = stage_req(&f, mount("ext4"));
    r.volume_id = "no-such-volume".into();
    assert_eq!(
        code(f.svc.node_stage_volume(Request::new(r)).await),
        Code::NotFound
    );
}

#[tokio::test]
async fn stage_is_idempotent_when_already_attached_and_mounted() {
    let f = Fixture::new();
    // Block: the device is there, nothing to run.
    f.svc
        .node_stage_volume(Request::new(stage_req(&f, block())))
        .await
        .expect("block stage of an attached volume");
    // Mount: staging already holds this device.
    f.set_mounts(&[mount_line("259:1", &f.path("staging"), "rw,relatime")]);
    f.svc
        .node_stage_volume(Request::new(stage_req(&f, mount("ext4"))))
        .await
        .expect("repeat stage");
    // Another device at the staging path is an incompatible stage.
    f.set_mounts(&[mount_line("8:1", &f.path("staging"), "rw")]);
    assert_eq!(
        code(
            f.svc
                .node_stage_volume(Request::new(stage_req(&f, mount("ext4"))))
                .await
        ),
        Code::AlreadyExists
    );
}

#[tokio::test]
async fn unstage_is_idempotent_when_nothing_is_left() {
    let f = Fixture::new();
    for id in [U1, U2, "not-a-uuid"] {
        f.svc
            .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
                volume_id: id.into(),
                staging_target_path: f.path("staging").to_string_lossy().into_owned(),
            }))
            .await
            .expect("nothing mounted, nothing connected: success");
    }
    assert_eq!(
        code(
            f.svc
                .node_unstage_volume(Request::new(csi::NodeUnstageVolumeRequest {
                    volume_id: U1.into(),
                    staging_target_path: String::new(),
                }))
                .await
        ),
        Code::InvalidArgument
    );
}

fn publish_req(f: &Fixture, access: AccessType, id: &str) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        publish_context: publish_ctx(),
        staging_target_path: f.path("staging").to_string_lossy().into_owned(),
        target_path: f.path("pod/vol").to_string_lossy().into_owned(),
        volume_capability: Some(cap(access, Mode::SingleNodeWriter)),
        readonly: false,
        secrets: HashMap::new(),
        volume_context: HashMap::new(),
    }
}

#[tokio::test]
async fn publish_before_stage_is_failed_precondition() {
    let f = Fixture::new();
    // Mount volume whose staging path holds nothing.
    assert_eq!(
        code(
            f.svc
                .node_publish_volume(Request::new(publish_req(&f, mount(""), U1)))
                .await
        ),
        Code::FailedPrecondition
    );
    // Block volume without a device.
    assert_eq!(
        code(
            f.svc
                .node_publish_volume(Request::new(publish_req(&f, block(), U2)))
                .await
        ),
        Code::FailedPrecondition
    );
    let mut r = publish_req(&f, block(), U1);
    r.target_path.clear();
    assert_eq!(
        code(f.svc.node_publish_volume(Request::new(r)).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn publish_repeats_and_conflicts() {
    let f = Fixture::new();
    f.set_mounts(&[
        mount_line("259:1", &f.path("staging"), "rw"),
        mount_line("259:1", &f.path("pod/vol"), "rw"),
    ]);
    f.svc
        .node_publish_volume(Request::new(publish_req(&f, mount(""), U1)))
        .await
        .expect("already published the same way");
    let mut ro = publish_req(&f, mount(""), U1);
    ro.readonly = true;
    assert_eq!(
        code(f.svc.node_publish_volume(Request::new(ro)).await),
        Code::AlreadyExists
    );
}

#[tokio::test]
async fn unpublish_removes_the_target_and_is_idempotent() {
    let f = Fixture::new();
    let target = f.path("pod/vol");
    fs::create_dir_all(&target).unwrap();
    let req = || csi::NodeUnpublishVolumeRequest {
        volume_id: U1.into(),
        target_path: target.to_string_lossy().into_owned(),
    };
    f.svc
        .node_unpublish_volume(Request::new(req()))
        .await
        .expect("unpublish");
    assert!(!target.exists(), "target directory removed");
    f.svc
        .node_unpublish_volume(Request::new(req()))
        .await
        .expect("repeat");
    // A block target is a file.
    fs::write(&target, "").unwrap();
    f.svc
        .node_unpublish_volume(Request::new(req()))
        .await
        .expect("file target");
    assert!(!target.exists());
    let mut bad = req();
    bad.volume_id.clear();
    assert_eq!(
        code(f.svc.node_unpublish_volume(Request::new(bad)).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn stats_report_bytes_and_inodes_of_a_mounted_volume() {
    let f = Fixture::new();
    let vol = f.path("pod/vol");
    let req = |p: &std::path::Path| csi::NodeGetVolumeStatsRequest {
        volume_id: U1.into(),
        volume_path: p.to_string_lossy().into_owned(),
        staging_target_path: String::new(),
    };
    assert_eq!(
        code(f.svc.node_get_volume_stats(Request::new(req(&vol))).await),
        Code::NotFound
    );
    fs::create_dir_all(&vol).unwrap();
    assert_eq!(
        code(f.svc.node_get_volume_stats(Request::new(req(&vol))).await),
        Code::NotFound,
        "a directory with nothing mounted holds no volume"
    );
    f.set_mounts(&[mount_line("259:1", &vol, "rw")]);
    let usage = f
        .svc
        .node_get_volume_stats(Request::new(req(&vol)))
        .await
        .expect("stats")
        .into_inner()
        .usage;
    assert_eq!(usage.len(), 2);
    assert_eq!(usage[0].unit, csi::volume_usage::Unit::Bytes as i32);
    assert_eq!(usage[1].unit, csi::volume_usage::Unit::Inodes as i32);
    for u in &usage {
        assert!(
            u.total > 0 && u.used >= 0 && u.available >= 0 && u.used <= u.total,
            "{u:?}"
        );
    }
    let mut bad = req(&vol);
    bad.volume_path.clear();
    assert_eq!(
        code(f.svc.node_get_volume_stats(Request::new(bad)).await),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn stats_answer_not_found_for_a_path_that_does_not_hold_the_volume() {
    let f = Fixture::new();
    let vol = f.path("pod/vol");
    fs::create_dir_all(&vol).unwrap();
    let stats = |id: &str, p: &str| {
        let svc = f.svc.clone();
        let r = csi::NodeGetVolumeStatsRequest {
            volume_id: id.into(),
            volume_path: p.into(),
            staging_target_path: String::new(),
        };
        async move {
            match svc.node_get_volume_stats(Request::new(r)).await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            }
        }
    };
    let at = vol.to_string_lossy().into_owned();
    // Another device is mounted there.
    f.set_mounts(&[mount_line("8:1", &vol, "rw")]);
    assert_eq!(stats(U1, &at).await, Code::NotFound, "another filesystem");
    f.set_mounts(&[mount_line("259:1", &vol, "rw")]);
    assert_eq!(stats(U1, &at).await, Code::Ok);
    // A path of any form that does not hold the volume.
    assert_eq!(stats(U1, "some/path").await, Code::NotFound, "relative");
    // A volume id that names no volume, or one not attached here.
    assert_eq!(stats("fake-vol-id-1", "some/path").await, Code::NotFound);
    assert_eq!(stats("fake-vol-id-1", &at).await, Code::NotFound);
    assert_eq!(stats(U2, &at).await, Code::NotFound, "not attached here");
    // Missing fields stay INVALID_ARGUMENT, whatever else is wrong.
    assert_eq!(stats("", "some/path").await, Code::InvalidArgument);
    assert_eq!(stats("fake-vol-id-1", "").await, Code::InvalidArgument);
}

#[tokio::test]
async fn volume_condition_is_reported_only_with_the_alpha_capabilities() {
    let req = |f: &Fixture| csi::NodeGetVolumeStatsRequest {
        volume_id: U1.into(),
        volume_path: f.path("pod/vol").to_string_lossy().into_owned(),
        staging_target_path: String::new(),
    };
    let setup = |f: &Fixture| {
        fs::create_dir_all(f.path("pod/vol")).unwrap();
        f.set_mounts(&[mount_line("259:1", &f.path("pod/vol"), "rw")]);
    };
    let plain = Fixture::new();
    setup(&plain);
    let r = plain
        .svc
        .node_get_volume_stats(Request::new(req(&plain)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.volume_condition, None);

    let f = Fixture::with_alpha(true);
    setup(&f);
    let condition = || async {
        f.svc
            .node_get_volume_stats(Request::new(req(&f)))
            .await
            .unwrap()
            .into_inner()
            .volume_condition
            .expect("a condition")
    };
    assert!(!condition().await.abnormal, "attached, no controller info");
    f.set_controller("nvme1", U1, "connecting");
    let c = condition().await;
    assert!(c.abnormal);
    assert!(
        c.message.contains("no live NVMe controller"),
        "{}",
        c.message
    );
    f.set_controller("nvme1", U1, "live");
    assert!(!condition().await.abnormal);
}

fn expand_req(f: &Fixture, id: &str, bytes: i64) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: f.tmp.path().to_string_lossy().into_owned(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        staging_target_path: String::new(),
        volume_capability: Some(cap(block(), Mode::SingleNodeWriter)),
        secrets: HashMap::new(),
    }
}

#[tokio::test]
async fn expand_of_a_block_volume_reports_the_device_size() {
    let f = Fixture::new();
    let resp = f
        .svc
        .node_expand_volume(Request::new(expand_req(&f, U1, 1 << 30)))
        .await
        .expect("already big enough")
        .into_inner();
    assert_eq!(resp.capacity_bytes, 1 << 30);
    assert_eq!(
        code(
            f.svc
                .node_expand_volume(Request::new(expand_req(&f, U2, 1 << 30)))
                .await
        ),
        Code::NotFound,
        "not attached here"
    );
    let mut r = expand_req(&f, "fake-vol-id-1", 1 << 30);
    r.volume_path = "some/path".into();
    assert_eq!(
        code(f.svc.node_expand_volume(Request::new(r)).await),
        Code::NotFound,
        "an unknown volume, whatever the path's form"
    );
    let mut r = expand_req(&f, "fake-vol-id-1", 1 << 30);
    r.volume_path.clear();
    assert_eq!(
        code(f.svc.node_expand_volume(Request::new(r)).await),
        Code::InvalidArgument
    );
    let mut r = expand_req(&f, U1, 1 << 30);
    r.volume_path = f.path("missing").to_string_lossy().into_owned();
    assert_eq!(
        code(f.svc.node_expand_volume(Request::new(r)).await),
        Code::NotFound
    );
    assert_eq!(
        code(
            f.svc
                .node_expand_volume(Request::new(expand_req(&f, U1, -5)))
                .await
        ),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn same_volume_calls_abort_while_other_volumes_proceed() {
    let f = Fixture::new();
    let svc = f.svc.clone();
    // Waits for the device to grow to 2 GiB, which never happens: holds U1's
    // claim for the device timeout.
    let slow_req = expand_req(&f, U1, 2 << 30);
    let slow = tokio::spawn(async move { svc.node_expand_volume(Request::new(slow_req)).await });
    // Act once the slow call holds the claim (observed, not slept for).
    while !f.svc.locks.is_held(U1) {
        assert!(
            !slow.is_finished(),
            "the slow call ended before claiming U1"
        );
        tokio::task::yield_now().await;
    }

    let err = f
        .svc
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: U1.into(),
            target_path: f.path("pod/u1").to_string_lossy().into_owned(),
        }))
        .await
        .expect_err("U1 is busy");
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(err.message(), format!("operation pending for volume {U1}"));

    f.svc
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: U2.into(),
            target_path: f.path("pod/u2").to_string_lossy().into_owned(),
        }))
        .await
        .expect("U2 is independent of U1");

    let slow = slow.await.expect("join");
    assert_eq!(code(slow), Code::FailedPrecondition, "device never grew");
    // Released afterwards.
    f.svc
        .node_unpublish_volume(Request::new(csi::NodeUnpublishVolumeRequest {
            volume_id: U1.into(),
            target_path: f.path("pod/u1").to_string_lossy().into_owned(),
        }))
        .await
        .expect("U1 free again");
}

/// The node capabilities a service advertises.
async fn node_caps(f: &Fixture) -> Vec<i32> {
    f.svc
        .node_get_capabilities(Request::new(csi::NodeGetCapabilitiesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|csi::node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect()
}

#[tokio::test]
async fn capabilities_and_info() {
    let f = Fixture::new();
    let ga = [
        Cap::StageUnstageVolume as i32,
        Cap::GetVolumeStats as i32,
        Cap::ExpandVolume as i32,
        Cap::SingleNodeMultiWriter as i32,
    ];
    assert_eq!(node_caps(&f).await, ga, "no alpha capability by default");
    let mut with_alpha = ga.to_vec();
    with_alpha.push(Cap::VolumeCondition as i32);
    assert_eq!(node_caps(&Fixture::with_alpha(true)).await, with_alpha);
    let info = f
        .svc
        .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    assert_eq!(info.max_volumes_per_node, 128);
    assert_eq!(
        info.accessible_topology.unwrap().segments,
        HashMap::from([(TOPOLOGY_NODE_KEY.to_owned(), "node-a".to_owned())])
    );
    assert_eq!(TOPOLOGY_NODE_KEY, "topology.csi.cairn.dev/node");
}
