//! Argument checks for the Node RPCs, with the CSI spec's codes. Pure: no
//! I/O, so every rule here is unit-tested without a kernel.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use cairn_proto::csi::v1 as csi;
use csi::volume_capability::{access_mode::Mode, AccessType};
use uuid::Uuid;

use super::{context, error::NodeError};

/// Filesystems the node can create and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4 (the default).
    Ext4,
    /// XFS.
    Xfs,
}

impl FsType {
    /// The name `mount -t` and `blkid` use.
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }

    /// Parses a capability's or StorageClass's fs type ("" = none given).
    pub fn parse(s: &str) -> Result<Option<Self>, NodeError> {
        match s {
            "" => Ok(None),
            "ext4" => Ok(Some(FsType::Ext4)),
            "xfs" => Ok(Some(FsType::Xfs)),
            other => Err(NodeError::invalid(
                "volume_capability.mount.fs_type",
                format!("{other:?} is not supported (ext4 or xfs)"),
            )),
        }
    }
}

/// How the workload accesses the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Raw block device.
    Block,
    /// A filesystem mounted with `flags`.
    Mount {
        /// Filesystem to create (if the device is blank) and mount.
        fs_type: FsType,
        /// Extra mount options from the capability.
        flags: Vec<String>,
    },
}

/// A checked volume capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    /// Block or mount.
    pub access: Access,
    /// The access mode only allows reading.
    pub read_only_mode: bool,
}

/// A REQUIRED volume id: present.
pub fn required_id(volume_id: &str) -> Result<(), NodeError> {
    if volume_id.is_empty() {
        return Err(NodeError::Missing("volume_id"));
    }
    Ok(())
}

/// The volume id as a namespace UUID. A volume id that is not a UUID cannot
/// name a Cairn volume, so it is NOT_FOUND. Callers check every other
/// argument first: a malformed request is INVALID_ARGUMENT whatever volume
/// it names.
pub fn volume_uuid(volume_id: &str) -> Result<Uuid, NodeError> {
    required_id(volume_id)?;
    Uuid::parse_str(volume_id)
        .map_err(|_| NodeError::NotFound(format!("volume {volume_id:?} does not exist")))
}

/// A REQUIRED path field: non-empty and absolute.
pub fn required_path(field: &'static str, p: &str) -> Result<PathBuf, NodeError> {
    if p.is_empty() {
        return Err(NodeError::Missing(field));
    }
    let path = Path::new(p);
    if !path.is_absolute() {
        return Err(NodeError::invalid(
            field,
            format!("{p:?} is not an absolute path"),
        ));
    }
    Ok(path.to_path_buf())
}

/// Checks a REQUIRED volume capability. `context_fs` is the StorageClass's
/// fsType (from the publish or volume context), used when the capability
/// names none.
pub fn capability(
    cap: Option<&csi::VolumeCapability>,
    context_fs: Option<&str>,
) -> Result<Capability, NodeError> {
    let cap = cap.ok_or(NodeError::Missing("volume_capability"))?;
    let mode = cap
        .access_mode
        .as_ref()
        .ok_or(NodeError::Missing("volume_capability.access_mode"))?
        .mode;
    let read_only_mode = match Mode::try_from(mode) {
        Ok(Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter) => {
            false
        }
        Ok(Mode::SingleNodeReaderOnly) => true,
        Ok(m) => {
            return Err(NodeError::invalid(
                "volume_capability.access_mode",
                format!("{} is not supported by Cairn", m.as_str_name()),
            ))
        }
        Err(_) => {
            return Err(NodeError::invalid(
                "volume_capability.access_mode",
                format!("unknown mode {mode}"),
            ))
        }
    };
    let access = match cap
        .access_type
        .as_ref()
        .ok_or(NodeError::Missing("volume_capability.access_type"))?
    {
        AccessType::Block(_) => Access::Block,
        AccessType::Mount(m) => {
            let fs_type = match FsType::parse(&m.fs_type)? {
                Some(f) => f,
                None => FsType::parse(context_fs.unwrap_or(""))?.unwrap_or(FsType::Ext4),
            };
            for flag in &m.mount_flags {
                if flag.is_empty() || flag.contains(',') || flag.chars().any(char::is_whitespace) {
                    return Err(NodeError::invalid(
                        "volume_capability.mount.mount_flags",
                        format!("{flag:?} is not a single mount option"),
                    ));
                }
            }
            Access::Mount {
                fs_type,
                flags: m.mount_flags.clone(),
            }
        }
    };
    Ok(Capability {
        access,
        read_only_mode,
    })
}

/// The StorageClass fsType passed along in a publish or volume context.
pub fn context_fs<'a>(
    publish: &'a HashMap<String, String>,
    volume: &'a HashMap<String, String>,
) -> Option<&'a str> {
    publish
        .get(context::FS_TYPE)
        .or_else(|| volume.get(context::FS_TYPE))
        .map(String::as_str)
}

/// A checked NodeStageVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stage {
    /// The volume (= namespace UUID).
    pub uuid: Uuid,
    /// Where to mount the filesystem (unused for block volumes).
    pub staging_path: PathBuf,
    /// Block or mount, and the mode.
    pub capability: Capability,
    /// How to reach the target.
    pub connect: context::ConnectParams,
}

/// Checks a NodeStageVolume request.
pub fn stage(r: &csi::NodeStageVolumeRequest) -> Result<Stage, NodeError> {
    required_id(&r.volume_id)?;
    let staging_path = required_path("staging_target_path", &r.staging_target_path)?;
    let capability = capability(
        r.volume_capability.as_ref(),
        context_fs(&r.publish_context, &r.volume_context),
    )?;
    let connect = context::ConnectParams::from_context(&r.publish_context)?;
    let uuid = volume_uuid(&r.volume_id)?;
    Ok(Stage {
        uuid,
        staging_path,
        capability,
        connect,
    })
}

/// A checked NodePublishVolume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The volume.
    pub uuid: Uuid,
    /// Where NodeStageVolume put it.
    pub staging_path: PathBuf,
    /// The pod's path.
    pub target_path: PathBuf,
    /// Block or mount.
    pub capability: Capability,
    /// Publish read-only (the request's flag or a reader-only mode).
    pub readonly: bool,
}

/// Checks a NodePublishVolume request. The staging path is REQUIRED because
/// this plugin has STAGE_UNSTAGE_VOLUME.
pub fn publish(r: &csi::NodePublishVolumeRequest) -> Result<Publish, NodeError> {
    required_id(&r.volume_id)?;
    let target_path = required_path("target_path", &r.target_path)?;
    let capability = capability(
        r.volume_capability.as_ref(),
        context_fs(&r.publish_context, &r.volume_context),
    )?;
    // This plugin stages (STAGE_UNSTAGE_VOLUME), so a publish without a
    // staging path is out of order: FAILED_PRECONDITION per the spec.
    if r.staging_target_path.is_empty() {
        return Err(NodeError::FailedPrecondition(
            "staging_target_path is not set: the volume must be staged first".into(),
        ));
    }
    let staging_path = required_path("staging_target_path", &r.staging_target_path)?;
    let uuid = volume_uuid(&r.volume_id)?;
    let readonly = r.readonly || capability.read_only_mode;
    Ok(Publish {
        uuid,
        staging_path,
        target_path,
        capability,
        readonly,
    })
}

/// Volume id and one REQUIRED path (unpublish, unstage, stats, expand).
pub fn id_and_path(
    volume_id: &str,
    field: &'static str,
    path: &str,
) -> Result<(String, PathBuf), NodeError> {
    if volume_id.is_empty() {
        return Err(NodeError::Missing("volume_id"));
    }
    Ok((volume_id.to_owned(), required_path(field, path)?))
}

/// Volume id and the path that should hold the volume (stats, expand).
/// Missing fields are INVALID_ARGUMENT; a volume id that names no volume,
/// and a path that cannot hold one (relative, say), are NOT_FOUND: the
/// volume is not at that path, whatever the path's form.
pub fn volume_at_path(volume_id: &str, path: &str) -> Result<(Uuid, PathBuf), NodeError> {
    required_id(volume_id)?;
    if path.is_empty() {
        return Err(NodeError::Missing("volume_path"));
    }
    let uuid = volume_uuid(volume_id)?;
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(NodeError::NotFound(format!(
            "volume {volume_id} is not published at {path:?}"
        )));
    }
    Ok((uuid, p.to_path_buf()))
}

/// The requested size of a NodeExpandVolume, if any.
pub fn expand_range(range: Option<&csi::CapacityRange>) -> Result<Option<u64>, NodeError> {
    let Some(r) = range else { return Ok(None) };
    if r.required_bytes < 0 || r.limit_bytes < 0 {
        return Err(NodeError::invalid(
            "capacity_range",
            "sizes must not be negative",
        ));
    }
    if r.limit_bytes > 0 && r.required_bytes > r.limit_bytes {
        return Err(NodeError::invalid(
            "capacity_range",
            "required_bytes exceeds limit_bytes",
        ));
    }
    Ok((r.required_bytes > 0).then(|| r.required_bytes.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use csi::volume_capability::{AccessMode, BlockVolume, MountVolume};
    use tonic::Code;

    const VOL: &str = "0b4b6a4e-1f0e-4b0c-9d3e-7f1f0d6c2a11";

    fn mount_cap(fs: &str, mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: vec!["noatime".into()],
                volume_mount_group: String::new(),
            })),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn block_cap(mode: Mode) -> csi::VolumeCapability {
        csi::VolumeCapability {
            access_type: Some(AccessType::Block(BlockVolume {})),
            access_mode: Some(AccessMode { mode: mode as i32 }),
        }
    }

    fn publish_ctx() -> HashMap<String, String> {
        [
            (context::ADDRESS, "127.0.0.1"),
            (context::PORT, "8420"),
            (
                context::NQN,
                "nqn.2024-01.dev.cairn:vol:0b4b6a4e-1f0e-4b0c-9d3e-7f1f0d6c2a11",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn stage_req() -> csi::NodeStageVolumeRequest {
        csi::NodeStageVolumeRequest {
            volume_id: VOL.into(),
            publish_context: publish_ctx(),
            staging_target_path: "/var/lib/kubelet/plugins/csi.cairn.dev/staging/pv".into(),
            volume_capability: Some(mount_cap("", Mode::SingleNodeWriter)),
            secrets: HashMap::new(),
            volume_context: HashMap::new(),
        }
    }

    fn code(r: Result<impl std::fmt::Debug, NodeError>) -> Code {
        r.expect_err("must fail").code()
    }

    #[test]
    fn stage_accepts_a_complete_request_and_defaults_to_ext4() {
        let s = stage(&stage_req()).expect("valid");
        assert_eq!(s.uuid.to_string(), VOL);
        assert_eq!(
            s.capability.access,
            Access::Mount {
                fs_type: FsType::Ext4,
                flags: vec!["noatime".into()]
            }
        );
        assert!(!s.capability.read_only_mode);
        assert_eq!(s.connect.port, 8420);
    }

    #[test]
    fn stage_missing_fields_are_invalid_argument() {
        let mut r = stage_req();
        r.volume_id.clear();
        assert_eq!(code(stage(&r)), Code::InvalidArgument);

        let mut r = stage_req();
        r.staging_target_path.clear();
        assert_eq!(code(stage(&r)), Code::InvalidArgument);

        let mut r = stage_req();
        r.volume_capability = None;
        assert_eq!(code(stage(&r)), Code::InvalidArgument);

        let mut r = stage_req();
        r.volume_capability.as_mut().unwrap().access_type = None;
        assert_eq!(code(stage(&r)), Code::InvalidArgument);

        let mut r = stage_req();
        r.volume_capability.as_mut().unwrap().access_mode = None;
        assert_eq!(code(stage(&r)), Code::InvalidArgument);

        let mut r = stage_req();
        r.publish_context.clear();
        assert_eq!(code(stage(&r)), Code::InvalidArgument);

        let mut r = stage_req();
        r.staging_target_path = "relative/path".into();
        assert_eq!(code(stage(&r)), Code::InvalidArgument);
    }

    /// Every argument is checked before the volume is looked up: a
    /// malformed request is INVALID_ARGUMENT even when its volume id names
    /// no volume (csi-sanity sends generated ids like these).
    #[test]
    fn argument_errors_come_before_the_volume_lookup() {
        let unknown = "fake-vol-id-0123456789";
        let mut r = stage_req();
        r.volume_id = unknown.into();
        r.staging_target_path.clear();
        assert_eq!(code(stage(&r)), Code::InvalidArgument, "no staging path");
        let mut r = stage_req();
        r.volume_id = unknown.into();
        r.volume_capability = None;
        assert_eq!(code(stage(&r)), Code::InvalidArgument, "no capability");

        let mut r = publish_req();
        r.volume_id = unknown.into();
        r.target_path.clear();
        r.staging_target_path.clear();
        r.volume_capability = None;
        assert_eq!(code(publish(&r)), Code::InvalidArgument, "no target path");
        let mut r = publish_req();
        r.volume_id = unknown.into();
        r.staging_target_path.clear();
        r.volume_capability = None;
        assert_eq!(code(publish(&r)), Code::InvalidArgument, "no capability");
        // Complete but for the staging path: out of order, then unknown.
        let mut r = publish_req();
        r.volume_id = unknown.into();
        r.staging_target_path.clear();
        assert_eq!(code(publish(&r)), Code::FailedPrecondition);
        let mut r = publish_req();
        r.volume_id = unknown.into();
        assert_eq!(code(publish(&r)), Code::NotFound);
    }

    #[test]
    fn a_volume_at_a_path_that_cannot_hold_it_is_not_found() {
        assert_eq!(
            code(volume_at_path("fake-vol-id-1", "some/path")),
            Code::NotFound
        );
        assert_eq!(code(volume_at_path(VOL, "some/path")), Code::NotFound);
        assert_eq!(code(volume_at_path("", "some/path")), Code::InvalidArgument);
        assert_eq!(code(volume_at_path(VOL, "")), Code::InvalidArgument);
        assert_eq!(
            code(volume_at_path("fake-vol-id-1", "")),
            Code::InvalidArgument
        );
        let (u, p) = volume_at_path(VOL, "/pods/v").expect("valid");
        assert_eq!(
            (u.to_string().as_str(), p.as_path()),
            (VOL, Path::new("/pods/v"))
        );
    }

    #[test]
    fn unknown_volume_ids_are_not_found() {
        let mut r = stage_req();
        r.volume_id = "not-a-uuid".into();
        assert_eq!(code(stage(&r)), Code::NotFound);
    }

    #[test]
    fn unsupported_modes_and_filesystems_are_invalid_argument() {
        for mode in [
            Mode::Unknown,
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            let mut r = stage_req();
            r.volume_capability = Some(mount_cap("ext4", mode));
            assert_eq!(code(stage(&r)), Code::InvalidArgument, "{mode:?}");
        }
        let mut r = stage_req();
        r.volume_capability = Some(mount_cap("btrfs", Mode::SingleNodeWriter));
        assert_eq!(code(stage(&r)), Code::InvalidArgument);

        let mut r = stage_req();
        r.volume_capability.as_mut().unwrap().access_mode = Some(AccessMode { mode: 99 });
        assert_eq!(code(stage(&r)), Code::InvalidArgument);

        let mut r = stage_req();
        if let Some(AccessType::Mount(m)) = r
            .volume_capability
            .as_mut()
            .and_then(|c| c.access_type.as_mut())
        {
            m.mount_flags = vec!["ro,exec".into()];
        }
        assert_eq!(code(stage(&r)), Code::InvalidArgument);
    }

    #[test]
    fn fs_type_comes_from_capability_then_storage_class() {
        let mut r = stage_req();
        r.volume_context
            .insert(context::FS_TYPE.into(), "xfs".into());
        let s = stage(&r).expect("valid");
        assert!(matches!(
            s.capability.access,
            Access::Mount {
                fs_type: FsType::Xfs,
                ..
            }
        ));

        r.volume_capability = Some(mount_cap("ext4", Mode::SingleNodeMultiWriter));
        let s = stage(&r).expect("valid");
        assert!(matches!(
            s.capability.access,
            Access::Mount {
                fs_type: FsType::Ext4,
                ..
            }
        ));
    }

    #[test]
    fn block_and_reader_only_are_understood() {
        let mut r = stage_req();
        r.volume_capability = Some(block_cap(Mode::SingleNodeReaderOnly));
        let s = stage(&r).expect("valid");
        assert_eq!(s.capability.access, Access::Block);
        assert!(s.capability.read_only_mode);
    }

    fn publish_req() -> csi::NodePublishVolumeRequest {
        csi::NodePublishVolumeRequest {
            volume_id: VOL.into(),
            publish_context: publish_ctx(),
            staging_target_path: "/staging/pv".into(),
            target_path: "/pods/x/volumes/pv".into(),
            volume_capability: Some(mount_cap("xfs", Mode::SingleNodeWriter)),
            readonly: false,
            secrets: HashMap::new(),
            volume_context: HashMap::new(),
        }
    }

    #[test]
    fn publish_checks() {
        let p = publish(&publish_req()).expect("valid");
        assert!(!p.readonly);

        let mut r = publish_req();
        r.readonly = true;
        assert!(publish(&r).expect("valid").readonly);

        let mut r = publish_req();
        r.volume_capability = Some(mount_cap("xfs", Mode::SingleNodeReaderOnly));
        assert!(
            publish(&r).expect("valid").readonly,
            "reader-only mode forces ro"
        );

        let mut r = publish_req();
        r.target_path.clear();
        assert_eq!(code(publish(&r)), Code::InvalidArgument);
        // Publishing before staging is out of order, not malformed.
        let mut r = publish_req();
        r.staging_target_path.clear();
        assert_eq!(code(publish(&r)), Code::FailedPrecondition);
        let mut r = publish_req();
        r.volume_capability = None;
        assert_eq!(code(publish(&r)), Code::InvalidArgument);
        let mut r = publish_req();
        r.volume_id.clear();
        assert_eq!(code(publish(&r)), Code::InvalidArgument);
    }

    #[test]
    fn id_and_path_checks() {
        assert_eq!(
            code(id_and_path("", "target_path", "/t")),
            Code::InvalidArgument
        );
        assert_eq!(
            code(id_and_path("v", "target_path", "")),
            Code::InvalidArgument
        );
        let (id, p) = id_and_path("v", "target_path", "/t").expect("valid");
        assert_eq!((id.as_str(), p.as_path()), ("v", Path::new("/t")));
    }

    #[test]
    fn expand_range_checks() {
        assert_eq!(expand_range(None).unwrap(), None);
        let r = |req, lim| csi::CapacityRange {
            required_bytes: req,
            limit_bytes: lim,
        };
        assert_eq!(expand_range(Some(&r(4096, 0))).unwrap(), Some(4096));
        assert_eq!(expand_range(Some(&r(0, 4096))).unwrap(), None);
        assert_eq!(code(expand_range(Some(&r(-1, 0)))), Code::InvalidArgument);
        assert_eq!(
            code(expand_range(Some(&r(8192, 4096)))),
            Code::InvalidArgument
        );
    }
}
