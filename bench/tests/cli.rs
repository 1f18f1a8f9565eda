//! The `cairn-bench` binary end to end, on a file in a tempdir.

use std::process::Command;

fn bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_cairn-bench"))
}

#[test]
fn runs_rows_against_a_new_file_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dev.img");
    let json = dir.path().join("out.json");
    let out = bench()
        .args(["--filename", img.to_str().unwrap()])
        .args(["--size", "8m", "--rw", "randread,randwrite", "--bs", "4k"])
        .args(["--iodepth", "8", "--runtime", "150ms", "--no-progress"])
        .args(["--json-out", json.to_str().unwrap()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 8 << 20);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[2].starts_with("| randread "), "{stdout}");
    assert!(lines[3].starts_with("| randwrite "), "{stdout}");
    let results = cairn_bench::report::from_json(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(results.len(), 2);
    assert!(results.iter().all(|r| r.total.ios > 0 && r.errors == 0));
}

#[test]
fn model_verify_and_errors() {
    // The SSD model in front of a RAM disk, with verify, as JSON.
    let out = bench()
        .args([
            "--ram",
            "4m",
            "--model",
            "lat=50us,iops=20k",
            "--rw",
            "randrw",
        ])
        .args(["--verify", "--runtime", "100ms", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("SSD model [read 50us"), "{stderr}");
    let r = cairn_bench::report::from_json(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(r[0].verify.as_ref().unwrap().mismatches, 0);

    // Bad input is refused with exit code 2 and a reason.
    for args in [
        &["--ram", "4m", "--bs", "1000"][..],
        &["--ram", "4m", "--rw", "trim"],
        &["--filename", "/nonexistent/dir/x"],
        &["--rw", "randread"],
    ] {
        let out = bench().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("cairn-bench: "));
    }
}
