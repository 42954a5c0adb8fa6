//! Open file and directory handles, in a sharded table so that requests on
//! different handles never contend on one lock.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::inode::Inode;
use super::sys;
use crate::error::{Error, Result};

const SHARDS: usize = 64;

#[derive(Debug)]
pub struct OpenFile {
    pub inode: Arc<Inode>,
    pub file: File,
    /// For an O_DIRECT open: a second backing descriptor with O_DIRECT, so that
    /// the caller's I/O bypasses the host's page cache as it asked. `file` stays
    /// buffered for requests that O_DIRECT cannot take (unaligned offset or length).
    pub direct: Option<File>,
    /// The flags the caller opened with (before we adjusted them for the backing open).
    pub flags: i32,
}

/// Offset and length alignment tried with O_DIRECT; a device that needs more
/// answers EINVAL and the request goes through the buffered descriptor.
const DIO_ALIGN: u64 = 512;
/// Memory alignment of the bounce buffer (FUSE hands us unaligned buffers).
const MEM_ALIGN: usize = 4096;

/// A page-aligned buffer, reused per thread for O_DIRECT bounces.
struct Bounce {
    ptr: *mut u8,
    cap: usize,
}

impl Bounce {
    const fn empty() -> Bounce {
        Bounce {
            ptr: std::ptr::null_mut(),
            cap: 0,
        }
    }

    /// At least `len` bytes, page aligned; None if memory is short.
    fn get(&mut self, len: usize) -> Option<&mut [u8]> {
        if self.cap < len {
            self.release();
            let cap = len.next_multiple_of(MEM_ALIGN);
            let layout = std::alloc::Layout::from_size_align(cap, MEM_ALIGN).ok()?;
            // SAFETY: the layout has a non-zero size.
            let ptr = unsafe { std::alloc::alloc(layout) };
            if ptr.is_null() {
                return None;
            }
            self.ptr = ptr;
            self.cap = cap;
        }
        // SAFETY: ptr is valid for cap >= len bytes, owned by this thread.
        Some(unsafe { std::slice::from_raw_parts_mut(self.ptr, len) })
    }

    fn release(&mut self) {
        if !self.ptr.is_null() {
            // SAFETY: allocated in get() with this layout.
            unsafe {
                std::alloc::dealloc(
                    self.ptr,
                    std::alloc::Layout::from_size_align_unchecked(self.cap, MEM_ALIGN),
                )
            };
            self.ptr = std::ptr::null_mut();
            self.cap = 0;
        }
    }
}

impl Drop for Bounce {
    fn drop(&mut self) {
        self.release();
    }
}

thread_local! {
    static BOUNCE: RefCell<Bounce> = const { RefCell::new(Bounce::empty()) };
}

fn dio_aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(DIO_ALIGN) && (len as u64).is_multiple_of(DIO_ALIGN) && len > 0
}

impl OpenFile {
    pub fn writable(&self) -> bool {
        self.flags & libc::O_ACCMODE != libc::O_RDONLY
    }

    /// Writes all of `data` at `offset`: with O_DIRECT (through an aligned
    /// bounce buffer) when the handle is direct and the request aligned.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let mut done = 0;
        if let Some(d) = &self.direct
            && dio_aligned(offset, data.len())
        {
            let direct = BOUNCE.with(|b| -> Result<Option<usize>> {
                let mut b = b.borrow_mut();
                let Some(buf) = b.get(data.len()) else {
                    return Ok(None);
                };
                buf.copy_from_slice(data);
                let mut done = 0;
                while done < buf.len() {
                    match sys::pwrite(d.as_raw_fd(), &buf[done..], offset + done as u64) {
                        Ok(0) => return Err(Error::EIO),
                        // A short write can leave the rest unaligned: the buffered
                        // descriptor finishes it.
                        Ok(n) if n % DIO_ALIGN as usize != 0 => return Ok(Some(done + n)),
                        Ok(n) => done += n,
                        // The device wants a coarser alignment than we tried.
                        Err(e) if e.errno() == libc::EINVAL => return Ok(Some(done)),
                        Err(e) => return Err(e),
                    }
                }
                Ok(Some(done))
            })?;
            done = direct.unwrap_or(0);
        }
        while done < data.len() {
            let n = sys::pwrite(self.file.as_raw_fd(), &data[done..], offset + done as u64)?;
            if n == 0 {
                return Err(Error::EIO);
            }
            done += n;
        }
        Ok(())
    }

    /// Reads up to `size` bytes at `offset` (fewer only at end of file), with
    /// O_DIRECT when the handle is direct and the request aligned.
    pub fn read_at(&self, offset: u64, size: u32) -> Result<Vec<u8>> {
        let size = size as usize;
        if let Some(d) = &self.direct
            && dio_aligned(offset, size)
        {
            let direct = BOUNCE.with(|b| -> Result<Option<Vec<u8>>> {
                let mut b = b.borrow_mut();
                let Some(buf) = b.get(size) else {
                    return Ok(None);
                };
                let mut done = 0;
                while done < size {
                    match sys::pread(d.as_raw_fd(), &mut buf[done..], offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => {
                            done += n;
                            if n % DIO_ALIGN as usize != 0 {
                                // End of file inside a block.
                                break;
                            }
                        }
                        Err(e) if e.errno() == libc::EINVAL && done == 0 => return Ok(None),
                        Err(e) => return Err(e),
                    }
                }
                Ok(Some(buf[..done].to_vec()))
            })?;
            if let Some(v) = direct {
                return Ok(v);
            }
        }
        let mut buf = vec![0u8; size];
        let mut done = 0;
        while done < buf.len() {
            let n = sys::pread(
                self.file.as_raw_fd(),
                &mut buf[done..],
                offset + done as u64,
            )?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    }
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: OsString,
    /// Backing inode number (reported to readdir when the kernel has no inode yet).
    pub backing_ino: u64,
    pub file_type: u32,
}

#[derive(Debug)]
pub struct OpenDir {
    pub inode: Arc<Inode>,
    /// Entries read at the first readdir at offset 0; offsets index into it.
    pub entries: Mutex<Option<Arc<Vec<DirEntry>>>>,
}

#[derive(Debug, Clone)]
pub enum Handle {
    File(Arc<OpenFile>),
    Dir(Arc<OpenDir>),
}

pub struct HandleTable {
    shards: Vec<RwLock<HashMap<u64, Handle>>>,
    next: AtomicU64,
}

impl Default for HandleTable {
    fn default() -> Self {
        HandleTable {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            next: AtomicU64::new(1),
        }
    }
}

impl HandleTable {
    fn shard(&self, fh: u64) -> &RwLock<HashMap<u64, Handle>> {
        &self.shards[(fh as usize) % SHARDS]
    }

    pub fn insert(&self, handle: Handle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed);
        self.shard(fh)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(fh, handle);
        fh
    }

    fn get(&self, fh: u64) -> Result<Handle> {
        self.shard(fh)
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(Error::EBADF)
    }

    pub fn file(&self, fh: u64) -> Result<Arc<OpenFile>> {
        match self.get(fh)? {
            Handle::File(f) => Ok(f),
            Handle::Dir(_) => Err(Error::from_errno(libc::EISDIR)),
        }
    }

    pub fn dir(&self, fh: u64) -> Result<Arc<OpenDir>> {
        match self.get(fh)? {
            Handle::Dir(d) => Ok(d),
            Handle::File(_) => Err(Error::ENOTDIR),
        }
    }

    pub fn remove(&self, fh: u64) -> Option<Handle> {
        self.shard(fh)
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&fh)
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
