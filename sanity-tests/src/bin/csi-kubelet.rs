//! `csi-kubelet`: the node-side CSI calls kubelet makes, one per
//! invocation, against a CSI node plugin's Unix socket. System tests run it
//! inside the test VM next to `cairn-csi --mode node` and script the volume
//! life cycle (stage, publish, use, expand, unpublish, unstage) around it.
//!
//! ```text
//! csi-kubelet [--endpoint unix:///run/csi.sock] COMMAND [OPTIONS]
//!   wait                                  until Probe says ready (30 s)
//!   info                                  NodeGetInfo
//!   stage     --volume ID --staging DIR [--block] [--fs FS] [--ctx K=V]...
//!   publish   --volume ID --staging DIR --target PATH [--block] [--fs FS]
//!             [--readonly] [--ctx K=V]...
//!   unpublish --volume ID --target PATH
//!   unstage   --volume ID --staging DIR
//!   stats     --volume ID --path PATH     prints `bytes total=.. used=.. available=..`
//!   expand    --volume ID --path PATH [--bytes N] [--block]
//!   health    --volume ID --path P  (the alpha volume condition)
//! ```
//!
//! Exits 0 on success; on a gRPC error prints `error CODE: message` and
//! exits 1 (2 for usage errors).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_proto::csi::v1 as csi;
use cairn_sanity_tests::csi::{block_cap, mount_cap, CsiClients};
use csi::volume_capability::access_mode::Mode;

#[derive(Debug, Default)]
struct Opts {
    endpoint: String,
    command: String,
    volume: String,
    staging: String,
    target: String,
    path: String,
    block: bool,
    readonly: bool,
    fs: String,
    bytes: i64,
    ctx: HashMap<String, String>,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        endpoint: "unix:///run/csi.sock".into(),
        ..Default::default()
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> Result<String> {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--endpoint" => o.endpoint = value(a)?,
            "--volume" => o.volume = value(a)?,
            "--staging" => o.staging = value(a)?,
            "--target" => o.target = value(a)?,
            "--path" => o.path = value(a)?,
            "--fs" => o.fs = value(a)?,
            "--bytes" => o.bytes = value(a)?.parse().context("--bytes")?,
            "--block" => o.block = true,
            "--readonly" => o.readonly = true,
            "--ctx" => {
                let kv = value(a)?;
                let (k, v) = kv.split_once('=').context("--ctx wants KEY=VALUE")?;
                o.ctx.insert(k.to_owned(), v.to_owned());
            }
            s if s.starts_with("--") => bail!("unknown option {s}"),
            s if o.command.is_empty() => o.command = s.to_owned(),
            s => bail!("unexpected argument {s}"),
        }
    }
    if o.command.is_empty() {
        bail!("no command given");
    }
    Ok(o)
}

fn capability(o: &Opts) -> csi::VolumeCapability {
    if o.block {
        block_cap(Mode::SingleNodeWriter)
    } else {
        mount_cap(&o.fs, Mode::SingleNodeWriter)
    }
}

async fn run(o: Opts) -> Result<(), tonic::Status> {
    let connect = |o: &Opts| {
        let ep = o.endpoint.clone();
        async move {
            CsiClients::connect(&ep)
                .await
                .map_err(|e| tonic::Status::unavailable(format!("connecting to {ep}: {e}")))
        }
    };
    if o.command == "wait" {
        let start = Instant::now();
        loop {
            if let Ok(mut c) = connect(&o).await {
                if let Ok(r) = c.identity.probe(csi::ProbeRequest {}).await {
                    if r.into_inner().ready == Some(true) {
                        println!("ready after {:?}", start.elapsed());
                        return Ok(());
                    }
                }
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(tonic::Status::deadline_exceeded("plugin not ready in 30 s"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let mut c = connect(&o).await?;
    match o.command.as_str() {
        "info" => {
            let r = c.node.node_get_info(csi::NodeGetInfoRequest {}).await?;
            println!("{:?}", r.into_inner());
        }
        "stage" => {
            c.node
                .node_stage_volume(csi::NodeStageVolumeRequest {
                    volume_id: o.volume.clone(),
                    publish_context: o.ctx.clone(),
                    staging_target_path: o.staging.clone(),
                    volume_capability: Some(capability(&o)),
                    ..Default::default()
                })
                .await?;
        }
        "publish" => {
            c.node
                .node_publish_volume(csi::NodePublishVolumeRequest {
                    volume_id: o.volume.clone(),
                    publish_context: o.ctx.clone(),
                    staging_target_path: o.staging.clone(),
                    target_path: o.target.clone(),
                    volume_capability: Some(capability(&o)),
                    readonly: o.readonly,
                    ..Default::default()
                })
                .await?;
        }
        "unpublish" => {
            c.node
                .node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                    volume_id: o.volume.clone(),
                    target_path: o.target.clone(),
                })
                .await?;
        }
        "unstage" => {
            c.node
                .node_unstage_volume(csi::NodeUnstageVolumeRequest {
                    volume_id: o.volume.clone(),
                    staging_target_path: o.staging.clone(),
                })
                .await?;
        }
        "stats" => {
            let r = c
                .node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: o.volume.clone(),
                    volume_path: o.path.clone(),
                    staging_target_path: String::new(),
                })
                .await?
                .into_inner();
            for u in r.usage {
                let unit = csi::volume_usage::Unit::try_from(u.unit)
                    .map(|u| u.as_str_name().to_ascii_lowercase())
                    .unwrap_or_else(|_| u.unit.to_string());
                println!(
                    "{unit} total={} used={} available={}",
                    u.total, u.used, u.available
                );
            }
        }
        "expand" => {
            let r = c
                .node
                .node_expand_volume(csi::NodeExpandVolumeRequest {
                    volume_id: o.volume.clone(),
                    volume_path: o.path.clone(),
                    capacity_range: (o.bytes > 0).then_some(csi::CapacityRange {
                        required_bytes: o.bytes,
                        limit_bytes: 0,
                    }),
                    volume_capability: Some(capability(&o)),
                    ..Default::default()
                })
                .await?
                .into_inner();
            println!("capacity_bytes={}", r.capacity_bytes);
        }
        "health" => {
            // The alpha VOLUME_CONDITION, reported with the stats.
            let r = c
                .node
                .node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                    volume_id: o.volume.clone(),
                    volume_path: o.path.clone(),
                    staging_target_path: String::new(),
                })
                .await?
                .into_inner();
            match r.volume_condition {
                Some(c) if !c.abnormal => println!("healthy"),
                Some(c) => println!("abnormal: {}", c.message),
                None => println!("no condition reported"),
            }
        }
        other => {
            return Err(tonic::Status::invalid_argument(format!(
                "unknown command {other}"
            )))
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("csi-kubelet: {e:#}");
            std::process::exit(2);
        }
    };
    if let Err(s) = run(opts).await {
        println!("error {:?}: {}", s.code(), s.message());
        std::process::exit(1);
    }
}
