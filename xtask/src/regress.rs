//! `cargo xtask regress`: PostgreSQL 15's own regression suite, run directly
//! and through interceptor against the same server; both must pass every
//! test and produce identical results folders.
//!
//! The suite's inputs come from the Debian source package of the installed
//! server version (fetched with a private apt sources list, nothing under
//! /etc/apt changes); `regress.so` is built with PGXS.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use interceptor_tests::pg::{ADMIN_PASSWORD, PgCluster};
use interceptor_tests::proxy::{Proxy, ProxyOptions};
use interceptor_tests::{pg_bin, run_ok, workspace_root};

use crate::exec;

fn installed_version() -> Result<String> {
    Ok(
        run_ok(Command::new("dpkg-query").args(["-W", "-f=${Version}", "postgresql-15"]))?
            .trim()
            .to_owned(),
    )
}

/// deb-src lines for the mirrors the machine already uses.
fn source_lines() -> Result<String> {
    let mut lines = String::new();
    let dir = Path::new("/etc/apt/sources.list.d");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "sources"))
    {
        for stanza in std::fs::read_to_string(file)?.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}:")))
                    .map(|v| v.trim().to_owned())
            };
            let (Some(uris), Some(suites), Some(components)) =
                (field("URIs"), field("Suites"), field("Components"))
            else {
                continue;
            };
            let signed = field("Signed-By")
                .map(|k| format!("[signed-by={k}] "))
                .unwrap_or_default();
            for uri in uris.split_whitespace() {
                for suite in suites.split_whitespace() {
                    lines.push_str(&format!("deb-src {signed}{uri} {suite} {components}\n"));
                }
            }
        }
    }
    if lines.is_empty() {
        bail!("no deb822 sources found in {}", dir.display());
    }
    Ok(lines)
}

/// apt options that read a private deb-src list (refreshed once per
/// process), leaving /etc/apt alone.
fn private_apt(cache: &Path) -> Result<Vec<String>> {
    let apt = cache.join("apt");
    std::fs::create_dir_all(apt.join("lists/partial"))?;
    std::fs::create_dir_all(apt.join("parts"))?;
    std::fs::write(apt.join("sources.list"), source_lines()?)?;
    let opts = vec![
        format!(
            "-oDir::Etc::SourceList={}",
            apt.join("sources.list").display()
        ),
        format!("-oDir::Etc::SourceParts={}", apt.join("parts").display()),
        format!("-oDir::State::Lists={}", apt.join("lists").display()),
    ];
    static UPDATED: std::sync::Once = std::sync::Once::new();
    let mut result = Ok(());
    UPDATED
        .call_once(|| result = exec(Command::new("apt-get").args(&opts).args(["-qq", "update"])));
    result?;
    Ok(opts)
}

fn cache_dir() -> PathBuf {
    workspace_root().join("target/regress")
}

fn suite_dir(version: &str) -> PathBuf {
    let upstream = version.split('-').next().unwrap_or(version);
    cache_dir().join(format!("postgresql-{upstream}/src/test/regress"))
}

/// Versions of postgresql-15 whose source the mirrors list, newest first.
fn source_versions() -> Result<Vec<String>> {
    let opts = private_apt(&cache_dir())?;
    let out = run_ok(
        Command::new("apt-cache")
            .args(&opts)
            .args(["showsrc", "postgresql-15"]),
    )?;
    let mut versions: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("Version: "))
        .map(|v| v.trim().to_owned())
        .collect();
    versions.sort_by(|a, b| {
        let cmp = Command::new("dpkg")
            .args(["--compare-versions", a, "gt", b])
            .status();
        if cmp.is_ok_and(|s| s.success()) {
            std::cmp::Ordering::Less
        } else {
            std::cmp::Ordering::Greater
        }
    });
    versions.dedup();
    Ok(versions)
}

/// Chooses the PostgreSQL 15 version whose regression sources can be had:
/// the installed one if possible, else the newest downloadable one (the
/// caller then installs that server version). Returns it with the suite.
pub fn prepare_sources() -> Result<(String, PathBuf)> {
    let installed = installed_version().ok();
    if let Some(v) = &installed
        && suite_dir(v).join("parallel_schedule").exists()
    {
        return Ok((v.clone(), suite_dir(v)));
    }
    let mut candidates: Vec<String> = installed.iter().cloned().collect();
    candidates.extend(
        source_versions()?
            .into_iter()
            .filter(|v| Some(v) != installed.as_ref()),
    );
    let mut errors = Vec::new();
    for version in candidates {
        match fetch_suite(&cache_dir(), &version) {
            Ok(suite) => return Ok((version, suite)),
            Err(e) => errors.push(format!("{version}: {e:#}")),
        }
    }
    bail!(
        "no PostgreSQL 15 source package could be downloaded:\n{}",
        errors.join("\n")
    )
}

/// Downloads and unpacks src/test/regress of one version, once.
fn fetch_suite(cache: &Path, version: &str) -> Result<PathBuf> {
    let upstream = version.split('-').next().unwrap_or(version);
    let suite = suite_dir(version);
    if suite.join("parallel_schedule").exists() {
        return Ok(suite);
    }
    let opts = private_apt(cache)?;
    exec(
        Command::new("apt-get")
            .current_dir(cache)
            .args(&opts)
            .args(["-qq", "source", "--download-only"])
            .arg(format!("postgresql-15={version}")),
    )?;
    let orig = format!("postgresql-15_{upstream}.orig.tar.bz2");
    exec(
        Command::new("tar")
            .current_dir(cache)
            .args(["-xjf", &orig, "--wildcards"])
            .arg(format!("postgresql-{upstream}/src/test/regress/*")),
    )?;
    Ok(suite)
}

/// Builds regress.so with PGXS and gathers the modules the tests load.
fn build_modules(suite: &Path, dlpath: &Path) -> Result<()> {
    if dlpath.join("regress.so").exists() {
        return Ok(());
    }
    std::fs::create_dir_all(dlpath)?;
    std::fs::copy(suite.join("regress.c"), dlpath.join("regress.c"))?;
    let pg_config = pg_bin("pg_config");
    std::fs::write(
        dlpath.join("Makefile"),
        format!(
            "MODULES = regress\nPG_CONFIG = {}\nPGXS := $(shell $(PG_CONFIG) --pgxs)\ninclude $(PGXS)\n",
            pg_config.display()
        ),
    )?;
    exec(Command::new("make").current_dir(dlpath).arg("-s"))?;
    let libdir = run_ok(Command::new(&pg_config).arg("--pkglibdir"))?;
    for m in ["autoinc.so", "refint.so"] {
        let _ = std::fs::remove_file(dlpath.join(m));
        std::os::unix::fs::symlink(Path::new(libdir.trim()).join(m), dlpath.join(m))?;
    }
    Ok(())
}

fn open_up(path: &Path) -> Result<()> {
    // The server (OS user postgres) reads the inputs and writes results.
    let mut p = Some(path);
    while let Some(dir) = p {
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o005 != 0o005 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o005))?;
        }
        p = dir.parent();
    }
    Ok(())
}

/// Runs the parallel schedule once; returns the summary line.
fn pg_regress(
    suite: &Path,
    dlpath: &Path,
    out: &Path,
    port: u16,
    password: Option<&str>,
) -> Result<String> {
    let _ = std::fs::remove_dir_all(out);
    std::fs::create_dir_all(out)?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o777))?;
    // pg_regress (run as root here) would create these 0755; the server
    // writes COPY TO files into results/.
    for sub in ["results", "testtablespace"] {
        std::fs::create_dir_all(out.join(sub))?;
        std::fs::set_permissions(out.join(sub), std::fs::Permissions::from_mode(0o777))?;
    }
    let pgxs = run_ok(Command::new(pg_bin("pg_config")).arg("--pkglibdir"))?;
    let pg_regress = Path::new(pgxs.trim()).join("pgxs/src/test/regress/pg_regress");
    let mut cmd = Command::new(pg_regress);
    cmd.current_dir(out)
        .arg(format!("--inputdir={}", suite.display()))
        .arg(format!("--outputdir={}", out.display()))
        .arg(format!(
            "--bindir={}",
            pg_bin("psql").parent().unwrap().display()
        ))
        .arg(format!("--dlpath={}", dlpath.display()))
        .arg(format!(
            "--schedule={}",
            suite.join("parallel_schedule").display()
        ))
        .args([
            "--host=127.0.0.1",
            "--user=postgres",
            "--max-concurrent-tests=20",
        ])
        .arg(format!("--port={port}"))
        .env("PGSSLMODE", "disable");
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    let output = cmd.output().context("run pg_regress")?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let summary = stdout
        .lines()
        .find(|l| {
            l.contains("tests passed")
                || l.contains("tests failed")
                || l.contains("failed (ignoring")
        })
        .unwrap_or("no summary")
        .trim()
        .to_owned();
    if !output.status.success() {
        let diffs = std::fs::read_to_string(out.join("regression.diffs")).unwrap_or_default();
        bail!(
            "pg_regress failed ({summary}) with output in {}:\n{}\n{}",
            out.display(),
            stdout
                .lines()
                .filter(|l| l.contains("FAILED") || l.contains("failed"))
                .collect::<Vec<_>>()
                .join("\n"),
            diffs.chars().take(4000).collect::<String>()
        );
    }
    Ok(summary)
}

pub fn run() -> Result<()> {
    let version = installed_version()?;
    let cache = cache_dir();
    let suite = suite_dir(&version);
    if !suite.join("parallel_schedule").exists() {
        bail!(
            "no regression sources for the installed PostgreSQL {version}; run `cargo xtask setup`"
        );
    }
    let dlpath = cache.join(format!("lib-{version}"));
    build_modules(&suite, &dlpath).context("build regress.so")?;
    open_up(&suite)?;
    open_up(&dlpath)?;

    let pg = PgCluster::start()?;
    let direct_out = cache.join("out-direct");
    let proxy_out = cache.join("out-proxy");
    open_up(&cache)?;

    eprintln!("regress: PostgreSQL {version}, directly");
    let direct = pg_regress(&suite, &dlpath, &direct_out, pg.port, Some(ADMIN_PASSWORD))?;

    // Upstream as `postgres`, like the direct run, so role names in the
    // output match.
    let dir = tempfile::Builder::new()
        .prefix("interceptor-regress-")
        .tempdir()?;
    let port = interceptor_tests::free_port();
    let config = Proxy::config_text(
        &pg,
        &ProxyOptions {
            client_tls: false,
            ..Default::default()
        },
        port,
        &dir.path().join("state"),
    )
    .replace("user = \"interceptor_admin\"", "user = \"postgres\"");
    let config_path = dir.path().join("interceptor.toml");
    std::fs::write(&config_path, config)?;
    let proxy = Proxy::start_with(dir, config_path, port)?;
    eprintln!("regress: through interceptor");
    let proxied = pg_regress(&suite, &dlpath, &proxy_out, proxy.port, None)?;

    let diff = Command::new("diff")
        .arg("-r")
        .arg(direct_out.join("results"))
        .arg(proxy_out.join("results"))
        .output()?;
    let diff_text = String::from_utf8_lossy(&diff.stdout);
    println!("direct:  {direct}");
    println!("proxied: {proxied}");
    if !diff.status.success() {
        bail!(
            "results differ between direct and proxied runs:\n{}",
            diff_text.chars().take(4000).collect::<String>()
        );
    }
    println!("diff -r results: identical");
    let count = |summary: &str| -> usize {
        summary
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .unwrap_or(0)
    };
    // One closing line for CI: both runs' tests, all of which passed.
    println!(
        "regress: {} passed, 0 failed",
        count(&direct) + count(&proxied)
    );
    Ok(())
}
