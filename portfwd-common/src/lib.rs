//! Shared between portfwd's kernel programs (`portfwd-ebpf`) and its daemon (`portfwd`):
//! the one source of truth for map names, map key/value layouts, capacities, counter
//! reasons, and the pure packet logic (checksums) that both sides must agree on.
//!
//! Byte order: every address and port stored in a map is kept in **network order**, as a
//! private byte array behind typed accessors, so neither side can confuse the two orders.
//! Every map key has explicit, zeroed padding: hash maps compare keys byte by byte.
#![no_std]
#![warn(missing_docs)]

#[cfg(test)]
extern crate std;

pub mod addr;
pub mod csum;
#[cfg(feature = "user")]
pub mod host;
pub mod kctx;
pub mod maps;
/// Host side only: the kernel programs are what it models.
#[cfg(not(target_arch = "bpf"))]
pub mod model;
pub mod nat64;
pub mod packet;
pub mod reason;
pub mod reply_cache;
pub mod rule_cache;
pub mod rules;

pub use maps::*;
pub use reason::Reason;

/// IANA protocol numbers of the transports portfwd translates.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}
