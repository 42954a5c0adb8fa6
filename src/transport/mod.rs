//! Moving the protocol over the network: QUIC endpoints (quinn), node identity
//! and pinned mutual TLS, the primary's sender, the replica's server, and the
//! status socket.

pub mod catchup;
pub mod io;
pub mod server;
pub mod shipper;
pub mod status;
pub mod tls;
