// edgemed dashboard: live updates without reload (Server-Sent Events from /api/stream).
//
// Each element <section data-fragment="/fragments/NAME"> is re-fetched (server-rendered, autoescaped HTML from
// the same origin) whenever the stream reports a change, at most one round of fetches every MIN_INTERVAL_MS, and
// never while the user is typing inside it (it is refreshed once the focus leaves). The indicator in the header
// ([data-live-indicator]) says "live" or "reconnecting". CSP-clean: no inline script or style, no eval.
(function () {
  "use strict";

  var MIN_INTERVAL_MS = 500; // at most 2 fetches a second
  var RETRY_MIN_MS = 2000;
  var RETRY_MAX_MS = 30000;
  var CHANGE_EVENTS = ["result", "device", "review"];

  var indicator = document.querySelector("[data-live-indicator]");
  var source = null;
  var retryMs = RETRY_MIN_MS;
  var lastRound = 0;
  var timer = null;
  var deferred = [];
  var connectedOnce = false;

  function regions() {
    return Array.prototype.slice.call(document.querySelectorAll("[data-fragment]"));
  }

  function show(state, text) {
    document.documentElement.setAttribute("data-live-state", state);
    if (!indicator) {
      return;
    }
    indicator.hidden = false;
    indicator.textContent = text;
    indicator.classList.remove("live", "reconnecting");
    indicator.classList.add(state);
  }

  function toLogin() {
    var here = window.location.pathname + window.location.search;
    window.location.assign("/login?next=" + encodeURIComponent(here));
  }

  function refresh(region) {
    var url = region.getAttribute("data-fragment");
    // Only this site's own paths: a fragment URL is never taken from anywhere but the page's own markup.
    if (!url || url.charAt(0) !== "/" || url.charAt(1) === "/") {
      return Promise.resolve();
    }
    if (region.contains(document.activeElement) && document.activeElement !== region) {
      if (deferred.indexOf(region) < 0) {
        deferred.push(region);
      }
      return Promise.resolve();
    }
    return fetch(url, { credentials: "same-origin", headers: { Accept: "text/html" }, cache: "no-store" })
      .then(function (answer) {
        if (answer.status === 401) {
          toLogin();
          return null;
        }
        return answer.ok ? answer.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined) {
          region.innerHTML = html;
          region.setAttribute("data-refreshed-at", String(Date.now()));
        }
      })
      .catch(function () {
        // the network is away: the stream's own reconnection says so, and the next event tries again
      });
  }

  function round() {
    timer = null;
    lastRound = Date.now();
    regions().forEach(refresh);
  }

  function schedule() {
    if (timer !== null) {
      return; // a round is due already: this change is in it
    }
    var wait = Math.max(0, lastRound + MIN_INTERVAL_MS - Date.now());
    timer = window.setTimeout(round, wait);
  }

  document.addEventListener("focusout", function () {
    window.setTimeout(function () {
      var waiting = deferred;
      deferred = [];
      waiting.forEach(function (region) {
        if (!region.contains(document.activeElement)) {
          refresh(region);
        } else {
          deferred.push(region);
        }
      });
    }, 0);
  });

  function reconnectLater() {
    show("reconnecting", "reconnecting");
    var wait = retryMs;
    retryMs = Math.min(RETRY_MAX_MS, retryMs * 2);
    window.setTimeout(function () {
      // A stream that ended because the session did: the login page, not a loop of refused streams.
      fetch("/api/me", { credentials: "same-origin", cache: "no-store" })
        .then(function (answer) {
          if (answer.status === 401) {
            toLogin();
          } else {
            connect();
          }
        })
        .catch(reconnectLater);
    }, wait);
  }

  function connect() {
    if (source !== null) {
      source.close();
    }
    source = new EventSource("/api/stream");
    source.addEventListener("hello", function () {
      retryMs = RETRY_MIN_MS;
      show("live", "live");
      if (connectedOnce) {
        schedule(); // what changed while the page was away
      }
      connectedOnce = true;
    });
    CHANGE_EVENTS.forEach(function (name) {
      source.addEventListener(name, schedule);
    });
    source.addEventListener("end", function () {
      source.close();
      source = null;
      reconnectLater();
    });
    source.onerror = function () {
      if (source !== null && source.readyState === EventSource.CLOSED) {
        source = null;
        reconnectLater(); // refused (401, 503): the browser will not retry by itself
      } else {
        show("reconnecting", "reconnecting"); // the browser retries by itself
      }
    };
  }

  if (typeof EventSource === "undefined") {
    return; // the page still works: reload it to see changes
  }
  window.addEventListener("pagehide", function () {
    if (source !== null) {
      source.close();
    }
  });
  connect();
})();
