//! Host settings the daemon adjusts: keeping the kernel's own connections out of the NAT
//! source port range.

use std::fs;

const RESERVED_PORTS: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";

/// Adds `first..=last` to `net.ipv4.ip_local_reserved_ports` (which covers IPv6 too), so the
/// kernel never picks a NAT port as the ephemeral port of a local connection. Existing
/// reservations are kept.
pub fn reserve_local_ports((first, last): (u16, u16)) -> std::io::Result<()> {
    let current = fs::read_to_string(RESERVED_PORTS)?;
    let wanted = format!("{first}-{last}");
    let mut ranges: Vec<String> =
        current.trim().split(',').filter(|r| !r.is_empty()).map(str::to_owned).collect();
    if ranges.contains(&wanted) {
        return Ok(());
    }
    ranges.push(wanted);
    fs::write(RESERVED_PORTS, ranges.join(","))?;
    tracing::info!(range = %format!("{first}-{last}"), "reserved NAT ports from the kernel's ephemeral range");
    Ok(())
}
