//! HAProxy as a peer: started in the load balancer's namespace, in TCP mode with the
//! defaults every section shares; the caller stops it (its pid is returned).

use lb_tests::{lab::Lab, netns::ChildOutput};

/// Starts HAProxy with `proxies` (its frontend and backend sections) after the shared TCP
/// defaults, and waits until it listens on `port`. `tag` names the configuration file, which
/// is gone again once HAProxy has read it.
pub fn start(lab: &Lab, tag: &str, proxies: &str, port: u16) -> anyhow::Result<u32> {
    let cfg = std::env::temp_dir().join(format!("{}-haproxy-{tag}.cfg", lab.id));
    std::fs::write(
        &cfg,
        format!(
            "global\n maxconn 4000\ndefaults\n mode tcp\n timeout connect 2s\n timeout client 30s\n timeout server 30s\n{proxies}"
        ),
    )?;
    let started = lab
        .lb
        .spawn(&["haproxy", "-db", "-f", cfg.to_str().unwrap_or_default()], ChildOutput::Discard)
        .and_then(|pid| lab.lb.wait_listening(port, "haproxy").map(|()| pid));
    let _ = std::fs::remove_file(&cfg);
    started
}
