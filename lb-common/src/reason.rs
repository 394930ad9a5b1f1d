//! Verdicts and the named reasons behind every packet the data path does not forward.
//!
//! Every packet is counted exactly once by its [`Action`]. Every packet that is not forwarded
//! (passed to the kernel or dropped) is also counted exactly once by its [`Reason`], so the
//! reason counters explain the pass and drop counters completely.

/// XDP verdicts, with the kernel's numeric values (`enum xdp_action`).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Aborted = 0,
    Drop = 1,
    Pass = 2,
    Tx = 3,
    Redirect = 4,
}

impl Action {
    /// Every action, in numeric order.
    pub const ALL: [Self; 5] = [Self::Aborted, Self::Drop, Self::Pass, Self::Tx, Self::Redirect];

    /// The kernel's verdict value.
    #[inline(always)]
    #[must_use]
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// Label used in metrics and logs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::Aborted => "aborted",
            Self::Drop => "drop",
            Self::Pass => "pass",
            Self::Tx => "tx",
            Self::Redirect => "redirect",
        }
    }

    /// The action for a raw verdict value, if it is one the kernel defines.
    #[must_use]
    pub const fn from_u32(value: u32) -> Option<Self> {
        match value {
            0 => Some(Self::Aborted),
            1 => Some(Self::Drop),
            2 => Some(Self::Pass),
            3 => Some(Self::Tx),
            4 => Some(Self::Redirect),
            _ => None,
        }
    }
}

/// Why a packet was passed to the kernel or dropped instead of being forwarded.
///
/// The discriminant indexes the reason part of the `STATS` counters, so values are stable:
/// new reasons take new numbers, old numbers are never reused.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): the kernel's business.
    NotIp = 0,
    /// Well-formed IP traffic that is not addressed to a service.
    NotService = 1,
    /// The frame ends inside a header it announces.
    Truncated = 2,
    /// IPv4 header with a wrong version, IHL below 5 or a total length that does not fit
    /// the header or the frame.
    BadIpv4Header = 3,
    /// IPv6 header with a wrong version or a payload length beyond the frame.
    BadIpv6Header = 4,
    /// More stacked VLAN tags than `MAX_VLAN_TAGS`.
    TooManyVlanTags = 5,
    /// More IPv6 extension headers than `MAX_IPV6_EXT_HEADERS`.
    TooManyExtHeaders = 6,
    /// A TCP header whose data offset is below 5 words.
    BadTcpHeader = 7,
    /// Headers reach past `MAX_L4_OFFSET` (very long IPv6 extension headers).
    HeadersTooLong = 8,
    /// An IP fragment addressed to a service: fragments carry no ports (or only the first
    /// does), so they cannot be balanced consistently; clients must use path MTU discovery.
    Fragment = 9,
    /// IPv4 options or IPv6 extension headers on a packet to a service.
    IpOptions = 10,
    /// The service has no backend to send the flow to (empty pool, every weight zero).
    NoBackend = 11,
    /// No route or no neighbour (MAC address) is known for the backend yet.
    NoNextHop = 12,
    /// Every NAT source port the service may use towards this backend is taken.
    NatPortsExhausted = 13,
    /// The backend's egress interface is not one the data path may redirect to.
    TxPortMissing = 14,
    /// The connection table refused a new entry.
    ConntrackInsertFailed = 15,
    /// A DSR backend is not on a directly attached network (its next hop is a router).
    DsrBackendNotOnLink = 16,
    /// A firewall rule denies the packet.
    FirewallDeny = 17,
    /// No firewall rule matches and the default policy is deny.
    FirewallDefaultDeny = 18,
    /// A rate-limit rule's bucket for the packet's source is empty.
    RateLimited = 19,
    /// An ACK without a flow to a service answering with SYN cookies, whose cookie is not
    /// valid (forged, replayed on another connection, or older than about two minutes), or
    /// any other TCP packet without a flow but a SYN while cookies are on.
    SynCookieInvalid = 20,
    /// A client packet of a cookie-opened flow before the backend answered the load
    /// balancer's SYN (the client retransmits), or a backend's answer to that SYN that does
    /// not acknowledge it.
    SynProxyPending = 21,
    /// The firewall is on and the packet's transport header cannot be read: a first
    /// fragment cut inside it (RFC 1858's tiny fragments), an IPv6 header chain longer than
    /// `MAX_IPV6_EXT_HEADERS` headers or `MAX_L4_OFFSET` bytes, a TCP data offset below 5.
    /// Rules by port, ICMP type or TCP flags cannot be applied to it, and the host may still
    /// accept it (it reassembles fragments and follows longer chains), so it is dropped.
    FirewallUnreadable = 22,
    /// The kernel's cookie helper refused to make a SYN-ACK's cookie: the SYN is dropped
    /// rather than passed on to the host as it came (the client retransmits).
    SynCookieFailed = 23,
}

impl Reason {
    /// Every reason, in numeric order; userspace iterates this to read and export counters.
    pub const ALL: [Self; 24] = [
        Self::NotIp,
        Self::NotService,
        Self::Truncated,
        Self::BadIpv4Header,
        Self::BadIpv6Header,
        Self::TooManyVlanTags,
        Self::TooManyExtHeaders,
        Self::BadTcpHeader,
        Self::HeadersTooLong,
        Self::Fragment,
        Self::IpOptions,
        Self::NoBackend,
        Self::NoNextHop,
        Self::NatPortsExhausted,
        Self::TxPortMissing,
        Self::ConntrackInsertFailed,
        Self::DsrBackendNotOnLink,
        Self::FirewallDeny,
        Self::FirewallDefaultDeny,
        Self::RateLimited,
        Self::SynCookieInvalid,
        Self::SynProxyPending,
        Self::FirewallUnreadable,
        Self::SynCookieFailed,
    ];

    /// What the data path does with a packet for this reason.
    ///
    /// Malformed packets go to the kernel rather than being dropped here: the kernel's own
    /// checks drop and count them (`InHdrErrors`, `InTruncatedPkts`), so this program never
    /// hides a fault from the host's usual tools.
    #[inline(always)]
    #[must_use]
    pub const fn action(self) -> Action {
        match self {
            Self::NotIp
            | Self::NotService
            | Self::Truncated
            | Self::BadIpv4Header
            | Self::BadIpv6Header
            | Self::TooManyVlanTags
            | Self::TooManyExtHeaders
            | Self::BadTcpHeader
            | Self::HeadersTooLong => Action::Pass,
            Self::Fragment
            | Self::IpOptions
            | Self::NoBackend
            | Self::NoNextHop
            | Self::NatPortsExhausted
            | Self::TxPortMissing
            | Self::ConntrackInsertFailed
            | Self::DsrBackendNotOnLink
            | Self::FirewallDeny
            | Self::FirewallDefaultDeny
            | Self::RateLimited
            | Self::SynCookieInvalid
            | Self::SynProxyPending
            | Self::FirewallUnreadable
            | Self::SynCookieFailed => Action::Drop,
        }
    }

    /// The reason with discriminant `value`, if there is one.
    #[inline(always)]
    #[must_use]
    pub const fn from_u32(value: u32) -> Option<Self> {
        if (value as usize) < Self::ALL.len() { Some(Self::ALL[value as usize]) } else { None }
    }

    /// Label used in metrics (`lb_dropped_packets_total{reason="..."}`,
    /// `lb_passed_packets_total{reason="..."}`) and logs.
    #[must_use]
    pub const fn name(self) -> &'static str {
        match self {
            Self::NotIp => "not_ip",
            Self::NotService => "not_service",
            Self::Truncated => "truncated",
            Self::BadIpv4Header => "bad_ipv4_header",
            Self::BadIpv6Header => "bad_ipv6_header",
            Self::TooManyVlanTags => "too_many_vlan_tags",
            Self::TooManyExtHeaders => "too_many_ext_headers",
            Self::BadTcpHeader => "bad_tcp_header",
            Self::HeadersTooLong => "headers_too_long",
            Self::Fragment => "fragment",
            Self::IpOptions => "ip_options",
            Self::NoBackend => "no_backend",
            Self::NoNextHop => "no_next_hop",
            Self::NatPortsExhausted => "nat_ports_exhausted",
            Self::TxPortMissing => "tx_port_missing",
            Self::ConntrackInsertFailed => "conntrack_insert_failed",
            Self::DsrBackendNotOnLink => "dsr_backend_not_on_link",
            Self::FirewallDeny => "firewall_deny",
            Self::FirewallDefaultDeny => "firewall_default_deny",
            Self::RateLimited => "rate_limited",
            Self::SynCookieInvalid => "syn_cookie_invalid",
            Self::SynProxyPending => "syn_proxy_pending",
            Self::FirewallUnreadable => "firewall_unreadable",
            Self::SynCookieFailed => "syn_cookie_failed",
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    reason = "test arithmetic on small, known values"
)]
mod tests {
    use super::*;

    #[test]
    fn reason_list_is_complete_and_ordered() {
        for (i, reason) in Reason::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i, "{reason:?} out of order in Reason::ALL");
        }
        assert!(Reason::ALL.len() <= crate::stats::REASON_SLOTS as usize);
    }

    #[test]
    fn reason_names_are_unique_snake_case() {
        let mut names: std::vec::Vec<_> = Reason::ALL.iter().map(|r| r.name()).collect();
        for name in &names {
            assert!(
                name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{name}"
            );
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }

    #[test]
    fn reason_round_trips() {
        for reason in Reason::ALL {
            assert_eq!(Reason::from_u32(reason as u32), Some(reason));
        }
        assert_eq!(Reason::from_u32(Reason::ALL.len() as u32), None);
    }

    #[test]
    fn action_round_trips() {
        for action in Action::ALL {
            assert_eq!(Action::from_u32(action.as_u32()), Some(action));
        }
        assert_eq!(Action::from_u32(5), None);
    }
}
