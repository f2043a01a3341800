use std::process::ExitCode;

use clap::Parser;
use interceptor::cli::{Cli, Command};
use interceptor::config::Config;
use interceptor::intercept::{cgroup, job, loader};

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
        Command::Policy { command } => match interceptor::policy_cli::run(command) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        Command::Audit { command } => match audit(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("interceptor: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Run {
            job,
            token_env,
            token_file,
            token_github,
            location,
            command,
        } => {
            let token = match (token_env, token_file, token_github) {
                (Some(v), _, _) => job::TokenSource::Env(v),
                (None, Some(f), _) => job::TokenSource::File(f),
                (None, None, Some(aud)) => job::TokenSource::GitHubActions { audience: aud },
                (None, None, None) => job::TokenSource::None,
            };
            match job::run(job::RunOptions {
                job,
                token,
                cgroup: location.cgroup,
                runtime_dir: location.runtime_dir,
                command,
            }) {
                Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
                Err(e) => {
                    eprintln!("interceptor run: {e:#}");
                    // 125, like env(1) and docker run: the wrapper failed, not CMD.
                    ExitCode::from(125)
                }
            }
        }
        Command::Tag { target, location } => report(tag(&target, &location, true)),
        Command::Untag { target, location } => report(tag(&target, &location, false)),
        Command::Uninstall { location } => report(
            loader::uninstall(&loader::Pins::new(&location.pin_dir)).map(|done| {
                let parent = cgroup::cgroup2_mount().map(|m| m.join(&location.cgroup));
                let mut lines = done;
                if let Ok(p) = parent
                    && std::fs::remove_dir(&p).is_ok()
                {
                    lines.push(format!("removed cgroup {}", p.display()));
                }
                lines.push("interception is off".into());
                lines.join("\n")
            }),
        ),
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
                // Colour codes only for a terminal, never in log files.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .init();
            let loaded = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("interceptor: {e}");
                    return ExitCode::FAILURE;
                }
            };
            raise_fd_limit();
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

fn tag(
    given: &str,
    location: &interceptor::cli::InterceptLocation,
    on: bool,
) -> anyhow::Result<String> {
    let mount = cgroup::cgroup2_mount()?;
    let dir = cgroup::resolve(&mount, given)?;
    let pins = loader::Pins::new(&location.pin_dir);
    if on {
        let id = loader::tag(&pins, &dir)?;
        Ok(format!("tagged {} (cgroup id {id})", dir.display()))
    } else {
        let id = cgroup::id_of(&dir)?;
        match loader::untag(&pins, id)? {
            0 => anyhow::bail!("{} is not tagged", dir.display()),
            n => Ok(format!(
                "untagged {} ({n} programs detached)",
                dir.display()
            )),
        }
    }
}

fn report(result: anyhow::Result<String>) -> ExitCode {
    match result {
        Ok(msg) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("interceptor: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A proxy holds two sockets per session, and CI bursts open thousands:
/// the default soft limit of 1024 would turn a burst into EMFILE stalls.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn audit(command: interceptor::cli::AuditCommand) -> anyhow::Result<()> {
    use interceptor::audit::cli;
    use interceptor::cli::{AuditCommand, SpoolLocation};
    let dir = |l: SpoolLocation| -> anyhow::Result<std::path::PathBuf> {
        match (l.spool, l.config) {
            (Some(d), _) => Ok(d),
            (None, Some(c)) => Ok(Config::load(&c)?.audit_dir()),
            (None, None) => anyhow::bail!("say which spool: --config FILE or --spool DIR"),
        }
    };
    match command {
        AuditCommand::Tail {
            spool,
            lines,
            session,
            json,
        } => cli::tail(&dir(spool)?, lines, session, json),
        AuditCommand::Verify { spool, session } => {
            println!("{}", cli::verify(&dir(spool)?, session)?);
            Ok(())
        }
    }
}
