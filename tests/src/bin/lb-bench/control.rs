//! Control-plane figures: how long a Maglev table takes to build for 10, 100 and 1,000
//! backends (the prefix loads are in the data-path section, API latency in the live one).

use std::{fmt::Write as _, time::Instant};

use lb_common::maglev::{MaglevBackend, build_table, table_size_for};

/// Builds tables of each size, several times, and reports the median.
pub fn run(quick: bool) -> anyhow::Result<serde_json::Value> {
    let runs = if quick { 3 } else { 7 };
    let mut rows = Vec::new();
    let mut table = format!(
        "{:<28} {:>10} {:>10} {:>10}\n",
        "Maglev table build", "slots", "median ms", "max ms"
    );
    for n in [10u32, 100, 1000] {
        let backends: Vec<MaglevBackend> = (0..n)
            .map(|i| MaglevBackend {
                id: i,
                identity: u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                weight: 100,
            })
            .collect();
        let size = table_size_for(n).unwrap_or(65_537);
        let mut ms = Vec::new();
        for _ in 0..runs {
            let started = Instant::now();
            let table = build_table(&backends, size);
            ms.push(started.elapsed().as_secs_f64() * 1000.0);
            anyhow::ensure!(table.len() == size as usize, "table of {} slots", table.len());
        }
        ms.sort_by(f64::total_cmp);
        let (median, max) = (ms[ms.len() / 2], ms[ms.len() - 1]);
        let _ = writeln!(
            table,
            "{:<28} {size:>10} {median:>10.2} {max:>10.2}",
            format!("{n} backends")
        );
        rows.push(
            serde_json::json!({ "backends": n, "slots": size, "median_ms": median, "max_ms": max }),
        );
    }
    println!("\nControl plane, median of {runs} builds:\n\n{table}");
    Ok(serde_json::json!({ "maglev": rows }))
}
