//! libvirt on a live replicafs mount, for real: the example `dir` pool
//! (examples/libvirt-pool.xml) is defined on a primary's mount with a running
//! libvirtd (tests/libvirt/setup.sh starts it); qcow2 and raw volumes are
//! created and cloned with virsh and listed; a TCG guest (type 'qemu', direct
//! kernel boot) runs from a raw volume of the pool, reads what the host wrote
//! and writes its own line; the replica then holds every volume, byte for byte.

mod repl_common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use repl_common::*;

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args)
        .output()
        .expect("virsh (tests/libvirt/setup.sh installs libvirt)");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn virsh_quiet(args: &[&str]) {
    let _ = Command::new("virsh")
        .arg("-c")
        .arg("qemu:///system")
        .args(args)
        .output();
}

/// Takes the pool and the domain down on drop (before the mount goes).
struct Libvirt {
    pool: String,
    domain: String,
}

impl Drop for Libvirt {
    fn drop(&mut self) {
        virsh_quiet(&["destroy", &self.domain]);
        virsh_quiet(&["undefine", &self.domain]);
        virsh_quiet(&["pool-destroy", &self.pool]);
        virsh_quiet(&["pool-undefine", &self.pool]);
    }
}

fn guest_kernel() -> (PathBuf, PathBuf) {
    let cache =
        std::env::var("POWERCUT_CACHE").unwrap_or_else(|_| "/var/cache/replicafs-powercut".into());
    let kdir = PathBuf::from(cache).join("kernel");
    let vmlinuz = std::fs::read_dir(kdir.join("boot"))
        .expect("guest kernel (tests/powercut/setup.sh fetches it)")
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("vmlinuz-")
        })
        .expect("vmlinuz-*");
    (kdir, vmlinuz)
}

#[test]
fn libvirt_dir_pool_volumes_and_a_guest_on_the_mount_reach_the_replica() {
    let mut c = Cluster::new(1, &["--allow-other"]);
    // The guest's QEMU runs as libvirt-qemu: it must reach the mount.
    std::fs::set_permissions(c.base.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    c.start_all();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tag = format!("replicafs-test-{}", std::process::id());
    let lv = Libvirt {
        pool: tag.clone(),
        domain: format!("{tag}-guest"),
    };

    // The example pool, pointed at this mount.
    let xml = std::fs::read_to_string(root.join("examples/libvirt-pool.xml"))
        .unwrap()
        .replace(
            "<name>replicafs</name>",
            &format!("<name>{}</name>", lv.pool),
        )
        .replace("/srv/vm", &c.primary.mnt.display().to_string());
    let pool_xml = c.base.path().join("pool.xml");
    std::fs::write(&pool_xml, xml).unwrap();
    virsh(&["pool-define", pool_xml.to_str().unwrap()]);
    virsh(&["pool-start", &lv.pool]);

    virsh(&[
        "vol-create-as",
        &lv.pool,
        "base.qcow2",
        "64M",
        "--format",
        "qcow2",
    ]);
    virsh(&[
        "vol-create-as",
        &lv.pool,
        "disk.raw",
        "16M",
        "--format",
        "raw",
    ]);
    virsh(&["vol-clone", "base.qcow2", "clone.qcow2", "--pool", &lv.pool]);
    // The host writes a marker at the start of the raw disk, then clones it.
    let marker = b"REPLICAFS-HOST-MARKER-0123456789";
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(c.primary.mnt.join("disk.raw"))
            .unwrap();
        f.write_all_at(marker, 0).unwrap();
        f.sync_all().unwrap();
    }
    virsh(&["vol-clone", "disk.raw", "clone.raw", "--pool", &lv.pool]);
    virsh(&["pool-refresh", &lv.pool]);
    let list = virsh(&["vol-list", &lv.pool]);
    for v in ["base.qcow2", "clone.qcow2", "disk.raw", "clone.raw"] {
        assert!(list.contains(v), "{v} not in vol-list:\n{list}");
    }
    let info = virsh(&["vol-dumpxml", "clone.qcow2", "--pool", &lv.pool]);
    assert!(info.contains("<format type='qcow2'/>"), "{info}");

    // A TCG guest boots from the pool's raw volume.
    let (kdir, vmlinuz) = guest_kernel();
    let guest = c.base.path().join("guest");
    std::fs::create_dir_all(&guest).unwrap();
    std::fs::set_permissions(&guest, std::fs::Permissions::from_mode(0o777)).unwrap();
    let initrd = guest.join("initrd.cpio");
    let st = Command::new("bash")
        .arg(root.join("tests/libvirt/initrd.sh"))
        .arg(&initrd)
        .arg(&kdir)
        .status()
        .unwrap();
    assert!(st.success(), "initrd.sh failed");
    let kernel = guest.join("vmlinuz");
    std::fs::copy(&vmlinuz, &kernel).unwrap();
    let console = guest.join("console.log");
    let dom = format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features>
    <acpi/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='raw'/>
      <source pool='{pool}' volume='disk.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>",
        name = lv.domain,
        kernel = kernel.display(),
        initrd = initrd.display(),
        pool = lv.pool,
        console = console.display(),
    );
    let dom_xml = guest.join("domain.xml");
    std::fs::write(&dom_xml, dom).unwrap();
    virsh(&["define", dom_xml.to_str().unwrap()]);
    virsh(&["start", &lv.domain]);
    let start = Instant::now();
    loop {
        let state = virsh(&["domstate", &lv.domain]);
        if state.trim() == "shut off" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "the guest did not power off; console:\n{}",
            std::fs::read_to_string(&console).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = std::fs::read_to_string(&console).unwrap_or_default();
    assert!(
        log.contains(&format!("GUEST READ: {}", String::from_utf8_lossy(marker))),
        "the guest did not read the host's marker:\n{log}"
    );
    assert!(log.contains("GUEST DONE"), "{log}");
    let disk = std::fs::read(c.primary.mnt.join("disk.raw")).unwrap();
    assert_eq!(&disk[1 << 20..(1 << 20) + 16], b"GUEST-WROTE-THIS");

    // Everything the pool holds is on the replica, byte for byte.
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
    let mirror_disk = std::fs::read(c.replicas[0].mirror.join("disk.raw")).unwrap();
    assert_eq!(&mirror_disk[..marker.len()], marker);
    assert_eq!(
        &mirror_disk[1 << 20..(1 << 20) + 16],
        b"GUEST-WROTE-THIS",
        "the guest's write is not on the replica"
    );
    let out = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(c.replicas[0].mirror.join("clone.qcow2"))
        .output()
        .unwrap();
    let info = String::from_utf8_lossy(&out.stdout);
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");
    drop(lv);
}
