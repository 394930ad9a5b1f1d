//! `cargo xtask`: what cargo alone cannot do. Installs the BPF toolchain and test tools,
//! builds, runs the lab or the daemon, runs every test tier, and lints.

mod lint;
mod setup;

use std::{os::unix::process::CommandExt as _, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask", about = "Build, run, test and lint the load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what is missing (BPF toolchain, Debian packages) and mount bpffs.
    Setup,
    /// Build the XDP object, lbd and the lab tools (release).
    Build,
    /// Run the lab (no arguments) or lbd with the given arguments, e.g. `-- --config FILE`.
    Run {
        /// Arguments for lbd; without any, a lab is built and lbd runs in it.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run every test: host unit tests, datapath tests, attach tests in network namespaces.
    Test {
        /// Extra arguments for `cargo test` (after `--`), e.g. a test name filter.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt check, clippy with warnings denied, and the `//!` header check.
    Lint,
    /// Benchmarks: the data path's cost per packet next to a floor from the same run.
    Bench {
        /// A shorter run (fewer repetitions and rounds).
        #[arg(long)]
        quick: bool,
    },
}

fn main() {
    if let Err(error) = run(Cli::parse()) {
        eprintln!("xtask: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Cmd::Setup => setup::ensure_all(setup::Need::Tests).map(drop),
        Cmd::Build => {
            let env = setup::ensure_all(setup::Need::Build)?;
            build(&env, Profile::Release)
        }
        Cmd::Run { args } => {
            let env = setup::ensure_all(setup::Need::Run)?;
            build(&env, Profile::Release)?;
            let dir = workspace_root()?.join("target/release");
            let mut cmd = if args.is_empty() {
                Command::new(dir.join("lab"))
            } else {
                let mut cmd = Command::new(dir.join("lbd"));
                cmd.args(&args);
                cmd
            };
            // Replace this process so Ctrl-C reaches the lab or lbd directly.
            Err(cmd.exec()).context("failed to start")
        }
        Cmd::Test { args } => {
            let env = setup::ensure_all(setup::Need::Tests)?;
            build(&env, Profile::Dev)?;
            let mut cmd = cargo(&env);
            cmd.args(["test", "--workspace", "--exclude", "lb-ebpf", "--no-fail-fast"]).args(&args);
            run_status(&mut cmd)
        }
        Cmd::Bench { quick } => {
            let env = setup::ensure_all(setup::Need::Bench)?;
            build(&env, Profile::Release)?;
            let mut cmd = Command::new(workspace_root()?.join("target/release/lb-bench"));
            if quick {
                cmd.arg("--quick");
            }
            run_status(&mut cmd)
        }
        Cmd::Lint => {
            let env = setup::ensure_all(setup::Need::Build)?;
            lint::run(&env)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Profile {
    Dev,
    Release,
}

/// Builds every binary the tests and the lab start (lbd, lab, lab-backend).
fn build(env: &setup::Env, profile: Profile) -> anyhow::Result<()> {
    let mut cmd = cargo(env);
    cmd.args(["build", "--package", "lb-userspace", "--package", "lb-tests", "--bins"]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    run_status(&mut cmd)
}

/// A `cargo` command in the workspace root with the BPF toolchain's environment.
fn cargo(env: &setup::Env) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()));
    if let Ok(root) = workspace_root() {
        cmd.current_dir(root);
    }
    for (key, value) in &env.vars {
        cmd.env(key, value);
    }
    cmd
}

fn run_status(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("failed to run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    let manifest = std::env::var("CARGO_MANIFEST_DIR")
        .map_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().map(PathBuf::from).context("xtask has no parent directory")
}
