//! replicafs: a FUSE mount for VM disk images whose every change is journaled and
//! replicated to peers. See `docs/ARCHITECTURE.md` for the map of the modules.

pub mod config;
pub mod demo;
pub mod error;
pub mod fuse;
pub mod journal;
pub mod mount;
pub mod path;
pub mod primary;
pub mod protocol;
pub mod replica;
pub mod transport;
pub mod volume;
