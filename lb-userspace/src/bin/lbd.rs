//! `lbd`, the load balancer daemon: parses flags, loads the configuration and calls
//! [`lb_userspace::run`].

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lb_userspace::{Config, RunOptions, daemon::ConfigFile};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

#[derive(Debug, Parser)]
#[command(name = "lbd", version, about = "XDP load balancer and firewall daemon")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Configuration file (TOML); see docs/configuration.md.
    #[arg(long, short, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Remove the XDP programs, maps and pins when the daemon exits, and give back the NAT
    /// ports it reserved (by default the data path keeps running without the daemon).
    #[arg(long)]
    detach_on_exit: bool,
    /// Pin maps and links here instead of the configured `pin_dir` (`""` pins nothing).
    #[arg(long, value_name = "DIR")]
    pin_dir: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Validate a configuration file without touching the kernel.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Some(Command::CheckConfig { file }) => match Config::load(&file) {
            // The firewall's prefix files are read too (the clock rate only scales rates), and
            // the autoscalers' secrets and the API's token and TLS files.
            Ok(config) => {
                match lb_userspace::daemon::compile_firewall(&config, 1000).and_then(|_| {
                    let mut files = lb_userspace::daemon::check_secret_files(&config);
                    files.extend(lb_userspace::api::check_files(&config.api));
                    if files.is_empty() { Ok(()) } else { Err(files) }
                }) {
                    Ok(()) => {
                        println!("{}: ok", file.display());
                        ExitCode::SUCCESS
                    }
                    Err(problems) => {
                        eprintln!("{}: invalid:\n  {}", file.display(), problems.join("\n  "));
                        ExitCode::from(2)
                    }
                }
            }
            Err(error) => {
                eprintln!("{error}");
                ExitCode::from(2)
            }
        },
        None => {
            let Some(path) = cli.config else {
                eprintln!("lbd: no configuration; pass --config FILE (see docs/configuration.md)");
                return ExitCode::from(2);
            };
            let (config, text) = match Config::load_with_text(&path) {
                Ok(loaded) => loaded,
                Err(error) => {
                    eprintln!("{error}");
                    return ExitCode::from(2);
                }
            };
            let options = RunOptions {
                detach_on_exit: cli.detach_on_exit,
                config_file: Some(ConfigFile { path, text }),
                pin_dir: cli.pin_dir,
            };
            match serve(config, options) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    error!("{error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[tokio::main]
async fn serve(config: Config, options: RunOptions) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let signals = shutdown.clone();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) =
            (signal(SignalKind::interrupt()), signal(SignalKind::terminate()))
        else {
            return;
        };
        tokio::select! {
            _ = int.recv() => info!("SIGINT: shutting down"),
            _ = term.recv() => info!("SIGTERM: shutting down"),
        }
        signals.cancel();
    });
    lb_userspace::run(config, options, shutdown).await
}
