//! Segment files: append-only files of journal frames, named by the sequence
//! number of their first record. Payload bytes live here (sled only indexes them),
//! and a segment is deleted whole once every record in it is trimmed.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::record::{self, FrameError, FrameHeader, HEADER_LEN, Record};

pub fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("seg-{first_seq:020}.log"))
}

/// Segments in `dir`, oldest first, as (first seq, path).
pub fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(num) = name
            .strip_prefix("seg-")
            .and_then(|n| n.strip_suffix(".log"))
            && let Ok(first) = num.parse::<u64>()
        {
            out.push((first, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// fsync of a directory, so that a created or removed file name is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Page cache a segment keeps behind its end. The journal writes each byte
/// once and reads little back (a shipper that keeps up reads the newest
/// frames), so the rest is written back and dropped: the journal must not fill
/// the host's page cache, least of all behind an O_DIRECT writer.
pub const CACHE_WINDOW: u64 = 8 << 20;
/// Writeback is started in steps of at least this much.
const WRITEBACK_STEP: u64 = 1 << 20;

fn sync_file_range(file: &File, offset: u64, len: u64, flags: u32) -> io::Result<()> {
    // SAFETY: a plain syscall on an open descriptor.
    let r = unsafe { libc::sync_file_range(file.as_raw_fd(), offset as i64, len as i64, flags) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `offset..offset+len` back (len 0: to the end) and drops it from
/// the page cache. Not a durability step (no metadata, no cache flush); an
/// error is a writeback error the next fdatasync may no longer report, so the
/// caller must count it as a failed sync.
pub fn drop_cached(file: &File, offset: u64, len: u64) -> io::Result<()> {
    sync_file_range(
        file,
        offset,
        len,
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER,
    )?;
    // SAFETY: as above; advice only.
    unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            offset as i64,
            len as i64,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    Ok(())
}

/// The segment being appended to.
#[derive(Debug)]
pub struct ActiveSegment {
    pub first_seq: u64,
    pub path: PathBuf,
    file: File,
    pub len: u64,
    /// Writeback was started for everything before this offset.
    flushing_to: u64,
    /// Everything before this offset was dropped from the page cache.
    dropped_to: u64,
}

impl ActiveSegment {
    pub fn create(dir: &Path, first_seq: u64) -> io::Result<ActiveSegment> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = segment_path(dir, first_seq);
        // Private: frames are shipped to replicas as they are.
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&path)?;
        Ok(ActiveSegment {
            first_seq,
            path,
            file,
            len: 0,
            flushing_to: 0,
            dropped_to: 0,
        })
    }

    /// Reopens an existing segment for appending after `valid_len` bytes (a torn
    /// tail beyond it is cut off).
    pub fn reopen(path: PathBuf, first_seq: u64, valid_len: u64) -> io::Result<ActiveSegment> {
        let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
        file.set_len(valid_len)?;
        file.seek(SeekFrom::Start(valid_len))?;
        Ok(ActiveSegment {
            first_seq,
            path,
            file,
            len: valid_len,
            flushing_to: 0,
            dropped_to: 0,
        })
    }

    pub fn append(&mut self, bytes: &[u8]) -> io::Result<u64> {
        let at = self.len;
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(at)
    }

    /// Appends whole frames with writev, no copy into one buffer.
    pub fn append_vectored(&mut self, frames: &[Vec<u8>]) -> io::Result<()> {
        for chunk in frames.chunks(1024) {
            let total: usize = chunk.iter().map(|f| f.len()).sum();
            let mut written = 0usize;
            while written < total {
                // Rebuild the slices past what is already written.
                let mut skip = written;
                let mut slices = Vec::with_capacity(chunk.len());
                for f in chunk {
                    if skip >= f.len() {
                        skip -= f.len();
                        continue;
                    }
                    slices.push(std::io::IoSlice::new(&f[skip..]));
                    skip = 0;
                }
                let n = self.file.write_vectored(&slices)?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "segment write returned 0",
                    ));
                }
                written += n;
            }
            self.len += total as u64;
        }
        Ok(())
    }

    pub fn into_file(self) -> File {
        self.file
    }

    /// Starts writeback of what was appended and drops from the page cache
    /// what lies more than [`CACHE_WINDOW`] behind the end (see [`drop_cached`]
    /// for what an error means).
    pub fn shed_cache(&mut self) -> io::Result<()> {
        if self.len >= self.flushing_to + WRITEBACK_STEP {
            sync_file_range(
                &self.file,
                self.flushing_to,
                self.len - self.flushing_to,
                libc::SYNC_FILE_RANGE_WRITE,
            )?;
            self.flushing_to = self.len;
        }
        let target = self.len.saturating_sub(CACHE_WINDOW) & !(WRITEBACK_STEP - 1);
        if target > self.dropped_to {
            drop_cached(&self.file, self.dropped_to, target - self.dropped_to)?;
            self.dropped_to = target;
        }
        Ok(())
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// After a failed append: drops whatever part of it reached the file, so
    /// the segment ends with its last whole frame again.
    pub fn cut_to_len(&mut self) -> io::Result<()> {
        self.flushing_to = self.flushing_to.min(self.len);
        self.dropped_to = self.dropped_to.min(self.len);
        self.file.set_len(self.len)?;
        self.file.seek(SeekFrom::Start(self.len))?;
        Ok(())
    }
}

/// Reads one frame at a known place.
pub fn read_frame(path: &Path, offset: u64, len: u32) -> io::Result<Record> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; len as usize];
    file.read_exact_at(&mut buf, offset)?;
    record::decode_frame(&buf).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One frame found by a scan.
#[derive(Debug, Clone, Copy)]
pub struct ScannedFrame {
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub data_len: u32,
}

/// What a scan of a segment found.
#[derive(Debug, Default)]
pub struct Scan {
    pub frames: Vec<ScannedFrame>,
    /// Bytes up to the end of the last good frame.
    pub valid_len: u64,
    /// Why the scan stopped before the end of the file, if it did.
    pub stopped: Option<FrameError>,
}

/// Walks a segment frame by frame. With `verify`, every checksum is checked
/// (needed for a tail that may be torn); otherwise only headers are read.
pub fn scan(path: &Path, verify: bool) -> io::Result<Scan> {
    let file = File::open(path)?;
    let total = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut out = Scan::default();
    let mut offset = 0u64;
    let mut header = [0u8; HEADER_LEN];
    let mut body = Vec::new();
    let mut prev_seq: Option<u64> = None;
    while offset < total {
        if total - offset < HEADER_LEN as u64 {
            out.stopped = Some(FrameError::Truncated(
                (HEADER_LEN as u64 - (total - offset)) as usize,
            ));
            break;
        }
        reader.read_exact(&mut header)?;
        let h = match FrameHeader::parse(&header) {
            Ok(h) => h,
            Err(e) => {
                out.stopped = Some(e);
                break;
            }
        };
        let rest = h.frame_len() - HEADER_LEN;
        if total - offset < h.frame_len() as u64 {
            out.stopped = Some(FrameError::Truncated(
                (h.frame_len() as u64 - (total - offset)) as usize,
            ));
            break;
        }
        if prev_seq.is_some_and(|p| h.seq != p + 1) {
            // Sequence numbers in a segment are consecutive; a gap means garbage.
            out.stopped = Some(FrameError::Checksum);
            break;
        }
        if verify {
            body.clear();
            body.extend_from_slice(&header);
            body.resize(h.frame_len(), 0);
            reader.read_exact(&mut body[HEADER_LEN..])?;
            if let Err(e) = record::decode_frame(&body) {
                out.stopped = Some(e);
                break;
            }
        } else {
            reader.seek_relative(rest as i64)?;
        }
        out.frames.push(ScannedFrame {
            seq: h.seq,
            offset,
            len: h.frame_len() as u32,
            data_len: h.data_len,
        });
        prev_seq = Some(h.seq);
        offset += h.frame_len() as u64;
        out.valid_len = offset;
    }
    Ok(out)
}

/// The ops of a segment with their payload lengths, payloads skipped (what the
/// cap needs to mark dropped records dirty), stopping at the first bad frame.
pub fn read_ops(path: &Path) -> io::Result<Vec<(u64, super::record::Op, u64)>> {
    let file = File::open(path)?;
    let total = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut header = [0u8; HEADER_LEN];
    let mut op = Vec::new();
    while total - offset >= HEADER_LEN as u64 {
        reader.read_exact(&mut header)?;
        let Ok(h) = FrameHeader::parse(&header) else {
            break;
        };
        if total - offset < h.frame_len() as u64 {
            break;
        }
        op.resize(h.op_len as usize, 0);
        reader.read_exact(&mut op)?;
        reader.seek_relative(h.data_len as i64)?;
        let Ok(decoded) = postcard::from_bytes(&op) else {
            break;
        };
        out.push((h.seq, decoded, h.data_len as u64));
        offset += h.frame_len() as u64;
    }
    Ok(out)
}
