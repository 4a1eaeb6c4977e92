//! Verifying a git server's SSH host key against an OpenSSH `known_hosts` file.
//!
//! Fetching over SSH from a server whose key is not known, or has changed, is refused with a
//! clear error: there is no trust on first use. The file is `RUSTYGATE_GIT_KNOWN_HOSTS`, or
//! `~/.ssh/known_hosts`. Supported, as OpenSSH writes them: comma-separated host patterns with
//! `*` / `?` wildcards and `!` negation, `[host]:port` for other ports than 22, hashed names
//! (`|1|salt|hash`, `HashKnownHosts yes`), `@revoked` keys. `@cert-authority` lines are
//! skipped (host certificates are not supported): a host only known through one is unknown.

use std::path::{Path, PathBuf};

use base64::Engine;
use hmac::{Hmac, Mac};

/// The parsed file.
#[derive(Debug, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    revoked: bool,
    hosts: Hosts,
    /// The key blob, as the server presents it (SSH wire format).
    key: Vec<u8>,
}

#[derive(Debug)]
enum Hosts {
    /// `(negated, pattern)`, lower-case.
    Patterns(Vec<(bool, String)>),
    /// `|1|base64(salt)|base64(HMAC-SHA1(salt, name))`.
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

/// What the file says of a host and the key it presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A line for this host holds this key.
    Known,
    /// The host is listed, with other keys only: possibly a man in the middle.
    Changed,
    /// The host is not listed.
    Unknown,
    /// The key is marked `@revoked`.
    Revoked,
}

impl KnownHosts {
    pub fn parse(text: &str) -> KnownHosts {
        let entries = text.lines().filter_map(parse_line).collect();
        KnownHosts { entries }
    }

    /// Reads `path`; a missing file knows no host (every fetch over SSH is then refused).
    pub fn load(path: &Path) -> Result<KnownHosts, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(KnownHosts::parse(&text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KnownHosts::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// The file the gateway reads: `RUSTYGATE_GIT_KNOWN_HOSTS`, else `~/.ssh/known_hosts`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("RUSTYGATE_GIT_KNOWN_HOSTS") {
            return Some(PathBuf::from(p));
        }
        std::env::var_os("HOME").map(|h| Path::new(&h).join(".ssh/known_hosts"))
    }

    /// Checks `key` (the server's key blob) for `host` on `port`.
    pub fn check(&self, host: &str, port: u16, key: &[u8]) -> Verdict {
        let host = host.to_ascii_lowercase();
        let name = if port == 22 {
            host.clone()
        } else {
            format!("[{host}]:{port}")
        };
        let lines = || self.entries.iter().filter(|e| e.hosts.matches(&name));
        // A revocation wins over any line that lists the key.
        if lines().any(|e| e.revoked && e.key == key) {
            return Verdict::Revoked;
        }
        let mut listed = lines().filter(|e| !e.revoked).peekable();
        if listed.peek().is_none() {
            return Verdict::Unknown;
        }
        if listed.any(|e| e.key == key) {
            Verdict::Known
        } else {
            Verdict::Changed
        }
    }
}

impl Hosts {
    fn matches(&self, name: &str) -> bool {
        match self {
            Hosts::Patterns(patterns) => {
                let mut hit = false;
                for (negated, p) in patterns {
                    if wildcard(p.as_bytes(), name.as_bytes()) {
                        if *negated {
                            return false;
                        }
                        hit = true;
                    }
                }
                hit
            }
            Hosts::Hashed { salt, hash } => {
                let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                    return false;
                };
                mac.update(name.as_bytes());
                mac.verify_slice(hash).is_ok()
            }
        }
    }
}

fn parse_line(line: &str) -> Option<Entry> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut fields = line.split_whitespace();
    let mut first = fields.next()?;
    let mut revoked = false;
    if let Some(marker) = first.strip_prefix('@') {
        match marker {
            "revoked" => revoked = true,
            // Host certificates are not supported: such a line vouches for nothing here.
            _ => return None,
        }
        first = fields.next()?;
    }
    let _key_type = fields.next()?;
    let key = base64::engine::general_purpose::STANDARD
        .decode(fields.next()?)
        .ok()?;
    let hosts = match first.strip_prefix("|1|") {
        Some(hashed) => {
            let (salt, hash) = hashed.split_once('|')?;
            let b64 = base64::engine::general_purpose::STANDARD;
            Hosts::Hashed {
                salt: b64.decode(salt).ok()?,
                hash: b64.decode(hash).ok()?,
            }
        }
        None => Hosts::Patterns(
            first
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| match p.strip_prefix('!') {
                    Some(p) => (true, p.to_ascii_lowercase()),
                    None => (false, p.to_ascii_lowercase()),
                })
                .collect(),
        ),
    };
    Some(Entry {
        revoked,
        hosts,
        key,
    })
}

/// `*` (any run) and `?` (one character) glob matching, as OpenSSH's `match_pattern`.
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    match (p.first(), s.first()) {
        (None, None) => true,
        (Some(b'*'), _) => wildcard(&p[1..], s) || (!s.is_empty() && wildcard(p, &s[1..])),
        (Some(b'?'), Some(_)) => wildcard(&p[1..], &s[1..]),
        (Some(a), Some(b)) if a == b => wildcard(&p[1..], &s[1..]),
        _ => false,
    }
}

/// The host and port of an SSH remote URL: `ssh://[user@]host[:port]/path` or the scp-like
/// `[user@]host:path`. `None` for other transports.
pub fn ssh_host_port(url: &str) -> Option<(String, u16)> {
    if let Some(rest) = url.strip_prefix("ssh://") {
        let authority = rest.split('/').next()?;
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        if let Some(v6) = host_port.strip_prefix('[') {
            let (host, after) = v6.split_once(']')?;
            let port = after
                .strip_prefix(':')
                .map_or(Some(22), |p| p.parse().ok())?;
            return Some((host.to_owned(), port));
        }
        return match host_port.split_once(':') {
            Some((h, p)) => Some((h.to_owned(), p.parse().ok()?)),
            None => Some((host_port.to_owned(), 22)),
        };
    }
    if url.contains("://") {
        return None;
    }
    // scp-like: `git@host:org/repo.git` (no slash before the colon), or with an IPv6 address in
    // brackets, `git@[::1]:org/repo.git`, whose colons are not the one before the path.
    let rest = url
        .split_once('@')
        .filter(|(user, _)| !user.contains(['/', ':', '[']))
        .map_or(url, |(_, r)| r);
    if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        after.strip_prefix(':')?;
        return Some((host.to_owned(), 22));
    }
    let (before, _) = rest.split_once(':')?;
    if before.contains('/') {
        return None;
    }
    Some((before.to_owned(), 22))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const KEY_A: &[u8] =
        b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const KEY_B: &[u8] =
        b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00\x20bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn b64(k: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(k)
    }

    fn hashed(name: &str, salt: &[u8]) -> String {
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
        mac.update(name.as_bytes());
        let hash = mac.finalize().into_bytes();
        format!("|1|{}|{}", b64(salt), b64(&hash))
    }

    #[test]
    fn known_changed_unknown_and_revoked_keys() {
        let file = format!(
            "# comment\n\ngit.example,10.0.0.5 ssh-ed25519 {a}\n\
             [git.example]:2222 ssh-ed25519 {b}\n\
             @revoked * ssh-ed25519 {b}\n\
             @cert-authority *.example ssh-ed25519 {a}\n\
             garbage line\n",
            a = b64(KEY_A),
            b = b64(KEY_B),
        );
        let kh = KnownHosts::parse(&file);
        assert_eq!(kh.check("git.example", 22, KEY_A), Verdict::Known);
        assert_eq!(kh.check("GIT.example", 22, KEY_A), Verdict::Known);
        assert_eq!(kh.check("10.0.0.5", 22, KEY_A), Verdict::Known);
        // Another key for a listed host: refused as changed, never trusted.
        assert_eq!(kh.check("git.example", 22, &KEY_A[..20]), Verdict::Changed);
        // The port is part of the name: 2222 lists only key B, which is revoked everywhere.
        assert_eq!(kh.check("git.example", 2222, KEY_B), Verdict::Revoked);
        assert_eq!(kh.check("git.example", 2222, KEY_A), Verdict::Changed);
        // Only a @cert-authority line names it: unknown.
        assert_eq!(kh.check("other.example", 22, KEY_A), Verdict::Unknown);
        assert_eq!(
            KnownHosts::default().check("git.example", 22, KEY_A),
            Verdict::Unknown
        );
    }

    #[test]
    fn hashed_names_wildcards_and_negation() {
        let file = format!(
            "{h} ssh-ed25519 {a}\n*.corp.example,!evil.corp.example ssh-ed25519 {b}\n\
             git?.example ssh-ed25519 {a}\n",
            h = hashed("[hashed.example]:2200", b"0123456789abcdef0123"),
            a = b64(KEY_A),
            b = b64(KEY_B),
        );
        let kh = KnownHosts::parse(&file);
        assert_eq!(kh.check("hashed.example", 2200, KEY_A), Verdict::Known);
        assert_eq!(kh.check("hashed.example", 22, KEY_A), Verdict::Unknown);
        assert_eq!(kh.check("git.corp.example", 22, KEY_B), Verdict::Known);
        assert_eq!(kh.check("evil.corp.example", 22, KEY_B), Verdict::Unknown);
        assert_eq!(kh.check("git1.example", 22, KEY_A), Verdict::Known);
        assert_eq!(kh.check("git12.example", 22, KEY_A), Verdict::Unknown);
    }

    #[test]
    fn ssh_urls_give_host_and_port() {
        let hp = |u: &str| ssh_host_port(u);
        assert_eq!(
            hp("ssh://git@git.example/org/c.git"),
            Some(("git.example".into(), 22))
        );
        assert_eq!(
            hp("ssh://git.example:2222/c.git"),
            Some(("git.example".into(), 2222))
        );
        assert_eq!(hp("ssh://git@[::1]:2222/c.git"), Some(("::1".into(), 2222)));
        assert_eq!(
            hp("git@git.example:org/c.git"),
            Some(("git.example".into(), 22))
        );
        // An IPv6 address in brackets: before, the host was read as `[` (the text before the
        // first colon) and the host-key check refused the fetch for an unknown host `[`.
        assert_eq!(hp("git@[::1]:org/c.git"), Some(("::1".into(), 22)));
        assert_eq!(hp("[2001:db8::1]:c.git"), Some(("2001:db8::1".into(), 22)));
        assert_eq!(hp("git@[::1]"), None);
        assert_eq!(
            hp("git@git.example:org/user@c.git"),
            Some(("git.example".into(), 22))
        );
        assert_eq!(hp("https://git.example/org/c.git"), None);
        assert_eq!(hp("file:///srv/c.git"), None);
        assert_eq!(hp("/srv/c:git"), None);
    }
}
