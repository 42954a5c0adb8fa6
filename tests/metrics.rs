//! The Prometheus endpoint of live daemons: a real primary mount and replica
//! on loopback are scraped over HTTP, the output goes through `promtool check
//! metrics` and a parser, and the values must move with the writes. Also the
//! service plumbing: bad or busy metrics addresses, READY for systemd only
//! once the mount is live or the listener bound, journald-style log lines.

mod repl_common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use repl_common::*;

/// The port a daemon's log says its metrics listen on.
fn metrics_addr(d: &Daemon) -> String {
    let start = Instant::now();
    loop {
        let log = d.log_text();
        if let Some(line) = log.lines().find(|l| l.contains("metrics listening")) {
            let addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .expect("addr= in the metrics line");
            return addr.to_string();
        }
        assert!(start.elapsed() < DEADLINE, "no metrics line in:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// GET `path`; returns (status line, headers, body).
fn http_get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).expect("read the answer");
    let (head, body) = all.split_once("\r\n\r\n").expect("http head");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// Every sample: `name{labels}` -> value. Panics on a line that is not one
/// (so a malformed exposition fails even without promtool's opinion).
fn parse(body: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in body.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series and value");
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(
            out.insert(series.to_string(), v).is_none(),
            "duplicate series {series}"
        );
    }
    out
}

/// The one sample of family `name` whose series contains `label` (or has no labels).
fn value(m: &BTreeMap<String, f64>, name: &str, label: &str) -> f64 {
    let hits: Vec<(&String, &f64)> = m
        .iter()
        .filter(|(k, _)| {
            (k.as_str() == name || k.starts_with(&format!("{name}{{"))) && k.contains(label)
        })
        .collect();
    assert_eq!(hits.len(), 1, "{name} with {label:?}: {hits:?}");
    *hits[0].1
}

fn promtool_check(body: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; tests/run.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn scrape(addr: &str) -> (String, BTreeMap<String, f64>) {
    let (status, headers, body) = http_get(addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains("text/plain; version=0.0.4"),
        "content type: {headers}"
    );
    promtool_check(&body);
    let m = parse(&body);
    (body, m)
}

const FAMILIES: &[&str] = &[
    "replicafs_info",
    "replicafs_last_seq",
    "replicafs_health_status",
    "replicafs_health_info",
    "replicafs_peer_connected",
    "replicafs_peer_state",
    "replicafs_peer_lag_seconds",
    "replicafs_peer_lag_bytes",
    "replicafs_peer_lag_records",
    "replicafs_peer_sent_seq",
    "replicafs_peer_received_seq",
    "replicafs_peer_applied_seq",
    "replicafs_peer_throughput_bytes_per_second",
    "replicafs_peer_wire_bytes_total",
    "replicafs_peer_payload_bytes_total",
    "replicafs_errors_total",
];

const PRIMARY_FAMILIES: &[&str] = &[
    "replicafs_journal_bytes",
    "replicafs_journal_cap_bytes",
    "replicafs_journal_records",
    "replicafs_journal_appended_payload_bytes_total",
    "replicafs_dirty_bytes",
    "replicafs_dirty_regions",
];

fn has_family(body: &str, name: &str) -> bool {
    body.lines()
        .any(|l| l == format!("# TYPE {name} gauge") || l == format!("# TYPE {name} counter"))
        && body
            .lines()
            .any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
}

fn write_mib(path: &Path, fill: u8) {
    std::fs::write(path, vec![fill; 1 << 20]).unwrap();
    sync_path(path.parent().unwrap());
}

#[test]
fn live_daemons_export_metrics_that_move_with_writes() {
    let mut c = Cluster::new(1, &["--metrics-listen", "127.0.0.1:0"]);
    c.replicas[0]
        .daemon
        .args
        .extend(["--metrics-listen".to_string(), "127.0.0.1:0".to_string()]);
    c.start_all();
    let paddr = metrics_addr(&c.primary.daemon);
    let raddr = metrics_addr(&c.replicas[0].daemon);

    write_mib(&c.primary.mnt.join("disk1.img"), 1);
    c.wait_converged();
    let (body, p1) = scrape(&paddr);
    for f in FAMILIES.iter().chain(PRIMARY_FAMILIES) {
        assert!(has_family(&body, f), "primary lacks {f}:\n{body}");
    }
    let peer = format!("peer=\"127.0.0.1:{}\"", c.replicas[0].port);
    let last1 = value(&p1, "replicafs_last_seq", "");
    let applied1 = value(&p1, "replicafs_peer_applied_seq", &peer);
    assert!(last1 > 0.0);
    assert_eq!(applied1, last1, "converged, so applied = last");
    assert_eq!(value(&p1, "replicafs_peer_lag_records", &peer), 0.0);
    assert_eq!(value(&p1, "replicafs_peer_connected", &peer), 1.0);
    assert_eq!(
        value(&p1, "replicafs_peer_state", "state=\"replicating\""),
        1.0
    );
    assert_eq!(value(&p1, "replicafs_health_status", ""), 0.0);
    assert_eq!(value(&p1, "replicafs_health_info", "state=\"normal\""), 1.0);
    let payload1 = value(&p1, "replicafs_peer_payload_bytes_total", &peer);
    assert!(payload1 >= (1 << 20) as f64, "payload {payload1}");
    assert!(value(&p1, "replicafs_peer_wire_bytes_total", &peer) > 0.0);
    // Write bytes may stay in the backing file (journal.payload = "backing"):
    // the journal holds at least the records.
    assert!(value(&p1, "replicafs_journal_bytes", "") > 0.0);
    assert_eq!(
        value(&p1, "replicafs_journal_cap_bytes", ""),
        (8u64 << 30) as f64
    );
    assert!(value(&p1, "replicafs_info", "role=\"primary\"") == 1.0);

    // The same snapshot as `replicafs status`: health and seqs agree.
    let st = status(&c.primary.daemon.state).expect("status");
    assert_eq!(st["health"]["state"], "normal", "{st}");
    assert!(st["journal"]["cap_bytes"].as_u64() == Some(8 << 30), "{st}");

    // The replica's own endpoint.
    let (rbody, r1) = scrape(&raddr);
    for f in FAMILIES {
        assert!(has_family(&rbody, f), "replica lacks {f}:\n{rbody}");
    }
    assert!(value(&r1, "replicafs_info", "role=\"replica\"") == 1.0);
    assert_eq!(value(&r1, "replicafs_peer_applied_seq", ""), applied1);
    assert_eq!(value(&r1, "replicafs_peer_refused_records_total", ""), 0.0);

    // More writes: the seqs and byte counters grow.
    write_mib(&c.primary.mnt.join("disk2.img"), 2);
    c.wait_converged();
    let (_, p2) = scrape(&paddr);
    let applied2 = value(&p2, "replicafs_peer_applied_seq", &peer);
    assert!(applied2 > applied1, "applied {applied1} -> {applied2}");
    assert_eq!(applied2, value(&p2, "replicafs_last_seq", ""));
    let payload2 = value(&p2, "replicafs_peer_payload_bytes_total", &peer);
    assert!(
        payload2 >= payload1 + (1 << 20) as f64,
        "payload {payload1} -> {payload2}"
    );
    assert!(
        value(&p2, "replicafs_journal_appended_payload_bytes_total", "")
            >= value(&p1, "replicafs_journal_appended_payload_bytes_total", "")
    );
    let (_, r2) = scrape(&raddr);
    assert_eq!(value(&r2, "replicafs_peer_applied_seq", ""), applied2);

    // Anything but /metrics is not found.
    let (st404, _, _) = http_get(&paddr, "/nope");
    assert!(st404.contains("404"), "{st404}");
}

fn run_to_exit(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("{args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn busy_or_bad_metrics_addresses_fail_clearly() {
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let (backing, mnt) = (base.path().join("b"), base.path().join("m"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = held.local_addr().unwrap().to_string();
    let (b, m) = (backing.to_str().unwrap(), mnt.to_str().unwrap());
    let out = run_to_exit(&["mount", b, m, "--metrics-listen", &busy]);
    lazy_umount(&mnt);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a busy port: {err}");
    assert!(
        err.contains("already in use") && err.contains(&busy),
        "{err}"
    );
    assert!(
        !is_mounted(&mnt),
        "mounted although the metrics port was busy"
    );

    for bad in ["nonsense", "127.0.0.1", "localhost:9108", "127.0.0.1:70000"] {
        let out = run_to_exit(&["mount", b, m, "--metrics-listen", bad]);
        lazy_umount(&mnt);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad} accepted");
        assert!(err.contains("not IP:PORT"), "{bad}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // The same refusal from the config file.
    let config = base.path().join("c.toml");
    std::fs::write(&config, "metrics_listen = \"nowhere\"\n").unwrap();
    let out = run_to_exit(&["mount", b, m, "--config", config.to_str().unwrap()]);
    lazy_umount(&mnt);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("metrics_listen"),
        "{err}"
    );
}

/// A child that is stopped (SIGTERM, then SIGKILL) and whose mount is
/// lazily unmounted on drop, whatever happened.
struct Guard(std::process::Child, Option<std::path::PathBuf>);

impl Guard {
    fn stop(&mut self) {
        let _ = unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while matches!(self.0.try_wait(), Ok(None)) {
            if start.elapsed() > Duration::from_secs(30) {
                let _ = self.0.kill();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(m) = &self.1 {
            lazy_umount(m);
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts `args` as systemd would for Type=notify, and returns (child, log
/// path, the first notification) once one came.
fn start_notified(
    base: &Path,
    name: &str,
    args: &[String],
    mnt: Option<&Path>,
) -> (Guard, std::path::PathBuf, String) {
    let sock_path = base.join(format!("{name}.notify"));
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let log = base.join(format!("{name}.log"));
    let child = Command::new(BIN)
        .args(args)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
        .env("REPLICAFS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let child = Guard(child, mnt.map(Path::to_path_buf));
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).unwrap_or_else(|e| {
        panic!(
            "no notification from {name}: {e}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    });
    (child, log, String::from_utf8_lossy(&buf[..n]).to_string())
}

/// Whether `line` holds an RFC 3339 timestamp (2026-01-02T03:04:...).
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    let d = |i: usize| b.get(i).is_some_and(|c| c.is_ascii_digit());
    (0..b.len()).any(|i| {
        (0..4).all(|k| d(i + k))
            && b.get(i + 4) == Some(&b'-')
            && d(i + 5)
            && d(i + 6)
            && b.get(i + 7) == Some(&b'-')
            && d(i + 8)
            && d(i + 9)
            && b.get(i + 10) == Some(&b'T')
    })
}

/// Under systemd: no timestamp of our own (journald adds one), no colours.
fn no_timestamps(log: &str) {
    assert!(!log.is_empty());
    assert!(has_timestamp("x 2026-12-04T21:40:00.1Z INFO"));
    for line in log.lines() {
        assert!(!has_timestamp(line), "a timestamp under systemd: {line:?}");
        assert!(
            !line.contains('\u{1b}'),
            "colour codes under systemd: {line:?}"
        );
    }
}

#[test]
fn ready_for_systemd_only_when_serving_and_logs_without_timestamps() {
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let b = base.path();
    let (rstate, mirror) = (b.join("rstate"), b.join("mirror"));
    let (backing, mnt) = (b.join("backing"), b.join("mnt"));
    for d in [&rstate, &mirror, &backing, &mnt] {
        std::fs::create_dir_all(d).unwrap();
    }
    keygen(&rstate);
    let port = free_udp_port();
    let listen = format!("127.0.0.1:{port}");
    let fp = "ab".repeat(32);
    let s = |p: &Path| p.display().to_string();
    let (mut replica, rlog, note) = start_notified(
        b,
        "replica",
        &[
            "replica".into(),
            "--mirror".into(),
            s(&mirror),
            "--listen".into(),
            listen.clone(),
            "--state-dir".into(),
            s(&rstate),
            "--trust".into(),
            fp,
        ],
        None,
    );
    let bound = std::net::UdpSocket::bind(&listen).is_err();
    replica.stop();
    assert!(note.contains("READY=1"), "{note}");
    assert!(bound, "READY before the listener was bound");
    no_timestamps(&std::fs::read_to_string(&rlog).unwrap());

    let (mut mount, mlog, note) = start_notified(
        b,
        "mount",
        &["mount".into(), s(&backing), s(&mnt)],
        Some(&mnt),
    );
    let live = is_mounted(&mnt);
    mount.stop();
    assert!(note.contains("READY=1"), "{note}");
    assert!(live, "READY before the mount was live");
    let log = std::fs::read_to_string(&mlog).unwrap();
    assert!(log.contains("mounted"), "{log}");
    no_timestamps(&log);
}
