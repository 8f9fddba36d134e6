// edgemed point-of-care screen: renders the device's Server-Sent Events (/events) into the page.
// Text goes in with textContent only and images only as data:image URLs, so nothing an event carries can run.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const tokenMeta = document.querySelector('meta[name="edgemed-screen-token"]');
  const token = tokenMeta ? tokenMeta.getAttribute("content") : "";
  const LEVEL_TEXT = {
    urgent: "URGENT", routine: "ROUTINE", no_finding: "NO FINDING", inconclusive: "INCONCLUSIVE",
    recapture: "RECAPTURE", error: "ERROR", waiting: "Waiting for the first image",
  };

  const CONNECTION_TEXT = {
    connected: "Broker connected", offline: "Offline: results kept", none: "No broker: results kept",
  };
  const SOURCE_TEXT = {
    connecting: "Source connecting", open: "Source live", reconnecting: "Source reconnecting",
    ended: "Source ended", stopped: "Source stopped", failed: "Source failed", closed: "Source closed",
    idle: "Source idle",
  };

  let held = false;       // the nurse froze the display; the device keeps running
  let mapOn = true;       // the overlay is wanted (when the frame has one)
  let latest = null;      // the newest frame event, shown or not
  let shown = null;       // the frame event on screen
  let shownMap = null;    // {map, map_kind, map_legend} of the frame on screen (CAM or occlusion)
  let status = null;

  function isImageUrl(value) {
    return typeof value === "string" && /^data:image\/(jpeg|png);base64,/.test(value);
  }

  function setText(el, text) {
    el.textContent = text == null ? "" : String(text);
  }

  function showIf(el, text) {
    setText(el, text);
    el.hidden = !text;
  }

  function renderMap() {
    const img = $("map");
    const legend = $("map-legend");
    const has = shownMap !== null && isImageUrl(shownMap.map);
    if (has && mapOn) {
      img.src = shownMap.map;
      img.hidden = false;
    } else {
      img.hidden = true;
      img.removeAttribute("src");
    }
    showIf(legend, has && mapOn ? shownMap.map_legend : "");
    const toggle = $("map-toggle");
    toggle.disabled = !has;
    toggle.setAttribute("aria-pressed", mapOn ? "true" : "false");
    setText(toggle, !has ? "Map: none" : mapOn ? "Map: on" : "Map: off");
    renderOcclusionButton();
  }

  function renderOcclusionButton() {
    const button = $("occlusion-button");
    const offered = status !== null && status.class_map === "occlusion";
    button.hidden = !offered;
    const classified = shown !== null && shown.confidence !== null;
    const running = status !== null && status.occlusion_running;
    button.disabled = !offered || !classified || running;
  }

  function renderFrame(d) {
    shown = d;
    document.body.setAttribute("data-seq", String(d.seq));
    const level = $("level");
    level.setAttribute("data-level", d.level);
    setText($("level-text"), d.level_text || LEVEL_TEXT[d.level] || d.level);
    showIf($("action"), d.action);
    showIf($("reason"), d.reason_repeats ? "" : d.reason);
    showIf($("recapture"), d.recapture);
    showIf($("ood-warning"), d.ood_warning);
    showIf($("confidence"), d.confidence);
    const quality = $("quality");
    if (d.quality) {
      quality.setAttribute("data-passed", d.quality.passed ? "true" : "false");
      showIf(quality, d.quality.text);
    } else {
      quality.setAttribute("data-passed", "");
      showIf(quality, "");
    }
    showIf($("frame-no"), "Image " + d.index + (d.name ? ": " + d.name : ""));
    const study = $("study");
    if (d.study) {
      const sl = $("study-level");
      sl.setAttribute("data-level", d.study.level);
      setText(sl, d.study.level_text);
      setText($("study-frames"), d.study.text);
      setText($("study-reason"), d.study.reason);
      study.hidden = false;
    } else {
      study.hidden = true;
    }
    const frame = $("frame");
    if (isImageUrl(d.frame)) {
      frame.src = d.frame;
      frame.hidden = false;
      $("no-image").hidden = true;
    } else {
      frame.hidden = true;
      frame.removeAttribute("src");
      setText($("no-image"), "This input could not be shown");
      $("no-image").hidden = false;
    }
    shownMap = isImageUrl(d.map) ? { map: d.map, map_kind: d.map_kind, map_legend: d.map_legend } : null;
    renderMap();
  }

  function renderStatus(s) {
    status = s;
    const conn = $("connection");
    conn.setAttribute("data-state", s.connection);
    setText(conn, CONNECTION_TEXT[s.connection] || s.connection);
    const pending = $("pending");
    let text = "To send: " + s.pending;
    if (s.awaiting_receipt) text += ", awaiting receipt: " + s.awaiting_receipt;
    setText(pending, text);
    pending.setAttribute("data-waiting", s.pending > 0 ? "true" : "false");
    const delegate = $("delegate");
    delegate.setAttribute("data-degraded", s.degraded ? "true" : "false");
    const accel = String(s.delegate || "-").toUpperCase();
    setText(delegate, s.degraded ? accel + " (degraded" + (s.degraded_reason ? ": " + s.degraded_reason : "") + ")" : accel);
    delegate.title = s.degraded && s.degraded_reason ? s.degraded_reason : "";
    setText($("source"), SOURCE_TEXT[s.source_state] || "Source: " + s.source_state);
    setText($("model"), s.model + " v" + s.model_version);
    renderOcclusionButton();
  }

  function onFrame(e) {
    latest = JSON.parse(e.data);
    if (!held) renderFrame(latest);
  }

  function onMap(e) {
    const d = JSON.parse(e.data);
    if (d.error) {
      setText($("control-note"), "Occlusion map: " + d.error);
      return;
    }
    setText($("control-note"), "");
    if (shown !== null && d.seq === shown.seq) {
      shownMap = { map: d.map, map_kind: d.map_kind, map_legend: d.map_legend };
      shown.map = d.map; shown.map_kind = d.map_kind; shown.map_legend = d.map_legend;
      mapOn = true;
      renderMap();
    }
  }

  function connect() {
    const source = new EventSource("/events");
    source.addEventListener("frame", onFrame);
    source.addEventListener("status", (e) => renderStatus(JSON.parse(e.data)));
    source.addEventListener("map", onMap);
    source.addEventListener("open", () => { $("screen-lost").hidden = true; });
    source.addEventListener("error", () => { $("screen-lost").hidden = false; });
  }

  $("hold-button").addEventListener("click", () => {
    held = !held;
    const button = $("hold-button");
    button.setAttribute("aria-pressed", held ? "true" : "false");
    setText(button, held ? "Resume live" : "Hold image");
    $("held-badge").hidden = !held;
    if (!held && latest !== null && latest !== shown) renderFrame(latest);
  });

  $("map-toggle").addEventListener("click", () => {
    mapOn = !mapOn;
    renderMap();
  });

  $("occlusion-button").addEventListener("click", () => {
    if (shown === null) return;
    const button = $("occlusion-button");
    button.disabled = true;
    setText($("control-note"), "Computing where the model looked (a few seconds)...");
    fetch("/occlusion", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Edgemed-Screen": token },
      body: JSON.stringify({ seq: shown.seq }),
      credentials: "same-origin",
      cache: "no-store",
    }).then((response) => response.json().then((body) => {
      if (response.status !== 202) setText($("control-note"), "Occlusion map: " + body.message);
    })).catch(() => {
      setText($("control-note"), "Occlusion map: the device did not answer");
    }).finally(renderOcclusionButton);
  });

  connect();
})();
