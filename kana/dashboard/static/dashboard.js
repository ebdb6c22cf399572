/* The dashboard's only script: keeps progress panels current while a background job runs.
   Panels carry data-poll (a JSON URL answering {status, progress, summary}) and
   data-reload (the page to load once the job is done, which renders the final state). */
(function () {
  "use strict";

  function update(panel, state) {
    var bar = panel.querySelector("progress");
    var pct = Math.round((state.progress || 0) * 100);
    if (bar && !(state.status === "started" && state.kind === "billing")) { bar.value = pct; }
    var percent = panel.querySelector("[data-percent]");
    if (percent) { percent.textContent = pct + "%"; }
    var summary = panel.querySelector("[data-summary]");
    if (summary && state.summary) { summary.textContent = state.summary; }
  }

  function poll(panel) {
    var url = panel.getAttribute("data-poll");
    var reload = panel.getAttribute("data-reload");
    var tick = function () {
      fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (response) {
          if (!response.ok) { throw new Error(String(response.status)); }
          return response.json();
        })
        .then(function (state) {
          update(panel, state);
          if (state.status === "finished" || state.status === "failed") {
            if (reload) { window.setTimeout(function () { window.location.replace(reload); }, 400); }
            return;
          }
          window.setTimeout(tick, 400);
        })
        .catch(function () { window.setTimeout(tick, 2000); });
    };
    tick();
  }

  document.addEventListener("DOMContentLoaded", function () {
    Array.prototype.forEach.call(document.querySelectorAll("[data-poll]"), poll);
  });
})();
