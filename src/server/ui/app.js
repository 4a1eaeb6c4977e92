// RustyGate dashboard: reads the admin listener's JSON API (/api/v1/...), read-only.
// Everything shown is built with DOM calls and textContent, never parsed as HTML.
"use strict";

(function () {
  const TOKEN_KEY = "rustygate.admin-token";
  const REFRESH_MS = 3000;
  const $ = (id) => document.getElementById(id);
  let view = "overview";
  let timer = null;
  let routesVersion = null;
  let filterTimer = null;
  let lastFilter = null;

  // ---- DOM helpers ------------------------------------------------------------------------
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }
  function short(sha) { return sha ? String(sha).slice(0, 12) : "—"; }
  function dash(v) { return v === null || v === undefined || v === "" ? "—" : v; }
  function ago(iso) {
    if (!iso) return "—";
    const s = Math.round((Date.now() - Date.parse(iso)) / 1000);
    if (!isFinite(s)) return iso;
    return iso + " (" + human(Math.max(0, s)) + " ago)";
  }
  function human(s) {
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }
  // A window's length: whole minutes as such ("15 min").
  function span(seconds) {
    const s = Math.round(seconds);
    return s >= 60 && s % 60 === 0 ? s / 60 + " min" : human(s);
  }
  function dl(node, pairs) {
    clear(node);
    for (const [k, v] of pairs) node.append(el("dt", { text: k }), el("dd", {}, v));
  }
  function fmt(n, digits) {
    if (n === null || n === undefined) return "—";
    return Number(n).toFixed(digits === undefined ? 1 : digits);
  }

  // ---- API ----------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  async function api(path, options) {
    const headers = { "Accept": "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers["Authorization"] = "Bearer " + token;
    const opts = Object.assign({ cache: "no-store", credentials: "omit", headers }, options || {});
    if (opts.body) headers["Content-Type"] = "application/json";
    const r = await fetch(path, opts);
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    if (!r.ok) throw new ApiError(r.status, (body && body.message) || ("HTTP " + r.status));
    return body;
  }
  function failed(e) {
    if (e instanceof ApiError && (e.status === 401 || e.status === 429)) {
      const had = !!sessionStorage.getItem(TOKEN_KEY);
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(e.status === 429 ? e.message : had ? "The token was refused." : "");
      return;
    }
    if (e instanceof ApiError && e.status === 403) {
      stop();
      $("main").hidden = true;
      $("login").hidden = true;
      banner(e.message, true);
      return;
    }
    $("updated").textContent = "update failed: " + e.message;
  }

  // ---- login --------------------------------------------------------------------------------
  function showLogin(message) {
    stop();
    $("main").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("token").focus();
  }
  function banner(text, isError) {
    const b = $("banner");
    b.hidden = !text;
    b.textContent = text || "";
    b.classList.toggle("error", !!isError);
  }

  // ---- views --------------------------------------------------------------------------------
  function show(name) {
    view = name;
    for (const b of document.querySelectorAll("#tabs button")) {
      b.classList.toggle("active", b.dataset.view === name);
    }
    for (const s of document.querySelectorAll("main > section")) {
      s.hidden = s.id !== "view-" + name;
    }
    refresh();
  }
  function stop() { if (timer) { clearTimeout(timer); timer = null; } }
  async function refresh() {
    stop();
    try {
      const status = await api("/api/v1/status");
      $("login").hidden = true;
      $("main").hidden = false;
      $("forget").hidden = status.access !== "token";
      banner(status.access === "loopback-without-token"
        ? "No admin token is configured: this dashboard is open to anyone who can reach the admin listener, which is bound to loopback (this machine only). Set RUSTYGATE_ADMIN_TOKEN to require one."
        : "", false);
      if (view === "overview") await overview(status);
      else if (view === "routes") await routes(status, false);
      else if (view === "upstreams") await upstreams();
      else if (view === "traffic") await traffic();
      $("updated").textContent = "version " + short(status.version) + " · updated " + new Date().toLocaleTimeString();
    } catch (e) {
      failed(e);
      if (e instanceof ApiError && [401, 403, 429].includes(e.status)) return;
    }
    timer = setTimeout(refresh, view === "traffic" ? 5000 : REFRESH_MS);
  }

  async function overview(status) {
    // Alongside the rest: a shared store that is down or stalls holds up the fleet panel only.
    const pending = fleet();
    const a = status.applied || {};
    const shaNode = a.commit_url && /^https:\/\//.test(a.commit_url)
      ? el("a", { id: "applied-sha", href: a.commit_url, "data-sha": a.sha, title: a.sha, rel: "noreferrer", target: "_blank" }, el("code", { text: short(a.sha) }))
      : el("code", { id: "applied-sha", "data-sha": a.sha || status.version, title: a.sha || status.version, text: short(a.sha || status.version) });
    dl($("applied"), [
      ["SHA", shaNode],
      ["Subject", dash(a.subject)],
      ["Author", dash(a.author)],
      ["Committed", dash(a.committed_at)],
      ["Ref", dash(a.ref)],
      ["Loaded", ago(a.loaded_at || status.loaded_at)],
      ["Routes", String(status.routes) + " routes, " + status.upstreams + " upstreams" + (status.warnings ? ", " + status.warnings + " warnings" : "")],
    ]);
    const t = status.attempted;
    const box = clear($("attempted"));
    if (!t) {
      box.append(el("p", { class: "muted", text: "No reload attempted yet." }));
    } else {
      box.append(el("p", {},
        el("span", { class: t.ok ? "ok" : "bad", id: "attempted-result", text: t.ok ? "applied" : "rejected" }), " ",
        el("code", { id: "attempted-sha", "data-sha": t.sha || "", title: t.sha || "", text: t.sha ? short(t.sha) : "no commit (fetch failed)" }),
        el("span", { class: "muted", text: " · " + t.trigger + " · " + ago(t.at) })));
      if (t.reason) box.append(el("p", { class: "bad", text: "refused: " + t.reason + (t.signer ? " (signer " + t.signer + ")" : "") }));
      const errors = Array.isArray(t.errors) ? t.errors : [];
      for (const d of errors.slice(0, 20)) {
        const loc = d.file ? d.file + (d.line ? ":" + d.line + (d.column ? ":" + d.column : "") : "") : null;
        box.append(el("div", { class: "diag" },
          el("div", {}, loc ? el("span", { class: "loc", text: loc }) : null, loc ? " " : null,
            d.code ? el("code", { text: d.code }) : null, " ", d.message || ""),
          d.snippet !== undefined && d.snippet !== null ? el("pre", { class: "snippet", text: snippet(d) }) : null,
          (d.help || []).map((h) => el("div", { class: "muted", text: "help: " + h }))));
      }
      // The status record keeps the first errors of a version with many, and their total.
      const total = Math.max(typeof t.errors_total === "number" ? t.errors_total : 0, errors.length);
      const shown = Math.min(errors.length, 20);
      if (total > shown) box.append(el("p", { class: "muted", id: "attempted-more", text: (total - shown) + " more (" + total + " in all)" }));
      if (status.last_fetch_error) box.append(el("p", { class: "bad", text: "last fetch failed: " + status.last_fetch_error }));
    }
    dl($("gateway"), [
      ["Version", "rustygate " + status.gateway_version],
      ["Uptime", human(status.uptime_seconds) + " (since " + status.started_at + ")"],
      ["Source", dash(status.source)],
      ["Last fetch", dash(status.last_fetch_at) + (status.stale ? " (stale: serving the cached commit)" : "")],
      ["Access", status.access === "token" ? "admin token" : "no token, loopback only"],
    ]);
    const r = await api("/api/v1/reloads");
    const body = clear($("reloads").tBodies[0]);
    if (!r.reloads.length) body.append(el("tr", {}, el("td", { colspan: "6", class: "muted", text: "none yet" })));
    for (const x of r.reloads) {
      body.append(el("tr", {},
        el("td", { text: x.at }),
        el("td", { text: x.trigger }),
        el("td", {}, el("code", { title: x.from || "", text: short(x.from) }), " → ", el("code", { title: x.to || "", text: short(x.to) })),
        el("td", { text: x.duration_ms + " ms" }),
        el("td", {}, el("span", { class: "badge " + (x.result === "applied" ? "ok" : "bad"), text: x.result })),
        el("td", { text: x.message || "" })));
    }
    await pending;
  }

  // The replicas sharing this gateway's store and whether they serve one commit. Never throws:
  // whatever goes wrong is shown in the panel.
  async function fleet() {
    let f;
    try {
      f = await api("/api/v1/fleet");
    } catch (e) {
      f = { state: "error", error: "the fleet view could not be read: " + e.message, replicas: [], commits: [] };
    }
    const v = $("fleet-verdict");
    v.dataset.state = f.state;
    v.className = f.state === "ok" ? (f.agree ? "ok" : "bad") : f.state === "error" ? "bad" : "muted";
    v.textContent = f.state === "error" ? f.error : f.verdict;
    const table = $("fleet");
    table.hidden = !f.replicas.length;
    const body = clear(table.tBodies[0]);
    const most = f.commits.length ? f.commits[0].sha : null;
    for (const r of f.replicas) {
      const age = r.heartbeat_age_ms === null ? "—" : fmt(r.heartbeat_age_ms / 1000) + " s ago";
      body.append(el("tr", { class: "fleet-row" + (r.stale ? " stale" : ""), "data-replica": r.replica, "data-sha": r.applied },
        el("td", {}, el("strong", { text: r.replica }), r.this ? el("span", { class: "muted", text: " (this one)" }) : null),
        el("td", {}, el("code", { class: f.agree || r.applied === most ? "" : "bad", title: r.applied, text: r.applied ? short(r.applied) : "nothing applied" })),
        el("td", {}, el("code", { title: r.attempted, text: short(r.attempted) }), " ",
          el("span", { class: r.ok ? "ok" : "bad", text: r.ok ? "ok" : "failed" })),
        el("td", { text: age + (r.stale ? " (stale)" : "") }),
        el("td", { text: dash(r.loaded_at) })));
    }
  }

  // rustc-like: the line, then a caret under the place with what is said there. A long line
  // comes cut around the place, and `snippet_column` is the place's character in the cut copy
  // (`column` is in the whole line; records kept from before have only that). The caret is
  // moved along by the characters before it, tabs kept as tabs so that it lines up with them.
  function snippet(d) {
    const gutter = d.line ? String(d.line) : "";
    const pad = " ".repeat(gutter.length);
    let out = gutter + " | " + d.snippet;
    const at = d.snippet_column || d.column;
    if (at) {
      const before = Array.from(d.snippet).slice(0, at - 1).map((c) => (c === "\t" ? c : " ")).join("");
      out += "\n" + pad + " | " + before + " ".repeat(Math.max(0, at - 1 - Array.from(before).length)) + "^ " + (d.label || "");
    }
    return out;
  }

  async function routes(status, force) {
    const q = $("route-filter").value.trim();
    if (!force && routesVersion === status.version && lastFilter === q) return;
    const r = await api("/api/v1/routes?limit=1000" + (q ? "&q=" + encodeURIComponent(q) : ""));
    routesVersion = r.version;
    lastFilter = q;
    $("routes-count").textContent = (q ? r.matched + " of " + r.total : r.total) + " routes" + (r.truncated ? ", first " + r.routes.length + " shown" : "");
    const body = clear($("routes").tBodies[0]);
    for (const x of r.routes) {
      const path = x.path !== null ? x.path : x.prefix;
      body.append(el("tr", { class: "route-row", "data-name": x.name },
        el("td", {}, el("strong", { text: x.name })),
        el("td", { text: dash(x.host) }),
        el("td", {}, el("code", { text: path }), x.prefix !== null ? el("span", { class: "muted", text: " prefix" }) : null),
        el("td", { text: x.methods ? x.methods.join(" ") : "any" }),
        el("td", { text: x.upstream !== null ? x.upstream : "respond " + x.respond_status }),
        el("td", { text: dash(x.auth) }),
        el("td", { text: dash(x.rate_limit) }),
        el("td", { text: dash(x.cors) }),
        el("td", { text: dash(x.policy) }),
        el("td", { text: x.plugins.length ? x.plugins.join(", ") : "—" }),
        el("td", {}, el("code", { class: "source", text: x.source.file + ":" + x.source.line + ":" + x.source.column }))));
    }
    if (!r.routes.length) body.append(el("tr", {}, el("td", { colspan: "11", class: "muted", text: "no route matches the filter" })));
  }

  async function explain(ev) {
    ev.preventDefault();
    const out = clear($("explain-result"));
    const headers = {};
    for (const line of $("explain-headers").value.split("\n")) {
      if (!line.trim()) continue;
      const i = line.indexOf(":");
      if (i <= 0) { out.append(el("p", { class: "error", text: "header lines are `Name: value`: " + line })); return; }
      headers[line.slice(0, i).trim()] = line.slice(i + 1).trim();
    }
    try {
      const r = await api("/api/v1/explain", {
        method: "POST",
        body: JSON.stringify({ method: $("explain-method").value, url: $("explain-url").value.trim(), headers }),
      });
      const ok = r.status < 400;
      out.append(el("p", {},
        el("span", { class: ok ? "ok" : "bad", text: String(r.status) }), " ",
        r.route ? el("span", {}, "route ", el("strong", { class: "explain-route", text: r.route.name }), " ",
          el("code", { text: r.route.source.file + ":" + r.route.source.line + ":" + r.route.source.column }))
          : el("span", { class: "explain-route muted", text: "no route" }),
        r.upstream ? el("span", {}, " → upstream ", el("strong", { text: r.upstream.name }), " ", el("code", { text: r.upstream.path + (r.upstream.query ? "?" + r.upstream.query : "") })) : null));
      out.append(el("ul", { class: "why" }, r.why.map((w) => el("li", { text: w }))));
    } catch (e) {
      if (e instanceof ApiError && [401, 403, 429].includes(e.status)) return failed(e);
      out.append(el("p", { class: "error", id: "explain-error", text: e.message }));
    }
  }

  async function upstreams() {
    const r = await api("/api/v1/upstreams");
    const root = clear($("upstreams"));
    if (!r.upstreams.length) root.append(el("p", { class: "muted", text: "This config has no upstreams." }));
    for (const u of r.upstreams) {
      const lat = u.latency;
      const b = u.breaker;
      const card = el("div", { class: "card upstream", "data-name": u.name },
        el("h2", {}, el("span", { text: u.name }),
          el("span", { class: "muted", text: u.balance }),
          el("span", { class: b.state === "open" ? "bad" : "ok", text: "breaker " + b.state })),
        el("dl", {},
          el("dt", { text: "Latency" }), el("dd", { text: "p50 " + fmt(lat.p50_ms) + " ms · p99 " + fmt(lat.p99_ms) + " ms · " + lat.requests + " requests in the last " + span(lat.window_seconds) }),
          el("dt", { text: "Health check" }), el("dd", { text: u.health_check ? "GET " + u.health_check.path + " every " + (u.health_check.interval_ms / 1000) + " s" : "none (passive only)" }),
          el("dt", { text: "Breaker" }), el("dd", { text: "requests " + b.active + "/" + dash(b.max_requests) + " · pending " + b.pending + "/" + dash(b.max_pending) + overflowText(b.overflowed) })),
        el("table", {},
          el("thead", {}, el("tr", {}, ["Target", "Weight", "Active health", "Passive", "In flight", "Ejections", "Failures in a row"].map((h) => el("th", { text: h })))),
          el("tbody", {}, u.targets.map((t) => el("tr", { class: "target" },
            el("td", {}, el("code", { text: t.url })),
            el("td", { text: t.weight }),
            el("td", {}, el("span", { class: t.active_health === "unhealthy" ? "bad" : t.active_health === "healthy" ? "ok" : "muted", text: t.active_health })),
            el("td", {}, el("span", { class: t.passive_health === "ejected" ? "bad" : "ok", text: t.passive_health + (t.ejected_for_ms ? " (" + Math.ceil(t.ejected_for_ms / 1000) + " s left)" : "") })),
            el("td", { text: t.in_flight }),
            el("td", { text: t.ejections }),
            el("td", { text: t.consecutive_failures + " failures, " + t.consecutive_5xx + " 5xx" }))))));
      root.append(card);
    }
  }
  function overflowText(o) {
    const parts = Object.entries(o || {}).map(([k, v]) => v + " over " + k);
    return parts.length ? " · turned away: " + parts.join(", ") : "";
  }

  async function traffic() {
    const r = await api("/api/v1/traffic?limit=8");
    $("traffic-note").textContent = "Sampled every " + r.interval_seconds + " s in the gateway, last " +
      Math.round(r.capacity * r.interval_seconds / 60) + " minutes; " + r.times.length + " samples so far, " +
      r.routes_with_traffic + " routes with traffic.";
    const root = clear($("charts"));
    const end = r.times.length ? r.times[r.times.length - 1] : Date.now() / 1000;
    const start = end - r.capacity * r.interval_seconds;
    root.append(chart("All routes: requests/s", r.times, start, end, [["req/s", r.total.requests_per_second]]));
    root.append(chart("All routes: 4xx and 5xx per second", r.times, start, end, [["4xx/s", r.total.rate_4xx, 1], ["5xx/s", r.total.rate_5xx, 2]]));
    root.append(chart("All routes: p99 latency (ms)", r.times, start, end, [["p99 ms", r.total.p99_ms]]));
    for (const s of r.routes) {
      root.append(chart("Route " + s.route + ": requests/s, 5xx/s", r.times, start, end, [["req/s", s.requests_per_second], ["5xx/s", s.rate_5xx, 2]], s.route));
      root.append(chart("Route " + s.route + ": p99 latency (ms)", r.times, start, end, [["p99 ms", s.p99_ms]], s.route));
    }
  }

  // One small time-series chart: inline SVG, one polyline per series (gaps where null).
  function chart(title, times, start, end, series, route) {
    const W = 320, H = 80;
    let max = 0;
    for (const [, values] of series) for (const v of values) if (v !== null && v > max) max = v;
    const top = max > 0 ? max * 1.1 : 1;
    const box = svg("svg", { viewBox: "0 0 " + W + " " + H, preserveAspectRatio: "none", role: "img", "aria-label": title });
    box.append(svg("line", { x1: 0, y1: H - 0.5, x2: W, y2: H - 0.5, class: "axis", "stroke-width": 1 }));
    const legend = el("div", { class: "legend" });
    series.forEach(([name, values, color], i) => {
      const c = color === undefined ? i : color;
      let points = [];
      const flush = () => {
        if (points.length) box.append(svg("polyline", { points: points.join(" "), fill: "none", class: "s" + c, "stroke-width": 1.5, "vector-effect": "non-scaling-stroke" }));
        points = [];
      };
      values.forEach((v, j) => {
        if (v === null) { flush(); return; }
        const x = ((times[j] - start) / Math.max(1, end - start)) * W;
        const y = H - (v / top) * (H - 4) - 1;
        points.push(x.toFixed(1) + "," + y.toFixed(1));
      });
      flush();
      const last = values.length ? values[values.length - 1] : null;
      legend.append(el("span", { class: "c" + c, text: name + " " + fmt(last) }));
    });
    legend.append(el("span", { class: "muted", text: "max " + fmt(max) }));
    return el("div", { class: "card chart", "data-route": route || "" }, el("h3", { text: title }), box, legend);
  }

  // ---- wiring -------------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.view));
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const t = $("token").value.trim();
      if (!t) return;
      sessionStorage.setItem(TOKEN_KEY, t);
      $("token").value = "";
      refresh();
    });
    $("forget").addEventListener("click", () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin("");
    });
    $("explain").addEventListener("submit", explain);
    $("route-filter").addEventListener("input", () => {
      clearTimeout(filterTimer);
      filterTimer = setTimeout(async () => {
        try { await routes({ version: routesVersion }, true); } catch (e) { failed(e); }
      }, 150);
    });
    refresh();
  });
})();
