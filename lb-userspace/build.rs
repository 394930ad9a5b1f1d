//! Builds the XDP object (`lb-ebpf`) for the BPF target and places it in `OUT_DIR`, where
//! `datapath.rs` embeds it.
//!
//! The BPF toolchain (nightly `rust-src`, `bpf-linker`) is installed by `cargo xtask`; a bare
//! `cargo build` on a machine without it fails here with aya-build's message.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir).join("../lb-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("lb-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "lb-ebpf", root_dir: ebpf_dir, ..Default::default() }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .context("building the XDP object failed; run `cargo xtask build` to install the BPF toolchain")
}
