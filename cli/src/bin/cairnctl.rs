//! `cairnctl`: inspect and drive a Cairn cluster through its agents.

use anyhow::Context;
use cairn_cli::table::{human_bytes, parse_size, Table};
use cairn_proto::agent::v1 as apb;
use cairn_proto::engine::v1 as epb;
use clap::{Parser, Subcommand};
use serde_json::Value;
use tonic::transport::Channel;

/// Cairn command-line client.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// An agent's Control API endpoint.
    #[arg(
        long,
        env = "CAIRN_AGENT",
        default_value = "http://127.0.0.1:10125",
        global = true
    )]
    agent: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Nodes and their health.
    #[command(subcommand)]
    Node(ListOnly),
    /// Pools on every node.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Replicas on every node.
    #[command(subcommand)]
    Replica(ListOnly),
    /// Nexuses on every node, with their children's states.
    #[command(subcommand)]
    Nexus(ListOnly),
    /// Volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Benchmarks that need no running system.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// A pool replica against the raw file it lives on (4 KiB random
    /// write and read), plus the cost of first writes that allocate.
    Pool {
        /// Directory for the files (repeatable; default: /dev/shm and /var/tmp).
        #[arg(long = "dir")]
        dirs: Vec<std::path::PathBuf>,
        /// Bytes each job covers.
        #[arg(long, default_value = "512M", value_parser = parse_size)]
        size: u64,
        /// Measured time of each job, in seconds.
        #[arg(long, default_value_t = 5.0)]
        runtime: f64,
        #[arg(long, default_value_t = 32)]
        iodepth: u32,
        /// Rounds (setups alternate within each; the median is reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[derive(Subcommand, Debug)]
enum PoolCmd {
    /// List them.
    List,
    /// Report a pool's damaged metadata and faulted replicas (exits non-zero
    /// while damage remains); with --repair, rewrite the damaged blocks.
    Check {
        /// The node whose engine holds the pool.
        #[arg(long)]
        node: String,
        /// The pool's name.
        pool: String,
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ListOnly {
    /// List them.
    List,
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// List volumes.
    List,
    /// Show one volume.
    Get { id: String },
    /// Create a volume (idempotent by name).
    Create {
        name: String,
        /// Size, e.g. 10G.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Number of replicas, each on its own node.
        #[arg(long, default_value_t = 1)]
        repl: u32,
        /// Allocate all space up front.
        #[arg(long)]
        thick: bool,
    },
    /// Delete a volume and its replicas.
    Delete { id: String },
    /// Publish a volume's nexus on a node.
    Publish {
        id: String,
        #[arg(long)]
        node: String,
    },
    /// Unpublish a volume.
    Unpublish { id: String },
    /// Grow a volume.
    Resize {
        id: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Cmd::Bench(b) = &cli.cmd {
        if let Err(e) = bench(b, cli.json) {
            eprintln!("cairnctl: {}", cairn_cli::one_line(&e));
            std::process::exit(1);
        }
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run(cli)) {
        eprintln!("cairnctl: {}", cairn_cli::one_line(&e));
        std::process::exit(1);
    }
}

fn bench(cmd: &BenchCmd, json: bool) -> anyhow::Result<()> {
    let BenchCmd::Pool {
        dirs,
        size,
        runtime,
        iodepth,
        rounds,
    } = cmd;
    let dirs = if dirs.is_empty() {
        vec!["/dev/shm".into(), "/var/tmp".into()]
    } else {
        dirs.clone()
    };
    for d in &dirs {
        anyhow::ensure!(d.is_dir(), "{} is not a directory", d.display());
    }
    anyhow::ensure!(
        *runtime > 0.0 && runtime.is_finite(),
        "--runtime must be positive"
    );
    let report = cairn_cli::poolbench::run(&cairn_cli::poolbench::PoolBench {
        dirs,
        size: *size,
        runtime: std::time::Duration::from_secs_f64(*runtime),
        iodepth: *iodepth,
        rounds: (*rounds).max(1),
    })?;
    if json {
        println!("{}", cairn_bench::to_json(&report.results)?);
    } else {
        println!("{}", report.table);
        for r in &report.ratios {
            println!("{r}");
        }
    }
    Ok(())
}

async fn control(url: &str) -> anyhow::Result<apb::control_client::ControlClient<Channel>> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("bad agent endpoint {url}"))?
        .connect_timeout(std::time::Duration::from_secs(3))
        .connect()
        .await
        .with_context(|| format!("cannot reach the agent at {url}"))?;
    Ok(apb::control_client::ControlClient::new(ch))
}

async fn engines(
    ctl: &mut apb::control_client::ControlClient<Channel>,
) -> anyhow::Result<Vec<(String, epb::engine_client::EngineClient<Channel>)>> {
    let nodes = ctl
        .list_nodes(apb::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    let mut out = Vec::new();
    for n in nodes.into_iter().filter(|n| n.online) {
        let ch = tonic::transport::Endpoint::from_shared(n.engine_endpoint.clone())?
            .connect_timeout(std::time::Duration::from_secs(3))
            .connect_lazy();
        out.push((n.id, epb::engine_client::EngineClient::new(ch)));
    }
    Ok(out)
}

/// "12.0MiB/32.0MiB (37%)" for a rebuild's progress.
fn progress_text(p: &apb::RebuildStatus) -> String {
    let pct = (p.bytes_done as f64 * 100.0 / p.bytes_total.max(1) as f64).min(100.0);
    format!(
        "{} {}/{} ({pct:.0}%)",
        p.kind,
        human_bytes(p.bytes_done),
        human_bytes(p.bytes_total)
    )
}

/// One replica as JSON: where it is, its state, and its rebuild progress.
fn replica_json(r: &apb::ReplicaLocation) -> Value {
    serde_json::json!({
        "uuid": r.uuid,
        "node": r.node,
        "pool": r.pool,
        "state": r.state,
        "replaces": (!r.replaces.is_empty()).then_some(&r.replaces),
        "rebuild": r.rebuild.as_ref().map(|p| serde_json::json!({
            "kind": p.kind,
            "bytes_done": p.bytes_done,
            "bytes_total": p.bytes_total,
            "rate_bytes_per_sec": p.rate_bytes_per_sec,
            "eta_secs": p.eta_secs,
        })),
    })
}

/// "n2:healthy" or "n3:rebuilding 37%", for the one-line form.
fn replica_brief(r: &apb::ReplicaLocation) -> String {
    let state = if r.state.is_empty() {
        if r.healthy {
            "healthy"
        } else {
            "faulted"
        }
    } else {
        r.state.as_str()
    };
    match &r.rebuild {
        Some(p) => format!(
            "{}:{state} {:.0}%",
            r.node,
            (p.bytes_done as f64 * 100.0 / p.bytes_total.max(1) as f64).min(100.0)
        ),
        None => format!("{}:{state}", r.node),
    }
}

fn volume_row(t: &mut Table, v: &apb::Volume, json: bool) {
    let target = v
        .target
        .as_ref()
        .map(|t| Value::from(format!("{} {}", t.node, t.address)));
    let replicas = if json {
        Value::Array(v.replicas.iter().map(replica_json).collect())
    } else {
        v.replicas
            .iter()
            .map(replica_brief)
            .collect::<Vec<_>>()
            .join(",")
            .into()
    };
    t.row(vec![
        v.id.clone().into(),
        v.name.clone().into(),
        human_bytes(v.size_bytes).into(),
        v.replicas_wanted.into(),
        replicas,
        v.status.clone().into(),
        target.unwrap_or(Value::Null),
    ]);
}

/// The replicas of one volume, a row each, with rebuild progress.
fn replica_table(v: &apb::Volume) -> Table {
    let mut t = Table::new(&["uuid", "node", "pool", "state", "rebuild", "rate", "eta"]);
    for r in &v.replicas {
        let (progress, rate, eta) = match &r.rebuild {
            Some(p) => (
                Value::from(progress_text(p)),
                Value::from(format!("{}/s", human_bytes(p.rate_bytes_per_sec))),
                Value::from(format!("{}s", p.eta_secs)),
            ),
            None => (Value::Null, Value::Null, Value::Null),
        };
        t.row(vec![
            r.uuid.clone().into(),
            r.node.clone().into(),
            r.pool.clone().into(),
            r.state.clone().into(),
            progress,
            rate,
            eta,
        ]);
    }
    t
}

const VOLUME_HEADERS: &[&str] = &["id", "name", "size", "repl", "replicas", "status", "target"];

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut ctl = control(&cli.agent).await?;
    match cli.cmd {
        Cmd::Node(ListOnly::List) => {
            let nodes = ctl
                .list_nodes(apb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            let mut t = Table::new(&["id", "online", "nvmf", "engine", "pools", "host_nqn"]);
            for n in nodes {
                t.row(vec![
                    n.id.into(),
                    n.online.into(),
                    n.nvmf_address.into(),
                    n.engine_endpoint.into(),
                    n.pools.len().into(),
                    n.host_nqn.into(),
                ]);
            }
            t.print(cli.json);
        }
        Cmd::Pool(PoolCmd::Check { node, pool, repair }) => {
            let c = ctl
                .check_pool(apb::CheckPoolRequest {
                    node: node.clone(),
                    pool: pool.clone(),
                    repair,
                })
                .await
                .with_context(|| format!("checking pool {pool} on {node}"))?
                .into_inner();
            let mut t = Table::new(&["block", "offset", "state", "reason"]);
            for (d, state) in c
                .damaged
                .iter()
                .map(|d| (d, "damaged"))
                .chain(c.repaired.iter().map(|d| (d, "repaired")))
            {
                t.row(vec![
                    d.what.clone().into(),
                    d.offset.into(),
                    state.into(),
                    d.reason.clone().into(),
                ]);
            }
            for r in &c.faulted_replicas {
                t.row(vec![
                    format!("replica {r}").into(),
                    Value::Null,
                    "faulted".into(),
                    "may have lost data; rebuilt from its peers".into(),
                ]);
            }
            t.print(cli.json);
            if !c.damaged.is_empty() {
                anyhow::bail!(
                    "pool {pool} on {node}: {} damaged blocks remain (--repair rewrites them)",
                    c.damaged.len()
                );
            }
        }
        Cmd::Pool(PoolCmd::List) => {
            let nodes = ctl
                .list_nodes(apb::ListNodesRequest {})
                .await?
                .into_inner()
                .nodes;
            let mut t = Table::new(&["node", "name", "disk", "capacity", "used", "committed"]);
            for n in nodes {
                for p in n.pools {
                    t.row(vec![
                        n.id.clone().into(),
                        p.name.into(),
                        p.disk.into(),
                        human_bytes(p.capacity_bytes).into(),
                        human_bytes(p.used_bytes).into(),
                        human_bytes(p.committed_bytes).into(),
                    ]);
                }
            }
            t.print(cli.json);
        }
        Cmd::Replica(ListOnly::List) => {
            let mut t = Table::new(&[
                "node",
                "uuid",
                "pool",
                "size",
                "thin",
                "allocated",
                "state",
                "shared",
            ]);
            for (node, mut e) in engines(&mut ctl).await? {
                let reps = e
                    .list_replicas(epb::ListReplicasRequest::default())
                    .await
                    .with_context(|| format!("listing replicas on {node}"))?
                    .into_inner()
                    .replicas;
                for r in reps {
                    t.row(vec![
                        node.clone().into(),
                        r.uuid.into(),
                        r.pool.into(),
                        human_bytes(r.size_bytes).into(),
                        r.thin.into(),
                        human_bytes(r.allocated_bytes).into(),
                        epb::ReplicaState::try_from(r.state)
                            .map(|s| s.as_str_name().trim_start_matches("REPLICA_STATE_"))
                            .unwrap_or("UNKNOWN")
                            .to_ascii_lowercase()
                            .into(),
                        if r.share_nqn.is_empty() {
                            Value::Null
                        } else {
                            r.share_nqn.into()
                        },
                    ]);
                }
            }
            t.print(cli.json);
        }
        Cmd::Nexus(ListOnly::List) => {
            let mut t = Table::new(&["node", "uuid", "size", "nqn", "address", "children"]);
            for (node, mut e) in engines(&mut ctl).await? {
                let nx = e
                    .list_nexuses(epb::ListNexusesRequest {})
                    .await
                    .with_context(|| format!("listing nexuses on {node}"))?
                    .into_inner()
                    .nexuses;
                for n in nx {
                    let children: Vec<String> = n
                        .children
                        .iter()
                        .map(|c| {
                            let state = epb::ChildState::try_from(c.state)
                                .map(|s| {
                                    s.as_str_name()
                                        .trim_start_matches("CHILD_STATE_")
                                        .to_lowercase()
                                })
                                .unwrap_or_else(|_| "unknown".into());
                            match &c.rebuild {
                                Some(r) => format!(
                                    "{} ({state}, {} {}%, {}/s, {}s left)",
                                    c.uri,
                                    r.kind,
                                    (r.bytes_done * 100).checked_div(r.bytes_total).unwrap_or(0),
                                    human_bytes(r.rate_bytes_per_sec),
                                    r.eta_secs
                                ),
                                None if !c.fault_reason.is_empty() => {
                                    format!("{} ({state}: {})", c.uri, c.fault_reason)
                                }
                                None => format!("{} ({state})", c.uri),
                            }
                        })
                        .collect();
                    t.row(vec![
                        node.clone().into(),
                        n.uuid.into(),
                        human_bytes(n.size_bytes).into(),
                        n.nqn.into(),
                        n.address.into(),
                        children.join(", ").into(),
                    ]);
                }
            }
            t.print(cli.json);
        }
        Cmd::Volume(v) => volume(&mut ctl, v, cli.json).await?,
        Cmd::Bench(_) => unreachable!("benchmarks run before connecting"),
    }
    Ok(())
}

async fn volume(
    ctl: &mut apb::control_client::ControlClient<Channel>,
    cmd: VolumeCmd,
    json: bool,
) -> anyhow::Result<()> {
    let one = |v: apb::Volume| {
        let mut t = Table::new(VOLUME_HEADERS);
        volume_row(&mut t, &v, json);
        t.print(json);
        if !json && !v.replicas.is_empty() {
            println!();
            replica_table(&v).print(false);
        }
    };
    match cmd {
        VolumeCmd::List => {
            let mut t = Table::new(VOLUME_HEADERS);
            let mut token = String::new();
            loop {
                let page = ctl
                    .list_volumes(apb::ListVolumesRequest {
                        max_entries: 100,
                        starting_token: token,
                    })
                    .await?
                    .into_inner();
                page.volumes
                    .iter()
                    .for_each(|v| volume_row(&mut t, v, json));
                if page.next_token.is_empty() {
                    break;
                }
                token = page.next_token;
            }
            t.print(json);
        }
        VolumeCmd::Get { id } => one(ctl
            .get_volume(apb::GetVolumeRequest { id })
            .await?
            .into_inner()),
        VolumeCmd::Create {
            name,
            size,
            repl,
            thick,
        } => one(ctl
            .create_volume(apb::CreateVolumeRequest {
                name,
                size_bytes: size,
                min_bytes: 0,
                max_bytes: 0,
                replicas: repl,
                thin: !thick,
                topology: None,
            })
            .await?
            .into_inner()),
        VolumeCmd::Delete { id } => {
            ctl.delete_volume(apb::DeleteVolumeRequest { id: id.clone() })
                .await?;
            if !json {
                println!("deleted {id}");
            }
        }
        VolumeCmd::Publish { id, node } => one(ctl
            .publish_volume(apb::PublishVolumeRequest { id, node })
            .await?
            .into_inner()),
        VolumeCmd::Unpublish { id } => one(ctl
            .unpublish_volume(apb::UnpublishVolumeRequest {
                id,
                node: String::new(),
            })
            .await?
            .into_inner()),
        VolumeCmd::Resize { id, size } => one(ctl
            .resize_volume(apb::ResizeVolumeRequest {
                id,
                size_bytes: size,
            })
            .await?
            .into_inner()),
    }
    Ok(())
}
