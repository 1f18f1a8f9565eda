//! StorageClass parameters the controller accepts, and their parsing.

use std::collections::HashMap;

/// Every StorageClass parameter key CreateVolume accepts; any other key is
/// rejected with INVALID_ARGUMENT.
pub const PARAMETERS: &[&str] = &[
    "repl",
    "protocol",
    "thin",
    "fsType",
    "ctrlLossTmo",
    "reconnectDelay",
    "keepAliveTmo",
    "nrIoQueues",
];

/// Keys the CO adds to CreateVolume's parameters on its own (the external
/// provisioner's PVC/PV metadata); accepted and ignored.
const CO_PREFIX: &str = "csi.storage.k8s.io/";

/// Parsed StorageClass parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeParams {
    pub repl: u32,
    pub thin: bool,
    pub fs_type: Option<String>,
    /// NVMe connection settings handed to the node in the volume context.
    pub nvme: Vec<(&'static str, u32)>,
}

/// Filesystems the node plugin can make.
pub const FILESYSTEMS: &[&str] = &["ext4", "xfs"];

/// Highest replica count accepted.
pub const MAX_REPLICAS: u32 = 5;

fn parse_u32(key: &str, v: &str, min: u32, max: u32) -> Result<u32, String> {
    match v.trim().parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(format!(
            "parameter {key}={v:?} must be an integer in {min}..={max}"
        )),
    }
}

impl VolumeParams {
    /// Parses and checks parameters; the error says which one is wrong.
    pub fn parse(params: &HashMap<String, String>) -> Result<Self, String> {
        let mut p = VolumeParams {
            repl: 1,
            thin: true,
            fs_type: None,
            nvme: Vec::new(),
        };
        let mut keys: Vec<&String> = params.keys().collect();
        keys.sort();
        for key in keys {
            let v = &params[key];
            match key.as_str() {
                "repl" => p.repl = parse_u32(key, v, 1, MAX_REPLICAS)?,
                "protocol" if v == "nvmf" => {}
                "protocol" => {
                    return Err(format!(
                        "parameter protocol={v:?}: only \"nvmf\" is supported"
                    ))
                }
                "thin" => {
                    p.thin = match v.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(format!("parameter thin={v:?} must be true or false")),
                    }
                }
                "fsType" if FILESYSTEMS.contains(&v.as_str()) => p.fs_type = Some(v.clone()),
                "fsType" => return Err(format!("parameter fsType={v:?}: one of {FILESYSTEMS:?}")),
                "ctrlLossTmo" => p.nvme.push(("ctrlLossTmo", parse_u32(key, v, 0, 86_400)?)),
                "reconnectDelay" => p
                    .nvme
                    .push(("reconnectDelay", parse_u32(key, v, 1, 3_600)?)),
                "keepAliveTmo" => p.nvme.push(("keepAliveTmo", parse_u32(key, v, 1, 3_600)?)),
                "nrIoQueues" => p.nvme.push(("nrIoQueues", parse_u32(key, v, 1, 128)?)),
                k if k.starts_with(CO_PREFIX) => {}
                k => return Err(format!("unknown parameter {k:?}; accepted: {PARAMETERS:?}")),
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_and_values() {
        let p = VolumeParams::parse(&HashMap::new()).unwrap();
        assert_eq!((p.repl, p.thin, p.fs_type), (1, true, None));
        let p = VolumeParams::parse(&map(&[
            ("repl", "2"),
            ("thin", "false"),
            ("fsType", "xfs"),
            ("protocol", "nvmf"),
            ("nrIoQueues", "4"),
            ("csi.storage.k8s.io/pvc/name", "x"),
        ]))
        .unwrap();
        assert_eq!(
            (p.repl, p.thin, p.fs_type.as_deref()),
            (2, false, Some("xfs"))
        );
        assert_eq!(p.nvme, vec![("nrIoQueues", 4)]);
    }

    #[test]
    fn bad_values_are_named() {
        for (k, v) in [
            ("repl", "0"),
            ("repl", "x"),
            ("thin", "yes"),
            ("fsType", "btrfs"),
            ("protocol", "iscsi"),
            ("bogus", "1"),
            ("ctrlLossTmo", "-1"),
        ] {
            let err = VolumeParams::parse(&map(&[(k, v)])).unwrap_err();
            assert!(err.contains(k), "{err}");
        }
    }

    #[test]
    fn every_listed_parameter_parses() {
        for k in PARAMETERS {
            let v = match *k {
                "protocol" => "nvmf",
                "thin" => "true",
                "fsType" => "ext4",
                _ => "2",
            };
            VolumeParams::parse(&map(&[(k, v)])).unwrap();
        }
    }
}
