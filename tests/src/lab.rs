//! The lab: a client, the load balancer and a pool of backends in network namespaces, used by
//! `cargo xtask run` and by the attach tests.
//!
//! ```text
//!  client ns                lb ns                    switch ns (bridge br0)      backend ns ×N
//!  eth0 198.18.0.2 ─────── front 198.18.0.1
//!       fd00::2                  fd00::1
//!                          back 198.18.1.1 ───────── lb ─┬─ b1 ──────────────── eth0 198.18.1.11
//!                               fd00:1::1                ├─ b2 ──────────────── eth0 198.18.1.12
//!                                                        └─ …                         fd00:1::1N
//! ```
//!
//! The load balancer's namespace routes between the two segments, so until a service takes
//! them, packets pass its XDP program and the kernel forwards them. Nothing routes out of the
//! lab: every route points at another lab address.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Child,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, bail};

use crate::{
    config::{pool, tls_passthrough_service, tls_route},
    netns::{ChildOutput, Netns, unique_id, veth},
};

/// The client's address on the front segment.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// The load balancer's front address (the client's gateway).
pub const LB_FRONT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
pub const LB_FRONT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
/// The load balancer's back address (the backends' gateway).
pub const LB_BACK_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const LB_BACK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
/// Interface names inside the load balancer's namespace.
pub const LB_FRONT_IF: &str = "front";
pub const LB_BACK_IF: &str = "back";
/// Service addresses: NAT services use these...
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
/// ...and DSR services these, which the backends hold on their loopback.
pub const DSR_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
pub const DSR_VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 2);
/// Extra client addresses, for traffic from several sources (`198.18.0.10` onwards).
pub const EXTRA_CLIENT_ADDRESSES: u8 = 8;

/// Port of every backend's HTTP server.
pub const HTTP_PORT: u16 = 80;
/// Port of the iperf3 servers a test may start on backends.
pub const IPERF_PORT: u16 = 5201;
/// Port of every backend's UDP responder.
pub const UDP_PORT: u16 = 5353;

/// Extra client address `i` (0-based).
#[must_use]
pub fn client_v4(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 0, 10 + i)
}

#[must_use]
pub fn client_v6(i: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10 + u16::from(i))
}

/// Address of backend `i` (0-based).
#[must_use]
pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 11 + u8::try_from(i).expect("backend index"))
}

#[must_use]
pub fn backend_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 0x11 + u16::try_from(i).expect("backend index"))
}

/// One backend host.
#[derive(Debug)]
pub struct LabBackend {
    /// The name its servers answer with (`backend-1`, ...).
    pub name: String,
    pub ns: Netns,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
    /// Pid of its server process.
    server: AtomicU32,
}

/// A running lab. Dropping it stops every process and removes every namespace.
#[derive(Debug)]
pub struct Lab {
    pub id: String,
    /// The pass-through program on veth peers that receive redirected frames; dropping it
    /// detaches them (it goes first).
    peers: Option<lb_userspace::Datapath>,
    // Field order is drop order: backends and their processes first, the switch last.
    pub backends: Vec<LabBackend>,
    pub client: Netns,
    pub lb: Netns,
    pub switch: Netns,
}

impl Lab {
    /// Builds the lab with `backends` backend hosts, each running the lab backend server.
    pub fn create(backends: usize) -> anyhow::Result<Self> {
        let id = unique_id();
        let switch = Netns::create(&format!("{id}-sw"))?;
        let lb = Netns::create(&format!("{id}-lb"))?;
        let client = Netns::create(&format!("{id}-client"))?;
        let mut lab = Self { id, peers: None, backends: Vec::new(), client, lb, switch };

        // Front segment: client <-> lb.
        veth(&lab.client, "eth0", &lab.lb, LB_FRONT_IF)?;
        lab.client.ip(&["addr", "add", &format!("{CLIENT_V4}/24"), "dev", "eth0"])?;
        for i in 0..EXTRA_CLIENT_ADDRESSES {
            lab.client.ip(&["addr", "add", &format!("{}/24", client_v4(i)), "dev", "eth0"])?;
            lab.client.ip(&[
                "addr",
                "add",
                &format!("{}/64", client_v6(i)),
                "dev",
                "eth0",
                "nodad",
            ])?;
        }
        lab.client.ip(&["addr", "add", &format!("{CLIENT_V6}/64"), "dev", "eth0", "nodad"])?;
        lab.lb.ip(&["addr", "add", &format!("{LB_FRONT_V4}/24"), "dev", LB_FRONT_IF])?;
        lab.lb.ip(&["addr", "add", &format!("{LB_FRONT_V6}/64"), "dev", LB_FRONT_IF, "nodad"])?;
        // Everything else in the lab is reached through the load balancer.
        lab.client.ip(&["route", "add", "198.18.0.0/15", "via", &LB_FRONT_V4.to_string()])?;
        lab.client.ip(&["-6", "route", "add", "fd00::/8", "via", &LB_FRONT_V6.to_string()])?;

        // Back segment: lb and backends on one bridge.
        lab.switch.ip(&["link", "add", "name", "br0", "type", "bridge"])?;
        lab.switch.ip(&["link", "set", "br0", "up"])?;
        veth(&lab.lb, LB_BACK_IF, &lab.switch, "lb")?;
        lab.switch.ip(&["link", "set", "lb", "master", "br0"])?;
        lab.lb.ip(&["addr", "add", &format!("{LB_BACK_V4}/24"), "dev", LB_BACK_IF])?;
        lab.lb.ip(&["addr", "add", &format!("{LB_BACK_V6}/64"), "dev", LB_BACK_IF, "nodad"])?;
        lab.lb.sysctl("net.ipv4.ip_forward", "1")?;
        lab.lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;

        for i in 0..backends {
            lab.add_backend(i)?;
        }
        // Locally generated packets may carry partial checksums on veth, which would fool a
        // data path that updates checksums incrementally; real NICs hand over full ones.
        for ns in lab.hosts() {
            ns.exec(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        lab.attach_peer_programs()?;
        lab.wait_for_backends()?;
        Ok(lab)
    }

    fn add_backend(&mut self, i: usize) -> anyhow::Result<()> {
        let name = format!("backend-{}", i + 1);
        let ns = Netns::create(&format!("{}-b{}", self.id, i + 1))?;
        let port = format!("b{}", i + 1);
        veth(&ns, "eth0", &self.switch, &port)?;
        self.switch.ip(&["link", "set", &port, "master", "br0"])?;
        let (v4, v6) = (backend_v4(i), backend_v6(i));
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["route", "add", "198.18.0.0/15", "via", &LB_BACK_V4.to_string()])?;
        ns.ip(&["-6", "route", "add", "fd00::/8", "via", &LB_BACK_V6.to_string()])?;
        // DSR: the service addresses live on the backend's loopback, and the backend neither
        // answers ARP for them nor uses them as a source towards the segment.
        ns.ip(&["addr", "add", &format!("{DSR_VIP_V4}/32"), "dev", "lo"])?;
        ns.ip(&["addr", "add", &format!("{DSR_VIP_V6}/128"), "dev", "lo"])?;
        ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
        ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        let server = AtomicU32::new(spawn_server(&ns, &name)?);
        self.backends.push(LabBackend { name, ns, v4, v6, server });
        Ok(())
    }

    /// Stops backend `i`'s servers (HTTP and UDP), as a crash would.
    pub fn stop_server(&self, i: usize) -> anyhow::Result<()> {
        let b = &self.backends[i];
        let pid = b.server.load(Ordering::SeqCst);
        let mut child = b.ns.take_child(pid).context("the backend's server is not running")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Starts backend `i`'s servers again and waits until HTTP listens.
    pub fn start_server(&self, i: usize) -> anyhow::Result<()> {
        let b = &self.backends[i];
        b.server.store(spawn_server(&b.ns, &b.name)?, Ordering::SeqCst);
        wait_listening(b)
    }

    /// veth drops frames sent into it with `XDP_TX` or `XDP_REDIRECT` unless its peer runs
    /// an XDP program: put the pass-through program on the peers of the load balancer's
    /// interfaces (the client's `eth0` and the switch's `lb` port).
    fn attach_peer_programs(&mut self) -> anyhow::Result<()> {
        let options = lb_userspace::datapath::LoadOptions {
            conntrack_entries: crate::testrun::TEST_CONNTRACK_ENTRIES,
            ..Default::default()
        };
        let mut peers =
            lb_userspace::Datapath::load_with(&options).context("load the peer program")?;
        self.client
            .enter(|| peers.attach_lab_peer("eth0"))?
            .context("attach to the client's eth0")?;
        self.switch
            .enter(|| peers.attach_lab_peer("lb"))?
            .context("attach to the switch's lb port")?;
        self.peers = Some(peers);
        Ok(())
    }

    fn hosts(&self) -> impl Iterator<Item = &Netns> {
        std::iter::once(&self.client).chain(self.backends.iter().map(|b| &b.ns))
    }

    fn wait_for_backends(&self) -> anyhow::Result<()> {
        self.backends.iter().try_for_each(wait_listening)
    }

    /// Starts an iperf3 server on every backend and waits until each listens.
    pub fn start_iperf_servers(&self) -> anyhow::Result<()> {
        for b in &self.backends {
            b.ns.spawn(&["iperf3", "-s", "-p", &IPERF_PORT.to_string()], ChildOutput::Discard)?;
        }
        for b in &self.backends {
            b.ns.wait_listening(IPERF_PORT, &format!("iperf3 server on {}", b.name))?;
        }
        Ok(())
    }

    /// Starts an iperf3 client towards `vip` for `secs` seconds at `rate` (JSON report on
    /// standard output), killed if it runs 30 s longer; wait for it with [`check_iperf`].
    pub fn iperf_client(&self, vip: IpAddr, secs: u32, rate: &str) -> anyhow::Result<Child> {
        let pid = self.client.spawn(
            &[
                "timeout",
                &(secs + 30).to_string(),
                "iperf3",
                "-c",
                &vip.to_string(),
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &secs.to_string(),
                "-i",
                "1",
                "-J",
                "-b",
                rate,
            ],
            ChildOutput::Capture,
        )?;
        self.client.take_child(pid).context("iperf3 client")
    }

    /// Which backend holds an established iperf3 connection.
    #[must_use]
    pub fn iperf_backend(&self) -> Option<usize> {
        self.backends.iter().position(|b| {
            b.ns.exec(&[
                "ss",
                "-Htn",
                "state",
                "established",
                "sport",
                "=",
                &format!(":{IPERF_PORT}"),
            ])
            .is_ok_and(|out| !out.trim().is_empty())
        })
    }

    /// `curl` from `source` (one of the client's addresses) to `addr`, returning the body.
    pub fn curl_from(&self, source: IpAddr, addr: IpAddr, port: u16) -> anyhow::Result<String> {
        let url = url(addr, port);
        self.client
            .exec(&["curl", "-sS", "--max-time", "5", "--interface", &source.to_string(), &url])
            .with_context(|| format!("curl {url} from {source}"))
    }

    /// `curl` from the client to `addr`, returning the body.
    pub fn curl(&self, addr: IpAddr, port: u16) -> anyhow::Result<String> {
        let url = url(addr, port);
        self.client
            .exec(&["curl", "-sS", "--max-time", "5", &url])
            .with_context(|| format!("curl {url} from the client"))
    }
}

/// Starts the lab backend server in `ns`; returns its pid.
fn spawn_server(ns: &Netns, name: &str) -> anyhow::Result<u32> {
    let server = bin_path("lab-backend")?;
    ns.spawn(
        &[
            server.as_os_str(),
            "--name".as_ref(),
            name.as_ref(),
            "--http".as_ref(),
            format!("[::]:{HTTP_PORT}").as_ref(),
            "--udp".as_ref(),
            format!("[::]:{UDP_PORT}").as_ref(),
            "--udp".as_ref(),
            format!("{DSR_VIP_V4}:{UDP_PORT}").as_ref(),
            "--udp".as_ref(),
            format!("[{DSR_VIP_V6}]:{UDP_PORT}").as_ref(),
        ],
        ChildOutput::Discard,
    )
}

fn wait_listening(backend: &LabBackend) -> anyhow::Result<()> {
    backend.ns.wait_listening(HTTP_PORT, &format!("{}'s HTTP server", backend.name))
}

/// Path of a binary built from this workspace, next to the running executable (or one level
/// up, for test executables in `target/<profile>/deps`).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let dir = exe.parent().context("executable has no directory")?;
    for candidate in [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{name} not found next to {}; build it first (`cargo xtask test` and `cargo xtask run` do)",
        exe.display()
    )
}

/// A daemon configuration for the lab: the load balancer's two interfaces, one pool of every
/// backend per address family (HTTP on port 80, UDP on 5353), and NAT and DSR services on
/// both families. `weights` gives each backend's weight (default 100).
#[must_use]
pub fn lab_config(backends: usize, weights: &[u32]) -> String {
    lab_config_with(backends, weights, "", "")
}

/// [`lab_config`] with extra `[daemon]` keys and `[api]` keys (each a TOML fragment).
#[must_use]
pub fn lab_config_with(backends: usize, weights: &[u32], daemon: &str, api: &str) -> String {
    lab_config_pools(backends, weights, daemon, api, &PoolExtras::default())
}

/// Extra TOML for each of the lab's pools: keys right after the pool's name, tables (such as
/// `[pool.health_check]`) after its backends.
#[derive(Clone, Copy, Debug, Default)]
pub struct PoolExtras<'a> {
    pub keys: &'a str,
    pub tables: &'a str,
}

/// [`lab_config_with`] with extra TOML in every pool.
#[must_use]
pub fn lab_config_pools(
    backends: usize,
    weights: &[u32],
    daemon: &str,
    api: &str,
    extras: &PoolExtras<'_>,
) -> String {
    use std::fmt::Write as _;
    let mut c = format!("[daemon]\nstats_log_interval_secs = 2\n{daemon}\n[api]\n{api}\n\n");
    let _ = write!(
        c,
        "[[interface]]\nname = \"{LB_FRONT_IF}\"\n\n[[interface]]\nname = \"{LB_BACK_IF}\"\n\n"
    );
    for (pool, v6) in [("web4", false), ("web6", true)] {
        let _ = write!(c, "[[pool]]\nname = \"{pool}\"\n{}\n", extras.keys);
        for i in 0..backends {
            let addr: IpAddr = if v6 { backend_v6(i).into() } else { backend_v4(i).into() };
            let weight = weights.get(i).copied().unwrap_or(100);
            let _ = write!(c, "[[pool.backend]]\naddress = \"{addr}\"\nweight = {weight}\n");
        }
        let _ = writeln!(c, "{}", extras.tables);
    }
    // iperf3 opens a control and a data connection that must meet on one server: its
    // services hash the client address only.
    for (name, addr, proto, port, pool, mode, nat) in [
        (
            "web4",
            IpAddr::from(VIP_V4),
            "tcp",
            HTTP_PORT,
            "web4",
            "nat",
            Some(IpAddr::from(LB_BACK_V4)),
        ),
        (
            "udp4",
            IpAddr::from(VIP_V4),
            "udp",
            UDP_PORT,
            "web4",
            "nat",
            Some(IpAddr::from(LB_BACK_V4)),
        ),
        (
            "web6",
            IpAddr::from(VIP_V6),
            "tcp",
            HTTP_PORT,
            "web6",
            "nat",
            Some(IpAddr::from(LB_BACK_V6)),
        ),
        (
            "udp6",
            IpAddr::from(VIP_V6),
            "udp",
            UDP_PORT,
            "web6",
            "nat",
            Some(IpAddr::from(LB_BACK_V6)),
        ),
        ("dsr4", IpAddr::from(DSR_VIP_V4), "tcp", HTTP_PORT, "web4", "dsr-l2", None),
        ("dsr-udp4", IpAddr::from(DSR_VIP_V4), "udp", UDP_PORT, "web4", "dsr-l2", None),
        ("dsr6", IpAddr::from(DSR_VIP_V6), "tcp", HTTP_PORT, "web6", "dsr-l2", None),
        ("dsr-udp6", IpAddr::from(DSR_VIP_V6), "udp", UDP_PORT, "web6", "dsr-l2", None),
        (
            "iperf4",
            IpAddr::from(VIP_V4),
            "tcp",
            IPERF_PORT,
            "web4",
            "nat",
            Some(IpAddr::from(LB_BACK_V4)),
        ),
        ("iperf-dsr4", IpAddr::from(DSR_VIP_V4), "tcp", IPERF_PORT, "web4", "dsr-l2", None),
    ] {
        let _ = write!(
            c,
            "[[service]]\nname = \"{name}\"\naddress = \"{addr}\"\nprotocol = \"{proto}\"\nport = {port}\npool = \"{pool}\"\nmode = \"{mode}\"\n"
        );
        if let Some(nat) = nat {
            let _ = writeln!(c, "nat_source = \"{nat}\"");
        }
        if port == IPERF_PORT {
            c.push_str("hash = \"source\"\n");
        }
        c.push('\n');
    }
    c
}

/// The lab's TLS-passthrough service address (on the load balancer's loopback).
pub const TLS_VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 3);
/// Where the lab's backends serve TLS (`openssl s_server`).
pub const TLS_BACKEND_PORT: u16 = 8443;

/// Adds a TLS-passthrough service to a running lab: `openssl s_server` on every backend
/// (each with its own certificate, in `certs`), the service address on the load balancer's
/// loopback, and the configuration fragment: `www.example.com` to backend-1 alone, every
/// other name to all backends.
pub fn add_tls_passthrough(lab: &Lab, certs: &std::path::Path) -> anyhow::Result<String> {
    for b in &lab.backends {
        let cert = crate::tls::make_cert(certs, &b.name, &["example.com"])?;
        crate::tls::s_server(&b.ns, TLS_BACKEND_PORT, &cert)?;
    }
    lab.lb.ip(&["addr", "add", &format!("{TLS_VIP_V4}/32"), "dev", "lo"])?;
    let port = format!("port = {TLS_BACKEND_PORT}");
    let all: Vec<_> = lab.backends.iter().map(|b| (b.v4, port.as_str())).collect();
    let route = tls_route("www.example.com", "tls-www");
    Ok(pool("tls-www", &all[..1])
        + &pool("tls-all", &all)
        + &tls_passthrough_service("tls", TLS_VIP_V4, 443, "tls-all", &route))
}

/// Opens `per_source` new connections from each client address to `url` with curl (one
/// process per source; `Connection: close` makes every request a new connection, so a new
/// flow) and counts the answering backends.
pub fn spread_http(
    lab: &Lab,
    sources: &[IpAddr],
    url: &str,
    per_source: usize,
) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for source in sources {
        let mut args = vec![
            "curl".to_owned(),
            "-sS".into(),
            "--max-time".into(),
            "20".into(),
            "-H".into(),
            "Connection: close".into(),
        ];
        args.extend(["--interface".into(), source.to_string()]);
        for _ in 0..per_source {
            args.push(url.to_owned());
        }
        let out =
            lab.client.exec(&args).unwrap_or_else(|e| panic!("curl from {source} to {url}: {e:#}"));
        for line in out.lines() {
            *counts.entry(line.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// The client's addresses of one family.
#[must_use]
pub fn client_sources(v6: bool) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = if v6 { vec![CLIENT_V6.into()] } else { vec![CLIENT_V4.into()] };
    for i in 0..EXTRA_CLIENT_ADDRESSES {
        v.push(if v6 { client_v6(i).into() } else { client_v4(i).into() });
    }
    v
}

/// The URL of the lab HTTP server at `addr`.
#[must_use]
pub fn url(addr: IpAddr, port: u16) -> String {
    match addr {
        IpAddr::V4(a) => format!("http://{a}:{port}/"),
        IpAddr::V6(a) => format!("http://[{a}]:{port}/"),
    }
}

/// Waits for an iperf3 client and checks its report: no error, at least `secs - 1`
/// intervals, none of them empty (the flow never stalled), and more than `min_bytes`
/// received. Panics with `what` in the message otherwise.
pub fn check_iperf(what: &str, client: Child, secs: usize, min_bytes: u64) {
    let output = client.wait_with_output().expect("wait for iperf3");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{what}: iperf3 output is not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(report.get("error").is_none(), "{what}: iperf3 failed: {}", report["error"]);
    let intervals = report["intervals"].as_array().expect("intervals");
    assert!(intervals.len() + 1 >= secs, "{what}: {} intervals", intervals.len());
    for (i, interval) in intervals.iter().enumerate() {
        let bytes = interval["sum"]["bytes"].as_u64().unwrap_or(0);
        assert!(bytes > 0, "{what}: the flow stalled in second {i}");
    }
    let received = report["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0);
    assert!(received > min_bytes, "{what}: only {received} bytes arrived");
}
