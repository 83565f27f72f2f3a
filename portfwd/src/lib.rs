//! portfwd: in-kernel port forwarding for container hosts.
//!
//! The library behind the `portfwd` daemon and `portfwd-ctl`: the dataplane (kernel
//! programs and maps), the rule model and its validation, the declarations file and its
//! Compose import, and the control protocol.

#![warn(missing_docs)]

pub mod compose;
pub mod daemon;
pub mod dataplane;
pub mod declfile;
pub mod expand;
pub mod flows;
pub mod metrics;
pub mod netinfo;
pub mod pin;
pub mod protocol;
pub mod report;
pub mod rule;
pub mod service;
pub mod state;
pub mod trace;
