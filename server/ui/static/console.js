// Live refresh of the web console (every page works without it).
//
// One EventSource on /ui/events per page. On each "change" the page fetches its own URL again
// and swaps every element that has an id and data-live for its new version, when the server's
// HTML of it changed (so a form in a region keeps what is typed into it until its content
// changes). The refetch says "X-Fleet-Live: 1": it is not use of the session, so a page left
// alone still signs out after the idle limit. State for tests and styling:
// <html data-live-state="connecting|connected|closed" data-live-refreshes="N">.
"use strict";

(() => {
  const root = document.documentElement;
  const LOGIN_PATH = "/ui/login";
  const REOPEN_MS = 30000; // after a refused stream (503: too many open), try again this late

  let fetching = false;
  let again = false; // a change arrived while fetching: fetch once more after
  let hiddenChange = false; // a change arrived while the tab was hidden
  let opened = false;
  let source = null;
  // id -> the server's HTML of that live region as last shown (not the live DOM, which an
  // opened <details> or a typed value changes)
  const shown = new Map();

  root.dataset.liveRefreshes = "0";

  function remember(doc) {
    for (const region of doc.querySelectorAll("[data-live][id]")) {
      shown.set(region.id, region.outerHTML);
    }
  }

  function swap(fresh) {
    for (const old of document.querySelectorAll("[data-live][id]")) {
      const next = fresh.getElementById(old.id);
      // only our own same-origin page is parsed; nothing of it runs (DOMParser documents
      // never execute scripts) and the CSP forbids inline script anyway
      if (next === null || !next.hasAttribute("data-live")) continue;
      const html = next.outerHTML;
      if (shown.get(old.id) === html) continue;
      shown.set(old.id, html);
      old.replaceWith(document.importNode(next, true));
    }
    if (fresh.title) document.title = fresh.title;
    syncConfirms();
    root.dataset.liveRefreshes = String(Number(root.dataset.liveRefreshes) + 1);
  }

  async function refresh() {
    if (document.hidden) {
      hiddenChange = true;
      return;
    }
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    try {
      const response = await fetch(location.href, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "text/html", "X-Fleet-Live": "1" },
      });
      // the session ended: the page redirected to the sign-in page, which we show
      if (new URL(response.url).pathname === LOGIN_PATH) {
        location.assign(response.url);
        return;
      }
      if (response.ok) {
        const html = await response.text();
        swap(new DOMParser().parseFromString(html, "text/html"));
      }
    } catch {
      // the server is unreachable: the stream reconnects and refreshes when it is back
    } finally {
      fetching = false;
    }
    if (again) {
      again = false;
      refresh();
    }
  }

  function connect() {
    root.dataset.liveState = "connecting";
    source = new EventSource("/ui/events");
    source.addEventListener("open", () => {
      root.dataset.liveState = "connected";
      // a reopened stream (server restarted, session stream renewed) may have missed changes
      if (opened) refresh();
      opened = true;
    });
    source.addEventListener("change", () => refresh());
    source.addEventListener("error", () => {
      if (source.readyState !== EventSource.CLOSED) {
        root.dataset.liveState = "connecting"; // EventSource retries by itself
        return;
      }
      // refused (401: signed out; 503: too many streams): EventSource gives up. The refresh
      // goes to the sign-in page if the session is over; otherwise try again later.
      root.dataset.liveState = "closed";
      source = null;
      refresh();
      setTimeout(connect, REOPEN_MS);
    });
  }

  // A confirmation field (data-confirm="STOP") enables its form's buttons only when the
  // typed word matches; the server checks the word anyway.
  function syncConfirms() {
    for (const field of document.querySelectorAll("input[data-confirm]")) {
      const matches = field.value.trim() === field.dataset.confirm;
      const form = field.form;
      if (form === null) continue;
      for (const button of form.querySelectorAll("button[type=submit], button:not([type])")) {
        button.disabled = !matches;
      }
    }
  }

  document.addEventListener("input", (e) => {
    if (e.target instanceof HTMLInputElement && e.target.dataset.confirm !== undefined) {
      syncConfirms();
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && hiddenChange) {
      hiddenChange = false;
      refresh();
    }
  });

  remember(document);
  syncConfirms();
  if (typeof EventSource === "function") connect();
})();
