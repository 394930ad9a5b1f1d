//! `lab`: what `cargo xtask run` starts without arguments. Builds the lab (client, load
//! balancer, three backends), runs `lbd` on the load balancer's interfaces, prints the command
//! that reaches the service, and removes everything on Ctrl-C.

use std::{
    io::Write as _,
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use lb_tests::lab::{self, Lab};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("lab: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        // The terminal closed (an SSH session lost): lbd takes SIGHUP as a reload and stays,
        // so the lab must stop it and clean up rather than die and leave it running.
        libc::signal(libc::SIGHUP, on_signal as *const () as libc::sighandler_t);
    }
    // A lab killed with SIGKILL leaves its namespaces behind; the interactive lab clears
    // such leftovers of earlier labs (tests touch only the namespaces they create).
    lb_tests::netns::cleanup_stale();
    let lab = Lab::create(3).context("failed to build the lab")?;
    let config_path = std::env::temp_dir().join(format!("{}-lbd.toml", lab.id));
    let certs = std::env::temp_dir().join(format!("{}-certs", lab.id));
    let tls = lab::add_tls_passthrough(&lab, &certs).context("failed to start TLS backends")?;
    std::fs::write(&config_path, format!("{}{tls}", lab::lab_config(3, &[])))
        .context("failed to write the lab's lbd config")?;
    let pid =
        lb_tests::daemon::spawn_lbd(&lab.lb, &config_path, lb_tests::netns::ChildOutput::Inherit)?;
    let mut daemon = lab.lb.take_child(pid).context("lbd child vanished")?;

    let client = lab.client.name();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "\nlab {} is up: client, load balancer, {} backends.",
        lab.id,
        lab.backends.len()
    )?;
    writeln!(out, "lbd runs in namespace {} on interfaces front and back.\n", lab.lb.name())?;
    writeln!(out, "Reach the service through the load balancer (NAT; run it a few times):\n")?;
    writeln!(out, "    ip netns exec {client} curl http://{}/\n", lab::VIP_V4)?;
    writeln!(
        out,
        "Also: http://[{}]/ (NAT, IPv6), http://{}/ and http://[{}]/ (direct server return),",
        lab::VIP_V6,
        lab::DSR_VIP_V4,
        lab::DSR_VIP_V6
    )?;
    writeln!(out, "and UDP port {} on each service address.\n", lab::UDP_PORT)?;
    writeln!(
        out,
        "TLS passthrough, routed by server name (www.example.com goes to backend-1 alone; the\n\
         certificate curl prints is the backend's own):\n"
    )?;
    writeln!(
        out,
        "    ip netns exec {client} curl -vk --resolve www.example.com:443:{0} https://www.example.com/\n\
         \x20   ip netns exec {client} curl -vk --resolve api.example.com:443:{0} https://api.example.com/\n",
        lab::TLS_VIP_V4
    )?;
    writeln!(out, "lbd logs its counters every 2 s below. Ctrl-C removes the lab.\n")?;
    drop(out);

    let status = loop {
        if let Some(status) = daemon.try_wait()? {
            // A Ctrl-C reaches lbd and this process together; give ours time to land.
            std::thread::sleep(Duration::from_millis(300));
            if STOP.load(Ordering::SeqCst) {
                break None;
            }
            break Some(status);
        }
        if STOP.load(Ordering::SeqCst) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // Not `eprintln!`, which panics when the terminal is gone (after a SIGHUP).
    let say = |text: &str| {
        let _ = writeln!(std::io::stderr(), "lab: {text}");
    };
    let code = if let Some(status) = status {
        say(&format!("lbd exited ({status}); removing the lab"));
        ExitCode::FAILURE
    } else {
        // The terminal's Ctrl-C reached lbd too; signal it anyway in case it came by kill.
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(i32::try_from(daemon.id())?, libc::SIGINT) };
        let _ = daemon.wait();
        say("removing the lab");
        ExitCode::SUCCESS
    };
    drop(lab);
    let _ = std::fs::remove_file(&config_path);
    let _ = std::fs::remove_dir_all(&certs);
    Ok(code)
}
