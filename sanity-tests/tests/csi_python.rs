//! A CSI client in another language: Python's grpcio (gRPC's C core, which
//! sends the socket path as the HTTP/2 `:authority`) with default channel
//! options calls Identity, Controller and Node RPCs on the socket of a
//! whole single-node Cairn (`sanity-tests/python/csi_client.py`).
//!
//! The virtualenv comes from `sanity-tests/python/setup.sh` (grpcio from
//! PyPI; `scripts/install-deps.sh` runs it for CI). Without it this test
//! fails: it never passes without having run.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use cairn_cli::system::{System, SystemConfig};

#[test]
fn python_grpcio_with_default_options_talks_to_the_csi_socket() -> Result<()> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let setup = Command::new(here.join("python/setup.sh"))
        .output()
        .context("running sanity-tests/python/setup.sh")?;
    ensure!(
        setup.status.success(),
        "sanity-tests/python/setup.sh failed: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let python = String::from_utf8(setup.stdout)?.trim().to_owned();

    let dir = tempfile::tempdir()?;
    let mut cfg = SystemConfig::ephemeral(dir.path().to_path_buf());
    cfg.pool_size = 256 << 20;
    cfg.node_id = Some("python-node".into());
    let sys = System::start(cfg).context("starting the system")?;
    let out = Command::new(&python)
        .arg(here.join("python/csi_client.py"))
        .arg(format!("unix://{}", sys.csi_socket.display()))
        .arg(here.join("../proto"))
        .output()
        .context("running csi_client.py");
    let stopped = sys.stop();
    let out = out?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    ensure!(out.status.success(), "csi_client.py failed: {}", out.status);
    let last = stdout.lines().last().unwrap_or_default();
    ensure!(last == "8 passed, 0 failed", "summary: {last:?}");
    stopped.context("stopping the system")
}
