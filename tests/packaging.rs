//! The Debian package, for real: `packaging/build-deb.sh` builds it with
//! cargo-deb (from the test build's binary), dpkg installs it, the installed
//! `replicafs --version` runs, `systemd-analyze verify` passes the installed
//! units without a complaint, a unit's ExecStart with a missing or broken
//! config fails naming the file (and line), and dpkg removes every file again.

use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 2] = ["replicafs-mount@.service", "replicafs-replica@.service"];

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e} (tests/run.sh installs what is missing)"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", "replicafs"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Purges the package on drop, whatever happened.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file("/etc/replicafs/broken.toml");
        let _ = Command::new("dpkg").args(["--purge", "replicafs"]).output();
    }
}

fn files_of(deb: &Path) -> Vec<String> {
    let out = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches('.').to_string())
        .collect()
}

#[test]
fn deb_builds_installs_verifies_and_removes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    assert!(
        !installed(),
        "a replicafs package is installed already: this test installs and removes its own"
    );
    let out_dir = tempfile::tempdir().unwrap();
    // The binary this test run built (target/debug): no second build.
    run(Command::new("bash")
        .arg(root.join("packaging/build-deb.sh"))
        .arg("--output")
        .arg(out_dir.path())
        .env("PROFILE", "dev")
        .env("SKIP_BUILD", "1")
        .current_dir(root));
    let debs: Vec<PathBuf> = std::fs::read_dir(out_dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "{debs:?}");
    let deb = &debs[0];

    let files = files_of(deb);
    let mut want = vec![
        "/usr/bin/replicafs".to_string(),
        "/etc/replicafs/README".to_string(),
        "/usr/share/doc/replicafs/README.md".to_string(),
        "/usr/share/doc/replicafs/examples/replicafs.toml".to_string(),
        "/usr/share/doc/replicafs/examples/vm.toml".to_string(),
        "/usr/share/doc/replicafs/examples/vm-replica.toml".to_string(),
        "/usr/share/bash-completion/completions/replicafs".to_string(),
        "/usr/share/zsh/vendor-completions/_replicafs".to_string(),
        "/usr/share/fish/vendor_completions.d/replicafs.fish".to_string(),
    ];
    for u in UNITS {
        want.push(format!("/lib/systemd/system/{u}"));
    }
    for page in [
        "replicafs",
        "replicafs-mount",
        "replicafs-replica",
        "replicafs-status",
        "replicafs-keygen",
        "replicafs-journal-stats",
    ] {
        want.push(format!("/usr/share/man/man1/{page}.1.gz"));
    }
    for w in &want {
        assert!(files.contains(w), "{w} not in the package: {files:?}");
    }

    let _guard = Installed;
    run(Command::new("dpkg").arg("-i").arg(deb));
    assert!(installed(), "dpkg does not list replicafs as installed");

    let out = run(Command::new("/usr/bin/replicafs").arg("--version"));
    let v = String::from_utf8_lossy(&out.stdout);
    assert_eq!(v.trim(), format!("replicafs {}", env!("CARGO_PKG_VERSION")));

    // The installed man page and completion are well formed.
    let out = run(Command::new("man").args(["-P", "cat", "replicafs-status"]));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("--check"),
        "man replicafs-status lacks --check"
    );
    run(Command::new("bash")
        .arg("-n")
        .arg("/usr/share/bash-completion/completions/replicafs"));

    // Instances of the installed templates, as systemd would load them; a
    // complaint on stderr (an unknown key, a bad value) fails too.
    let out = run(Command::new("systemd-analyze")
        .args([
            "verify",
            "replicafs-mount@vm.service",
            "replicafs-replica@vm.service",
        ])
        .current_dir("/"));
    let complaints =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        complaints.trim().is_empty(),
        "systemd-analyze verify: {complaints}"
    );
    for u in UNITS {
        let text = std::fs::read_to_string(format!("/lib/systemd/system/{u}")).unwrap();
        assert!(text.contains("\nType=notify\n"), "{u} is not Type=notify");
        assert!(text.contains("/etc/replicafs/%i.toml"), "{u}");
    }

    // What a unit instance does with a missing or a broken config file: its
    // ExecStart line, run with the instance name filled in.
    for (u, what) in [
        ("replicafs-mount@.service", "mount"),
        ("replicafs-replica@.service", "replica"),
    ] {
        let text = std::fs::read_to_string(format!("/lib/systemd/system/{u}")).unwrap();
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .unwrap();
        let argv = |name: &str| -> Vec<String> {
            exec.replace("%i", name)
                .split_whitespace()
                .map(str::to_string)
                .collect()
        };
        let a = argv("absent");
        let out = Command::new(&a[0]).args(&a[1..]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} started without a config");
        assert!(err.contains("/etc/replicafs/absent.toml"), "{what}: {err}");
        std::fs::write(
            "/etc/replicafs/broken.toml",
            "allow_other = true\nbogus = 1\n",
        )
        .unwrap();
        let a = argv("broken");
        let out = Command::new(&a[0]).args(&a[1..]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what} started with a broken config");
        assert!(
            err.contains("/etc/replicafs/broken.toml") && err.contains("line 2"),
            "{what}: {err}"
        );
        assert!(!err.contains("panicked"), "{err}");
        std::fs::remove_file("/etc/replicafs/broken.toml").unwrap();
    }

    run(Command::new("dpkg").args(["--purge", "replicafs"]));
    assert!(!installed());
    for w in &want {
        assert!(!Path::new(w).exists(), "{w} left behind by dpkg --purge");
    }
    assert!(
        !Path::new("/etc/replicafs").exists(),
        "/etc/replicafs left behind"
    );
}

/// The example configs the package ships parse (placeholders filled in).
#[test]
fn shipped_examples_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fp = "ab".repeat(32);
    for f in [
        "examples/replicafs.toml",
        "packaging/example.toml",
        "packaging/example-replica.toml",
    ] {
        let text = std::fs::read_to_string(root.join(f))
            .unwrap()
            .replace("REPLICA_FINGERPRINT", &fp)
            .replace("PRIMARY_FINGERPRINT", &fp);
        replicafs::config::Config::parse(&text, f).unwrap_or_else(|e| panic!("{e}"));
    }
}
