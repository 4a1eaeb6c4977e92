//! Git over SSH against a real `sshd` on loopback: the server's host key is checked against the
//! known-hosts file before anything is fetched. Skipped, loudly, where `sshd` cannot run without
//! system changes (no binary, or no privilege-separation directory when running as root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

struct Sshd {
    child: Child,
    port: u16,
    host_pub: String,
    client_key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

fn sshd() -> Option<Sshd> {
    let bin = Path::new("/usr/sbin/sshd");
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !bin.exists() || (root && !Path::new("/run/sshd").is_dir()) {
        eprintln!("SKIPPED: no runnable sshd here (install openssh-server to run this test)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let host_key = dir.path().join("host_key");
    let client_key = dir.path().join("client_key");
    keygen(&host_key);
    keygen(&client_key);
    std::fs::copy(
        dir.path().join("client_key.pub"),
        dir.path().join("authorized_keys"),
    )
    .unwrap();
    let port = dead_port();
    let config = dir.path().join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nAuthorizedKeysFile {ak}\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             StrictModes no\nPidFile {pid}\n",
            hk = host_key.display(),
            ak = dir.path().join("authorized_keys").display(),
            pid = dir.path().join("sshd.pid").display(),
        ),
    )
    .unwrap();
    let child = Command::new(bin)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "sshd did not start");
    let host_pub = std::fs::read_to_string(dir.path().join("host_key.pub")).unwrap();
    Some(Sshd {
        child,
        port,
        host_pub,
        client_key,
        _dir: dir,
    })
}

/// `type base64` of a public key line (no comment).
fn key_fields(pub_line: &str) -> String {
    pub_line
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn serve_once(url: &str, known_hosts: &Path, key: &Path) -> (bool, String) {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rustygate"))
        .args([
            "serve",
            "--repo",
            url,
            "--poll",
            "0",
            "--reload-timeout",
            "20s",
        ])
        .args(["--cache-dir", cache.path().to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .env("RUSTYGATE_GIT_KNOWN_HOSTS", known_hosts)
        .env("RUSTYGATE_GIT_SSH_KEY", key)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn ssh_fetches_only_from_a_server_whose_host_key_is_known() {
    let Some(sshd) = sshd() else {
        return;
    };
    let bare = tempfile::tempdir().unwrap();
    let repo = git2::Repository::init_bare(bare.path()).unwrap();
    commit_files(
        &repo,
        "main",
        &[(
            "routes/main.toml",
            "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = { status = 200, body = \"over-ssh\" }\n",
        )],
        "first",
    );
    let user = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout).unwrap();
    let url = format!(
        "ssh://{}@127.0.0.1:{}{}",
        user.trim(),
        sshd.port,
        bare.path().display()
    );
    let files = tempfile::tempdir().unwrap();
    let name = format!("[127.0.0.1]:{}", sshd.port);

    // Unknown host: refused before any credential is offered.
    let empty = files.path().join("empty");
    std::fs::write(&empty, "").unwrap();
    let (ok, stderr) = serve_once(&url, &empty, &sshd.client_key);
    assert!(!ok);
    assert!(
        stderr.contains(&format!("the SSH host key of {name} is not in")),
        "{stderr}"
    );

    // Listed with another key: refused as changed.
    let other = files.path().join("other_key");
    keygen(&other);
    let other_pub = std::fs::read_to_string(files.path().join("other_key.pub")).unwrap();
    let wrong = files.path().join("wrong");
    std::fs::write(&wrong, format!("{name} {}\n", key_fields(&other_pub))).unwrap();
    let (ok, stderr) = serve_once(&url, &wrong, &sshd.client_key);
    assert!(!ok);
    assert!(stderr.contains("does not match"), "{stderr}");

    // Known: served.
    let known = files.path().join("known");
    std::fs::write(&known, format!("{name} {}\n", key_fields(&sshd.host_pub))).unwrap();
    let known_env = known.to_str().unwrap();
    let key_env = sshd.client_key.to_str().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let gw = GatewayProcess::start(
        &[
            "--repo",
            &url,
            "--poll",
            "0",
            "--cache-dir",
            cache.path().to_str().unwrap(),
        ],
        &[
            ("RUSTYGATE_GIT_KNOWN_HOSTS", known_env),
            ("RUSTYGATE_GIT_SSH_KEY", key_env),
        ],
    );
    assert_eq!(gw.get("/").unwrap().1, "over-ssh");
}
