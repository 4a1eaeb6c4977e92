//! The operator dashboard at `/ui/`: one page of plain HTML, CSS and JavaScript, embedded in the
//! binary, that reads the JSON API (`api`). No build step, nothing fetched from anywhere else:
//! the Content-Security-Policy allows this origin only, so the page works offline and a page
//! that tried to reach another host would be stopped by the browser.
//!
//! The page itself holds no data and is served to anyone who may reach the admin listener when
//! a token is configured (it asks for the token and sends it to the API); without a token it is
//! served only where the API answers (loopback), and says so.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};

use super::admin::AdminState;

/// The page's files: path under `/ui/`, content type, content.
pub const ASSETS: &[(&str, &str, &str)] = &[
    (
        "",
        "text/html; charset=utf-8",
        include_str!("ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("ui/app.css"),
    ),
];

/// Only this origin, for scripts, styles, images (and `data:` ones) and API calls; no frames,
/// no forms, no `<base>`.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'";

pub(crate) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.service(super::admin::get_or_head("/ui", redirect))
        .service(super::admin::get_or_head("/ui/{file:.*}", asset));
}

async fn redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header(("location", "/ui/"))
        .finish()
}

async fn asset(req: HttpRequest, state: web::Data<AdminState>) -> HttpResponse {
    if state.control.admin_token.is_none()
        && let Err(refusal) = super::api::gate(&req, &state)
    {
        return *refusal;
    }
    let file = req.match_info().get("file").unwrap_or("");
    let Some((_, content_type, body)) = ASSETS.iter().find(|(path, _, _)| *path == file) else {
        return HttpResponse::build(StatusCode::NOT_FOUND)
            .insert_header(("content-type", "text/plain; charset=utf-8"))
            .insert_header(("x-content-type-options", "nosniff"))
            .body("not found\n");
    };
    HttpResponse::Ok()
        .insert_header(("content-type", *content_type))
        .insert_header(("content-security-policy", CSP))
        .insert_header(("x-content-type-options", "nosniff"))
        .insert_header(("x-frame-options", "DENY"))
        .insert_header(("referrer-policy", "no-referrer"))
        .insert_header(("cross-origin-opener-policy", "same-origin"))
        .insert_header(("cross-origin-resource-policy", "same-origin"))
        // Revalidated each time: a new binary's page is never mixed with an old script.
        .insert_header(("cache-control", "no-cache"))
        .body(*body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page works offline and the CSP has nothing to allow: no asset names another
    /// origin (the SVG namespace is a name, not something fetched).
    #[test]
    fn assets_name_no_other_origin_and_stay_small() {
        let mut total = 0;
        for (path, _, body) in ASSETS {
            total += body.len();
            let cleaned = body.replace("http://www.w3.org/2000/svg", "");
            for needle in ["http://", "https://", "//cdn", "@import", "url(http"] {
                assert!(!cleaned.contains(needle), "/ui/{path} contains `{needle}`");
            }
            // No inline script or style the CSP would have to allow.
            assert!(!body.contains("<script>"), "/ui/{path}: inline script");
            assert!(!body.contains("style=\""), "/ui/{path}: inline style");
            // Nor inline event handlers (`onclick="..."`).
            let handler = body.match_indices(" on").any(|(i, _)| {
                let rest = &body[i + 3..];
                let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
                name_len > 0 && rest[name_len..].starts_with('=')
            });
            assert!(!handler, "/ui/{path}: inline event handler");
        }
        assert!(total < 200 * 1024, "the page weighs {total} bytes");
        assert!(!CSP.contains("http"), "{CSP}");
        assert!(!CSP.contains("unsafe"), "{CSP}");
    }
}
