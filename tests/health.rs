//! `replicafs status --check`: the monitoring-plugin exit codes against real
//! daemons on loopback. Caught up: 0. Replica down: 1 (not connected), then 2
//! once the unreplicated writes are older than the critical lag. No daemon,
//! or bad arguments: 3. The verdict also shows in `status` and `--json`.

mod repl_common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use repl_common::*;

/// (exit code, stdout, stderr) of `replicafs status --check --state-dir STATE EXTRA`.
fn check(state: &Path, extra: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["status", "--check", "--state-dir"])
        .arg(state)
        .args(extra)
        .output()
        .expect("run status --check");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Polls until the check exits with `code` (a deadline against hangs, not a
/// timing assertion); returns its line.
fn wait_for(c: &Cluster, state: &Path, extra: &[&str], code: i32) -> String {
    let start = Instant::now();
    loop {
        let (rc, line, _) = check(state, extra);
        if rc == code {
            return line;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "check {extra:?} stayed at {rc} ({line}), want {code}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn text_status(state: &Path) -> String {
    let out = Command::new(BIN)
        .args(["status", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn check_exit_codes_follow_the_real_state() {
    let mut c = Cluster::new(1, &[]);
    let pstate = c.primary.daemon.state.clone();
    let rstate = c.replicas[0].daemon.state.clone();

    // No daemon yet: unknown, and why.
    let (rc, line, _) = check(&pstate, &[]);
    assert_eq!(rc, 3, "{line}");
    assert!(
        line.starts_with("REPLICAFS UNKNOWN") && line.contains("no daemon answers"),
        "{line}"
    );

    c.start_all();
    std::fs::write(c.primary.mnt.join("disk.img"), vec![7u8; 256 << 10]).unwrap();
    c.wait_converged();
    let line = wait_for(&c, &pstate, &[], 0);
    assert!(line.starts_with("REPLICAFS OK - primary normal"), "{line}");
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("| lag_seconds="), "perfdata: {line}");
    let (rc, rline, _) = check(&rstate, &[]);
    assert_eq!(rc, 0, "replica: {rline}");
    assert!(text_status(&pstate).starts_with("health normal"));
    let j = status(&pstate).unwrap();
    assert_eq!(j["health"]["state"], "normal", "{j}");

    // Arguments a check cannot use are "unknown", never "critical".
    let (rc, out, err) = check(&pstate, &["--warn-lag", "soonish"]);
    assert_eq!(rc, 3, "{out}{err}");
    assert!(err.contains("not a duration"), "{err}");
    let (rc, out, _) = check(&pstate, &["--warn-lag", "10m", "--crit-lag", "5m"]);
    assert_eq!(rc, 3, "{out}");
    assert!(out.contains("above the critical lag"), "{out}");

    // The replica goes down: warning, it is not connected.
    c.replicas[0].daemon.stop();
    let line = wait_for(&c, &pstate, &["--warn-lag", "1h", "--crit-lag", "2h"], 1);
    assert!(
        line.starts_with("REPLICAFS WARNING") && line.contains("not connected"),
        "{line}"
    );
    let j = status(&pstate).unwrap();
    assert_eq!(j["health"]["state"], "warning", "{j}");
    assert!(text_status(&pstate).starts_with("health warning"));
    // A replica with no daemon: unknown.
    assert_eq!(check(&rstate, &[]).0, 3);

    // Writes nobody receives: once older than the critical lag, critical.
    std::fs::write(c.primary.mnt.join("late.img"), vec![9u8; 64 << 10]).unwrap();
    sync_path(&c.primary.mnt);
    let line = wait_for(&c, &pstate, &["--warn-lag", "1s", "--crit-lag", "2s"], 2);
    assert!(
        line.starts_with("REPLICAFS CRITICAL") && line.contains("lag"),
        "{line}"
    );
    // Judged on the same snapshot with looser thresholds, only the
    // disconnection is left.
    assert_eq!(
        check(&pstate, &["--warn-lag", "1h", "--crit-lag", "2h"]).0,
        1
    );

    // Back up and caught up: ok again.
    c.replicas[0].daemon.start();
    c.wait_converged();
    wait_for(&c, &pstate, &["--warn-lag", "1s", "--crit-lag", "2s"], 0);

    // The primary stops: unknown.
    c.primary.daemon.stop();
    let (rc, line, _) = check(&pstate, &[]);
    assert_eq!(rc, 3, "{line}");
}
