//! A bounded spoofed SYN (or ACK) flood from the lab's client namespace: frames built by the
//! packet builder and sent through a raw packet socket, from random sources inside
//! 198.18.128.0/17 (the test range: `hping3 --rand-source` would use the whole IPv4 space),
//! at a fixed pace.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use lb_common::net::tcp_flags::ACK;

use crate::{
    lab::{LB_FRONT_IF, Lab},
    packet::Packet,
};

/// The client's interface towards the load balancer.
const CLIENT_IF: &str = "eth0";

/// A bounded flood: `count` segments with TCP `flags` (`SYN`; `ACK` for a spoofed ACK
/// flood) to `target:port`, one every `gap` (paced in batches), each from a random address
/// in 198.18.128.0/17 and a random port, with random sequence and acknowledgement numbers
/// (`seed` makes the run repeatable).
#[derive(Clone, Copy, Debug)]
pub struct SynFlood {
    pub target: Ipv4Addr,
    pub port: u16,
    pub count: u32,
    pub gap: Duration,
    pub seed: u64,
    pub flags: u8,
}

/// Sends `flood` from the lab's client namespace; returns how many segments were sent.
pub fn spoofed_syns(lab: &Lab, flood: SynFlood) -> anyhow::Result<u32> {
    let src_mac = lab.client.mac_of(CLIENT_IF)?;
    let dst_mac = lab.lb.mac_of(LB_FRONT_IF)?;
    lab.client.enter(move || send(src_mac, dst_mac, flood))?
}

fn send(src_mac: [u8; 6], dst_mac: [u8; 6], flood: SynFlood) -> anyhow::Result<u32> {
    let SynFlood { target, port, count, gap, seed, flags } = flood;
    let name = std::ffi::CString::new(CLIENT_IF)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        bail!("no interface {CLIENT_IF}: {}", std::io::Error::last_os_error());
    }
    // Protocol 0: the socket sends and receives nothing.
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    if fd < 0 {
        bail!("packet socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just opened and is owned here alone.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid sockaddr_ll.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = u16::try_from(libc::AF_PACKET).context("AF_PACKET")?;
    to.sll_protocol = u16::try_from(libc::ETH_P_IP).context("ETH_P_IP")?.to_be();
    to.sll_ifindex = i32::try_from(ifindex).context("ifindex")?;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&dst_mac);
    let mut rng = lb_userspace::rng::XorShift::new(seed);
    let started = Instant::now();
    let mut sent = 0;
    for i in 0..count {
        if i % 32 == 0 {
            let due = gap * i;
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let r = rng.next_u64();
        let source = Ipv4Addr::new(198, 18, 128 | ((r >> 8) & 0x7f) as u8, (r & 0xff) as u8);
        let sport = 1024 + ((r >> 16) % 64_000) as u16;
        let frame = Packet::ipv4(source, target)
            .macs(src_mac, dst_mac)
            .tcp(sport, port)
            .flags(flags)
            .seq_ack((r >> 32) as u32, if flags & ACK == 0 { 0 } else { (r << 7 >> 32) as u32 })
            .build();
        // A full device queue (veth's peer behind): wait a moment and send again, boundedly.
        for attempt in 0..100 {
            // SAFETY: a valid buffer and address for their lengths.
            let n = unsafe {
                libc::sendto(
                    std::os::fd::AsRawFd::as_raw_fd(&fd),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    std::ptr::from_ref(&to).cast(),
                    u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(0),
                )
            };
            if n >= 0 {
                sent += 1;
                break;
            }
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() != Some(libc::ENOBUFS) || attempt == 99 {
                bail!("sending segment {i}: {error}");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(sent)
}
