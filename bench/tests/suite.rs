//! `cairn-bench suite --quick` end to end with tiny runs (it checks the
//! suite works, not speed), and the `--nvmf` single-job target against an
//! in-process Cairn target.

use std::process::Command;
use std::sync::Arc;

use cairn_bdev::ram::RamDevice;
use cairn_engine::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairn-bench"))
}

#[test]
fn quick_suite_writes_table_json_and_chart() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let o = bench()
        .args(["suite", "--quick", "--no-progress"])
        .args(["--runtime", "60ms", "--ramp", "0ms", "--idle", "200ms"])
        .args(["--size", "8m"])
        .args(["--out", out.to_str().unwrap()])
        .args(["--disk-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stdout}\n{stderr}");

    // The table, printed and written.
    let md = std::fs::read_to_string(out.join("suite.md")).unwrap();
    assert_eq!(md, stdout);
    for setup in [
        "ram",
        "shm-file",
        "model",
        "replica",
        "nexus-1",
        "nexus-1-model",
        "nexus-2-model",
        "nexus-3-model",
    ] {
        for job in ["randread", "randwrite", "randrw", "qd1-read"] {
            let row = format!("| {setup} ");
            assert!(
                md.lines()
                    .any(|l| l.starts_with(&row) && l.contains(&format!(" {job} "))),
                "no row {setup} {job} in\n{md}"
            );
        }
    }
    assert!(md.contains("## Idle engine"), "{md}");
    assert!(
        md.contains("nexus-2-model / nexus-1-model, randread IOPS"),
        "{md}"
    );

    // The JSON: every median run did I/O without errors, the engine setups
    // have engine CPU figures, the baselines none.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("suite.json")).unwrap()).unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert!(rows.len() >= 32, "{} rows", rows.len());
    for r in rows {
        let m = &r["median"];
        assert!(m["total"]["ios"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(m["errors"].as_u64(), Some(0), "{r}");
        let engine = m["cpu"]["watched_us_per_io"].as_f64();
        let setup = r["setup"].as_str().unwrap();
        if setup.starts_with("nexus") || setup.starts_with("replica") || setup == "ram-nvmf" {
            assert!(engine.is_some_and(|v| v > 0.0), "{r}");
        } else {
            assert!(engine.is_none(), "{r}");
        }
    }
    assert!(json["idle"]["reactor_threads"].as_u64().unwrap() >= 3);

    // The setups compared taking turns: each pair and QD64 job, with IOPS
    // for both sides of every run and the engine's CPU split between them.
    assert!(md.contains("## Setups taking turns"), "{md}");
    let pairs = json["interleaved"].as_array().unwrap();
    for (base, other) in [("replica", "replica"), ("replica", "nexus-1")] {
        for job in ["randread", "randwrite", "randrw", "qd1-read"] {
            let c = pairs
                .iter()
                .find(|c| c["base"] == base && c["other"] == other && c["job"] == job)
                .unwrap_or_else(|| panic!("no {other} vs {base} {job} in {pairs:?}"));
            for side in ["base", "other"] {
                let iops = c[format!("{side}_iops")].as_array().unwrap();
                assert_eq!(iops.len(), 1, "{c}");
                assert!(iops[0].as_f64().unwrap() > 0.0, "{c}");
                let cpu = c[format!("{side}_engine_us")].as_array().unwrap();
                assert!(cpu[0].as_f64().unwrap() > 0.0, "{c}");
            }
        }
    }
    assert!(
        md.contains("nexus-1 / replica alone, randread IOPS (taking turns"),
        "{md}"
    );
    assert!(
        md.contains("replica alone / nexus-1, QD1 latency (speed; taking turns"),
        "{md}"
    );
    assert!(!pairs.iter().any(|c| c["job"] == "qd1-sleep"), "{pairs:?}");

    // The chart: a PNG of some substance.
    let png = std::fs::read(out.join("suite.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    assert!(png.len() > 20_000, "{} bytes", png.len());

    // Nothing left behind in tmpfs or next to the disk file.
    let pid_dirs = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("cairn-bench-")
        })
        .count();
    assert_eq!(pid_dirs, 0);
}

#[test]
fn suite_rejects_unknown_setups_and_jobs() {
    let o = bench()
        .args(["suite", "--quick", "--setups", "ram,nexus-4"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("1 to 3 replicas"));
    let o = bench()
        .args(["suite", "--quick", "--jobs", "randread,qd2"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown job \"qd2\""));
}

#[test]
fn single_job_through_the_initiator() {
    let target = Target::start(TargetConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        ..TargetConfig::default()
    })
    .unwrap();
    let nqn = "nqn.2024-01.dev.cairn:vol:00000000-0000-0000-0000-0000000000b1";
    target
        .add_subsystem(SubsystemConfig {
            nqn: nqn.into(),
            serial: "bench-test".into(),
            model: None,
            namespaces: vec![NamespaceConfig {
                nsid: 1,
                uuid: uuid::Uuid::new_v4(),
                device: Arc::new(RamDevice::new(4096, 2048)),
            }],
            allowed_hosts: None,
        })
        .unwrap();
    let addr = target.local_addr().to_string();
    let o = bench()
        .args([
            "--nvmf",
            &addr,
            "--nqn",
            nqn,
            "--queues",
            "2",
            "--numjobs",
            "2",
        ])
        .args(["--hdr-digest", "--data-digest"])
        .args(["--rw", "randwrite,randread", "--iodepth", "8", "--verify"])
        .args(["--runtime", "150ms", "--no-progress", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("header digest, data digest"), "{stderr}");
    let results = cairn_bench::report::from_json(&String::from_utf8_lossy(&o.stdout)).unwrap();
    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(r.total.ios > 0 && r.is_clean(), "{r:?}");
    }
    let v = results[1].verify.as_ref().unwrap();
    assert!(v.blocks_checked > 0, "{v:?}");
    target.shutdown();
}
