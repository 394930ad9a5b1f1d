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

/// The rule an event names: by name when it is of the rule set in force (`names`, of
/// `generation`) and no switch happened since the last read (`switched`), else by position.
fn rule_label<'a>(
    event: &FwEvent,
    names: &'a [String],
    generation: Option<u32>,
    switched: bool,
) -> std::borrow::Cow<'a, str> {
    let current = generation.is_some_and(|g| g & 1 == u32::from(event.generation) & 1);
    if current && !switched {
        names.get(usize::from(event.rule)).map_or("?".into(), |n| n.as_str().into())
    } else {
        format!("rule {} of a replaced rule set", usize::from(event.rule) + 1).into()
    }
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
    // Rule-set switches as of the last batch read (or of the start).
    let mut seen_switches = crate::daemon::lock(&daemon).firewall.switches();
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
        // The names of the rule set in force, its generation, and whether a rule set was
        // switched in since the last batch: an event of the other generation, or any event
        // read across a switch (it may have waited through two), names its rule by
        // position, for these names may be another rule's.
        let (names, generation, switches): (Vec<String>, Option<u32>, u64) = {
            let d = crate::daemon::lock(&daemon);
            let names =
                d.config.firewall.iter().flat_map(|f| &f.rules).map(|r| r.name.clone()).collect();
            (names, d.firewall.active_generation(), d.firewall.switches())
        };
        let switched = std::mem::replace(&mut seen_switches, switches) != switches;
        for event in batch {
            let rule = rule_label(&event, &names, generation, switched);
            let outcome = match event.outcome {
                EVENT_DROPPED => "dropped",
                EVENT_AUDITED => "would drop (audit)",
                _ => "passed",
            };
            let (src, dst, proto) = describe(&event);
            info!(rule = &*rule, outcome, %proto, %src, %dst, tcp_flags = event.tcp_flags, len = event.len, "firewall rule matched");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_of_a_replaced_rule_set_name_their_rule_by_position() {
        let names = ["blocked".to_owned(), "ssh".to_owned()];
        let event = FwEvent { rule: 1, generation: 1, ..FwEvent::default() };
        assert_eq!(rule_label(&event, &names, Some(1), false), "ssh");
        let other = "rule 2 of a replaced rule set";
        assert_eq!(rule_label(&event, &names, Some(0), false), other, "the other generation");
        assert_eq!(rule_label(&event, &names, Some(1), true), other, "read across a switch");
        assert_eq!(rule_label(&event, &names, None, false), other, "firewall off since");
        let past_the_end = FwEvent { rule: 5, ..event };
        assert_eq!(rule_label(&past_the_end, &names, Some(1), false), "?");
    }

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
