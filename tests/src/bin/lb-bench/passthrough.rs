//! TLS passthrough against a direct connection and HAProxy (TCP mode, `req.ssl_sni`
//! routing) on the same lab, in the same run: download and upload throughput of one TLS
//! connection, and new TLS connections per second (handshake, a small exchange, close) from
//! several client threads. Real TLS on both ends (rustls); every transfer's hash is checked.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_tests::{
    config,
    daemon::LabDaemon,
    lab::{self, Lab},
    tls::{TlsServer, block, client_config, exchange, make_cert, repeated_hash, server_config},
};

const VIP: Ipv4Addr = lab::TLS_VIP_V4;
const SOCKMAP_PORT: u16 = 443;
const SPLICE_PORT: u16 = 8443;
const BACKEND_PORT: u16 = 9443;
const NAME: &str = "bulk.example.com";
/// Client threads opening connections in the connection-rate runs.
const CONNECTORS: usize = 4;

#[derive(Debug, serde::Serialize)]
struct Row {
    path: &'static str,
    download_mib_s: f64,
    upload_mib_s: f64,
    connections_per_sec: f64,
    /// New connections that failed (counted, not fatal: the rate counts the others).
    failed_connections: u64,
}

pub fn run(quick: bool) -> anyhow::Result<serde_json::Value> {
    let secs: u64 = if quick { 2 } else { 5 };
    let bytes: usize = if quick { 256 << 20 } else { 1 << 30 };
    let lab = Lab::create(1).context("building the lab")?;
    lab.lb.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
    // Receive offload on the load balancer's interfaces, as a NIC has it (veth's is off): the
    // socket-map relay moves what arrives skb by skb, so without GRO it moves one segment at
    // a time (splice batches by itself). Every path runs with it.
    for dev in [lab::LB_FRONT_IF, lab::LB_BACK_IF] {
        lab.lb.exec(&["ethtool", "-K", dev, "gro", "on"])?;
    }
    let backend = SocketAddr::from((lab.backends[0].v4, BACKEND_PORT));
    let dir = std::env::temp_dir().join(format!("{}-bench-certs", lab.id));
    let cert = make_cert(&dir, "bench-backend", &[NAME])?;
    let _server = TlsServer::start(&lab.backends[0].ns, backend, server_config(&cert)?)?;
    let client = client_config(&cert)?;
    let mut rows = Vec::new();

    let toml = [
        lab::lab_config(1, &[]),
        config::pool("tls", &[(lab.backends[0].v4, format!("port = {BACKEND_PORT}"))]),
        config::tls_passthrough_service(
            "tls",
            VIP,
            SOCKMAP_PORT,
            "tls",
            &format!("unknown_sni = \"reject\"\n{}", config::tls_route(NAME, "tls")),
        ),
        config::tls_passthrough_service(
            "tls-splice",
            VIP,
            SPLICE_PORT,
            "tls",
            "relay = \"splice\"\n",
        ),
    ]
    .concat();
    let daemon = LabDaemon::start(&lab, &toml);
    for (path, target) in [
        ("direct to the backend", backend),
        ("lbd passthrough (sockmap)", SocketAddr::from((VIP, SOCKMAP_PORT))),
        ("lbd passthrough (splice)", SocketAddr::from((VIP, SPLICE_PORT))),
    ] {
        rows.push(measure(&lab, path, target, &client, bytes, secs)?);
    }
    daemon.finish();
    let haproxy = start_haproxy(&lab, backend)?;
    rows.push(measure(
        &lab,
        "HAProxy (TCP, req.ssl_sni)",
        SocketAddr::from((VIP, SOCKMAP_PORT)),
        &client,
        bytes,
        secs,
    )?);
    if let Some(mut child) = lab.lb.take_child(haproxy) {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);

    let direct = &rows[0];
    let mut t = format!(
        "{:<30} {:>14} {:>12} {:>14} {:>7} {:>10}\n",
        "path", "download MiB/s", "upload MiB/s", "new conn/s", "failed", "vs direct"
    );
    for r in &rows {
        let _ = writeln!(
            t,
            "{:<30} {:>14.0} {:>12.0} {:>14.0} {:>7} {:>9.2}x",
            r.path,
            r.download_mib_s,
            r.upload_mib_s,
            r.connections_per_sec,
            r.failed_connections,
            r.download_mib_s / direct.download_mib_s
        );
    }
    println!(
        "\nTLS passthrough: one connection moving {} MiB each way; new connections from {CONNECTORS} threads for {secs} s (\"vs direct\": download):\n\n{t}",
        bytes >> 20
    );
    Ok(serde_json::json!({ "bytes": bytes, "seconds": secs, "paths": rows }))
}

/// Throughput both ways over one connection, then the connection rate, through `target`.
fn measure(
    lab: &Lab,
    path: &'static str,
    target: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    bytes: usize,
    secs: u64,
) -> anyhow::Result<Row> {
    let mib = |n: usize, t: Duration| n as f64 / f64::from(1 << 20) / t.as_secs_f64();
    let timed = |upload: usize, download: usize| -> anyhow::Result<Duration> {
        let config = client.clone();
        let started = Instant::now();
        let got = lab.client.enter(move || exchange(config, target, NAME, upload, download))??;
        let elapsed = started.elapsed();
        if got.upload_hash != repeated_hash(&block(1), upload)
            || got.downloaded != download
            || got.download_hash != repeated_hash(&block(2), download)
        {
            bail!("{path}: a transfer arrived changed");
        }
        Ok(elapsed)
    };
    let download = mib(bytes, timed(0, bytes)?);
    let upload = mib(bytes, timed(bytes, 0)?);
    let (connections, failed) = connection_rate(lab, target, client, secs)?;
    if failed > 0 {
        eprintln!("  {path}: {failed} new connections failed (see docs/benchmarks.md)");
    }
    Ok(Row {
        path,
        download_mib_s: download,
        upload_mib_s: upload,
        connections_per_sec: connections,
        failed_connections: failed,
    })
}

/// New TLS connections per second, and how many failed: each thread connects, exchanges a
/// few bytes and closes, again and again. The rate counts the exchanges done within `secs`
/// (a failing one may take the client's 30 s read timeout to end).
fn connection_rate(
    lab: &Lab,
    target: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    secs: u64,
) -> anyhow::Result<(f64, u64)> {
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let (d, f, s) = (done.clone(), failed.clone(), stop.clone());
    let config = client.clone();
    lab.client
        .enter(move || {
            std::thread::scope(|scope| {
                for _ in 0..CONNECTORS {
                    let (d, f, s, config) = (&d, &f, &s, config.clone());
                    scope.spawn(move || {
                        while !s.load(Ordering::Relaxed) {
                            match exchange(config.clone(), target, NAME, 16, 16) {
                                Ok(_) => d.fetch_add(1, Ordering::Relaxed),
                                Err(_) => f.fetch_add(1, Ordering::Relaxed),
                            };
                        }
                    });
                }
                std::thread::sleep(Duration::from_secs(secs));
                s.store(true, Ordering::Relaxed);
                (d.load(Ordering::Relaxed), started.elapsed())
            })
        })
        .map(|(within, elapsed)| {
            (within as f64 / elapsed.as_secs_f64(), failed.load(Ordering::Relaxed))
        })
}

/// HAProxy in TCP mode on the service address, routing by `req.ssl_sni` after waiting for
/// the hello (`tcp-request inspect-delay`).
fn start_haproxy(lab: &Lab, backend: SocketAddr) -> anyhow::Result<u32> {
    let proxies = format!(
        "frontend tls\n bind {VIP}:{SOCKMAP_PORT}\n tcp-request inspect-delay 5s\n tcp-request content accept if {{ req_ssl_hello_type 1 }}\n use_backend bulk if {{ req.ssl_sni -i {NAME} }}\n\
         backend bulk\n server b0 {backend}\n"
    );
    crate::haproxy::start(lab, "tls", &proxies, SOCKMAP_PORT)
}
