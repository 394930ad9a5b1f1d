//! `lb-bench`: what `cargo xtask bench` runs. Five sections, each against a baseline or peers
//! measured in the same run:
//!
//! 1. the data path per packet through `BPF_PROG_TEST_RUN`, next to a floor ([`datapath`]);
//! 2. live forwarding in the lab: UDP packets per second and HTTP requests per second with
//!    latency, through lbd, nftables DNAT and HAProxy on the same topology ([`live`]);
//! 3. the firewall's drop rate under a flood, against xdp-filter and nftables ([`live`]);
//! 4. TLS passthrough: throughput and new connections per second against a direct
//!    connection and HAProxy routing by SNI ([`passthrough`]);
//! 5. the control plane: Maglev table builds, prefix loads, API latency ([`control`]).
//!
//! Prints tables, writes `target/bench/bench.json` and PNG charts ([`charts`]).

#![allow(clippy::cast_precision_loss, reason = "ratios and rates of measured figures")]

mod charts;
mod control;
mod datapath;
mod haproxy;
mod live;
mod passthrough;

use std::{path::PathBuf, time::Instant};

fn main() {
    if let Err(error) = run() {
        eprintln!("lb-bench: {error:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--only SECTION` (datapath, live, passthrough, control) runs one section, for working on it.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let wanted = |section: &str| only.as_deref().is_none_or(|o| o == section);
    if args.iter().any(|a| a == "--charts") {
        // Redraw the charts of the last run.
        let dir = target_dir().join("bench");
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("bench.json"))?)?;
        for chart in charts::draw(&dir, &json)? {
            println!("wrote {}", chart.display());
        }
        return Ok(());
    }
    let started = Instant::now();
    let machine = machine();
    println!("machine: {machine}");
    let (repeat, rounds) = if quick { (200_000, 3) } else { (1_000_000, 5) };
    let datapath =
        if wanted("datapath") { datapath::run(repeat, rounds)? } else { serde_json::Value::Null };
    let live = if wanted("live") { live::run(quick)? } else { serde_json::Value::Null };
    let passthrough =
        if wanted("passthrough") { passthrough::run(quick)? } else { serde_json::Value::Null };
    let control = if wanted("control") { control::run(quick)? } else { serde_json::Value::Null };
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let json = serde_json::json!({
        "date": chrono_free_date(),
        "machine": machine,
        "quick": quick,
        "datapath": datapath,
        "live": live,
        "passthrough": passthrough,
        "control": control,
        "seconds": started.elapsed().as_secs(),
    });
    let path = dir.join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
    println!("\nwrote {}", path.display());
    for chart in charts::draw(&dir, &json)? {
        println!("wrote {}", chart.display());
    }
    println!("bench took {} s", started.elapsed().as_secs());
    Ok(())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    format!("{cpu}, {cpus} CPUs, kernel {}", kernel.trim())
}

fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/lb-bench -> target
    exe.parent()
        .and_then(std::path::Path::parent)
        .map_or_else(|| PathBuf::from("target"), PathBuf::from)
}

/// Today's date (UTC) as YYYY-MM-DD, from the system clock.
fn chrono_free_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
