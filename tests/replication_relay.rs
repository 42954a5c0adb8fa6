//! Replication through a userspace UDP relay that delays, drops, reorders and
//! partitions datagrams: it must converge anyway.

mod repl_common;

use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use repl_common::*;

#[derive(PartialEq, Eq)]
struct Due {
    at: Instant,
    to_back: bool,
    dest: Option<SocketAddr>,
    bytes: Vec<u8>,
}

impl Ord for Due {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.at.cmp(&self.at)
    }
}
impl PartialOrd for Due {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// A lossy, laggy, reordering UDP relay: front port → replica.
struct Relay {
    port: u16,
    partitioned: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    pub dropped: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn start(target: u16, loss_per_mille: u64, max_delay_ms: u64) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = front.local_addr().unwrap().port();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(("127.0.0.1", target)).unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let front = Arc::new(front);
        let back = Arc::new(back);
        let queue = Arc::new((Mutex::new(BinaryHeap::<Due>::new()), Condvar::new()));
        let client = Arc::new(Mutex::new(None::<SocketAddr>));
        let partitioned = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        for to_back in [true, false] {
            let (src, q, client, part, stop, dropped) = (
                if to_back { front.clone() } else { back.clone() },
                queue.clone(),
                client.clone(),
                partitioned.clone(),
                stop.clone(),
                dropped.clone(),
            );
            threads.push(std::thread::spawn(move || {
                let mut rng = Rng(if to_back { 1 } else { 2 });
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Acquire) {
                    let Ok((n, from)) = src.recv_from(&mut buf) else {
                        continue;
                    };
                    if to_back {
                        *client.lock().unwrap() = Some(from);
                    }
                    if part.load(Ordering::Acquire) || rng.below(1000) < loss_per_mille {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let delay = Duration::from_millis(rng.below(max_delay_ms + 1));
                    let dest = if to_back {
                        None
                    } else {
                        *client.lock().unwrap()
                    };
                    let (m, cv) = &*q;
                    m.lock().unwrap().push(Due {
                        at: Instant::now() + delay,
                        to_back,
                        dest,
                        bytes: buf[..n].to_vec(),
                    });
                    cv.notify_one();
                }
            }));
        }
        let (q, stop2) = (queue.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let (m, cv) = &*q;
            let mut g = m.lock().unwrap();
            while !stop2.load(Ordering::Acquire) {
                let now = Instant::now();
                match g.peek() {
                    Some(d) if d.at <= now => {
                        let d = g.pop().unwrap();
                        if d.to_back {
                            let _ = back.send(&d.bytes);
                        } else if let Some(dest) = d.dest {
                            let _ = front.send_to(&d.bytes, dest);
                        }
                    }
                    Some(d) => {
                        let wait = d.at - now;
                        g = cv.wait_timeout(g, wait).unwrap().0;
                    }
                    None => {
                        g = cv.wait_timeout(g, Duration::from_millis(20)).unwrap().0;
                    }
                }
            }
        }));
        Relay {
            port,
            partitioned,
            stop,
            dropped,
            threads,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[test]
fn replication_converges_through_delay_loss_reordering_and_a_partition() {
    // The relay is created first so that its port is known to the primary.
    let target_port = free_udp_port();
    let relay = Relay::start(target_port, 30, 15);
    let mut c = Cluster::new_via(1, &[], &[relay.port]);
    // The replica must listen where the relay forwards.
    c.replicas[0].port = target_port;
    for a in c.replicas[0].daemon.args.iter_mut() {
        if a.starts_with("127.0.0.1:") {
            *a = format!("127.0.0.1:{target_port}");
        }
    }
    c.start_all();
    let mnt = c.primary.mnt.clone();
    random_workload(&mnt, 21, 200);
    // A partition longer than the QUIC idle timeout: the connection dies and
    // the primary reconnects and resumes when it heals.
    relay.partitioned.store(true, Ordering::Release);
    random_workload(&mnt, 22, 150);
    sync_path(&mnt);
    std::thread::sleep(Duration::from_secs(12));
    relay.partitioned.store(false, Ordering::Release);
    random_workload(&mnt, 23, 150);
    c.wait_converged();
    assert_same_tree(&c.primary.backing, &c.replicas[0].mirror, &|_| false);
    assert!(relay.dropped.load(Ordering::Relaxed) > 0);
    // The partition outlived the connection: it was re-established and resumed.
    assert!(
        c.primary.daemon.log_text().matches("replicating").count() >= 2,
        "{}",
        c.logs()
    );
}
