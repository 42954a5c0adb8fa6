//! Open file and directory handles, in a sharded table so that requests on
//! different handles never contend on one lock.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use super::inode::Inode;
use crate::error::{Error, Result};

const SHARDS: usize = 64;

#[derive(Debug)]
pub struct OpenFile {
    pub inode: Arc<Inode>,
    pub file: File,
    /// The flags the caller opened with (before we adjusted them for the backing open).
    pub flags: i32,
}

impl OpenFile {
    pub fn writable(&self) -> bool {
        self.flags & libc::O_ACCMODE != libc::O_RDONLY
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
