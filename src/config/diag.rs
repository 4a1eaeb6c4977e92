//! Diagnostics: what is wrong (or suspicious) in a config repo, and exactly where.
//!
//! Every check in the loader and the compiler reports through [`Diagnostics`]; nothing stops at
//! the first problem. Rendering is rustc-like for people and JSON for tools.
//!
//! Names, values and messages come from the config repo, whose author may not be whoever reads
//! the output: every rendering for people and CI runners prints them [`printable`].

mod view;

use std::borrow::Cow;
use std::ops::Range;

use codespan_reporting::diagnostic as cs;
use codespan_reporting::files::{Files, SimpleFiles};
use codespan_reporting::term;
use serde::Serialize;

/// Index of a file in [`SourceFiles`].
pub type FileId = usize;

/// The text of every file read from the config repo, by repo-relative path.
#[derive(Default)]
pub struct SourceFiles {
    files: SimpleFiles<String, String>,
    count: usize,
}

impl SourceFiles {
    pub fn add(&mut self, name: impl Into<String>, source: impl Into<String>) -> FileId {
        self.count += 1;
        self.files.add(name.into(), source.into())
    }

    /// Number of files; ids are `0..len()`.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn name(&self, id: FileId) -> &str {
        self.files
            .get(id)
            .map(|f| f.name().as_str())
            .unwrap_or("<unknown>")
    }

    pub fn source(&self, id: FileId) -> &str {
        self.files
            .get(id)
            .map(|f| f.source().as_str())
            .unwrap_or("")
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, id: FileId, offset: usize) -> (usize, usize) {
        self.files
            .location(id, offset)
            .map(|l| (l.line_number, l.column_number))
            .unwrap_or((1, 1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A place in a file, with what to say about it.
#[derive(Debug, Clone)]
pub struct Label {
    pub file: FileId,
    pub span: Range<usize>,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub severity: Severity,
    /// Stable machine-readable code, e.g. `unknown-upstream`.
    pub code: &'static str,
    pub message: String,
    /// Where the problem is. `None` only for problems with no file (an unreadable directory).
    pub primary: Option<Label>,
    /// Other places that explain it (the first definition of a duplicate name, ...).
    pub secondary: Vec<Label>,
    pub help: Vec<String>,
    /// The text it points at holds a secret (a literal the compiler refuses, credentials in a
    /// URL): the source line is never shown, by any rendering (see [`Diagnostic::hides_source`]).
    pub secret: bool,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            code,
            message: message.into(),
            primary: None,
            secondary: Vec::new(),
            help: Vec::new(),
            secret: false,
        }
    }

    /// Marks the text it points at as a secret (see [`Diagnostic::secret`]).
    pub fn secret(mut self) -> Self {
        self.secret = true;
        self
    }

    /// Whether the source line it points at must not be shown: it holds a secret. Every
    /// `inline-secret` does (its place is the literal). The file, line and column are still
    /// given, so the author finds it.
    pub fn hides_source(&self) -> bool {
        self.secret || self.code == "inline-secret"
    }

    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(code, message)
        }
    }

    pub fn at(mut self, file: FileId, span: Range<usize>, message: impl Into<String>) -> Self {
        self.primary = Some(Label {
            file,
            span,
            message: message.into(),
        });
        self
    }

    pub fn also(mut self, file: FileId, span: Range<usize>, message: impl Into<String>) -> Self {
        self.secondary.push(Label {
            file,
            span,
            message: message.into(),
        });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help.push(help.into());
        self
    }
}

/// Diagnostics in the order they were found.
#[derive(Debug, Default, Clone)]
pub struct Diagnostics {
    items: Vec<Diagnostic>,
    /// How many of them are errors: the compiler asks after each route whether it added one,
    /// and counting them each time made a repo with 80,000 errors take 6 s (quadratic).
    errors: usize,
}

/// One diagnostic flattened for `--format json`.
#[derive(Debug, Serialize)]
pub struct JsonDiagnostic<'a> {
    pub severity: Severity,
    pub code: &'a str,
    pub message: &'a str,
    pub file: Option<&'a str>,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub help: &'a [String],
}

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.errors += usize::from(d.severity == Severity::Error);
        self.items.push(d);
    }

    pub fn extend(&mut self, other: Diagnostics) {
        self.errors += other.errors;
        self.items.extend(other.items);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.items.iter()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn error_count(&self) -> usize {
        self.errors
    }

    pub fn warning_count(&self) -> usize {
        self.items
            .iter()
            .filter(|d| d.severity == Severity::Warning)
            .count()
    }

    pub fn has_errors(&self) -> bool {
        self.error_count() > 0
    }

    /// Turns every warning into an error (`--deny-warnings`).
    pub fn deny_warnings(&mut self) {
        for d in &mut self.items {
            d.severity = Severity::Error;
        }
        self.errors = self.items.len();
    }

    /// rustc-style text: header, location, snippet, help.
    pub fn render_human(&self, files: &SourceFiles) -> String {
        let config = term::Config::default();
        let mut out = String::new();
        for d in &self.items {
            if d.hides_source() {
                out.push_str(&render_without_source(d, files));
                continue;
            }
            let spans: Vec<(FileId, Range<usize>)> =
                labels(d).map(|l| (l.file, l.span.clone())).collect();
            let rendered = view::View::new(files, &spans, &config)
                .and_then(|(view, moved)| {
                    term::emit_into_string(&config, &view, &to_codespan(d, moved)).ok()
                })
                .unwrap_or_else(|| {
                    format!("{}: {}\n", severity_word(d.severity), printable(&d.message))
                });
            out.push_str(&rendered);
        }
        out
    }

    /// One line each: `file:line:col: severity[code]: message`.
    pub fn render_short(&self, files: &SourceFiles) -> String {
        let mut out = String::new();
        for d in &self.items {
            if let Some(p) = &d.primary {
                let (line, col) = files.line_col(p.file, p.span.start);
                let name = printable(files.name(p.file));
                out.push_str(&format!("{}:{line}:{col}: ", line_start_safe(&name)));
            }
            out.push_str(&format!(
                "{}[{}]: {}\n",
                severity_word(d.severity),
                d.code,
                printable(&d.message)
            ));
        }
        out
    }

    /// GitHub Actions workflow commands, one per diagnostic
    /// (`::error file=F,line=L,col=C,endLine=..,endColumn=..,title=..::message`), which the runner
    /// shows as annotations on the pull request's diff. `dir` is the config repo's directory
    /// relative to the workspace root, prefixed to each file name so the annotation finds its
    /// file. The message carries the label and the help lines too. What the config repo wrote
    /// is [`printable`] first: the runner unescapes `%0A` into a line break, and prints the
    /// rest as it is.
    pub fn render_github(&self, files: &SourceFiles, dir: &std::path::Path) -> String {
        let mut out = String::new();
        for d in &self.items {
            out.push_str("::");
            out.push_str(severity_word(d.severity));
            let mut props = Vec::new();
            let mut text = printable(&d.message).into_owned();
            if let Some(p) = &d.primary {
                let name = dir.join(files.name(p.file));
                let (line, col) = files.line_col(p.file, p.span.start);
                let (end_line, end_col) = files.line_col(p.file, p.span.end);
                props.push(format!(
                    "file={}",
                    escape_property(&printable(&name.to_string_lossy()))
                ));
                props.push(format!("line={line}"));
                props.push(format!("col={col}"));
                props.push(format!("endLine={end_line}"));
                if end_line == line && end_col > col {
                    props.push(format!("endColumn={end_col}"));
                }
                if !p.message.is_empty() {
                    text.push_str(&format!(
                        "\n{}: {}",
                        severity_word(d.severity),
                        printable(&p.message)
                    ));
                }
            }
            props.push(format!(
                "title={}",
                escape_property(&format!("rustygate validate: {}", d.code))
            ));
            for s in &d.secondary {
                let (line, col) = files.line_col(s.file, s.span.start);
                text.push_str(&format!(
                    "\nnote: {}:{line}:{col}: {}",
                    printable(&dir.join(files.name(s.file)).to_string_lossy()),
                    printable(&s.message)
                ));
            }
            for h in &d.help {
                text.push_str(&format!("\nhelp: {}", printable(h)));
            }
            out.push(' ');
            out.push_str(&props.join(","));
            out.push_str("::");
            out.push_str(&escape_data(&text));
            out.push('\n');
        }
        out
    }

    pub fn to_json<'a>(&'a self, files: &'a SourceFiles) -> Vec<JsonDiagnostic<'a>> {
        self.items.iter().map(|d| json_of(d, files)).collect()
    }
}

/// [`Diagnostics::render_human`] of a diagnostic whose source line holds a secret: the header,
/// the place and the label, no source text.
fn render_without_source(d: &Diagnostic, files: &SourceFiles) -> String {
    let mut out = format!(
        "{}[{}]: {}\n",
        severity_word(d.severity),
        d.code,
        printable(&d.message)
    );
    for (i, l) in labels(d).enumerate() {
        let (line, col) = files.line_col(l.file, l.span.start);
        out.push_str(&format!(
            "  {} {}:{line}:{col}: {} (line not shown: it holds a secret)\n",
            if i == 0 { "-->" } else { ":::" },
            printable(files.name(l.file)),
            printable(&l.message)
        ));
    }
    for h in &d.help {
        out.push_str(&format!("  = help: {}\n", printable(h)));
    }
    out.push('\n');
    out
}

fn json_of<'a>(d: &'a Diagnostic, files: &'a SourceFiles) -> JsonDiagnostic<'a> {
    let loc = d.primary.as_ref().map(|p| {
        let (line, col) = files.line_col(p.file, p.span.start);
        (files.name(p.file), line, col)
    });
    JsonDiagnostic {
        severity: d.severity,
        code: d.code,
        message: &d.message,
        file: loc.map(|l| l.0),
        line: loc.map(|l| l.1),
        column: loc.map(|l| l.2),
        help: &d.help,
    }
}

impl Diagnostics {
    /// [`Diagnostics::to_json`] plus, for each located diagnostic, `snippet` (the line it
    /// points at; a line longer than 200 characters cut to 200 around the place, `…` where
    /// cut, as `validate` shows it), `snippet_column` (the 1-based character of `snippet` the
    /// place is at: where the caret goes) and `label` (what is said at that place): what the
    /// status endpoint and the dashboard show of a rejected commit.
    pub fn to_json_with_snippets(&self, files: &SourceFiles) -> Vec<serde_json::Value> {
        self.to_json_with_snippets_first(files, usize::MAX)
    }

    /// [`Diagnostics::to_json_with_snippets`] of the first `n` diagnostics only (the others
    /// are not even rendered): what a status record keeps of a version with thousands.
    pub fn to_json_with_snippets_first(
        &self,
        files: &SourceFiles,
        n: usize,
    ) -> Vec<serde_json::Value> {
        self.items
            .iter()
            .take(n)
            .map(|d| {
                let json = json_of(d, files);
                let mut v = serde_json::to_value(&json).unwrap_or_default();
                if let (Some(p), Some(obj)) = (&d.primary, v.as_object_mut()) {
                    obj.insert("label".into(), p.message.clone().into());
                    if d.hides_source() {
                        return v;
                    }
                    let (text, column) = view::line_around(files, p.file, p.span.start);
                    obj.insert("snippet".into(), text.into());
                    obj.insert("snippet_column".into(), column.into());
                }
                v
            })
            .collect()
    }
}

impl IntoIterator for Diagnostics {
    type Item = Diagnostic;
    type IntoIter = std::vec::IntoIter<Diagnostic>;
    fn into_iter(self) -> Self::IntoIter {
        self.items.into_iter()
    }
}

/// `s` as it is safe to print: control characters (line breaks, escape sequences) and the
/// characters that reorder or break lines on screen shown as Rust escapes (`\n`, `\u{1b}`).
/// Names, values and messages from a config repo are printed to terminals and CI logs, where a
/// raw escape sequence rewrites the screen and a line break could start a line that the runner
/// reads as a command of its own (`::error::`, `::add-mask::`).
///
/// GitHub's runner also takes `##[command]` for a command *anywhere* in a line (its older
/// syntax: `ActionCommand.TryParse` looks for `##[` with `IndexOf`; only `::` commands must
/// begin the line). `##[set-output name=x;]v` in a test's name would set a step's output, so
/// the `[` after `##` is escaped too (`##\u{5b}`). A name at the start of a line needs
/// [`line_start_safe`] besides.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(unprintable) && !s.contains("##[") {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        push_printable(&mut out, c);
    }
    Cow::Owned(out)
}

fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{2028}'
                | '\u{2029}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
        )
}

fn push_printable(out: &mut String, c: char) {
    match c {
        '\n' | '\r' | '\t' | '\0' => out.extend(c.escape_debug()),
        c if unprintable(c) => out.extend(c.escape_unicode()),
        '[' if out.ends_with("##") => out.extend(c.escape_unicode()),
        c => out.push(c),
    }
}

/// Printable text `s` as it is safe at the start of a line: GitHub's runner trims a line's
/// leading white space (.NET's `TrimStart()`: any Unicode white space, such as U+00A0 or
/// U+3000, which [`printable`] leaves as they are) and reads what then begins with `::` as a
/// workflow command. The first `:` of such a start is escaped (`\u{3a}`).
pub fn line_start_safe(s: &str) -> Cow<'_, str> {
    let rest = s.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{180e}');
    if !rest.starts_with("::") {
        return Cow::Borrowed(s);
    }
    let at = s.len() - rest.len();
    Cow::Owned(format!("{}\\u{{3a}}{}", &s[..at], &rest[1..]))
}

/// A command's whole output (any format) with every `##[` broken (`##\u005b`), the last guard
/// against GitHub's runner reading a command in the middle of a line ([`printable`]). In JSON
/// `\u005b` is the same `[` (and `#` only occurs in strings), so a parser reads the same
/// values; in text and Markdown it shows as an escape.
pub fn without_runner_commands(s: &str) -> Cow<'_, str> {
    if s.contains("##[") {
        Cow::Owned(s.replace("##[", "##\\u005b"))
    } else {
        Cow::Borrowed(s)
    }
}

/// A diagnostic's labels, the primary first.
fn labels(d: &Diagnostic) -> impl Iterator<Item = &Label> {
    d.primary.iter().chain(&d.secondary)
}

/// A workflow command's message: `%`, CR and LF are escaped, the runner unescapes them.
fn escape_data(s: &str) -> String {
    s.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// A workflow command's property value: like [`escape_data`], and `:` and `,` too.
fn escape_property(s: &str) -> String {
    escape_data(s).replace(':', "%3A").replace(',', "%2C")
}

fn severity_word(s: Severity) -> &'static str {
    match s {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

/// `d` for codespan, its labels at `spans` (in [`labels`] order, moved into a view).
fn to_codespan(d: &Diagnostic, spans: Vec<Range<usize>>) -> cs::Diagnostic<FileId> {
    let base = match d.severity {
        Severity::Error => cs::Diagnostic::error(),
        Severity::Warning => cs::Diagnostic::warning(),
    };
    let labels = labels(d)
        .zip(spans)
        .enumerate()
        .map(|(i, (l, span))| {
            let label = if i == 0 && d.primary.is_some() {
                cs::Label::primary(l.file, span)
            } else {
                cs::Label::secondary(l.file, span)
            };
            label.with_message(printable(&l.message))
        })
        .collect();
    base.with_code(d.code)
        .with_message(printable(&d.message))
        .with_labels(labels)
        .with_notes(
            d.help
                .iter()
                .map(|h| format!("help: {}", printable(h)))
                .collect(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kept error count follows pushes, merges and `--deny-warnings`.
    #[test]
    fn the_error_count_is_kept_through_every_change() {
        let mut d = Diagnostics::default();
        d.push(Diagnostic::error("a", "one"));
        d.push(Diagnostic::warning("b", "two"));
        let mut more = Diagnostics::default();
        more.push(Diagnostic::error("c", "three"));
        more.push(Diagnostic::warning("d", "four"));
        d.extend(more);
        assert_eq!((d.error_count(), d.warning_count(), d.len()), (2, 2, 4));
        assert!(d.has_errors());
        d.deny_warnings();
        assert_eq!((d.error_count(), d.warning_count()), (4, 0));
        assert!(!Diagnostics::default().has_errors());
    }

    #[test]
    fn github_commands_escape_what_the_runner_would_split_on() {
        let mut files = SourceFiles::default();
        let f = files.add("routes/a,b:c.toml", "name = \"100%\"\n");
        let mut ds = Diagnostics::default();
        ds.push(
            Diagnostic::error("bad", "line one\nline two 100%")
                .at(f, 7..13, "here")
                .help("fix it, then: retry"),
        );
        ds.push(Diagnostic::warning("unplaced", "no file"));
        let out = ds.render_github(&files, std::path::Path::new("gw"));
        assert_eq!(
            out,
            "::error file=gw/routes/a%2Cb%3Ac.toml,line=1,col=8,endLine=1,endColumn=14,\
             title=rustygate validate%3A bad::line one\\nline two 100%25%0Aerror: here\
             %0Ahelp: fix it, then: retry\n\
             ::warning title=rustygate validate%3A unplaced::no file\n"
        );
    }

    #[test]
    fn json_with_snippets_carries_the_line_pointed_at_cut_to_200_characters() {
        let mut files = SourceFiles::default();
        let long = "x".repeat(290);
        let f = files.add(
            "routes/a.toml",
            format!("[[route]]\r\nupstream = \"order\"\n{long}\n"),
        );
        let mut ds = Diagnostics::default();
        ds.push(
            Diagnostic::error("unknown-upstream", "unknown upstream `order`").at(
                f,
                22..29,
                "no such upstream",
            ),
        );
        ds.push(Diagnostic::error("long", "long line").at(f, 31..32, "here"));
        ds.push(Diagnostic::warning("unplaced", "no file"));
        let json = ds.to_json_with_snippets(&files);
        assert_eq!(json[0]["line"], 2);
        assert_eq!(json[0]["column"], 12);
        assert_eq!(json[0]["snippet"], "upstream = \"order\"");
        assert_eq!(json[0]["label"], "no such upstream");
        assert_eq!(json[1]["snippet"], format!("{}…", "x".repeat(200)));
        assert_eq!(json[1]["snippet_column"], 2);
        assert!(json[2].get("snippet").is_none());
        assert_eq!(json[2]["code"], "unplaced");
    }

    /// GitHub's runner reads `##[command]` anywhere in a line and `::command::` after the line's
    /// leading white space (any Unicode white space). Names and lines from the config repo get
    /// neither into the human or short renderings. Before, `--format short` began a line with
    /// a policy file's name such as `\u{3000}::error::p.rhai`, and a snippet or message
    /// printed `##[error]` as written.
    #[test]
    fn renderings_carry_no_runner_command_from_the_config_repo() {
        let mut files = SourceFiles::default();
        let f = files.add(
            "\u{3000}\u{a0}::error::p.rhai",
            "let x = 1; // ##[set-output name=deploy;]yes\n",
        );
        let g = files.add("::warning::q.rhai", "x\n");
        let mut ds = Diagnostics::default();
        ds.push(Diagnostic::error("policy-syntax", "bad ##[error]here").at(
            f,
            4..5,
            "##[warning]w",
        ));
        ds.push(Diagnostic::error("policy-syntax", "bad").at(g, 0..1, "x"));
        for out in [ds.render_human(&files), ds.render_short(&files)] {
            for line in out.lines() {
                assert!(
                    !line.contains("##[") && !line.trim_start().starts_with("::"),
                    "{line:?} in:\n{out}"
                );
            }
        }
        let short = ds.render_short(&files);
        assert!(
            short.starts_with("\u{3000}\u{a0}\\u{3a}:error::p.rhai:1:5: error[policy-syntax]: bad ##\\u{5b}error]here\n"),
            "{short}"
        );
        assert!(short.contains("\n\\u{3a}:warning::q.rhai:1:1: "), "{short}");
        assert_eq!(
            without_runner_commands("{\"n\": \"##[error]x ###[y\"}"),
            "{\"n\": \"##\\u005berror]x ###\\u005by\"}"
        );
        assert_eq!(line_start_safe("a::b"), "a::b");
    }

    /// A single-line file with the place pointed at near its 5,000th character: the snippet is
    /// the window a rendered diagnostic shows around it, and `snippet_column` puts the caret
    /// under that character. Before, the snippet was the line's first 240 characters and the
    /// dashboard's caret, `column - 1` spaces in, pointed past its end.
    #[test]
    fn json_snippets_of_a_long_line_are_cut_around_the_place() {
        let mut files = SourceFiles::default();
        let before = format!("{}{}", "é".repeat(2_000), "a".repeat(2_999));
        let line = format!("{before}upstream = \"order\"{}", "z".repeat(5_000));
        let f = files.add("routes/one-line.toml", format!("{line}\n"));
        let at = line.find("\"order\"").unwrap_or_default();
        let mut ds = Diagnostics::default();
        ds.push(
            Diagnostic::error("unknown-upstream", "unknown upstream `order`").at(
                f,
                at..at + 7,
                "no such upstream",
            ),
        );
        let json = ds.to_json_with_snippets(&files);
        assert_eq!(json[0]["column"], 5_000 + "upstream = ".len());
        let snippet = json[0]["snippet"].as_str().unwrap_or_default();
        assert!(snippet.chars().count() <= 202, "{snippet}");
        assert!(
            snippet.starts_with('…') && snippet.ends_with('…'),
            "{snippet}"
        );
        let column = json[0]["snippet_column"].as_u64().unwrap_or_default();
        let under: String = snippet
            .chars()
            .skip(
                usize::try_from(column)
                    .unwrap_or_default()
                    .saturating_sub(1),
            )
            .take(7)
            .collect();
        assert_eq!(under, "\"order\"", "caret at {column} of {snippet}");
    }
}
