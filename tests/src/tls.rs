//! Real TLS parts for the passthrough tests and bench: certificates made by the `openssl`
//! command, `openssl s_server` backends and `openssl s_client` clients, each in a namespace.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

use crate::netns::{ChildOutput, Netns, run_cmd, wait_for};

/// A certificate and its private key, PEM files.
#[derive(Clone, Debug)]
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A self-signed P-256 certificate for `cn`, valid for the DNS `names`, written to `dir`.
pub fn make_cert(dir: &Path, cn: &str, names: &[&str]) -> anyhow::Result<Cert> {
    std::fs::create_dir_all(dir)?;
    let cert = dir.join(format!("{cn}.crt"));
    let key = dir.join(format!("{cn}.key"));
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-nodes", "-days", "2", "-subj", &format!("/CN={cn}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert);
    if !san.is_empty() {
        cmd.args(["-addext", &format!("subjectAltName={}", san.join(","))]);
    }
    run_cmd(&mut cmd).context("openssl req")?;
    Ok(Cert { cert, key })
}

/// Starts `openssl s_server` answering HTTP (`-www`) on `port` (both families) in `ns`, and
/// waits until it listens. Returns its pid.
pub fn s_server(ns: &Netns, port: u16, cert: &Cert) -> anyhow::Result<u32> {
    let pid = ns.spawn(
        &[
            "openssl".as_ref(),
            "s_server".as_ref(),
            "-quiet".as_ref(),
            "-www".as_ref(),
            "-accept".as_ref(),
            port.to_string().as_ref(),
            "-cert".as_ref(),
            cert.cert.as_os_str(),
            "-key".as_ref(),
            cert.key.as_os_str(),
        ],
        ChildOutput::Discard,
    )?;
    let up = wait_for(Duration::from_secs(10), || {
        let out = ns.exec(&["ss", "-Htln", "sport", "=", &format!(":{port}")]).ok()?;
        (!out.trim().is_empty()).then_some(())
    });
    if up.is_none() {
        bail!("openssl s_server on port {port} in {} did not start", ns.name());
    }
    Ok(pid)
}

/// Connects with `openssl s_client` from `ns` to `target`, sending `server_name` as SNI (or
/// none), and returns the common name of the certificate the server presented; `None` when
/// no handshake completed.
pub fn s_client_peer(ns: &Netns, target: SocketAddr, server_name: Option<&str>) -> Option<String> {
    let connect = target.to_string();
    let mut args = vec!["timeout", "10", "openssl", "s_client", "-connect", &connect];
    match server_name {
        Some(name) => args.extend(["-servername", name]),
        None => args.push("-noservername"),
    }
    let out = ns.exec_output(&args).ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let subject = text.lines().find_map(|l| l.strip_prefix("subject=CN = "))?;
    Some(subject.trim().to_owned())
}
