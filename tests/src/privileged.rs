//! The gate in front of every privileged test: run when the machine allows, say clearly why
//! not otherwise, and never skip in CI.

/// Whether the privileged test `name` can run here. Returns `false` (after printing why) when
/// it cannot and this is not CI; panics with the reason in CI (`CI=true`), where privileged
/// tests must run.
#[must_use]
pub fn require_privileges(name: &str) -> bool {
    let Some(reason) = missing_privilege() else {
        return true;
    };
    assert!(!in_ci(), "{name}: privileged test cannot run in CI: {reason}");
    eprintln!("SKIPPED {name}: {reason} (run `cargo xtask test` as root on Linux)");
    false
}

/// Whether this is a CI run (`CI=true` or `CI=1`), where nothing may skip.
#[must_use]
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

fn missing_privilege() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (CAP_NET_ADMIN and CAP_BPF)".to_owned());
    }
    if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Some("kernel without BTF (/sys/kernel/btf/vmlinux missing)".to_owned());
    }
    None
}
