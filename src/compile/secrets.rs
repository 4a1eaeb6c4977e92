//! Resolving `{ env = "NAME" }` and `{ file = "/path" }` secret references.
//!
//! A config repo names where a secret lives, never the secret. Whoever can push to the repo must
//! not be able to use that to read what the gateway can read, so:
//! - `{ file = ... }` is an absolute path inside a secret root (`/run/secrets`,
//!   `/var/run/secrets`, `/etc/rustygate`, or one the operator adds with `--secret-root`), with
//!   symlinks followed, a regular file of at most 64 KiB ([`crate::config::files`]);
//! - `{ env = ... }` never names the gateway's own `RUSTYGATE_*` variables (admin token, webhook
//!   secret, git token): a route could otherwise forward them to an upstream as a header.
//!
//! Both rules are checked even when secrets are not read (`validate --no-env`), as far as they
//! can be without the secret's host: the spelling of the path, the name of the variable.

use std::ops::Range;
use std::path::Path;

use super::Cx;
use crate::config::files::{FileError, check_secret_path, read_secret};
use crate::config::raw::SecretRef;
use crate::config::{Diagnostic, FileId};

/// The prefix of every variable the gateway reads for itself.
const OWN_PREFIX: &str = "RUSTYGATE_";

/// The secret's text, or `None` after a located error. Without `resolve_secrets` the reference
/// is checked and an empty string stands in for the value.
pub(crate) fn resolve_secret(
    cx: &mut Cx<'_>,
    file: FileId,
    span: Range<usize>,
    secret: &SecretRef,
) -> Option<String> {
    let value = resolve(cx, file, span, secret)?;
    // A rotated secret is a new config version (the value is hashed, never kept).
    use sha2::Digest;
    let (kind, name) = match secret {
        SecretRef::Env(var) => ("env", var.as_str()),
        SecretRef::File(path) => ("file", path.as_str()),
    };
    for part in [kind.as_bytes(), name.as_bytes(), value.as_bytes()] {
        cx.secrets.update((part.len() as u64).to_le_bytes());
        cx.secrets.update(part);
    }
    Some(value)
}

fn resolve(
    cx: &mut Cx<'_>,
    file: FileId,
    span: Range<usize>,
    secret: &SecretRef,
) -> Option<String> {
    match secret {
        SecretRef::Env(var) => {
            if var
                .get(..OWN_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(OWN_PREFIX))
            {
                cx.push(
                    Diagnostic::error(
                        "forbidden-secret",
                        format!("`{var}` is one of the gateway's own variables and cannot be used as a secret"),
                    )
                    .at(file, span, "gateway variable")
                    .help("RUSTYGATE_* variables hold the admin token, the webhook secret and the git token; give the secret its own variable"),
                );
                return None;
            }
            if !cx.opts.resolve_secrets {
                return Some(String::new());
            }
            match std::env::var(var) {
                Ok(v) => Some(v),
                Err(_) => {
                    cx.push(
                        Diagnostic::error("missing-secret", format!("environment variable `{var}` is not set"))
                            .at(file, span, "secret not found")
                            .help(format!("set `{var}` in the gateway's environment, or run `rustygate validate --no-env` to skip secrets")),
                    );
                    None
                }
            }
        }
        SecretRef::File(path) => {
            let roots = &cx.opts.secret_roots;
            let read = if cx.opts.resolve_secrets {
                read_secret(Path::new(path), roots)
                    .map(|v| v.trim_end_matches(['\r', '\n']).to_owned())
            } else {
                check_secret_path(Path::new(path), roots).map(|()| String::new())
            };
            match read {
                Ok(v) => Some(v),
                Err(e) => {
                    let code = match e {
                        FileError::NotFound => "missing-secret",
                        _ => e.code(),
                    };
                    cx.push(
                        Diagnostic::error(code, format!("secret file `{path}` {e}"))
                            .at(file, span, e.label())
                            .help("secret files live under /run/secrets, /var/run/secrets or /etc/rustygate, or a directory given with `--secret-root`"),
                    );
                    None
                }
            }
        }
    }
}
