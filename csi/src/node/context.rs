//! The publish context the node plugin reads, as the Controller service's
//! `ControllerPublishVolume` fills it, and the `nvme connect` arguments made
//! from it.
//!
//! The connection tunables use the StorageClass parameter names from
//! [`crate::params::PARAMETERS`], which the controller copies through.

use std::{collections::HashMap, net::IpAddr};

use super::error::NodeError;

/// Target IP address of the volume's NVMe-oF/TCP subsystem.
pub const ADDRESS: &str = "address";
/// Target TCP port (default 8420 on the engine side).
pub const PORT: &str = "port";
/// Subsystem NQN of the volume.
pub const NQN: &str = "nqn";
/// `nvme connect --ctrl-loss-tmo` in seconds (-1: retry forever).
pub const CTRL_LOSS_TMO: &str = "ctrlLossTmo";
/// `nvme connect --reconnect-delay` in seconds.
pub const RECONNECT_DELAY: &str = "reconnectDelay";
/// `nvme connect --keep-alive-tmo` in seconds.
pub const KEEP_ALIVE_TMO: &str = "keepAliveTmo";
/// `nvme connect --nr-io-queues`.
pub const NR_IO_QUEUES: &str = "nrIoQueues";
/// Filesystem from the StorageClass, used when the capability names none.
pub const FS_TYPE: &str = "fsType";

/// Prefix of a volume's subsystem NQN; the volume id follows.
pub const VOLUME_NQN_PREFIX: &str = "nqn.2024-01.dev.cairn:vol:";

/// The subsystem NQN Cairn gives the volume `volume_id`.
pub fn volume_nqn(volume_id: &str) -> String {
    format!("{VOLUME_NQN_PREFIX}{volume_id}")
}

/// Everything `nvme connect` needs for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectParams {
    /// Target IP address.
    pub address: IpAddr,
    /// Target TCP port.
    pub port: u16,
    /// Subsystem NQN.
    pub nqn: String,
    /// Seconds before a lost controller is given up (-1 = never).
    pub ctrl_loss_tmo: Option<i64>,
    /// Seconds between reconnect attempts.
    pub reconnect_delay: Option<i64>,
    /// Keep-alive timeout in seconds.
    pub keep_alive_tmo: Option<i64>,
    /// Number of I/O queues to ask for.
    pub nr_io_queues: Option<i64>,
}

fn bounded(
    ctx: &HashMap<String, String>,
    key: &'static str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, NodeError> {
    let Some(raw) = ctx.get(key) else {
        return Ok(None);
    };
    let v: i64 = raw.trim().parse().map_err(|_| {
        NodeError::invalid("publish_context", format!("{key}={raw:?} is not a number"))
    })?;
    if !(min..=max).contains(&v) {
        return Err(NodeError::invalid(
            "publish_context",
            format!("{key}={v} is outside {min}..={max}"),
        ));
    }
    Ok(Some(v))
}

impl ConnectParams {
    /// Reads the publish context; missing or malformed keys are
    /// INVALID_ARGUMENT (the CO passes what ControllerPublishVolume gave).
    pub fn from_context(ctx: &HashMap<String, String>) -> Result<Self, NodeError> {
        let get = |key: &'static str| -> Result<&str, NodeError> {
            ctx.get(key)
                .map(String::as_str)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| NodeError::invalid("publish_context", format!("{key} is missing")))
        };
        let address_raw = get(ADDRESS)?;
        let address: IpAddr = address_raw.parse().map_err(|_| {
            NodeError::invalid(
                "publish_context",
                format!("{ADDRESS}={address_raw:?} is not an IP address"),
            )
        })?;
        let port_raw = get(PORT)?;
        let port: u16 = port_raw.parse().ok().filter(|p| *p != 0).ok_or_else(|| {
            NodeError::invalid(
                "publish_context",
                format!("{PORT}={port_raw:?} is not a TCP port"),
            )
        })?;
        let nqn = get(NQN)?.to_owned();
        // NVMe base spec: an NQN is at most 223 bytes and starts with "nqn.".
        if !nqn.starts_with("nqn.") || nqn.len() > 223 || nqn.chars().any(char::is_whitespace) {
            return Err(NodeError::invalid(
                "publish_context",
                format!("{NQN}={nqn:?} is not an NVMe qualified name"),
            ));
        }
        Ok(ConnectParams {
            address,
            port,
            nqn,
            ctrl_loss_tmo: bounded(ctx, CTRL_LOSS_TMO, -1, 86_400)?,
            reconnect_delay: bounded(ctx, RECONNECT_DELAY, 1, 3_600)?,
            keep_alive_tmo: bounded(ctx, KEEP_ALIVE_TMO, 1, 3_600)?,
            nr_io_queues: bounded(ctx, NR_IO_QUEUES, 1, 1_024)?,
        })
    }

    /// `nvme` arguments for connecting this volume from `host_nqn`.
    pub fn connect_args(&self, host_nqn: Option<&str>) -> Vec<String> {
        let mut args: Vec<String> = [
            "connect",
            "-t",
            "tcp",
            "-a",
            &self.address.to_string(),
            "-s",
            &self.port.to_string(),
            "-n",
            &self.nqn,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        if let Some(h) = host_nqn {
            args.extend(["--hostnqn".to_owned(), h.to_owned()]);
        }
        let opts = [
            ("--ctrl-loss-tmo", self.ctrl_loss_tmo),
            ("--reconnect-delay", self.reconnect_delay),
            ("--keep-alive-tmo", self.keep_alive_tmo),
            ("--nr-io-queues", self.nr_io_queues),
        ];
        for (flag, v) in opts {
            if let Some(v) = v {
                args.extend([flag.to_owned(), v.to_string()]);
            }
        }
        args
    }

    /// `nqn@address:port`, for messages.
    pub fn target(&self) -> String {
        format!("{}@{}:{}", self.nqn, self.address, self.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn ctx(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const NQN_1: &str = "nqn.2024-01.dev.cairn:vol:0b4b6a4e-1f0e-4b0c-9d3e-7f1f0d6c2a11";

    #[test]
    fn keys_match_the_published_contract() {
        // The controller fills these keys in ControllerPublishVolume.
        assert_eq!([ADDRESS, PORT, NQN], ["address", "port", "nqn"]);
        for key in [
            CTRL_LOSS_TMO,
            RECONNECT_DELAY,
            KEEP_ALIVE_TMO,
            NR_IO_QUEUES,
            FS_TYPE,
        ] {
            assert!(crate::params::PARAMETERS.contains(&key), "{key}");
        }
    }

    #[test]
    fn full_context_builds_the_nvme_connect_command() {
        let p = ConnectParams::from_context(&ctx(&[
            (ADDRESS, "10.1.2.3"),
            (PORT, "8420"),
            (NQN, NQN_1),
            (CTRL_LOSS_TMO, "-1"),
            (RECONNECT_DELAY, "2"),
            (KEEP_ALIVE_TMO, "5"),
            (NR_IO_QUEUES, "4"),
            ("repl", "3"),
        ]))
        .expect("valid");
        assert_eq!(
            p.connect_args(Some("nqn.2014-08.org.nvmexpress:uuid:host-a")),
            [
                "connect",
                "-t",
                "tcp",
                "-a",
                "10.1.2.3",
                "-s",
                "8420",
                "-n",
                NQN_1,
                "--hostnqn",
                "nqn.2014-08.org.nvmexpress:uuid:host-a",
                "--ctrl-loss-tmo",
                "-1",
                "--reconnect-delay",
                "2",
                "--keep-alive-tmo",
                "5",
                "--nr-io-queues",
                "4",
            ]
        );
    }

    #[test]
    fn optional_tunables_are_left_to_nvme_cli_defaults() {
        let p =
            ConnectParams::from_context(&ctx(&[(ADDRESS, "::1"), (PORT, "4420"), (NQN, NQN_1)]))
                .expect("valid");
        assert_eq!(
            p.connect_args(None),
            ["connect", "-t", "tcp", "-a", "::1", "-s", "4420", "-n", NQN_1]
        );
    }

    #[test]
    fn bad_contexts_are_invalid_argument() {
        let base = [(ADDRESS, "10.1.2.3"), (PORT, "8420"), (NQN, NQN_1)];
        let mut cases: Vec<HashMap<String, String>> = Vec::new();
        for skip in 0..base.len() {
            let partial: Vec<_> = base
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != skip)
                .map(|(_, kv)| *kv)
                .collect();
            cases.push(ctx(&partial));
        }
        for (k, v) in [
            (ADDRESS, "target.example"),
            (PORT, "0"),
            (PORT, "70000"),
            (NQN, "vol-1"),
            (NQN, "nqn.has space"),
            (CTRL_LOSS_TMO, "-2"),
            (RECONNECT_DELAY, "0"),
            (KEEP_ALIVE_TMO, "x"),
            (NR_IO_QUEUES, "5000"),
        ] {
            let mut c = ctx(&base);
            c.insert(k.to_owned(), v.to_owned());
            cases.push(c);
        }
        for c in cases {
            let err = ConnectParams::from_context(&c).expect_err(&format!("{c:?}"));
            assert_eq!(err.code(), Code::InvalidArgument, "{c:?}");
        }
    }

    #[test]
    fn volume_nqn_follows_the_contract() {
        assert_eq!(
            volume_nqn("0b4b6a4e-1f0e-4b0c-9d3e-7f1f0d6c2a11"),
            "nqn.2024-01.dev.cairn:vol:0b4b6a4e-1f0e-4b0c-9d3e-7f1f0d6c2a11"
        );
    }
}
