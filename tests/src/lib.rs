//! Test support shared by every end-to-end test and by `cargo xtask run`'s lab: a packet
//! builder, network namespaces, the lab topology, lbd's configuration tables, lbd as the tests
//! run it, a spoofed SYN flood, and the privilege gate.

pub mod config;
pub mod daemon;
pub mod flood;
pub mod lab;
pub mod netns;
pub mod packet;
pub mod privileged;
pub mod testrun;
pub mod tls;
