//! The `cairn` and `cairnctl` binaries: bad input gives a one-line error and
//! a non-zero exit; a system restarts with its volumes.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cairn_cli::system::{System, SystemConfig};

const CAIRN: &str = env!("CARGO_BIN_EXE_cairn");
const CAIRNCTL: &str = env!("CARGO_BIN_EXE_cairnctl");

/// Asserts a failed run with exactly one line on stderr, and no panic.
fn assert_one_line_error(out: &std::process::Output, expect: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.contains(" INFO ") && !l.contains(" WARN "))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(
        lines[0].contains(expect),
        "error {:?} should mention {expect:?}",
        lines[0]
    );
}

fn ephemeral_args(dir: &std::path::Path) -> Vec<String> {
    vec![
        "--data-dir".into(),
        dir.display().to_string(),
        "--nvmf-listen".into(),
        "127.0.0.1:0".into(),
        "--engine-listen".into(),
        "127.0.0.1:0".into(),
        "--agent-listen".into(),
        "127.0.0.1:0".into(),
        "--pool-size".into(),
        "256M".into(),
    ]
}

#[test]
fn cairn_refuses_a_missing_data_directory() {
    let out = Command::new(CAIRN)
        .args(["--data-dir", "/nonexistent/cairn-data"])
        .output()
        .unwrap();
    assert_one_line_error(
        &out,
        "data directory /nonexistent/cairn-data does not exist",
    );
}

#[test]
fn cairn_refuses_a_pool_file_that_is_not_a_pool() {
    let dir = tempfile::tempdir().unwrap();
    let junk: Vec<u8> = (0..1 << 20).map(|i| (i * 7 % 251) as u8 + 1).collect();
    std::fs::write(dir.path().join("pool0.img"), &junk).unwrap();
    let out = Command::new(CAIRN)
        .args(ephemeral_args(dir.path()))
        .output()
        .unwrap();
    assert_one_line_error(&out, "not a Cairn pool");
    // The file is untouched.
    assert_eq!(std::fs::read(dir.path().join("pool0.img")).unwrap(), junk);
}

#[test]
fn cairn_refuses_a_malformed_pool_disk_uri() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(CAIRN)
        .args(ephemeral_args(dir.path()))
        .args(["--pool-disk", "malloc:///ram0"])
        .output()
        .unwrap();
    assert_one_line_error(&out, "size_mb");
    assert!(!dir.path().join("pool0.img").exists());
}

#[test]
fn cairn_runs_its_pool_on_a_malloc_disk() {
    let dir = tempfile::tempdir().unwrap();
    let sys = System::start(SystemConfig {
        pool_disk: Some("malloc:///cli-test?size_mb=128".into()),
        ..SystemConfig::ephemeral(dir.path().to_owned())
    })
    .unwrap();
    // No pool file: the pool is on the RAM disk.
    assert!(!dir.path().join("pool0.img").exists());
    let disk = cairn_bdev::malloc::get("cli-test").expect("the RAM disk exists");
    assert_eq!(disk.size(), 128 << 20);
    sys.stop().unwrap();
}

#[test]
fn cairn_refuses_a_second_instance_on_the_same_directory() {
    let dir = tempfile::tempdir().unwrap();
    let sys = System::start(SystemConfig {
        pool_size: 256 << 20,
        ..SystemConfig::ephemeral(dir.path().to_owned())
    })
    .unwrap();
    let out = Command::new(CAIRN)
        .args(ephemeral_args(dir.path()))
        .output()
        .unwrap();
    assert_one_line_error(&out, "in use by another cairn process");
    sys.stop().unwrap();
}

fn cairnctl(agent: &str, args: &[&str]) -> std::process::Output {
    Command::new(CAIRNCTL)
        .arg("--agent")
        .arg(agent)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn cairnctl_reports_unknown_volumes_and_unreachable_agents() {
    let dir = tempfile::tempdir().unwrap();
    let sys = System::start(SystemConfig {
        pool_size: 256 << 20,
        ..SystemConfig::ephemeral(dir.path().to_owned())
    })
    .unwrap();
    let out = cairnctl(
        &sys.agent_endpoint,
        &["volume", "get", "00000000-0000-0000-0000-000000000000"],
    );
    assert_one_line_error(&out, "not found (NotFound)");
    let out = cairnctl(
        &sys.agent_endpoint,
        &["volume", "create", "v", "--size", "12Q"],
    );
    assert!(!out.status.success());
    sys.stop().unwrap();
    let out = cairnctl("http://127.0.0.1:1", &["volume", "list"]);
    assert_one_line_error(&out, "cannot reach the agent");
}

/// Starts `cairn` as a child and returns it with its agent endpoint.
fn spawn_cairn(dir: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(CAIRN)
        .args(ephemeral_args(dir))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut agent = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.trim().strip_prefix("agent API:") {
            agent = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.trim().starts_with("data directory:") {
            break;
        }
    }
    (child, agent.expect("cairn printed its agent endpoint"))
}

fn stop(mut child: Child) {
    // SAFETY: kill sends a signal to a child process we own.
    let rc = unsafe { libc_kill(child.id() as i32, 2) };
    assert_eq!(rc, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "cairn exited with {status} on SIGINT");
            return;
        }
        assert!(Instant::now() < deadline, "cairn did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    }
}

extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, sig: i32) -> i32;
}

#[test]
fn cairn_stops_cleanly_and_finds_its_volumes_again() {
    let dir = tempfile::tempdir().unwrap();
    let (child, agent) = spawn_cairn(dir.path());
    let out = cairnctl(
        &agent,
        &["--json", "volume", "create", "keep-me", "--size", "64M"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = created[0]["id"].as_str().unwrap().to_owned();
    let out = cairnctl(&agent, &["--json", "node", "list"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let node = nodes[0]["id"].as_str().unwrap().to_owned();
    let out = cairnctl(&agent, &["volume", "publish", &id, "--node", &node]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop(child);

    let (child, agent) = spawn_cairn(dir.path());
    let out = cairnctl(&agent, &["--json", "volume", "get", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["name"], "keep-me");
    assert_eq!(v[0]["status"], "online");
    // The published volume's nexus comes back with the engine.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = cairnctl(&agent, &["--json", "nexus", "list"]);
        let nx: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        if nx
            .as_array()
            .is_some_and(|a| a.iter().any(|n| n["uuid"] == id.as_str()))
        {
            break;
        }
        assert!(Instant::now() < deadline, "nexus not restored: {nx}");
        std::thread::sleep(Duration::from_millis(200));
    }
    stop(child);
}

#[test]
fn replica_nodes_hold_the_other_replicas_of_a_volume() {
    let dir = tempfile::tempdir().unwrap();
    let sys = System::start(SystemConfig {
        pool_size: 256 << 20,
        replica_nodes: 2,
        ..SystemConfig::ephemeral(dir.path().to_owned())
    })
    .unwrap();
    let agent = sys.agent_endpoint.clone();
    let out = cairnctl(&agent, &["--json", "node", "list"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 3, "{nodes}");
    let out = cairnctl(
        &agent,
        &[
            "--json", "volume", "create", "triple", "--size", "32M", "--repl", "3",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = v[0]["id"].as_str().unwrap().to_owned();
    let out = cairnctl(&agent, &["volume", "publish", &id, "--node", &sys.node_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cairnctl(&agent, &["--json", "nexus", "list"]);
    let nx: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let children = nx[0]["children"].as_str().unwrap().to_owned();
    assert_eq!(children.matches("(healthy)").count(), 3, "{children}");
    assert_eq!(children.matches("nvmf://127.0.0.").count(), 2, "{children}");
    sys.stop().unwrap();
}
