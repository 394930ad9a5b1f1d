//! Types, constants and pure logic shared by `lb-ebpf` (kernel) and `lb-userspace` (daemon).
//!
//! Everything here is `no_std` and free of BPF helpers so that `cargo test -p lb-common` runs
//! the very code the kernel runs. Map keys and values are `#[repr(C)]` without implicit padding:
//! the kernel compares keys byte for byte.
#![no_std]
// Map types zero their explicit padding in public `_pad` fields (the kernel compares keys as
// raw bytes), by the house convention.
#![allow(clippy::pub_underscore_fields)]

#[cfg(any(feature = "user", test))]
extern crate std;

pub mod conntrack;
pub mod csum;
pub mod firewall;
pub mod flow;
pub mod flowcache;
pub mod maglev;
pub mod maps;
pub mod net;
pub mod passthrough;
pub mod reason;
pub mod service;
pub mod stats;

pub use flow::FlowKey;
pub use reason::{Action, Reason};
pub use stats::Counter;
