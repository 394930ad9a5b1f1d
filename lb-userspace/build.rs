//! Builds the XDP object (`lb-ebpf`) for the BPF target and places it in `OUT_DIR`, where
//! `datapath.rs` embeds it.
//!
//! The BPF toolchain (nightly `rust-src`, `bpf-linker`) is installed by `cargo xtask`; a bare
//! `cargo build` on a machine without it fails here, naming the command that failed.
//!
//! The nested cargo runs with code-generation flags of our own (aya-build's builder fixes
//! them): `allows-misaligned-mem-access` lets LLVM read a header's 2- and 4-byte fields with
//! one load each instead of byte by byte (header structs have alignment 1, and a packet's
//! IP header starts 14 bytes in). The kernel allows misaligned packet and map-value access
//! on the architectures that run this (x86-64, arm64: no `BPF_F_STRICT_ALIGNMENT`). It
//! refuses misaligned *stack* access, and LLVM now merges neighbouring stack stores into
//! wider ones wherever it likes (a 2-byte store at fp-3 in the relay program, once): the
//! test `every_program_passes_the_verifier` loads every program and names the refused one;
//! the fix is to build such a stack value with volatile stores, one per field (see
//! `lb-ebpf/src/passthrough.rs`), or to keep it in per-CPU scratch memory.
//! ALU32 (`-Ctarget-cpu=v3`) stays off: the verifier refuses its 32-bit moves of packet
//! pointers.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

const TARGET: &str = "bpfel-unknown-none";
const PACKAGE: &str = "lb-ebpf";
/// The program binary's name (`[[bin]]` in lb-ebpf's Cargo.toml).
const BINARY: &str = "lb";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=LB_EBPF_TOOLCHAIN");
    let toolchain = std::env::var("LB_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly".to_owned());
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").context("OUT_DIR not set")?);
    let ebpf_dir = Path::new(&manifest_dir).join("../lb-ebpf");
    // The build-dependency on lb-ebpf covers its library and lb-common; its binary's
    // sources need this.
    println!("cargo:rerun-if-changed={}", ebpf_dir.display());
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    // The maps' layouts are shared with the host as plain memory: the BPF target's byte
    // order must be the host's, and only little-endian hosts are built and tested.
    if std::env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() != Ok("little") {
        bail!("lb-ebpf is built for {TARGET}: big-endian hosts are not supported");
    }
    let target_dir = nested_target_dir(&out_dir, &ebpf_dir);
    // Held across the nested build and the copy out of it: another outer build sharing the
    // directory (a debug and a release build at once) re-links the object meanwhile.
    std::fs::create_dir_all(&target_dir)
        .with_context(|| format!("creating {}", target_dir.display()))?;
    let lock = std::fs::File::create(target_dir.join("lb-userspace-build.lock"))
        .context("creating the nested build's lock file")?;
    lock.lock().context("locking the nested build's directory")?;
    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".to_owned(),
        "-Clink-arg=--btf".to_owned(),
        "-Ctarget-feature=+allows-misaligned-mem-access".to_owned(),
    ]
    .join("\x1f");
    let mut cargo = Command::new("rustup");
    cargo
        .args(["run", &toolchain, "cargo", "build", "--package", PACKAGE, "--bins", "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .current_dir(&ebpf_dir)
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        // The outer build's compiler and wrappers are the host toolchain's, not nightly's.
        .env_remove("RUSTC")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CARGO_BUILD_RUSTC")
        .env_remove("CARGO_BUILD_RUSTC_WRAPPER")
        .env_remove("CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTFLAGS")
        // A build script's stdout is read by cargo as instructions: the nested cargo's
        // stdout goes to stderr, which cargo shows when the build fails; its stderr is read
        // here (see `forward_warnings`).
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::piped());
    let mut child = cargo.spawn().with_context(|| {
        format!(
            "running {cargo:?} failed; run `cargo xtask build` to install the BPF toolchain \
             (rustup, nightly with rust-src, bpf-linker)"
        )
    })?;
    let messages: Vec<String> = child
        .stderr
        .take()
        .map(|stderr| BufReader::new(stderr).lines().map_while(Result::ok).collect())
        .unwrap_or_default();
    let status = child.wait().with_context(|| format!("waiting for {cargo:?}"))?;
    if status.success() {
        forward_warnings(&messages);
    } else {
        for line in &messages {
            eprintln!("{line}");
        }
        bail!(
            "building the XDP object failed ({status}): {cargo:?}; if the BPF toolchain is \
             missing, `cargo xtask build` installs it"
        );
    }
    let built = target_dir.join(TARGET).join("release").join(BINARY);
    std::fs::copy(&built, out_dir.join(BINARY))
        .with_context(|| format!("copying {} to {}", built.display(), out_dir.display()))?;
    Ok(())
}

/// The nested build's target directory: a directory of its own (the outer cargo holds a
/// lock on its target directory), one per outer target directory and source tree,
/// `<target>/lb-ebpf-<hash of the sources' path>` (`<target>/<triple>/…` with `--target`),
/// shared by the outer profiles and by clippy's builds, each of which runs this script
/// with an `OUT_DIR` of its own (`<target>/<profile>/build/lb-userspace-<hash>/out`):
/// the object is built once, not once per profile. Two checkouts sharing a target
/// directory get one each. Under `OUT_DIR` if that is laid out otherwise.
fn nested_target_dir(out_dir: &Path, sources: &Path) -> PathBuf {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::hash::DefaultHasher::new();
    sources.hash(&mut hasher);
    let mut up = out_dir.ancestors();
    match (up.nth(2), up.nth(1)) {
        (Some(build), Some(target)) if build.file_name() == Some("build".as_ref()) => {
            target.join(format!("lb-ebpf-{:016x}", hasher.finish()))
        }
        _ => out_dir.join("ebpf-target"),
    }
}

/// Shows the nested build's warnings (rustc's, and LLVM's: one naming a target feature it
/// does not know would mean the object was built without it) as cargo warnings, each with
/// the lines rustc renders under it; progress lines, cargo's per-crate counts and rustc's
/// notice that `allows-misaligned-mem-access` is an unstable feature (every build says so)
/// stay hidden.
fn forward_warnings(messages: &[String]) {
    const KNOWN: &str = "warning: unstable feature specified for `-Ctarget-feature`";
    let mut show = false;
    for line in messages {
        let trimmed = line.trim_start();
        let continues = trimmed.starts_with('|')
            || trimmed.starts_with("-->")
            || trimmed.starts_with('=')
            || trimmed.split_once(" |").is_some_and(|(n, _)| n.parse::<u32>().is_ok());
        if line.starts_with("warning") {
            show = !line.starts_with(KNOWN) && !line.contains(" generated ");
        } else if !continues {
            show = false;
        }
        if show {
            println!("cargo:warning={line}");
        }
    }
}
