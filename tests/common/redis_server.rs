//! A real `redis-server` for the tests that need the fleet's shared store (tests/scale_out.rs,
//! tests/dashboard_api.rs, tests/dashboard_browser.rs). Without the binary those tests are
//! skipped with a loud message, except under CI (`CI` set), where a missing `redis-server` fails
//! them.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{dead_port, wait_until};

/// A `redis-server` of the test, on a free loopback port, without persistence, killed on drop.
pub struct RedisServer {
    pub child: Child,
    pub port: u16,
    /// The address it is bound to: `127.0.0.1`, or `[::1]` from [`RedisServer::start_ipv6`].
    host: &'static str,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    /// A fresh server, or `None` (test skipped) when there is no `redis-server` outside CI.
    pub fn start() -> Option<RedisServer> {
        RedisServer::installed().then(|| RedisServer::start_on(dead_port(), &[]))
    }

    /// Whether `redis-server` can be run; outside CI a missing one is reported loudly.
    pub fn installed() -> bool {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "redis-server is not installed; CI must run these tests (.ci/run installs it)"
                );
            }
            // Straight to the process's stderr: libtest hides what a passing test prints.
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "\n!!!!!!!! SKIPPED: redis-server is not installed; what needs it in this test does not run (apt-get install redis-server) !!!!!!!!\n"
            );
            return false;
        }
        true
    }

    /// [`RedisServer::start`], bound to `::1` only.
    pub fn start_ipv6() -> Option<RedisServer> {
        RedisServer::installed().then(|| RedisServer::start_at("[::1]", dead_port(), &[]))
    }

    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        RedisServer::start_at("127.0.0.1", port, extra)
    }

    fn start_at(host: &'static str, port: u16, extra: &[&str]) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let bind = host.trim_start_matches('[').trim_end_matches(']');
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", bind])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", dir.path().to_str().unwrap()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = RedisServer {
            child,
            port,
            host,
            _dir: dir,
        };
        assert!(
            wait_until(Duration::from_secs(10), || server
                .try_conn()
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).ok())
                .is_some()),
            "redis-server did not come up on port {port}"
        );
        server
    }

    pub fn url(&self) -> String {
        format!("redis://{}:{}/", self.host, self.port)
    }

    /// A config repo's files for a fleet on this server: `[rate_limit_store]` naming it and one
    /// route answering `body` itself, so each commit is told apart by what `/` says.
    pub fn fleet_config(&self, body: &str) -> Vec<(&'static str, String)> {
        vec![
            (
                "gateway.toml",
                format!("[rate_limit_store]\nurl = \"{}\"\n", self.url()),
            ),
            (
                "routes/main.toml",
                format!(
                    "[[route]]\nname = \"home\"\npath = \"/\"\nrespond = {{ status = 200, body = \"{body}\" }}\n"
                ),
            ),
        ]
    }

    pub fn try_conn(&self) -> Option<redis::Connection> {
        redis::Client::open(self.url())
            .ok()?
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()
    }

    pub fn conn(&self) -> redis::Connection {
        self.try_conn().expect("connected to redis-server")
    }

    /// Calls of `command` the server has answered so far (`INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut self.conn())
            .unwrap();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next()?.parse().ok())
            .unwrap_or(0)
    }

    pub fn keys(&self, pattern: &str) -> Vec<String> {
        redis::cmd("KEYS")
            .arg(pattern)
            .query(&mut self.conn())
            .unwrap()
    }
}

impl RedisServer {
    /// Stops (`SIGSTOP`) or resumes (`SIGCONT`) the server: a stopped server keeps its port
    /// and connections but answers nothing, like a stalled Redis.
    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} redis-server");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
