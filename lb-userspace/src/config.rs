//! The daemon's TOML configuration: parsing, defaults and validation.
//!
//! Every key is documented in `docs/configuration.md`; unknown keys are errors, so a typo never
//! silently changes behaviour. Validation collects every problem, each with the line and
//! column it comes from and a hint, rather than stopping at the first.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    ops::Range,
    path::Path,
};

use lb_common::{
    conntrack::TimeoutSecs,
    maglev::{MAX_TABLE_SIZE, MIN_SLOTS_PER_BACKEND, is_prime, table_size_for},
    service::{
        DEFAULT_CONNTRACK_ENTRIES, MAX_BACKENDS, MAX_BACKENDS_PER_POOL, MAX_NAT_SOURCES,
        MAX_SERVICES,
    },
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use toml::Spanned;

use crate::datapath::XdpModeSetting;

/// The whole configuration file.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    #[serde(default)]
    pub conntrack: ConntrackConfig,
    #[serde(default)]
    pub api: ApiConfig,
    /// Interfaces the data path is attached to (`[[interface]]` tables).
    #[serde(default, rename = "interface")]
    pub interfaces: Vec<InterfaceConfig>,
    /// Backend pools (`[[pool]]` tables).
    #[serde(default, rename = "pool")]
    pub pools: Vec<PoolConfig>,
    /// Services (`[[service]]` tables).
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceConfig>,
    /// The firewall (`[firewall]`); absent: no filtering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall: Option<FirewallConfig>,
}

/// `[firewall]`: rules in priority order (the first that matches decides) and what happens
/// to packets no rule matches.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FirewallConfig {
    #[serde(default)]
    pub default: Policy,
    /// Count what would be dropped, drop nothing.
    #[serde(default)]
    pub audit: bool,
    #[serde(default, rename = "rule")]
    pub rules: Vec<RuleConfig>,
}

/// The firewall's default policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    #[default]
    Allow,
    Deny,
}

/// What a matching rule does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    Allow,
    Deny,
    /// Admit `rate` packets per second per source address (bursts up to `burst`), drop the
    /// rest.
    RateLimit,
}

impl RuleAction {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::RateLimit => "rate_limit",
        }
    }
}

/// Protocols a rule can name (`icmp` covers ICMP and ICMPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleProtocol {
    Tcp,
    Udp,
    Icmp,
}

/// A port or a range (`80`, `"8000-8080"`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum PortSpec {
    Port(u16),
    Range(String),
}

/// `[[firewall.rule]]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub name: String,
    pub action: RuleAction,
    /// Source prefixes (`198.18.0.0/15`, `fd00::/8`, or single addresses); none: any source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source: Vec<String>,
    /// A file of source prefixes, one per line (`#` starts a comment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_file: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_file: Option<String>,
    /// None: every protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<RuleProtocol>,
    /// Destination ports (TCP and UDP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSpec>,
    /// ICMP and ICMPv6 message types.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub icmp_types: Vec<u8>,
    /// TCP flags that must be set, and with `!` clear: `"syn,!ack"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<String>,
    /// Rate limits: packets per second per source address, and the burst (default: `rate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// Log one matching packet in this many (sampled; the log is also capped per second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<u32>,
}

/// `[daemon]`: settings of the process itself.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    /// Seconds between counter summaries in the log; 0 turns them off.
    #[serde(default = "default_stats_log_interval")]
    pub stats_log_interval_secs: u64,
    /// Seed of the flow hash. Load balancers behind one ECMP group must share it (and the
    /// pools) to pick the same backend for a flow.
    #[serde(default)]
    pub hash_seed: u32,
    /// Directory on bpffs where maps and XDP links are pinned, so the data path keeps
    /// running while `lbd` restarts; empty to pin nothing.
    #[serde(default = "default_pin_dir")]
    pub pin_dir: String,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            stats_log_interval_secs: default_stats_log_interval(),
            hash_seed: 0,
            pin_dir: default_pin_dir(),
        }
    }
}

/// Default pin directory.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";

fn default_pin_dir() -> String {
    DEFAULT_PIN_DIR.to_owned()
}

const fn default_stats_log_interval() -> u64 {
    10
}

/// `[api]`: the REST API and `/metrics`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Address to listen on; loopback by default. Empty turns the API off.
    #[serde(default = "default_api_listen")]
    pub listen: String,
    /// File holding the bearer token every request must carry. It must not be readable by
    /// group or others. Required when `listen` is not a loopback address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<String>,
    /// PEM certificate chain and private key: with both, the API and `/metrics` are served
    /// over TLS (HTTPS) only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<String>,
}

/// Default API address.
pub const DEFAULT_API_LISTEN: &str = "127.0.0.1:7070";

fn default_api_listen() -> String {
    DEFAULT_API_LISTEN.to_owned()
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: default_api_listen(),
            token_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// `[conntrack]`: the connection table's size and idle timeouts.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ConntrackConfig {
    /// Entries (a DSR flow takes one, a NAT flow two); about 184 bytes of kernel memory each.
    #[serde(default = "default_conntrack_entries")]
    pub max_entries: u32,
    #[serde(default = "default_syn_timeout")]
    pub tcp_syn_timeout_secs: u64,
    #[serde(default = "default_established_timeout")]
    pub tcp_established_timeout_secs: u64,
    #[serde(default = "default_closing_timeout")]
    pub tcp_closing_timeout_secs: u64,
    #[serde(default = "default_closed_timeout")]
    pub tcp_closed_timeout_secs: u64,
    #[serde(default = "default_udp_timeout")]
    pub udp_timeout_secs: u64,
}

const fn default_conntrack_entries() -> u32 {
    DEFAULT_CONNTRACK_ENTRIES
}
fn default_syn_timeout() -> u64 {
    TimeoutSecs::default().syn
}
fn default_established_timeout() -> u64 {
    TimeoutSecs::default().established
}
fn default_closing_timeout() -> u64 {
    TimeoutSecs::default().closing
}
fn default_closed_timeout() -> u64 {
    TimeoutSecs::default().closed
}
fn default_udp_timeout() -> u64 {
    TimeoutSecs::default().datagram
}

impl Default for ConntrackConfig {
    fn default() -> Self {
        Self {
            max_entries: default_conntrack_entries(),
            tcp_syn_timeout_secs: default_syn_timeout(),
            tcp_established_timeout_secs: default_established_timeout(),
            tcp_closing_timeout_secs: default_closing_timeout(),
            tcp_closed_timeout_secs: default_closed_timeout(),
            udp_timeout_secs: default_udp_timeout(),
        }
    }
}

impl ConntrackConfig {
    /// The configured timeouts.
    #[must_use]
    pub const fn timeouts(&self) -> TimeoutSecs {
        TimeoutSecs {
            syn: self.tcp_syn_timeout_secs,
            established: self.tcp_established_timeout_secs,
            closing: self.tcp_closing_timeout_secs,
            closed: self.tcp_closed_timeout_secs,
            datagram: self.udp_timeout_secs,
        }
    }
}

/// `[[interface]]`: one interface the XDP program is attached to.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceConfig {
    pub name: Spanned<String>,
    #[serde(default)]
    pub xdp_mode: XdpModeSetting,
}

/// `[[pool]]`: a named set of backends that services send to.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: Spanned<String>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// A new or recovered backend's weight ramps up over this many seconds (0: at once).
    #[serde(default)]
    pub slow_start_secs: u64,
    /// A draining backend's established flows are cut after this many seconds (0: never).
    #[serde(default)]
    pub drain_timeout_secs: u64,
    /// Below this share of healthy backends the pool panics: it sends to every backend,
    /// healthy or not, rather than overload the few left (unless `fail_closed`).
    #[serde(default = "default_min_healthy_share")]
    pub min_healthy_share: f64,
    /// In panic, send only to healthy backends anyway (and to none if none is healthy).
    #[serde(default)]
    pub fail_closed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default, rename = "autoscale", skip_serializing_if = "Vec::is_empty")]
    pub autoscale: Vec<AutoscaleConfig>,
}

fn default_min_healthy_share() -> f64 {
    0.5
}

/// What a health check does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    /// A TCP connection opens.
    Tcp,
    /// An HTTP GET answers with the expected status (and body text).
    Http,
    /// The same over TLS (the certificate is not verified: a check proves service, not
    /// identity).
    Https,
    /// A UDP request gets the expected response.
    Udp,
    /// An external command exits 0.
    Command,
}

/// `[pool.health_check]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    pub kind: CheckKind,
    /// Port to check; by default the backend's port, else the pool's first service port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Interval while a backend is changing state (between its first flip-worthy result and
    /// the flip).
    #[serde(default = "default_fast_interval_ms")]
    pub fast_interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Random delay added to each interval, so checks of many backends do not synchronise.
    #[serde(default = "default_jitter_ms")]
    pub jitter_ms: u64,
    /// Consecutive passes that bring a down backend up.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// HTTP: the path requested.
    #[serde(default = "default_path")]
    pub path: String,
    /// HTTP: the status expected.
    #[serde(default = "default_status")]
    pub expect_status: u16,
    /// HTTP: text the body must contain; UDP: text the response must contain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    /// HTTPS: the server name sent in the TLS handshake (by default none, as for an address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// HTTP/HTTPS: the `Host` header sent (by default the address checked), for backends
    /// that serve virtual hosts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// UDP: the request sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send: Option<String>,
    /// Command: program and arguments; `{address}`, `{port}`, `{pool}` and
    /// `{service_address}` are replaced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

const fn default_interval_ms() -> u64 {
    2000
}
const fn default_fast_interval_ms() -> u64 {
    500
}
const fn default_timeout_ms() -> u64 {
    1000
}
const fn default_jitter_ms() -> u64 {
    200
}
const fn default_rise() -> u32 {
    2
}
const fn default_fall() -> u32 {
    3
}
fn default_path() -> String {
    "/".to_owned()
}
const fn default_status() -> u16 {
    200
}

/// A signal an autoscaling policy watches, per pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Signal {
    NewFlowsPerSecond,
    ActiveFlowsPerBackend,
    BytesPerSecond,
    HealthyBackends,
}

impl Signal {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::NewFlowsPerSecond => "new_flows_per_second",
            Self::ActiveFlowsPerBackend => "active_flows_per_backend",
            Self::BytesPerSecond => "bytes_per_second",
            Self::HealthyBackends => "healthy_backends",
        }
    }
}

/// `[[pool.autoscale]]`: a policy that fires a webhook and/or a command.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleConfig {
    pub name: String,
    pub signal: Signal,
    /// Fire when the signal is above this...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    /// ...or below this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    /// For this long without interruption.
    #[serde(default)]
    pub for_secs: u64,
    /// Then not again for this long.
    #[serde(default = "default_cooldown")]
    pub cooldown_secs: u64,
    /// POST the event here (JSON, signed with HMAC-SHA256 when `secret_file` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<String>,
    /// Run this (the event JSON on standard input).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
}

const fn default_cooldown() -> u64 {
    300
}

/// Weight of a backend that does not set one.
pub const DEFAULT_WEIGHT: u32 = 100;
/// Largest weight: with 10,000 backends the weight total still fits comfortably in a u32.
pub const MAX_WEIGHT: u32 = 65_535;

/// `[[pool.backend]]`: one backend.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    pub address: Spanned<IpAddr>,
    /// Port the backend listens on; by default the port the client used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Spanned<u16>>,
    #[serde(default = "default_weight")]
    pub weight: Spanned<u32>,
    /// `active` takes new flows; `draining` keeps its established flows (until the pool's
    /// `drain_timeout_secs`) but takes no new ones; `disabled` takes none and keeps none.
    #[serde(default, skip_serializing_if = "BackendState::is_active")]
    pub state: BackendState,
}

/// A backend's administrative state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    #[default]
    Active,
    Draining,
    Disabled,
}

impl BackendState {
    #[must_use]
    pub const fn is_active(&self) -> bool {
        matches!(self, Self::Active)
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Draining => "draining",
            Self::Disabled => "disabled",
        }
    }
}

fn default_weight() -> Spanned<u32> {
    Spanned::new(0..0, DEFAULT_WEIGHT)
}

impl BackendConfig {
    #[must_use]
    pub fn port(&self) -> Option<u16> {
        self.port.as_ref().map(|p| *p.get_ref())
    }
}

/// When a service answers SYNs with cookies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SynCookies {
    #[default]
    Off,
    On,
    Auto,
}

impl SynCookies {
    #[must_use]
    pub const fn is_off(&self) -> bool {
        matches!(self, Self::Off)
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::On => "on",
            Self::Auto => "auto",
        }
    }
}

const fn default_syn_threshold() -> u64 {
    1000
}

/// Transport protocol of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    #[must_use]
    pub const fn number(self) -> u8 {
        match self {
            Self::Tcp => lb_common::net::IPPROTO_TCP,
            Self::Udp => lb_common::net::IPPROTO_UDP,
        }
    }

    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        }
    }
}

/// How a service's packets reach its backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum ForwardingMode {
    /// Full NAT: destination and source rewritten; replies come back through the balancer.
    #[serde(rename = "nat")]
    Nat,
    /// Layer-2 direct server return: only the destination MAC changes; backends hold the
    /// service address on a loopback and answer clients directly.
    #[serde(rename = "dsr-l2")]
    DsrL2,
    /// TLS passthrough: the daemon accepts the connection, routes it by the ClientHello's
    /// server name (`[service.tls]`) and relays it, still encrypted, to a backend.
    #[serde(rename = "tls-passthrough")]
    TlsPassthrough,
}

impl ForwardingMode {
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::DsrL2 => "dsr-l2",
            Self::TlsPassthrough => "tls-passthrough",
        }
    }
}

/// What a TLS-passthrough service does with a hello whose server name no route matches, or
/// with one without a server name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SniFallback {
    /// The service's `pool`.
    #[default]
    Default,
    /// Close the connection; nothing reaches a backend.
    Reject,
}

/// How a routed connection's bytes move between the client and the backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RelayMode {
    /// In the kernel: a socket map and a stream-verdict program redirect each socket's bytes
    /// to its partner (splice when the kernel refuses the socket map).
    #[default]
    Sockmap,
    /// `splice(2)` through a pipe: no copy into the daemon's memory, one wake-up per chunk.
    Splice,
}

/// `[[service.tls.route]]`: connections whose server name matches go to `pool`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniRouteConfig {
    /// An exact name (`www.example.com`) or a wildcard (`*.example.com`).
    pub server_name: Spanned<String>,
    pub pool: Spanned<String>,
}

const fn default_hello_timeout_ms() -> u64 {
    10_000
}
const fn default_max_pending() -> u32 {
    1024
}
const fn default_max_pending_per_source() -> u32 {
    64
}
const fn default_connect_attempts() -> u32 {
    3
}

/// `[service.tls]`: the routing policy of a `tls-passthrough` service. See
/// `docs/tls-passthrough.md`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsPassthroughConfig {
    #[serde(default, rename = "route")]
    pub routes: Vec<SniRouteConfig>,
    /// A server name no route matches.
    #[serde(default)]
    pub unknown_sni: SniFallback,
    /// A hello without a server name.
    #[serde(default)]
    pub missing_sni: SniFallback,
    /// If not empty, only names matching one of these patterns are served.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Names matching one of these patterns are refused (before `allow`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
    /// How long a client has to send its whole ClientHello.
    #[serde(default = "default_hello_timeout_ms")]
    pub hello_timeout_ms: u64,
    /// Connections accepted whose hello is not complete yet, at most; more are closed.
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
    /// The same, per client address.
    #[serde(default = "default_max_pending_per_source")]
    pub max_pending_per_source: u32,
    /// Send a PROXY protocol v2 header to the backend first, so it sees the client's address.
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub relay: RelayMode,
    /// Backends tried for one connection, each another: a backend that refuses the
    /// connection or does not answer in time is followed by the next the pool's table gives.
    #[serde(default = "default_connect_attempts")]
    pub connect_attempts: u32,
}

impl Default for TlsPassthroughConfig {
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            unknown_sni: SniFallback::Default,
            missing_sni: SniFallback::Default,
            allow: Vec::new(),
            deny: Vec::new(),
            hello_timeout_ms: default_hello_timeout_ms(),
            max_pending: default_max_pending(),
            max_pending_per_source: default_max_pending_per_source(),
            proxy_protocol: false,
            relay: RelayMode::Sockmap,
            connect_attempts: default_connect_attempts(),
        }
    }
}

/// What the flow hash covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HashInput {
    /// Source and destination address and port, and protocol.
    #[default]
    #[serde(rename = "5-tuple")]
    FiveTuple,
    /// The source address alone: a client sticks to one backend.
    #[serde(rename = "source")]
    Source,
}

/// Default NAT source port range: below the kernel's default ephemeral range (32768-60999),
/// which `lbd` also reserves it from (`ip_local_reserved_ports`).
pub const DEFAULT_NAT_PORTS: (u16, u16) = (20_000, 29_999);

/// `[[service]]`: an address, protocol and port (or every port) balanced over a pool.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    pub name: Spanned<String>,
    pub address: Spanned<IpAddr>,
    pub protocol: Protocol,
    /// The service port; absent means every port of the address and protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<Spanned<u16>>,
    pub pool: Spanned<String>,
    pub mode: ForwardingMode,
    #[serde(default)]
    pub hash: HashInput,
    /// Maglev table size (a prime); by default 65,537, or the first prime at or above 100
    /// slots per backend when the pool has more than 655 backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_size: Option<Spanned<u32>>,
    /// NAT source address (NAT mode): an address of this host the backends route back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_source: Option<Spanned<IpAddr>>,
    /// NAT source ports, `"first-last"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat_ports: Option<Spanned<String>>,
    /// SYN cookies (NAT TCP services): `off`, `on`, or `auto` (on while SYNs arrive faster
    /// than `syn_cookie_threshold` per second).
    #[serde(default, skip_serializing_if = "SynCookies::is_off")]
    pub syn_cookies: SynCookies,
    #[serde(default = "default_syn_threshold")]
    pub syn_cookie_threshold: u64,
    /// The routing policy of a `tls-passthrough` service (defaults when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsPassthroughConfig>,
}

impl ServiceConfig {
    /// Whether the XDP data path balances this service (TLS passthrough services are served
    /// by the daemon: their packets go to the host's stack).
    #[must_use]
    pub fn in_data_path(&self) -> bool {
        self.mode != ForwardingMode::TlsPassthrough
    }

    #[must_use]
    pub fn port(&self) -> Option<u16> {
        self.port.as_ref().map(|p| *p.get_ref())
    }

    /// The NAT port range (validated configurations only).
    #[must_use]
    pub fn nat_port_range(&self) -> (u16, u16) {
        self.nat_ports
            .as_ref()
            .and_then(|r| parse_port_range(r.get_ref()).ok())
            .unwrap_or(DEFAULT_NAT_PORTS)
    }
}

/// A configuration that cannot be used, with where and why.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("failed to read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {} problem(s):\n  {}", .problems.len(), .problems.join("\n  "))]
    Invalid { path: String, problems: Vec<String> },
}

impl Config {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_with_text(path).map(|(config, _)| config)
    }

    /// [`Config::load`], also returning the file's text as read (the daemon keeps a digest
    /// of it, to notice later edits).
    pub fn load_with_text(path: &Path) -> Result<(Self, String), ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
        let config = Self::parse(&text, &path.display().to_string())?;
        Ok((config, text))
    }

    /// Parses and validates configuration text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: origin.to_owned(),
            message: describe_toml_error(text, &error),
        })?;
        let problems = config.problems(text);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid { path: origin.to_owned(), problems })
        }
    }

    /// Validates a configuration built in memory (by the API); problems carry no positions.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let problems = self.problems("");
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// The configuration as TOML (comments and layout of an original file are not kept).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }

    /// The pool called `name`.
    #[must_use]
    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.iter().find(|p| p.name.get_ref() == name)
    }

    /// Every validation problem, each a sentence with its position and a hint.
    fn problems(&self, text: &str) -> Vec<String> {
        let mut p = Problems { text, list: Vec::new() };
        self.check_interfaces(&mut p);
        self.check_api(&mut p);
        self.check_conntrack(&mut p);
        self.check_pools(&mut p);
        self.check_services(&mut p);
        if let Some(firewall) = &self.firewall {
            for problem in crate::firewall::check(firewall) {
                p.add(None, &problem);
            }
        }
        p.list
    }

    fn check_interfaces(&self, p: &mut Problems<'_>) {
        if self.interfaces.is_empty() {
            p.add(None, "no interfaces: add an `[[interface]]` table with the `name` of an interface to attach to");
        }
        let mut seen = HashSet::new();
        for interface in &self.interfaces {
            let name = interface.name.get_ref();
            if !is_valid_ifname(name) {
                p.add(
                    Some(interface.name.span()),
                    &format!("interface name {name:?} is not valid (1-15 characters, no '/', ':' or whitespace)"),
                );
            }
            if !seen.insert(name) {
                p.add(
                    Some(interface.name.span()),
                    &format!("interface {name:?} is listed twice; list each interface once"),
                );
            }
        }
    }

    fn check_api(&self, p: &mut Problems<'_>) {
        let listen = &self.api.listen;
        if listen.is_empty() {
            return;
        }
        match listen.parse::<std::net::SocketAddr>() {
            Err(_) => p.add(None, &format!("api.listen {listen:?} is not an address and port like \"127.0.0.1:7070\"")),
            Ok(addr) if !addr.ip().is_loopback() && self.api.token_file.is_none() => p.add(
                None,
                &format!("api.listen {addr} is not a loopback address: set api.token_file so requests need a token"),
            ),
            Ok(_) => {}
        }
        if self.api.tls_cert_file.is_some() != self.api.tls_key_file.is_some() {
            p.add(None, "api.tls_cert_file and api.tls_key_file go together: set both or neither");
        }
    }

    fn check_conntrack(&self, p: &mut Problems<'_>) {
        let c = &self.conntrack;
        if !(1024..=1 << 27).contains(&c.max_entries) {
            p.add(
                None,
                &format!(
                    "conntrack.max_entries {} is out of range; use 1024 to 134217728",
                    c.max_entries
                ),
            );
        }
        for (key, value) in [
            ("tcp_syn_timeout_secs", c.tcp_syn_timeout_secs),
            ("tcp_established_timeout_secs", c.tcp_established_timeout_secs),
            ("tcp_closing_timeout_secs", c.tcp_closing_timeout_secs),
            ("tcp_closed_timeout_secs", c.tcp_closed_timeout_secs),
            ("udp_timeout_secs", c.udp_timeout_secs),
        ] {
            if value == 0 || value > 30 * 86_400 {
                p.add(
                    None,
                    &format!(
                        "conntrack.{key} = {value} is out of range; use 1 to 2592000 (30 days)"
                    ),
                );
            }
        }
    }

    fn check_pools(&self, p: &mut Problems<'_>) {
        let mut names = HashSet::new();
        let mut total = 0usize;
        for pool in &self.pools {
            let name = pool.name.get_ref();
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                p.add(
                    Some(pool.name.span()),
                    &format!(
                        "pool name {name:?} is not valid; use 1-64 letters, digits, '-', '_' or '.'"
                    ),
                );
            }
            if !names.insert(name) {
                p.add(
                    Some(pool.name.span()),
                    &format!("pool {name:?} is defined twice; give each pool a unique name"),
                );
            }
            if pool.backends.len() > MAX_BACKENDS_PER_POOL as usize {
                p.add(Some(pool.name.span()), &format!("pool {name:?} has {} backends; at most {MAX_BACKENDS_PER_POOL} are allowed", pool.backends.len()));
            }
            total += pool.backends.len();
            check_pool_lifecycle(pool, p);
            self.check_health_port(pool, p);
            let mut seen = HashSet::new();
            for backend in &pool.backends {
                let addr = *backend.address.get_ref();
                if !seen.insert((addr, backend.port())) {
                    p.add(
                        Some(backend.address.span()),
                        &format!(
                            "backend {addr} ({}) appears twice in pool {name:?}",
                            port_words(backend.port())
                        ),
                    );
                }
                if let Some(why) = not_a_host(addr) {
                    p.add(
                        Some(backend.address.span()),
                        &format!("backend address {addr} is not a unicast host address: {why}"),
                    );
                }
                if backend.port().is_some_and(|port| port == 0) {
                    p.add(
                        backend.port.as_ref().map(Spanned::span),
                        "backend port 0 is not valid; leave `port` out to keep the client's port",
                    );
                }
                if *backend.weight.get_ref() > MAX_WEIGHT {
                    p.add(
                        Some(backend.weight.span()),
                        &format!(
                            "weight {} is above the maximum {MAX_WEIGHT}",
                            backend.weight.get_ref()
                        ),
                    );
                }
            }
        }
        if total > MAX_BACKENDS as usize {
            p.add(None, &format!("{total} backends in all; at most {MAX_BACKENDS} are allowed"));
        }
    }

    /// The port a backend's health checks go to: the check's own, else the backend's, else
    /// the first port of a service using the pool.
    #[must_use]
    pub fn health_check_port(&self, pool: &PoolConfig, backend: &BackendConfig) -> Option<u16> {
        let check = pool.health_check.as_ref()?;
        check.port.or(backend.port()).or_else(|| {
            self.services
                .iter()
                .filter(|s| s.pool.get_ref() == pool.name.get_ref())
                .find_map(ServiceConfig::port)
        })
    }

    fn check_health_port(&self, pool: &PoolConfig, p: &mut Problems<'_>) {
        let Some(check) = &pool.health_check else { return };
        if check.kind == CheckKind::Command {
            return;
        }
        if let Some(backend) =
            pool.backends.iter().find(|b| self.health_check_port(pool, b).is_none())
        {
            p.add(
                Some(backend.address.span()),
                &format!(
                    "pool {:?}: no port to health-check backend {}; set `port` in the pool's `health_check`",
                    pool.name.get_ref(),
                    backend.address.get_ref()
                ),
            );
        }
    }

    fn check_services(&self, p: &mut Problems<'_>) {
        if self.services.len() > MAX_SERVICES as usize {
            p.add(
                None,
                &format!("{} services; at most {MAX_SERVICES} are allowed", self.services.len()),
            );
        }
        let nat_sources: HashSet<IpAddr> = self
            .services
            .iter()
            .filter(|s| s.mode == ForwardingMode::Nat)
            .filter_map(|s| s.nat_source.as_ref().map(|a| *a.get_ref()))
            .collect();
        if nat_sources.len() > MAX_NAT_SOURCES as usize {
            p.add(
                None,
                &format!(
                    "{} distinct nat_source addresses; at most {MAX_NAT_SOURCES} are allowed",
                    nat_sources.len()
                ),
            );
        }
        let mut names = HashSet::new();
        let mut keys: HashMap<(IpAddr, Protocol, Option<u16>), &str> = HashMap::new();
        for service in &self.services {
            let name = service.name.get_ref();
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                p.add(Some(service.name.span()), &format!("service name {name:?} is not valid; use 1-64 letters, digits, '-', '_' or '.'"));
            }
            if !names.insert(name) {
                p.add(
                    Some(service.name.span()),
                    &format!("service {name:?} is defined twice; give each service a unique name"),
                );
            }
            let addr = *service.address.get_ref();
            if let Some(why) = not_a_host(addr) {
                p.add(
                    Some(service.address.span()),
                    &format!("service address {addr} is not a unicast address: {why}"),
                );
            }
            if service.port().is_some_and(|port| port == 0) {
                p.add(
                    service.port.as_ref().map(Spanned::span),
                    "service port 0 is not valid; leave `port` out for a service on every port",
                );
            }
            if let Some(other) = keys.insert((addr, service.protocol, service.port()), name) {
                p.add(
                    Some(service.address.span()),
                    &format!(
                        "services {other:?} and {name:?} both claim {addr} {} port {:?}",
                        service.protocol.name(),
                        service.port()
                    ),
                );
            }
            self.check_service_pool(service, p);
            check_service_mode(service, p);
            self.check_nat_source(service, p);
            self.check_routes(service, p);
        }
        self.check_passthrough_addresses(p);
    }

    /// A NAT source is where backends send their replies: a unicast address that is not the
    /// address of one of the service's own backends.
    fn check_nat_source(&self, service: &ServiceConfig, p: &mut Problems<'_>) {
        let Some(source) =
            service.nat_source.as_ref().filter(|_| service.mode == ForwardingMode::Nat)
        else {
            return;
        };
        let addr = *source.get_ref();
        if let Some(why) = not_a_host(addr) {
            p.add(
                Some(source.span()),
                &format!(
                    "nat_source {addr} is not a unicast address ({why}); backends must be able to answer it"
                ),
            );
        }
        if let Some(pool) = self
            .pool(service.pool.get_ref())
            .filter(|pool| pool.backends.iter().any(|b| *b.address.get_ref() == addr))
        {
            p.add(
                Some(source.span()),
                &format!("nat_source {addr} is a backend's address (pool {:?}): that backend would send its replies to itself; use an address of this host", pool.name.get_ref()),
            );
        }
    }

    fn check_service_pool(&self, service: &ServiceConfig, p: &mut Problems<'_>) {
        let name = service.name.get_ref();
        let pool_name = service.pool.get_ref();
        let Some(pool) = self.pool(pool_name) else {
            let known: Vec<&str> = self.pools.iter().map(|p| p.name.get_ref().as_str()).collect();
            p.add(Some(service.pool.span()), &format!("service {name:?} uses pool {pool_name:?}, which is not defined (pools: {known:?})"));
            return;
        };
        let v4 = service.address.get_ref().is_ipv4();
        for backend in &pool.backends {
            let addr = backend.address.get_ref();
            // Services the data path balances (a passthrough service's address is only
            // steered at its port, and the daemon connects to backends with plain sockets).
            if let Some(other) =
                self.services.iter().find(|s| s.in_data_path() && s.address.get_ref() == addr)
            {
                p.add(
                    Some(backend.address.span()),
                    &format!(
                        "backend {addr} of pool {pool_name:?} is the address of service {:?}: its packets would come back to the load balancer; use the backend's own address",
                        other.name.get_ref()
                    ),
                );
            }
            if backend.address.get_ref().is_ipv4() != v4 {
                p.add(
                    Some(backend.address.span()),
                    &format!(
                        "backend {} of pool {pool_name:?} is not the same address family as service {name:?} ({}); \
                         use one pool per family",
                        backend.address.get_ref(),
                        service.address.get_ref()
                    ),
                );
            }
            if service.mode == ForwardingMode::DsrL2
                && backend.port().is_some_and(|bp| Some(bp) != service.port())
            {
                p.add(
                    backend.port.as_ref().map(Spanned::span),
                    &format!("service {name:?} is dsr-l2, which cannot change ports; backends of pool {pool_name:?} must use the service port (leave `port` out)"),
                );
            }
        }
        let backends = u32::try_from(pool.backends.len()).unwrap_or(u32::MAX);
        if let Some(size) = &service.table_size {
            let size_value = *size.get_ref();
            if !is_prime(size_value) || size_value > MAX_TABLE_SIZE {
                p.add(Some(size.span()), &format!("table_size {size_value} must be a prime no larger than {MAX_TABLE_SIZE} (65537 is the default)"));
            } else if u64::from(size_value) < u64::from(backends) * u64::from(MIN_SLOTS_PER_BACKEND)
            {
                let suggestion = table_size_for(backends)
                    .map_or_else(|| "none fits".to_owned(), |s| s.to_string());
                p.add(
                    Some(size.span()),
                    &format!("table_size {size_value} gives {backends} backends fewer than {MIN_SLOTS_PER_BACKEND} slots each; use at least {suggestion}"),
                );
            }
        }
    }

    /// TLS passthrough services fit the listener map, and no all-ports TCP service of the
    /// data path shares their address (XDP would take their port before the host stack).
    fn check_passthrough_addresses(&self, p: &mut Problems<'_>) {
        use lb_common::passthrough::MAX_LISTENERS;
        let passthrough: Vec<&ServiceConfig> =
            self.services.iter().filter(|s| s.mode == ForwardingMode::TlsPassthrough).collect();
        if passthrough.len() > MAX_LISTENERS as usize {
            p.add(
                None,
                &format!(
                    "{} tls-passthrough services; at most {MAX_LISTENERS} are allowed",
                    passthrough.len()
                ),
            );
        }
        for service in passthrough {
            let addr = service.address.get_ref();
            if let Some(other) = self.services.iter().find(|o| {
                o.in_data_path()
                    && o.protocol == Protocol::Tcp
                    && o.port().is_none()
                    && o.address.get_ref() == addr
            }) {
                p.add(
                    Some(service.address.span()),
                    &format!(
                        "service {:?} (tls-passthrough) shares {addr} with {:?}, which takes every TCP port of it; give one of them another address",
                        service.name.get_ref(),
                        other.name.get_ref()
                    ),
                );
            }
        }
    }

    /// A `[service.tls]` belongs to a `tls-passthrough` service, and its routes' pools
    /// exist and hold the service's address family.
    fn check_routes(&self, service: &ServiceConfig, p: &mut Problems<'_>) {
        let name = service.name.get_ref();
        let Some(tls) = &service.tls else { return };
        if service.mode != ForwardingMode::TlsPassthrough {
            p.add(Some(service.name.span()), &format!("service {name:?} has a `[service.tls]` table but is {}; set mode = \"tls-passthrough\" or remove the table", service.mode.name()));
        }
        let v4 = service.address.get_ref().is_ipv4();
        for route in &tls.routes {
            let pool_name = route.pool.get_ref();
            match self.pool(pool_name) {
                None => p.add(Some(route.pool.span()), &format!("service {name:?}: route {:?} uses pool {pool_name:?}, which is not defined", route.server_name.get_ref())),
                Some(pool) => {
                    if pool.backends.iter().any(|b| b.address.get_ref().is_ipv4() != v4) {
                        p.add(Some(route.pool.span()), &format!("service {name:?}: pool {pool_name:?} of route {:?} has backends of another address family than the service", route.server_name.get_ref()));
                    }
                }
            }
        }
    }

    /// The Maglev table size of a (validated) service.
    #[must_use]
    pub fn table_size(&self, service: &ServiceConfig) -> u32 {
        if let Some(size) = &service.table_size {
            return *size.get_ref();
        }
        let backends = self.pool(service.pool.get_ref()).map_or(0, |p| p.backends.len());
        table_size_for(u32::try_from(backends).unwrap_or(u32::MAX)).unwrap_or(MAX_TABLE_SIZE)
    }
}

fn check_pool_lifecycle(pool: &PoolConfig, p: &mut Problems<'_>) {
    let name = pool.name.get_ref();
    let at = Some(pool.name.span());
    if !(0.0..=1.0).contains(&pool.min_healthy_share) {
        p.add(
            at.clone(),
            &format!(
                "pool {name:?}: min_healthy_share {} must be between 0 and 1",
                pool.min_healthy_share
            ),
        );
    }
    if pool.slow_start_secs > 3600 || pool.drain_timeout_secs > 86_400 * 7 {
        p.add(at.clone(), &format!("pool {name:?}: slow_start_secs is at most 3600 and drain_timeout_secs at most 604800"));
    }
    if let Some(hc) = &pool.health_check {
        if hc.interval_ms < 50 || hc.fast_interval_ms < 50 || hc.timeout_ms == 0 {
            p.add(at.clone(), &format!("pool {name:?}: health_check intervals are at least 50 ms and timeout_ms above 0"));
        }
        if hc.timeout_ms > hc.interval_ms.max(hc.fast_interval_ms) {
            p.add(
                at.clone(),
                &format!("pool {name:?}: health_check timeout_ms must not exceed the interval"),
            );
        }
        if hc.rise == 0 || hc.fall == 0 || hc.rise > 100 || hc.fall > 100 {
            p.add(at.clone(), &format!("pool {name:?}: health_check rise and fall are 1 to 100"));
        }
        if hc.port == Some(0) {
            p.add(at.clone(), &format!("pool {name:?}: health_check port must be 1 to 65535"));
        }
        // Informational answers other than 101 are never final (a check waits past them).
        if !(100..=599).contains(&hc.expect_status) || matches!(hc.expect_status, 100 | 102..=199) {
            p.add(
                at.clone(),
                &format!("pool {name:?}: health_check expect_status must be 101 or 200 to 599 (other 1xx answers are never final)"),
            );
        }
        if let Some(sni) = &hc.sni {
            if hc.kind != CheckKind::Https {
                p.add(at.clone(), &format!("pool {name:?}: health_check sni is for https checks"));
            } else if rustls::pki_types::ServerName::try_from(sni.as_str()).is_err() {
                p.add(
                    at.clone(),
                    &format!(
                        "pool {name:?}: health_check sni {sni:?} is not a DNS name or address"
                    ),
                );
            }
        }
        match hc.kind {
            CheckKind::Command if hc.command.is_empty() => {
                p.add(
                    at.clone(),
                    &format!(
                        "pool {name:?}: a command health check needs `command = [\"program\", ...]`"
                    ),
                );
            }
            CheckKind::Udp if hc.send.is_none() => {
                p.add(
                    at.clone(),
                    &format!(
                        "pool {name:?}: a udp health check needs `send` (and usually `expect`)"
                    ),
                );
            }
            CheckKind::Http | CheckKind::Https if !hc.path.starts_with('/') => {
                p.add(at.clone(), &format!("pool {name:?}: health_check path must start with '/'"));
            }
            _ => {}
        }
        // Both go into the request line and headers as they are.
        let header_safe = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
        if !header_safe(&hc.path) {
            p.add(
                at.clone(),
                &format!("pool {name:?}: health_check path must be printable ASCII without spaces"),
            );
        }
        if let Some(host) = &hc.host {
            if !matches!(hc.kind, CheckKind::Http | CheckKind::Https) {
                p.add(
                    at.clone(),
                    &format!("pool {name:?}: health_check host is for http and https checks"),
                );
            } else if !header_safe(host) {
                p.add(
                    at.clone(),
                    &format!("pool {name:?}: health_check host {host:?} must be printable ASCII without spaces"),
                );
            }
        }
    }
    let mut names = HashSet::new();
    for policy in &pool.autoscale {
        if !names.insert(&policy.name) {
            p.add(
                at.clone(),
                &format!("pool {name:?}: autoscale policy {:?} is defined twice", policy.name),
            );
        }
        if policy.above.or(policy.below).is_some_and(|t| !t.is_finite()) {
            p.add(
                at.clone(),
                &format!(
                    "pool {name:?}: autoscale policy {:?} needs a finite threshold",
                    policy.name
                ),
            );
        }
        if policy.above.is_some() == policy.below.is_some() {
            p.add(
                at.clone(),
                &format!(
                    "pool {name:?}: autoscale policy {:?} needs exactly one of `above` and `below`",
                    policy.name
                ),
            );
        }
        if policy.webhook.is_none() && policy.command.is_empty() {
            p.add(
                at.clone(),
                &format!(
                    "pool {name:?}: autoscale policy {:?} needs a `webhook` or a `command`",
                    policy.name
                ),
            );
        }
        if let Some(url) = &policy.webhook
            && !url.starts_with("http://")
            && !url.starts_with("https://")
        {
            p.add(
                at.clone(),
                // Not the URL itself: webhooks carry tokens in their paths.
                &format!(
                    "pool {name:?}: an autoscale webhook is not an http(s) URL ({})",
                    crate::autoscale::redacted(url)
                ),
            );
        }
    }
}

fn check_service_mode(service: &ServiceConfig, p: &mut Problems<'_>) {
    let name = service.name.get_ref();
    if !service.syn_cookies.is_off() {
        if service.protocol != Protocol::Tcp {
            p.add(
                Some(service.name.span()),
                &format!("service {name:?}: syn_cookies applies to TCP services"),
            );
        }
        if service.mode != ForwardingMode::Nat {
            p.add(Some(service.name.span()), &format!("service {name:?}: syn_cookies needs mode = \"nat\": with DSR the backend answers the client directly, so nothing can reconcile its sequence numbers with the cookie the client saw"));
        }
        if service.syn_cookie_threshold == 0 {
            p.add(
                Some(service.name.span()),
                &format!("service {name:?}: syn_cookie_threshold must be above 0"),
            );
        }
    }
    match service.mode {
        ForwardingMode::Nat => {
            match &service.nat_source {
                None => p.add(
                    Some(service.name.span()),
                    &format!("service {name:?} is nat but has no `nat_source`; set it to an address of this host the backends route back to"),
                ),
                Some(source) if source.get_ref().is_ipv4() != service.address.get_ref().is_ipv4() => p.add(
                    Some(source.span()),
                    &format!("nat_source {} is not the same address family as service {name:?}", source.get_ref()),
                ),
                Some(_) => {}
            }
            if let Some(range) = &service.nat_ports
                && let Err(message) = parse_port_range(range.get_ref())
            {
                p.add(Some(range.span()), &message);
            }
        }
        ForwardingMode::TlsPassthrough => check_passthrough(service, p),
        ForwardingMode::DsrL2 => {
            if let Some(source) = &service.nat_source {
                p.add(
                    Some(source.span()),
                    &format!(
                        "service {name:?} is dsr-l2; `nat_source` only applies to nat services"
                    ),
                );
            }
            if let Some(range) = &service.nat_ports {
                p.add(
                    Some(range.span()),
                    &format!(
                        "service {name:?} is dsr-l2; `nat_ports` only applies to nat services"
                    ),
                );
            }
        }
    }
}

/// The checks of a `tls-passthrough` service that need nothing but the service (its routes'
/// pools are checked with the pools).
fn check_passthrough(service: &ServiceConfig, p: &mut Problems<'_>) {
    use crate::passthrough::routes::{Routes, is_valid_pattern};
    let name = service.name.get_ref();
    let at = Some(service.name.span());
    if service.protocol != Protocol::Tcp || service.port().is_none() {
        p.add(
            at.clone(),
            &format!(
                "service {name:?} is tls-passthrough, which needs protocol = \"tcp\" and a `port`"
            ),
        );
    }
    if service.nat_source.is_some() || service.nat_ports.is_some() {
        p.add(at.clone(), &format!("service {name:?} is tls-passthrough; `nat_source` and `nat_ports` only apply to nat services (the daemon connects to backends from the host's own addresses)"));
    }
    let Some(tls) = &service.tls else { return };
    // Duplicates as the routing table judges them (case and a final dot do not count).
    let mut seen = Routes::new();
    for route in &tls.routes {
        let pattern = route.server_name.get_ref();
        if let Err(message) = is_valid_pattern(pattern) {
            p.add(
                Some(route.server_name.span()),
                &format!("service {name:?}: server_name {pattern:?}: {message}"),
            );
        } else if seen.insert(pattern, ()).is_err() {
            p.add(Some(route.server_name.span()), &format!("service {name:?}: server_name {pattern:?} is routed twice; keep one route per name"));
        }
    }
    for pattern in tls.allow.iter().chain(&tls.deny) {
        if let Err(message) = is_valid_pattern(pattern) {
            p.add(
                at.clone(),
                &format!("service {name:?}: allow/deny pattern {pattern:?}: {message}"),
            );
        }
    }
    if !(100..=300_000).contains(&tls.hello_timeout_ms) {
        p.add(
            at.clone(),
            &format!(
                "service {name:?}: hello_timeout_ms {} is out of range; use 100 to 300000",
                tls.hello_timeout_ms
            ),
        );
    }
    if !(1..=65_536).contains(&tls.max_pending) || tls.max_pending_per_source == 0 {
        p.add(
            at.clone(),
            &format!(
                "service {name:?}: max_pending is 1 to 65536 and max_pending_per_source at least 1"
            ),
        );
    }
    if !(1..=MAX_CONNECT_ATTEMPTS).contains(&tls.connect_attempts) {
        p.add(
            at,
            &format!(
                "service {name:?}: connect_attempts {} is out of range; use 1 to {MAX_CONNECT_ATTEMPTS}",
                tls.connect_attempts
            ),
        );
    }
}

/// Backends a passthrough connection may try, at most: each attempt may wait out the
/// connect timeout while the client waits.
pub const MAX_CONNECT_ATTEMPTS: u32 = 8;

/// Parses `"first-last"` into a port range of at least one port, above 1023.
fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let bad = || {
        format!(
            "nat_ports {text:?} is not a range like \"20000-29999\" (ports 1024-65535, first <= last)"
        )
    };
    let (a, b) = text.split_once('-').ok_or_else(bad)?;
    let first: u16 = a.trim().parse().map_err(|_| bad())?;
    let last: u16 = b.trim().parse().map_err(|_| bad())?;
    if first < 1024 || first > last {
        return Err(bad());
    }
    Ok((first, last))
}

/// Collects problems with their positions.
struct Problems<'a> {
    text: &'a str,
    list: Vec<String>,
}

impl Problems<'_> {
    fn add(&mut self, span: Option<Range<usize>>, message: &str) {
        match span.filter(|s| s.end > 0 && !self.text.is_empty()) {
            Some(span) => {
                let (line, column) = position(self.text, span.start);
                self.list.push(format!("line {line}, column {column}: {message}"));
            }
            None => self.list.push(message.to_owned()),
        }
    }
}

fn is_valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// Line and column (both from 1) of byte `offset` in `text`.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// Renders a TOML error as `line L, column C: message`.
fn describe_toml_error(text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end();
    match error.span() {
        Some(span) => {
            let (line, column) = position(text, span.start);
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

/// Why `addr` cannot be one host's address (a backend, a service, a NAT source), if it
/// cannot: the data path matches addresses exactly, so an address standing for several
/// hosts or none, or an IPv4 address written as IPv6, would never match what arrives.
#[must_use]
pub fn not_a_host(addr: IpAddr) -> Option<&'static str> {
    match addr {
        _ if addr.is_unspecified() => Some("unspecified"),
        _ if addr.is_multicast() => Some("multicast"),
        _ if addr.is_loopback() => Some("loopback"),
        IpAddr::V4(a) if a.is_broadcast() => Some("broadcast"),
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped IPv6 address; write the IPv4 address itself")
        }
        // Meaningful on one link only, and lbd stores no scope: checks, passthrough connects
        // and route lookups could not tell which link.
        IpAddr::V6(a) if a.is_unicast_link_local() => {
            Some("link-local; use a global or unique-local (fd00::/8) address")
        }
        _ => None,
    }
}

/// A backend's port as an error message says it.
#[must_use]
pub fn port_words(port: Option<u16>) -> String {
    port.map_or_else(|| "without a port".to_owned(), |port| format!("port {port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[[interface]]
name = "eth0"

[[pool]]
name = "web"
[[pool.backend]]
address = "198.18.1.11"
[[pool.backend]]
address = "198.18.1.12"
port = 8080
weight = 200

[[service]]
name = "web"
address = "198.18.100.1"
protocol = "tcp"
port = 80
pool = "web"
mode = "nat"
nat_source = "198.18.1.1"
"#;

    #[test]
    fn parses_a_minimal_config() {
        let config = Config::parse("[[interface]]\nname = \"eth0\"\n", "test").unwrap();
        assert_eq!(config.interfaces.len(), 1);
        assert_eq!(config.interfaces[0].xdp_mode, XdpModeSetting::Auto);
        assert_eq!(config.daemon.stats_log_interval_secs, 10);
        assert_eq!(config.conntrack.timeouts(), TimeoutSecs::default());
    }

    #[test]
    fn parses_pools_and_services_with_defaults() {
        let config = Config::parse(FULL, "t").unwrap();
        let service = &config.services[0];
        assert_eq!(service.mode, ForwardingMode::Nat);
        assert_eq!(service.hash, HashInput::FiveTuple);
        assert_eq!(service.nat_port_range(), DEFAULT_NAT_PORTS);
        assert_eq!(config.table_size(service), 65_537);
        let pool = config.pool("web").unwrap();
        assert_eq!(*pool.backends[0].weight.get_ref(), DEFAULT_WEIGHT);
        assert_eq!(pool.backends[1].port(), Some(8080));
    }

    #[test]
    fn more_nat_sources_than_the_data_path_holds_are_refused_by_check_config() {
        // The data path's NAT_SOURCES holds 256 addresses: a 257th was accepted here and
        // refused by lbd at start, with advice ("two steps") a start cannot follow.
        let services = |n: usize| {
            (0..n).fold(String::new(), |text, i| {
                text + &format!(
                    "[[service]]\nname = \"s{i}\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = {}\npool = \"web\"\nmode = \"nat\"\nnat_source = \"198.19.{}.{}\"\n",
                    1000 + i,
                    i / 256,
                    i % 256
                )
            })
        };
        let pool = "[[interface]]\nname = \"eth0\"\n[[pool]]\nname = \"web\"\n[[pool.backend]]\naddress = \"198.18.1.11\"\n";
        let max = MAX_NAT_SOURCES as usize;
        assert!(Config::parse(&format!("{pool}{}", services(max)), "t").is_ok());
        let error = Config::parse(&format!("{pool}{}", services(max + 1)), "t").unwrap_err();
        assert!(
            error.to_string().contains("257 distinct nat_source addresses; at most 256"),
            "{error}"
        );
    }

    #[test]
    fn reports_line_and_column_of_unknown_keys() {
        let text = "[[interface]]\nname = \"eth0\"\nxdp_mod = \"driver\"\n";
        let error = Config::parse(text, "lb.toml").unwrap_err().to_string();
        assert!(error.starts_with("lb.toml: line 3, column 1:"), "{error}");
        assert!(error.contains("xdp_mod"), "{error}");
    }

    #[test]
    fn rejects_bad_modes_with_position() {
        let text = "[[interface]]\nname = \"eth0\"\nxdp_mode = \"turbo\"\n";
        let error = Config::parse(text, "lb.toml").unwrap_err().to_string();
        assert!(error.contains("line 3, column 12"), "{error}");
        assert!(error.contains("auto"), "{error}");
    }

    #[test]
    fn reports_every_problem_with_its_position() {
        let text = FULL
            .replace("pool = \"web\"", "pool = \"webb\"")
            .replace(
                "nat_source = \"198.18.1.1\"",
                "nat_source = \"fd00::1\"\nnat_ports = \"80-90\"",
            )
            .replace("weight = 200", "weight = 70000");
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&text, "t") else {
            panic!("expected validation errors");
        };
        assert_eq!(problems.len(), 4, "{problems:#?}");
        assert!(
            problems.iter().any(|p| p.contains("pool \"webb\", which is not defined")
                && p.starts_with("line 19, column 8")),
            "{problems:#?}"
        );
        assert!(problems.iter().any(|p| p.contains("weight 70000")), "{problems:#?}");
        assert!(
            problems
                .iter()
                .any(|p| p.contains("nat_source fd00::1 is not the same address family")),
            "{problems:#?}"
        );
        assert!(problems.iter().any(|p| p.contains("nat_ports \"80-90\"")), "{problems:#?}");
    }

    #[test]
    fn backend_and_service_addresses_are_one_hosts() {
        for (bad, why) in [
            ("0.0.0.0", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("127.0.0.1", "loopback"),
        ] {
            for (field, text) in [
                ("backend", FULL.replace("\"198.18.1.11\"", &format!("\"{bad}\""))),
                ("service", FULL.replace("\"198.18.100.1\"", &format!("\"{bad}\""))),
            ] {
                let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&text, "t") else {
                    panic!("{field} address {bad} accepted");
                };
                let expected = format!("{field} address {bad} is not a unicast");
                assert!(
                    problems.iter().any(|p| p.contains(&expected) && p.contains(why)),
                    "{field} {bad}: {problems:#?}"
                );
            }
        }
        // An IPv4 address written as IPv6 would never match a packet's address.
        let mapped = "[[interface]]\nname = \"eth0\"\n[[pool]]\nname = \"six\"\n[[pool.backend]]\naddress = \"::ffff:198.18.1.11\"\n";
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(mapped, "t") else {
            panic!("an IPv4-mapped backend accepted");
        };
        assert!(problems[0].contains("write the IPv4 address itself"), "{problems:#?}");
        // A link-local one holds no scope: no check, connect or route could use it.
        let local = mapped.replace("::ffff:198.18.1.11", "fe80::11");
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&local, "t") else {
            panic!("a link-local backend accepted");
        };
        assert!(problems[0].contains("link-local"), "{problems:#?}");
        // Duplicates are named in words, not as Rust values.
        let twice = FULL.replace("\"198.18.1.12\"\nport = 8080", "\"198.18.1.11\"");
        let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&twice, "t") else {
            panic!("a backend listed twice accepted");
        };
        assert!(
            problems[0].contains("backend 198.18.1.11 (without a port) appears twice"),
            "{problems:#?}"
        );
    }

    #[test]
    fn a_nat_source_is_a_unicast_address_no_backend_has() {
        for (source, expected) in [
            ("0.0.0.0", "not a unicast address"),
            ("224.0.0.1", "not a unicast address"),
            ("127.0.0.1", "not a unicast address"),
            ("255.255.255.255", "not a unicast address"),
            ("198.18.1.12", "is a backend's address (pool \"web\")"),
        ] {
            let text =
                FULL.replace("nat_source = \"198.18.1.1\"", &format!("nat_source = \"{source}\""));
            let Err(ConfigError::Invalid { problems, .. }) = Config::parse(&text, "t") else {
                panic!("nat_source {source} accepted");
            };
            assert!(
                problems.len() == 1
                    && problems[0].contains(expected)
                    && problems[0].starts_with("line 2"),
                "{source}: {problems:#?}"
            );
        }
    }

    #[test]
    fn refuses_checks_thresholds_and_backends_that_cannot_work() {
        let problems = |text: &str| match Config::parse(text, "t") {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            other => panic!("accepted: {other:?}"),
        };
        let check = |settings: &str| {
            FULL.replace(
                "name = \"web\"\n[[pool.backend]]",
                &format!("name = \"web\"\n[pool.health_check]\n{settings}\n[[pool.backend]]"),
            )
        };
        assert!(Config::parse(&check("kind = \"https\"\nsni = \"api.example.com\""), "t").is_ok());
        for (settings, expected) in [
            ("kind = \"tcp\"\nport = 0", "port must be 1 to 65535"),
            ("kind = \"http\"\nexpect_status = 0", "expect_status must be 101 or 200 to 599"),
            ("kind = \"http\"\nexpect_status = 103", "other 1xx answers are never final"),
            ("kind = \"https\"\nsni = \"not a name!\"", "is not a DNS name"),
            ("kind = \"tcp\"\nsni = \"api.example.com\"", "sni is for https checks"),
        ] {
            let found = problems(&check(settings));
            assert!(found.len() == 1 && found[0].contains(expected), "{settings}: {found:#?}");
        }
        let policy = |threshold: &str| {
            FULL.replace(
                "name = \"web\"\n[[pool.backend]]",
                &format!("name = \"web\"\n[[pool.autoscale]]\nname = \"up\"\nsignal = \"new_flows_per_second\"\n{threshold}\ncommand = [\"true\"]\n[[pool.backend]]"),
            )
        };
        assert!(Config::parse(&policy("above = 100.0"), "t").is_ok());
        let found = problems(&policy("above = nan"));
        assert!(found.len() == 1 && found[0].contains("finite threshold"), "{found:#?}");
        let found =
            problems(&FULL.replace("address = \"198.18.1.11\"", "address = \"198.18.100.1\""));
        assert!(
            found.len() == 1 && found[0].contains("is the address of service \"web\""),
            "{found:#?}"
        );
    }

    #[test]
    fn nat_needs_a_source_and_dsr_keeps_ports() {
        let text = FULL.replace("nat_source = \"198.18.1.1\"\n", "");
        let error = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(error.contains("has no `nat_source`"), "{error}");
        let text = FULL.replace("mode = \"nat\"\nnat_source = \"198.18.1.1\"", "mode = \"dsr-l2\"");
        let error = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(error.contains("cannot change ports"), "{error}");
    }

    const PASSTHROUGH: &str = r#"
[[service]]
name = "tls"
address = "198.18.100.2"
protocol = "tcp"
port = 443
pool = "web"
mode = "tls-passthrough"
[service.tls]
deny = ["*.internal.example.com"]
[[service.tls.route]]
server_name = "www.example.com"
pool = "web"
[[service.tls.route]]
server_name = "*.example.com"
pool = "web"
"#;

    #[test]
    fn tls_passthrough_services_parse_with_defaults() {
        let config = Config::parse(&format!("{FULL}{PASSTHROUGH}"), "t").unwrap();
        let service = &config.services[1];
        assert_eq!(service.mode, ForwardingMode::TlsPassthrough);
        assert!(!service.in_data_path());
        let tls = service.tls.as_ref().unwrap();
        assert_eq!(tls.routes.len(), 2);
        assert_eq!(tls.hello_timeout_ms, 10_000);
        assert_eq!(tls.connect_attempts, 3);
        assert_eq!(tls.unknown_sni, SniFallback::Default);
        assert_eq!(tls.relay, RelayMode::Sockmap);
        // The API writes configurations back: the policy survives the round trip.
        let again = Config::parse(&config.to_toml().unwrap(), "t").unwrap();
        assert_eq!(again.services[1].tls, service.tls);
        // Without a `[service.tls]` table: every default, every name to the pool.
        let bare = PASSTHROUGH.split("[service.tls]").next().unwrap();
        assert!(Config::parse(&format!("{FULL}{bare}"), "t").unwrap().services[1].tls.is_none());
    }

    #[test]
    fn tls_passthrough_problems_are_reported() {
        for (change, expected) in [
            (
                ("protocol = \"tcp\"\nport = 443", "protocol = \"udp\"\nport = 443"),
                "needs protocol = \"tcp\"",
            ),
            (
                ("server_name = \"*.example.com\"", "server_name = \"a.*.example.com\""),
                "server_name \"a.*.example.com\"",
            ),
            (
                ("server_name = \"*.example.com\"", "server_name = \"WWW.example.com\""),
                "routed twice",
            ),
            (
                ("server_name = \"*.example.com\"", "server_name = \"www.example.com.\""),
                "routed twice",
            ),
            (
                (
                    "server_name = \"*.example.com\"\npool = \"web\"",
                    "server_name = \"*.example.com\"\npool = \"nope\"",
                ),
                "uses pool \"nope\", which is not defined",
            ),
            (
                ("deny = [\"*.internal.example.com\"]", "deny = [\"bad name\"]"),
                "allow/deny pattern \"bad name\"",
            ),
            (("deny = [", "hello_timeout_ms = 5\ndeny = ["), "hello_timeout_ms 5 is out of range"),
            (("deny = [", "connect_attempts = 0\ndeny = ["), "connect_attempts 0 is out of range"),
            (("deny = [", "connect_attempts = 9\ndeny = ["), "connect_attempts 9 is out of range"),
            (
                ("mode = \"tls-passthrough\"", "mode = \"dsr-l2\""),
                "has a `[service.tls]` table but is dsr-l2",
            ),
        ] {
            let text = format!("{FULL}{}", PASSTHROUGH.replace(change.0, change.1));
            let error = Config::parse(&text, "t").unwrap_err().to_string();
            assert!(error.contains(expected), "{change:?}: {error}");
        }
        let text = format!(
            "{FULL}{}",
            PASSTHROUGH.replace("[service.tls]", "[service.tls]\nrelay = \"magic\"")
        );
        let error = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(error.contains("magic"), "{error}");
        let all_ports = "[[service]]\nname = \"all\"\naddress = \"198.18.100.2\"\nprotocol = \"tcp\"\npool = \"web\"\nmode = \"dsr-l2\"\n";
        let error =
            Config::parse(&format!("{FULL}{PASSTHROUGH}{all_ports}"), "t").unwrap_err().to_string();
        assert!(error.contains("which takes every TCP port of it"), "{error}");
    }

    #[test]
    fn duplicate_names_and_claims_are_rejected() {
        let text = format!(
            "{FULL}\n[[service]]\nname = \"web\"\naddress = \"198.18.100.1\"\nprotocol = \"tcp\"\nport = 80\npool = \"web\"\nmode = \"dsr-l2\"\n"
        );
        let error = Config::parse(&text, "t").unwrap_err().to_string();
        assert!(error.contains("defined twice"), "{error}");
        assert!(error.contains("both claim 198.18.100.1 tcp"), "{error}");
    }

    #[test]
    fn health_checks_and_autoscaling_policies_are_checked() {
        let with = |pool_tables: &str| {
            let text = FULL.replace("\n[[service]]", &format!("{pool_tables}\n[[service]]"));
            Config::parse(&text, "t").map(|_| ()).map_err(|e| e.to_string())
        };
        with("[pool.health_check]\nkind = \"http\"\npath = \"/healthz\"\nexpect = \"ok\"\n")
            .unwrap();
        with("[pool.health_check]\nkind = \"https\"\nhost = \"app.example:8443\"\n").unwrap();
        with("[[pool.autoscale]]\nname = \"out\"\nsignal = \"new_flows_per_second\"\nabove = 100.0\nwebhook = \"https://scaler.example/hook\"\n").unwrap();
        for (tables, expected) in [
            ("[pool.health_check]\nkind = \"tcp\"\nrise = 0\n", "rise and fall are 1 to 100"),
            ("[pool.health_check]\nkind = \"tcp\"\ninterval_ms = 10\n", "at least 50 ms"),
            (
                "[pool.health_check]\nkind = \"tcp\"\ntimeout_ms = 5000\n",
                "must not exceed the interval",
            ),
            ("[pool.health_check]\nkind = \"udp\"\n", "needs `send`"),
            ("[pool.health_check]\nkind = \"command\"\n", "needs `command"),
            ("[pool.health_check]\nkind = \"http\"\npath = \"healthz\"\n", "must start with '/'"),
            (
                "[pool.health_check]\nkind = \"http\"\npath = \"/a b\"\n",
                "path must be printable ASCII",
            ),
            (
                "[pool.health_check]\nkind = \"http\"\nhost = \"a\\r\\nX-Injected: 1\"\n",
                "must be printable ASCII",
            ),
            ("[pool.health_check]\nkind = \"tcp\"\nhost = \"a\"\n", "for http and https"),
            ("[pool.health_check]\nkind = \"icmp\"\n", "unknown variant"),
            (
                "[[pool.autoscale]]\nname = \"x\"\nsignal = \"cpu\"\nabove = 1.0\ncommand = [\"true\"]\n",
                "unknown variant",
            ),
            (
                "[[pool.autoscale]]\nname = \"x\"\nsignal = \"healthy_backends\"\nabove = 1.0\nbelow = 0.5\ncommand = [\"true\"]\n",
                "exactly one of `above` and `below`",
            ),
            (
                "[[pool.autoscale]]\nname = \"x\"\nsignal = \"healthy_backends\"\nbelow = 1.0\n",
                "needs a `webhook` or a `command`",
            ),
            (
                "[[pool.autoscale]]\nname = \"x\"\nsignal = \"healthy_backends\"\nbelow = 1.0\nwebhook = \"ftp://x\"\n",
                "not an http(s) URL",
            ),
        ] {
            let error = with(tables).unwrap_err();
            assert!(error.contains(expected), "{tables}: {error}");
        }
        let error = Config::parse(
            &FULL.replace(
                "[[pool]]\nname = \"web\"\n",
                "[[pool]]\nname = \"web\"\nmin_healthy_share = 1.5\n",
            ),
            "t",
        )
        .unwrap_err();
        assert!(error.to_string().contains("min_healthy_share"), "{error}");
        // An all-ports service gives a check no port; the check must then name one.
        let all_ports = FULL.replace("port = 80\n", "").replace("port = 8080\n", "");
        let text = all_ports
            .replace("\n[[service]]", "[pool.health_check]\nkind = \"tcp\"\n\n[[service]]");
        let error = Config::parse(&text, "t").unwrap_err();
        assert!(error.to_string().contains("no port to health-check"), "{error}");
        let text = all_ports.replace(
            "\n[[service]]",
            "[pool.health_check]\nkind = \"tcp\"\nport = 22\n\n[[service]]",
        );
        Config::parse(&text, "t").unwrap();
    }

    #[test]
    fn table_size_must_be_prime_and_large_enough() {
        let text = FULL.replace("port = 80\n", "port = 80\ntable_size = 65536\n");
        assert!(Config::parse(&text, "t").unwrap_err().to_string().contains("must be a prime"));
        let text = FULL.replace("port = 80\n", "port = 80\ntable_size = 101\n");
        assert!(
            Config::parse(&text, "t").unwrap_err().to_string().contains("fewer than 100 slots")
        );
    }

    #[test]
    fn round_trips_through_toml() {
        let config = Config::parse(FULL, "t").unwrap();
        let text = config.to_toml().unwrap();
        let again = Config::parse(&text, "again").unwrap();
        assert_eq!(again.to_toml().unwrap(), text);
        assert_eq!(again.pools[0].backends.len(), 2);
        assert_eq!(
            again.services[0].nat_source.as_ref().map(|s| *s.get_ref()),
            Some("198.18.1.1".parse().unwrap())
        );
    }

    #[test]
    fn requires_an_interface() {
        let error = Config::parse("", "t").unwrap_err().to_string();
        assert!(error.contains("[[interface]]"), "{error}");
    }

    #[test]
    fn api_settings_are_checked() {
        let with = |api: &str| {
            Config::parse(&format!("[[interface]]\nname = \"eth0\"\n[api]\n{api}"), "t")
        };
        with("listen = \"192.0.2.5:7070\"\ntoken_file = \"/etc/lb/token\"\ntls_cert_file = \"a.crt\"\ntls_key_file = \"a.key\"\n")
            .unwrap();
        for (api, expected) in [
            ("listen = \"192.0.2.5:7070\"\n", "set api.token_file"),
            ("listen = \"localhost\"\n", "not an address and port"),
            ("tls_cert_file = \"a.crt\"\n", "set both or neither"),
            ("tls_key_file = \"a.key\"\n", "set both or neither"),
        ] {
            let error = with(api).unwrap_err().to_string();
            assert!(error.contains(expected), "{api:?}: {error}");
        }
    }
}
