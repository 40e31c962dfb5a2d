// Keeps a dashboard's live parts current without reloading the page. Every few seconds it asks the
// page's live endpoint for its parts (the same templates the page was rendered from) and swaps in
// those that changed; forms that people type in stay outside them, so no typing is ever wiped.
// Messages shown after an action go away once the state they were about has changed.
"use strict";
(function () {
  const root = document.querySelector("[data-live-url]");
  if (!root) return;
  const connection = document.getElementById("connection");
  const shown = {};
  let scene = root.dataset.scene;
  let delay = Number(root.dataset.interval) || 3000;

  function apply(live) {
    for (const [id, html] of Object.entries(live.regions)) {
      const region = document.getElementById(id);
      if (region && shown[id] !== html) {
        region.innerHTML = html;
        shown[id] = html;
      }
    }
    for (const [id, visible] of Object.entries(live.visible || {})) {
      const element = document.getElementById(id);
      if (element) element.hidden = !visible;
    }
    if (live.scene !== scene) {
      scene = live.scene;
      root.dataset.scene = scene;
      document.querySelectorAll(".flash").forEach((flash) => flash.remove());
    }
    delay = live.interval || delay;
  }

  async function refresh() {
    try {
      const response = await fetch(root.dataset.liveUrl, {cache: "no-store", headers: {Accept: "application/json"}});
      if (!response.ok) throw new Error(`it answered ${response.status}`);
      apply(await response.json());
      connection.hidden = true;
    } catch (error) {
      connection.textContent = "This page's app does not answer: is its process running? The page keeps trying.";
      connection.hidden = false;
    }
    setTimeout(refresh, delay);
  }
  setTimeout(refresh, delay);
})();
