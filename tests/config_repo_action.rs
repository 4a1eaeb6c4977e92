#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The config-repo GitHub Action (action.yml, `.github/action/run.sh check`) run as GitHub would
//! run it on a pull request: a checkout of a real git repository (git2) whose `origin` holds the
//! base branch, the built `rustygate`, and a stand-in `gh` that records the API calls, so the
//! comment the action posts and the job's exit status can be checked without GitHub.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use tempfile::TempDir;

const ROUTES: &str = "[[route]]\nname = \"health\"\npath = \"/\"\nrespond = { status = 200, body = \"ok\" }\n\n\
[[route]]\nname = \"orders\"\nprefix = \"/orders\"\nupstream = \"orders\"\n";
const UPSTREAMS: &str = "[upstream.orders]\ntargets = [\"http://127.0.0.1:8001\"]\n";
const USERS: &str = "[[route]]\nname = \"users\"\npath = \"/users/{id}\"\nupstream = \"orders\"\n";
const TESTS: &str = "[[test]]\nname = \"orders are proxied\"\nrequest = { url = \"http://x/orders/7\" }\n\
expect = { route = \"orders\", upstream = \"orders\" }\n\n\
[[test]]\nname = \"users are proxied\"\nrequest = { url = \"http://x/users/7\" }\n\
expect = { route = \"users\" }\n";

fn commit(repo: &git2::Repository, message: &str, files: &[(&str, &str)]) {
    let root = repo.workdir().unwrap();
    for (path, text) in files {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let mut index = repo.index().unwrap();
    index
        .add_all(["*"], git2::IndexAddOption::DEFAULT, None)
        .unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let sig = git2::Signature::now("Action Test", "action@example.com").unwrap();
    let parent = repo.head().ok().map(|h| h.peel_to_commit().unwrap());
    let parents: Vec<&git2::Commit<'_>> = parent.iter().collect();
    repo.commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)
        .unwrap();
}

/// A pull request: `origin` has the base branch, `checkout` one more commit on top of it.
struct Pr {
    dir: TempDir,
    base_branch: String,
}

impl Pr {
    fn new(head_files: &[(&str, &str)]) -> Pr {
        let dir = tempfile::tempdir().unwrap();
        let origin = git2::Repository::init(dir.path().join("origin")).unwrap();
        commit(
            &origin,
            "Base",
            &[
                ("gateway/routes/api.toml", ROUTES),
                ("gateway/upstreams/orders.toml", UPSTREAMS),
            ],
        );
        let base_branch = origin.head().unwrap().shorthand().unwrap().to_owned();
        let url = format!("file://{}", dir.path().join("origin").display());
        let checkout = git2::Repository::clone(&url, dir.path().join("checkout")).unwrap();
        commit(&checkout, "Add users", head_files);

        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        // The stand-in gh: logs each call; a GET of the comments prints $FAKE_GH_COMMENT_ID;
        // a POST or PATCH keeps the request body it was given.
        let gh = bin.join("gh");
        std::fs::write(
            &gh,
            r#"#!/usr/bin/env bash
echo "$*" >> "$FAKE_GH_DIR/calls.log"
input=""
prev=""
for a in "$@"; do
  if [ "$prev" = --input ]; then input="$a"; fi
  prev="$a"
done
if [ -n "$input" ]; then cp "$input" "$FAKE_GH_DIR/request.json"; exit 0; fi
if [ -n "${FAKE_GH_COMMENT_ID:-}" ]; then echo "$FAKE_GH_COMMENT_ID"; fi
"#,
        )
        .unwrap();
        Command::new("chmod").arg("+x").arg(&gh).status().unwrap();
        std::fs::write(
            dir.path().join("event.json"),
            r#"{"pull_request": {"number": 7}}"#,
        )
        .unwrap();
        Pr { dir, base_branch }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn run(&self, commands: &str, existing_comment: Option<&str>) -> Output {
        self.run_as(
            Path::new(env!("CARGO_BIN_EXE_rustygate")),
            commands,
            existing_comment,
        )
    }

    /// [`Pr::run`] with `rustygate` as the binary the action runs.
    fn run_as(&self, rustygate: &Path, commands: &str, existing_comment: Option<&str>) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".github/action/run.sh");
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap()
        );
        let _ = std::fs::remove_file(self.path("request.json"));
        let mut cmd = Command::new("bash");
        cmd.arg(script)
            .arg("check")
            .current_dir(self.path("checkout"))
            .env("PATH", path)
            .env("RUSTYGATE", rustygate)
            .env("INPUT_PATH", "gateway")
            .env("INPUT_COMMANDS", commands)
            .env("GITHUB_BASE_REF", &self.base_branch)
            .env("GITHUB_EVENT_PATH", self.path("event.json"))
            .env("GITHUB_REPOSITORY", "acme/gateway-config")
            .env("GITHUB_STEP_SUMMARY", self.path("summary.md"))
            .env("FAKE_GH_DIR", self.dir.path())
            .env_remove("GITHUB_OUTPUT")
            .env_remove("GITHUB_WORKSPACE");
        match existing_comment {
            Some(id) => cmd.env("FAKE_GH_COMMENT_ID", id),
            None => cmd.env_remove("FAKE_GH_COMMENT_ID"),
        };
        cmd.output().unwrap()
    }

    /// The comment body the action sent to the GitHub API.
    fn posted(&self) -> String {
        let request: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.path("request.json")).unwrap()).unwrap();
        request["body"].as_str().unwrap().to_owned()
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(self.path("calls.log")).unwrap_or_default()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn a_good_pull_request_gets_one_comment_with_the_plan_and_the_tests() {
    let pr = Pr::new(&[
        ("gateway/routes/users.toml", USERS),
        ("gateway/tests/api.toml", TESTS),
    ]);
    let out = pr.run("validate, test, plan", None);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let body = pr.posted();
    assert!(
        body.starts_with("<!-- rustygate-config-ci path=gateway -->\n"),
        "{body}"
    );
    assert!(body.contains("✅ all checks passed"), "{body}");
    assert!(
        body.contains("| validate | ✅ valid, 0 warning(s) |"),
        "{body}"
    );
    assert!(
        body.contains("| test | ✅ ok. 2 passed; 0 failed; 0 filtered out |"),
        "{body}"
    );
    assert!(body.contains("| plan | ✅ head compiles |"), "{body}");
    assert!(body.contains("#### Routes added (1)"), "{body}");
    assert!(body.contains("`users`"), "{body}");
    assert!(body.contains("rustygate 0.1.0 (commit "), "{body}");
    // The first run creates the comment ...
    let calls = pr.calls();
    assert!(
        calls.contains("api --method POST repos/acme/gateway-config/issues/7/comments"),
        "{calls}"
    );
    // ... the next one, finding it, edits it: one comment per pull request and path.
    let out = pr.run("validate,test,plan", Some("4242"));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let calls = pr.calls();
    assert!(
        calls.contains("api --method PATCH repos/acme/gateway-config/issues/comments/4242"),
        "{calls}"
    );
    assert_eq!(calls.matches("--method POST").count(), 1, "{calls}");
    // The job summary gets the report too.
    let summary = std::fs::read_to_string(pr.path("summary.md")).unwrap();
    assert!(summary.contains("Routes added (1)"));
}

#[test]
fn an_invalid_config_fails_the_job_with_annotations_and_says_why_in_the_comment() {
    let pr = Pr::new(&[
        (
            "gateway/routes/users.toml",
            "[[route]]\nname = \"users\"\npath = \"/users/{id}\"\nupstream = \"user\"\n",
        ),
        ("gateway/tests/api.toml", TESTS),
    ]);
    let out = pr.run("validate,test,plan", None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    // The annotation GitHub puts on the diff, relative to the checkout.
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(
            "::error file=gateway/routes/users.toml,line=4,col=12,endLine=4,endColumn=18,title=rustygate validate%3A unknown-upstream::"
        ),
        "{stdout}"
    );
    let body = pr.posted();
    assert!(body.contains("❌ some checks failed"), "{body}");
    assert!(
        body.contains("| validate | ❌ 1 error(s), 0 warning(s) |"),
        "{body}"
    );
    assert!(
        body.contains("| test | ❌ no test ran: the config or its tests do not compile (exit 2) |"),
        "{body}"
    );
    assert!(
        body.contains("| plan | ❌ head does not compile |"),
        "{body}"
    );
    assert!(
        body.contains("gateway/routes/users.toml") || body.contains("routes/users.toml:4:12"),
        "{body}"
    );
}

#[test]
fn a_failing_test_fails_the_job_and_a_bad_input_is_a_clear_error() {
    let failing = TESTS.replace("route = \"users\"", "route = \"orders\"");
    let pr = Pr::new(&[
        ("gateway/routes/users.toml", USERS),
        ("gateway/tests/api.toml", &failing),
    ]);
    let out = pr.run("test", None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let body = pr.posted();
    assert!(
        body.contains("| test | ❌ FAILED. 1 passed; 1 failed; 0 filtered out |"),
        "{body}"
    );
    assert!(
        !body.contains("| validate |"),
        "only the commands asked for: {body}"
    );

    let out = pr.run("validate,deploy", None);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stdout).contains("unknown command `deploy`"),
        "{}",
        text(&out.stdout)
    );
}

/// Whatever `rustygate test` prints, it stays inside its block of the comment and gives the job
/// log no workflow command. Before, the block's fence was always four backticks (a line of
/// seven closed it and the rest was the comment's Markdown) and the output was copied into the
/// log as it came, `::error::` lines and `##[error]` included.
#[test]
fn test_output_cannot_leave_its_block_or_command_the_runner() {
    let pr = Pr::new(&[("gateway/routes/users.toml", USERS)]);
    // A stand-in whose `test` prints what a hostile output could, the real binary otherwise.
    let stand_in = pr.path("bin/rustygate-hostile");
    std::fs::write(
        &stand_in,
        format!(
            "#!/usr/bin/env bash\n\
             if [ \"$1\" = test ]; then\n\
             printf 'test x ... ok\\n```````\\n<b>injected</b>\\n::error::injected\\nsee ##[error]legacy\\n'\n\
             printf 'test result: ok. 1 passed; 0 failed; 0 filtered out'\n\
             exit 0\n\
             fi\n\
             exec {} \"$@\"\n",
            env!("CARGO_BIN_EXE_rustygate")
        ),
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(&stand_in)
        .status()
        .unwrap();
    let out = pr.run_as(&stand_in, "test", None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let body = pr.posted();
    let lines: Vec<&str> = body.lines().collect();
    let first = lines.iter().position(|l| *l == "test x ... ok").unwrap();
    let fence = lines[first - 1].strip_suffix("text").unwrap();
    assert!(
        fence.len() > 7 && fence.bytes().all(|b| b == b'`'),
        "{body}"
    );
    // CommonMark closes a block at a line of as many backticks or more, and nothing else.
    let closes = |l: &&str| {
        let l = l.trim_end();
        l.len() >= fence.len() && l.bytes().all(|b| b == b'`')
    };
    let close = first + lines[first..].iter().position(closes).unwrap();
    assert!(
        lines[close - 1].starts_with("test result:"),
        "the block ends after the output: {body}"
    );

    let log = text(&out.stderr);
    let log: Vec<&str> = log.lines().collect();
    let stop = log
        .iter()
        .position(|l| l.starts_with("::stop-commands::"))
        .unwrap_or_else(|| panic!("{log:#?}"));
    let token = &log[stop]["::stop-commands::".len()..];
    assert!(token.len() >= 32, "{token}");
    let resume = log
        .iter()
        .position(|l| *l == format!("::{token}::"))
        .unwrap_or_else(|| panic!("{log:#?}"));
    for injected in ["::error::injected", "see ##[error]legacy"] {
        let at = log.iter().position(|l| *l == injected).unwrap();
        assert!(stop < at && at < resume, "{log:#?}");
    }
    // The output's last line had no line break: the resume is still a line of its own.
    assert!(
        log[resume - 1].starts_with("test result:") || log[resume - 1].is_empty(),
        "{log:#?}"
    );
}

/// `run.sh install` with a stand-in `gh` serving a release from a folder: the binary is put on
/// PATH only when it matches the release's SHA256SUMS.
fn install(release: &Path, version: &str, github_path: &Path) -> Output {
    let dir = release.parent().unwrap();
    let bin = dir.join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    // `gh release view --json tagName --jq .tagName` and `gh release download TAG --dir D ...`.
    std::fs::write(
        bin.join("gh"),
        r#"#!/usr/bin/env bash
if [ "$1 $2" = "release view" ]; then echo v0.1.0; exit 0; fi
if [ "$1 $2" = "release download" ]; then
  [ "$3" = v0.1.0 ] || { echo "release $3 not found" >&2; exit 1; }
  while [ $# -gt 0 ]; do if [ "$1" = --dir ]; then dest="$2"; fi; shift; done
  cp "$FAKE_RELEASE"/* "$dest"/
  exit 0
fi
exit 1
"#,
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(bin.join("gh"))
        .status()
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join(".github/action/run.sh");
    Command::new("bash")
        .arg(script)
        .arg("install")
        .env(
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        )
        .env("FAKE_RELEASE", release)
        .env("INPUT_VERSION", version)
        .env("ACTION_REPOSITORY", "acme/rustygate")
        .env("RUNNER_TEMP", dir.join("runner-temp"))
        .env("GITHUB_PATH", github_path)
        .output()
        .unwrap()
}

#[test]
fn install_checks_the_download_against_sha256sums() {
    let target = match std::env::consts::ARCH {
        "x86_64" => "x86_64-unknown-linux-musl",
        "aarch64" => "aarch64-unknown-linux-musl",
        other => panic!("no release target for {other}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let name = format!("rustygate-0.1.0-{target}");
    let stage = dir.path().join("stage").join(&name);
    std::fs::create_dir_all(&stage).unwrap();
    // A stand-in binary: what is checked here is the download, not the gateway (and packing
    // the debug build would take half a minute).
    std::fs::write(
        stage.join("rustygate"),
        "#!/bin/sh\necho 'rustygate 0.1.0 (commit stand-in, built 2026-01-01)'\n",
    )
    .unwrap();
    Command::new("chmod")
        .arg("+x")
        .arg(stage.join("rustygate"))
        .status()
        .unwrap();
    let release = dir.path().join("release");
    std::fs::create_dir_all(&release).unwrap();
    let tarball = release.join(format!("{name}.tar.gz"));
    let tar = Command::new("tar")
        .arg("-C")
        .arg(dir.path().join("stage"))
        .arg("-czf")
        .arg(&tarball)
        .arg(&name)
        .status()
        .unwrap();
    assert!(tar.success());
    let sums = Command::new("sha256sum")
        .arg(tarball.file_name().unwrap())
        .current_dir(&release)
        .output()
        .unwrap();
    std::fs::write(release.join("SHA256SUMS"), &sums.stdout).unwrap();

    let github_path = dir.path().join("github_path");
    let out = install(&release, "latest", &github_path);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("rustygate 0.1.0 (commit stand-in"),
        "{}",
        text(&out.stdout)
    );
    let added = std::fs::read_to_string(&github_path).unwrap();
    assert!(
        Path::new(added.trim()).join("rustygate").exists(),
        "{added}"
    );

    // A version that has no release, and a download that does not match its checksum, stop
    // the job before anything runs.
    let out = install(&release, "9.9.9", &github_path);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stdout).contains("cannot download rustygate v9.9.9"),
        "{}",
        text(&out.stdout)
    );
    std::fs::write(&tarball, b"tampered").unwrap();
    let out = install(&release, "0.1.0", &github_path);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stdout).contains("does not match the release's SHA256SUMS"),
        "{}",
        text(&out.stdout)
    );
}
