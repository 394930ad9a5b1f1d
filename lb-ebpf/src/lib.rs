//! Host-side stub of the `lb-ebpf` crate; the programs live in the `lb` binary (`main.rs`),
//! built for the BPF target by `lb-userspace`'s build script.
#![no_std]
