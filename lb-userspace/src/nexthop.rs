//! Next-hop resolution: for each backend, the egress interface and the MAC addresses its
//! packets need, from the kernel's routes and neighbours.
//!
//! The data path reads these from `NEXTHOPS` instead of calling `bpf_fib_lookup` per packet
//! (which would also require IP forwarding enabled on the ingress interface). Resolution
//! asks the kernel with `ip -json -batch`, one process for all backends; a backend whose
//! neighbour is not known yet gets a probe datagram (UDP port 9, discard) so the kernel
//! resolves it, and is retried on the next round.

use std::{
    collections::HashMap,
    fmt::Write as _,
    io::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    process::{Command, Stdio},
};

use lb_common::service::{NEXTHOP_ON_LINK, NextHop};
use serde::Deserialize;
use tracing::debug;

/// How a backend's next hop was resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolution {
    Resolved(NextHop),
    /// The route is known but not the neighbour's MAC (a probe was sent).
    NoNeighbour,
    /// No route to the backend.
    NoRoute,
}

/// Resolves backends' next hops.
pub trait Resolver: Send {
    fn resolve(&mut self, addrs: &[IpAddr]) -> HashMap<IpAddr, Resolution>;
}

/// Resolves through the kernel of the current network namespace.
#[derive(Debug, Default)]
pub struct KernelResolver {
    /// Egress interfaces already warned about (see [`xdp_cannot_transmit`]).
    warned: std::collections::HashSet<String>,
}

/// Whether a device of link kind `kind` (`ip -details link`'s `info_kind`; none for a
/// physical NIC) is one XDP cannot transmit on: the kernel drops frames redirected to a
/// device without XDP transmit support (no `ndo_xdp_xmit`), and these kinds have none. A
/// backend routed through one (a VLAN subinterface, most often) gets nothing.
#[must_use]
pub fn xdp_cannot_transmit(kind: &str) -> bool {
    matches!(
        kind,
        "vlan"
            | "macvlan"
            | "macvtap"
            | "ipvlan"
            | "ipvtap"
            | "vxlan"
            | "geneve"
            | "bridge"
            | "dummy"
            | "gre"
            | "gretap"
            | "ip6gre"
            | "ip6gretap"
            | "ipip"
            | "ip6tnl"
            | "sit"
            | "wireguard"
            | "team"
    )
}

/// Fixed answers, for datapath tests that run the program without interfaces.
#[derive(Debug, Default)]
pub struct StaticResolver(pub HashMap<IpAddr, NextHop>);

impl Resolver for StaticResolver {
    fn resolve(&mut self, addrs: &[IpAddr]) -> HashMap<IpAddr, Resolution> {
        addrs
            .iter()
            .map(|a| (*a, self.0.get(a).map_or(Resolution::NoRoute, |h| Resolution::Resolved(*h))))
            .collect()
    }
}

#[derive(Debug, Deserialize)]
struct RouteJson {
    dev: Option<String>,
    gateway: Option<String>,
    via: Option<ViaJson>,
}

#[derive(Debug, Deserialize)]
struct ViaJson {
    host: Option<String>,
}

#[derive(Debug, Deserialize)]
struct NeighJson {
    dst: String,
    dev: Option<String>,
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct LinkJson {
    ifindex: u32,
    ifname: String,
    address: Option<String>,
    linkinfo: Option<LinkInfoJson>,
}

#[derive(Debug, Deserialize)]
struct LinkInfoJson {
    info_kind: Option<String>,
}

impl Resolver for KernelResolver {
    fn resolve(&mut self, addrs: &[IpAddr]) -> HashMap<IpAddr, Resolution> {
        let mut out: HashMap<IpAddr, Resolution> =
            addrs.iter().map(|a| (*a, Resolution::NoRoute)).collect();
        if addrs.is_empty() {
            return out;
        }
        let mut script = String::new();
        for addr in addrs {
            let _ = writeln!(script, "route get {addr}");
        }
        script.push_str("neigh show\nlink show\n");
        let values = match run_ip_batch(&script) {
            Ok(values) => values,
            Err(error) => {
                tracing::warn!(%error, "next-hop resolution failed");
                return out;
            }
        };
        // The output is one JSON array per command; a failed `route get` prints nothing.
        let (Some(links), Some(neighs)) = (values.last(), values.get(values.len().wrapping_sub(2)))
        else {
            return out;
        };
        let links: Vec<LinkJson> = serde_json::from_value(links.clone()).unwrap_or_default();
        let neighs: Vec<NeighJson> = serde_json::from_value(neighs.clone()).unwrap_or_default();
        let routes = &values[..values.len() - 2];
        // Match routes to addresses in order: `route get` answers carry `dst`.
        for route in routes {
            let Some(first) = route.as_array().and_then(|a| a.first()) else { continue };
            let Some(dst) =
                first.get("dst").and_then(|d| d.as_str()).and_then(|d| d.parse::<IpAddr>().ok())
            else {
                continue;
            };
            if !out.contains_key(&dst) {
                continue;
            }
            let Ok(route) = serde_json::from_value::<RouteJson>(first.clone()) else { continue };
            let Some(dev) = route.dev else { continue };
            let gateway = route
                .gateway
                .or(route.via.and_then(|v| v.host))
                .and_then(|g| g.parse::<IpAddr>().ok());
            let next = gateway.unwrap_or(dst);
            let Some(link) = links.iter().find(|l| l.ifname == dev) else { continue };
            let Some(smac) = link.address.as_deref().and_then(parse_mac) else { continue };
            let kind = link.linkinfo.as_ref().and_then(|i| i.info_kind.as_deref());
            if let Some(kind) = kind.filter(|k| xdp_cannot_transmit(k))
                && self.warned.insert(dev.clone())
            {
                tracing::warn!(
                    backend = %dst,
                    interface = %dev,
                    kind,
                    "backends routed through this interface get nothing: XDP cannot transmit on a {kind} device; route them through an interface lbd serves (see docs/architecture.md, Next hops)"
                );
            }
            let neighbour = neighs.iter().find(|n| {
                n.dst.parse::<IpAddr>().ok() == Some(next)
                    && n.dev.as_deref() == Some(dev.as_str())
                    && !n.state.iter().any(|s| s == "FAILED" || s == "INCOMPLETE")
            });
            if let Some(dmac) = neighbour.and_then(|n| n.lladdr.as_deref()).and_then(parse_mac) {
                let flags = if gateway.is_none() { NEXTHOP_ON_LINK } else { 0 };
                out.insert(
                    dst,
                    Resolution::Resolved(NextHop { ifindex: link.ifindex, flags, dmac, smac }),
                );
            } else {
                // To the backend, not the gateway: the kernel then resolves the gateway on
                // the route's own interface. An IPv6 gateway is link-local, and a datagram
                // to it without a scope goes out whichever interface's fe80::/64 comes first.
                probe(dst);
                out.insert(dst, Resolution::NoNeighbour);
            }
        }
        out
    }
}

fn run_ip_batch(script: &str) -> std::io::Result<Vec<serde_json::Value>> {
    let mut child = Command::new("ip")
        .args(["-json", "-details", "-force", "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    child.stdin.take().expect("piped stdin").write_all(script.as_bytes())?;
    let output = child.wait_with_output()?;
    let mut values = Vec::new();
    for value in
        serde_json::Deserializer::from_slice(&output.stdout).into_iter::<serde_json::Value>()
    {
        match value {
            Ok(v) => values.push(v),
            Err(_) => break,
        }
    }
    Ok(values)
}

/// Sends one empty datagram to the discard port of `addr`, which makes the kernel resolve
/// (or refresh) the neighbour entry of its next hop.
fn probe(addr: IpAddr) {
    let bind: SocketAddr =
        if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    if let Ok(socket) = UdpSocket::bind(bind) {
        let _ = socket.send_to(&[], (addr, 9));
        debug!(%addr, "probed neighbour");
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_macs() {
        assert_eq!(parse_mac("02:00:00:00:0a:ff"), Some([2, 0, 0, 0, 10, 255]));
        assert_eq!(parse_mac("02:00:00:00:0a"), None);
        assert_eq!(parse_mac("02:00:00:00:0a:ff:01"), None);
        assert_eq!(parse_mac("zz:00:00:00:0a:ff"), None);
    }

    #[test]
    fn backends_behind_a_device_xdp_cannot_transmit_on_are_warned_about() {
        // A veth and a macvlan on it (as a VLAN subinterface would be: this kernel has no
        // 802.1Q module), a backend behind each: both resolve (the frames would go there),
        // and the macvlan is named in a warning, once: the kernel drops what XDP redirects
        // to it.
        if !crate::health::probe::tests::own_netns(
            "backends_behind_a_device_xdp_cannot_transmit_on_are_warned_about",
        ) {
            return;
        }
        let script = "link add v0 type veth peer name v1\n\
                      link add link v0 name mv0 type macvlan mode bridge\n\
                      link set v0 up\nlink set v1 up\nlink set mv0 up\n\
                      addr add 198.18.7.1/24 dev v0\naddr add 198.18.8.1/24 dev mv0\n\
                      neigh add 198.18.7.11 lladdr 02:00:00:00:07:0b dev v0 nud permanent\n\
                      neigh add 198.18.8.11 lladdr 02:00:00:00:08:0b dev mv0 nud permanent\n";
        let mut child =
            Command::new("ip").args(["-batch", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "setting up the links failed");
        let (plain, tagged): (IpAddr, IpAddr) =
            ("198.18.7.11".parse().unwrap(), "198.18.8.11".parse().unwrap());
        let mut resolver = KernelResolver::default();
        for _ in 0..2 {
            let got = resolver.resolve(&[plain, tagged]);
            assert!(matches!(got[&plain], Resolution::Resolved(_)), "{got:?}");
            assert!(matches!(got[&tagged], Resolution::Resolved(_)), "{got:?}");
        }
        assert_eq!(resolver.warned, ["mv0".to_owned()].into());
    }

    #[test]
    fn static_resolver_answers_what_it_holds() {
        let addr: IpAddr = "198.18.1.11".parse().unwrap();
        let hop = NextHop { ifindex: 3, flags: NEXTHOP_ON_LINK, dmac: [2; 6], smac: [1; 6] };
        let mut r = StaticResolver([(addr, hop)].into());
        let other: IpAddr = "198.18.1.12".parse().unwrap();
        let got = r.resolve(&[addr, other]);
        assert_eq!(got[&addr], Resolution::Resolved(hop));
        assert_eq!(got[&other], Resolution::NoRoute);
    }
}
