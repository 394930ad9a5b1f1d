//! `lbd` as the tests run it: in the lab's load-balancer namespace with a configuration file
//! of the test's own, reloaded with SIGHUP, stopped with SIGTERM (its log returned), and
//! killed if the test fails first; or alone on a veth in a sandbox of its own, its REST API
//! guarded by a bearer token.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    lab::{self, Lab},
    netns::{ChildOutput, Netns, unique_id, wait_for},
};

/// Starts `lbd --config CONFIG --detach-on-exit` in `ns` (so its programs go when it stops);
/// returns its pid, as [`Netns::spawn`] does.
pub fn spawn_lbd(ns: &Netns, config: &Path, output: ChildOutput) -> anyhow::Result<u32> {
    let lbd = lab::bin_path("lbd")?;
    ns.spawn(
        &[lbd.as_os_str(), "--config".as_ref(), config.as_os_str(), "--detach-on-exit".as_ref()],
        output,
    )
}

/// The interface lbd attaches to in a sandbox: one end of a veth pair whose other end,
/// `veth1`, stays in the same namespace with nothing behind it.
pub const SANDBOX_IF: &str = "veth0";

/// A namespace of the test's own holding the veth pair `veth0`–`veth1`, `veth0` up: somewhere
/// lbd can attach without the lab.
pub fn veth_netns() -> anyhow::Result<Netns> {
    let ns = Netns::create(&unique_id())?;
    ns.ip(&["link", "add", "name", SANDBOX_IF, "type", "veth", "peer", "name", "veth1"])?;
    ns.ip(&["link", "set", SANDBOX_IF, "up"])?;
    Ok(ns)
}

/// lbd's configuration in a sandbox: nothing pinned, the `[api]` keys `api`, the data path on
/// [`SANDBOX_IF`], then `body` (the pools and services, see [`crate::config`]).
#[must_use]
pub fn sandbox_config(api: &str, body: &str) -> String {
    format!(
        "[daemon]\npin_dir = \"\"\n[api]\n{api}\n[[interface]]\nname = \"{SANDBOX_IF}\"\n{body}"
    )
}

/// lbd alone in a [`veth_netns`], with a temporary directory (`<namespace>-<what>`) for its
/// files: the bearer token, mode 0600 (lbd refuses one others can read), and the
/// configuration. The namespace goes on drop, with lbd if it still runs, then the directory,
/// even when the test fails.
#[derive(Debug)]
pub struct LbdSandbox {
    pub ns: Netns,
    dir: TempDir,
    pub token_file: PathBuf,
    pub config: PathBuf,
}

impl LbdSandbox {
    pub fn create(what: &str, token: &str) -> anyhow::Result<Self> {
        let ns = veth_netns()?;
        let dir = TempDir(std::env::temp_dir().join(format!("{}-{what}", ns.name())));
        std::fs::create_dir_all(&dir.0)
            .with_context(|| format!("failed to create {}", dir.0.display()))?;
        let token_file = dir.0.join("token");
        std::fs::write(&token_file, token)?;
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))?;
        let config = dir.0.join("lb.toml");
        Ok(Self { ns, dir, token_file, config })
    }

    /// The temporary directory, for further files of the test (certificates).
    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// Writes lbd's [`sandbox_config`]: the API on `listen` with the token file and the
    /// further `[api]` keys `api` (empty for none), then `body`.
    pub fn write_config(&self, listen: &str, api: &str, body: &str) -> anyhow::Result<()> {
        let api =
            format!("listen = \"{listen}\"\ntoken_file = \"{}\"\n{api}", self.token_file.display());
        std::fs::write(&self.config, sandbox_config(&api, body))
            .with_context(|| format!("failed to write {}", self.config.display()))
    }

    /// Runs lbd in the foreground on the configuration written last, for one it must refuse
    /// (killed after 20 s if it does not), and returns how it ended.
    pub fn run_lbd_to_exit(&self) -> anyhow::Result<std::process::Output> {
        let lbd = lab::bin_path("lbd")?;
        self.ns.exec_output(&[
            "timeout".as_ref(),
            "20".as_ref(),
            lbd.as_os_str(),
            "--config".as_ref(),
            self.config.as_os_str(),
        ])
    }

    /// Starts lbd on the configuration written last; returns its pid, as [`spawn_lbd`] does.
    pub fn spawn_lbd(&self, output: ChildOutput) -> anyhow::Result<u32> {
        spawn_lbd(&self.ns, &self.config, output)
    }

    /// Stops the lbd [`LbdSandbox::spawn_lbd`] started (SIGTERM) and waits for it to exit.
    pub fn stop_lbd(&self, pid: u32) {
        if let Some(mut child) = self.ns.take_child(pid) {
            let stopped = crate::netns::stop_child(&mut child, "-TERM", Duration::from_secs(20));
            assert!(stopped.in_time, "lbd did not exit within 20 s of SIGTERM: {}", stopped.log);
        }
    }
}

/// A directory removed with everything in it on drop (a failed test's too).
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file removed when dropped (also when the test fails).
#[derive(Debug)]
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// `<temp dir>/<unique id>-<suffix>`: named as the lab's files, which the interactive
    /// lab's `cleanup_stale` removes after a killed run.
    #[must_use]
    pub fn named(suffix: &str) -> Self {
        Self(std::env::temp_dir().join(format!("{}-{suffix}", crate::netns::unique_id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `lbd` running in the lab with a configuration file it can be told to reload.
#[derive(Debug)]
pub struct LabDaemon {
    child: Option<Child>,
    config: PathBuf,
}

impl LabDaemon {
    pub fn start(lab: &Lab, config: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-lbd.toml", lab.id));
        std::fs::write(&path, config).unwrap();
        let pid = spawn_lbd(&lab.lb, &path, ChildOutput::Capture).unwrap();
        let child = lab.lb.take_child(pid).unwrap();
        let mut daemon = Self { child: Some(child), config: path };
        // Ready when the service answers.
        let ready =
            wait_for(Duration::from_secs(20), || lab.curl(lab::VIP_V4.into(), lab::HTTP_PORT).ok());
        assert!(ready.is_some(), "lbd did not start serving: {}", daemon.stop());
        daemon
    }

    /// Writes `config` to lbd's configuration file and tells lbd to reload it.
    pub fn reload(&self, config: &str) {
        std::fs::write(&self.config, config).unwrap();
        let pid = self.child.as_ref().unwrap().id();
        let status = Command::new("kill").args(["-HUP", &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Writes `config` to lbd's configuration file and has lbd reload it through its API
    /// (`POST /v1/reload` on the lab's 127.0.0.1:7070), which answers once the reload is
    /// applied or rejected; returns the HTTP status and the answer's body.
    pub fn reload_by_api(&self, lab: &Lab, config: &str) -> (u16, String) {
        std::fs::write(&self.config, config).unwrap();
        let out = lab
            .lb
            .exec(&[
                "curl",
                "-sS",
                "-w",
                "\n%{http_code}",
                "-X",
                "POST",
                "http://127.0.0.1:7070/v1/reload",
            ])
            .unwrap();
        let (body, status) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
        (status.parse().unwrap_or(0), body.to_owned())
    }

    /// Stops lbd (SIGTERM) and returns its log; empty if it was stopped already.
    pub fn stop(&mut self) -> String {
        let Some(mut child) = self.child.take() else { return String::new() };
        let stopped = crate::netns::stop_child(&mut child, "-TERM", Duration::from_secs(20));
        if stopped.in_time {
            stopped.log
        } else {
            format!("(lbd did not exit within 20 s of SIGTERM; killed)\n{}", stopped.log)
        }
    }

    /// Stops lbd, removes its configuration file and returns its log.
    pub fn finish(mut self) -> String {
        self.stop()
    }
}

impl Drop for LabDaemon {
    /// Kills lbd if it still runs and removes its configuration file, and the copy of the
    /// original lbd keeps when an API call rewrites it, on failure too.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.config);
        let _ = std::fs::remove_file(self.config.with_extension("toml.orig"));
    }
}
