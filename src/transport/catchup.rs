//! Catch-up for what the journal cannot replay.
//!
//! Regions in the journal's dirty list (records dropped by the cap, records
//! lost when the primary died, failed journal writes) are re-read from the
//! backing dir and journaled again as ordinary `Truncate`/`Write` records, so
//! they travel in order with the stream to every peer, compressed like any
//! batch. Each chunk is read and appended under the volume's exclusive
//! namespace lock: no mutation is between its backing write and its append
//! meanwhile, so a chunk never carries bytes older than a record before it.
//!
//! A peer whose next record was dropped skips the gap (an empty batch) once a
//! catch-up pass that started after the drop has journaled the dirty regions.
//!
//! Seam: [`RegionSource`] decides what bytes of a region to send. Today it is
//! the whole region; a block-hash delta (hash 64 KiB blocks on both sides, send
//! the differing ones) plugs in here.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use crate::journal::dirty::DirtyRegion;
use crate::journal::record::Op;
use crate::volume::Volume;

/// Largest chunk journaled per lock hold.
pub const CHUNK: u64 = 1 << 20;

/// Which byte ranges of a dirty region must be sent.
pub trait RegionSource: Send + Sync {
    fn ranges(&self, region: &DirtyRegion, file_len: u64) -> Vec<(u64, u64)>;
}

/// Sends the whole region.
pub struct WholeRegions;

impl RegionSource for WholeRegions {
    fn ranges(&self, r: &DirtyRegion, file_len: u64) -> Vec<(u64, u64)> {
        let end = if r.is_whole() {
            file_len
        } else {
            r.end().min(file_len)
        };
        let start = if r.is_whole() { 0 } else { r.offset };
        if start >= end {
            vec![]
        } else {
            vec![(start, end)]
        }
    }
}

pub struct CatchUp {
    pub volume: Arc<Volume>,
    pub backing: PathBuf,
    pub source: Box<dyn RegionSource>,
}

#[derive(Debug, Default, Clone)]
pub struct PassReport {
    /// The journal's dropped_through when the pass began: every dropped
    /// record up to it is covered by records journaled by this pass.
    pub covers_dropped_through: u64,
    pub regions: usize,
    pub bytes: u64,
    pub skipped: usize,
    /// Dirty paths that are not regular files on the primary (a namespace
    /// change was lost): only a snapshot repairs a replica that missed them.
    pub lost: usize,
}

/// The regular file at dirty path `rel` beneath the backing dir (never
/// through a symlink); None when it is missing or not a regular file.
/// An error counts as "not a regular file" (the path is then repaired by a
/// snapshot), as it did before.
fn open_dirty(backing: &Path, rel: &[u8]) -> io::Result<Option<std::fs::File>> {
    match crate::path::RelPath::parse(rel) {
        Ok(p) => Ok(crate::path::open_regular_beneath(backing, &p).unwrap_or(None)),
        Err(_) => Ok(None),
    }
}

impl CatchUp {
    /// Whether the dirty list names a path that is not a regular file on the
    /// primary any more (a dropped namespace change).
    pub fn namespace_lost(&self) -> io::Result<bool> {
        let Some(rec) = self.volume.recorder() else {
            return Ok(false);
        };
        for r in rec.journal().dirty().regions().map_err(io::Error::other)? {
            if !r.is_whole() || rec.exclusions().is_excluded(&r.path) {
                continue;
            }
            if open_dirty(&self.backing, &r.path)?.is_none() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Journals the dirty regions again, about `budget` bytes at most (a
    /// region cut short stays dirty for the next pass). Blocking; run it off
    /// the async threads.
    pub fn pass(&self, budget: u64) -> io::Result<PassReport> {
        let Some(rec) = self.volume.recorder() else {
            return Ok(PassReport::default());
        };
        let journal = rec.journal();
        let mut report = PassReport {
            covers_dropped_through: journal.stats().dropped_through,
            ..Default::default()
        };
        let regions = journal.dirty().regions().map_err(io::Error::other)?;
        for region in regions {
            if report.bytes >= budget {
                break;
            }
            let excluded = rec.exclusions().is_excluded(&region.path);
            let file = if excluded {
                None
            } else {
                open_dirty(&self.backing, &region.path)?
            };
            match (excluded, file) {
                (false, Some(file)) => {
                    let (sent, rest) = self.send_file(
                        file,
                        &region,
                        budget.saturating_sub(report.bytes).max(CHUNK),
                    )?;
                    report.bytes += sent;
                    report.regions += 1;
                    if let Some((offset, len)) = rest {
                        // What is left of the region stays dirty, as a range.
                        let dirty = journal.dirty();
                        dirty.remove_covered(&region).map_err(io::Error::other)?;
                        dirty
                            .add_range(&region.path, offset, len)
                            .map_err(io::Error::other)?;
                        break;
                    }
                }
                (excluded, _) => {
                    // Gone, not a regular file, or excluded: nothing the stream
                    // can express idempotently (a full tree resync would).
                    if !excluded {
                        warn!(
                            path = %String::from_utf8_lossy(&region.path),
                            "dirty path is not a regular file on the primary; peers behind it get a snapshot"
                        );
                        report.lost += 1;
                    }
                    report.skipped += 1;
                }
            }
            journal
                .dirty()
                .remove_covered(&region)
                .map_err(io::Error::other)?;
        }
        if report.regions + report.skipped > 0 {
            info!(
                regions = report.regions,
                bytes = report.bytes,
                skipped = report.skipped,
                "catch-up pass journaled dirty regions"
            );
        }
        Ok(report)
    }

    /// Journals `region` of `path`; returns the bytes sent and, when the
    /// budget ran out first, the (offset, len) still to send.
    fn send_file(
        &self,
        file: std::fs::File,
        region: &DirtyRegion,
        budget: u64,
    ) -> io::Result<(u64, Option<(u64, u64)>)> {
        let Some(rec) = self.volume.recorder() else {
            return Ok((0, None));
        };
        let journal = rec.journal();
        let mut sent = 0u64;
        if region.is_whole() {
            use std::os::unix::fs::MetadataExt;
            let _ns = rec.namespace_lock();
            let m = file.metadata()?;
            journal.append(
                &Op::Truncate {
                    path: region.path.clone(),
                    size: m.len(),
                },
                &[],
            );
            journal.append(
                &Op::SetAttr {
                    path: region.path.clone(),
                    mode: Some(m.mode() & 0o7777),
                    uid: Some(m.uid()),
                    gid: Some(m.gid()),
                    atime: None,
                    mtime: None,
                },
                &[],
            );
            use std::os::fd::AsRawFd;
            let fd_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
            for (name, value) in crate::replica::snapshot::read_xattrs(&fd_path, true) {
                journal.append(
                    &Op::SetXattr {
                        path: region.path.clone(),
                        name,
                        value,
                        flags: 0,
                    },
                    &[],
                );
            }
        }
        let len = file.metadata()?.len();
        for (start, end) in self.source.ranges(region, len) {
            let mut at = start;
            while at < end {
                if sent >= budget {
                    return Ok((sent, Some((at, end - at))));
                }
                let n = (end - at).min(CHUNK);
                let _ns = rec.namespace_lock();
                let mut buf = vec![0u8; n as usize];
                let got = read_at_most(&file, &mut buf, at)?;
                if got == 0 {
                    break;
                }
                buf.truncate(got);
                journal.append(
                    &Op::Write {
                        path: region.path.clone(),
                        offset: at,
                    },
                    &buf,
                );
                sent += got as u64;
                at += got as u64;
            }
        }
        Ok((sent, None))
    }
}

fn read_at_most(f: &std::fs::File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}
