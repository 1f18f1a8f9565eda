//! A CSI client over a Unix socket, as a container orchestrator talks to a
//! CSI driver, plus builders for the request pieces tests repeat.
//!
//! ```no_run
//! # async fn f() -> Result<(), tonic::transport::Error> {
//! let mut csi = cairn_sanity_tests::csi::CsiClients::connect("/run/csi.sock").await?;
//! let request = cairn_proto::csi::v1::GetPluginInfoRequest {};
//! let info = csi.identity.get_plugin_info(request).await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cairn_proto::csi::v1 as csi;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::{Channel, Endpoint};

pub use csi::controller_client::ControllerClient;
pub use csi::identity_client::IdentityClient;
pub use csi::node_client::NodeClient;

/// One connection to a CSI socket and a client per service on it.
#[derive(Debug, Clone)]
pub struct CsiClients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl CsiClients {
    /// Connects to the CSI socket at `path` (a filesystem path, or a
    /// `unix://` endpoint).
    pub async fn connect(path: impl AsRef<Path>) -> Result<Self, tonic::transport::Error> {
        let channel = unix_channel(path.as_ref()).await?;
        Ok(CsiClients {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            node: NodeClient::new(channel),
        })
    }
}

/// A gRPC channel over the Unix socket at `path` (`unix://` prefix allowed).
pub async fn unix_channel(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let raw = path.to_string_lossy();
    let path: PathBuf = match raw.strip_prefix("unix://") {
        Some(p) => PathBuf::from(p),
        None => path.to_path_buf(),
    };
    // The URI is required by tonic but unused: the connector dials the socket.
    Endpoint::from_static("http://[::]:50051")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}

/// A mount capability with filesystem `fs` ("" for the driver's default).
pub fn mount_cap(fs: &str, mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.to_owned(),
            mount_flags: vec![],
            volume_mount_group: String::new(),
        })),
    }
}

/// A raw block capability.
pub fn block_cap(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// The usual capability: ext4, SINGLE_NODE_WRITER.
pub fn ext4_rwo() -> csi::VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

/// A capacity range.
pub fn range(required: i64, limit: i64) -> Option<csi::CapacityRange> {
    Some(csi::CapacityRange {
        required_bytes: required,
        limit_bytes: limit,
    })
}

/// StorageClass-style parameters from pairs.
pub fn params(kv: &[(&str, &str)]) -> HashMap<String, String> {
    kv.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A CreateVolume request for `name` of `bytes` (required = limit unset)
/// with the ext4 capability and `parameters`.
pub fn create_request(
    name: &str,
    bytes: i64,
    parameters: &[(&str, &str)],
) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: range(bytes, 0),
        volume_capabilities: vec![ext4_rwo()],
        parameters: params(parameters),
        ..Default::default()
    }
}
