//! The firewall's sampled log: events the data path puts in `FW_EVENTS` (one matching packet
//! in a rule's `log`, at most `LOG_EVENTS_PER_SECOND` per CPU) become log lines.

use std::net::IpAddr;

use aya::maps::{MapData, RingBuf};
use lb_common::{
    firewall::{EVENT_AUDITED, EVENT_DROPPED, FwEvent},
    flow::words_addr,
};
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::daemon::SharedDaemon;

/// Decodes one ring-buffer record.
#[must_use]
pub fn decode(bytes: &[u8]) -> Option<FwEvent> {
    (bytes.len() >= std::mem::size_of::<FwEvent>())
        // SAFETY: length checked; FwEvent is plain old data, read unaligned.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FwEvent>()) })
}

/// The event as a log line's parts: (source, destination, protocol name).
#[must_use]
pub fn describe(event: &FwEvent) -> (String, String, String) {
    let addr = |words: [u32; 4]| words_addr(words, event.family);
    let with_port = |a: IpAddr, port: u16| match (a, u16::from_be(port)) {
        (a, 0) => a.to_string(),
        (IpAddr::V6(a), p) => format!("[{a}]:{p}"),
        (a, p) => format!("{a}:{p}"),
    };
    let proto = match event.proto {
        6 => "tcp".to_owned(),
        17 => "udp".to_owned(),
        1 => "icmp".to_owned(),
        58 => "icmpv6".to_owned(),
        p => format!("proto-{p}"),
    };
    (with_port(addr(event.src), event.sport), with_port(addr(event.dst), event.dport), proto)
}

/// Reads events until `shutdown`, logging each with its rule's name.
pub async fn run(events: RingBuf<MapData>, daemon: SharedDaemon, shutdown: CancellationToken) {
    let interest = tokio::io::Interest::READABLE;
    // SAFETY: the ring buffer owns its map's file descriptor, which stays open and the same
    // for as long as the `AsyncFd` holds it.
    let mut fd = match unsafe { AsyncFd::register_with_interest(events, interest) } {
        Ok(fd) => fd,
        Err(error) => {
            warn!(%error, "cannot watch the firewall's event buffer; rule logging is off");
            return;
        }
    };
    loop {
        let mut guard = tokio::select! {
            () = shutdown.cancelled() => return,
            guard = fd.readable_mut() => match guard {
                Ok(guard) => guard,
                Err(error) => {
                    warn!(%error, "firewall event buffer failed; rule logging is off");
                    return;
                }
            },
        };
        let mut batch = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            batch.extend(decode(&item));
        }
        guard.clear_ready();
        if batch.is_empty() {
            continue;
        }
        // The names of the rule set in force, and its generation: an event of the other
        // generation (a rule set switched out since the packet matched) names its rule by
        // position, for these names may be another rule's.
        let (names, generation): (Vec<String>, Option<u32>) = {
            let d = crate::daemon::lock(&daemon);
            let names =
                d.config.firewall.iter().flat_map(|f| &f.rules).map(|r| r.name.clone()).collect();
            (names, d.firewall.active_generation())
        };
        for event in batch {
            let replaced;
            let rule = if generation.is_some_and(|g| g & 1 == u32::from(event.generation) & 1) {
                names.get(usize::from(event.rule)).map_or("?", String::as_str)
            } else {
                replaced = format!("rule {} of a replaced rule set", usize::from(event.rule) + 1);
                &replaced
            };
            let outcome = match event.outcome {
                EVENT_DROPPED => "dropped",
                EVENT_AUDITED => "would drop (audit)",
                _ => "passed",
            };
            let (src, dst, proto) = describe(&event);
            info!(rule, outcome, %proto, %src, %dst, tcp_flags = event.tcp_flags, len = event.len, "firewall rule matched");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_describes_events() {
        let event = FwEvent {
            src: [u32::from_ne_bytes([198, 18, 0, 16]), 0, 0, 0],
            dst: [u32::from_ne_bytes([198, 18, 100, 1]), 0, 0, 0],
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            len: 74,
            rule: 1,
            outcome: EVENT_DROPPED,
            family: 4,
            proto: 6,
            tcp_flags: 2,
            generation: 0,
        };
        // SAFETY: FwEvent is plain old data.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&raw const event).cast::<u8>(),
                std::mem::size_of::<FwEvent>(),
            )
        };
        assert_eq!(decode(bytes), Some(event));
        assert_eq!(decode(&bytes[..10]), None);
        let (src, dst, proto) = describe(&event);
        assert_eq!(
            (src.as_str(), dst.as_str(), proto.as_str()),
            ("198.18.0.16:40000", "198.18.100.1:80", "tcp")
        );
    }
}
