//! The plan as Markdown for a pull-request comment. Config values and commit subjects are
//! written by people: they go in code spans or are escaped, so they cannot reshape the comment.

use std::fmt::Write as _;

use super::{Changed, Diff, FieldChange, Plan, RouteFacts, UpstreamFacts};

impl Plan {
    /// Markdown for a pull-request comment.
    pub fn to_markdown(&self) -> String {
        let mut md = String::new();
        let (b, h) = (&self.base, &self.head);
        let _ = writeln!(
            md,
            "### rustygate plan: `{}` {} → `{}` {}\n",
            b.short,
            text(&b.subject),
            h.short,
            text(&h.subject)
        );
        if self.config_dir != "." {
            let _ = writeln!(md, "Config directory: {}\n", code(&self.config_dir));
        }
        for note in [&b.note, &h.note].into_iter().flatten() {
            let _ = writeln!(md, "> **Note:** {}\n", text(note));
        }
        match &self.diff {
            None => {
                let _ = writeln!(md, "Head does not compile:\n");
                let rendered = self.head_diagnostics_rendered.as_deref().unwrap_or("");
                let fence = "`".repeat(longest_backtick_run(rendered).max(2) + 1);
                let _ = writeln!(md, "{fence}text\n{}\n{fence}\n", rendered.trim_end());
            }
            Some(diff) => render_diff(&mut md, diff),
        }
        if self.diff.is_some() && !self.new_warnings.is_empty() {
            let _ = writeln!(md, "#### New warnings ({})\n", self.new_warnings.len());
            for w in &self.new_warnings {
                let at = w
                    .location()
                    .map(|l| format!("{} ", code(&l)))
                    .unwrap_or_default();
                let _ = writeln!(md, "- {at}warning[{}]: {}", w.code, text(&w.message));
            }
            md.push('\n');
        }
        let _ = writeln!(md, "**Verdict:** {}", text(&self.verdict));
        md
    }
}

fn render_diff(md: &mut String, diff: &Diff) {
    if diff.is_empty() {
        let _ = writeln!(md, "No route, upstream or gateway changes.\n");
        return;
    }
    if !diff.safety.is_empty() {
        let _ = writeln!(
            md,
            "#### ⚠️ Safety-relevant changes ({})\n",
            diff.safety.len()
        );
        for f in &diff.safety {
            let _ = writeln!(md, "- **{}**: {}", f.kind, text(&f.message));
        }
        md.push('\n');
    }
    let r = &diff.routes;
    section(md, "Routes added", &r.added, route_summary);
    section(md, "Routes removed", &r.removed, route_summary);
    changed_section(md, "Routes changed", &r.changed);
    let u = &diff.upstreams;
    section(md, "Upstreams added", &u.added, upstream_summary);
    section(md, "Upstreams removed", &u.removed, upstream_summary);
    changed_section(md, "Upstreams changed", &u.changed);
    if !diff.gateway.is_empty() {
        let _ = writeln!(md, "#### Gateway settings changed\n");
        for c in &diff.gateway {
            let _ = writeln!(md, "- {}", change_line(c));
        }
        md.push('\n');
    }
}

fn section<T>(md: &mut String, title: &str, items: &[T], line: fn(&T) -> String) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(md, "#### {title} ({})\n", items.len());
    for item in items {
        let _ = writeln!(md, "- {}", line(item));
    }
    md.push('\n');
}

fn changed_section(md: &mut String, title: &str, items: &[Changed]) {
    if items.is_empty() {
        return;
    }
    let _ = writeln!(md, "#### {title} ({})\n", items.len());
    for item in items {
        let _ = writeln!(md, "- {}", code(&item.name));
        for c in &item.changes {
            let _ = writeln!(md, "  - {}", change_line(c));
        }
    }
    md.push('\n');
}

fn change_line(c: &FieldChange) -> String {
    let show = |v: &Option<String>| v.as_deref().map(code).unwrap_or_else(|| "(none)".into());
    let weight_of = c
        .field
        .strip_prefix("target ")
        .and_then(|f| f.strip_suffix(" weight"));
    match (&c.old, &c.new) {
        (None, Some(n)) if c.field == "target" => format!("target added: {}", code(n)),
        (Some(o), None) if c.field == "target" => format!("target removed: {}", code(o)),
        _ => match weight_of {
            Some(url) => format!(
                "target {} weight: {} → {}",
                code(url),
                show(&c.old),
                show(&c.new)
            ),
            None => format!("{}: {} → {}", c.field, show(&c.old), show(&c.new)),
        },
    }
}

fn route_summary(r: &RouteFacts) -> String {
    let methods = r
        .methods
        .as_ref()
        .map(|m| m.join(" "))
        .unwrap_or_else(|| "any method".into());
    let host = r
        .host
        .as_deref()
        .map(code)
        .unwrap_or_else(|| "any host".into());
    let matches = match (&r.path, &r.prefix) {
        (Some(p), _) => format!("path {}", code(p)),
        (None, Some(p)) => format!("prefix {}", code(p)),
        (None, None) => String::new(),
    };
    let action = match (&r.upstream, r.respond_status) {
        (Some(u), _) => format!("upstream {}", code(u)),
        (None, Some(s)) => format!("respond {s}"),
        (None, None) => String::new(),
    };
    format!("{}: {methods}, {host}, {matches} → {action}", code(&r.name))
}

fn upstream_summary(u: &UpstreamFacts) -> String {
    let targets: Vec<String> = u
        .targets
        .iter()
        .map(|(url, w)| {
            if *w == 1 {
                url.clone()
            } else {
                format!("{url} (weight {w})")
            }
        })
        .collect();
    format!("{}: {}", code(&u.name), code(&targets.join(", ")))
}

/// Inline code that survives backticks and line breaks in config values.
fn code(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let fence = "`".repeat(longest_backtick_run(&s) + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{s}{pad}{fence}")
}

/// Text from a commit or a message, with Markdown syntax outside `code spans` escaped, so a
/// commit subject cannot turn into a link, a heading or an HTML tag in the comment.
fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_code = false;
    for c in s.chars() {
        if c.is_control() {
            out.push(' ');
            continue;
        }
        if c == '`' {
            in_code = !in_code;
        } else if !in_code
            && matches!(
                c,
                '\\' | '*' | '_' | '[' | ']' | '<' | '>' | '#' | '|' | '~'
            )
        {
            out.push('\\');
        }
        out.push(c);
    }
    if in_code {
        // An unpaired backtick would swallow the rest of the line into a code span.
        out.push('`');
    }
    out
}

fn longest_backtick_run(s: &str) -> usize {
    s.split(|c| c != '`').map(str::len).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_spans_and_text_survive_markdown() {
        assert_eq!(code("a`b"), "``a`b``");
        assert_eq!(code("`x"), "`` `x ``");
        assert_eq!(code("line\nbreak"), "`line break`");
        assert_eq!(text("fix *all* [x]"), "fix \\*all\\* \\[x\\]");
        assert_eq!(text("rename `my_route`"), "rename `my_route`");
        assert_eq!(text("odd ` tick"), "odd ` tick`");
    }
}
