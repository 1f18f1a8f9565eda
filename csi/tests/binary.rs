//! Runs the real `cairn-csi` binary in node mode on a Unix socket and talks
//! CSI to it the way kubelet and the sidecars do.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cairn_proto::csi::v1 as csi;
use hyper_util::rt::TokioIo;
use tonic::{transport::Endpoint, Code};

struct Plugin(Child);

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(sock: &Path, extra: &[&str]) -> Plugin {
    let child = Command::new(env!("CARGO_BIN_EXE_cairn-csi"))
        .args(["--mode", "node", "--node-id", "node-x"])
        .arg("--endpoint")
        .arg(format!("unix://{}", sock.display()))
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cairn-csi");
    Plugin(child)
}

async fn channel(sock: PathBuf) -> tonic::transport::Channel {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Endpoint::try_from("http://[::]:0")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let sock = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(sock).await?))
            }
        }))
        .await
        .expect("connect over the unix socket")
}

#[tokio::test]
async fn node_mode_serves_identity_and_node_over_a_unix_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("csi/csi.sock");
    let _plugin = start(&sock, &["--skip-host-check", "--max-volumes-per-node", "7"]);
    let ch = channel(sock).await;

    let mut identity = csi::identity_client::IdentityClient::new(ch.clone());
    let info = identity
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "csi.cairn.dev");
    let probe = identity
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));

    let mut node = csi::node_client::NodeClient::new(ch);
    let info = node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-x");
    assert_eq!(info.max_volumes_per_node, 7);
    assert_eq!(
        info.accessible_topology.unwrap().segments["topology.csi.cairn.dev/node"],
        "node-x"
    );
    let err = node
        .node_stage_volume(csi::NodeStageVolumeRequest::default())
        .await
        .expect_err("empty request");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "volume_id is required");
}

#[test]
fn node_mode_refuses_to_start_without_node_id() {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-csi"))
        .args(["--mode", "node", "--skip-host-check"])
        .arg("--endpoint")
        .arg(format!("unix://{}", tmp.path().join("s.sock").display()))
        .env_remove("CAIRN_NODE_ID")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--node-id"));
}

#[test]
fn host_check_failure_is_one_line_naming_what_is_missing() {
    // An empty PATH: no nvme-cli, no modprobe. (nvme_tcp may be loaded on a
    // real host, but nvme-cli cannot be found either way.)
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-csi"))
        .args(["--mode", "node", "--node-id", "n"])
        .arg("--endpoint")
        .arg(format!("unix://{}", tmp.path().join("s.sock").display()))
        .env("PATH", tmp.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("program nvme (package nvme-cli)"),
        "{err}"
    );
    assert!(!tmp.path().join("s.sock").exists(), "did not start serving");
}
