// The Nexus dashboard: one EventSource (/api/stream) brings the state every second,
// the chart history once, and the live tail. Every text from the pipeline (event
// types, payloads, handler errors) goes into the page as textContent, never as markup:
// producers control it.
"use strict";

(() => {
  const WINDOW = 600; // seconds the charts span
  const TAIL_MAX = 200; // lines kept on the page
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  // the session cookie carries the token from here on: keep it out of the address bar
  if (new URLSearchParams(location.search).has("token")) history.replaceState(null, "", location.pathname);

  let points = [];
  let source = null;
  let paused = false;
  let deadSeen = -1;

  // -- small DOM helpers ----------------------------------------------------------------
  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function cells(tr, values) {
    for (const v of values) tr.append(v instanceof Node ? wrap(v) : el("td", v === null || v === undefined ? "-" : v));
    return tr;
  }
  function wrap(node) {
    const td = el("td");
    td.append(node);
    return td;
  }
  function fill(tbody, rows) {
    tbody.replaceChildren(...rows);
  }
  function uptime(s) {
    s = Math.floor(s || 0);
    if (s >= 3600) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
    if (s >= 60) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
    return `${s}s`;
  }
  function when(ts) {
    return ts ? new Date(ts * 1000).toLocaleString() : "-";
  }
  function ms(seconds) {
    return seconds === null || seconds === undefined ? "-" : `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms`;
  }

  // -- the stream -------------------------------------------------------------------------
  function connect() {
    if (source) source.close();
    const filter = $("tail-filter").value.trim() || "*";
    source = new EventSource("/api/stream?tail=" + encodeURIComponent(filter));
    source.addEventListener("history", (e) => {
      points = JSON.parse(e.data).points;
      drawCharts();
    });
    source.addEventListener("state", (e) => onState(JSON.parse(e.data)));
    source.addEventListener("tail", (e) => onTail(JSON.parse(e.data)));
    source.onopen = () => {
      $("conn").textContent = "live";
      document.body.dataset.stream = "open";
      document.body.dataset.filter = filter; // the server watches with this filter from now on
    };
    source.onerror = () => {
      $("conn").textContent = "reconnecting…"; // EventSource retries by itself
      document.body.dataset.stream = "closed";
    };
  }

  function onState(s) {
    const last = points.length ? points[points.length - 1].t : 0;
    if (s.point && s.point.t > last) points.push(s.point);
    while (points.length && points[0].t < s.t - WINDOW) points.shift();
    showHealth(s.health);
    showGroups(s.groups || {});
    showProcesses(s.processes || []);
    const r = s.router || {};
    $("router").textContent =
      r.accepted === undefined || r.accepted === null
        ? "router not answering"
        : `router: accepted ${r.accepted}, rejected ${r.rejected}, duplicates ${r.duplicates}, ` +
          `journal seq ${r.seq} (${r.journal_bytes} bytes), up ${uptime(r.uptime)}`;
    drawCharts();
    const dead = Object.values(s.groups || {}).reduce((n, g) => n + (g.dead_letters || 0), 0);
    if (dead !== deadSeen) {
      deadSeen = dead;
      loadDeadLetters();
    }
  }

  function showHealth(h) {
    const badge = $("health");
    badge.textContent = !h.live ? "not live" : h.ready ? "ready" : "live, not ready";
    badge.className = "badge " + (!h.live ? "bad" : h.ready ? "ok" : "warn");
    fill($("reasons"), h.reasons.map((r) => el("li", r)));
  }

  function showGroups(groups) {
    const rows = [];
    const members = [];
    for (const [name, g] of Object.entries(groups)) {
      const tr = cells(el("tr"), [name, g.members.length, g.partitions, g.unassigned]);
      tr.dataset.group = name;
      tr.append(el("td", g.lag, "num lag"), el("td", g.dead_letters, "num"));
      rows.push(tr);
      for (const m of g.members) {
        members.push(cells(el("tr"), [m.name, name, m.partitions, m.handled, m.failed, m.dead_lettered, m.breaker]));
      }
    }
    fill($("groups").tBodies[0], rows);
    fill($("members").tBodies[0], members);
  }

  function showProcesses(procs) {
    fill(
      $("processes").tBodies[0],
      procs.map((p) => {
        const tr = el("tr");
        tr.dataset.name = p.name;
        cells(tr, [p.name, p.role, p.group || "-", p.pid || "-"]);
        tr.append(el("td", p.state, /^[a-z]+$/.test(p.state) ? `state state-${p.state}` : "state"));
        return cells(tr, [p.restarts, p.state === "running" ? uptime(p.uptime) : "-", p.last_exit || "-"]);
      }),
    );
  }

  // -- charts: inline SVG, one polyline per series (a gap breaks the line) -----------------
  function drawCharts() {
    const now = points.length ? points[points.length - 1].t : Date.now() / 1000;
    const rate = points.map((p) => p.rate);
    chart($("chart-rate"), now, [{ values: rate, cls: "s0" }], (v) => v.toFixed(v < 10 ? 1 : 0) + "/s");
    chart(
      $("chart-latency"),
      now,
      [
        { values: points.map((p) => p.p50), cls: "s0" },
        { values: points.map((p) => p.p99), cls: "s1" },
      ],
      ms,
    );
    const groups = [...new Set(points.flatMap((p) => Object.keys(p.lag || {})))].sort();
    chart(
      $("chart-lag"),
      now,
      groups.map((g, i) => ({ values: points.map((p) => (p.lag || {})[g] ?? null), cls: `s${i % 6}` })),
      (v) => String(Math.round(v)),
    );
    fill($("lag-keys"), groups.map((g, i) => el("span", g + " ", `key s${i % 6}`)));
    const latest = points[points.length - 1] || {};
    $("rate-now").textContent = latest.rate === null || latest.rate === undefined ? "" : `now ${latest.rate}/s`;
    const sampled = points.findLast((p) => p.p99 !== undefined) || {};
    $("latency-now").textContent = sampled.p99 === null || sampled.p99 === undefined ? "" : `p99 ${ms(sampled.p99)}`;
  }

  function chart(svg, now, series, label) {
    const W = 600;
    const H = 140;
    const top = 14;
    const all = series.flatMap((s) => s.values).filter((v) => v !== null && v !== undefined);
    const max = Math.max(...all, 0) * 1.1 || 1;
    // the span grows with the data from one minute to the full ten
    const span = Math.min(WINDOW, Math.max(60, points.length ? now - points[0].t : 0));
    const x = (t) => W - ((now - t) / span) * W;
    const y = (v) => H - 2 - (v / max) * (H - top - 4);
    const nodes = [];
    for (const s of series) {
      let run = [];
      const flush = () => {
        if (run.length) {
          const line = document.createElementNS(SVG, "polyline");
          line.setAttribute("points", run.join(" "));
          line.setAttribute("class", s.cls);
          nodes.push(line);
        }
        run = [];
      };
      s.values.forEach((v, i) => {
        if (v === null) flush();
        else if (v !== undefined) run.push(`${x(points[i].t).toFixed(1)},${y(v).toFixed(1)}`);
        // undefined: not sampled at that second (latency without an open page): joined over
      });
      flush();
    }
    const text = (content, tx, ty, anchor) => {
      const t = document.createElementNS(SVG, "text");
      t.setAttribute("x", tx);
      t.setAttribute("y", ty);
      if (anchor) t.setAttribute("text-anchor", anchor);
      t.textContent = content;
      return t;
    };
    nodes.push(text(all.length ? "max " + label(max / 1.1) : "no data", 4, 11));
    nodes.push(text(span >= 120 ? `${Math.round(span / 60)} min ago` : `${Math.round(span)} s ago`, 4, H - 4));
    nodes.push(text("now", W - 4, H - 4, "end"));
    svg.replaceChildren(...nodes);
  }

  // -- live tail ----------------------------------------------------------------------------
  function onTail(data) {
    $("tail-info").textContent = data.dropped ? `${data.dropped} lines skipped (too fast to show)` : "";
    if (paused) return;
    const list = $("tail-list");
    for (const ev of data.lines) {
      const li = el("li");
      li.dataset.type = ev.type;
      li.dataset.id = ev.id;
      li.title = ev.payload;
      li.append(
        el("span", `#${ev.seq} `, "seq"),
        el("span", new Date(ev.time * 1000).toLocaleTimeString() + " ", "time"),
        el("span", ev.type, "type"),
        el("span", ` from ${ev.source}${ev.key ? " key " + ev.key : ""} `, "source"),
        el("span", ev.payload, "payload"),
      );
      list.prepend(li);
    }
    while (list.children.length > TAIL_MAX) list.lastElementChild.remove();
  }

  $("tail-form").addEventListener("submit", (e) => {
    e.preventDefault();
    $("tail-list").replaceChildren();
    connect(); // the server filters: a busy pipeline's other types do not crowd the page
  });
  $("tail-pause").addEventListener("click", () => {
    paused = !paused;
    $("tail-pause").textContent = paused ? "resume" : "pause";
  });

  // -- dead letters ---------------------------------------------------------------------------
  async function api(path, body) {
    const init = body === undefined ? {} : {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    };
    const resp = await fetch(path, { credentials: "same-origin", ...init });
    const data = await resp.json().catch(() => ({ ok: false, error: `HTTP ${resp.status}` }));
    if (!resp.ok || data.ok === false) throw new Error(data.error || `HTTP ${resp.status}`);
    return data;
  }

  async function loadDeadLetters() {
    try {
      const data = await api("/api/deadletters");
      fill($("dlq").tBodies[0], data.dead_letters.map(deadRow));
      $("dlq-msg").textContent = data.dead_letters.length ? "" : "no dead letters";
    } catch (err) {
      $("dlq-msg").textContent = "dead letters: " + err.message;
    }
  }

  function deadRow(d) {
    const tr = cells(el("tr"), [d.id, d.group, d.type, d.attempts, when(d.last_failed)]);
    tr.dataset.id = d.id;
    tr.append(el("td", `${d.error_type}: ${d.error}`, "error"));
    const actions = el("td");
    for (const [name, run] of [
      ["show", () => showDead(d.id)],
      ["replay", () => act("replay", d.id)],
      ["purge", () => confirm(`Purge dead letter ${d.id}? It is deleted for good.`) && act("purge", d.id)],
    ]) {
      const b = el("button", name, name);
      b.type = "button";
      b.addEventListener("click", run);
      actions.append(b);
    }
    tr.append(actions);
    return tr;
  }

  async function showDead(id) {
    const pre = $("dlq-show");
    try {
      const data = await api(`/api/deadletters/${id}`);
      const { traceback, ...rest } = data.dead_letter;
      pre.textContent = JSON.stringify(rest, null, 2) + (traceback ? "\n\ntraceback:\n" + traceback : "");
    } catch (err) {
      pre.textContent = err.message;
    }
    pre.hidden = false;
    pre.dataset.id = id;
  }

  async function act(action, id) {
    try {
      const data = await api(`/api/deadletters/${action}`, { ids: [id] });
      $("dlq-result").textContent =
        action === "replay"
          ? `replayed ${data.replayed.length} dead letter(s): ` + data.replayed.map((r) => `#${r.id} as seq ${r.seq}`).join(", ")
          : `purged ${data.purged} dead letter(s)`;
    } catch (err) {
      $("dlq-result").textContent = `${action} failed: ${err.message}`;
    }
    loadDeadLetters();
  }
  $("dlq-refresh").addEventListener("click", loadDeadLetters);

  connect();
})();
