//! Proves the generated CSI code is wire-exact against the CSI spec v1.12.0
//! (`proto/csi/csi.proto`): messages are encoded with the generated types and
//! decoded again with a small hand-written protobuf reader, so every field
//! number and wire type below comes from the spec text, not from prost.
//! Method paths are checked on the generated clients (what goes on the wire)
//! and on a generated server answering in-process.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use cairn_proto::csi::v1 as csi;
use prost::Message;
use tonic::codegen::{http, Service};

// ---------------------------------------------------------------------------
// A minimal protobuf wire reader (independent of prost).
// ---------------------------------------------------------------------------

const VARINT: u8 = 0;
const LEN: u8 = 2;

#[derive(Debug, Clone, PartialEq)]
enum Value {
    Varint(u64),
    Fixed64(u64),
    Bytes(Vec<u8>),
    Fixed32(u32),
}

#[derive(Debug, Clone, PartialEq)]
struct Field {
    number: u32,
    wire_type: u8,
    value: Value,
}

fn read_varint(buf: &[u8], pos: &mut usize) -> u64 {
    let mut out = 0u64;
    let mut shift = 0;
    loop {
        let b = buf[*pos];
        *pos += 1;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return out;
        }
        shift += 7;
        assert!(shift < 64, "varint too long");
    }
}

/// Splits one encoded message into its top-level fields, in wire order.
fn fields(buf: &[u8]) -> Vec<Field> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < buf.len() {
        let key = read_varint(buf, &mut pos);
        let number = u32::try_from(key >> 3).expect("field number fits u32");
        let wire_type = (key & 7) as u8;
        let value = match wire_type {
            0 => Value::Varint(read_varint(buf, &mut pos)),
            1 => {
                let v = u64::from_le_bytes(buf[pos..pos + 8].try_into().unwrap());
                pos += 8;
                Value::Fixed64(v)
            }
            2 => {
                let len = usize::try_from(read_varint(buf, &mut pos)).unwrap();
                let v = buf[pos..pos + len].to_vec();
                pos += len;
                Value::Bytes(v)
            }
            5 => {
                let v = u32::from_le_bytes(buf[pos..pos + 4].try_into().unwrap());
                pos += 4;
                Value::Fixed32(v)
            }
            other => panic!("unexpected wire type {other}"),
        };
        out.push(Field {
            number,
            wire_type,
            value,
        });
    }
    out
}

/// The fields with this number (repeated fields and map entries appear
/// several times).
fn all(buf: &[u8], number: u32) -> Vec<Field> {
    fields(buf)
        .into_iter()
        .filter(|f| f.number == number)
        .collect()
}

/// The single field with this number; asserts its wire type.
fn one(buf: &[u8], number: u32, wire_type: u8) -> Value {
    let found = all(buf, number);
    assert_eq!(found.len(), 1, "field {number}: {found:?}");
    assert_eq!(found[0].wire_type, wire_type, "field {number} wire type");
    found[0].value.clone()
}

fn bytes(v: Value) -> Vec<u8> {
    match v {
        Value::Bytes(b) => b,
        other => panic!("expected length-delimited, got {other:?}"),
    }
}

fn string(v: Value) -> String {
    String::from_utf8(bytes(v)).expect("utf-8")
}

fn varint(v: Value) -> u64 {
    match v {
        Value::Varint(x) => x,
        other => panic!("expected varint, got {other:?}"),
    }
}

/// Decodes a `map<string, string>` field: each entry is a nested message with
/// key = 1 and value = 2, both length-delimited.
fn string_map(buf: &[u8], number: u32) -> BTreeMap<String, String> {
    all(buf, number)
        .into_iter()
        .map(|f| {
            assert_eq!(f.wire_type, LEN, "map field {number} wire type");
            let entry = bytes(f.value);
            (string(one(&entry, 1, LEN)), string(one(&entry, 2, LEN)))
        })
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn bmap(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn mount_capability(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: "xfs".into(),
                mount_flags: vec!["noatime".into(), "discard".into()],
                volume_mount_group: "1000".into(),
            },
        )),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

fn topology(pairs: &[(&str, &str)]) -> csi::Topology {
    csi::Topology {
        segments: map(pairs),
    }
}

// ---------------------------------------------------------------------------
// Messages.
// ---------------------------------------------------------------------------

#[test]
fn access_mode_enum_values_match_the_spec() {
    use csi::volume_capability::access_mode::Mode;
    // VolumeCapability.AccessMode.Mode in csi.proto v1.12.0.
    assert_eq!(Mode::Unknown as i32, 0);
    assert_eq!(Mode::SingleNodeWriter as i32, 1);
    assert_eq!(Mode::SingleNodeReaderOnly as i32, 2);
    assert_eq!(Mode::MultiNodeReaderOnly as i32, 3);
    assert_eq!(Mode::MultiNodeSingleWriter as i32, 4);
    assert_eq!(Mode::MultiNodeMultiWriter as i32, 5);
    assert_eq!(Mode::SingleNodeSingleWriter as i32, 6);
    assert_eq!(Mode::SingleNodeMultiWriter as i32, 7);
    assert_eq!(
        Mode::from_str_name("SINGLE_NODE_MULTI_WRITER"),
        Some(Mode::SingleNodeMultiWriter)
    );
}

#[test]
fn capability_enum_values_match_the_spec() {
    use csi::node_service_capability::rpc::Type as NodeCap;
    use csi::plugin_capability::{service::Type as Svc, volume_expansion::Type as Exp};
    assert_eq!(Svc::ControllerService as i32, 1);
    assert_eq!(Svc::VolumeAccessibilityConstraints as i32, 2);
    assert_eq!(Svc::GroupControllerService as i32, 3);
    assert_eq!(Exp::Online as i32, 1);
    assert_eq!(Exp::Offline as i32, 2);
    assert_eq!(NodeCap::StageUnstageVolume as i32, 1);
    assert_eq!(NodeCap::GetVolumeStats as i32, 2);
    assert_eq!(NodeCap::ExpandVolume as i32, 3);
    // 4 (VOLUME_CONDITION) is alpha in v1.12.0; v1.12.0 has no 7.
    assert_eq!(NodeCap::VolumeCondition as i32, 4);
    assert_eq!(NodeCap::SingleNodeMultiWriter as i32, 5);
    assert_eq!(NodeCap::VolumeMountGroup as i32, 6);
    assert_eq!(NodeCap::try_from(7).ok(), None);
    use csi::controller_service_capability::rpc::Type as CtlCap;
    assert_eq!(CtlCap::ListVolumesPublishedNodes as i32, 10);
    assert_eq!(CtlCap::VolumeCondition as i32, 11);
    assert_eq!(CtlCap::GetVolume as i32, 12);
    assert_eq!(CtlCap::SingleNodeMultiWriter as i32, 13);
    assert_eq!(CtlCap::ModifyVolume as i32, 14);
    assert_eq!(CtlCap::GetSnapshot as i32, 15);
    // 16 and 17 (the health RPCs' capabilities) are not in v1.12.0.
    assert_eq!(CtlCap::try_from(16).ok(), None);
    assert_eq!(csi::volume_usage::Unit::Bytes as i32, 1);
    assert_eq!(csi::volume_usage::Unit::Inodes as i32, 2);
}

#[test]
fn volume_capability_mount_is_wire_exact() {
    use csi::volume_capability::access_mode::Mode;
    let cap = mount_capability(Mode::SingleNodeMultiWriter);
    let buf = cap.encode_to_vec();

    // oneof access_type: block = 1, mount = 2; access_mode = 3.
    assert!(all(&buf, 1).is_empty(), "block must be absent for mount");
    let mount = bytes(one(&buf, 2, LEN));
    // MountVolume: fs_type = 1, mount_flags = 2 (repeated), volume_mount_group = 3.
    assert_eq!(string(one(&mount, 1, LEN)), "xfs");
    let flags: Vec<String> = all(&mount, 2)
        .into_iter()
        .map(|f| string(f.value))
        .collect();
    assert_eq!(flags, ["noatime", "discard"]);
    assert_eq!(string(one(&mount, 3, LEN)), "1000");
    // AccessMode: mode = 1 (enum, varint) = 7.
    let mode = bytes(one(&buf, 3, LEN));
    assert_eq!(varint(one(&mode, 1, VARINT)), 7);
}

#[test]
fn volume_capability_block_is_wire_exact() {
    use csi::volume_capability::access_mode::Mode;
    let cap = csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: Mode::SingleNodeSingleWriter as i32,
        }),
    };
    let buf = cap.encode_to_vec();
    // An empty BlockVolume still occupies field 1 (zero-length).
    assert_eq!(bytes(one(&buf, 1, LEN)), Vec::<u8>::new());
    assert!(all(&buf, 2).is_empty(), "mount must be absent for block");
    let mode = bytes(one(&buf, 3, LEN));
    assert_eq!(varint(one(&mode, 1, VARINT)), 6);

    // And the reverse: hand-made bytes decode into the oneof's block arm.
    let hand = [0x0a, 0x00, 0x1a, 0x02, 0x08, 0x01];
    let decoded = csi::VolumeCapability::decode(&hand[..]).expect("decodes");
    assert!(matches!(
        decoded.access_type,
        Some(csi::volume_capability::AccessType::Block(_))
    ));
    assert_eq!(decoded.access_mode.map(|m| m.mode), Some(1));
}

#[test]
fn create_volume_request_is_wire_exact() {
    use csi::volume_capability::access_mode::Mode;
    let req = csi::CreateVolumeRequest {
        name: "pvc-1".into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 1 << 30,
            limit_bytes: 2 << 30,
        }),
        volume_capabilities: vec![
            mount_capability(Mode::SingleNodeWriter),
            mount_capability(Mode::SingleNodeMultiWriter),
        ],
        parameters: map(&[("repl", "3"), ("thin", "true")]),
        secrets: map(&[("token", "s3cret")]),
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(
                csi::volume_content_source::SnapshotSource {
                    snapshot_id: "snap-1".into(),
                },
            )),
        }),
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite: vec![topology(&[("topology.csi.cairn.dev/node", "n1")])],
            preferred: vec![
                topology(&[("topology.csi.cairn.dev/node", "n2")]),
                topology(&[("topology.csi.cairn.dev/node", "n1")]),
            ],
        }),
        mutable_parameters: map(&[("iops", "100")]),
    };
    let buf = req.encode_to_vec();

    // name = 1
    assert_eq!(string(one(&buf, 1, LEN)), "pvc-1");
    // capacity_range = 2: required_bytes = 1, limit_bytes = 2 (int64 varints)
    let range = bytes(one(&buf, 2, LEN));
    assert_eq!(varint(one(&range, 1, VARINT)), 1 << 30);
    assert_eq!(varint(one(&range, 2, VARINT)), 2 << 30);
    // volume_capabilities = 3, repeated
    let caps = all(&buf, 3);
    assert_eq!(caps.len(), 2);
    assert!(caps.iter().all(|f| f.wire_type == LEN));
    // parameters = 4, secrets = 5 (maps)
    assert_eq!(
        string_map(&buf, 4),
        bmap(&[("repl", "3"), ("thin", "true")])
    );
    assert_eq!(string_map(&buf, 5), bmap(&[("token", "s3cret")]));
    // volume_content_source = 6: oneof snapshot = 1 { snapshot_id = 1 }
    let source = bytes(one(&buf, 6, LEN));
    let snap = bytes(one(&source, 1, LEN));
    assert_eq!(string(one(&snap, 1, LEN)), "snap-1");
    assert!(all(&source, 2).is_empty());
    // accessibility_requirements = 7: requisite = 1, preferred = 2,
    // Topology.segments = 1 (map)
    let req_topo = bytes(one(&buf, 7, LEN));
    let requisite = all(&req_topo, 1);
    assert_eq!(requisite.len(), 1);
    let seg = bytes(requisite[0].value.clone());
    assert_eq!(
        string_map(&seg, 1),
        bmap(&[("topology.csi.cairn.dev/node", "n1")])
    );
    let preferred: Vec<_> = all(&req_topo, 2)
        .into_iter()
        .map(|f| string_map(&bytes(f.value), 1))
        .collect();
    assert_eq!(
        preferred,
        [
            bmap(&[("topology.csi.cairn.dev/node", "n2")]),
            bmap(&[("topology.csi.cairn.dev/node", "n1")]),
        ]
    );
    // mutable_parameters = 8
    assert_eq!(string_map(&buf, 8), bmap(&[("iops", "100")]));
    // Nothing else on the wire.
    let numbers: std::collections::BTreeSet<u32> = fields(&buf).iter().map(|f| f.number).collect();
    assert_eq!(numbers, (1..=8).collect());
}

#[test]
fn node_stage_volume_request_is_wire_exact() {
    use csi::volume_capability::access_mode::Mode;
    let req = csi::NodeStageVolumeRequest {
        volume_id: "0b4b6a4e-1f0e-4b0c-9d3e-7f1f0d6c2a11".into(),
        publish_context: map(&[("address", "10.0.0.1"), ("port", "8420")]),
        staging_target_path: "/var/lib/kubelet/staging/pv1".into(),
        volume_capability: Some(mount_capability(Mode::SingleNodeWriter)),
        secrets: map(&[("k", "v")]),
        volume_context: map(&[("fsType", "ext4")]),
    };
    let buf = req.encode_to_vec();
    // volume_id = 1, publish_context = 2, staging_target_path = 3,
    // volume_capability = 4, secrets = 5, volume_context = 6.
    assert_eq!(
        string(one(&buf, 1, LEN)),
        "0b4b6a4e-1f0e-4b0c-9d3e-7f1f0d6c2a11"
    );
    assert_eq!(
        string_map(&buf, 2),
        bmap(&[("address", "10.0.0.1"), ("port", "8420")])
    );
    assert_eq!(string(one(&buf, 3, LEN)), "/var/lib/kubelet/staging/pv1");
    let cap = bytes(one(&buf, 4, LEN));
    assert_eq!(
        csi::VolumeCapability::decode(&cap[..]).unwrap(),
        mount_capability(Mode::SingleNodeWriter)
    );
    assert_eq!(string_map(&buf, 5), bmap(&[("k", "v")]));
    assert_eq!(string_map(&buf, 6), bmap(&[("fsType", "ext4")]));
}

#[test]
fn node_publish_and_stats_requests_are_wire_exact() {
    let req = csi::NodePublishVolumeRequest {
        volume_id: "v".into(),
        publish_context: map(&[("a", "b")]),
        staging_target_path: "/s".into(),
        target_path: "/t".into(),
        volume_capability: None,
        readonly: true,
        secrets: Default::default(),
        volume_context: map(&[("c", "d")]),
    };
    let buf = req.encode_to_vec();
    assert_eq!(string(one(&buf, 1, LEN)), "v");
    assert_eq!(string_map(&buf, 2), bmap(&[("a", "b")]));
    assert_eq!(string(one(&buf, 3, LEN)), "/s");
    assert_eq!(string(one(&buf, 4, LEN)), "/t");
    assert!(all(&buf, 5).is_empty());
    assert_eq!(varint(one(&buf, 6, VARINT)), 1);
    assert_eq!(string_map(&buf, 8), bmap(&[("c", "d")]));

    let stats = csi::NodeGetVolumeStatsResponse {
        usage: vec![csi::VolumeUsage {
            available: 10,
            total: 30,
            used: 20,
            unit: csi::volume_usage::Unit::Bytes as i32,
        }],
        volume_condition: Some(csi::VolumeCondition {
            abnormal: true,
            message: "gone".into(),
        }),
    };
    let buf = stats.encode_to_vec();
    let usage = bytes(one(&buf, 1, LEN));
    assert_eq!(varint(one(&usage, 1, VARINT)), 10);
    assert_eq!(varint(one(&usage, 2, VARINT)), 30);
    assert_eq!(varint(one(&usage, 3, VARINT)), 20);
    assert_eq!(varint(one(&usage, 4, VARINT)), 1);
    // volume_condition = 2 (alpha in v1.12.0): abnormal = 1, message = 2.
    let cond = bytes(one(&buf, 2, LEN));
    assert_eq!(varint(one(&cond, 1, VARINT)), 1);
    assert_eq!(string(one(&cond, 2, LEN)), "gone");
}

#[test]
fn controller_publish_volume_response_is_wire_exact() {
    let resp = csi::ControllerPublishVolumeResponse {
        publish_context: map(&[
            ("nqn", "nqn.2024-01.dev.cairn:vol:0b4b6a4e"),
            ("address", "127.0.0.1"),
            ("port", "8420"),
        ]),
    };
    let buf = resp.encode_to_vec();
    // publish_context = 1 is the only field.
    assert!(fields(&buf)
        .iter()
        .all(|f| f.number == 1 && f.wire_type == LEN));
    assert_eq!(
        string_map(&buf, 1),
        bmap(&[
            ("nqn", "nqn.2024-01.dev.cairn:vol:0b4b6a4e"),
            ("address", "127.0.0.1"),
            ("port", "8420"),
        ])
    );
}

#[test]
fn node_get_info_response_is_wire_exact() {
    let resp = csi::NodeGetInfoResponse {
        node_id: "node-a".into(),
        max_volumes_per_node: 64,
        accessible_topology: Some(topology(&[("topology.csi.cairn.dev/node", "node-a")])),
    };
    let buf = resp.encode_to_vec();
    assert_eq!(string(one(&buf, 1, LEN)), "node-a");
    assert_eq!(varint(one(&buf, 2, VARINT)), 64);
    let topo = bytes(one(&buf, 3, LEN));
    assert_eq!(
        string_map(&topo, 1),
        bmap(&[("topology.csi.cairn.dev/node", "node-a")])
    );
}

#[test]
fn probe_response_ready_is_a_bool_value_wrapper() {
    // ready = 1 is a google.protobuf.BoolValue: a nested message whose
    // field 1 is the bool.
    let buf = csi::ProbeResponse { ready: Some(true) }.encode_to_vec();
    let wrapper = bytes(one(&buf, 1, LEN));
    assert_eq!(varint(one(&wrapper, 1, VARINT)), 1);
    // Absent means "not present", distinct from false.
    assert!(csi::ProbeResponse { ready: None }
        .encode_to_vec()
        .is_empty());
    let buf = csi::ProbeResponse { ready: Some(false) }.encode_to_vec();
    assert_eq!(bytes(one(&buf, 1, LEN)), Vec::<u8>::new());
}

#[test]
fn negative_int64_uses_ten_byte_varint() {
    // int64 (not sint64): negatives are sign-extended varints of 10 bytes.
    let buf = csi::CapacityRange {
        required_bytes: -1,
        limit_bytes: 0,
    }
    .encode_to_vec();
    assert_eq!(buf.len(), 1 + 10);
    assert_eq!(varint(one(&buf, 1, VARINT)), u64::MAX);
}

// ---------------------------------------------------------------------------
// Method paths.
// ---------------------------------------------------------------------------

/// A gRPC transport that records each request's path and answers
/// UNIMPLEMENTED, so the generated clients can be driven without a server.
#[derive(Clone, Default)]
struct PathRecorder(Arc<Mutex<Vec<String>>>);

impl Service<http::Request<tonic::body::Body>> for PathRecorder {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        self.0.lock().unwrap().push(req.uri().path().to_owned());
        Box::pin(async {
            Ok(http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "12")
                .body(tonic::body::Body::empty())
                .unwrap())
        })
    }
}

#[tokio::test]
async fn client_method_paths_match_the_spec() {
    let rec = PathRecorder::default();
    let origin: http::Uri = "http://csi.invalid".parse().unwrap();

    let mut identity =
        csi::identity_client::IdentityClient::with_origin(rec.clone(), origin.clone());
    let _ = identity.get_plugin_info(csi::GetPluginInfoRequest {}).await;
    let _ = identity
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await;
    let _ = identity.probe(csi::ProbeRequest {}).await;

    let mut controller =
        csi::controller_client::ControllerClient::with_origin(rec.clone(), origin.clone());
    let _ = controller
        .create_volume(csi::CreateVolumeRequest::default())
        .await;
    let _ = controller
        .delete_volume(csi::DeleteVolumeRequest::default())
        .await;
    let _ = controller
        .controller_publish_volume(csi::ControllerPublishVolumeRequest::default())
        .await;
    let _ = controller
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest::default())
        .await;
    let _ = controller
        .controller_expand_volume(csi::ControllerExpandVolumeRequest::default())
        .await;
    let _ = controller
        .controller_modify_volume(csi::ControllerModifyVolumeRequest::default())
        .await;

    let mut node = csi::node_client::NodeClient::with_origin(rec.clone(), origin);
    let _ = node
        .node_stage_volume(csi::NodeStageVolumeRequest::default())
        .await;
    let _ = node
        .node_unstage_volume(csi::NodeUnstageVolumeRequest::default())
        .await;
    let _ = node
        .node_publish_volume(csi::NodePublishVolumeRequest::default())
        .await;
    let _ = node
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest::default())
        .await;
    let _ = node
        .node_get_volume_stats(csi::NodeGetVolumeStatsRequest::default())
        .await;
    let _ = node
        .node_expand_volume(csi::NodeExpandVolumeRequest::default())
        .await;
    let _ = node
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await;
    let _ = node.node_get_info(csi::NodeGetInfoRequest {}).await;

    let paths = rec.0.lock().unwrap().clone();
    assert_eq!(
        paths,
        [
            "/csi.v1.Identity/GetPluginInfo",
            "/csi.v1.Identity/GetPluginCapabilities",
            "/csi.v1.Identity/Probe",
            "/csi.v1.Controller/CreateVolume",
            "/csi.v1.Controller/DeleteVolume",
            "/csi.v1.Controller/ControllerPublishVolume",
            "/csi.v1.Controller/ControllerUnpublishVolume",
            "/csi.v1.Controller/ControllerExpandVolume",
            "/csi.v1.Controller/ControllerModifyVolume",
            "/csi.v1.Node/NodeStageVolume",
            "/csi.v1.Node/NodeUnstageVolume",
            "/csi.v1.Node/NodePublishVolume",
            "/csi.v1.Node/NodeUnpublishVolume",
            "/csi.v1.Node/NodeGetVolumeStats",
            "/csi.v1.Node/NodeExpandVolume",
            "/csi.v1.Node/NodeGetCapabilities",
            "/csi.v1.Node/NodeGetInfo",
        ]
    );
}

#[test]
fn server_service_names_match_the_spec() {
    assert_eq!(csi::identity_server::SERVICE_NAME, "csi.v1.Identity");
    assert_eq!(csi::controller_server::SERVICE_NAME, "csi.v1.Controller");
    assert_eq!(csi::node_server::SERVICE_NAME, "csi.v1.Node");
    assert_eq!(
        csi::group_controller_server::SERVICE_NAME,
        "csi.v1.GroupController"
    );
    assert_eq!(
        csi::snapshot_metadata_server::SERVICE_NAME,
        "csi.v1.SnapshotMetadata"
    );
}

/// A real generated Identity server, served in-process over loopback: the
/// generated client reaches it only if both sides agree on the paths.
struct Ident;

#[tonic::async_trait]
impl csi::identity_server::Identity for Ident {
    async fn get_plugin_info(
        &self,
        _: tonic::Request<csi::GetPluginInfoRequest>,
    ) -> Result<tonic::Response<csi::GetPluginInfoResponse>, tonic::Status> {
        Ok(tonic::Response::new(csi::GetPluginInfoResponse {
            name: "csi.cairn.dev".into(),
            vendor_version: "test".into(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: tonic::Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<tonic::Response<csi::GetPluginCapabilitiesResponse>, tonic::Status> {
        Err(tonic::Status::unavailable("not in this test"))
    }

    async fn probe(
        &self,
        _: tonic::Request<csi::ProbeRequest>,
    ) -> Result<tonic::Response<csi::ProbeResponse>, tonic::Status> {
        Ok(tonic::Response::new(csi::ProbeResponse {
            ready: Some(true),
        }))
    }
}

#[tokio::test]
async fn generated_server_answers_on_the_spec_paths() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(csi::identity_server::IdentityServer::new(Ident))
            .serve_with_incoming(incoming),
    );

    let mut client = csi::identity_client::IdentityClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let info = client
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.cairn.dev");
    let probe = client
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let err = client
        .get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    server.abort();
}
