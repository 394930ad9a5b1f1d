//! Installs what the build, the lab and the tests need, idempotently: each step checks first
//! and returns at once when its part is already present.
//!
//! - the BPF toolchain: nightly `rust-src` and `bpf-linker` 0.13 linked against the nightly
//!   toolchain's own LLVM 22 (Debian's LLVM is too old; `shared/TOOLCHAIN.md`);
//! - Debian packages the lab and the tests run (iproute2, ethtool, curl, nftables, ...);
//! - a bpffs mount at `/sys/fs/bpf`.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// How much of the machine a command needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Need {
    /// Compiling only: the BPF toolchain.
    Build,
    /// Running the daemon or the lab: root, a kernel with XDP, bpffs, iproute2.
    Run,
    /// Every test tier: all of the above plus the test tools.
    Tests,
    /// The bench: the test tools plus the peers it measures against and gnuplot.
    Bench,
}

/// Environment for cargo commands that build the BPF object.
#[derive(Debug, Default)]
pub struct Env {
    pub vars: Vec<(String, String)>,
}

/// The bpf-linker release installed; it is built against the toolchain's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the lab and the tests use, with the command that proves each is there.
/// The lab (`cargo xtask run`) needs openssl for its TLS backends, and curl is how the
/// README reaches its services.
const PACKAGES_RUN: &[(&str, &str)] =
    &[("iproute2", "ip"), ("ethtool", "ethtool"), ("openssl", "openssl"), ("curl", "curl")];
const PACKAGES_TESTS: &[(&str, &str)] = &[
    ("iputils-ping", "ping"),
    ("nftables", "nft"),
    ("procps", "sysctl"),
    ("iperf3", "iperf3"),
    ("prometheus", "prometheus"),
    ("hping3", "hping3"),
];
/// The bench's peers and tools (Debian packages), beyond the tests'.
const PACKAGES_BENCH: &[(&str, &str)] = &[
    ("haproxy", "haproxy"),
    ("wrk", "wrk"),
    ("xdp-tools", "xdp-filter"),
    ("netsniff-ng", "trafgen"),
    ("gnuplot-nox", "gnuplot"),
];

pub fn ensure_all(need: Need) -> anyhow::Result<Env> {
    if !cfg!(target_os = "linux") {
        bail!("this project needs Linux (XDP); run it on a Linux host or VM");
    }
    // Root first: the toolchain's setup takes minutes, only to be refused after.
    if need >= Need::Run {
        ensure_root()?;
    }
    let env = ensure_bpf_toolchain()?;
    if need >= Need::Run {
        ensure_kernel()?;
        let mut packages: Vec<_> = PACKAGES_RUN.to_vec();
        if need >= Need::Tests {
            packages.extend_from_slice(PACKAGES_TESTS);
        }
        if need >= Need::Bench {
            packages.extend_from_slice(PACKAGES_BENCH);
        }
        ensure_packages(&packages)?;
        ensure_bpffs()?;
    }
    Ok(env)
}

fn ensure_root() -> anyhow::Result<()> {
    let out = Command::new("id").arg("-u").output().context("failed to run `id -u`")?;
    if String::from_utf8_lossy(&out.stdout).trim() != "0" {
        // sudo resets PATH (secure_path) even with -E: cargo would not be found.
        bail!(
            "loading XDP programs and creating network namespaces needs root: run as root, \
             or `sudo -E env \"PATH=$PATH\" cargo xtask ...`"
        );
    }
    Ok(())
}

fn ensure_kernel() -> anyhow::Result<()> {
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        bail!(
            "this kernel has no BTF (/sys/kernel/btf/vmlinux); use a kernel built with \
             CONFIG_DEBUG_INFO_BTF=y (Debian 12's and most distributions' kernels are)"
        );
    }
    if !Path::new("/proc/sys/net/core/bpf_jit_enable").exists() {
        bail!("this kernel has no BPF JIT (CONFIG_BPF_JIT); XDP needs it");
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    if let Some(version) = kernel_version(&release)
        && version < (6, 0)
    {
        bail!(
            "kernel {} is too old: the data path calls the SYN-cookie helpers that came with \
             Linux 6.0",
            release.trim()
        );
    }
    Ok(())
}

/// The major and minor numbers of a kernel release string (`6.18.44-fc-v509`).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Picks the toolchain that builds the BPF object and makes sure it can.
fn ensure_bpf_toolchain() -> anyhow::Result<Env> {
    let rustup_ok = Command::new("rustup")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !rustup_ok.is_ok_and(|s| s.success()) {
        bail!("rustup is needed to build the BPF object (https://rustup.rs)");
    }
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    let mut env = Env::default();
    // Nightly is preferred (by its installed name: a dated one is not `nightly`); stable with
    // RUSTC_BOOTSTRAP builds the same object (both LLVM 22).
    let nightlies: Vec<&str> = toolchains
        .lines()
        .filter(|l| l.starts_with("nightly"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    // The undated one (kept current by `rustup update`) before any dated one.
    let dated = |t: &&str| {
        t.strip_prefix("nightly-").is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    };
    let nightly = nightlies.iter().find(|t| !dated(t)).or_else(|| nightlies.first()).copied();
    let toolchain = if let Some(nightly) = nightly {
        nightly
    } else {
        eprintln!(
            "xtask: no nightly toolchain; building the BPF object with stable + RUSTC_BOOTSTRAP"
        );
        env.vars.push(("RUSTC_BOOTSTRAP".into(), "1".into()));
        "stable"
    };
    env.vars.push(("LB_EBPF_TOOLCHAIN".into(), toolchain.into()));

    // rust-src builds `core` for the BPF target.
    ensure_component(toolchain, "rust-src")?;
    ensure_bpf_linker(toolchain)?;
    Ok(env)
}

/// Installs `component` for `toolchain` unless it is there.
pub fn ensure_component(toolchain: &str, component: &str) -> anyhow::Result<()> {
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        toolchain,
    ]))?;
    if !components.lines().any(|l| l.starts_with(component)) {
        eprintln!("xtask: installing {component} for {toolchain}");
        status(Command::new("rustup").args([
            "component",
            "add",
            component,
            "--toolchain",
            toolchain,
        ]))?;
    }
    Ok(())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo"),
        PathBuf::from,
    )
}

fn ensure_bpf_linker(toolchain: &str) -> anyhow::Result<()> {
    let linker = cargo_home().join("bin/bpf-linker");
    // `--version` also proves the binary still finds the LLVM library it was linked against.
    if let Ok(out) = Command::new(&linker).arg("--version").output()
        && out.status.success()
        && String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against the {toolchain} toolchain's LLVM (about 2 minutes)"
    );
    let sysroot =
        output(Command::new("rustc").arg(format!("+{toolchain}")).args(["--print", "sysroot"]))?;
    let lib_dir = PathBuf::from(sysroot.trim()).join("lib");
    let llvm = std::fs::read_dir(&lib_dir)
        .with_context(|| format!("failed to list {}", lib_dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libLLVM.so.22"))
        })
        .with_context(|| {
            format!(
                "no LLVM 22 library in {}; bpf-linker needs it: `rustup update` (Rust 1.95 or \
                 later ships it)",
                lib_dir.display()
            )
        })?;
    // llvm-sys looks for `<prefix>/lib/libLLVM.so`; point a private prefix at the toolchain's.
    let prefix = std::env::temp_dir().join("lb-xtask-llvm-prefix");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&llvm, &link)?;
    status(
        Command::new("cargo")
            .arg(format!("+{toolchain}"))
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION, "--locked", "--force"])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env_remove("RUSTC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env("LLVM_PREFIX", &prefix)
            .env("RUSTFLAGS", format!("-C link-arg=-Wl,-rpath,{}", lib_dir.display())),
    )
    .context("failed to build bpf-linker")?;
    Ok(())
}

fn ensure_packages(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    // A command on PATH counts whatever installed it (another distribution's package
    // manager, a build from source); dpkg's word otherwise.
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(package, command)| !on_path(command) && !is_installed(package))
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!(
            "missing packages {missing:?} and no apt-get: install them with your package manager"
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    // A mirror's hiccup must not fail a fresh machine's run: apt retries each download and
    // waits for another apt's lock, and update + install is tried three times (an `update`
    // that failed to fetch its lists still exits 0; the install then fails).
    for attempt in 1..=3 {
        match apt_install(&missing) {
            Ok(()) => break,
            Err(error) if attempt < 3 => {
                eprintln!("xtask: {error:#}; trying again");
                std::thread::sleep(std::time::Duration::from_secs(10 * attempt));
            }
            Err(error) => return Err(error),
        }
    }
    for (package, command) in packages {
        if !on_path(command) {
            bail!("{package} installed but `{command}` is not on PATH");
        }
    }
    Ok(())
}

/// One `apt-get update` and `install` of `packages`; fails unless all are installed after.
fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    const OPTIONS: [&str; 4] = ["-o", "Acquire::Retries=5", "-o", "DPkg::Lock::Timeout=300"];
    status(Command::new("apt-get").args(OPTIONS).args(["update", "-q"]))?;
    status(
        Command::new("apt-get")
            .args(OPTIONS)
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !is_installed(p)).collect();
    if !missing.is_empty() {
        bail!("apt-get did not install {}", missing.join(" "));
    }
    Ok(())
}

/// Whether `command` is on PATH.
fn on_path(command: &str) -> bool {
    output(Command::new("sh").args(["-c", &format!("command -v {command}")])).is_ok()
}

fn is_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn ensure_bpffs() -> anyhow::Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, kind) = (f.next(), f.next(), f.next());
        dir == Some("/sys/fs/bpf") && kind == Some("bpf")
    }) {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").ok();
    status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("failed to mount bpffs at /sys/fs/bpf")
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out =
        cmd.stderr(Stdio::inherit()).output().with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("failed to run {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::kernel_version;

    #[test]
    fn kernel_versions_are_read_from_release_strings() {
        assert_eq!(kernel_version("6.18.44-fc-v509\n"), Some((6, 18)));
        assert_eq!(kernel_version("5.15.0-91-generic"), Some((5, 15)));
        assert_eq!(kernel_version("6.1-rc3"), Some((6, 1)));
        assert_eq!(kernel_version("garbage"), None);
        assert!(kernel_version("5.15.0").unwrap() < (6, 0));
    }
}
