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
        Command::Replay { spool, session } => {
            match audit_source(spool).and_then(|s| interceptor::audit::cli::replay(&s, session)) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("interceptor: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Approvals { command } => report(interceptor::approvals::client::run(command)),
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
            session_sched,
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
            match rt.block_on(interceptor::daemon::run(
                config,
                loaded,
                threads,
                session_sched,
            )) {
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

/// The spool, and ClickHouse if the config names one.
fn audit_source(
    l: interceptor::cli::SpoolLocation,
) -> anyhow::Result<interceptor::audit::cli::Source> {
    match (l.spool, l.config) {
        (Some(dir), _) => Ok(interceptor::audit::cli::Source {
            dir,
            clickhouse: None,
        }),
        (None, Some(c)) => {
            let config = Config::load(&c)?;
            let clickhouse = match config.audit.clickhouse.clone() {
                Some(ch) => {
                    let password = clickhouse_password(&ch)?;
                    Some((ch, password))
                }
                None => None,
            };
            Ok(interceptor::audit::cli::Source {
                dir: config.audit_dir(),
                clickhouse,
            })
        }
        (None, None) => anyhow::bail!("say which audit trail: --config FILE or --spool DIR"),
    }
}

fn clickhouse_password(
    ch: &interceptor::config::ClickHouseConfig,
) -> anyhow::Result<Option<interceptor::config::Secret>> {
    ch.load_password().map_err(anyhow::Error::msg)
}

fn audit(command: interceptor::cli::AuditCommand) -> anyhow::Result<()> {
    use interceptor::audit::cli;
    use interceptor::cli::AuditCommand;
    match command {
        AuditCommand::Tail {
            spool,
            lines,
            session,
            json,
        } => cli::tail(&audit_source(spool)?.dir, lines, session, json),
        AuditCommand::Verify { spool, session } => {
            println!("{}", cli::verify(&audit_source(spool)?, session)?);
            Ok(())
        }
        AuditCommand::Query {
            spool,
            session,
            principal,
            decision,
            table,
            since,
            limit,
            sql,
            format,
            json,
        } => {
            let source = audit_source(spool)?;
            match sql {
                Some(sql) => cli::query_sql(&source, &sql, &format),
                None => {
                    let filter = cli::Filter {
                        session,
                        principal,
                        decision,
                        table,
                        since,
                    };
                    cli::query(&source, &filter, limit, json)
                }
            }
        }
        AuditCommand::Init {
            config,
            print,
            server_version,
            database,
        } => {
            if print {
                print!("{}", cli::print_ddl(&server_version, &database)?);
                return Ok(());
            }
            let Some(path) = config else {
                anyhow::bail!("say which config: --config FILE (with [audit.clickhouse])");
            };
            let config = Config::load(&path)?;
            let Some(ch) = &config.audit.clickhouse else {
                anyhow::bail!(
                    "{} has no [audit.clickhouse] section: nothing to initialise",
                    path.display()
                );
            };
            println!("{}", cli::init(ch, clickhouse_password(ch)?)?);
            Ok(())
        }
    }
}
