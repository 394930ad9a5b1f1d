//! `cargo xtask lint`: formatting, clippy (host crates and the BPF crate for its own target)
//! with warnings denied, and the rule that every `.rs` file opens with a `//!` line.

use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::{cargo, run_status, setup::Env, workspace_root};

pub fn run(env: &Env) -> anyhow::Result<()> {
    let root = workspace_root()?;
    run_status(cargo(env).args(["fmt", "--all", "--check"]))?;
    run_status(cargo(env).args([
        "clippy",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let toolchain = env
        .vars
        .iter()
        .find(|(k, _)| k == "LB_EBPF_TOOLCHAIN")
        .map_or("nightly", |(_, v)| v.as_str());
    // The BPF crate only builds for its own target, with the toolchain that builds it.
    crate::setup::ensure_component(toolchain, "clippy")?;
    let mut bpf = std::process::Command::new("rustup");
    bpf.current_dir(&root)
        .env_remove("RUSTC")
        .env_remove("CARGO")
        .envs(env.vars.iter().map(|(k, v)| (k, v)))
        .args(["run", toolchain, "cargo", "clippy", "--package", "lb-ebpf"])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core", "--release"])
        .args(["--", "-D", "warnings"]);
    run_status(&mut bpf)?;
    check_doc_headers(&root)
}

/// Every Rust file says what it owns in its first line.
fn check_doc_headers(root: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for dir in ["lb-common", "lb-ebpf", "lb-userspace", "tests", "xtask"] {
        collect_rs(&root.join(dir), &mut files);
    }
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| std::fs::read_to_string(f).map_or(true, |text| !text.starts_with("//!")))
        .map(|f| f.strip_prefix(root).unwrap_or(f).display().to_string())
        .collect();
    if !offenders.is_empty() {
        bail!(
            "these files do not start with a `//!` line saying what they own:\n  {}",
            offenders.join("\n  ")
        );
    }
    println!("doc headers: {} files ok", files.len());
    Ok(())
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}
