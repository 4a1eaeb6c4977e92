//! The `rustygate` command line: parses flags, calls the library, maps outcomes to exit codes.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use rustygate::compile::{CompileOptions, Compiled, compile_dir};
use rustygate::server::ServeOptions;
use rustygate::telemetry::{LogFormat, init_logging};

#[path = "cli/admin_http.rs"]
mod admin_http;
#[path = "cli/status.rs"]
mod status;

/// mimalloc: the request path allocates small, short-lived buffers on every worker thread, which
/// glibc malloc serves measurably slower (see bench/README.md); through crates/fastmem, which
/// asks it for an alignment only when `malloc`'s would not do. The static x86_64 musl build also
/// takes its `memcpy`, `memmove`, `memcmp` and `bcmp` from there: musl's copy and compare short
/// pieces byte by byte.
#[global_allocator]
static GLOBAL: fastmem::Mimalloc = fastmem::Mimalloc;

/// `rustygate --version`: the package version, the git commit and the date it was built from
/// (see build.rs; the commit is `unknown` for a build from a tree without git metadata).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RUSTYGATE_BUILD_COMMIT"),
    ", built ",
    env!("RUSTYGATE_BUILD_DATE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "rustygate",
    version = VERSION,
    about = "A declarative GitOps API gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a config repo with the server's own compiler. Exit 0 valid, 1 invalid, 2 usage/IO error.
    Validate {
        /// Config repo directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
        /// Treat warnings as errors.
        #[arg(long)]
        deny_warnings: bool,
        /// Do not resolve secret references (env vars, files): for CI without the secrets.
        #[arg(long)]
        no_env: bool,
        /// A directory `{ file = ... }` secrets may be read from, besides /run/secrets,
        /// /var/run/secrets and /etc/rustygate (repeatable).
        #[arg(long = "secret-root", value_name = "DIR")]
        secret_roots: Vec<PathBuf>,
        /// Also check that HEAD of the git working copy holding DIR carries an SSH signature by
        /// a key in --allowed-signers (`all`: every commit since --base too); an unsigned or
        /// badly signed commit is an error (`unsigned-commit`, `bad-signature`).
        #[arg(long, value_enum, value_name = "MODE", requires = "allowed_signers")]
        require_signed: Option<SignedArg>,
        /// git's allowed signers file (the `gpg.ssh.allowedSignersFile` format).
        #[arg(long, value_name = "FILE", requires = "require_signed")]
        allowed_signers: Option<PathBuf>,
        /// With `--require-signed all`: where the checked commits start (e.g. origin/main).
        #[arg(long, value_name = "REV", required_if_eq("require_signed", "all"))]
        base: Option<String>,
    },
    /// Run the config repo's tests/*.toml fixtures in-process, without a network.
    /// Exit 0 all pass, 1 a case failed, 2 the repo or its fixtures do not compile, or a usage/IO error.
    Test {
        /// Config repo directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// Run only the cases whose name (or file path) contains this text.
        #[arg(long)]
        filter: Option<String>,
        #[arg(long, value_enum, default_value_t = TestFormat::Human)]
        format: TestFormat,
        /// Resolve secret references (env vars, files); off by default, so CI needs no secrets.
        #[arg(long)]
        env: bool,
        /// A directory `{ file = ... }` secrets may be read from, besides /run/secrets,
        /// /var/run/secrets and /etc/rustygate (repeatable).
        #[arg(long = "secret-root", value_name = "DIR")]
        secret_roots: Vec<PathBuf>,
    },
    /// Print the JSON Schema of the config repo's TOML files.
    Schema {
        /// One file kind only: gateway, routes, upstreams or tests. Default: all in one schema.
        kind: Option<String>,
    },
    /// Route-level diff between two commits of the config repo, as Markdown for a PR comment:
    /// compiled meaning, not text, safety-relevant changes first. Exit 0 head compiles and
    /// changes nothing, 3 head compiles and changes something, 1 head does not compile,
    /// 2 usage/git error.
    Plan {
        /// The commit the change starts from: branch, tag or SHA (e.g. origin/main).
        #[arg(long)]
        base: String,
        /// The commit the change leads to (a commit, not the working tree).
        #[arg(long, default_value = "HEAD")]
        head: String,
        #[arg(long, default_value = "markdown", value_parser = ["markdown", "json"])]
        format: String,
        /// Do not resolve secret references (env vars, files): for CI without the secrets.
        #[arg(long)]
        no_env: bool,
        /// Config repo directory inside a git working copy (may be a subdirectory of it).
        #[arg(default_value = ".")]
        dir: PathBuf,
    },
    /// Run the gateway.
    Serve(Box<ServeArgs>),
    /// Show what a running gateway serves (its admin listener's /status); with --fleet, every
    /// live replica sharing its `[rate_limit_store]` and whether they serve one commit.
    /// Exit 0 in agreement (and the last reload succeeded, the last fetch worked), 1 not (or
    /// serving a stale cached commit), 2 when it cannot tell: the gateway, or with --fleet the
    /// shared store, did not answer, or the answer is not a RustyGate status (a field the
    /// verdict rests on is missing or of another type).
    Status {
        /// The admin listener, e.g. http://127.0.0.1:8081 (port 80 when none is given; a path,
        /// e.g. http://ops.example/gateway, is kept in front of /status).
        #[arg(
            long,
            env = "RUSTYGATE_ADMIN_URL",
            default_value = "http://127.0.0.1:8081"
        )]
        admin: String,
        /// Also show the fleet view.
        #[arg(long)]
        fleet: bool,
        #[arg(long, value_enum, default_value_t = StatusFormat::Human)]
        format: StatusFormat,
    },
    /// One fetch into a git mirror, run by `serve` in a child process it can kill.
    #[command(name = "__fetch", hide = true)]
    Fetch {
        #[arg(long)]
        cache_dir: PathBuf,
        /// From the environment, not the command line: the URL may hold a password, and any
        /// local user can read a process's command line (`ps`).
        #[arg(long, env = "RUSTYGATE_FETCH_URL", hide_env_values = true)]
        url: String,
        #[arg(long)]
        deadline_ms: u64,
        /// Fetch this branch alone (without it: every branch and tag, for a `--ref` pin).
        #[arg(long)]
        branch: Option<String>,
    },
    /// Print a shell completion script, e.g. `rustygate completions bash > /etc/bash_completion.d/rustygate`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) of rustygate, e.g. `rustygate man | man -l -`; with --out-dir,
    /// write rustygate.1 and one rustygate-<command>.1 per command there.
    Man {
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// rustc-style, with source snippets.
    Human,
    /// One line per diagnostic: `file:line:col: severity[code]: message`.
    Short,
    /// A JSON array of diagnostics.
    Json,
    /// GitHub Actions workflow commands (`::error file=...,line=...,col=...::message`) on
    /// stdout, shown as annotations on the pull request's diff.
    Github,
}

/// `--require-signed`
#[derive(Clone, Copy, ValueEnum)]
enum SignedArg {
    /// The commit to serve (validate: HEAD) must be signed.
    Head,
    /// Every commit since the last one served (validate: since --base) must be signed.
    All,
}

impl SignedArg {
    fn policy(self, allowed_signers: PathBuf) -> rustygate::source::signing::SigningPolicy {
        use rustygate::source::signing::{SignedMode, SigningPolicy};
        SigningPolicy {
            mode: match self {
                SignedArg::Head => SignedMode::Head,
                SignedArg::All => SignedMode::All,
            },
            allowed_signers,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum StatusFormat {
    /// What is served, the last attempt (with its first errors when it failed), the fleet.
    Human,
    /// The gateway's `/status` answer as it came.
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum TestFormat {
    /// `cargo test`-like: each case ok or FAILED, expected vs got for failures.
    Human,
    /// One JSON object: counts, diagnostics, and every case with what it got.
    Json,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Config repo: a directory, a local git working copy, or a git URL (file://, https://,
    /// ssh://, git@host:org/repo.git).
    #[arg(long, env = "RUSTYGATE_REPO")]
    repo: String,
    /// Branch to follow (git sources).
    #[arg(long, env = "RUSTYGATE_BRANCH", default_value = "main")]
    branch: String,
    /// Pin a tag, branch or commit instead of following the branch head (git sources).
    #[arg(long = "ref", env = "RUSTYGATE_REF")]
    pin: Option<String>,
    /// The config repo's directory inside the git repository (monorepos).
    #[arg(long, env = "RUSTYGATE_SUBDIR")]
    subdir: Option<PathBuf>,
    /// Serve a new head of the branch even when it does not descend from the served commit
    /// (a force-push). Without it such a head is held back until a forced reload.
    #[arg(long, env = "RUSTYGATE_ALLOW_REWRITES")]
    allow_rewrites: bool,
    /// Serve only commits carrying an SSH signature (git's `gpg.format ssh`) by a key in
    /// --allowed-signers: `head` checks the commit to serve, `all` every commit since the last
    /// one served. A refused commit is never served (git sources).
    #[arg(
        long,
        env = "RUSTYGATE_REQUIRE_SIGNED",
        value_enum,
        value_name = "MODE",
        requires = "allowed_signers"
    )]
    require_signed: Option<SignedArg>,
    /// git's allowed signers file (`gpg.ssh.allowedSignersFile` format: principals, options such
    /// as `namespaces="git"` and `valid-before=...`, key), read again at every check.
    #[arg(
        long,
        env = "RUSTYGATE_ALLOWED_SIGNERS",
        value_name = "FILE",
        requires = "require_signed"
    )]
    allowed_signers: Option<PathBuf>,
    /// Where the git mirror and checkouts are kept (default: a folder under the temp dir).
    #[arg(long, env = "RUSTYGATE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Poll interval for git sources (and for renewed certificate files of TLS listeners), with
    /// up to 10% jitter; `0` disables polling.
    #[arg(long, env = "RUSTYGATE_POLL", default_value = "30s", value_parser = parse_poll)]
    poll: Duration,
    /// Watch a plain directory source for changes and reload (debounced).
    #[arg(long, env = "RUSTYGATE_WATCH", default_value_t = true, action = clap::ArgAction::Set)]
    watch: bool,
    /// Proxy listener address.
    #[arg(long, env = "RUSTYGATE_LISTEN", default_value = "0.0.0.0:8080", value_parser = rustygate::util::parse_listen_addr)]
    listen: SocketAddr,
    /// Admin listener address (/healthz, /readyz, /status, /metrics, reload and webhooks).
    #[arg(long, env = "RUSTYGATE_ADMIN_LISTEN", default_value = "127.0.0.1:8081", value_parser = rustygate::util::parse_listen_addr)]
    admin_listen: SocketAddr,
    /// Worker threads for the proxy listener (default: number of cores).
    #[arg(long, env = "RUSTYGATE_WORKERS")]
    workers: Option<usize>,
    /// Time in-flight requests get to finish on SIGTERM/SIGINT.
    #[arg(long, env = "RUSTYGATE_SHUTDOWN_GRACE", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Time a client connection may sit idle between requests before it is closed (HTTP/1.1
    /// keep-alive; over HTTP/2, a connection without streams). At least 1s.
    #[arg(long, env = "RUSTYGATE_KEEP_ALIVE", default_value = "75s", value_parser = parse_keep_alive)]
    keep_alive: Duration,
    /// Emit one access-log event per request.
    #[arg(long, env = "RUSTYGATE_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    access_log: bool,
    #[arg(long, env = "RUSTYGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    /// A directory `{ file = ... }` secrets may be read from, besides /run/secrets,
    /// /var/run/secrets and /etc/rustygate (repeatable; in the variable, `:`-separated).
    #[arg(
        long = "secret-root",
        env = "RUSTYGATE_SECRET_ROOT",
        value_name = "DIR",
        value_delimiter = ':'
    )]
    secret_roots: Vec<PathBuf>,
    /// Largest webhook body read (GitHub sends at most 25 MB). A larger one is answered 413
    /// before it is read and triggers nothing: polling picks its commit up. At most four
    /// bodies of this size are read at once.
    #[arg(long, env = "RUSTYGATE_WEBHOOK_MAX_BODY", default_value = "1MiB", value_parser = parse_body_cap)]
    webhook_max_body: usize,
    /// Time a reload gets to fetch, read and compile the config; past it the reload is reported
    /// as failed and the next one starts, whatever the stuck read is doing.
    #[arg(long, env = "RUSTYGATE_RELOAD_TIMEOUT", default_value = "120s", value_parser = parse_timeout)]
    reload_timeout: Duration,
    /// Time one git fetch gets (at most --reload-timeout). Each fetch runs in a child process,
    /// killed at this deadline or on shutdown, so a git host that stops answering holds no
    /// connection or thread; the reload is reported failed and the next one starts afresh.
    #[arg(long, env = "RUSTYGATE_FETCH_TIMEOUT", default_value = "60s", value_parser = parse_timeout)]
    fetch_timeout: Duration,
    /// This replica's name in the fleet view (`/status?fleet=true`), with `[rate_limit_store]`
    /// (default: the host name and the process id).
    #[arg(long, env = "RUSTYGATE_REPLICA_ID")]
    replica_id: Option<String>,
    /// PEM CA certificates trusted for git over HTTPS, besides the system's roots (a git host
    /// with a certificate from a private CA).
    #[arg(long, env = "RUSTYGATE_GIT_CA_FILE", value_name = "FILE")]
    git_ca_file: Option<PathBuf>,
}

fn parse_poll(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    // Each poll is a fetch (a child process, a round trip to the git host).
    if d < Duration::from_millis(100) && !d.is_zero() {
        return Err("must be 0 (no polling) or at least 100ms".into());
    }
    Ok(d)
}

/// A timeout of at least 1s (`--fetch-timeout`, `--reload-timeout`).
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

fn parse_keep_alive(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

/// Reads a secret from the environment, without the ASCII whitespace around it: a Secret made
/// with `kubectl create secret --from-file` ends in a newline, and the bearer token a client
/// sends is compared trimmed. Unset is `None`; set but empty once trimmed is an error, not a
/// secret nobody can match nor a silently disabled endpoint.
fn env_secret(name: &str) -> anyhow::Result<Option<String>> {
    let value = match std::env::var(name) {
        Ok(v) => v,
        Err(std::env::VarError::NotPresent) => return Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => anyhow::bail!("{name} is not valid UTF-8"),
    };
    let secret = value.trim_ascii();
    anyhow::ensure!(
        !secret.is_empty(),
        "{name} is set but empty (or only whitespace): give it a value, or unset it to disable \
         what it protects"
    );
    Ok(Some(secret.to_owned()))
}

/// `--webhook-max-body`: a size (`1MiB`, `512KiB`, bytes) from 1 KiB to 64 MiB.
fn parse_body_cap(s: &str) -> Result<usize, String> {
    let n = rustygate::config::units::parse_size(s)?;
    if !(1 << 10..=64 << 20).contains(&n) {
        return Err("must be from 1KiB to 64MiB".into());
    }
    usize::try_from(n).map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Validate {
            dir,
            format,
            deny_warnings,
            no_env,
            secret_roots,
            require_signed,
            allowed_signers,
            base,
        } => {
            let signing = require_signed
                .zip(allowed_signers)
                .map(|(mode, file)| (mode.policy(file), base));
            validate(&dir, format, deny_warnings, no_env, secret_roots, signing)
        }
        Command::Test {
            dir,
            filter,
            format,
            env,
            secret_roots,
        } => test(
            rustygate::testing::TestOptions {
                dir,
                filter,
                resolve_secrets: env,
                secret_roots,
            },
            format,
        ),
        Command::Schema { kind } => schema(kind.as_deref()),
        Command::Plan {
            base,
            head,
            format,
            no_env,
            dir,
        } => plan(
            rustygate::plan::PlanOptions {
                dir,
                base,
                head,
                resolve_secrets: !no_env,
            },
            &format,
        ),
        Command::Completions { shell } => {
            // Into memory first: clap_complete panics when it cannot write.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "rustygate", &mut script);
            match emit(&[(Stream::Stdout, &String::from_utf8_lossy(&script))]) {
                Ok(()) => ExitCode::SUCCESS,
                Err(code) => code,
            }
        }
        Command::Man { out_dir } => man(out_dir.as_deref()),
        Command::Fetch {
            cache_dir,
            url,
            deadline_ms,
            branch,
        } => rustygate::source::fetch::child_main(
            cache_dir,
            url,
            branch,
            Duration::from_millis(deadline_ms),
        ),
        Command::Status {
            admin,
            fleet,
            format,
        } => status::status(&admin, fleet, format),
        Command::Serve(args) => match serve(*args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

/// The stream a command writes a part of its output to.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Writes a command's output, part by part. A stream whose reader went away (`| head -c1`)
/// is no failure: its parts are dropped and the command ends with the exit code its result
/// gives. Rust ignores SIGPIPE, so `print!` panicked there instead (exit 101). Another write
/// error (a full disk) is an I/O error, `Err` with exit 2. No `##[` leaves unbroken: in a CI
/// log GitHub's runner reads one anywhere in a line as a command (`without_runner_commands`).
fn emit(parts: &[(Stream, &str)]) -> Result<(), ExitCode> {
    use std::io::{ErrorKind, Write as _};
    for (stream, text) in parts {
        let text = rustygate::config::diag::without_runner_commands(text);
        let written = match stream {
            Stream::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes()).and_then(|()| out.flush())
            }
            Stream::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
        };
        match written {
            Err(e) if e.kind() != ErrorKind::BrokenPipe => {
                let _ = writeln!(std::io::stderr(), "error: writing the output: {e}");
                return Err(ExitCode::from(2));
            }
            _ => {}
        }
    }
    Ok(())
}

fn validate(
    dir: &std::path::Path,
    format: Format,
    deny_warnings: bool,
    no_env: bool,
    secret_roots: Vec<PathBuf>,
    signing: Option<(rustygate::source::signing::SigningPolicy, Option<String>)>,
) -> ExitCode {
    let opts = CompileOptions {
        resolve_secrets: !no_env,
        version_id: None,
        source: dir.display().to_string(),
        secret_roots,
    };
    let Compiled {
        mut diagnostics,
        files,
        ..
    } = match compile_dir(dir, &opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if deny_warnings {
        diagnostics.deny_warnings();
    }
    let mut signer = None;
    if let Some((policy, base)) = signing {
        match rustygate::source::signing::check_working_copy(dir, base.as_deref(), &policy) {
            Ok(Ok(principal)) => signer = Some(principal),
            Ok(Err(refusal)) => diagnostics.push(refusal.to_diagnostic()),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    }
    let (mut out, mut err) = (String::new(), String::new());
    match format {
        Format::Human => {
            err = diagnostics.render_human(&files);
            if let Some(principal) = &signer {
                let _ = writeln!(err, "{}: HEAD is signed by {principal}", dir.display());
            }
            let (e, w) = (diagnostics.error_count(), diagnostics.warning_count());
            if e > 0 {
                let _ = writeln!(err, "{}: {e} error(s), {w} warning(s)", dir.display());
            } else {
                let _ = writeln!(
                    err,
                    "{}: valid ({} file(s), {w} warning(s))",
                    dir.display(),
                    files.len()
                );
            }
        }
        Format::Short => err = diagnostics.render_short(&files),
        Format::Github => {
            out = diagnostics.render_github(&files, &workspace_relative(dir));
            let (e, w) = (diagnostics.error_count(), diagnostics.warning_count());
            let _ = writeln!(err, "{}: {e} error(s), {w} warning(s)", dir.display());
        }
        Format::Json => match serde_json::to_string_pretty(&diagnostics.to_json(&files)) {
            Ok(s) => out = s + "\n",
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    }
    if let Err(code) = emit(&[(Stream::Stdout, &out), (Stream::Stderr, &err)]) {
        return code;
    }
    if diagnostics.has_errors() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// The config directory as GitHub names files in annotations: relative to the workspace (the
/// checkout), so that `file=` points into the pull request's diff.
fn workspace_relative(dir: &std::path::Path) -> PathBuf {
    let workspace = std::env::var_os("GITHUB_WORKSPACE").map(PathBuf::from);
    let dir = match (dir.is_absolute(), workspace) {
        (true, Some(ws)) => dir.strip_prefix(&ws).unwrap_or(dir),
        _ => dir,
    };
    dir.components()
        .filter(|c| !matches!(c, std::path::Component::CurDir))
        .collect()
}

fn man(out_dir: Option<&std::path::Path>) -> ExitCode {
    let cmd = Cli::command();
    // The page to print: none when written to files.
    let page = match out_dir {
        Some(dir) => std::fs::create_dir_all(dir)
            .and_then(|()| clap_mangen::generate_to(cmd, dir))
            .map(|()| String::new())
            .map_err(|e| format!("{}: {e}", dir.display())),
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map(|()| String::from_utf8_lossy(&page).into_owned())
                .map_err(|e| e.to_string())
        }
    };
    match page {
        Ok(page) => match emit(&[(Stream::Stdout, &page)]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(code) => code,
        },
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

fn test(opts: rustygate::testing::TestOptions, format: TestFormat) -> ExitCode {
    // A failing policy is part of its case's report; its log line (and a script's `print`)
    // only shows with RUST_LOG set, e.g. RUST_LOG=rustygate::policy=debug.
    let _log_guard = std::env::var_os("RUST_LOG").and_then(|_| init_logging(LogFormat::Pretty));
    let report = match rustygate::testing::run(&opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let (mut out, mut err) = (String::new(), String::new());
    match format {
        TestFormat::Human => {
            err = report.diagnostics.render_human(&report.files);
            if report.invalid() {
                let _ = writeln!(
                    err,
                    "{}: {} error(s): the config or its tests do not compile, no test ran",
                    opts.dir.display(),
                    report.diagnostics.error_count()
                );
            } else {
                out = report.render_human();
            }
        }
        TestFormat::Json => match serde_json::to_string_pretty(&report.to_json()) {
            Ok(s) => out = s + "\n",
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    }
    // The diagnostics (warnings, when the cases ran) come before the cases.
    if let Err(code) = emit(&[(Stream::Stderr, &err), (Stream::Stdout, &out)]) {
        return code;
    }
    if report.invalid() {
        // The contract: a repo that does not compile is 2, a failing case is 1.
        ExitCode::from(2)
    } else if report.failed() > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn schema(kind: Option<&str>) -> ExitCode {
    let value = match kind {
        None => rustygate::schema::combined(),
        Some(k) => match rustygate::schema::schemas()
            .into_iter()
            .find(|(name, _)| *name == k)
        {
            Some((_, s)) => s.to_value(),
            None => {
                eprintln!(
                    "error: unknown file kind `{k}`; expected gateway, routes, upstreams or tests"
                );
                return ExitCode::from(2);
            }
        },
    };
    match emit(&[(Stream::Stdout, &rustygate::schema::render(&value))]) {
        Ok(()) => ExitCode::SUCCESS,
        Err(code) => code,
    }
}

fn plan(opts: rustygate::plan::PlanOptions, format: &str) -> ExitCode {
    let plan = match rustygate::plan::plan(&opts) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let out = if format == "json" {
        match serde_json::to_string_pretty(&plan) {
            Ok(s) => s + "\n",
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        plan.to_markdown()
    };
    if let Err(code) = emit(&[(Stream::Stdout, &out)]) {
        return code;
    }
    if !plan.head_compiles() {
        ExitCode::from(1)
    } else if plan.has_changes() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    use rustygate::server::Control;
    use rustygate::source::reload::{Reloader, StartError, Started, spawn_poller, watch_dir};
    use rustygate::source::{Source, SourceSpec};

    // Held until serve returns: dropping it flushes buffered log lines.
    let _log_guard = init_logging(args.log_format);
    // Called whatever the log level: the call is what links crates/fastmem's start-up hook
    // (THP off unless MIMALLOC_ALLOW_THP=1).
    let thp = fastmem::transparent_huge_pages();
    tracing::debug!(transparent_huge_pages = thp, "allocator");
    // Checked before anything is loaded: a secret that is set but empty stops the start.
    let admin_token = env_secret("RUSTYGATE_ADMIN_TOKEN")?;
    let webhook_secret = env_secret("RUSTYGATE_WEBHOOK_SECRET")?;
    let mut spec = SourceSpec::from_repo_arg(
        &args.repo,
        &args.branch,
        args.pin.clone(),
        args.subdir.clone(),
        args.cache_dir.clone(),
    )?;
    if let SourceSpec::Git(g) = &mut spec {
        g.allow_rewrites = args.allow_rewrites;
        // `/proc/self/exe` runs this very binary even after a package upgrade replaced the
        // file; elsewhere, the path it was started from.
        let exe = Some(PathBuf::from("/proc/self/exe"))
            .filter(|p| p.exists())
            .or_else(|| std::env::current_exe().ok());
        if let Some(exe) = exe {
            g.fetch = rustygate::source::fetch::FetchMode::Child {
                exe,
                deadline: args.fetch_timeout.min(args.reload_timeout),
                ssl_cert_file: None,
            };
        }
    }
    if let (Some(mode), Some(file)) = (args.require_signed, args.allowed_signers.clone()) {
        let SourceSpec::Git(g) = &mut spec else {
            anyhow::bail!(
                "--require-signed needs a git source: {} is a plain directory, which has no commits to verify",
                spec.describe()
            );
        };
        // Checked now, so a typo fails the start, not the first reload.
        rustygate::source::signing::AllowedSigners::load(&file)?;
        g.signing = Some(mode.policy(file));
    }
    // Held until serve returns: one gateway per cache dir.
    let _cache_lock = match &spec {
        SourceSpec::Git(g) => Some(rustygate::source::lock_cache_dir(&g.cache_dir)?),
        SourceSpec::Dir(_) => None,
    };
    if let Some(ca) = &args.git_ca_file {
        use rustygate::source::fetch::{FetchMode, write_ca_bundle};
        match &mut spec {
            SourceSpec::Git(g) => match &mut g.fetch {
                FetchMode::Child { ssl_cert_file, .. } => {
                    *ssl_cert_file = Some(write_ca_bundle(ca, &g.cache_dir)?);
                }
                FetchMode::InProcess => {
                    anyhow::bail!(
                        "--git-ca-file needs the fetch process, which cannot be started here"
                    )
                }
            },
            SourceSpec::Dir(_) => anyhow::bail!("--git-ca-file is for git sources"),
        }
    }
    let compile_opts = CompileOptions {
        resolve_secrets: true,
        version_id: None,
        source: spec.describe(),
        secret_roots: args.secret_roots.clone(),
    };
    let metrics = Arc::new(rustygate::telemetry::metrics::Metrics::new());
    let source = Source::new(spec.clone());
    let startup = StartupStop::watch(source.cancel_flag())?;
    let started = Reloader::start(
        source,
        compile_opts,
        Arc::clone(&metrics),
        args.reload_timeout,
    );
    let signals = match startup.finish()? {
        Ok(signals) => signals,
        Err(signal) => {
            tracing::info!(
                signal,
                "stopped during start-up: the first config load was abandoned"
            );
            return Ok(ExitCode::SUCCESS);
        }
    };
    let Started {
        reloader,
        store,
        status,
    } = match started {
        Ok(r) => r,
        Err(StartError::Invalid(diagnostics)) => {
            eprint!("{diagnostics}");
            eprintln!("{}: invalid config, not starting", spec.describe());
            return Ok(ExitCode::from(1));
        }
        // The error's own text already names its cause: not its chain again.
        Err(e) => anyhow::bail!("loading {}: {e}", spec.describe()),
    };
    let defaults = ServeOptions::default();
    let opts = ServeOptions {
        listen: args.listen,
        admin_listen: args.admin_listen,
        workers: args.workers.unwrap_or(defaults.workers),
        shutdown_grace: args.shutdown_grace,
        keep_alive: args.keep_alive,
        access_log: args.access_log,
        webhook_max_body: args.webhook_max_body,
        ..defaults
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let fleet = Arc::new(rustygate::store::fleet::Fleet::new(
        args.replica_id
            .clone()
            .unwrap_or_else(rustygate::store::fleet::Fleet::default_replica_id),
        Arc::clone(&store),
        Arc::clone(&status),
    ));
    let force_pending = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let control = Control {
        status,
        metrics,
        reload: Some(tx.clone()),
        force_pending: Arc::clone(&force_pending),
        admin_token,
        webhook_secret,
        branch: match &spec {
            SourceSpec::Git(g) if g.pin.is_none() => Some(g.branch.clone()),
            _ => None,
        },
        limiters: Default::default(),
        fleet: Some(Arc::clone(&fleet)),
    };
    let reloader = reloader
        .with_load_timeout(args.reload_timeout)
        .with_force_flag(force_pending)
        .with_notify(Arc::clone(&fleet.changed));
    let cancel = reloader.cancel_flag();
    let on_shutdown = move || {
        if let Some(c) = cancel {
            c.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    };
    actix_web::rt::System::new()
        .block_on(async move {
            // Kept alive for the whole run: dropping it stops the watch.
            let _watcher = match &spec {
                SourceSpec::Dir(dir) if args.watch => match watch_dir(dir, tx.clone()) {
                    Ok(w) => Some(w),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot watch the config directory; reload with POST /admin/reload");
                        None
                    }
                },
                _ => None,
            };
            // Git sources poll for commits; a directory with TLS listeners polls too, so that
            // certificate files renewed in place are served (docs/tls.md).
            let tls = store.load().listeners.iter().any(|l| l.tls.is_some());
            if (matches!(spec, SourceSpec::Git(_)) || tls) && !args.poll.is_zero() {
                spawn_poller(tx.clone(), args.poll);
            }
            actix_web::rt::spawn(Arc::clone(&fleet).run(tx.clone()));
            drop(tx);
            actix_web::rt::spawn(reloader.run(rx));
            rustygate::server::serve(&opts, store, control, signals, on_shutdown).await
        })
        .context("serving")?;
    Ok(ExitCode::SUCCESS)
}

/// How long a first config load gets to stop after SIGTERM/SIGINT before the process exits
/// without it.
const STARTUP_STOP_WAIT: Duration = Duration::from_secs(5);

/// SIGTERM and SIGINT while `serve` loads its first config, which can wait on a git host for the
/// whole fetch timeout; as PID 1 (the image) a signal without a handler does nothing. Watched
/// on a thread of its own, since the load blocks this one. A signal sets the load's cancel flag:
/// a fetch child is killed at once and the mirror cleaned of what it left (`source::fetch`); a
/// load that has not returned [`STARTUP_STOP_WAIT`] later is left to the process's exit.
struct StartupStop {
    done: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<Result<rustygate::server::ShutdownSignals, &'static str>>,
}

impl StartupStop {
    fn watch(cancel: Arc<std::sync::atomic::AtomicBool>) -> anyhow::Result<Self> {
        use rustygate::server::ShutdownSignals;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut signals = rt
            .block_on(async { ShutdownSignals::install() })
            .context("installing the SIGTERM/SIGINT handlers")?;
        let (done, mut finished) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(async move {
                let signal = tokio::select! {
                    _ = &mut finished => return Ok(signals),
                    signal = signals.recv() => signal,
                };
                tracing::info!(
                    signal,
                    "stopping during start-up: abandoning the first config load"
                );
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                if tokio::time::timeout(STARTUP_STOP_WAIT, finished)
                    .await
                    .is_err()
                {
                    tracing::warn!(
                        signal,
                        "the first config load did not stop in time; exiting without it"
                    );
                    std::process::exit(0);
                }
                Err(signal)
            })
        });
        Ok(Self { done, thread })
    }

    /// The signals, for `serve` to go on with, or the one that stopped the start.
    fn finish(self) -> anyhow::Result<Result<rustygate::server::ShutdownSignals, &'static str>> {
        let _ = self.done.send(());
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("the start-up signal watcher panicked"))
    }
}
