use std::process::ExitCode;

use clap::Parser;
use interceptor::cli::{Cli, Command};
use interceptor::config::Config;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(c) => {
                println!(
                    "{}: ok ({} listener(s), {} target(s))",
                    file.display(),
                    c.listen.len(),
                    c.targets.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Daemon {
            config,
            worker_threads,
        } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(std::io::stderr)
                .init();
            let loaded = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("interceptor: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let threads = worker_threads
                .filter(|n| *n > 0)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("interceptor: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(interceptor::daemon::run(config, loaded, threads)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("interceptor: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
