// choreograph console: live updates without reloading. Every few seconds the page asks its own
// URL for the part that changes (header X-Live: 1) and swaps it in, keeping open <details> open.
// Nothing is loaded from anywhere else.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!live) { return; }
  var every = parseInt(live.getAttribute("data-refresh") || "2000", 10);
  var dot = document.querySelector(".live-dot");
  var busy = false;

  function openKeys() {
    var keys = {};
    live.querySelectorAll("details[open][data-key]").forEach(function (d) {
      keys[d.getAttribute("data-key")] = true;
    });
    return keys;
  }

  function refresh() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(window.location.href, { headers: { "X-Live": "1" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.status === 401) { window.location.reload(); return null; }
        if (!response.ok) { throw new Error("status " + response.status); }
        return response.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        var keys = openKeys();
        var scrollX = {};
        live.querySelectorAll(".graph-wrap").forEach(function (g, i) { scrollX[i] = g.scrollLeft; });
        live.innerHTML = html;
        live.querySelectorAll("details[data-key]").forEach(function (d) {
          if (keys[d.getAttribute("data-key")]) { d.setAttribute("open", ""); }
        });
        live.querySelectorAll(".graph-wrap").forEach(function (g, i) { g.scrollLeft = scrollX[i] || 0; });
        live.setAttribute("data-updated", String(Date.now()));
        if (dot) { dot.classList.remove("stale"); }
      })
      .catch(function () { if (dot) { dot.classList.add("stale"); } })
      .then(function () { busy = false; });
  }

  window.setInterval(refresh, every);
  document.addEventListener("visibilitychange", refresh);
})();
