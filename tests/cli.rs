#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The command line around the gateway: `--version` names the commit it was built from,
//! `completions` and `man` print what shells and `man` read, and `validate --format github`
//! prints workflow commands that GitHub shows on the pull request's diff.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::rustygate;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn git_head() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| text(&out.stdout).trim().to_owned())
}

#[test]
fn version_names_the_commit_and_the_build_date() {
    let out = rustygate(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    let line = text(&out.stdout);
    let line = line.trim_end();
    let prefix = concat!("rustygate ", env!("CARGO_PKG_VERSION"), " (commit ");
    let rest = line
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{line:?}"));
    let (commit, rest) = rest.split_once(", built ").unwrap();
    let date = rest.strip_suffix(')').unwrap();
    let d: Vec<&str> = date.split('-').collect();
    assert!(
        d.len() == 3 && d[0].len() == 4 && d[1].len() == 2 && d[2].len() == 2,
        "date {date:?}"
    );
    assert!(d.iter().all(|p| p.bytes().all(|b| b.is_ascii_digit())));
    match (option_env!("RUSTYGATE_GIT_COMMIT"), git_head()) {
        // Stamped by the builder (Docker build arg): exactly that.
        (Some(stamped), _) if !stamped.is_empty() => assert_eq!(commit, stamped),
        // Built from this checkout: its HEAD (cargo reruns build.rs when HEAD moves).
        (_, Some(head)) => assert_eq!(commit, head),
        (_, None) => assert_eq!(commit, "unknown"),
    }
    // `-V` says the same.
    assert_eq!(text(&rustygate(&["-V"]).stdout).trim_end(), line);
}

#[test]
fn completions_for_each_shell_know_the_commands_and_flags() {
    for (shell, marker) in [
        ("bash", "complete -F _rustygate"),
        ("zsh", "#compdef rustygate"),
        ("fish", "complete -c rustygate"),
    ] {
        let out = rustygate(&["completions", shell]);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.contains(marker), "{shell}: no `{marker}`");
        for word in ["validate", "serve", "deny-warnings", "admin-listen"] {
            assert!(script.contains(word), "{shell}: no `{word}`");
        }
    }
    let out = rustygate(&["completions", "tcsh"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("tcsh"), "{}", text(&out.stderr));
}

#[test]
fn man_page_is_roff_with_every_command() {
    let out = rustygate(&["man"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH rustygate 1"), "{page}");
    assert!(page.contains(".SH NAME"));
    for cmd in ["validate", "test", "plan", "schema", "serve", "completions"] {
        assert!(page.contains(cmd), "no `{cmd}` in the man page");
    }

    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("man1");
    let out = rustygate(&["man", "--out-dir", out_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    for page in ["rustygate.1", "rustygate-serve.1", "rustygate-validate.1"] {
        let body = std::fs::read_to_string(out_dir.join(page)).unwrap();
        assert!(body.contains(".TH"), "{page}");
    }
    // `serve`'s page lists its environment variables.
    let serve = std::fs::read_to_string(out_dir.join("rustygate-serve.1")).unwrap();
    assert!(serve.contains("RUSTYGATE_REPO"), "{serve}");

    // A place it cannot write is a usage error naming the place.
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let out = rustygate(&["man", "--out-dir", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("a-file"),
        "{}",
        text(&out.stderr)
    );
}

/// A workspace holding a config repo in `gateway/` with one error and one warning.
fn workspace() -> tempfile::TempDir {
    let ws = tempfile::tempdir().unwrap();
    let write = |path: &str, body: &str| {
        let p = ws.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    };
    write(
        "gateway/routes/a.toml",
        "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"order\"\n",
    );
    write(
        "gateway/upstreams/orders.toml",
        "[upstream.orders]\ntargets = [\"http://127.0.0.1:8001\"]\n",
    );
    ws
}

fn validate_github(cwd: &Path, dir: &str, workspace: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rustygate"));
    cmd.args(["validate", "--format", "github", dir])
        .current_dir(cwd)
        .env_remove("GITHUB_WORKSPACE");
    if let Some(ws) = workspace {
        cmd.env("GITHUB_WORKSPACE", ws);
    }
    cmd.output().unwrap()
}

fn assert_annotations(out: &Output) {
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{stdout}");
    assert!(
        lines[0].starts_with(
            "::error file=gateway/routes/a.toml,line=4,col=12,endLine=4,endColumn=19,\
             title=rustygate validate%3A unknown-upstream::unknown upstream `order`%0A"
        ),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].ends_with("%0Ahelp: did you mean `orders`?"),
        "{}",
        lines[0]
    );
    assert!(
        lines[1].starts_with(
            "::warning file=gateway/upstreams/orders.toml,line=1,col=11,endLine=1,endColumn=17,\
             title=rustygate validate%3A unused-upstream::"
        ),
        "{}",
        lines[1]
    );
    assert!(
        text(&out.stderr).contains("1 error(s), 1 warning(s)"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn github_format_annotates_files_relative_to_the_workspace() {
    let ws = workspace();
    // The action runs from the checkout with a relative path ...
    assert_annotations(&validate_github(ws.path(), "./gateway", None));
    assert_annotations(&validate_github(ws.path(), "gateway/", None));
    // ... or with an absolute one under $GITHUB_WORKSPACE.
    let abs = ws.path().join("gateway");
    let elsewhere = tempfile::tempdir().unwrap();
    assert_annotations(&validate_github(
        elsewhere.path(),
        abs.to_str().unwrap(),
        Some(ws.path()),
    ));
    // A valid repo prints no command and exits 0.
    std::fs::write(
        ws.path().join("gateway/routes/a.toml"),
        "[[route]]\nname = \"a\"\npath = \"/a\"\nupstream = \"orders\"\n",
    )
    .unwrap();
    let out = validate_github(ws.path(), "gateway", None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
}

/// A config file whose name is not UTF-8 is reported as such; it was reported as "does not
/// exist" (the loader tried to open its lossy spelling).
#[test]
fn validate_names_a_file_whose_name_is_not_utf8() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("routes")).unwrap();
    std::fs::write(
        dir.path().join("routes/main.toml"),
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
    )
    .unwrap();
    let odd = dir
        .path()
        .join("routes")
        .join(std::ffi::OsStr::from_bytes(b"x\xff.toml"));
    std::fs::write(odd, "[[route]]\nname = \"nu\"\npath = \"/nu\"\n").unwrap();
    let out = rustygate(&["validate", dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("routes/x\u{FFFD}.toml") && stderr.contains("name that is not UTF-8"),
        "{stderr}"
    );
    assert!(stderr.contains("invalid-file-name"), "{stderr}");
    assert!(!stderr.contains("does not exist"), "{stderr}");
}

/// A file with a byte that is not UTF-8 is located at that byte, with a help about encodings.
/// Before: at 1:1, helped with "config files are regular files inside the config repo".
#[test]
fn validate_locates_the_first_byte_that_is_not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("routes")).unwrap();
    std::fs::write(
        dir.path().join("routes/main.toml"),
        b"[[route]]\nname = \"h\xe9llo\"\npath = \"/\"\n",
    )
    .unwrap();
    let out = rustygate(&["validate", dir.path().to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("routes/main.toml:2:10"), "{stderr}");
    assert!(
        stderr.contains("invalid byte at line 2, column 10"),
        "{stderr}"
    );
    assert!(stderr.contains("save the file as UTF-8"), "{stderr}");
}

/// A config with no routes validated silently ("valid (0 file(s), 0 warning(s))"): it is a
/// warning, which `--deny-warnings` makes an error.
#[test]
fn a_config_without_routes_is_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_str().unwrap();
    let out = rustygate(&["validate", path]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("warning[no-routes]"), "{stderr}");
    let out = rustygate(&["validate", "--deny-warnings", path]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("error[no-routes]"), "{stderr}");
}

/// `rustygate status` against admin listeners that misbehave: it ends within its 10 s for the
/// whole answer and says what happened (a silent one said "Resource temporarily unavailable
/// (os error 11)"; one trickling a byte a second held it for as long as it went on).
#[test]
fn status_says_when_the_admin_listener_is_silent_trickles_or_is_closed() {
    use std::io::Write;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};
    let listener = |behave: fn(std::net::TcpStream)| {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            if let Ok((s, _)) = l.accept() {
                behave(s);
            }
        });
        format!("http://{addr}")
    };
    let silent = listener(|s| {
        std::thread::sleep(Duration::from_secs(30));
        drop(s);
    });
    let trickle = listener(|mut s| {
        for b in b"HTTP/1.1 200 OK\r\ncontent-length: 999\r\n\r\n{"
            .iter()
            .cycle()
            .take(40)
        {
            if s.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(700));
        }
    });
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let runs: Vec<_> = [silent, trickle, closed]
        .into_iter()
        .map(|admin| {
            std::thread::spawn(move || {
                let started = Instant::now();
                let out = rustygate(&["status", "--admin", &admin]);
                (admin, out, started.elapsed())
            })
        })
        .collect();
    let expect = [
        "accepted the connection but did not answer /status within 10 s",
        "accepted the connection but did not answer /status within 10 s",
        "cannot connect to",
    ];
    for (run, said) in runs.into_iter().zip(expect) {
        let (admin, out, took) = run.join().unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{admin}: {stderr}");
        assert!(stderr.contains(said), "{admin}: {stderr}");
        assert!(took < Duration::from_secs(20), "{admin}: took {took:?}");
    }
}

/// Runs `rustygate args`, reads one byte of its stdout (or stderr) and closes that pipe, like
/// `| head -c1`, while the other stream is read to its end. The outputs used here are larger
/// than a pipe holds, so the command is still writing when the pipe closes. The exit code,
/// and the other stream's text.
fn reader_gone_after_one_byte(args: &[&str], close_stderr: bool) -> (Option<i32>, String) {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args(args)
        .env_remove("GITHUB_WORKSPACE")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (closed, mut other): (Box<dyn Read + Send>, Box<dyn Read + Send>) = if close_stderr {
        (
            Box::new(child.stderr.take().unwrap()),
            Box::new(child.stdout.take().unwrap()),
        )
    } else {
        (
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        )
    };
    let other = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = other.read_to_string(&mut text);
        text
    });
    let mut closed = closed;
    let mut one = [0u8; 1];
    closed
        .read_exact(&mut one)
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    drop(closed);
    let status = child.wait().unwrap();
    (status.code(), other.join().unwrap())
}

/// A closed stdout or stderr ends a command quietly, with the exit code its result gives
/// (README: 0 valid or passed, 1 invalid, 2 does not compile): `rustygate validate --format
/// json DIR | head -c1` panicked "failed printing to stdout: Broken pipe" and exited 101.
#[test]
fn a_reader_that_goes_away_ends_the_command_with_its_own_exit_code() {
    // 2,000 routes to an upstream that does not exist: half a megabyte of diagnostics.
    let invalid = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(invalid.path().join("routes")).unwrap();
    let routes: String = (0..2000)
        .map(|i| format!("[[route]]\nname = \"r{i}\"\npath = \"/r{i}\"\nupstream = \"nope\"\n\n"))
        .collect();
    std::fs::write(invalid.path().join("routes/r.toml"), routes).unwrap();
    // 3,000 cases that pass: a quarter of a megabyte of `test ... ok`.
    let passing = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(passing.path().join("routes")).unwrap();
    std::fs::create_dir_all(passing.path().join("tests")).unwrap();
    std::fs::write(
        passing.path().join("routes/r.toml"),
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
    )
    .unwrap();
    let cases: String = (0..3000)
        .map(|i| {
            format!(
                "[[test]]\nname = \"the home page answers, case number {i:05}\"\n\
                 request = {{ url = \"/\" }}\nexpect = {{ status = 200 }}\n\n"
            )
        })
        .collect();
    std::fs::write(passing.path().join("tests/t.toml"), cases).unwrap();
    // An admin listener whose /status is a megabyte of JSON.
    let admin = {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            let body = format!(
                "{{\"version\":\"sha1\",\"attempted\":{{\"ok\":true}},\"stale\":false,\
                 \"last_fetch_error\":null,\"padding\":\"{}\"}}",
                "x".repeat(1 << 20)
            );
            for s in l.incoming() {
                let mut s = s.unwrap();
                // The whole request first: closing with some of it unread would reset the
                // connection under the answer.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        format!("http://{addr}")
    };
    let (invalid, passing) = (
        invalid.path().to_str().unwrap(),
        passing.path().to_str().unwrap(),
    );
    let runs: [(&[&str], bool, i32); 6] = [
        (&["validate", "--format", "json", invalid], false, 1),
        (&["validate", "--format", "github", invalid], false, 1),
        (&["validate", invalid], true, 1),
        (&["test", "--format", "json", invalid], false, 2),
        (&["test", passing], false, 0),
        (&["status", "--admin", &admin, "--format", "json"], false, 0),
    ];
    for (args, close_stderr, code) in runs {
        let (got, other) = reader_gone_after_one_byte(args, close_stderr);
        assert_eq!(got, Some(code), "{args:?}: {other}");
        assert!(!other.contains("panicked"), "{args:?}: {other}");
        assert!(!other.contains("error:"), "{args:?}: {other}");
    }
}

/// `serve` on an address another socket holds says which listener could not listen, and where;
/// it said only "error: serving: Address already in use (os error 98)".
#[test]
fn serve_names_the_listener_whose_address_is_taken() {
    use std::time::{Duration, Instant};
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = taken.local_addr().unwrap().to_string();
    let repo = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(repo.path().join("routes")).unwrap();
    std::fs::write(
        repo.path().join("routes/r.toml"),
        "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200 }\n",
    )
    .unwrap();
    let any = "127.0.0.1:0";
    for (listen, admin, extra, what) in [
        (at.as_str(), any, false, "proxy"),
        (any, at.as_str(), false, "admin"),
        (any, any, true, "listener `public`"),
    ] {
        let gateway = repo.path().join("gateway.toml");
        if extra {
            std::fs::write(
                &gateway,
                format!("[[listener]]\nname = \"public\"\naddress = \"{at}\"\n"),
            )
            .unwrap();
        } else {
            let _ = std::fs::remove_file(&gateway);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_rustygate"))
            .args(["serve", "--repo", repo.path().to_str().unwrap()])
            .args(["--listen", listen, "--admin-listen", admin])
            .args(["--workers", "1", "--watch", "false", "--log-format", "json"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("{what}: still serving on a taken address");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(1), "{what}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "cannot listen on {at} ({what}): Address already in use"
            )),
            "{what}: {stderr}"
        );
    }
    drop(taken);
}
