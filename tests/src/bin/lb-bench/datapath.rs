//! Data-path cost per packet through `BPF_PROG_TEST_RUN`, each path next to a floor
//! measured in the same run, and the firewall with 0 to 1,000,000 prefixes.
//!
//! Frame-rewriting paths run inside the bench-only wrapper that restores the frame after each
//! repetition; the same wrapper around a program that does nothing is the floor. Every timed
//! run checks its verdict and the data path's own counters, so a wrong path cannot pass for a
//! fast one.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context as _, bail, ensure};
use aya::programs::{TestRun as _, TestRunOptions};
use lb_common::{
    Action,
    net::tcp_flags,
    service::{NEXTHOP_ON_LINK, NextHop},
};
use lb_tests::{netns::Netns, packet::Packet};
use lb_userspace::{
    Balancer, Config, Datapath,
    datapath::{
        BENCH_CONNTRACK_INSERT, BENCH_CONNTRACK_LOOKUP, BENCH_FLOOR, BENCH_INGRESS, BENCH_NEW_FLOW,
        BENCH_NEW_FLOW_FLOOR, BENCH_REOPEN, BENCH_REOPEN_FLOOR, BENCH_UNCACHED,
        BENCH_UNCACHED_FLOOR, LAB_PEER_PROGRAM, LoadOptions,
    },
    nexthop::StaticResolver,
};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);

const CONFIG: &str = r#"
[[interface]]
name = "lo"
[[pool]]
name = "p4"
[[pool.backend]]
address = "198.18.1.11"
[[pool.backend]]
address = "198.18.1.12"
[[pool.backend]]
address = "198.18.1.13"
[[pool]]
name = "p6"
[[pool.backend]]
address = "fd00:1::11"
[[pool.backend]]
address = "fd00:1::12"
[[pool.backend]]
address = "fd00:1::13"
[[service]]
name = "nat4"
address = "198.18.100.1"
protocol = "tcp"
port = 80
pool = "p4"
mode = "nat"
nat_source = "198.18.1.1"
nat_ports = "1024-65535"
[[service]]
name = "dsr4"
address = "198.18.100.2"
protocol = "tcp"
port = 80
pool = "p4"
mode = "dsr-l2"
[[service]]
name = "nat6"
address = "fd00:100::1"
protocol = "tcp"
port = 80
pool = "p6"
mode = "nat"
nat_source = "fd00:1::1"
[[service]]
name = "dsr6"
address = "fd00:100::2"
protocol = "tcp"
port = 80
pool = "p6"
mode = "dsr-l2"
"#;

struct Scenario {
    name: &'static str,
    program: &'static str,
    floor: &'static str,
    frame: Vec<u8>,
    verdict: Action,
    /// Each repetition opens a flow (counted in the service's new flows).
    new_flows: bool,
    /// Packets to send once before timing (to open the flow).
    warmup: bool,
    /// For the reused-tuple wrappers: the frame's flow, aged before each repetition.
    reopen: Option<lb_common::FlowKey>,
    /// Sent before the warm-up: the SYN of an established row's flow, so that the warm-up
    /// ACK completes a handshake as a client's does (a NAT flow is cached from then on; one
    /// picked up mid-stream only at its first refresh, a second later).
    opening: Option<Vec<u8>>,
}

#[derive(serde::Serialize)]
struct Row {
    name: &'static str,
    median_ns: u64,
    min_ns: u64,
    max_ns: u64,
    floor_median_ns: u64,
    ratio_to_floor: f64,
    minus_floor_ns: i64,
}

fn frame(src: IpAddr, dst: IpAddr, sport: u16, flags: u8) -> Vec<u8> {
    let p = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => Packet::ipv4(s, d),
        (IpAddr::V6(s), IpAddr::V6(d)) => Packet::ipv6(s, d),
        _ => unreachable!(),
    };
    // 96 bytes or more, so the wrapper's saved head is all frame.
    p.tcp(sport, 80).flags(flags).payload(&[0x61; 48]).build()
}

/// The bench's data path (this build's object, or `object`) with `CONFIG` applied.
fn setup(object: Option<&'static [u8]>) -> anyhow::Result<(Datapath, Balancer)> {
    let config = Config::parse(CONFIG, "bench")?;
    let mut datapath = Datapath::load_with(&LoadOptions { object, ..LoadOptions::default() })?;
    let mut hops = HashMap::new();
    for pool in &config.pools {
        for b in &pool.backends {
            hops.insert(
                *b.address.get_ref(),
                NextHop {
                    ifindex: 1,
                    flags: NEXTHOP_ON_LINK,
                    dmac: [2, 0, 0, 0, 1, 1],
                    smac: [2, 0, 0, 0, 0, 1],
                },
            );
        }
    }
    let mut balancer = Balancer::new(datapath.ticks_per_second()?);
    balancer.apply(&config, datapath.maps_mut(), &mut StaticResolver(hops))?;
    Ok((datapath, balancer))
}

/// Runs every data-path scenario and the firewall table; prints them, returns them as JSON.
pub fn run(repeat: u32, rounds: usize) -> anyhow::Result<serde_json::Value> {
    // `LB_BENCH_AB=[A,]B`: two builds' BPF objects compared path by path (A defaults to this
    // build's); see `compare`.
    let ab = std::env::var("LB_BENCH_AB").ok();
    let (a_object, b_object) = match ab.as_deref().map(|ab| ab.split_once(',').unwrap_or(("", ab)))
    {
        Some((a, b)) => {
            (if a.is_empty() { None } else { Some(read_object(a)?) }, Some(read_object(b)?))
        }
        None => (None, None),
    };
    // One CPU throughout this section (given back at its end, before the live sections
    // start their processes): the data path's caches are per CPU.
    let pin = lb_tests::testrun::stay_on_this_cpu()?;
    let ns = Netns::create(&lb_tests::netns::unique_id())?;
    let (mut datapath, balancer) = ns.enter(|| setup(a_object))??;

    let mut scenarios = scenarios();
    // The reply of an established NAT flow (timed before the new-flow runs, which empty the
    // connection table): learn its NAT port from the table. Cached as a busy flow's replies
    // are, and uncached (each reply the table's, as when its slot was taken by another flow).
    let reply = reply_frame(&mut datapath, &balancer)?;
    let before_new_flows =
        scenarios.iter().position(|s| s.name == "conntrack insert alone").unwrap_or(0);
    for (i, (name, program, floor)) in [
        ("NAT IPv4 reply", BENCH_INGRESS, BENCH_FLOOR),
        ("NAT IPv4 reply, uncached", BENCH_UNCACHED, BENCH_UNCACHED_FLOOR),
    ]
    .into_iter()
    .enumerate()
    {
        scenarios.insert(
            before_new_flows + i,
            Scenario {
                name,
                program,
                floor,
                frame: reply.clone(),
                verdict: Action::Tx,
                new_flows: false,
                warmup: true,
                reopen: None,
                opening: None,
            },
        );
    }
    // `LB_BENCH_LOOP=NAME`: run that one path for 10 s and nothing else, for a profiler
    // (`perf record -a` alongside) to see where its time goes.
    if let Ok(name) = std::env::var("LB_BENCH_LOOP") {
        ensure!(b_object.is_none(), "LB_BENCH_LOOP and LB_BENCH_AB: one at a time");
        let s = scenarios.iter().find(|s| s.name == name).context("no such path")?;
        prepare(&mut datapath, &balancer, s)?;
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_secs(10) {
            measure(&mut datapath, s.program, &s.frame, s.verdict, repeat, 1, None)?;
        }
        return Ok(serde_json::Value::Null);
    }
    if let Some(object) = b_object {
        let other = ns.enter(|| setup(Some(object)))??;
        return compare(&scenarios, (&mut datapath, &balancer), other, repeat, rounds.max(21));
    }
    let mut rows = Vec::new();
    let mut table = String::new();
    let _ = writeln!(
        table,
        "{:<30} {:>9} {:>9} {:>9} {:>10} {:>8} {:>10}",
        "path (ns/packet)", "median", "min", "max", "floor", "ratio", "above floor"
    );
    for s in &scenarios {
        let sid = prepare(&mut datapath, &balancer, s)?;
        // The floor and the path alternate run by run: the machine's load comes and goes in
        // phases of about a second (one path measured 155 and 220-260 ns by turns over six
        // seconds, on either CPU), and a phase should weigh on both alike. "Above floor" is
        // the median of the runs' differences.
        let (mut floors, mut paths, mut above) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let floor = measure(&mut datapath, s.floor, &s.frame, Action::Pass, repeat, 1, None)?.0;
            let path = measure(&mut datapath, s.program, &s.frame, s.verdict, repeat, 1, sid)
                .with_context(|| s.name)?
                .0;
            above.push(i64::try_from(path).unwrap_or(0) - i64::try_from(floor).unwrap_or(0));
            floors.push(floor);
            paths.push(path);
        }
        let (path, floor) = (spread(&mut paths), spread(&mut floors));
        above.sort_unstable();
        let row = Row {
            name: s.name,
            median_ns: path.0,
            min_ns: path.1,
            max_ns: path.2,
            floor_median_ns: floor.0,
            ratio_to_floor: path.0 as f64 / floor.0.max(1) as f64,
            minus_floor_ns: above[above.len() / 2],
        };
        let _ = writeln!(
            table,
            "{:<30} {:>9} {:>9} {:>9} {:>10} {:>7.2}x {:>10}",
            row.name,
            row.median_ns,
            row.min_ns,
            row.max_ns,
            row.floor_median_ns,
            row.ratio_to_floor,
            row.minus_floor_ns
        );
        eprintln!("  {} {} ns (floor {} ns)", row.name, row.median_ns, row.floor_median_ns);
        rows.push(row);
    }
    println!("\nData path, {repeat} repetitions per run, median of {rounds} runs:\n\n{table}");

    // Connection-table memory with a million live NAT flows' worth of entries.
    let memory = datapath.maps().conntrack.memory_bytes();
    let entries = datapath.maps().conntrack.len();
    if let Some(bytes) = memory {
        println!(
            "CONNTRACK: {} entries allocated, {:.1} MiB of kernel memory ({:.0} bytes per entry); {entries} in use after the runs.",
            LoadOptions::default().conntrack_entries,
            bytes as f64 / (1024.0 * 1024.0),
            bytes as f64 / f64::from(LoadOptions::default().conntrack_entries)
        );
    }

    // The daemon's sweep and cuts walk the whole table under its lock: by batches, against
    // the key-by-key walk (`BPF_MAP_GET_NEXT_KEY`) as the baseline, on the same entries.
    let conntrack = &datapath.maps().conntrack;
    let started = Instant::now();
    let batched = conntrack.len();
    let batched_ms = started.elapsed().as_secs_f64() * 1e3;
    let started = Instant::now();
    let (by_key, ..) = conntrack
        .walk_key_by_key_bounded(usize::MAX, Instant::now() + std::time::Duration::from_mins(1));
    let by_key_ms = started.elapsed().as_secs_f64() * 1e3;
    println!(
        "CONNTRACK walk of {batched} entries: {batched_ms:.0} ms by batches, {by_key_ms:.0} ms key by key ({by_key} entries): {:.2}x",
        by_key_ms / batched_ms.max(f64::MIN_POSITIVE)
    );

    let flood = walk_under_flood(&mut datapath, &pin)?;

    let firewall = firewall_bench(&mut datapath, repeat, rounds)?;
    drop(ns);
    Ok(serde_json::json!({
        "repeat": repeat,
        "rounds": rounds,
        "rows": rows,
        "firewall": firewall,
        "conntrack_memory_bytes": memory,
        "conntrack_entries": LoadOptions::default().conntrack_entries,
        "conntrack_walk": { "entries": batched, "batched_ms": batched_ms, "key_by_key_ms": by_key_ms },
        "conntrack_walk_under_flood": flood,
    }))
}

/// The daemon's table walk while new flows flood a full table (another thread runs the
/// new-flow program on another CPU, each flow a fresh key: the LRU evicts one entry per
/// insert): by batches, against the key-by-key walk, which starts over from the first bucket
/// whenever the key it stands on is evicted. The key-by-key walk is cut off at three times
/// the table's size or 30 s.
fn walk_under_flood(
    datapath: &mut Datapath,
    pin: &lb_tests::testrun::CpuPin,
) -> anyhow::Result<serde_json::Value> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let capacity = usize::try_from(LoadOptions::default().conntrack_entries)?;
    datapath.maps_mut().conntrack.clear()?;
    let flood_frame =
        frame(CLIENT4.into(), IpAddr::V4(Ipv4Addr::new(198, 18, 100, 2)), 40_009, tcp_flags::SYN);
    let (program, maps) = datapath.bench_program_and_maps(BENCH_NEW_FLOW)?;
    let conntrack = &maps.conntrack;
    let (stop, inserted) = (AtomicBool::new(false), AtomicU64::new(0));
    let result = std::thread::scope(|scope| -> anyhow::Result<serde_json::Value> {
        let flood = scope.spawn(|| -> anyhow::Result<()> {
            pin.elsewhere();
            let mut out = vec![0u8; flood_frame.len() + 256];
            while !stop.load(Ordering::Relaxed) {
                program.test_run(TestRunOptions {
                    data_in: Some(&flood_frame),
                    data_out: Some(&mut out),
                    repeat: 100_000,
                    ..TestRunOptions::default()
                })?;
                inserted.fetch_add(100_000, Ordering::Relaxed);
            }
            Ok(())
        });
        // Until the table is full and evicting (twice its size inserted), at most 60 s.
        let started = Instant::now();
        while inserted.load(Ordering::Relaxed) < 2 * capacity as u64
            && started.elapsed() < std::time::Duration::from_mins(1)
            && !flood.is_finished()
        {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let before = inserted.load(Ordering::Relaxed);
        let walk_started = Instant::now();
        let mut seen = std::collections::HashSet::new();
        let mut read = 0usize;
        conntrack.walk(|key, _| {
            read += 1;
            seen.insert(*key);
        })?;
        let batched_ms = walk_started.elapsed().as_secs_f64() * 1e3;
        let batched_distinct = seen.len();
        drop(seen);
        let during_batched = inserted.load(Ordering::Relaxed) - before;
        let before = inserted.load(Ordering::Relaxed);
        let walk_started = Instant::now();
        let deadline = walk_started + std::time::Duration::from_secs(30);
        let (steps, distinct, finished) = conntrack.walk_key_by_key_bounded(3 * capacity, deadline);
        let by_key_ms = walk_started.elapsed().as_secs_f64() * 1e3;
        let during_by_key = inserted.load(Ordering::Relaxed) - before;
        stop.store(true, Ordering::Relaxed);
        flood.join().map_err(|_| anyhow::anyhow!("the flood thread panicked"))??;
        println!(
            "CONNTRACK walk of a full table under a flood of new flows: by batches {read} entries read ({batched_distinct} distinct) in {batched_ms:.0} ms ({during_batched} flows inserted meanwhile); key by key {steps} read ({distinct} distinct) in {by_key_ms:.0} ms ({during_by_key} inserted), {}: {:.2}x the time",
            if finished { "reached the end" } else { "cut off before the end" },
            by_key_ms / batched_ms.max(f64::MIN_POSITIVE)
        );
        Ok(serde_json::json!({
            "batched": { "read": read, "distinct": batched_distinct, "ms": batched_ms, "inserted_meanwhile": during_batched },
            "key_by_key": { "read": steps, "distinct": distinct, "ms": by_key_ms, "finished": finished, "inserted_meanwhile": during_by_key },
        }))
    });
    datapath.maps_mut().conntrack.clear()?;
    result
}

/// Readies `datapath` for scenario `s` (the reused tuple to age, the flow to open) and
/// returns the service whose new flows its runs must count, if they open flows.
fn prepare(
    datapath: &mut Datapath,
    balancer: &Balancer,
    s: &Scenario,
) -> anyhow::Result<Option<u32>> {
    if let Some(key) = &s.reopen {
        datapath.set_bench_reopen(key)?;
    }
    if let Some(syn) = &s.opening {
        run_once(datapath, BENCH_INGRESS, syn, Action::Tx)?;
    }
    if s.warmup && s.program == BENCH_CONNTRACK_LOOKUP {
        // The lookup alone opens nothing: the data path opens the flow it finds.
        run_once(datapath, BENCH_INGRESS, &s.frame, Action::Tx)?;
    } else if s.warmup {
        run_once(datapath, s.program, &s.frame, s.verdict)?;
    }
    Ok(if s.new_flows {
        balancer.service_id(if s.name.starts_with("NAT") { "nat4" } else { "dsr4" })
    } else {
        None
    })
}

/// A BPF object file read into memory that lives as long as the process (the loader keeps
/// no reference, but the bench runs once), aligned as the ELF parser wants it.
fn read_object(path: &str) -> anyhow::Result<&'static [u8]> {
    let bytes = std::fs::read(path).with_context(|| format!("read {path}"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    ensure!(bytes.as_ptr().align_offset(8) == 0, "{path}: not 8-byte aligned in memory");
    Ok(bytes)
}

/// Every path (the floors aside) through A and B, run by run in turn (A B B A ...), so that
/// the machine's phases weigh on both alike: prints each side's median and the median of the
/// rounds' differences, which is what to trust on a shared machine where single runs of one
/// path differ by 30-80 ns. Two loads of one object differ too: here within ±5 ns on the
/// established rows, but the second-loaded side's new-flow rows 80-200 ns faster (why is
/// not known; the connection tables are two separate 368 MiB maps): compare both ways
/// (`A,B` then `B,A`) and take half the difference of the two results. The empty-program
/// row is a control: the same program on both sides.
fn compare(
    scenarios: &[Scenario],
    (a, a_balancer): (&mut Datapath, &Balancer),
    (mut b, b_balancer): (Datapath, Balancer),
    repeat: u32,
    rounds: usize,
) -> anyhow::Result<serde_json::Value> {
    let mut table = format!(
        "{:<30} {:>8} {:>8} {:>8} {:>12}\n",
        "path (ns/packet)", "A", "B", "B - A", "B faster in"
    );
    let mut rows = Vec::new();
    for s in scenarios {
        if s.name == "NAT IPv4 reply" {
            // The scenario's frame is A's reply; B must have chosen the same port.
            ensure!(
                reply_frame(&mut b, &b_balancer)? == s.frame,
                "B gives the NAT reply another port: not comparable"
            );
        }
        let sids = [prepare(a, a_balancer, s)?, prepare(&mut b, &b_balancer, s)?];
        let (mut times, mut diffs) = ([Vec::new(), Vec::new()], Vec::new());
        for round in 0..rounds {
            let mut ns = [0u64; 2];
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for side in order {
                let datapath = if side == 0 { &mut *a } else { &mut b };
                ns[side] = measure(datapath, s.program, &s.frame, s.verdict, repeat, 1, sids[side])
                    .with_context(|| format!("{} ({})", s.name, ["A", "B"][side]))?
                    .0;
                times[side].push(ns[side]);
            }
            diffs.push(i64::try_from(ns[1]).unwrap_or(0) - i64::try_from(ns[0]).unwrap_or(0));
        }
        let faster = diffs.iter().filter(|d| **d < 0).count();
        diffs.sort_unstable();
        let diff = diffs[diffs.len() / 2];
        let (a_ns, b_ns) = (spread(&mut times[0]).0, spread(&mut times[1]).0);
        let _ = writeln!(
            table,
            "{:<30} {a_ns:>8} {b_ns:>8} {diff:>+8} {:>12}",
            s.name,
            format!("{faster}/{rounds}")
        );
        eprintln!("  {} A {a_ns} B {b_ns} ns", s.name);
        rows.push(serde_json::json!({
            "name": s.name, "a_ns": a_ns, "b_ns": b_ns, "b_minus_a_ns": diff, "b_faster": faster
        }));
    }
    println!(
        "\nA against B ({}), {repeat} repetitions per run, {rounds} runs each, in turn:\n\n{table}",
        std::env::var("LB_BENCH_AB").unwrap_or_default()
    );
    Ok(serde_json::json!({
        "objects": std::env::var("LB_BENCH_AB").unwrap_or_default(),
        "compare": rows,
        "repeat": repeat,
        "rounds": rounds
    }))
}

/// The firewall with 0, 10,000 and 1,000,000 source prefixes (half IPv4, half IPv6, in one
/// deny rule) on a packet that matches none of them and is not for a service, next to the
/// same packet with the firewall off and the empty program (the floor), all in this run; and
/// how long each prefix set took to compile and load. Three sources outside every prefix:
/// in a /16 no prefix touches and in an untouched /24 of a listed prefix's /16 (both skip
/// the trie by the source prefilter), and in the /24 of a listed prefix (looked up). Each
/// round times off, then on with each source; every "vs off" is against that round's off.
fn firewall_bench(
    datapath: &mut Datapath,
    repeat: u32,
    rounds: usize,
) -> anyhow::Result<serde_json::Value> {
    use lb_userspace::firewall::{self, Firewall};
    let frame = frame(
        IpAddr::V4(CLIENT4),
        IpAddr::V4(Ipv4Addr::new(198, 18, 200, 1)),
        40_000,
        tcp_flags::ACK,
    );
    let floor = measure(datapath, BENCH_FLOOR, &frame, Action::Pass, repeat, rounds, None)?.0;
    let off = measure(datapath, BENCH_INGRESS, &frame, Action::Pass, repeat, rounds, None)?.0;
    let hz = datapath.ticks_per_second()?;
    let mut fw = Firewall::fresh();
    let mut table = format!(
        "{:<30} {:>7} {:>8} {:>11} {:>8} {:>11} {:>8} {:>9} {:>10}\n{:<30} {:>7}\n{:<30} {:>7} {:>8}\n",
        "firewall (ns/packet, no match)",
        "median",
        "vs off*",
        "listed /16",
        "vs off*",
        "listed /24",
        "vs off*",
        "load (s)",
        "prefixes",
        "empty program (floor)",
        floor,
        "firewall off",
        off,
        "-"
    );
    let mut rows = Vec::new();
    let path = std::env::temp_dir().join(format!("lb-bench-{}-prefixes.txt", std::process::id()));
    for count in [0usize, 10_000, 1_000_000] {
        let mut text = String::with_capacity(count * 32);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut seen = std::collections::HashSet::new();
        let mut v4 = Vec::new();
        let to = IpAddr::V4(Ipv4Addr::new(198, 18, 200, 1));
        while seen.len() < count {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let line = if seen.len() % 2 == 0 {
                // IPv4 /24 to /32 with first octets 1 to 126 (198.18.0.0/15 stays clear).
                let addr = u32::try_from((1 + (x >> 40) % 126) << 24).unwrap_or(0)
                    | (x & 0x00ff_ffff) as u32;
                format!("{}/{}", Ipv4Addr::from_bits(addr), 24 + (x >> 33) % 9)
            } else {
                let addr = (0x2001_0db8_u128 << 96) | (u128::from(x) << 32);
                format!("{}/{}", Ipv6Addr::from_bits(addr), 48 + (x >> 58) % 49)
            };
            let prefix = firewall::Prefix::parse(&line).map_err(anyhow::Error::msg)?;
            if seen.insert(prefix) {
                let _ = writeln!(text, "{prefix}");
                if matches!(prefix, firewall::Prefix::V4 { .. }) {
                    v4.push(prefix);
                }
            }
        }
        let near: Vec<Option<Vec<u8>>> = near_misses(&seen, &v4)
            .into_iter()
            .map(|src| src.map(|src| self::frame(IpAddr::V4(src), to, 40_000, tcp_flags::ACK)))
            .collect();
        std::fs::write(&path, &text)?;
        // No prefixes: a rule by port alone, which skips the source lookup.
        let toml = format!(
            "[[interface]]\nname = \"lo\"\n[firewall]\n[[firewall.rule]]\nname = \"blocklist\"\naction = \"deny\"\n{}",
            if count > 0 {
                format!("source_file = \"{}\"\n", path.display())
            } else {
                "protocol = \"tcp\"\nports = [23]\n".to_owned()
            }
        );
        let config = Config::parse(&toml, "bench")?;
        let started = Instant::now();
        let compiled = firewall::compile(config.firewall.as_ref().context("firewall")?, hz)
            .map_err(|e| anyhow::anyhow!(e.join("; ")))?;
        fw.install(&mut datapath.maps_mut().firewall, Some(&compiled))?;
        let load = started.elapsed().as_secs_f64();
        // Off and on alternate run by run, so drift on a shared machine hits both alike.
        let (mut on_ns, mut off_ns, mut near_ns) = (Vec::new(), Vec::new(), [vec![], vec![]]);
        for _ in 0..rounds {
            fw.install(&mut datapath.maps_mut().firewall, None)?;
            off_ns.push(measure(datapath, BENCH_INGRESS, &frame, Action::Pass, repeat, 1, None)?.0);
            fw.install(&mut datapath.maps_mut().firewall, Some(&compiled))?;
            on_ns.push(measure(datapath, BENCH_INGRESS, &frame, Action::Pass, repeat, 1, None)?.0);
            for (source, times) in near.iter().zip(&mut near_ns) {
                if let Some(source) = source {
                    times.push(
                        measure(datapath, BENCH_INGRESS, source, Action::Pass, repeat, 1, None)?.0,
                    );
                }
            }
        }
        let median = |v: &mut Vec<u64>| {
            v.sort_unstable();
            v.get(v.len() / 2).copied()
        };
        let (ns, off_here) = (median(&mut on_ns).unwrap_or(0), median(&mut off_ns).unwrap_or(0));
        let [listed16, listed24] = near_ns.each_mut().map(median);
        let vs_off =
            |ns: u64| i64::try_from(ns).unwrap_or(0) - i64::try_from(off_here).unwrap_or(0);
        let show = |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| n.to_string());
        let show_vs =
            |n: Option<u64>| n.map_or_else(|| "-".to_owned(), |n| format!("{:+}", vs_off(n)));
        let prefixes = compiled.sources.len();
        let _ = writeln!(
            table,
            "{:<30} {:>7} {:>+8} {:>11} {:>8} {:>11} {:>8} {:>9.2} {:>10}",
            format!("firewall, {count} prefixes"),
            ns,
            vs_off(ns),
            show(listed16),
            show_vs(listed16),
            show(listed24),
            show_vs(listed24),
            load,
            prefixes
        );
        rows.push(serde_json::json!({
            "prefixes": prefixes, "median_ns": ns, "off_median_ns": off_here,
            "listed16_median_ns": listed16, "listed24_median_ns": listed24, "load_secs": load
        }));
    }
    fw.install(&mut datapath.maps_mut().firewall, None)?;
    let _ = std::fs::remove_file(&path);
    println!(
        "\nFirewall, {repeat} repetitions per run, median of {rounds} runs:\n\n{table}\n* against the firewall off, measured alternately with it in the same runs"
    );
    Ok(serde_json::json!({ "floor_ns": floor, "off_ns": off, "rows": rows }))
}

/// Sources next to the listed IPv4 prefixes (`v4`, in the order listed) that no prefix in
/// `prefixes` covers: one in the first prefix's /16 whose /24 no prefix touches (the source
/// prefilter's /24 part skips the trie for it), and one in the /24 of the first prefix longer
/// than /24 (looked up in the trie, matching nothing).
fn near_misses(
    prefixes: &std::collections::HashSet<lb_userspace::firewall::Prefix>,
    v4: &[lb_userspace::firewall::Prefix],
) -> [Option<Ipv4Addr>; 2] {
    use lb_userspace::firewall::Prefix;
    // The prefixes that overlap `net` (the others cannot cover an address in it).
    let touching = |net: Prefix| -> Vec<Prefix> {
        prefixes.iter().filter(|p| p.contains(&net) || net.contains(p)).copied().collect()
    };
    let in_untouched_24 = v4.first().and_then(|p| {
        let Prefix::V4 { addr, .. } = *p else { return None };
        let slash16 = addr & 0xffff_0000;
        let near = touching(Prefix::V4 { addr: slash16, len: 16 });
        (0..=255u32).map(|i| slash16 | (i << 8)).find_map(|addr| {
            let net = Prefix::V4 { addr, len: 24 };
            let touched = near.iter().any(|p| p.contains(&net) || net.contains(p));
            (!touched).then_some(Ipv4Addr::from_bits(addr | 1))
        })
    });
    let in_listed_24 =
        v4.iter().find(|p| matches!(p, Prefix::V4 { len, .. } if *len > 24)).and_then(|p| {
            let Prefix::V4 { addr, .. } = *p else { return None };
            let slash24 = addr & 0xffff_ff00;
            let near = touching(Prefix::V4 { addr: slash24, len: 24 });
            (slash24..=slash24 | 0xff).find_map(|addr| {
                let host = Prefix::V4 { addr, len: 32 };
                (!near.iter().any(|p| p.contains(&host))).then_some(Ipv4Addr::from_bits(addr))
            })
        });
    [in_untouched_24, in_listed_24]
}

/// The timed paths, each with its floor and expected verdict.
fn scenarios() -> Vec<Scenario> {
    let v4 = |last: u8| IpAddr::V4(Ipv4Addr::new(198, 18, 100, last));
    let v6 = |last: u16| IpAddr::V6(Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, last));
    let (c4, c6) = (IpAddr::V4(CLIENT4), IpAddr::V6(CLIENT6));
    let ack = tcp_flags::ACK;
    vec![
        Scenario {
            name: "empty program, no wrapper",
            program: LAB_PEER_PROGRAM,
            floor: LAB_PEER_PROGRAM,
            frame: frame(c4, v4(1), 39_999, ack),
            verdict: Action::Pass,
            new_flows: false,
            warmup: false,
            reopen: None,
            opening: None,
        },
        Scenario {
            name: "not a service (pass)",
            program: BENCH_INGRESS,
            floor: BENCH_FLOOR,
            frame: frame(c4, IpAddr::V4(Ipv4Addr::new(198, 18, 50, 1)), 40_000, ack),
            verdict: Action::Pass,
            new_flows: false,
            warmup: false,
            reopen: None,
            opening: None,
        },
        Scenario {
            name: "DSR IPv4 established",
            program: BENCH_INGRESS,
            floor: BENCH_FLOOR,
            frame: frame(c4, v4(2), 40_001, ack),
            verdict: Action::Tx,
            new_flows: false,
            warmup: true,
            reopen: None,
            opening: Some(frame(c4, v4(2), 40_001, tcp_flags::SYN)),
        },
        Scenario {
            name: "DSR IPv6 established",
            program: BENCH_INGRESS,
            floor: BENCH_FLOOR,
            frame: frame(c6, v6(2), 40_002, ack),
            verdict: Action::Tx,
            new_flows: false,
            warmup: true,
            reopen: None,
            opening: Some(frame(c6, v6(2), 40_002, tcp_flags::SYN)),
        },
        Scenario {
            name: "NAT IPv4 established",
            program: BENCH_INGRESS,
            floor: BENCH_FLOOR,
            frame: frame(c4, v4(1), 40_003, ack),
            verdict: Action::Tx,
            new_flows: false,
            warmup: true,
            reopen: None,
            opening: Some(frame(c4, v4(1), 40_003, tcp_flags::SYN)),
        },
        Scenario {
            name: "NAT IPv6 established",
            program: BENCH_INGRESS,
            floor: BENCH_FLOOR,
            frame: frame(c6, v6(1), 40_004, ack),
            verdict: Action::Tx,
            new_flows: false,
            warmup: true,
            reopen: None,
            opening: Some(frame(c6, v6(1), 40_004, tcp_flags::SYN)),
        },
        Scenario {
            name: "DSR IPv4 established, uncached",
            program: BENCH_UNCACHED,
            floor: BENCH_UNCACHED_FLOOR,
            frame: frame(c4, v4(2), 40_001, ack),
            verdict: Action::Tx,
            new_flows: false,
            warmup: true,
            reopen: None,
            opening: Some(frame(c4, v4(2), 40_001, tcp_flags::SYN)),
        },
        Scenario {
            name: "NAT IPv4 established, uncached",
            program: BENCH_UNCACHED,
            floor: BENCH_UNCACHED_FLOOR,
            frame: frame(c4, v4(1), 40_003, ack),
            verdict: Action::Tx,
            new_flows: false,
            warmup: true,
            reopen: None,
            opening: Some(frame(c4, v4(1), 40_003, tcp_flags::SYN)),
        },
        Scenario {
            name: "parse + conntrack lookup",
            program: BENCH_CONNTRACK_LOOKUP,
            floor: BENCH_FLOOR,
            frame: frame(c4, v4(2), 40_001, ack),
            verdict: Action::Pass,
            new_flows: false,
            warmup: true,
            reopen: None,
            opening: None,
        },
        Scenario {
            name: "conntrack insert alone",
            program: BENCH_CONNTRACK_INSERT,
            floor: BENCH_NEW_FLOW_FLOOR,
            frame: frame(c4, v4(2), 40_007, tcp_flags::SYN),
            verdict: Action::Pass,
            new_flows: false,
            warmup: false,
            reopen: None,
            opening: None,
        },
        Scenario {
            name: "DSR IPv4 new flow",
            program: BENCH_NEW_FLOW,
            floor: BENCH_NEW_FLOW_FLOOR,
            frame: frame(c4, v4(2), 40_005, tcp_flags::SYN),
            verdict: Action::Tx,
            new_flows: true,
            warmup: false,
            reopen: None,
            opening: None,
        },
        Scenario {
            name: "NAT IPv4 new flow",
            program: BENCH_NEW_FLOW,
            floor: BENCH_NEW_FLOW_FLOOR,
            frame: frame(c4, v4(1), 40_006, tcp_flags::SYN),
            verdict: Action::Tx,
            new_flows: true,
            warmup: false,
            reopen: None,
            opening: None,
        },
        Scenario {
            name: "DSR IPv4 new flow, hot",
            program: BENCH_REOPEN,
            floor: BENCH_REOPEN_FLOOR,
            frame: frame(c4, v4(2), 40_008, tcp_flags::SYN),
            verdict: Action::Tx,
            new_flows: true,
            warmup: true,
            reopen: Some(tcp_key(c4, 40_008, v4(2))),
            opening: None,
        },
        Scenario {
            name: "NAT IPv4 new flow, hot",
            program: BENCH_REOPEN,
            floor: BENCH_REOPEN_FLOOR,
            frame: frame(c4, v4(1), 40_009, tcp_flags::SYN),
            verdict: Action::Tx,
            new_flows: true,
            warmup: true,
            reopen: Some(tcp_key(c4, 40_009, v4(1))),
            opening: None,
        },
    ]
}

/// The connection-table key of a TCP packet from `client` to port 80 of `service`.
fn tcp_key(client: IpAddr, sport: u16, service: IpAddr) -> lb_common::FlowKey {
    lb_common::FlowKey::new((client, sport).into(), (service, 80).into(), 6)
}

/// A backend's reply on an established NAT flow (opened here by the client's SYN and ACK).
fn reply_frame(datapath: &mut Datapath, balancer: &Balancer) -> anyhow::Result<Vec<u8>> {
    let (client, service) = (IpAddr::V4(CLIENT4), IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1)));
    for flags in [tcp_flags::SYN, tcp_flags::ACK] {
        run_once(datapath, BENCH_INGRESS, &frame(client, service, 40_100, flags), Action::Tx)?;
    }
    let key = tcp_key(IpAddr::V4(CLIENT4), 40_100, IpAddr::V4(Ipv4Addr::new(198, 18, 100, 1)));
    let flow = datapath.maps().conntrack.get(&key).context("the NAT flow was not opened")?;
    let backend = datapath.maps().backends.get(flow.backend_id)?;
    let IpAddr::V4(backend_addr) = lb_common::flow::words_addr(backend.addr, 4) else {
        bail!("not IPv4")
    };
    let _ = balancer;
    Ok(Packet::ipv4(backend_addr, Ipv4Addr::new(198, 18, 1, 1))
        .tcp(80, lb_common::flow::raw_port(flow.nat_port))
        .flags(tcp_flags::ACK)
        .payload(&[0x62; 48])
        .build())
}

fn run_once(
    datapath: &mut Datapath,
    program: &'static str,
    frame: &[u8],
    verdict: Action,
) -> anyhow::Result<()> {
    let mut out = vec![0u8; frame.len() + 256];
    let result = datapath.bench_program(program)?.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..TestRunOptions::default()
    })?;
    ensure!(
        Action::from_u32(result.return_value) == Some(verdict),
        "{program}: verdict {} on warm-up, expected {verdict:?}",
        result.return_value
    );
    Ok(())
}

/// Runs `program` `rounds` times with `repeat` repetitions; returns (median, min, max) ns per
/// packet. Checks the verdict, the verdict counter and, for new flows, the new-flow counter.
fn measure(
    datapath: &mut Datapath,
    program: &'static str,
    frame: &[u8],
    verdict: Action,
    repeat: u32,
    rounds: usize,
    new_flow_service: Option<u32>,
) -> anyhow::Result<(u64, u64, u64)> {
    let mut samples = Vec::new();
    // A NAT flow takes a source port from the service's range towards its backend, so one
    // NAT address opens at most ~64,000 flows per backend: NAT new-flow runs are shorter.
    let repeat = if new_flow_service.is_some() && program == BENCH_NEW_FLOW {
        repeat.min(30_000)
    } else {
        repeat
    };
    let counts_packets = ![
        BENCH_FLOOR,
        BENCH_NEW_FLOW_FLOOR,
        BENCH_REOPEN_FLOOR,
        BENCH_UNCACHED_FLOOR,
        LAB_PEER_PROGRAM,
        BENCH_CONNTRACK_INSERT,
        BENCH_CONNTRACK_LOOKUP,
    ]
    .contains(&program);
    if program == BENCH_CONNTRACK_INSERT {
        datapath.maps_mut().conntrack.clear()?;
    }
    for _ in 0..rounds {
        // Fresh flows go into an empty table each run (reopened ones keep theirs).
        if program == BENCH_NEW_FLOW {
            datapath.maps_mut().conntrack.clear()?;
        }
        let before = datapath.stats().read()?;
        let flows_before =
            new_flow_service.map(|id| datapath.maps().traffic.service(id)).transpose()?;
        let mut out = vec![0u8; frame.len() + 256];
        let started = Instant::now();
        let result = datapath.bench_program(program)?.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..TestRunOptions::default()
        })?;
        let wall = started.elapsed();
        ensure!(
            Action::from_u32(result.return_value) == Some(verdict),
            "{program}: verdict {} , expected {verdict:?}",
            result.return_value
        );
        ensure!(
            out[..frame.len()] == *frame || program == LAB_PEER_PROGRAM,
            "{program}: the wrapper did not restore the frame"
        );
        let delta = datapath.stats().read()?.since(&before);
        let expected = if counts_packets { u64::from(repeat) } else { 0 };
        ensure!(
            delta.action(verdict).packets == expected,
            "{program}: {} packets counted as {verdict:?}, expected {expected}: {}",
            delta.action(verdict).packets,
            delta.summary()
        );
        if let (Some(id), Some(before)) = (new_flow_service, flows_before) {
            let opened = datapath.maps().traffic.service(id)?.new_flows - before.new_flows;
            ensure!(
                opened == u64::from(repeat),
                "{program}: {opened} new flows for {repeat} packets"
            );
        }
        let ns = u64::try_from(result.duration.as_nanos()).unwrap_or(u64::MAX);
        // The kernel reports the mean per repetition; the wall clock bounds it.
        ensure!(
            ns > 0 && wall.as_nanos() >= u128::from(ns) * u128::from(repeat) / 2,
            "{program}: implausible timing {ns} ns"
        );
        samples.push(ns);
    }
    Ok(spread(&mut samples))
}

/// Median, minimum and maximum of `samples` (not empty).
fn spread(samples: &mut [u64]) -> (u64, u64, u64) {
    samples.sort_unstable();
    (samples[samples.len() / 2], samples[0], samples[samples.len() - 1])
}
