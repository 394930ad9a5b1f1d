//! Rebuilds the BPF object when the `bpf-linker` binary changes.
//!
//! rustc links the BPF target with `bpf-linker`, an undeclared tool dependency; watching its
//! path makes cargo relink after `cargo xtask` installs a new one.

fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
