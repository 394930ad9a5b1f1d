//! Network namespaces owned by a test: created with a unique name, removed on drop together
//! with every process started in them, even when the test fails.

use std::{
    ffi::OsStr,
    fs::File,
    os::fd::AsRawFd as _,
    process::{Child, Command, Output, Stdio},
    sync::{
        Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

/// Prefix of every namespace a test or lab creates; `cleanup_stale` removes leftovers by it.
pub const NETNS_PREFIX: &str = "lbt";

/// The longest a command run by [`Netns::exec`] or [`Netns::exec_output`] may take: far above
/// any the tests run to completion (long jobs such as iperf3 are spawned, with bounds of
/// their own), well below CI's limit.
pub const EXEC_LIMIT_SECS: u32 = 120;

static SEQUENCE: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: `lbt<pid>x<n>`.
#[must_use]
pub fn unique_id() -> String {
    let n = SEQUENCE.fetch_add(1, Ordering::Relaxed);
    format!("{NETNS_PREFIX}{}x{n}", std::process::id())
}

/// Where a background process's stdout and stderr go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChildOutput {
    Discard,
    /// To this process's own stdout and stderr.
    Inherit,
    /// To pipes, read with `Child::wait_with_output` after [`Netns::take_child`].
    Capture,
}

/// A network namespace, deleted on drop with every process started in it.
#[derive(Debug)]
pub struct Netns {
    name: String,
    children: Mutex<Vec<Child>>,
}

impl Netns {
    /// Creates the namespace `name` and brings its loopback up.
    pub fn create(name: &str) -> anyhow::Result<Self> {
        run_cmd(Command::new("ip").args(["netns", "add", name]))
            .with_context(|| format!("failed to create network namespace {name}"))?;
        let ns = Self { name: name.to_owned(), children: Mutex::new(Vec::new()) };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MAC address of interface `dev` in this namespace.
    pub fn mac_of(&self, dev: &str) -> anyhow::Result<[u8; 6]> {
        let out = self.exec(&["ip", "-j", "link", "show", dev])?;
        let json: serde_json::Value = serde_json::from_str(&out)?;
        let text = json[0]["address"].as_str().context("no MAC")?;
        let mut mac = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut mac {
            *byte = u8::from_str_radix(parts.next().context("a short MAC")?, 16)?;
        }
        Ok(mac)
    }

    /// `ip netns exec` of `args` in this namespace, killed after [`EXEC_LIMIT_SECS`]: a
    /// command that waits on a wedged peer (a curl to a stopped lbd) fails the test instead
    /// of hanging the suite.
    fn bounded<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, "timeout", "--kill-after=5"])
            .arg(EXEC_LIMIT_SECS.to_string())
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `args` inside the namespace (bounded, see [`EXEC_LIMIT_SECS`]) and returns its
    /// stdout; a non-zero exit is an error carrying stderr.
    pub fn exec<S: AsRef<OsStr>>(&self, args: &[S]) -> anyhow::Result<String> {
        let out = run_cmd(&mut self.bounded(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `args` inside the namespace (bounded, see [`EXEC_LIMIT_SECS`]) and returns its
    /// whole output, whatever its status (124 when the bound ended it).
    pub fn exec_output<S: AsRef<OsStr>>(&self, args: &[S]) -> anyhow::Result<Output> {
        self.bounded(args).output().context("failed to run ip netns exec")
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("ip");
        cmd.args(["-n", &self.name]).args(args);
        let out = run_cmd(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits up to 10 s until something in the namespace listens on TCP `port`; the error
    /// names `what`.
    pub fn wait_listening(&self, port: u16, what: &str) -> anyhow::Result<()> {
        let up = wait_for(Duration::from_secs(10), || {
            let out = self.exec(&["ss", "-Htln", "sport", "=", &format!(":{port}")]).ok()?;
            (!out.trim().is_empty()).then_some(())
        });
        if up.is_none() {
            bail!("{what} did not start listening on port {port} in {}", self.name);
        }
        Ok(())
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec(&["sysctl", "-qw", &format!("{key}={value}")]).map(drop)
    }

    /// Starts `args` in the background inside the namespace; it is killed when the namespace
    /// is dropped unless taken back with [`Netns::take_child`].
    pub fn spawn<S: AsRef<OsStr>>(&self, args: &[S], output: ChildOutput) -> anyhow::Result<u32> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args).stdin(Stdio::null());
        match output {
            ChildOutput::Discard => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
            ChildOutput::Inherit => &mut cmd,
            ChildOutput::Capture => cmd.stdout(Stdio::piped()).stderr(Stdio::piped()),
        };
        let child = cmd.spawn().context("failed to spawn a process in a namespace")?;
        let pid = child.id();
        self.children.lock().expect("children lock").push(child);
        Ok(pid)
    }

    /// Takes back a child started by [`Netns::spawn`], for a test that waits for it itself.
    pub fn take_child(&self, pid: u32) -> Option<Child> {
        let mut children = self.children.lock().expect("children lock");
        let index = children.iter().position(|c| c.id() == pid)?;
        Some(children.swap_remove(index))
    }

    /// Runs `f` on a thread that has entered this namespace; sockets, interface lookups and
    /// netlink calls made by `f` happen inside it.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> anyhow::Result<R> {
        let path = format!("/var/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("failed to open {path}"))?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns on this thread only; the fd is valid for the call.
                    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                    if ret != 0 {
                        bail!("setns into {path}: {}", std::io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
        })
    }

    fn kill_children(&self) {
        let mut children = self.children.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for child in children.iter_mut() {
            // SAFETY: plain kill(2) on a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(i32::try_from(child.id()).unwrap_or(0), libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        for child in children.iter_mut() {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        children.clear();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.kill_children();
        kill_all_in(&self.name);
        let _ =
            Command::new("ip").args(["netns", "del", &self.name]).stderr(Stdio::null()).status();
    }
}

/// Kills every process still running in namespace `name` (grandchildren included).
fn kill_all_in(name: &str) {
    let Ok(out) = Command::new("ip").args(["netns", "pids", name]).stderr(Stdio::null()).output()
    else {
        return;
    };
    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<i32>() {
            // SAFETY: plain kill(2).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// Removes namespaces left behind by lab processes that no longer exist (a run killed with
/// SIGKILL cannot clean up after itself). Called by the interactive lab only: tests touch
/// the namespaces they create and no others.
pub fn cleanup_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('x') else {
            continue;
        };
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        kill_all_in(name);
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
    // Their files too (the lab's lbd configuration and certificates, named by the lab).
    let Ok(dir) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(NETNS_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split_once('x').and_then(|(pid, _)| pid.parse::<u32>().ok()) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let path = entry.path();
        let _ = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
    }
}

/// Creates a veth pair with one end in each namespace; both ends come up.
pub fn veth(a: &Netns, a_name: &str, b: &Netns, b_name: &str) -> anyhow::Result<()> {
    run_cmd(Command::new("ip").args([
        "link",
        "add",
        "name",
        a_name,
        "netns",
        a.name(),
        "type",
        "veth",
        "peer",
        "name",
        b_name,
        "netns",
        b.name(),
    ]))
    .with_context(|| {
        format!("failed to create veth {}:{a_name} <-> {}:{b_name}", a.name(), b.name())
    })?;
    a.ip(&["link", "set", a_name, "up"])?;
    b.ip(&["link", "set", b_name, "up"])?;
    Ok(())
}

/// Runs a command and fails with its stderr when it exits non-zero.
pub fn run_cmd(cmd: &mut Command) -> anyhow::Result<Output> {
    let out =
        cmd.stdin(Stdio::null()).output().with_context(|| format!("failed to run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(out)
}

/// How [`stop_child`] ended a process.
#[derive(Debug)]
pub struct Stopped {
    /// What it wrote to standard error (when that was captured).
    pub log: String,
    /// Whether it exited within the limit after the signal (else it was killed).
    pub in_time: bool,
}

/// Sends `signal` (`-TERM`, `-KILL`, ...) to `child` and waits at most `limit` for it to
/// exit, reading its captured standard error meanwhile (a full pipe would keep it from
/// exiting); past the limit it is killed. Never waits unbounded.
pub fn stop_child(child: &mut Child, signal: &str, limit: Duration) -> Stopped {
    let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
    // The reader hands its text over a channel: a grandchild that inherited the pipe (an
    // autoscaling command) may hold it open after the child is gone, and the wait for the
    // text must stay bounded too.
    let reader = child.stderr.take().map(|mut err| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut log = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut log);
            let _ = tx.send(log);
        });
        rx
    });
    let exited = wait_for(limit, || child.try_wait().ok().flatten()).is_some();
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    let log =
        reader.and_then(|rx| rx.recv_timeout(Duration::from_secs(5)).ok()).unwrap_or_default();
    Stopped { log, in_time: exited }
}

/// Polls `probe` every 50 ms until it returns `Some`, for at most `timeout`.
pub fn wait_for<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
