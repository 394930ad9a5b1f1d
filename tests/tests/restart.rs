//! Restart without loss: `lbd` pins its maps and XDP links, so killing it with SIGKILL leaves
//! the data path running, and a new `lbd` adopts the pinned state — while an iperf3 flow and a
//! loop of HTTP requests go through a NAT service, none failing.

#![allow(clippy::too_many_lines, reason = "an end-to-end scenario reads best top to bottom")]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use lb_tests::{
    lab::{self, Lab},
    netns::{ChildOutput, wait_for},
    privileged::require_privileges,
};

/// A bpffs instance of the test's own, mounted in the root mount namespace so that pins
/// survive `ip netns exec` (which gives each command its own `/sys`). Unmounted on drop, which
/// also removes anything left pinned in it.
struct Bpffs {
    dir: PathBuf,
}

impl Bpffs {
    fn mount(id: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{id}-bpffs"));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&dir).status().unwrap();
        assert!(status.success(), "mount bpffs at {}", dir.display());
        Self { dir }
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Lazily: after a failed assertion this drops before the lab does, while the lbd it
        // kills still holds the pin directory's lock (a plain unmount is refused then, and
        // the mount with its pinned tables would outlive the test).
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn start_lbd(lab: &Lab, config: &Path, pin_dir: &Path) -> Child {
    start_lbd_with(lab, config, pin_dir, &[])
}

/// [`start_lbd`] with more arguments.
fn start_lbd_with(lab: &Lab, config: &Path, pin_dir: &Path, more: &[&str]) -> Child {
    let lbd = lab::bin_path("lbd").unwrap();
    let mut args = vec![
        lbd.as_os_str(),
        "--config".as_ref(),
        config.as_os_str(),
        "--pin-dir".as_ref(),
        pin_dir.as_os_str(),
    ];
    args.extend(more.iter().map(std::ffi::OsStr::new));
    let pid = lab.lb.spawn(&args, ChildOutput::Capture).unwrap();
    lab.lb.take_child(pid).unwrap()
}

/// Stops lbd with `signal` and returns its log; fails if it takes over 20 s to exit.
fn kill(child: &mut Child, signal: &str) -> String {
    let stopped = lb_tests::netns::stop_child(child, signal, Duration::from_secs(20));
    assert!(stopped.in_time, "lbd did not exit within 20 s of {signal}: {}", stopped.log);
    stopped.log
}

#[test]
fn sigkill_and_restart_under_load_loses_nothing() {
    if !require_privileges("sigkill_and_restart_under_load_loses_nothing") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    let bpffs = Bpffs::mount(&lab.id);
    let pin_dir = bpffs.dir.join("lb");
    let config = std::env::temp_dir().join(format!("{}-lbd.toml", lab.id));
    // The first backend (the lowest address) joins by a reload: it takes the next free id,
    // where a fresh start would number it first and shift the others. So a restarted lbd
    // that did not adopt the ids would send the established flow to another backend.
    let full = lab::lab_config(3, &[]);
    let first_backend =
        |addr: IpAddr| format!("[[pool.backend]]\naddress = \"{addr}\"\nweight = 100\n");
    let without_first = full
        .replace(&first_backend(lab.backends[0].v4.into()), "")
        .replace(&first_backend(lab.backends[0].v6.into()), "");
    assert_eq!(
        without_first.len()
            + first_backend(lab.backends[0].v4.into()).len()
            + first_backend(lab.backends[0].v6.into()).len(),
        full.len()
    );
    std::fs::write(&config, &without_first).unwrap();
    for backend in &lab.backends {
        backend
            .ns
            .spawn(&["iperf3", "-s", "-p", &lab::IPERF_PORT.to_string()], ChildOutput::Discard)
            .unwrap();
    }

    let mut first = start_lbd(&lab, &config, &pin_dir);
    let ready =
        wait_for(Duration::from_secs(20), || lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).ok());
    assert!(ready.is_some(), "lbd did not start serving: {}", kill(&mut first, "-TERM"));
    std::fs::write(&config, &full).unwrap();
    let reloaded = Command::new("kill").args(["-HUP", &first.id().to_string()]).status();
    assert!(reloaded.is_ok_and(|s| s.success()));
    let joined = wait_for(Duration::from_secs(20), || {
        let body = lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).ok()?;
        body.starts_with(&lab.backends[0].name).then_some(())
    });
    assert!(joined.is_some(), "the reloaded backend never answered: {}", kill(&mut first, "-TERM"));
    for b in &lab.backends {
        b.ns.wait_listening(lab::IPERF_PORT, &format!("iperf3 server on {}", b.name)).unwrap();
    }

    // Load: one iperf3 flow (killed if it runs 30 s longer than its 12) and a request every
    // 50 ms, each a new connection.
    let iperf = lab
        .client
        .spawn(
            &[
                "timeout",
                "42",
                "iperf3",
                "-c",
                &lab::VIP_V4.to_string(),
                "-p",
                &lab::IPERF_PORT.to_string(),
                "-t",
                "12",
                "-i",
                "1",
                "-J",
                "-b",
                "100M",
            ],
            ChildOutput::Capture,
        )
        .unwrap();
    let iperf = lab.client.take_child(iperf).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // Set while no lbd runs; requests answered then are counted apart.
    let (gap, ok_in_gap) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let client_ns = lab.client.name().to_owned();
    let looper = {
        let (stop, ok, failed, failures) =
            (stop.clone(), ok.clone(), failed.clone(), failures.clone());
        let (gap, ok_in_gap) = (gap.clone(), ok_in_gap.clone());
        std::thread::spawn(move || {
            let url = format!("http://{}:{}/", lab::VIP_V4, lab::HTTP_PORT);
            for i in 0..400 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let out = Command::new("ip")
                    .args(["netns", "exec", &client_ns, "curl", "-sS", "--max-time", "5", &url])
                    .output()
                    .unwrap();
                let body = String::from_utf8_lossy(&out.stdout);
                if out.status.success() && body.starts_with("backend-") {
                    ok.fetch_add(1, Ordering::SeqCst);
                    if gap.load(Ordering::SeqCst) {
                        ok_in_gap.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    failed.fetch_add(1, Ordering::SeqCst);
                    failures.lock().unwrap().push(format!(
                        "request {i}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    std::thread::sleep(Duration::from_secs(3));
    let first_log = kill(&mut first, "-KILL");
    gap.store(true, Ordering::SeqCst);
    // The data path runs on without any daemon.
    let link = lab.lb.ip(&["link", "show", lab::LB_FRONT_IF]).unwrap();
    assert!(link.contains("xdp"), "XDP went with the killed daemon: {link}");
    // At least two seconds without a daemon, and two requests answered in them (at most ten
    // seconds: a loaded machine may start the curls slowly).
    std::thread::sleep(Duration::from_secs(2));
    let _ =
        wait_for(Duration::from_secs(8), || (ok_in_gap.load(Ordering::SeqCst) >= 2).then_some(()));
    gap.store(false, Ordering::SeqCst);
    let mut second = start_lbd(&lab, &config, &pin_dir);
    // Its API answers once the maps are adopted and the program replaced.
    let serving = wait_for(Duration::from_secs(30), || metrics(&lab));
    assert!(serving.is_some(), "the second lbd never answered: {}", kill(&mut second, "-TERM"));
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::SeqCst);
    looper.join().unwrap();

    let output = iperf.wait_with_output().unwrap();
    let second_log = kill(&mut second, "-TERM");
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!("iperf3 output is not JSON ({e}): {}", String::from_utf8_lossy(&output.stderr))
    });
    assert!(report.get("error").is_none(), "iperf3 failed: {}", report["error"]);
    let intervals = report["intervals"].as_array().expect("intervals");
    assert!(intervals.len() >= 11, "{} intervals", intervals.len());
    for (i, interval) in intervals.iter().enumerate() {
        let bytes = interval["sum"]["bytes"].as_u64().unwrap_or(0);
        assert!(bytes > 0, "the iperf3 flow stalled in second {i}");
    }
    let (ok, failed) = (ok.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed: {:?}",
        ok + failed,
        failures.lock().unwrap()
    );
    // Requests went on through the two seconds without any daemon (not a throughput bar:
    // each is a process started in the client's namespace).
    let in_gap = ok_in_gap.load(Ordering::SeqCst);
    assert!(in_gap >= 2, "only {in_gap} requests answered while no lbd ran ({ok} in all)");
    assert!(
        second_log.contains("adopting pinned maps"),
        "the second lbd did not adopt the pins: {second_log}"
    );
    assert!(second_log.contains("replaced the program of the pinned XDP link"), "{second_log}");
    let _ = first_log;
    // The second lbd, stopped without --detach-on-exit, said the data path stays.
    assert!(second_log.contains("the data path stays attached"), "{second_log}");
    // After a clean stop without --detach-on-exit, the data path still serves.
    assert!(lab.curl(IpAddr::V4(lab::VIP_V4), lab::HTTP_PORT).unwrap().starts_with("backend-"));
    let _ = std::fs::remove_file(&config);
    drop(lab);
    drop(bpffs);
}

#[test]
fn pinned_maps_of_another_layout_are_replaced_not_misread() {
    use lb_userspace::{Datapath, datapath::LoadOptions};
    if !require_privileges("pinned_maps_of_another_layout_are_replaced_not_misread") {
        return;
    }
    let id = lb_tests::netns::unique_id();
    let bpffs = Bpffs::mount(&id);
    let pin_dir = bpffs.dir.join("lb");
    let options = |entries| LoadOptions {
        conntrack_entries: entries,
        pin_dir: Some(pin_dir.clone()),
        ..LoadOptions::default()
    };
    let maps_dir = pin_dir.join(format!("maps-v{}", lb_common::maps::MAPS_LAYOUT_VERSION));
    let pinned_ids = || -> std::collections::BTreeMap<String, u32> {
        std::fs::read_dir(&maps_dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .map(|p| {
                let id = aya::maps::MapInfo::from_pin(&p).unwrap().id();
                (p.file_name().unwrap().to_string_lossy().into_owned(), id)
            })
            .collect()
    };
    let first = Datapath::load_with(&options(65_536)).unwrap();
    assert!(!first.adopted(), "nothing was pinned before");
    // One lbd per pin directory: a second load while the first holds it is refused.
    let Err(error) = Datapath::load_with(&options(65_536)) else {
        panic!("a second data path loaded on a pin directory in use")
    };
    assert!(error.to_string().contains("in use by another lbd"), "{error}");
    drop(first);
    let pinned = pinned_ids();
    assert!(pinned.contains_key(lb_common::maps::TX_PORTS), "{pinned:?}");
    // Same layout: adopted, every pinned map kept (a devmap's flags as the kernel reports
    // them include one it sets itself).
    let second = Datapath::load_with(&options(65_536)).unwrap();
    assert!(second.adopted());
    assert_eq!(pinned_ids(), pinned, "a pinned map of the same layout was replaced");
    drop(second);
    // A connection table of another size is replaced (and the rest adopted).
    let conntrack = pin_dir
        .join(format!("maps-v{}", lb_common::maps::MAPS_LAYOUT_VERSION))
        .join(lb_common::maps::CONNTRACK);
    let before = aya::maps::MapInfo::from_pin(&conntrack).unwrap().id();
    let third = Datapath::load_with(&options(131_072)).unwrap();
    assert!(third.adopted(), "the other maps are reused");
    let after = aya::maps::MapInfo::from_pin(&conntrack).unwrap();
    assert_ne!(after.id(), before, "the old connection table was not replaced");
    assert_eq!(after.max_entries(), 131_072);
    // Maps pinned by another layout version are removed, not read.
    let stale = pin_dir.join("maps-v999");
    std::fs::create_dir_all(&stale).unwrap();
    drop(third);
    let fourth = Datapath::load_with(&options(131_072)).unwrap();
    assert!(!stale.exists(), "maps of another layout version are still there");
    drop(fourth);
    // A map of another type with the same sizes is replaced too (a per-CPU array where the
    // caches' epoch, a plain one-entry array, is pinned), and with it every other map: they
    // name each other's ids, so none is adopted alone.
    let epoch = conntrack.with_file_name(lb_common::maps::CACHE_EPOCH);
    std::fs::remove_file(&epoch).unwrap();
    aya::maps::PerCpuArray::<_, u32>::create(1, 0).unwrap().pin(&epoch).unwrap();
    let before = pinned_ids();
    let fifth = Datapath::load_with(&options(131_072)).unwrap();
    assert!(!fifth.adopted(), "the services were adopted beside a replaced map");
    let after = pinned_ids();
    for (map, id) in &before {
        assert_ne!(after.get(map), Some(id), "{map} was kept beside a replaced map");
    }
    let epoch_info = aya::maps::MapInfo::from_pin(&epoch).unwrap();
    assert_eq!(epoch_info.map_type().unwrap(), aya::maps::MapType::Array);
    drop(fifth);
    drop(bpffs);
}

#[test]
fn a_pinned_link_on_an_interface_no_longer_configured_is_detached() {
    use lb_userspace::{
        Datapath,
        datapath::{LoadOptions, XdpModeSetting},
    };
    if !require_privileges("a_pinned_link_on_an_interface_no_longer_configured_is_detached") {
        return;
    }
    let id = lb_tests::netns::unique_id();
    let bpffs = Bpffs::mount(&id);
    let options = LoadOptions {
        conntrack_entries: 65_536,
        pin_dir: Some(bpffs.dir.join("lb")),
        ..LoadOptions::default()
    };
    let ns = lb_tests::daemon::veth_netns().unwrap();
    ns.ip(&["link", "set", "veth1", "up"]).unwrap();
    let xdp_on = |dev: &str| ns.ip(&["-d", "link", "show", dev]).unwrap().contains("prog/xdp");
    ns.enter(|| {
        let mut first = Datapath::load_with(&options).unwrap();
        for dev in ["veth0", "veth1"] {
            first.attach(dev, XdpModeSetting::Auto).unwrap();
        }
    })
    .unwrap();
    assert!(xdp_on("veth0") && xdp_on("veth1"), "the pinned links outlive their process");
    // The next run serves veth0 only: veth1 must not go on being balanced and filtered.
    let detached = ns
        .enter(|| {
            let mut second = Datapath::load_with(&options).unwrap();
            second.attach("veth0", XdpModeSetting::Auto).unwrap();
            second.detach_unconfigured(&["veth0"])
        })
        .unwrap();
    assert_eq!(detached, vec!["veth1".to_owned()]);
    assert!(xdp_on("veth0"), "the configured interface lost its program");
    assert!(!xdp_on("veth1"), "the interface no longer configured is still attached");
    drop(ns);
    drop(bpffs);
}

/// Health checks slow enough that a restarted lbd which forgot a backend was down would send
/// it new flows for about a second before its checks caught up.
const SLOW_CHECK: &str = r#"
[pool.health_check]
kind = "http"
interval_ms = 1000
fast_interval_ms = 300
timeout_ms = 250
jitter_ms = 50
rise = 2
fall = 3
expect = "backend-"
"#;

/// `GET /metrics` from inside the load balancer's namespace, once lbd answers.
fn metrics(lab: &Lab) -> Option<String> {
    lab.lb.exec(&["curl", "-sS", "--fail", "--max-time", "2", "http://127.0.0.1:7070/metrics"]).ok()
}

/// A backend failing its checks when lbd stops is marked down in the pinned maps; the next
/// lbd keeps it out of the tables from its first moment until its checks pass again, instead
/// of sending it new flows until `fall` checks fail anew.
#[test]
fn a_backend_down_before_a_restart_stays_out_after_it() {
    if !require_privileges("a_backend_down_before_a_restart_stays_out_after_it") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    let bpffs = Bpffs::mount(&lab.id);
    let pin_dir = bpffs.dir.join("lb");
    let config = std::env::temp_dir().join(format!("{}-down.toml", lab.id));
    let extras = lab::PoolExtras { keys: "", tables: SLOW_CHECK };
    std::fs::write(&config, lab::lab_config_pools(3, &[], "", "", &extras)).unwrap();
    let victim = &lab.backends[1];
    let healthy = |value: u8| {
        format!("lb_backend_healthy{{pool=\"web4\",backend=\"{}\"}} {value}", victim.v4)
    };

    let mut first = start_lbd(&lab, &config, &pin_dir);
    let up = wait_for(Duration::from_secs(20), || {
        metrics(&lab).filter(|m| m.contains(&healthy(1))).map(|_| ())
    });
    assert!(up.is_some(), "lbd did not come up: {}", kill(&mut first, "-TERM"));
    lab.stop_server(1).unwrap();
    let down = wait_for(Duration::from_secs(10), || {
        metrics(&lab).filter(|m| m.contains(&healthy(0))).map(|_| ())
    });
    assert!(down.is_some(), "{} not marked down: {}", victim.name, kill(&mut first, "-TERM"));
    kill(&mut first, "-KILL");

    let mut second = start_lbd(&lab, &config, &pin_dir);
    let first_scrape = wait_for(Duration::from_secs(20), || metrics(&lab));
    let Some(first_scrape) = first_scrape else {
        panic!("the second lbd did not answer: {}", kill(&mut second, "-TERM"));
    };
    assert!(first_scrape.contains(&healthy(0)), "down from the start: {first_scrape}");
    let weight =
        format!("lb_backend_effective_weight{{pool=\"web4\",backend=\"{}\"}} 0", victim.v4);
    assert!(first_scrape.contains(&weight), "no weight from the start: {first_scrape}");
    // New connections right after the restart all reach live servers.
    for i in 0..30 {
        let answer = lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT);
        assert!(
            answer.as_ref().is_ok_and(|a| a.starts_with("backend-")),
            "request {i} after the restart: {answer:?}"
        );
    }
    // It is not kept out for good: its server back, its checks pass and it returns.
    lab.start_server(1).unwrap();
    let back = wait_for(Duration::from_secs(10), || {
        metrics(&lab).filter(|m| m.contains(&healthy(1))).map(|_| ())
    });
    let log = kill(&mut second, "-TERM");
    assert!(back.is_some(), "{} did not come back: {log}", victim.name);
    assert!(log.contains("stay out until they pass"), "{log}");
    let _ = std::fs::remove_file(&config);
    drop(lab);
    drop(bpffs);
}

/// A pool `alt` of `members` (TOML `[[pool.backend]]` tables) checked by TCP on the
/// iperf3 port, quickly (as `SLOW_CHECK`).
fn alt_pool(members: &str) -> String {
    format!(
        "[[pool]]\nname = \"alt\"\n{members}[pool.health_check]\nkind = \"tcp\"\nport = {}\ninterval_ms = 1000\nfast_interval_ms = 300\ntimeout_ms = 250\nrise = 2\nfall = 3\n",
        lab::IPERF_PORT
    )
}

/// The `lb_backend_healthy` line of backend `backend` in `pool` with `value`.
fn healthy_line(pool: &str, backend: std::net::Ipv4Addr, value: u8) -> String {
    format!("lb_backend_healthy{{pool=\"{pool}\",backend=\"{backend}\"}} {value}")
}

/// Starts lbd again on `pin_dir` and returns its first metrics and its log (it is stopped
/// as soon as it has answered).
fn first_scrape_of_a_restart(lab: &Lab, config: &Path, pin_dir: &Path) -> (String, String) {
    let mut second = start_lbd(lab, config, pin_dir);
    let scrape = wait_for(Duration::from_secs(20), || metrics(lab));
    let log = kill(&mut second, "-TERM");
    (scrape.unwrap_or_else(|| panic!("the second lbd did not answer: {log}")), log)
}

#[test]
fn a_backend_down_in_one_pool_only_starts_down_in_that_pool_alone() {
    // Backend 1 is in two pools: `web4` checks HTTP (which it serves) and `alt` checks the
    // iperf3 port (where it runs no server). Down in `alt` alone before the restart, it
    // starts down in `alt` alone after it: `web4` sends it flows from the first moment.
    if !require_privileges("a_backend_down_in_one_pool_only_starts_down_in_that_pool_alone") {
        return;
    }
    let lab = Lab::create(3).unwrap();
    for i in [0, 2] {
        let b = &lab.backends[i];
        b.ns.spawn(&["iperf3", "-s", "-p", &lab::IPERF_PORT.to_string()], ChildOutput::Discard)
            .unwrap();
        b.ns.wait_listening(lab::IPERF_PORT, "iperf3").unwrap();
    }
    let bpffs = Bpffs::mount(&lab.id);
    let pin_dir = bpffs.dir.join("lb");
    let config = std::env::temp_dir().join(format!("{}-pools.toml", lab.id));
    let extras = lab::PoolExtras { keys: "", tables: SLOW_CHECK };
    let members: Vec<String> = (0..3)
        .map(|i| format!("[[pool.backend]]\naddress = \"{}\"\n", lab::backend_v4(i)))
        .collect();
    let alt = format!(
        "{}[[service]]\nname = \"alt\"\naddress = \"{}\"\nprotocol = \"tcp\"\nport = {}\npool = \"alt\"\nmode = \"nat\"\nnat_source = \"{}\"\nnat_ports = \"31000-31999\"\n",
        alt_pool(&members.concat()),
        lab::VIP_V4,
        lab::IPERF_PORT + 1,
        lab::LB_BACK_V4,
    );
    std::fs::write(&config, lab::lab_config_pools(3, &[], "", "", &extras) + &alt).unwrap();
    let victim = lab::backend_v4(1);
    let healthy = |pool: &str, value: u8| healthy_line(pool, victim, value);
    let mut first = start_lbd(&lab, &config, &pin_dir);
    let settled = wait_for(Duration::from_secs(20), || {
        metrics(&lab).filter(|m| m.contains(&healthy("web4", 1)) && m.contains(&healthy("alt", 0)))
    });
    assert!(settled.is_some(), "checks never settled: {}", kill(&mut first, "-TERM"));
    kill(&mut first, "-KILL");

    let (scrape, log) = first_scrape_of_a_restart(&lab, &config, &pin_dir);
    assert!(scrape.contains(&healthy("alt", 0)), "down in alt from the start: {scrape}\n{log}");
    assert!(scrape.contains(&healthy("web4", 1)), "up in web4 from the start: {scrape}\n{log}");
    let weight = format!("lb_backend_effective_weight{{pool=\"web4\",backend=\"{victim}\"}} 100");
    assert!(scrape.contains(&weight), "its full weight in web4: {scrape}");
    let _ = std::fs::remove_file(&config);
    drop(lab);
    drop(bpffs);
}

#[test]
fn a_backend_down_where_no_table_tells_its_pool_stays_down_after_a_restart() {
    // Backend 1 is down in `web4` (its HTTP server stopped: weight 0, no slots in web4's
    // tables) and up in `alt`, a pool added later (a higher id), at weight 0 (no slots in
    // any table either). No table says which of its two pinned ids is which pool's: the
    // restart hands out the lowest first, in pool-name order, so `alt` takes web4's
    // flagged id and `web4` alt's unflagged one. `web4` must not take that as "up": the
    // dead backend would get new flows from the first moment.
    if !require_privileges(
        "a_backend_down_where_no_table_tells_its_pool_stays_down_after_a_restart",
    ) {
        return;
    }
    let lab = Lab::create(3).unwrap();
    lab.start_iperf_servers().unwrap();
    let bpffs = Bpffs::mount(&lab.id);
    let pin_dir = bpffs.dir.join("lb");
    let config = std::env::temp_dir().join(format!("{}-evidence.toml", lab.id));
    let extras = lab::PoolExtras { keys: "", tables: SLOW_CHECK };
    let base = lab::lab_config_pools(3, &[], "", "", &extras);
    let victim = lab::backend_v4(1);
    let alt = alt_pool(&format!("[[pool.backend]]\naddress = \"{victim}\"\nweight = 0\n"));
    let healthy = |pool: &str, value: u8| healthy_line(pool, victim, value);
    std::fs::write(&config, &base).unwrap();
    let mut first = start_lbd(&lab, &config, &pin_dir);
    let up = wait_for(Duration::from_secs(20), || {
        metrics(&lab).filter(|m| m.contains(&healthy("web4", 1)))
    });
    assert!(up.is_some(), "lbd did not come up: {}", kill(&mut first, "-TERM"));
    // `alt` joins by a reload: its id for the backend comes after web4's.
    std::fs::write(&config, format!("{base}{alt}")).unwrap();
    let _ = std::process::Command::new("kill").args(["-HUP", &first.id().to_string()]).status();
    lab.stop_server(1).unwrap();
    let settled = wait_for(Duration::from_secs(20), || {
        metrics(&lab).filter(|m| m.contains(&healthy("web4", 0)) && m.contains(&healthy("alt", 1)))
    });
    assert!(settled.is_some(), "checks never settled: {}", kill(&mut first, "-TERM"));
    kill(&mut first, "-KILL");

    let (scrape, log) = first_scrape_of_a_restart(&lab, &config, &pin_dir);
    assert!(scrape.contains(&healthy("web4", 0)), "down in web4 from the start: {scrape}\n{log}");
    let weight = format!("lb_backend_effective_weight{{pool=\"web4\",backend=\"{victim}\"}} 0");
    assert!(scrape.contains(&weight), "no weight in web4 from the start: {scrape}");
    let _ = std::fs::remove_file(&config);
    drop(lab);
    drop(bpffs);
}

/// The load balancer namespace's `net.ipv4.ip_local_reserved_ports`.
fn reserved_ports(lab: &Lab) -> String {
    lab.lb.exec(&["cat", "/proc/sys/net/ipv4/ip_local_reserved_ports"]).unwrap().trim().to_owned()
}

#[test]
fn nat_ports_no_longer_configured_are_given_back_across_a_restart() {
    if !require_privileges("nat_ports_no_longer_configured_are_given_back_across_a_restart") {
        return;
    }
    let lab = Lab::create(1).unwrap();
    let bpffs = Bpffs::mount(&lab.id);
    let pin_dir = bpffs.dir.join("lb");
    let config = std::env::temp_dir().join(format!("{}-ports.toml", lab.id));
    // An administrator's reservations, which lbd must leave alone: a list longer than the
    // 32 bytes a small first read would return of it.
    let admin = "1024-1100,2049,3260,5000-5100,6000-6100,8000-8100";
    lab.lb.sysctl("net.ipv4.ip_local_reserved_ports", admin).unwrap();
    let with_range = |range: &str| {
        lab::lab_config(1, &[])
            .replace("nat_source = ", &format!("nat_ports = \"{range}\"\nnat_source = "))
    };
    std::fs::write(&config, with_range("40000-40999")).unwrap();
    let mut first = start_lbd(&lab, &config, &pin_dir);
    let ready =
        wait_for(Duration::from_secs(20), || lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).ok());
    assert!(ready.is_some(), "lbd did not start serving: {}", kill(&mut first, "-TERM"));
    assert_eq!(reserved_ports(&lab), format!("{admin},40000-40999"));

    // A reload moves the range: the old one is given back.
    std::fs::write(&config, with_range("41000-41999")).unwrap();
    let _ = Command::new("kill").args(["-HUP", &first.id().to_string()]).status();
    let moved = wait_for(Duration::from_secs(10), || {
        (reserved_ports(&lab) == format!("{admin},41000-41999")).then_some(())
    });
    assert!(
        moved.is_some(),
        "after the reload: {}: {}",
        reserved_ports(&lab),
        kill(&mut first, "-TERM")
    );

    // A restarted lbd knows its own reservations from the pin directory.
    kill(&mut first, "-KILL");
    std::fs::write(&config, with_range("42000-42099")).unwrap();
    // (The pinned data path serves throughout: wait for the new lbd's reservation itself.)
    let mut second = start_lbd_with(&lab, &config, &pin_dir, &["--detach-on-exit"]);
    let moved = wait_for(Duration::from_secs(20), || {
        (reserved_ports(&lab) == format!("{admin},42000-42099")).then_some(())
    });
    let reserved = reserved_ports(&lab);
    let log = kill(&mut second, "-TERM");
    assert!(moved.is_some(), "after the restart: {reserved}: {log}");
    // Stopped with --detach-on-exit, the data path is gone and its ports with it; the
    // administrator's stay.
    assert_eq!(reserved_ports(&lab), admin, "after --detach-on-exit: {log}");
    // And nothing of lbd's stays pinned, its record of the ports included.
    assert!(!pin_dir.exists(), "{} left behind: {log}", pin_dir.display());
    let _ = std::fs::remove_file(&config);
    drop(lab);
    drop(bpffs);
}

/// A start refused for what can be checked before anything changes (here an interface that
/// does not exist) leaves the pinned data path, which forwards while lbd is down, as it was:
/// the next configuration's services are not installed by an lbd that then exits.
#[test]
fn a_refused_start_leaves_the_pinned_services_as_they_were() {
    use lb_userspace::{Config, Datapath, daemon::Daemon, datapath::LoadOptions};
    if !require_privileges("a_refused_start_leaves_the_pinned_services_as_they_were") {
        return;
    }
    let id = lb_tests::netns::unique_id();
    let bpffs = Bpffs::mount(&id);
    let pin_dir = bpffs.dir.join("lb");
    let ns = lb_tests::daemon::veth_netns().unwrap();
    let service = |name: &str, port: u16| {
        lb_tests::config::tcp_service(name, lab::VIP_V4, port, "web", "mode = \"dsr-l2\"")
    };
    let first = format!(
        "[daemon]\npin_dir = \"{}\"\n[api]\nlisten = \"\"\n[[interface]]\nname = \"veth0\"\n{}{}",
        pin_dir.display(),
        lb_tests::config::pool("web", &[(lab::backend_v4(0), "")]),
        service("web", 80)
    );
    let second = format!("{first}{}[[interface]]\nname = \"nope0\"\n", service("more", 8080));
    let parse = |text: &str| Config::parse(text, "test").unwrap();
    let (a, b) = (parse(&first), parse(&second));
    let load = LoadOptions {
        conntrack_entries: a.conntrack.max_entries,
        pin_dir: Some(pin_dir.clone()),
        ..LoadOptions::default()
    };
    // Loading adopts the pinned GLOBALS as they are: the seed read back is the pinned one,
    // not this one.
    let load_again = LoadOptions { hash_seed: 99, ..load.clone() };
    let services = move || {
        let datapath = Datapath::load_with(&load).unwrap();
        let mut keys: Vec<String> = datapath
            .maps()
            .services
            .entries()
            .unwrap()
            .iter()
            .map(|(key, _)| format!("{key:?}"))
            .collect();
        keys.sort();
        keys
    };
    ns.enter(move || drop(Daemon::start(a, None, None).unwrap())).unwrap();
    let before = ns.enter(services.clone()).unwrap();
    assert_eq!(before.len(), 1, "{before:?}");
    let refused =
        ns.enter(move || Daemon::start(b, None, None).map(drop).map_err(|e| format!("{e:#}")));
    let error = refused.unwrap().unwrap_err();
    assert!(error.contains("nope0"), "{error}");
    assert_eq!(
        ns.enter(services.clone()).unwrap(),
        before,
        "the refused start changed the services"
    );
    // Refused for a firewall prefix file that is not there, which is read once the data
    // path is loaded: the pinned GLOBALS keep the running hash seed (another seed would
    // send picked-up flows to other backends than the other nodes choose).
    let missing = format!(
        "{}[firewall]\n[[firewall.rule]]\nname = \"block\"\naction = \"deny\"\nsource_file = \"{}\"\n",
        first.replace("[api]", "hash_seed = 7\n[api]"),
        bpffs.dir.join("no-such-file").display()
    );
    let c = parse(&missing);
    let refused =
        ns.enter(move || Daemon::start(c, None, None).map(drop).map_err(|e| format!("{e:#}")));
    let error = refused.unwrap().unwrap_err();
    assert!(error.contains("no-such-file"), "{error}");
    let seed = ns
        .enter(move || {
            let datapath = Datapath::load_with(&load_again).unwrap();
            datapath.maps().globals.get().unwrap().hash_seed
        })
        .unwrap();
    assert_eq!(seed, 0, "the refused start changed the pinned hash seed");
    assert_eq!(ns.enter(services).unwrap(), before);
    drop(ns);
    drop(bpffs);
}
