//! Signed commits (`--require-signed head|all` with `--allowed-signers FILE`): a commit is served
//! only if it carries an SSH signature (`sshsig`, what git writes with `gpg.format ssh`) that
//! verifies against git's allowed-signers file format (`gpg.ssh.allowedSignersFile`).
//!
//! The check follows what `git verify-commit` does with `ssh-keygen -Y find-principals` and
//! `-Y verify -n git`: the signature's namespace must be `git`; its key must be listed on a line
//! whose `namespaces` (if any) allow `git` and whose `valid-after` / `valid-before` (if any) hold
//! at the commit's committer time (git passes that time as `-Overify-time`); the principals of
//! that line are the signer. Timestamps without a `Z` suffix are read as UTC (ssh-keygen reads
//! them in its local time zone). `cert-authority` lines (SSH certificates) and OpenPGP or X.509
//! signatures are not supported: such a commit is refused as a bad signature, never served.
//!
//! The policy comes from start-up flags only: nothing in the repository can switch it off.
//! This module only reads the repository.

use std::path::{Path, PathBuf};

use git2::{Oid, Repository};
use ssh_key::public::KeyData;
use ssh_key::{HashAlg, PublicKey, SshSig};

/// Which commits must be signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignedMode {
    /// The commit to serve.
    Head,
    /// Every commit between the last served one and the commit to serve.
    All,
}

/// `--require-signed` with `--allowed-signers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SigningPolicy {
    pub mode: SignedMode,
    /// Read again at every check, so keys can be rotated without a restart.
    pub allowed_signers: PathBuf,
}

/// Why a commit is refused: the `/status` reason codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    Unsigned,
    BadSignature,
}

impl RefusalReason {
    pub fn code(self) -> &'static str {
        match self {
            RefusalReason::Unsigned => "unsigned-commit",
            RefusalReason::BadSignature => "bad-signature",
        }
    }
}

/// A commit that must not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub reason: RefusalReason,
    /// The commit whose signature failed (in `all` mode, possibly one before the head).
    pub commit: String,
    /// The allowed-signers principals of the key that signed it, when that key is listed.
    pub principal: Option<String>,
    pub message: String,
}

impl Refusal {
    /// As a diagnostic: located nowhere, coded `unsigned-commit` or `bad-signature`.
    pub fn to_diagnostic(&self) -> crate::config::Diagnostic {
        crate::config::Diagnostic::error(self.reason.code(), self.message.clone()).help(
            "sign commits with an SSH key listed in the allowed signers file \
             (`git config gpg.format ssh`, `git config user.signingkey KEY`, `git commit -S`)",
        )
    }
}

/// The allowed-signers file cannot be used: nothing can be verified, so nothing is served.
#[derive(Debug, thiserror::Error)]
pub enum SignersError {
    #[error("allowed signers file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("allowed signers file {path}:{line}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("allowed signers file {0} lists no key")]
    Empty(PathBuf),
    #[error("checking signatures: {0}")]
    Git(#[from] git2::Error),
}

/// One line of an allowed-signers file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Signer {
    line: usize,
    /// As written: a comma-separated pattern list (`*` and `?` wildcards, `!` negation).
    principals: String,
    namespaces: Option<String>,
    valid_after: Option<i64>,
    valid_before: Option<i64>,
    cert_authority: bool,
    key: KeyData,
}

/// A parsed allowed-signers file (`ssh-keygen(1)`, ALLOWED SIGNERS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedSigners {
    signers: Vec<Signer>,
}

impl AllowedSigners {
    pub fn load(path: &Path) -> Result<AllowedSigners, SignersError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignersError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let signers = Self::parse(&text).map_err(|(line, message)| SignersError::Parse {
            path: path.to_path_buf(),
            line,
            message,
        })?;
        if signers.signers.is_empty() {
            return Err(SignersError::Empty(path.to_path_buf()));
        }
        Ok(signers)
    }

    /// Parses the file's text; `Err((line, why))` for the first line that is not understood
    /// (a half-understood line could trust a key for more than it was meant to).
    pub fn parse(text: &str) -> Result<AllowedSigners, (usize, String)> {
        let mut signers = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut signer = parse_line(line).map_err(|why| (i + 1, why))?;
            signer.line = i + 1;
            signers.push(signer);
        }
        Ok(AllowedSigners { signers })
    }
}

/// `principals [options] keytype base64 [comment]`
fn parse_line(line: &str) -> Result<Signer, String> {
    let (principals, rest) = field(line)?;
    let rest = rest.trim_start();
    // Options are present when the next field is not a key type.
    let (options, rest) = match PublicKey::from_openssh(rest) {
        Ok(_) => ("", rest),
        Err(_) => {
            let (opts, rest) = field(rest)?;
            (opts, rest.trim_start())
        }
    };
    let key = PublicKey::from_openssh(rest)
        .map_err(|e| format!("no valid public key after the principals and options ({e})"))?;
    let mut signer = Signer {
        line: 0,
        principals: principals.to_owned(),
        namespaces: None,
        valid_after: None,
        valid_before: None,
        cert_authority: false,
        key: key.key_data().clone(),
    };
    for opt in split_options(options)? {
        let (name, value) = match opt.split_once('=') {
            Some((n, v)) => (n, Some(unquote(v)?)),
            None => (opt, None),
        };
        match (name.to_ascii_lowercase().as_str(), value) {
            ("cert-authority", None) => signer.cert_authority = true,
            ("namespaces", Some(v)) => signer.namespaces = Some(v),
            ("valid-after", Some(v)) => signer.valid_after = Some(parse_time(&v)?),
            ("valid-before", Some(v)) => signer.valid_before = Some(parse_time(&v)?),
            _ => return Err(format!("unknown option `{opt}`")),
        }
    }
    Ok(signer)
}

/// The first whitespace-delimited field, which may be double-quoted.
fn field(s: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = s.strip_prefix('"') {
        let end = rest.find('"').ok_or("unterminated quote")?;
        return Ok((&rest[..end], &rest[end + 1..]));
    }
    // Options may hold quoted values with spaces: a field ends at whitespace outside quotes.
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => return Ok((&s[..i], &s[i..])),
            _ => {}
        }
    }
    Err("the line ends after its first field: expected principals, options and a key".into())
}

/// Splits `a,b="x,y",c` at the commas outside quotes.
fn split_options(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if quoted {
        return Err("unterminated quote in the options".into());
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    Ok(out.into_iter().filter(|o| !o.is_empty()).collect())
}

fn unquote(v: &str) -> Result<String, String> {
    match v.strip_prefix('"') {
        Some(inner) => inner
            .strip_suffix('"')
            .map(str::to_owned)
            .ok_or_else(|| format!("unterminated quote in `{v}`")),
        None => Ok(v.to_owned()),
    }
}

/// `YYYYMMDD`, `YYYYMMDDHHMM` or `YYYYMMDDHHMMSS`, optionally followed by `Z` (or `UTC`), as
/// unix seconds. Without a suffix ssh-keygen uses its local zone; a gateway reads UTC.
fn parse_time(s: &str) -> Result<i64, String> {
    let bad = || format!("`{s}` is not a time (YYYYMMDD[HHMM[SS]][Z])");
    let digits = s
        .strip_suffix('Z')
        .or_else(|| s.strip_suffix("UTC"))
        .unwrap_or(s);
    if !digits.bytes().all(|b| b.is_ascii_digit()) || ![8, 12, 14].contains(&digits.len()) {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| digits.get(r).and_then(|d| d.parse::<u32>().ok());
    let part = |r: std::ops::Range<usize>| num(r).unwrap_or(0);
    let year = num(0..4).ok_or_else(bad)? as i32;
    let month = time::Month::try_from(part(4..6) as u8).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(year, month, part(6..8) as u8).map_err(|_| bad())?;
    let clock = time::Time::from_hms(part(8..10) as u8, part(10..12) as u8, part(12..14) as u8)
        .map_err(|_| bad())?;
    Ok(time::PrimitiveDateTime::new(date, clock)
        .assume_utc()
        .unix_timestamp())
}

/// ssh's `match_pattern_list`: a comma-separated list of patterns, `!` negating; a negated
/// match refuses outright.
fn matches_pattern_list(s: &str, list: &str) -> bool {
    let mut matched = false;
    for pat in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match pat.strip_prefix('!') {
            Some(neg) if glob(s, neg) => return false,
            Some(_) => {}
            None if glob(s, pat) => matched = true,
            None => {}
        }
    }
    matched
}

/// `*` and `?` wildcards.
fn glob(s: &str, pat: &str) -> bool {
    let (s, p): (Vec<char>, Vec<char>) = (s.chars().collect(), pat.chars().collect());
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while i < s.len() {
        if j < p.len() && (p[j] == '?' || p[j] == s[i]) {
            i += 1;
            j += 1;
        } else if j < p.len() && p[j] == '*' {
            star = Some(j);
            mark = i;
            j += 1;
        } else if let Some(st) = star {
            j = st + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    p[j..].iter().all(|c| *c == '*')
}

fn short(oid: Oid) -> String {
    oid.to_string().chars().take(12).collect()
}

fn format_time(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .map(|d| {
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                d.year(),
                u8::from(d.month()),
                d.day(),
                d.hour(),
                d.minute(),
                d.second()
            )
        })
        .unwrap_or_else(|_| t.to_string())
}

/// Checks the signature of one commit; `Ok` with the signer's principals.
pub fn verify_commit(
    repo: &Repository,
    oid: Oid,
    signers: &AllowedSigners,
) -> Result<Result<String, Refusal>, SignersError> {
    let refuse = |reason, principal: Option<&str>, message: String| {
        Ok(Err(Refusal {
            reason,
            commit: oid.to_string(),
            principal: principal.map(str::to_owned),
            message,
        }))
    };
    let commit = repo.find_commit(oid)?;
    let (signature, signed) = match repo.extract_signature(&oid, None) {
        Ok(s) => s,
        Err(e) if e.code() == git2::ErrorCode::NotFound => {
            return refuse(
                RefusalReason::Unsigned,
                None,
                format!("commit {} is not signed; refusing to serve it", short(oid)),
            );
        }
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8_lossy(&signature);
    if !text
        .trim_start()
        .starts_with("-----BEGIN SSH SIGNATURE-----")
    {
        let kind = if text.contains("BEGIN PGP SIGNATURE") {
            "an OpenPGP"
        } else if text.contains("BEGIN SIGNED MESSAGE") {
            "an X.509"
        } else {
            "an unrecognised"
        };
        return refuse(
            RefusalReason::BadSignature,
            None,
            format!(
                "commit {} carries {kind} signature; only SSH signatures (`gpg.format ssh`) are \
                 verified, so it is not served",
                short(oid)
            ),
        );
    }
    let sig = match SshSig::from_pem(text.trim().as_bytes()) {
        Ok(s) => s,
        Err(e) => {
            return refuse(
                RefusalReason::BadSignature,
                None,
                format!(
                    "commit {}: the SSH signature cannot be read ({e})",
                    short(oid)
                ),
            );
        }
    };
    let key = sig.public_key();
    let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
    let listed: Vec<&Signer> = signers
        .signers
        .iter()
        .filter(|s| !s.cert_authority && s.key == *key)
        .collect();
    let Some(first) = listed.first() else {
        return refuse(
            RefusalReason::BadSignature,
            None,
            format!(
                "commit {} is signed by key {fingerprint}, which is not in the allowed signers \
                 file",
                short(oid)
            ),
        );
    };
    if let Err(e) = PublicKey::from(key.clone()).verify("git", &signed, &sig) {
        let why = match e {
            ssh_key::Error::Namespace => format!(
                "is for namespace `{}`, not `git`",
                sig.namespace().escape_debug()
            ),
            _ => "does not match the commit's content".to_owned(),
        };
        return refuse(
            RefusalReason::BadSignature,
            Some(&first.principals),
            format!(
                "commit {}: the signature by {} ({fingerprint}) {why}",
                short(oid),
                first.principals
            ),
        );
    }
    // git checks the key's window at the committer time (`-Overify-time`).
    let at = commit.committer().when().seconds();
    let mut why_not = Vec::new();
    for s in &listed {
        if let Some(ns) = &s.namespaces
            && !matches_pattern_list("git", ns)
        {
            why_not.push(format!(
                "line {}: namespaces=\"{ns}\" does not include git",
                s.line
            ));
            continue;
        }
        if let Some(after) = s.valid_after
            && at < after
        {
            why_not.push(format!(
                "line {}: the key is valid only after {}, the commit was made at {}",
                s.line,
                format_time(after),
                format_time(at)
            ));
            continue;
        }
        if let Some(before) = s.valid_before
            && at > before
        {
            why_not.push(format!(
                "line {}: the key is valid only before {}, the commit was made at {}",
                s.line,
                format_time(before),
                format_time(at)
            ));
            continue;
        }
        return Ok(Ok(s.principals.clone()));
    }
    refuse(
        RefusalReason::BadSignature,
        Some(&first.principals),
        format!(
            "commit {} is signed by {} ({fingerprint}), but the allowed signers file does not \
             allow it for this commit: {}",
            short(oid),
            first.principals,
            why_not.join("; ")
        ),
    )
}

/// Checks what `policy` requires before `head` may be served: `head` alone, or (mode `all`)
/// every commit reachable from `head` and not from `since`, the last served commit. Without a
/// usable `since` (nothing served yet), `all` checks `head` alone. `Ok(Ok(principal))` names
/// the signer of `head`.
pub fn check(
    repo: &Repository,
    head: Oid,
    since: Option<Oid>,
    policy: &SigningPolicy,
) -> Result<Result<String, Refusal>, SignersError> {
    let signers = AllowedSigners::load(&policy.allowed_signers)?;
    let since = since.filter(|s| repo.find_commit(*s).is_ok());
    if policy.mode == SignedMode::All
        && let Some(since) = since
    {
        let mut walk = repo.revwalk()?;
        walk.set_sorting(git2::Sort::TOPOLOGICAL)?;
        walk.push(head)?;
        walk.hide(since)?;
        for oid in walk {
            let oid = oid?;
            if oid == head {
                continue;
            }
            if let Err(mut r) = verify_commit(repo, oid, &signers)? {
                r.message = format!(
                    "{} (it is between the served commit {} and the new head {}, and \
                     --require-signed all needs each one signed)",
                    r.message,
                    short(since),
                    short(head)
                );
                return Ok(Err(r));
            }
        }
    }
    verify_commit(repo, head, &signers)
}

/// `validate --require-signed`: checks `HEAD` of the git working copy holding `dir` (and, in
/// `all` mode, every commit since `base`).
pub fn check_working_copy(
    dir: &Path,
    base: Option<&str>,
    policy: &SigningPolicy,
) -> Result<Result<String, Refusal>, CheckError> {
    let repo = Repository::discover(dir).map_err(|e| CheckError::NotARepo {
        dir: dir.to_path_buf(),
        source: e,
    })?;
    let head = repo
        .head()
        .and_then(|h| h.peel_to_commit())
        .map_err(|e| CheckError::NotARepo {
            dir: dir.to_path_buf(),
            source: e,
        })?
        .id();
    let since = match base {
        Some(rev) => Some(
            super::git::resolve(&repo, rev).map_err(|_| CheckError::UnknownBase(rev.to_owned()))?,
        ),
        None => None,
    };
    Ok(check(&repo, head, since, policy)?)
}

/// Why `validate --require-signed` could not check anything.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("{dir} is not inside a git working copy with a commit checked out: {source}")]
    NotARepo {
        dir: PathBuf,
        #[source]
        source: git2::Error,
    },
    #[error("--base `{0}` names no commit")]
    UnknownBase(String),
    #[error(transparent)]
    Signers(#[from] SignersError),
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINmT9l1eU5ttJxACcOn9YrsZ6YT3pZEtsF6y4LoqaO4l";

    #[test]
    fn lines_with_and_without_options() {
        let text = format!(
            "# team\n\nalice@example.com {KEY} alice\n\
             \"bob@example.com,carol@*\" namespaces=\"git,file\",valid-after=\"20240101\",valid-before=20250101120000Z {KEY}\n"
        );
        let s = AllowedSigners::parse(&text).unwrap();
        assert_eq!(s.signers.len(), 2);
        assert_eq!(s.signers[0].principals, "alice@example.com");
        assert_eq!(s.signers[0].namespaces, None);
        let b = &s.signers[1];
        assert_eq!(b.principals, "bob@example.com,carol@*");
        assert_eq!(b.namespaces.as_deref(), Some("git,file"));
        assert_eq!(b.valid_after, Some(1_704_067_200));
        assert_eq!(b.valid_before, Some(1_735_732_800));
    }

    #[test]
    fn lines_not_understood_are_refused_with_their_number() {
        for bad in [
            "alice@example.com",
            "alice@example.com ssh-ed25519 notbase64",
            &format!("alice@example.com bogus-option {KEY}"),
            &format!("alice@example.com valid-before=\"2024\" {KEY}"),
            &format!("alice@example.com namespaces=\"git {KEY}"),
        ] {
            let text = format!("# c\n{bad}\n");
            let err = AllowedSigners::parse(&text).unwrap_err();
            assert_eq!(err.0, 2, "{bad}: {}", err.1);
        }
    }

    #[test]
    fn times_read_like_ssh_keygen() {
        assert_eq!(parse_time("19700102").unwrap(), 86_400);
        assert_eq!(parse_time("197001020001").unwrap(), 86_460);
        assert_eq!(parse_time("19700102000001Z").unwrap(), 86_401);
        assert_eq!(parse_time("19700102000001UTC").unwrap(), 86_401);
        for bad in [
            "1970010",
            "19701302",
            "19700132",
            "197001022500",
            "x9700102",
        ] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pattern_lists_match_like_ssh() {
        assert!(matches_pattern_list("git", "git"));
        assert!(matches_pattern_list("git", "file,git"));
        assert!(matches_pattern_list("git", "g*"));
        assert!(matches_pattern_list("git", "g?t"));
        assert!(!matches_pattern_list("git", "file"));
        assert!(!matches_pattern_list("git", "*,!git"));
        assert!(!matches_pattern_list("git", ""));
    }
}
