//! The primary's replication source: what the network driver
//! (`transport/shipper.rs`) sends besides journal records.
//!
//! * [`catchup`]: dirty regions read again from the backing dir and journaled
//!   as ordinary records, one chunk per [`Volume::quiet_file`] hold.
//! * [`snapshot`]: a listing of the backing dir exact at one journal seq,
//!   taken in short [`Volume::observe`] holds, then entries and data read
//!   through the descriptors it opened.
//!
//! Neither holds the volume's namespace lock exclusively across I/O: a guest
//! write waits for at most one metadata operation or one chunk read (the
//! volume side is `volume/source.rs`).
//!
//! [`Volume::quiet_file`]: crate::volume::Volume::quiet_file
//! [`Volume::observe`]: crate::volume::Volume::observe

pub mod catchup;
pub mod snapshot;
