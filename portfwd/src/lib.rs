//! portfwd: in-kernel port forwarding for container hosts.
//!
//! The library behind the `portfwd` daemon and `portfwd-ctl`: the dataplane (kernel
//! programs and maps), the rule model and its validation, and the control protocol.

pub mod daemon;
pub mod dataplane;
pub mod netinfo;
pub mod protocol;
pub mod rule;
