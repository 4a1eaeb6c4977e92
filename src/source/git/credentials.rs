//! What a fetch presents and what it trusts: the credentials taken from the process
//! environment (and the rule that the token goes only to the configured origin), and the SSH
//! host-key check against the known-hosts file. Nothing here touches the mirror.

use std::path::PathBuf;
use std::rc::Rc;

use super::GitError;

/// Credentials for fetching, from the process environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub token: Option<String>,
    pub ssh_key: Option<PathBuf>,
}

impl Credentials {
    pub fn from_env() -> Self {
        Credentials {
            token: std::env::var("RUSTYGATE_GIT_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
            ssh_key: std::env::var_os("RUSTYGATE_GIT_SSH_KEY").map(PathBuf::from),
        }
    }

    /// The git2 credential answer for one request to `url` when fetching `configured`, or
    /// `None` when nothing fits. The token goes only to the configured URL's scheme, host and
    /// port: a host that redirects the fetch elsewhere does not hand it on.
    pub fn answer(
        &self,
        configured: &str,
        url: &str,
        username: Option<&str>,
        allowed: git2::CredentialType,
    ) -> Option<Result<git2::Cred, git2::Error>> {
        if allowed.contains(git2::CredentialType::SSH_KEY) {
            let user = username.unwrap_or("git");
            return Some(match &self.ssh_key {
                Some(key) => git2::Cred::ssh_key(user, None, key, None),
                None => git2::Cred::ssh_key_from_agent(user),
            });
        }
        if allowed.contains(git2::CredentialType::USER_PASS_PLAINTEXT)
            && url.starts_with("https://")
            && origin(url).is_some()
            && origin(url) == origin(configured)
        {
            let token = self.token.as_deref()?;
            return Some(git2::Cred::userpass_plaintext(
                username.unwrap_or("x-access-token"),
                token,
            ));
        }
        None
    }
}

/// The scheme, host (lowercase) and port of an `http(s)://` URL, the port defaulted by the
/// scheme; `None` for any other URL.
fn origin(url: &str) -> Option<(String, String, u16)> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let (host, port) = match host_port.rsplit_once(':') {
        // `[::1]:8443`, `host:8443`; not the colons inside `[::1]`.
        Some((h, p)) if !p.contains(']') => (h, p.parse().ok()?),
        _ => (host_port, default_port),
    };
    Some((scheme, host.to_ascii_lowercase(), port))
}

/// The SSH host-key check for `host`:`port` against the known-hosts file: only a key listed
/// for the host is accepted; an unknown host or a changed key refuses the fetch, saying which
/// and how to fix it.
#[allow(clippy::type_complexity)]
pub(super) fn host_key_check(
    host: String,
    port: u16,
    refused: Rc<std::cell::RefCell<Option<String>>>,
) -> Result<
    impl FnMut(&git2::cert::Cert<'_>, &str) -> Result<git2::CertificateCheckStatus, git2::Error>,
    GitError,
> {
    use crate::source::known_hosts::{KnownHosts, Verdict};
    let path = KnownHosts::default_path().ok_or_else(|| {
        GitError::HostKey(
            "no known_hosts file: set RUSTYGATE_GIT_KNOWN_HOSTS (HOME is not set either)".into(),
        )
    })?;
    let known = KnownHosts::load(&path).map_err(GitError::HostKey)?;
    let shown = path.display().to_string();
    Ok(move |cert: &git2::cert::Cert<'_>, _: &str| {
        let Some(hostkey) = cert.as_hostkey() else {
            return Ok(git2::CertificateCheckStatus::CertificatePassthrough);
        };
        let Some(key) = hostkey.hostkey() else {
            return Err(git2::Error::from_str(
                "the SSH server's host key could not be read",
            ));
        };
        let name = if port == 22 {
            host.clone()
        } else {
            format!("[{host}]:{port}")
        };
        let why = match known.check(&host, port, key) {
            Verdict::Known => return Ok(git2::CertificateCheckStatus::CertificateOk),
            Verdict::Unknown => format!(
                "the SSH host key of {name} is not in {shown}: refusing to fetch (no trust on \
                 first use); add it after checking its fingerprint (`ssh-keyscan -p {port} {host}`), \
                 or point RUSTYGATE_GIT_KNOWN_HOSTS at a file that has it"
            ),
            Verdict::Changed => format!(
                "the SSH host key of {name} does not match {shown}: refusing to fetch (the \
                 key changed, possibly a man in the middle); if the server's key was rotated, \
                 replace its line"
            ),
            Verdict::Revoked => format!(
                "the SSH host key of {name} is marked @revoked in {shown}: refusing to fetch"
            ),
        };
        let err = git2::Error::from_str(&why);
        *refused.borrow_mut() = Some(why);
        Err(err)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn https_token_is_offered_only_for_https() {
        let c = Credentials {
            token: Some("t0k".into()),
            ssh_key: None,
        };
        let plain = git2::CredentialType::USER_PASS_PLAINTEXT;
        assert!(c.answer(HTTPS, HTTPS, None, plain).is_some());
        let http = "http://git.example/org/repo.git";
        assert!(c.answer(http, http, None, plain).is_none());
        let none = Credentials::default();
        assert!(none.answer(HTTPS, HTTPS, None, plain).is_none());
    }

    const HTTPS: &str = "https://git.example/org/repo.git";

    /// A redirect to another host, port or scheme does not carry the token along.
    #[test]
    fn the_token_goes_to_the_configured_host_and_port_only() {
        let c = Credentials {
            token: Some("t0k".into()),
            ssh_key: None,
        };
        let plain = git2::CredentialType::USER_PASS_PLAINTEXT;
        for same in [
            "https://git.example/org/repo.git/info/refs?service=git-upload-pack",
            "https://GIT.example:443/other.git",
            "https://user@git.example/org/repo.git",
        ] {
            assert!(c.answer(HTTPS, same, None, plain).is_some(), "{same}");
        }
        for other in [
            "https://evil.example/org/repo.git",
            "https://git.example:8443/org/repo.git",
            "https://git.example.evil.example/org/repo.git",
            "https://git.example@evil.example/org/repo.git",
        ] {
            assert!(c.answer(HTTPS, other, None, plain).is_none(), "{other}");
        }
        let v6 = "https://[::1]:8443/r.git";
        assert!(c.answer(v6, v6, None, plain).is_some());
        assert!(c.answer(v6, "https://[::1]/r.git", None, plain).is_none());
    }

    #[test]
    fn ssh_uses_the_configured_key_or_the_agent() {
        let key = tempfile::NamedTempFile::new().unwrap();
        let c = Credentials {
            token: None,
            ssh_key: Some(key.path().to_path_buf()),
        };
        let ssh = git2::CredentialType::SSH_KEY;
        assert!(matches!(
            c.answer(
                "ssh://git@host/repo",
                "ssh://git@host/repo",
                Some("git"),
                ssh
            ),
            Some(Ok(_))
        ));
        assert!(
            Credentials::default()
                .answer(
                    "git@host:org/repo.git",
                    "git@host:org/repo.git",
                    Some("git"),
                    ssh
                )
                .is_some()
        );
    }
}
