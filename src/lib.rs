//! replicafs: a FUSE mount for VM disk images whose every change is journaled and
//! replicated to peers. See `docs/ARCHITECTURE.md` for the map of the modules.

pub mod assets;
pub mod config;
pub mod demo;
pub mod error;
pub mod fuse;
pub mod health;
pub mod journal;
pub mod metrics;
pub mod mount;
pub mod path;
pub mod protocol;
pub mod replica;
pub mod service;
pub mod transport;
pub mod volume;
