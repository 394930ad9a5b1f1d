//! PNG charts of a bench run, drawn by gnuplot (which `cargo xtask bench` installs) from the
//! run's JSON: the data path next to its floors, live forwarding and HTTP against the peers,
//! latency percentiles, firewall drop rates, Maglev build times.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// One bar chart: rows of (label, values), one series per value.
struct Chart {
    file: &'static str,
    title: String,
    ylabel: &'static str,
    series: Vec<&'static str>,
    rows: Vec<(String, Vec<f64>)>,
}

/// Draws every chart the run has data for; returns the files written.
pub fn draw(dir: &Path, run: &Value) -> anyhow::Result<Vec<PathBuf>> {
    let title = |what: &str| {
        format!(
            "{what} - {} ({})",
            run["date"].as_str().unwrap_or(""),
            run["machine"].as_str().unwrap_or("")
        )
    };
    let mut charts = Vec::new();
    let rows = |v: &Value| v.as_array().cloned().unwrap_or_default();
    charts.push(Chart {
        file: "datapath.png",
        title: title("Data path, ns per packet (BPF_PROG_TEST_RUN, median)"),
        ylabel: "ns per packet",
        series: vec!["path", "floor (same run)"],
        rows: rows(&run["datapath"]["rows"])
            .iter()
            .map(|r| {
                let n = |k: &str| r[k].as_f64().unwrap_or(0.0);
                (
                    r["name"].as_str().unwrap_or("").to_owned(),
                    vec![n("median_ns"), n("floor_median_ns")],
                )
            })
            .collect(),
    });
    let fw = &run["datapath"]["firewall"];
    charts.push(Chart {
        file: "firewall-prefixes.png",
        title: title("Firewall, ns per packet matching nothing"),
        ylabel: "ns per packet",
        series: vec![
            "on, unlisted /16",
            "on, listed /16, unlisted /24",
            "on, listed /24",
            "off (alternating)",
        ],
        rows: rows(&fw["rows"])
            .iter()
            .map(|r| {
                let n = |k: &str| r[k].as_f64().unwrap_or(0.0);
                // No listed sources without prefixes: NaN, which gnuplot leaves out.
                let near = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
                (
                    format!("{} prefixes", r["prefixes"]),
                    vec![
                        n("median_ns"),
                        near("listed16_median_ns"),
                        near("listed24_median_ns"),
                        n("off_median_ns"),
                    ],
                )
            })
            .collect(),
    });
    let peers = rows(&run["live"]["peers"]);
    let pick = |key: &str| -> Vec<(String, Vec<f64>)> {
        peers
            .iter()
            .filter(|p| p[key].is_number())
            .map(|p| {
                (p["peer"].as_str().unwrap_or("").to_owned(), vec![p[key].as_f64().unwrap_or(0.0)])
            })
            .collect()
    };
    charts.push(Chart {
        file: "udp-pps.png",
        title: title("UDP packets per second forwarded to the backends (lab, veth)"),
        ylabel: "packets/s",
        series: vec!["forwarded"],
        rows: pick("udp_pps"),
    });
    charts.push(Chart {
        file: "http-rps.png",
        title: title("HTTP requests per second through each (wrk, 32 connections)"),
        ylabel: "requests/s",
        series: vec!["requests/s"],
        rows: pick("http_rps"),
    });
    charts.push(Chart {
        file: "http-latency.png",
        title: title("HTTP latency through each (wrk)"),
        ylabel: "ms",
        series: vec!["p50", "p90", "p99"],
        rows: peers
            .iter()
            .filter(|p| p["latency_ms"].is_object())
            .map(|p| {
                let l = &p["latency_ms"];
                let n = |k: &str| l[k].as_f64().unwrap_or(0.0);
                (p["peer"].as_str().unwrap_or("").to_owned(), vec![n("p50"), n("p90"), n("p99")])
            })
            .collect(),
    });
    charts.push(Chart {
        file: "firewall-drops.png",
        title: title("Firewall drops per second under a flood"),
        ylabel: "packets/s",
        series: vec!["dropped"],
        rows: pick("firewall_drops_per_sec"),
    });
    charts.push(Chart {
        file: "maglev-build.png",
        title: title("Maglev table build time"),
        ylabel: "ms",
        series: vec!["median"],
        rows: rows(&run["control"]["maglev"])
            .iter()
            .map(|r| {
                (
                    format!("{} backends", r["backends"]),
                    vec![r["median_ms"].as_f64().unwrap_or(0.0)],
                )
            })
            .collect(),
    });
    let mut written = Vec::new();
    for chart in charts.iter().filter(|c| !c.rows.is_empty()) {
        written.push(plot(dir, chart)?);
    }
    Ok(written)
}

fn plot(dir: &Path, chart: &Chart) -> anyhow::Result<PathBuf> {
    let data = dir.join(chart.file.replace(".png", ".dat"));
    let mut text = String::new();
    for (label, values) in &chart.rows {
        let _ = write!(text, "\"{}\"", label.replace('"', "'"));
        for v in values {
            let _ = write!(text, " {v}");
        }
        text.push('\n');
    }
    std::fs::write(&data, text)?;
    let out = dir.join(chart.file);
    let mut script = format!(
        "set terminal png size 1100,520\nset termoption noenhanced\nset output '{}'\nset title \"{}\"\nset ylabel '{}'\nset style data histogram\nset style histogram clustered gap 1\nset style fill solid 0.8 border -1\nset boxwidth 0.9\nset xtics rotate by -25 scale 0\nset yrange [0:*]\nset grid ytics\nset key top left\nplot ",
        out.display(),
        chart.title.replace('"', "'"),
        chart.ylabel
    );
    for (i, name) in chart.series.iter().enumerate() {
        if i > 0 {
            script.push_str(", ");
        }
        let _ = write!(script, "'{}' using {}:xtic(1) title '{name}'", data.display(), i + 2);
    }
    script.push('\n');
    let script_path = dir.join(chart.file.replace(".png", ".gp"));
    std::fs::write(&script_path, &script)?;
    let status = Command::new("gnuplot")
        .arg(&script_path)
        .status()
        .context("gnuplot is needed for the charts (`cargo xtask bench` installs it)")?;
    if !status.success() {
        bail!("gnuplot failed on {}", chart.file);
    }
    Ok(out)
}
