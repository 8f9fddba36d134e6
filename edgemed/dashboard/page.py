"""The dashboard's single HTML page: markup, inline CSS and inline JS (no CDN, works on an isolated network).

The script builds every piece of device-supplied text with ``textContent`` (never ``innerHTML``): device ids,
model names and triage reasons are attacker-controlled strings. ``web.py`` pins the script and the style by hash
in the Content-Security-Policy, so they are kept as separate constants.
"""

from __future__ import annotations

STYLE = """
:root { --fg:#1d2430; --muted:#5b6574; --line:#d9dee5; --bg:#f5f7fa; --card:#fff;
        --urgent:#b3261e; --ok:#1e7b34; --warn:#a35a00; --off:#6b7280; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
       background:var(--bg); }
header { display:flex; align-items:center; gap:16px; padding:12px 20px; background:#17324d; color:#fff; }
header h1 { font-size:18px; margin:0; font-weight:600; }
header .spacer { flex:1; }
header .conn { padding:3px 10px; border-radius:12px; font-size:12px; font-weight:600; background:#2e4a66; }
header .conn.ok { background:#1e7b34; }
header .conn.bad { background:#b3261e; }
main { padding:16px 20px; max-width:1400px; margin:0 auto; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:12px 16px;
          margin-bottom:16px; }
section h2 { font-size:15px; margin:0 0 8px; }
section p.hint { margin:0 0 8px; color:var(--muted); font-size:13px; }
table { width:100%; border-collapse:collapse; }
th, td { text-align:left; padding:6px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
th { font-size:12px; color:var(--muted); font-weight:600; white-space:nowrap; }
td.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
td.reason { max-width:520px; overflow-wrap:anywhere; }
.badge { display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; font-weight:600;
         white-space:nowrap; }
.online { background:#e3f4e7; color:var(--ok); }
.offline { background:#eceef1; color:var(--off); }
.unknown { background:#eceef1; color:var(--off); }
.degraded { background:#fdecd9; color:var(--warn); margin-left:6px; }
.lvl-urgent { background:#fbe3e1; color:var(--urgent); }
.lvl-routine { background:#e8eefb; color:#2450a6; }
.lvl-no_finding { background:#e3f4e7; color:var(--ok); }
.lvl-inconclusive, .lvl-recapture { background:#fdecd9; color:var(--warn); }
.lvl-error { background:#eceef1; color:var(--fg); }
.counts { display:flex; flex-wrap:wrap; gap:10px; }
.count { flex:1 1 120px; border:1px solid var(--line); border-radius:8px; padding:8px 12px; }
.count .n { font-size:22px; font-weight:700; font-variant-numeric:tabular-nums; }
.count .l { font-size:12px; color:var(--muted); }
.count.urgent .n { color:var(--urgent); }
#attention { border-color:#e6b3ae; }
#attention.clear { border-color:var(--line); }
button { font:inherit; font-size:13px; padding:3px 10px; border-radius:6px; border:1px solid #8a2a22;
         background:var(--urgent); color:#fff; cursor:pointer; }
button:disabled { opacity:.5; cursor:default; }
.toolbar { display:flex; gap:12px; align-items:center; margin-bottom:8px; flex-wrap:wrap; }
.toolbar label { color:var(--muted); font-size:13px; }
input, select { font:inherit; font-size:13px; padding:2px 6px; }
.empty { color:var(--muted); padding:8px; }
.note { color:var(--muted); font-size:12px; margin-left:6px; }
.alert { background:#fbe3e1; color:var(--urgent); border:1px solid #e6b3ae; border-radius:8px; padding:10px 16px;
         margin-bottom:16px; font-weight:600; }
.clipped { color:var(--muted); font-size:12px; }
.pager { display:flex; gap:8px; align-items:center; margin-top:8px; color:var(--muted); font-size:13px; }
.pager button { background:#fff; color:var(--fg); border-color:var(--line); }
.late { color:var(--warn); font-weight:600; }
footer { color:var(--muted); font-size:12px; padding:0 20px 20px; max-width:1400px; margin:0 auto; }
"""

SCRIPT = r"""
"use strict";
const LEVEL_NAMES = {urgent: "Urgent", routine: "Routine", no_finding: "No finding",
                     inconclusive: "Inconclusive", recapture: "Recapture needed", error: "Error"};
const REFRESH_MS = 3000;
const FLEET_PAGE = 100;
const RESULTS_PAGE = 50;
let lastNow = null;
let fleetOffset = 0;
let resultsOffset = 0;

function clip(text, max) {
  // Device text is limited at ingest, but a database written by an older dashboard may hold anything: a 20,000
  // character reason froze the page. Show the start and say that the rest is left out.
  if (text === null || text === undefined) return "";
  const s = String(text);
  if (s.length <= max) return s;
  return el("span", {}, s.slice(0, max) + "…",
    el("span", {class: "clipped"}, " (shortened: " + s.length.toLocaleString() + " characters in all)"));
}

function pager(id, offset, shown, total, pageSize, onMove, noun) {
  // total is null when unknown (results): then "Older" is offered whenever a full page came back.
  const box = document.getElementById(id);
  box.replaceChildren();
  const more = total === null ? shown === pageSize : offset + shown < total;
  if (offset === 0 && !more) { box.hidden = true; return; }
  box.hidden = false;
  const prev = el("button", {type: "button"}, "← Previous");
  prev.disabled = offset === 0;
  prev.addEventListener("click", () => onMove(Math.max(0, offset - pageSize)));
  const next = el("button", {type: "button"}, "Next →");
  next.disabled = !more;
  next.addEventListener("click", () => onMove(offset + pageSize));
  const range = shown ? (offset + 1) + "–" + (offset + shown) : "none";
  box.append(prev, next, el("span", {}, noun + " " + range + (total === null ? "" : " of " + total)));
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  if (seconds < 5) return "just now";
  if (seconds < 90) return Math.round(seconds) + " s ago";
  if (seconds < 5400) return Math.round(seconds / 60) + " min ago";
  if (seconds < 172800) return Math.round(seconds / 3600) + " h ago";
  return Math.round(seconds / 86400) + " days ago";
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
  return Math.round(seconds / 86400) + " days";
}

function num(v, digits) {
  return (v === null || v === undefined) ? "—" : Number(v).toFixed(digits);
}

function finding(label, top) {
  // The label triage acted on; an urgent class can win although another class is more likely, and then the
  // nurse must see both, not "normal_benign" beside "suspicious for malignancy".
  const cell = el("td", {class: "finding"}, clip(label, 80));
  if (top && top !== label) cell.append(el("span", {class: "note top"}, "(top prediction: " + clip(top, 80) + ")"));
  return cell;
}

function levelBadge(level) {
  return el("span", {class: "badge lvl-" + (LEVEL_NAMES[level] ? level : "error")}, LEVEL_NAMES[level] || level);
}

function replaceBody(tbodyId, rows, columns, emptyText) {
  const body = document.getElementById(tbodyId);
  body.replaceChildren();
  if (rows.length === 0) {
    body.append(el("tr", {}, el("td", {colspan: String(columns), class: "empty"}, emptyText)));
  }
  for (const r of rows) body.append(r);
}

async function getJson(path) {
  const resp = await fetch(path, {cache: "no-store"});
  if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
  return resp.json();
}

async function acknowledge(resultId, button) {
  button.disabled = true;
  const by = document.getElementById("ack-by").value;
  try {
    const resp = await fetch("/api/ack/" + encodeURIComponent(resultId), {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({by: by})});
    if (!resp.ok) throw new Error("HTTP " + resp.status);
  } catch (err) {
    button.disabled = false;
    setStatus("Could not record the acknowledgement: " + err.message, false);
    return;
  }
  refresh();
}

function setStatus(text, ok) {
  const conn = document.getElementById("conn");
  conn.textContent = text;
  conn.className = "conn " + (ok ? "ok" : "bad");
}

function renderSummary(data) {
  const now = data.now;
  const counts = document.getElementById("counts");
  counts.replaceChildren();
  for (const [level, name] of Object.entries(LEVEL_NAMES)) {
    const n = data.counts.results[level] || 0;
    const s = data.counts.studies[level] || 0;
    counts.append(el("div", {class: "count " + level, "data-level": level},
      el("div", {class: "n"}, n),
      el("div", {class: "l"}, name + (s ? " · " + s + (s === 1 ? " study" : " studies") : ""))));
  }
  const rows = data.attention.map((a) => {
    const button = el("button", {type: "button", "data-result": a.result_id}, "Acknowledge");
    button.addEventListener("click", () => acknowledge(a.result_id, button));
    const what = a.kind === "study" ? "Study of " + a.frames + " images" : "Result #" + a.seq;
    return el("tr", {class: "urgent-row"},
      el("td", {class: "late"}, duration(now - a.received_at)),
      el("td", {}, a.site), el("td", {}, a.device_id), el("td", {}, what),
      finding(a.label, a.top_label),
      el("td", {class: "reason"}, clip(a.reason, 300)),
      el("td", {}, button));
  });
  const waiting = data.attention_total;
  if (waiting > rows.length) {
    rows.push(el("tr", {class: "more-row"}, el("td", {colspan: "7", class: "empty"},
      "…and " + (waiting - rows.length) + " more waiting: acknowledge the oldest first and they move up.")));
  }
  replaceBody("attention-body", rows, 7, "No urgent result is waiting for review.");
  document.getElementById("attention").className = waiting ? "" : "clear";
  document.getElementById("attention-count").textContent = waiting ? "(" + waiting + ")" : "";
  const ing = data.ingest;
  const workers = data.workers || [];
  if (ing === null && workers.length) {
    // A web process of its own (edgemed dashboard serve): the ingest workers report through the database.
    const live = workers.filter((w) => w.stats.connected && data.now - w.last_at < 30);
    setStatus(live.length + " of " + workers.length + " ingest workers receiving from the broker", live.length > 0);
  } else if (ing === null) {
    setStatus("No broker connection configured", false);
  } else if (ing.connected) {
    setStatus("Receiving from broker", true);
  } else {
    setStatus(ing.broker_error || "Not connected to the broker", false);
  }
  const alert = document.getElementById("store-alert");
  const failing = ing === null ? workers.filter((w) => w.stats.store_failing && data.now - w.last_at < 30) : [];
  alert.hidden = !(ing && ing.store_error) && !failing.length;
  if (failing.length) {
    alert.textContent = "Results are not being saved by ingest worker " +
      failing.map((w) => clip(w.worker_id, 80) + " (" + w.stats.held + " messages held back)").join(", ") +
      ": the database does not take its writes; see that worker's log. Nothing is acknowledged to the broker " +
      "before it is saved.";
  }
  if (ing && ing.store_error) {
    alert.textContent = "Results are not being saved: " + clip(ing.store_error, 300) + ". " + ing.held +
      " messages are held back, not yet acknowledged to the broker, and saved as soon as the database takes " +
      "writes again" + (ing.retry_in_s === null ? "." : " (next attempt in " + duration(ing.retry_in_s) + ").");
  }
  if (ing !== null) {
    document.getElementById("ingest").textContent = "Since start: messages received: " + ing.received +
      " · results stored: " + ing.stored + " · duplicates dropped: " + ing.duplicates +
      " · messages refused: " + ing.rejected;
  } else {
    document.getElementById("ingest").textContent = workers.map((w) => "Worker " + clip(w.worker_id, 80) +
      (w.group ? " (group " + clip(w.group, 80) + ")" : "") + ": " +
      (w.stats.connected && data.now - w.last_at < 30 ? "receiving" : "not receiving") +
      (w.stats.store_failing ? ", NOT SAVING (" + w.stats.held + " held back)" : "") +
      ", since its start: messages received: " + w.stats.received + " · results stored: " + w.stats.stored +
      " · duplicates dropped: " + w.stats.duplicates + " · messages refused: " + w.stats.rejected +
      " · last report " + duration(Math.max(0, data.now - w.last_at)) + " ago").join(" — ");
  }
  renderDeadLetters(data.dead_letters);
}

function renderDeadLetters(counts) {
  // Refused messages by reason, since the database was created: a device sending broken payloads shows here.
  const entries = Object.entries(counts || {});
  const total = entries.reduce((sum, [, n]) => sum + n, 0);
  document.getElementById("dead").hidden = total === 0;
  document.getElementById("dead-count").textContent = total ? "(" + total + ")" : "";
  const rows = entries.map(([reason, n]) => el("tr", {class: "dead-row"},
    el("td", {class: "num"}, n), el("td", {class: "reason"}, reason)));
  replaceBody("dead-body", rows, 2, "No message was refused.");
}

function load(d) {
  // CPU in percent of one core, the hottest thermal zone, and peak memory: what a fanless or battery-powered
  // device is costing. A figure the device did not send is left out.
  const parts = [];
  if (typeof d.cpu_percent === "number") parts.push("CPU " + num(d.cpu_percent, 0) + "%");
  if (typeof d.cpu_temp_c === "number") parts.push(num(d.cpu_temp_c, 0) + " °C");
  if (typeof d.peak_rss_mb === "number") parts.push(num(d.peak_rss_mb, 0) + " MB");
  return parts.length ? parts.join(" · ") : "—";
}

function renderFleet(data) {
  const now = data.now;
  const rows = data.devices.map((d) => {
    const stateNames = {online: "Online", offline: "Offline", unknown: "Unknown"};
    const state = el("span", {class: "badge " + (d.state === "online" ? "online" : "offline")},
      Object.hasOwn(stateNames, d.state) ? stateNames[d.state] : clip(d.state, 32));
    const connection = el("td", {}, state);
    if (d.offline_reason) {
      connection.append(el("span", {class: d.ended_abnormally ? "note late" : "note"}, clip(d.offline_reason, 120)));
    }
    if (d.ended_abnormally) {
      connection.setAttribute("title", "the device did not stop cleanly: check it and its log; results it had " +
        "not sent stay on its disk and go out at its next run");
    }
    const delegate = el("td", {}, clip(d.delegate, 20) || "—");
    if (d.degraded) {
      const badge = el("span", {class: "badge degraded"}, "DEGRADED");
      if (d.degraded_reason) badge.setAttribute("title", String(d.degraded_reason).slice(0, 300));
      delegate.append(badge);
    }
    const lastHeard = el("td", {class: "num"}, ago(now - d.last_seen));
    if (d.silent) {
      lastHeard.classList.add("late");
      lastHeard.setAttribute("title", "online, but no heartbeat for over 2 minutes: check the device");
      lastHeard.append(el("span", {class: "badge degraded"}, "SILENT"));
    }
    const pending = el("td", {class: "num"}, d.pending === null || d.pending === undefined ? "—" : d.pending);
    if (d.outbox_full) pending.append(el("span", {class: "badge degraded"}, "FULL"));
    // Settled without being stored: refused here (dead letters with a seq) or lost at the device for good.
    if (d.rejected) pending.append(el("span", {class: "note late settled-rejected"}, d.rejected + " refused"));
    if (d.lost) pending.append(el("span", {class: "note late settled-lost"}, d.lost + " lost at the device"));
    return el("tr", {class: "device-row", "data-device": d.device_id},
      el("td", {}, d.device_id), el("td", {}, d.site), connection, delegate, pending,
      el("td", {class: "num"}, duration(d.oldest_pending_s)),
      el("td", {class: "num"}, num(d.fps, 1)),
      el("td", {class: "num"}, d.p95_ms === null || d.p95_ms === undefined ? "—" : num(d.p95_ms, 1) + " ms"),
      el("td", {class: "num load"}, load(d)),
      lastHeard);
  });
  replaceBody("fleet-body", rows, 10, "No device has reported yet.");
  pager("fleet-pager", data.offset, rows.length, data.total, FLEET_PAGE,
    (offset) => { fleetOffset = offset; refresh(); }, "Devices");
  const hidden = document.getElementById("fleet-hidden");
  hidden.textContent = data.hidden ? data.hidden + (data.hidden === 1 ? " device" : " devices") +
    " not heard from for over " + duration(data.expire_after_s) + " not shown." : "";
}

function renderResults(data) {
  const now = data.now;
  const rows = data.results.map((r) => el("tr", {class: "result-row"},
    el("td", {}, ago(now - r.received_at)), el("td", {}, r.site), el("td", {}, r.device_id),
    el("td", {class: "num"}, r.seq), el("td", {}, levelBadge(r.level)),
    finding(r.label, r.top_label), el("td", {class: "reason"}, clip(r.reason, 300)),
    el("td", {}, r.acked_at ? "Seen" + (r.acked_by ? " by " + clip(r.acked_by, 64) : "") : "")));
  replaceBody("results-body", rows, 8, resultsOffset ? "No older results." : "No results yet.");
  pager("results-pager", data.offset, rows.length, null, RESULTS_PAGE,
    (offset) => { resultsOffset = offset; refresh(); }, "Results");
}

async function refresh() {
  const level = document.getElementById("level").value;
  try {
    const [summary, fleet, results] = await Promise.all([
      getJson("/api/summary"), getJson("/api/fleet?limit=" + FLEET_PAGE + "&offset=" + fleetOffset),
      getJson("/api/results?limit=" + RESULTS_PAGE + "&offset=" + resultsOffset +
              (level ? "&level=" + encodeURIComponent(level) : ""))]);
    renderSummary(summary);
    renderFleet(fleet);
    renderResults(results);
    lastNow = summary.now;
    document.getElementById("updated").textContent = "Updated " + new Date(lastNow * 1000).toLocaleTimeString();
  } catch (err) {
    setStatus("Dashboard server not answering (" + err.message + ")", false);
  }
}

document.getElementById("level").addEventListener("change", () => { resultsOffset = 0; refresh(); });
refresh();
setInterval(refresh, REFRESH_MS);
"""

PAGE_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>edgemed fleet dashboard</title>
<style>/*STYLE*/</style>
</head>
<body>
<header>
  <h1>edgemed fleet dashboard</h1>
  <span id="conn" class="conn">Connecting…</span>
  <span class="spacer"></span>
  <span id="updated"></span>
</header>
<main>
  <div id="store-alert" class="alert" hidden></div>
  <section id="attention">
    <h2>Urgent results waiting for review <span id="attention-count"></span></h2>
    <p class="hint">Oldest first. Acknowledge a result once a clinician has looked at it on the device.</p>
    <div class="toolbar"><label for="ack-by">Your initials (recorded with the acknowledgement)</label>
      <input id="ack-by" maxlength="16" size="6" autocomplete="off"></div>
    <table>
      <thead><tr><th>Waiting</th><th>Site</th><th>Device</th><th>What</th><th>Finding</th><th>Why urgent</th>
        <th></th></tr></thead>
      <tbody id="attention-body"></tbody>
    </table>
  </section>
  <section>
    <h2>Results by triage level</h2>
    <div id="counts" class="counts"></div>
  </section>
  <section>
    <h2>Devices</h2>
    <p class="hint">"Waiting to send" counts results stored on the device that the broker has not yet received;
      under it, results this dashboard refused (kept as dead letters) and results the device lost for good.
      DEGRADED means the device runs on a fallback instead of its intended accelerator.</p>
    <table>
      <thead><tr><th>Device</th><th>Site</th><th>Connection</th><th>Accelerator</th><th>Waiting to send</th>
        <th>Oldest waiting</th><th>Images/s</th><th>Slowest 5% (p95)</th><th>Load</th>
        <th>Last heard from</th></tr></thead>
      <tbody id="fleet-body"></tbody>
    </table>
    <div id="fleet-pager" class="pager" hidden></div>
    <p id="fleet-hidden" class="hint"></p>
  </section>
  <section>
    <h2>Recent results</h2>
    <div class="toolbar"><label for="level">Show</label>
      <select id="level">
        <option value="">all levels</option><option value="urgent">Urgent</option>
        <option value="routine">Routine</option><option value="no_finding">No finding</option>
        <option value="inconclusive">Inconclusive</option><option value="recapture">Recapture needed</option>
        <option value="error">Error</option>
      </select></div>
    <table>
      <thead><tr><th>Received</th><th>Site</th><th>Device</th><th>Result #</th><th>Level</th><th>Finding</th>
        <th>Reason</th><th>Reviewed</th></tr></thead>
      <tbody id="results-body"></tbody>
    </table>
    <div id="results-pager" class="pager" hidden></div>
  </section>
  <section id="dead" hidden>
    <h2>Refused messages <span id="dead-count"></span></h2>
    <p class="hint">Messages the dashboard could not use (broken, too large, wrong schema). Each was acknowledged
      to the broker, so none blocks the others, and kept with its raw bytes in the database's dead_letters table.</p>
    <table>
      <thead><tr><th>Count</th><th>Why refused</th></tr></thead>
      <tbody id="dead-body"></tbody>
    </table>
  </section>
</main>
<footer><span id="ingest"></span><br>
  Shows only what devices publish: triage results, device state and counters. No images, names or patient ids.
</footer>
<script>/*SCRIPT*/</script>
</body>
</html>
"""
