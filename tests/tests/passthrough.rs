//! TLS passthrough end to end: `lbd` in the lab's load-balancer namespace routes connections
//! by server name to `openssl s_server` backends (each with its own certificate) and to
//! rustls servers the test runs, for `openssl s_client` and rustls clients in the client
//! namespace. The certificate a client receives proves which backend it reached and that TLS
//! went through untouched.

#![allow(clippy::too_many_lines, reason = "an end-to-end scenario reads best top to bottom")]

use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use lb_tests::{
    config::{self, tls_passthrough_service, tls_route},
    daemon::LabDaemon,
    lab::{self, Lab, backend_v4, backend_v6},
    netns::wait_for,
    privileged::require_privileges,
    tls::{
        TlsServer, block, client_config, exchange, exchange_within, make_cert, repeated_hash,
        s_client_peer, s_server, server_config,
    },
};
use lb_userspace::passthrough::{hello::parse_client_hello, proxy_v2::PROXY_V2_SIGNATURE};

const VIP4: Ipv4Addr = lab::TLS_VIP_V4;
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 3);
const API: &str = "127.0.0.1:7070";
/// Ports: the routed service, the strict one, the PROXY-protocol one, the spliced one.
const TLS_PORT: u16 = 443;
const STRICT_PORT: u16 = 8443;
const PROXY_PORT: u16 = 7443;
const SPLICE_PORT: u16 = 9443;
/// Services on a pool where only backend 1 listens: trying the others in turn, and not.
const FAILOVER_PORT: u16 = 6443;
const ONE_ATTEMPT_PORT: u16 = 5443;
/// A service hashing the client's address alone, on a pool of three listening backends.
const STICKY_PORT: u16 = 4443;
/// Where the backends listen: `openssl s_server`, and the test's own rustls and PROXY
/// servers.
const S_SERVER_PORT: u16 = 8443;
const BULK_PORT: u16 = 9443;
const PROXY_CHECK_PORT: u16 = 7443;
/// tls-www's drain deadline: longer than a sweep interval (5 s), after which the old code
/// had forgotten a removed backend with relays alone.
const DRAIN_SECS: u64 = 8;
/// Bytes each way in the bulk transfers.
const BULK_BYTES: usize = 48 << 20;
/// Short connections in the storm through each relay: threads, and connections each.
const STORM_THREADS: usize = 4;
const STORM_CONNECTIONS: usize = 500;

fn config() -> String {
    let b = |i: usize, port: u16| (IpAddr::from(backend_v4(i)), format!("port = {port}"));
    let b6 = |i: usize, port: u16| (IpAddr::from(backend_v6(i)), format!("port = {port}"));
    let mut c = lab::lab_config_with(4, &[], "", &format!("listen = \"{API}\""));
    for (name, backends) in [
        ("tls-www", vec![b(0, S_SERVER_PORT)]),
        ("tls-wild", vec![b(1, S_SERVER_PORT)]),
        ("tls-eu", vec![b(2, S_SERVER_PORT)]),
        ("tls-default", vec![b(3, S_SERVER_PORT)]),
        ("tls-bulk", vec![b(3, BULK_PORT)]),
        ("proxy-check", vec![b(2, PROXY_CHECK_PORT)]),
        ("tls6-www", vec![b6(1, S_SERVER_PORT)]),
        ("tls6-default", vec![b6(0, S_SERVER_PORT)]),
        // Nothing listens on port 1: backends 2 and 3 refuse every connection. No health
        // check, so they stay in the pool (as a backend does until its checks fail).
        ("tls-failover", vec![b(0, S_SERVER_PORT), b(1, 1), b(2, 1)]),
        ("tls-three", vec![b(0, S_SERVER_PORT), b(1, S_SERVER_PORT), b(2, S_SERVER_PORT)]),
    ] {
        c.push_str(&config::pool(name, &backends));
    }
    // Relays to a backend removed from tls-www run on this long (see
    // `relays_of_a_removed_backend_are_cut_at_the_deadline`).
    c = c.replace(
        "[[pool]]\nname = \"tls-www\"\n",
        &format!("[[pool]]\nname = \"tls-www\"\ndrain_timeout_secs = {DRAIN_SECS}\n"),
    );
    let routes = [
        tls_route("www.example.com", "tls-www"),
        tls_route("*.example.com", "tls-wild"),
        tls_route("*.eu.example.com", "tls-eu"),
        tls_route("bulk.example.com", "tls-bulk"),
    ]
    .concat();
    c.push_str(&tls_passthrough_service("tls4", VIP4, TLS_PORT, "tls-default", &routes));
    c.push_str(&tls_passthrough_service(
        "tls4-strict",
        VIP4,
        STRICT_PORT,
        "tls-default",
        &format!(
            "missing_sni = \"reject\"\nunknown_sni = \"reject\"\ndeny = [\"bad.example.com\"]\nhello_timeout_ms = 1000\nmax_pending_per_source = 2\n{}{}",
            tls_route("www.example.com", "tls-www"),
            tls_route("bad.example.com", "tls-www")
        ),
    ));
    c.push_str(&tls_passthrough_service(
        "tls4-proxy",
        VIP4,
        PROXY_PORT,
        "proxy-check",
        "proxy_protocol = true\n",
    ));
    c.push_str(&tls_passthrough_service(
        "tls4-splice",
        VIP4,
        SPLICE_PORT,
        "tls-bulk",
        "relay = \"splice\"\n",
    ));
    c.push_str(&tls_passthrough_service("tls4-failover", VIP4, FAILOVER_PORT, "tls-failover", ""));
    c.push_str(&tls_passthrough_service(
        "tls4-one-attempt",
        VIP4,
        ONE_ATTEMPT_PORT,
        "tls-failover",
        "connect_attempts = 1\n",
    ));
    c.push_str(&config::tcp_service(
        "tls4-sticky",
        VIP4,
        STICKY_PORT,
        "tls-three",
        "mode = \"tls-passthrough\"\nhash = \"source\"\n",
    ));
    c.push_str(&tls_passthrough_service(
        "tls6",
        VIP6,
        TLS_PORT,
        "tls6-default",
        &tls_route("www.example.com", "tls6-www"),
    ));
    c
}

/// The lab with lbd serving the passthrough services, `s_server` on every backend.
struct Setup {
    lab: Lab,
    daemon: Option<LabDaemon>,
    certs: std::path::PathBuf,
}

impl Setup {
    fn new() -> Self {
        let lab = Lab::create(4).unwrap();
        // The service addresses are the host's own: the stack takes their connections, which
        // the sk_lookup program hands to lbd.
        lab.lb.ip(&["addr", "add", &format!("{VIP4}/32"), "dev", "lo"]).unwrap();
        lab.lb.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"]).unwrap();
        let certs = std::env::temp_dir().join(format!("{}-certs", lab.id));
        for (i, b) in lab.backends.iter().enumerate() {
            let cert = make_cert(&certs, &b.name, &["example.com"]).unwrap();
            s_server(&b.ns, S_SERVER_PORT, &cert).unwrap();
            let _ = i;
        }
        let daemon = LabDaemon::start(&lab, &config());
        Self { lab, daemon: Some(daemon), certs }
    }

    fn metrics(&self) -> String {
        self.lab.lb.exec(&["curl", "-sf", &format!("http://{API}/metrics")]).unwrap()
    }

    /// The value of the metric line starting with `prefix` (labels included), 0 if absent.
    fn metric(&self, prefix: &str) -> u64 {
        value(&self.metrics(), prefix)
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.certs);
    }
}

fn value(metrics: &str, prefix: &str) -> u64 {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rejected(setup: &Setup, service: &str, reason: &str) -> u64 {
    setup.metric(&format!(
        "lb_passthrough_rejected_total{{service=\"{service}\",reason=\"{reason}\"}}"
    ))
}

#[test]
fn tls_passthrough() {
    if !require_privileges("tls_passthrough") {
        return;
    }
    let mut setup = Setup::new();
    let lab = &setup.lab;
    let vip4 = SocketAddr::from((VIP4, TLS_PORT));
    let vip6 = SocketAddr::from((VIP6, TLS_PORT));

    // Names route to their pools; the most specific wildcard wins; unknown and missing
    // names go to the default pool. The certificate each client got is its backend's own.
    for (target, name, expected) in [
        (vip4, Some("www.example.com"), "backend-1"),
        (vip4, Some("WWW.Example.COM"), "backend-1"),
        (vip4, Some("api.example.com"), "backend-2"),
        (vip4, Some("a.b.example.com"), "backend-2"),
        (vip4, Some("x.eu.example.com"), "backend-3"),
        (vip4, Some("example.org"), "backend-4"),
        (vip4, None, "backend-4"),
        (vip6, Some("www.example.com"), "backend-2"),
        (vip6, None, "backend-1"),
    ] {
        let got = s_client_peer(&lab.client, target, name);
        assert_eq!(got.as_deref(), Some(expected), "{target} with server name {name:?}");
    }

    // curl, resolving the names to the service address, gets each backend's certificate and
    // its answer (s_server's status page) through the passthrough.
    for (name, expected) in [("www.example.com", "backend-1"), ("api.example.com", "backend-2")] {
        let out = lab
            .client
            .exec_output(&[
                "curl",
                "-vsk",
                "--max-time",
                "10",
                "--resolve",
                &format!("{name}:{TLS_PORT}:{VIP4}"),
                &format!("https://{name}/"),
            ])
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "curl {name}: {log}");
        assert!(log.contains(&format!("subject: CN={expected}")), "curl {name}: {log}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("s_server"), "curl {name}: no page");
    }

    // A strict service refuses what it has no route for, and denied names.
    let strict = SocketAddr::from((VIP4, STRICT_PORT));
    assert_eq!(
        s_client_peer(&lab.client, strict, Some("www.example.com")).as_deref(),
        Some("backend-1")
    );
    for (name, reason) in [
        (None, "missing_sni"),
        (Some("other.example.com"), "unknown_sni"),
        (Some("bad.example.com"), "denied"),
    ] {
        assert_eq!(s_client_peer(&lab.client, strict, name), None, "{name:?} must be refused");
        assert_eq!(rejected(&setup, "tls4-strict", reason), 1, "{reason}");
    }

    let hello = captured_hello(lab);
    hello_one_byte_at_a_time(&setup, vip4, &hello);
    large_hellos(&setup, vip4, &hello);
    garbage_is_closed(&setup, vip4);
    slow_and_piled_up_clients(&setup, strict);
    proxy_protocol_and_resets(&setup, &hello);
    for (port, relay) in [(TLS_PORT, "sockmap"), (SPLICE_PORT, "splice")] {
        bulk_transfer(&setup, SocketAddr::from((VIP4, port)), relay);
    }

    let metrics = setup.metrics();
    for line in [
        "lb_passthrough_connections_total{service=\"tls4\",route=\"www.example.com\",pool=\"tls-www\"} 5",
        "lb_passthrough_connections_total{service=\"tls4\",route=\"*.eu.example.com\",pool=\"tls-eu\"} 1",
        "lb_passthrough_connections_total{service=\"tls4\",route=\"default\",pool=\"tls-default\"} 2",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(value(&metrics, "lb_passthrough_decision_seconds_count{service=\"tls4\"}") >= 8);
    // The API lists the service with its connections and bytes.
    let services: Vec<serde_json::Value> = serde_json::from_str(
        &lab.lb.exec(&["curl", "-sf", &format!("http://{API}/v1/services")]).unwrap(),
    )
    .unwrap();
    let tls4 = services.iter().find(|s| s["name"] == "tls4").expect("tls4 listed");
    assert_eq!(tls4["mode"], "tls-passthrough");
    assert!(tls4["new_flows"].as_u64().unwrap() >= 10, "{tls4}");
    assert!(tls4["bytes"].as_u64().unwrap() >= 2 * BULK_BYTES as u64, "{tls4}");

    relays_of_a_disabled_backend_are_cut(&setup, vip4, &hello);
    a_backend_disabled_while_a_connection_connects_to_it_cuts_that_connection(&setup, vip4, &hello);
    relays_of_a_removed_backend_are_cut_at_the_deadline(&setup, vip4, &hello);
    refusing_backends_are_passed_over(&setup);
    source_hashing_keeps_a_client_on_one_backend(&setup);

    // A reload takes new routes for new connections, and a removed service stops listening.
    let rerouted = config().replace(
        "server_name = \"www.example.com\"\npool = \"tls-www\"",
        "server_name = \"www.example.com\"\npool = \"tls-wild\"",
    );
    let without_strict = {
        let start = rerouted.find("[[service]]\nname = \"tls4-strict\"").unwrap();
        let end = rerouted[start..].find("[[service]]\nname = \"tls4-proxy\"").unwrap() + start;
        format!("{}{}", &rerouted[..start], &rerouted[end..])
    };
    setup.daemon.as_ref().unwrap().reload(&without_strict);
    let moved = wait_for(Duration::from_secs(10), || {
        (s_client_peer(&lab.client, vip4, Some("www.example.com")).as_deref() == Some("backend-2"))
            .then_some(())
    });
    assert!(moved.is_some(), "www.example.com did not move to its new pool after the reload");
    let refused = lab
        .client
        .enter(move || TcpStream::connect_timeout(&strict, Duration::from_secs(2)).is_err())
        .unwrap();
    assert!(refused, "the removed service still accepts connections");
    let log = setup.daemon.take().unwrap().finish();
    assert!(log.contains("TLS passthrough started") && log.contains("relay=\"sockmap\""), "{log}");
}

/// Two of the pool's three backends refuse connections. With the default three attempts,
/// every client reaches the one that listens (the refusals counted as failed attempts, not
/// as refused connections); with one attempt, clients hashed to a refusing backend are
/// closed (`connect_failed`), as they were before connections tried another backend.
fn refusing_backends_are_passed_over(setup: &Setup) {
    let lab = &setup.lab;
    let failures = |service: &str| {
        setup.metric(&format!(
            "lb_passthrough_connect_failures_total{{service=\"{service}\",reason=\"connect_failed\"}}"
        ))
    };
    let failover = SocketAddr::from((VIP4, FAILOVER_PORT));
    for i in 0..12 {
        let got = s_client_peer(&lab.client, failover, Some("www.example.com"));
        assert_eq!(got.as_deref(), Some("backend-1"), "connection {i}");
    }
    assert_eq!(rejected(setup, "tls4-failover", "connect_failed"), 0);
    // Each client's own source port picks its first backend: two in three refuse.
    assert!(failures("tls4-failover") >= 1, "no connection met a refusing backend");

    let one = SocketAddr::from((VIP4, ONE_ATTEMPT_PORT));
    let refused =
        (0..12).filter(|_| s_client_peer(&lab.client, one, Some("www.example.com")).is_none());
    let refused = refused.count() as u64;
    assert!(refused >= 1, "every one-attempt connection reached the listening backend");
    assert_eq!(rejected(setup, "tls4-one-attempt", "connect_failed"), refused);
    assert_eq!(failures("tls4-one-attempt"), refused);
}

/// `hash = "source"` on a passthrough service: every connection of one client reaches the
/// same backend of three (by the 5-tuple, twelve connections would all meet one backend
/// once in 177,000 runs).
fn source_hashing_keeps_a_client_on_one_backend(setup: &Setup) {
    let sticky = SocketAddr::from((VIP4, STICKY_PORT));
    let got: std::collections::BTreeSet<Option<String>> = (0..12)
        .map(|_| s_client_peer(&setup.lab.client, sticky, Some("www.example.com")))
        .collect();
    assert_eq!(got.len(), 1, "one backend for the client: {got:?}");
    assert!(got.iter().all(Option::is_some), "{got:?}");
}

/// The ClientHello `openssl s_client -tls1_2` sends for `www.example.com` (TLS 1.2, so the
/// server's certificate comes back in the clear), captured in the client namespace.
fn captured_hello(lab: &Lab) -> Vec<u8> {
    lab.client
        .enter(|| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let mut child = std::process::Command::new("openssl")
                .args(["s_client", "-tls1_2", "-servername", "www.example.com", "-connect"])
                .arg(format!("127.0.0.1:{port}"))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            // Bounded: openssl may fail before it connects.
            listener.set_nonblocking(true).unwrap();
            let (mut conn, _) =
                lb_tests::netns::wait_for(Duration::from_secs(10), || listener.accept().ok())
                    .expect("openssl s_client never connected");
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut hello = Vec::new();
            let mut chunk = [0u8; 4096];
            while parse_client_hello(&hello, 1 << 14).unwrap().is_none() {
                let n = conn.read(&mut chunk).unwrap();
                assert!(n > 0, "s_client closed before its hello");
                hello.extend_from_slice(&chunk[..n]);
            }
            let _ = child.kill();
            let _ = child.wait();
            hello
        })
        .unwrap()
}

/// A hello written one byte per segment still routes: the answer carries backend-1's
/// certificate.
fn hello_one_byte_at_a_time(setup: &Setup, target: SocketAddr, hello: &[u8]) {
    let answer = send_hello(setup, target, hello, 1);
    assert!(contains(&answer, b"backend-1"), "no backend-1 certificate in {} bytes", answer.len());
}

/// Sends `hello` in writes of `step` bytes (a pause after each) and returns what comes back
/// until backend-1's name shows up, the connection closes, or 5 s pass.
fn send_hello(setup: &Setup, target: SocketAddr, hello: &[u8], step: usize) -> Vec<u8> {
    let hello = hello.to_vec();
    setup
        .lab
        .client
        .enter(move || {
            let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            conn.set_nodelay(true).unwrap();
            for piece in hello.chunks(step) {
                if conn.write_all(piece).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut answer = Vec::new();
            let mut chunk = [0u8; 4096];
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !contains(&answer, b"backend-1") {
                match conn.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => answer.extend_from_slice(&chunk[..n]),
                }
            }
            answer
        })
        .unwrap()
}

/// `hello` (one record) with a padding extension of `pad` bytes, its handshake cut into
/// records of `record` bytes: a hello as large as post-quantum key shares make them.
fn padded_hello(hello: &[u8], pad: usize, record: usize) -> Vec<u8> {
    let len16 = |b: &[u8], at: usize| usize::from(u16::from_be_bytes([b[at], b[at + 1]]));
    let body = &hello[9..];
    let mut at = 2 + 32;
    at += 1 + usize::from(body[at]); // session id
    at += 2 + len16(body, at); // cipher suites
    at += 1 + usize::from(body[at]); // compression methods
    let extensions = &body[at + 2..at + 2 + len16(body, at)];
    let mut new_extensions = extensions.to_vec();
    new_extensions.extend_from_slice(&[0x00, 0x15]);
    new_extensions.extend_from_slice(&u16::try_from(pad).unwrap().to_be_bytes());
    new_extensions.resize(new_extensions.len() + pad, 0);
    let mut new_body = body[..at].to_vec();
    new_body.extend_from_slice(&u16::try_from(new_extensions.len()).unwrap().to_be_bytes());
    new_body.extend_from_slice(&new_extensions);
    let mut handshake = vec![1u8];
    handshake.extend_from_slice(&u32::try_from(new_body.len()).unwrap().to_be_bytes()[1..]);
    handshake.extend_from_slice(&new_body);
    let mut out = Vec::new();
    for piece in handshake.chunks(record) {
        out.extend_from_slice(&[0x16, 0x03, 0x01]);
        out.extend_from_slice(&u16::try_from(piece.len()).unwrap().to_be_bytes());
        out.extend_from_slice(piece);
    }
    out
}

/// A 12 KiB hello in four records still routes (OpenSSL answers it); one past the 16 KiB
/// cap is closed without reaching a backend.
fn large_hellos(setup: &Setup, target: SocketAddr, hello: &[u8]) {
    let large = padded_hello(hello, 12 << 10, 4000);
    assert!(parse_client_hello(&large, 1 << 14).unwrap().is_some());
    let answer = send_hello(setup, target, &large, 1500);
    assert!(contains(&answer, b"backend-1"), "a 12 KiB hello got no backend-1 certificate");
    let huge = padded_hello(hello, 17 << 10, 4000);
    let answer = send_hello(setup, target, &huge, 1500);
    assert!(answer.is_empty(), "a hello over 16 KiB got an answer");
    assert_eq!(rejected(setup, "tls4", "too_large"), 1);
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Bytes that are not TLS are closed at once, and no backend sees a connection.
fn garbage_is_closed(setup: &Setup, target: SocketAddr) {
    let before = setup.metrics();
    let opened = |m: &str| -> u64 {
        m.lines()
            .filter(|l| l.starts_with("lb_passthrough_connections_total{service=\"tls4\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    // Closed (a FIN or a reset) before the read times out; the reason counted below says it
    // was for not being TLS, not by the 10 s hello timeout.
    let closed = setup
        .lab
        .client
        .enter(move || {
            let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            conn.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            match conn.read(&mut buf) {
                Ok(0) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            }
        })
        .unwrap();
    assert!(closed, "garbage was not closed");
    assert_eq!(rejected(setup, "tls4", "not_tls"), 1);
    assert_eq!(opened(&setup.metrics()), opened(&before), "garbage reached a backend");
}

/// A client that never finishes its hello is closed after the hello timeout; a source with
/// too many pending handshakes is refused more.
fn slow_and_piled_up_clients(setup: &Setup, target: SocketAddr) {
    let (timed_out, refused) = setup
        .lab
        .client
        .enter(move || {
            let idle: Vec<TcpStream> = (0..2)
                .map(|_| TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap())
                .collect();
            std::thread::sleep(Duration::from_millis(200));
            // A third pending handshake from the same address: closed at once.
            let mut third = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            // Well inside the 1 s hello timeout, so a connection merely left pending (and
            // closed by that timeout) does not pass for a refused one.
            third.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
            let mut buf = [0u8; 8];
            let refused = match third.read(&mut buf) {
                Ok(0) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
                Ok(_) => false,
            };
            // The idle ones: closed (before the read's own 5 s timeout), by the 1 s hello
            // timeout as the reason counted below says.
            let mut timed_out = true;
            for mut conn in idle {
                conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                timed_out &= matches!(conn.read(&mut buf), Ok(0));
            }
            (timed_out, refused)
        })
        .unwrap();
    assert!(refused, "a third pending handshake from one address was accepted");
    assert!(timed_out, "idle clients were not closed after the hello timeout");
    assert_eq!(rejected(setup, "tls4-strict", "too_many_pending"), 1);
    assert_eq!(rejected(setup, "tls4-strict", "hello_timeout"), 2);
}

/// With `proxy_protocol`, the backend first reads a PROXY v2 header naming the client and
/// the service address, then the client's hello; its reset reaches the client as a reset.
fn proxy_protocol_and_resets(setup: &Setup, hello: &[u8]) {
    let lab = &setup.lab;
    let backend = &lab.backends[2];
    let (tx, rx) = std::sync::mpsc::channel();
    let listener = backend
        .ns
        .enter(|| TcpListener::bind(SocketAddr::from((backend_v4(2), PROXY_CHECK_PORT))).unwrap())
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut head = [0u8; 16 + 12 + 1];
        conn.read_exact(&mut head).unwrap();
        // Then the backend resets the connection: the client must see a reset, not an end.
        socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
        drop(conn);
        tx.send(head.to_vec()).unwrap();
    });
    let target = SocketAddr::from((VIP4, PROXY_PORT));
    let hello = hello.to_vec();
    let seen = lab
        .client
        .enter(move || {
            let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            conn.write_all(&hello).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 64];
            conn.read(&mut buf).map_err(|e| e.kind())
        })
        .unwrap();
    let head = rx.recv_timeout(Duration::from_secs(10)).expect("the backend got no connection");
    server.join().unwrap();
    assert_eq!(seen, Err(std::io::ErrorKind::ConnectionReset), "the backend's reset");
    assert_eq!(head[..12], PROXY_V2_SIGNATURE);
    assert_eq!(head[12], 0x21, "version 2, PROXY");
    assert_eq!(head[13], 0x11, "TCP over IPv4");
    assert_eq!(u16::from_be_bytes([head[14], head[15]]), 12);
    assert_eq!(head[16..20], lab::CLIENT_V4.octets(), "source address");
    assert_eq!(head[20..24], VIP4.octets(), "destination address");
    assert_eq!(u16::from_be_bytes([head[26], head[27]]), PROXY_PORT);
    assert_eq!(head[28], 0x16, "the hello follows the header");
}

/// A connection from the client to `target` that has sent `hello` (www.example.com's,
/// routed to tls-www), with a 10 s read timeout.
fn send_hello_from_client(setup: &Setup, target: SocketAddr, hello: &[u8]) -> TcpStream {
    let hello = hello.to_vec();
    setup
        .lab
        .client
        .enter(move || {
            let mut conn = TcpStream::connect_timeout(&target, Duration::from_secs(5)).unwrap();
            conn.write_all(&hello).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            conn
        })
        .unwrap()
}

/// [`send_hello_from_client`], once backend-1 has answered through it: a running relay.
fn relay_to_backend_1(setup: &Setup, target: SocketAddr, hello: &[u8]) -> TcpStream {
    let mut conn = send_hello_from_client(setup, target, hello);
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !contains(&answer, b"backend-1") {
        let n = conn.read(&mut chunk).unwrap();
        assert!(n > 0, "the relay ended before the test cut it");
        answer.extend_from_slice(&chunk[..n]);
    }
    conn
}

/// Sets backend-1's state in tls-www through the API.
fn set_backend_1_state(setup: &Setup, state: &str) {
    let url = format!(
        "http://{API}/v1/pools/tls-www/backends/{}/state?port={S_SERVER_PORT}",
        backend_v4(0)
    );
    setup
        .lab
        .lb
        .exec(&[
            "curl",
            "-sf",
            "-X",
            "PUT",
            "-H",
            "content-type: application/json",
            "-d",
            &format!("{{\"state\": \"{state}\"}}"),
            &url,
        ])
        .unwrap();
}

/// Disabling a backend through the API cuts its running relays, as it cuts the data path's
/// flows: the client sees a reset.
fn relays_of_a_disabled_backend_are_cut(setup: &Setup, target: SocketAddr, hello: &[u8]) {
    let mut conn = relay_to_backend_1(setup, target, hello);
    let mut chunk = [0u8; 4096];
    // Cut at once: the client's read (10 s timeout) ends in a reset, not a timeout.
    set_backend_1_state(setup, "disabled");
    let ended = loop {
        match conn.read(&mut chunk) {
            Ok(0) => break Ok(0),
            Ok(_) => {}
            Err(e) => break Err(e.kind()),
        }
    };
    assert_eq!(ended, Err(std::io::ErrorKind::ConnectionReset), "the cut relay's client");
    set_backend_1_state(setup, "active");
}

/// A connection whose backend is disabled while lbd connects to it (chosen before, answering
/// after) is cut as a running relay is: the client sees a reset, and nothing of the disabled
/// backend's. Backend-1 drops lbd's SYNs until the backend is disabled, then lets the
/// retransmitted one (a second later) through, well within lbd's 5 s connect timeout.
fn a_backend_disabled_while_a_connection_connects_to_it_cuts_that_connection(
    setup: &Setup,
    target: SocketAddr,
    hello: &[u8],
) {
    let backend = &setup.lab.backends[0].ns;
    let opened = || {
        setup.metric(
            "lb_passthrough_connections_total{service=\"tls4\",route=\"www.example.com\",pool=\"tls-www\"}",
        )
    };
    let before = opened();
    let hold = format!(
        "add table inet hold; add chain inet hold input {{ type filter hook input priority 0; }}; \
         add rule inet hold input tcp dport {S_SERVER_PORT} tcp flags & (syn | ack) == syn drop"
    );
    backend.exec(&["nft", &hold]).unwrap();
    let mut conn = send_hello_from_client(setup, target, hello);
    // Routed and connecting: pending until the backend answers.
    let connecting = wait_for(Duration::from_secs(2), || {
        (setup.metric("lb_passthrough_pending_handshakes{service=\"tls4\"}") == 1).then_some(())
    });
    set_backend_1_state(setup, "disabled");
    backend.exec(&["nft", "delete table inet hold"]).unwrap();
    assert!(connecting.is_some(), "the connection never waited for its backend");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    let ended = loop {
        match conn.read(&mut chunk) {
            Ok(0) => break Ok(0),
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) => break Err(e.kind()),
        }
    };
    set_backend_1_state(setup, "active");
    // The backend answered (the connection was relayed), after the cut.
    assert_eq!(opened(), before + 1, "the connection never reached its backend");
    assert!(!contains(&answer, b"backend-1"), "the disabled backend answered the client");
    assert_eq!(ended, Err(std::io::ErrorKind::ConnectionReset), "the cut connection's client");
}

/// A relay whose backend is removed through the API runs on until the pool's drain deadline,
/// then is cut: its backend's id stays retired while relays alone use it (no data path flow
/// does), else the deadline would never come for it. The backend is put back after.
fn relays_of_a_removed_backend_are_cut_at_the_deadline(
    setup: &Setup,
    target: SocketAddr,
    hello: &[u8],
) {
    let lab = &setup.lab;
    let mut conn = relay_to_backend_1(setup, target, hello);
    let backend =
        format!("http://{API}/v1/pools/tls-www/backends/{}?port={S_SERVER_PORT}", backend_v4(0));
    lab.lb.exec(&["curl", "-sf", "--max-time", "10", "-X", "DELETE", &backend]).unwrap();
    let removed = Instant::now();
    conn.set_read_timeout(Some(Duration::from_secs(3 * DRAIN_SECS))).unwrap();
    let mut chunk = [0u8; 4096];
    let ended = loop {
        match conn.read(&mut chunk) {
            Ok(0) => break Ok(0),
            Ok(_) => {}
            Err(e) => break Err(e.kind()),
        }
    };
    let after = removed.elapsed();
    assert_eq!(ended, Err(std::io::ErrorKind::ConnectionReset), "after {after:?}");
    assert!(after >= Duration::from_secs(DRAIN_SECS - 1), "cut before the deadline: {after:?}");
    let put_back = format!("{{\"address\": \"{}\", \"port\": {S_SERVER_PORT}}}", backend_v4(0));
    lab.lb
        .exec(&[
            "curl",
            "-sf",
            "--max-time",
            "10",
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            &put_back,
            &format!("http://{API}/v1/pools/tls-www/backends"),
        ])
        .unwrap();
}

/// A real TLS session (rustls both ends) moves `BULK_BYTES` each way intact through the
/// relay `relay`, which the metrics confirm it used.
fn bulk_transfer(setup: &Setup, target: SocketAddr, relay: &str) {
    let lab = &setup.lab;
    let cert = make_cert(&setup.certs, &format!("bulk-{relay}"), &["bulk.example.com"]).unwrap();
    let server = TlsServer::start(
        &lab.backends[3].ns,
        SocketAddr::from((backend_v4(3), BULK_PORT)),
        server_config(&cert).unwrap(),
    )
    .unwrap();
    let client = client_config(&cert).unwrap();
    let started = Instant::now();
    let bulk_client = client.clone();
    let exchanged = lab
        .client
        .enter(move || exchange(bulk_client, target, "bulk.example.com", BULK_BYTES, BULK_BYTES))
        .unwrap()
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        exchanged.upload_hash,
        repeated_hash(&block(1), BULK_BYTES),
        "{relay}: the upload arrived changed"
    );
    assert_eq!(exchanged.downloaded, BULK_BYTES, "{relay}: download length");
    assert_eq!(
        exchanged.download_hash,
        repeated_hash(&block(2), BULK_BYTES),
        "{relay}: the download arrived changed"
    );
    eprintln!("{relay}: {} MiB each way in {elapsed:?}", BULK_BYTES >> 20);
    storm(setup, target, relay, &client);
    drop(server);
    let relays = wait_for(Duration::from_secs(5), || {
        let n = setup.metric(&format!("lb_passthrough_relays_total{{relay=\"{relay}\"}}"));
        (n >= 1).then_some(n)
    });
    assert!(relays.is_some(), "no relay by {relay} finished");
    // The relay counted the bytes (the TLS records, so a little more than the data).
    let service = if relay == "splice" { "tls4-splice" } else { "tls4" };
    let route = if relay == "splice" { "default" } else { "bulk.example.com" };
    for direction in ["to_backend", "to_client"] {
        let bytes = setup.metric(&format!(
            "lb_passthrough_bytes_total{{service=\"{service}\",route=\"{route}\",pool=\"tls-bulk\",direction=\"{direction}\"}}"
        ));
        assert!(bytes >= BULK_BYTES as u64, "{relay} {direction}: {bytes} bytes counted");
    }
}

/// Short connections from several threads at once, each answered within 5 s and with the
/// right bytes. A relay linked while its backend's first answer arrives must pass that answer
/// on: one connection in a few thousand used to stall in its handshake.
fn storm(setup: &Setup, target: SocketAddr, relay: &str, client: &Arc<rustls::ClientConfig>) {
    let client = client.clone();
    let expected = (repeated_hash(&block(1), 64), repeated_hash(&block(2), 64));
    let started = Instant::now();
    let failures: Vec<String> = setup
        .lab
        .client
        .enter(move || {
            std::thread::scope(|scope| {
                let threads: Vec<_> = (0..STORM_THREADS)
                    .map(|_| {
                        let (client, expected) = (client.clone(), &expected);
                        scope.spawn(move || {
                            let mut failures = Vec::new();
                            for _ in 0..STORM_CONNECTIONS {
                                let result = exchange_within(
                                    client.clone(),
                                    target,
                                    "bulk.example.com",
                                    64,
                                    64,
                                    Duration::from_secs(5),
                                );
                                match result {
                                    Ok(e)
                                        if e.downloaded == 64
                                            && (&e.upload_hash, &e.download_hash)
                                                == (&expected.0, &expected.1) => {}
                                    Ok(e) => failures.push(format!("wrong bytes: {e:?}")),
                                    Err(error) => failures.push(format!("{error:#}")),
                                }
                            }
                            failures
                        })
                    })
                    .collect();
                threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
            })
        })
        .unwrap();
    let total = STORM_THREADS * STORM_CONNECTIONS;
    eprintln!(
        "{relay}: {total} connections from {STORM_THREADS} threads in {:?}",
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{relay}: {} of {total} connections failed: {failures:?}",
        failures.len()
    );
}
