//! What a rendered diagnostic shows of the config repo's files: the names and the lines its
//! labels point at, made safe to print ([`printable`](super::printable)), so that neither a
//! terminal nor a CI runner takes a file's text or name for its own commands, and a line longer
//! than [`LINE_MAX_CHARS`] cut to that many characters around the place pointed at (`…` where
//! cut): a config of one 8 MiB line would put 8 MiB into a CI log with each diagnostic.
//!
//! codespan renders a diagnostic from a [`Files`]. Each diagnostic gets a [`View`] of its own
//! holding only the lines codespan may show of it, escaped and cut, with its labels moved to
//! match; a file with many diagnostics is not copied for each.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

use codespan_reporting::files::{Error, Files, Location};
use codespan_reporting::term;

use super::{FileId, SourceFiles, push_printable};

/// The most characters of a line a diagnostic shows.
pub(super) const LINE_MAX_CHARS: usize = 200;

/// Of those, how many come before the place pointed at when the line is cut there; a place
/// nearer the line's start is shown with the line from its start.
const CHARS_BEFORE: usize = 60;

/// The lines of the files one diagnostic points into.
pub(super) struct View {
    shown: Vec<Shown>,
}

/// What is shown of one file.
struct Shown {
    id: FileId,
    name: String,
    /// The lines shown, escaped, each followed by `\n`.
    text: String,
    /// Index of each line shown -> what of it is shown.
    lines: BTreeMap<usize, Copied>,
    /// The file's last line index: codespan asks for lines after a label until there are none.
    last_line: usize,
    /// Where in `text` each label starts, with its line and column in the file.
    starts: Vec<(usize, Location)>,
}

/// One line shown.
struct Copied {
    /// Its range in `text`, without the `\n`.
    range: Range<usize>,
    /// The bytes of the file it shows: the line without its break, or the part cut from it.
    from: Range<usize>,
    /// Whether a `…` stands for a part cut before them.
    cut_before: bool,
}

impl View {
    /// The view of `files` that labels at `spans` (file, byte range) need, and the spans moved
    /// into it; `None` when a span is not in its file.
    pub(super) fn new(
        files: &SourceFiles,
        spans: &[(FileId, Range<usize>)],
        config: &term::Config,
    ) -> Option<(View, Vec<Range<usize>>)> {
        let sf = &files.files;
        let mut wanted: BTreeMap<FileId, BTreeSet<usize>> = BTreeMap::new();
        // The place a line is cut around: the first label's start or end on it (the
        // primary's comes first).
        let mut anchors: BTreeMap<(FileId, usize), usize> = BTreeMap::new();
        for (file, span) in spans {
            let start = sf.line_index(*file, span.start).ok()?;
            let end = sf.line_index(*file, span.end).ok()?;
            anchors.entry((*file, start)).or_insert(span.start);
            anchors.entry((*file, end)).or_insert(span.end);
            let lines = wanted.entry(*file).or_default();
            // The lines codespan renders (its `RichDiagnostic::render`): the label's first
            // and last, the context it is configured to add, and the first lines of a
            // multi-line label and the last ones before its end.
            lines.extend(start.saturating_sub(config.before_label_lines)..=start);
            lines.extend(end..=end + config.after_label_lines);
            if end > start {
                lines.extend(start..=(start + config.start_context_lines).min(end));
                lines.extend(end.saturating_sub(config.end_context_lines).max(start)..=end);
            }
            // Also the line after each, which codespan shows when it is all that separates
            // two lines it renders.
            let after: Vec<usize> = lines.iter().map(|l| l + 1).collect();
            lines.extend(after);
        }
        let mut view = View {
            shown: Vec::with_capacity(wanted.len()),
        };
        for (id, lines) in wanted {
            view.shown.push(Shown::new(files, id, &lines, &anchors)?);
        }
        let mut moved = Vec::with_capacity(spans.len());
        for (file, span) in spans {
            let s = view.shown.iter_mut().find(|s| s.id == *file)?;
            let start = s.moved(files, span.start)?;
            let end = s.moved(files, span.end)?;
            // Where codespan's `┌─ file:line:col` points: the file's own line and column.
            let (line_number, column_number) = files.line_col(*file, span.start);
            s.starts.push((
                start,
                Location {
                    line_number,
                    column_number,
                },
            ));
            moved.push(start..end);
        }
        Some((view, moved))
    }

    fn get(&self, id: FileId) -> Result<&Shown, Error> {
        self.shown
            .iter()
            .find(|s| s.id == id)
            .ok_or(Error::FileMissing)
    }
}

impl Shown {
    /// `lines` of file `id`, escaped and cut around their `anchors` (those past its end
    /// skipped).
    fn new(
        files: &SourceFiles,
        id: FileId,
        lines: &BTreeSet<usize>,
        anchors: &BTreeMap<(FileId, usize), usize>,
    ) -> Option<Shown> {
        let sf = &files.files;
        let source = files.source(id);
        let last_line = sf.line_index(id, source.len()).ok()?;
        let mut s = Shown {
            id,
            name: super::printable(files.name(id)).into_owned(),
            text: String::new(),
            lines: BTreeMap::new(),
            last_line,
            starts: Vec::new(),
        };
        for &index in lines.iter().take_while(|&&l| l <= last_line) {
            let range = sf.line_range(id, index).ok()?;
            let content = source.get(range.clone())?.trim_end_matches(['\r', '\n']);
            let anchor = anchors.get(&(id, index)).map_or(0, |a| a - range.start);
            let cut = window(content, anchor);
            let start = s.text.len();
            if cut.start > 0 {
                s.text.push('…');
            }
            push_source(&mut s.text, content.get(cut.clone())?);
            if cut.end < content.len() {
                s.text.push('…');
            }
            s.lines.insert(
                index,
                Copied {
                    range: start..s.text.len(),
                    from: range.start + cut.start..range.start + cut.end,
                    cut_before: cut.start > 0,
                },
            );
            s.text.push('\n');
        }
        Some(s)
    }

    /// Where byte `offset` of the file is in `text`: at the same character of its line's copy.
    /// An offset in a part cut off is at the `…` standing for it; one past the line's last
    /// character at the end of the copy.
    fn moved(&self, files: &SourceFiles, mut offset: usize) -> Option<usize> {
        let (sf, source) = (&files.files, files.source(self.id));
        while !source.is_char_boundary(offset) {
            offset -= 1;
        }
        let copy = self.lines.get(&sf.line_index(self.id, offset).ok()?)?;
        if offset < copy.from.start {
            return Some(copy.range.start);
        }
        if offset > copy.from.end {
            return Some(copy.range.end);
        }
        let mut before = String::new();
        if copy.cut_before {
            before.push('…');
        }
        push_source(&mut before, source.get(copy.from.start..offset)?);
        Some(copy.range.start + before.len())
    }
}

/// The line of file `id` holding byte `offset`, cut as a rendered diagnostic shows it
/// ([`window`] around `offset`, `…` where cut) but not escaped, and the 1-based character
/// column of `offset` in that copy: the snippet and caret of the status endpoint and the
/// dashboard, which show the text as text.
pub(super) fn line_around(files: &SourceFiles, id: FileId, offset: usize) -> (String, usize) {
    let (sf, source) = (&files.files, files.source(id));
    let range = sf
        .line_index(id, offset)
        .and_then(|index| sf.line_range(id, index))
        .unwrap_or(0..0);
    let content = source
        .get(range.clone())
        .unwrap_or("")
        .trim_end_matches(['\r', '\n']);
    let mut anchor = offset.saturating_sub(range.start).min(content.len());
    while !content.is_char_boundary(anchor) {
        anchor -= 1;
    }
    let cut = window(content, anchor);
    let mut out = String::with_capacity(cut.len() + 6);
    if cut.start > 0 {
        out.push('…');
    }
    out.push_str(content.get(cut.clone()).unwrap_or(""));
    if cut.end < content.len() {
        out.push('…');
    }
    let before = content
        .get(cut.start..anchor.clamp(cut.start, cut.end))
        .map_or(0, |b| b.chars().count());
    (out, 1 + usize::from(cut.start > 0) + before)
}

/// The part of `line` (without its break) to show: all of it when it has at most
/// [`LINE_MAX_CHARS`] characters, else that many: from the line's start when byte `anchor` is
/// among its first `LINE_MAX_CHARS - CHARS_BEFORE`, else from [`CHARS_BEFORE`] before it (or
/// the last ones of the line). Only the characters around the window are counted: a long line
/// costs each diagnostic what it shows.
fn window(line: &str, anchor: usize) -> Range<usize> {
    if line.len() <= LINE_MAX_CHARS || line.chars().nth(LINE_MAX_CHARS).is_none() {
        return 0..line.len();
    }
    let mut anchor = anchor.min(line.len());
    while !line.is_char_boundary(anchor) {
        anchor -= 1;
    }
    // `take(n).last()` of the characters before a place: where the n-th one back starts.
    let back = |from: usize, n: usize| {
        line.get(..from)
            .and_then(|l| l.char_indices().rev().take(n).last())
            .map_or(from, |(i, _)| i)
    };
    let near_start = line
        .get(..anchor)
        .is_some_and(|l| l.chars().nth(LINE_MAX_CHARS - CHARS_BEFORE).is_none());
    let start = if near_start {
        0
    } else {
        back(anchor, CHARS_BEFORE)
    };
    match line
        .get(start..)
        .and_then(|l| l.char_indices().nth(LINE_MAX_CHARS))
    {
        Some((n, _)) => start..start + n,
        None => back(line.len(), LINE_MAX_CHARS)..line.len(),
    }
}

/// Appends part of a line, escaped; tabs are kept, codespan lines them up with the next tab
/// stop itself.
fn push_source(out: &mut String, part: &str) {
    for c in part.chars() {
        if c == '\t' {
            out.push(c);
        } else {
            push_printable(out, c);
        }
    }
}

impl<'a> Files<'a> for View {
    type FileId = FileId;
    type Name = &'a str;
    type Source = &'a str;

    fn name(&'a self, id: FileId) -> Result<&'a str, Error> {
        Ok(self.get(id)?.name.as_str())
    }

    fn source(&'a self, id: FileId) -> Result<&'a str, Error> {
        Ok(self.get(id)?.text.as_str())
    }

    fn line_index(&'a self, id: FileId, byte_index: usize) -> Result<usize, Error> {
        let s = self.get(id)?;
        s.lines
            .iter()
            .find(|(_, c)| c.range.start <= byte_index && byte_index <= c.range.end)
            .map(|(&index, _)| index)
            .ok_or(Error::IndexTooLarge {
                given: byte_index,
                max: s.text.len(),
            })
    }

    fn line_range(&'a self, id: FileId, line_index: usize) -> Result<Range<usize>, Error> {
        let s = self.get(id)?;
        if line_index > s.last_line {
            return Err(Error::LineTooLarge {
                given: line_index,
                max: s.last_line,
            });
        }
        // A line not copied is one codespan does not render (it asks for every line a
        // multi-line label spans, to draw only some).
        Ok(s.lines
            .get(&line_index)
            .map_or(0..0, |copy| copy.range.clone()))
    }

    fn location(&'a self, id: FileId, byte_index: usize) -> Result<Location, Error> {
        let s = self.get(id)?;
        if let Some((_, l)) = s.starts.iter().find(|(at, _)| *at == byte_index) {
            return Ok(*l);
        }
        let line = self.line_index(id, byte_index)?;
        Ok(Location {
            line_number: line + 1,
            column_number: 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use codespan_reporting::term;

    use super::super::{Diagnostic, Diagnostics, SourceFiles, to_codespan};
    use super::LINE_MAX_CHARS;

    /// A config repo's text (names, values, lines echoed) reaches no output raw: a file named
    /// with an escape sequence, a bare CR in a line, a message with a line break. Before, they
    /// were printed as written, and `render_short` and `render_human` printed a line of their
    /// own that began `::error::`, which GitHub's runner takes for a workflow command.
    #[test]
    fn every_rendering_escapes_what_the_config_repo_wrote() {
        let mut files = SourceFiles::default();
        let f = files.add(
            "routes/x\u{1b}]0;t\u{7}.toml",
            "[[route]]\nname = \"a\" #\r::error::cr\nupstream = \"u\"\n",
        );
        let mut ds = Diagnostics::default();
        // The `u` of `upstream`, after the line with the CR.
        let at = files.source(f).find("upstream").unwrap_or_default();
        let cr = files.source(f).find('\r').unwrap_or_default();
        ds.push(
            Diagnostic::error(
                "unknown-upstream",
                "unknown upstream `u\n::error::injected`",
            )
            .at(f, at..at + 8, "no \u{1b}[31mupstream")
            .also(f, cr..cr + 1, "the CR:\r::warning::x")
            .help("help\n::add-mask::x"),
        );
        let human = ds.render_human(&files);
        let short = ds.render_short(&files);
        let github = ds.render_github(&files, std::path::Path::new("gw"));
        for out in [&human, &short, &github] {
            assert!(
                !out.contains(['\u{1b}', '\u{7}', '\r']),
                "a raw control character: {out:?}"
            );
        }
        for out in [&human, &short] {
            for line in out.lines() {
                assert!(!line.trim_start().starts_with("::"), "{line:?} in {out}");
            }
        }
        // One workflow command, the gateway's own.
        assert_eq!(github.lines().count(), 1, "{github}");
        assert!(
            github.starts_with("::error file=gw/routes/x\\u{1b}]0;t\\u{7}.toml,line=3,"),
            "{github}"
        );
        assert!(
            human.contains("routes/x\\u{1b}]0;t\\u{7}.toml:3:1"),
            "{human}"
        );
        assert!(
            human.contains("unknown upstream `u\\n::error::injected`"),
            "{human}"
        );
        // The line with the CR, escaped, and the label under the CR itself.
        let lines: Vec<&str> = human.lines().collect();
        let cr = lines
            .iter()
            .position(|l| l.ends_with("name = \"a\" #\\r::error::cr"))
            .unwrap_or_else(|| panic!("{human}"));
        let under = lines[cr + 1];
        assert_eq!(
            under.find('-').map(|c| under[..c].chars().count()),
            lines[cr].find('\\').map(|c| lines[cr][..c].chars().count()),
            "{human}"
        );
    }

    /// Where nothing needs escaping, a diagnostic renders as codespan renders it from the file
    /// itself: the view holds every line codespan shows (multi-line labels, their context,
    /// the line between two labels, labels far apart, a label at the end of the file).
    #[test]
    fn the_view_shows_what_codespan_shows_of_the_whole_file() {
        let mut files = SourceFiles::default();
        let text: String = (1..=40).map(|i| format!("line {i}\tx = {i}\r\n")).collect();
        let f = files.add("routes/a.toml", text.clone());
        let g = files.add("routes/b.toml", "one\ntwo");
        let at = |line: usize| text.match_indices("line ").nth(line - 1).map_or(0, |m| m.0);
        let cases = [
            vec![(f, at(3)..at(3) + 4)],
            vec![(f, at(3)..at(9) + 2), (f, at(5)..at(5) + 1)],
            vec![(f, at(2)..at(2) + 1), (f, at(4)..at(4) + 1)],
            vec![(f, at(1)..at(40) + 3), (g, 4..7)],
            vec![(f, text.len()..text.len()), (g, 7..7), (f, at(20)..at(22))],
        ];
        let config = term::Config::default();
        for spans in cases {
            let mut d = Diagnostic::error("c", "m");
            for (i, (file, span)) in spans.iter().enumerate() {
                d = if i == 0 {
                    d.at(*file, span.clone(), "first")
                } else {
                    d.also(*file, span.clone(), "other")
                };
            }
            let whole = term::emit_into_string(
                &config,
                &files.files,
                &to_codespan(&d, spans.iter().map(|s| s.1.clone()).collect()),
            )
            .unwrap_or_default();
            let mut ds = Diagnostics::default();
            ds.push(d);
            assert_eq!(ds.render_human(&files), whole, "{spans:?}");
        }
    }

    /// A long line is shown cut to [`LINE_MAX_CHARS`] characters around the place pointed at,
    /// `…` where cut, the caret under that place and the file's own column in the locus. Before,
    /// the whole line was echoed: 400 KB for the audit's 200,000-deep array, 4 MB here, as much
    /// again for each diagnostic on the line.
    #[test]
    fn a_long_line_is_shown_cut_around_the_place_pointed_at() {
        // Two-byte characters before the place: a window counted in bytes would be off.
        let long = format!(
            "x = \"{}\" \u{1b}oops{}",
            "é".repeat(300_000),
            "b".repeat(4_000_000)
        );
        let mut files = SourceFiles::default();
        let f = files.add("routes/big.toml", format!("[[route]]\n{long}\nname = 1\n"));
        let at = files.source(f).find("oops").unwrap_or_default();
        let line_end = 10 + long.len();
        let mut ds = Diagnostics::default();
        ds.push(
            Diagnostic::error("toml-syntax", "unexpected key")
                .at(f, at..at + 4, "here")
                .also(f, 0..line_end, "this table"),
        );
        ds.push(Diagnostic::error("near-start", "at the start").at(f, 10..11, "x"));
        let human = ds.render_human(&files);
        assert!(human.len() < 4096, "{} bytes: {human}", human.len());
        assert!(human.contains("routes/big.toml:2:300009"), "{human}");
        let lines: Vec<&str> = human.lines().collect();
        let chars_to = |l: &str, at: usize| l.get(..at).map(|p| p.chars().count());
        // Each diagnostic's copy of line 2, and the line under it.
        let copies: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with("2 │"))
            .collect();
        assert_eq!(copies.len(), 2, "{human}");

        let (shown, under) = (lines[copies[0]], lines[copies[0] + 1]);
        let text = shown.split_once(" │ ").map_or("", |p| p.1);
        let text = text.trim_start_matches(['│', '╭', '─', '╰', ' ']);
        assert!(text.starts_with('…') && text.ends_with('…'), "{shown}");
        assert!(
            text.chars().count() <= LINE_MAX_CHARS + 2 + "\\u{1b}".len(),
            "{shown}"
        );
        assert!(shown.contains("\" \\u{1b}oops"), "{shown}");
        assert_eq!(
            under.find('^').and_then(|c| chars_to(under, c)),
            shown.find("oops").and_then(|c| chars_to(shown, c)),
            "{human}"
        );

        // Near its start, the line is shown from there.
        let (shown, under) = (lines[copies[1]], lines[copies[1] + 1]);
        assert!(
            shown.starts_with("2 │ x = \"éé") && shown.ends_with('…'),
            "{shown}"
        );
        assert_eq!(
            under.find('^').and_then(|c| chars_to(under, c)),
            shown.find('x').and_then(|c| chars_to(shown, c)),
            "{human}"
        );
    }
}
