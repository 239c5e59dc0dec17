// The Keel console: a small single-page app over the public /v1 API.
//
// No framework and no build step: the DOM is built with `h()` (text is
// always set as text, never parsed as HTML), pages are chosen by the URL's
// hash, and each page re-reads what it shows when GET /v1/watch says that
// kind of resource changed. The token lives in sessionStorage: this tab
// only, gone when it closes.
"use strict";

(() => {
  const TOKEN_KEY = "keel.token";
  // Every kind of resource /v1/watch names.
  const ALL = ["projects", "apps", "instances", "nodes", "events"];
  // A stream that says nothing (not even its keepalive) for this long is dead.
  const WATCH_SILENCE_MS = 30000;
  const LOG_LINES_KEPT = 2000;
  const MIN_UPDATE_GAP_MS = 250;

  const main = document.getElementById("main");
  const live = document.getElementById("live");
  const nav = document.getElementById("nav");
  const signOutButton = document.getElementById("sign-out");
  const toast = document.getElementById("toast");

  const enc = encodeURIComponent;
  const appPath = (project, app) => `/v1/projects/${enc(project)}/apps/${enc(app)}`;
  const logsPath = (project, app) => `${appPath(project, app)}/logs?follow=true&tail=100`;

  // ---------------------------------------------------------------- DOM

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else if (key === "class") el.className = value;
      else el.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : String(child));
    }
    return el;
  }

  // A titled panel: a section labelled by its own heading.
  function panel(id, title, ...children) {
    return h("section", { class: "panel", "aria-labelledby": id }, h("h2", { id }, title), ...children);
  }

  // Replaces what `box` shows with `content` (a node, text, or a nested
  // array of them).
  function fill(box, ...content) {
    box.replaceChildren(...content.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  }

  function badge(word) {
    return h("span", { class: `badge ${word}` }, word);
  }

  function fmtTime(ms) {
    if (!ms) return "";
    const date = new Date(ms);
    const today = new Date().toDateString() === date.toDateString();
    return today ? date.toLocaleTimeString() : date.toLocaleString();
  }

  function fmtMb(mb) {
    return mb >= 1024 ? `${(mb / 1024).toFixed(mb % 1024 ? 1 : 0)} GB` : `${mb} MB`;
  }

  function fmtBytes(bytes) {
    if (bytes === null || bytes === undefined) return "\u2014";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let n = bytes;
    let unit = 0;
    while (n >= 1024 && unit < units.length - 1) {
      n /= 1024;
      unit += 1;
    }
    return `${n.toFixed(unit && n < 10 ? 1 : 0)} ${units[unit]}`;
  }

  function fmtCpu(millis) {
    if (millis === null || millis === undefined) return "\u2014";
    return millis >= 1000 ? `${(millis / 1000).toFixed(2)} cores` : `${millis}m`;
  }

  // A labelled capacity bar: `used` of `total`, in words beside it.
  function bar(label, used, total, words) {
    const share = total > 0 ? Math.min(1, used / total) : 0;
    const fill = h("div", { class: `fill${share >= 1 ? " full" : share >= 0.8 ? " high" : ""}` });
    fill.style.width = `${(share * 100).toFixed(1)}%`;
    return h(
      "div",
      { class: "bar" },
      h("span", {}, label),
      h(
        "div",
        {
          class: "track",
          role: "meter",
          "aria-label": `${label}: ${words}`,
          "aria-valuemin": 0,
          "aria-valuemax": total,
          "aria-valuenow": used,
        },
        fill,
      ),
      h("span", { class: "mono" }, words),
    );
  }

  function capacityBars(node) {
    const cap = node.capacity || {};
    const used = node.allocated || { cpu_millis: 0, memory_mb: 0, instances: 0 };
    return [
      bar("CPU", used.cpu_millis, cap.cpu_millis, `${fmtCpu(used.cpu_millis)} / ${fmtCpu(cap.cpu_millis)}`),
      bar("Memory", used.memory_mb, cap.memory_mb, `${fmtMb(used.memory_mb)} / ${fmtMb(cap.memory_mb)}`),
      bar("Instances", used.instances, cap.max_instances, `${used.instances} / ${cap.max_instances}`),
    ];
  }

  // A table that becomes one card per row on a phone (see style.css).
  function table(columns, rows, empty) {
    if (!rows.length) return h("p", { class: "muted" }, empty);
    return h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { class: "cards" },
        h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col", class: c.num ? "num" : null }, c.label)))),
        h(
          "tbody",
          {},
          rows.map((row) =>
            h(
              "tr",
              row.attrs || {},
              columns.map((c, i) => h("td", { "data-label": c.label, class: c.num ? "num" : null }, row.cells[i])),
            ),
          ),
        ),
      ),
    );
  }

  function eventsList(events) {
    if (!events.length) return h("p", { class: "muted" }, "No events yet.");
    return h(
      "ol",
      { class: "events" },
      events
        .slice()
        .reverse()
        .map((e) =>
          h(
            "li",
            {},
            h("time", { datetime: new Date(e.time_ms).toISOString() }, fmtTime(e.time_ms)),
            h("span", {}, h("span", { class: "reason" }, e.reason), e.message),
          ),
        ),
    );
  }

  // An instance's measured usage, when its agent reports it (an older
  // controller or agent does not: shown as a dash).
  function stat(instance, name) {
    const value = instance[name] ?? (instance.stats || {})[name];
    return typeof value === "number" ? value : null;
  }

  function addresses(instance) {
    const ports = Object.entries(instance.ports || {});
    if (!ports.length) return "\u2014";
    return ports.map(([name, addr]) => h("div", { class: "mono" }, `${name} ${addr}`));
  }

  function state(instance) {
    const words = [badge(instance.state)];
    if (instance.reason) words.push(h("div", { class: "muted" }, instance.reason));
    if (instance.pending_reason) words.push(h("div", { class: "muted" }, instance.pending_reason));
    return words;
  }

  function showError(error) {
    toast.textContent = error.message || String(error);
    toast.hidden = false;
    clearTimeout(showError.timer);
    showError.timer = setTimeout(() => {
      toast.hidden = true;
    }, 8000);
  }

  // Asks before an action; resolves true when confirmed.
  function confirmAction(text, okLabel, danger) {
    const dialog = document.getElementById("confirm");
    const ok = document.getElementById("confirm-ok");
    document.getElementById("confirm-text").textContent = text;
    ok.textContent = okLabel;
    ok.className = danger ? "danger" : "";
    dialog.returnValue = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
      dialog.showModal();
    });
  }

  // ---------------------------------------------------------------- API

  class ApiError extends Error {
    constructor(status, message, problems) {
      super(message);
      this.status = status;
      this.problems = problems || [];
    }
  }

  // The API's own words for a failed response: its ErrorBody's message.
  async function apiError(response) {
    let message = `${response.status} ${response.statusText}`.trim();
    let problems = [];
    try {
      const body = await response.json();
      if (body && typeof body.message === "string") {
        message = body.message;
        problems = body.problems || [];
      }
    } catch (_) {
      // Not the API's JSON (a proxy's page?): the status says it.
    }
    return new ApiError(response.status, message, problems);
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(method, path, body, withToken) {
    const headers = { Authorization: `Bearer ${withToken ?? token()}` };
    const init = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(path, init);
    if (!response.ok) {
      const error = await apiError(response);
      // A token that stopped working ends the session (not so while
      // signing in, where the error belongs on the form).
      if (response.status === 401 && withToken === undefined) signOut(error.message);
      throw error;
    }
    return response.json();
  }

  // ---------------------------------------------------------------- live

  let watching = null;

  function setLive(on) {
    live.textContent = on ? "Live" : "Reconnecting\u2026";
    live.className = `live ${on ? "on" : "off"}`;
  }

  // Holds GET /v1/watch open (fetch, not EventSource, which cannot send
  // the token) and refreshes the page on each change; reconnects with
  // backoff, and re-reads everything on each new stream.
  async function watch() {
    const session = {};
    watching = session;
    let delay = 500;
    while (watching === session && token()) {
      const abort = new AbortController();
      session.abort = abort;
      let silence;
      const quiet = () => {
        clearTimeout(silence);
        silence = setTimeout(() => abort.abort(), WATCH_SILENCE_MS);
      };
      try {
        quiet();
        const response = await fetch("/v1/watch", {
          headers: { Authorization: `Bearer ${token()}` },
          signal: abort.signal,
        });
        if (response.status === 401) {
          signOut((await apiError(response)).message);
          return;
        }
        if (!response.ok) throw await apiError(response);
        setLive(true);
        delay = 500;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          quiet();
          buffer += value;
          let end;
          while ((end = buffer.indexOf("\n")) >= 0) {
            const line = buffer.slice(0, end).trim();
            buffer = buffer.slice(end + 1);
            if (!line) continue;
            const message = JSON.parse(line);
            refresh(message.changed && message.changed.length ? message.changed : ALL);
          }
        }
      } catch (_) {
        // Reconnect below.
      } finally {
        clearTimeout(silence);
      }
      if (watching !== session) return;
      setLive(false);
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 8000);
    }
  }

  function stopWatching() {
    if (watching && watching.abort) watching.abort.abort();
    watching = null;
    live.textContent = "";
    live.className = "live";
  }

  // One page update at a time; changes during one make one more.
  let page = null;
  let updating = false;
  let pending = null;

  async function refresh(kinds) {
    if (!page) return;
    if (updating) {
      pending = new Set([...(pending || []), ...kinds]);
      return;
    }
    if (!kinds.some((k) => page.kinds.includes(k))) return;
    updating = true;
    try {
      await page.update();
    } catch (error) {
      if (error.status !== 401) showError(error);
    } finally {
      updating = false;
    }
    if (pending) {
      // A busy cluster changes all the time: re-read at most a few times
      // a second, and never two reads at once.
      const next = [...pending];
      pending = null;
      updating = true;
      setTimeout(() => {
        const kinds = [...next, ...(pending || [])];
        pending = null;
        updating = false;
        refresh(kinds);
      }, MIN_UPDATE_GAP_MS);
    }
  }

  // ---------------------------------------------------------------- pages

  function signInPage(message) {
    const input = h("input", {
      type: "password",
      id: "token",
      name: "token",
      autocomplete: "off",
      spellcheck: "false",
      required: true,
      "aria-describedby": "token-help",
    });
    const error = h("p", { class: "error", id: "sign-in-error", role: "alert" }, message || "");
    const button = h("button", { type: "submit", id: "sign-in" }, "Sign in");
    const form = h(
      "form",
      {
        class: "panel signin",
        onsubmit: async (event) => {
          event.preventDefault();
          const candidate = input.value.trim();
          error.textContent = "";
          button.disabled = true;
          try {
            // Any admin call proves the token; the API's answer says why not.
            await api("GET", "/v1/nodes", undefined, candidate);
            sessionStorage.setItem(TOKEN_KEY, candidate);
            startSession();
            go("#/");
          } catch (e) {
            error.textContent = e.message;
            input.focus();
          } finally {
            button.disabled = false;
          }
        },
      },
      h("h1", {}, "Sign in to Keel"),
      h("label", { for: "token" }, "API token"),
      input,
      h(
        "p",
        { class: "muted", id: "token-help" },
        "The admin token is in admin.token in the controller's data directory. It is kept in this tab only.",
      ),
      button,
      error,
    );
    return { el: form, title: "Sign in", kinds: [], update: async () => {}, focus: input };
  }

  function overviewPage() {
    const nodesBox = h("div", { id: "regions" }, h("p", { class: "muted" }, "Loading\u2026"));
    const appsBox = h("div", { id: "apps" });
    const eventsBox = h("div", { id: "events" });
    const el = h(
      "div",
      {},
      h("h1", {}, "Overview"),
      panel("nodes-title", "Regions, zones and nodes", nodesBox),
      h(
        "div",
        { class: "grid" },
        panel("apps-title", "Apps", appsBox),
        panel("events-title", "Recent events", eventsBox),
      ),
    );
    async function update() {
      const [nodes, apps, instances, events] = await Promise.all([
        api("GET", "/v1/nodes"),
        api("GET", "/v1/apps"),
        api("GET", "/v1/instances"),
        api("GET", "/v1/events?limit=20"),
      ]);
      fill(nodesBox, regions(nodes));
      fill(appsBox, appsTable(apps, instances));
      fill(eventsBox, eventsList(events));
    }
    return { el, title: "Overview", kinds: ALL, update };
  }

  function regions(nodes) {
    if (!nodes.length) return h("p", { class: "muted" }, "No nodes have joined yet.");
    const byRegion = new Map();
    for (const node of nodes) {
      if (!byRegion.has(node.region)) byRegion.set(node.region, new Map());
      const zones = byRegion.get(node.region);
      if (!zones.has(node.zone)) zones.set(node.zone, []);
      zones.get(node.zone).push(node);
    }
    return [...byRegion.entries()].sort().map(([region, zones]) =>
      h(
        "section",
        { class: "region" },
        h("h3", {}, `Region ${region}`),
        h("div", { class: "zones" }, [...zones.entries()].sort().map(([zone, members]) =>
          h(
            "div",
            { class: "zone" },
            h("h3", {}, `Zone ${zone}`),
            h(
              "div",
              { class: "nodes" },
              members.map((node) =>
                h(
                  "article",
                  { class: "node", "data-node": node.name, "aria-label": `Node ${node.name}` },
                  h("header", {}, h("a", { href: `#/nodes/${enc(node.name)}` }, node.name), badge(node.status)),
                  capacityBars(node),
                ),
              ),
            ),
          ),
        )),
      ),
    );
  }

  function appsTable(apps, instances) {
    const counts = new Map();
    for (const i of instances) {
      const key = `${i.project}/${i.app}`;
      const c = counts.get(key) || { ready: 0, total: 0 };
      c.total += 1;
      if (i.ready) c.ready += 1;
      counts.set(key, c);
    }
    return table(
      [{ label: "App" }, { label: "Project" }, { label: "Revision", num: true }, { label: "Healthy", num: true }],
      apps.map((app) => {
        const c = counts.get(`${app.project}/${app.name}`) || { ready: 0, total: 0 };
        const healthy = c.total > 0 && c.ready === c.total;
        return {
          attrs: { "data-app": `${app.project}/${app.name}` },
          cells: [
            h("a", { href: `#/apps/${enc(app.project)}/${enc(app.name)}` }, app.name),
            app.project,
            app.revision,
            h("span", { class: healthy ? "badge healthy" : "badge degraded", "data-healthy": `${c.ready}/${c.total}` }, `${c.ready}/${c.total}`),
          ],
        };
      }),
      "No apps yet. Deploy one with keel deploy.",
    );
  }

  function cause(revision) {
    const c = revision.cause || {};
    switch (c.kind) {
      case "rollback":
        return `rollback to ${c.to_revision}`;
      case "scale":
        return `scale to ${c.instances}`;
      case "restart":
        return "rolling restart";
      default:
        return c.kind || "";
    }
  }

  function count(manifest) {
    return manifest.global ? "global" : manifest.instances;
  }

  function appPage(project, name) {
    const base = appPath(project, name);
    const summary = h("div", { id: "summary" }, h("p", { class: "muted" }, "Loading\u2026"));
    const history = h("div", { id: "history" });
    const instancesBox = h("div", { id: "instances" });
    const eventsBox = h("div", { id: "app-events" });
    const actionError = h("p", { class: "error", id: "action-error", role: "alert" });
    let current = null;

    async function act(question, okLabel, call, danger) {
      actionError.textContent = "";
      if (!(await confirmAction(question, okLabel, danger))) return;
      try {
        await call();
        refresh(ALL);
      } catch (e) {
        actionError.textContent = e.message;
      }
    }

    const scaleInput = h("input", { type: "number", id: "scale-count", min: 0, max: 1000, step: 1, required: true });
    scaleInput.addEventListener("input", () => {
      scaleInput.dataset.touched = "yes";
    });
    const scaleForm = h(
      "form",
      {
        "aria-label": "Scale",
        onsubmit: (event) => {
          event.preventDefault();
          const n = Number(scaleInput.value);
          act(`Scale ${project}/${name} to ${n} instances?`, "Scale", async () => {
            await api("POST", `${base}/scale`, { instances: n });
            delete scaleInput.dataset.touched;
          });
        },
      },
      h("div", {}, h("label", { for: "scale-count" }, "Instances"), scaleInput),
      h("button", { type: "submit", id: "scale" }, "Scale"),
    );
    const restartButton = h(
      "button",
      {
        type: "button",
        id: "restart",
        onclick: () =>
          act(
            `Restart every instance of ${project}/${name}, a few at a time?`,
            "Restart",
            () => api("POST", `${base}/restart`),
          ),
      },
      "Rolling restart",
    );
    const rollbackButton = h(
      "button",
      {
        type: "button",
        id: "rollback",
        onclick: () => rollbackTo(null),
      },
      "Roll back",
    );
    const deleteButton = h(
      "button",
      {
        type: "button",
        id: "delete",
        class: "danger",
        onclick: () =>
          act(
            `Delete ${project}/${name}, its revisions and all of its instances? This cannot be undone.`,
            "Delete",
            async () => {
              await api("DELETE", base);
              go("#/");
            },
            true,
          ),
      },
      "Delete",
    );

    function rollbackTo(revision) {
      const target = revision ?? (current ? current.app.revision - 1 : null);
      act(
        `Roll ${project}/${name} back to revision ${target}? It is deployed again as a new revision.`,
        "Roll back",
        () => api("POST", `${base}/rollback`, revision === null ? undefined : { revision }),
      );
    }

    const logs = logsView(project, name);
    const el = h(
      "div",
      {},
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Overview"), ` / ${project} /`),
      h("h1", {}, name),
      h(
        "div",
        { class: "grid" },
        panel("summary-title", "Current revision", summary),
        panel(
          "actions-title",
          "Actions",
          h("div", { class: "actions" }, scaleForm, restartButton, rollbackButton, deleteButton),
          actionError,
        ),
      ),
      panel("instances-title", "Instances", instancesBox),
      panel("logs-title", "Logs", logs.el),
      h(
        "div",
        { class: "grid" },
        panel("history-title", "History", history),
        panel("app-events-title", "Events", eventsBox),
      ),
    );

    async function update() {
      let view;
      try {
        view = await api("GET", base);
      } catch (e) {
        if (e.status === 404 || e.status === 400) {
          fill(summary, h("p", { class: "error" }, e.message));
          fill(instancesBox);
          return;
        }
        throw e;
      }
      const [revisions, instances, events] = await Promise.all([
        api("GET", `${base}/revisions`),
        api("GET", `${base}/instances`),
        api("GET", `/v1/events?project=${enc(project)}&app=${enc(name)}&limit=50`),
      ]);
      current = view;
      const m = view.revision.manifest;
      fill(summary,
        h(
          "dl",
          { class: "facts" },
          h("dt", {}, "Project"),
          h("dd", {}, project),
          h("dt", {}, "Revision"),
          h("dd", { id: "current-revision" }, `${view.app.revision} (${cause(view.revision)})`),
          h("dt", {}, "Image"),
          h("dd", { class: "mono" }, m.image),
          h("dt", {}, "Instances"),
          h("dd", { id: "desired" }, count(m)),
          h("dt", {}, "Resources"),
          h("dd", {}, `${fmtCpu(m.resources.cpu_millis)}, ${fmtMb(m.resources.memory_mb)} each`),
          h("dt", {}, "Updated"),
          h("dd", {}, fmtTime(view.app.updated_at_ms)),
        ),
      );
      if (!scaleInput.dataset.touched && document.activeElement !== scaleInput) {
        scaleInput.value = m.global ? "" : m.instances;
      }
      scaleInput.disabled = !!m.global;
      rollbackButton.disabled = view.app.revision <= 1;
      fill(instancesBox,
        table(
          [
            { label: "Instance" },
            { label: "Node" },
            { label: "State" },
            { label: "Ready" },
            { label: "Address" },
            { label: "Restarts", num: true },
            { label: "CPU", num: true },
            { label: "Memory", num: true },
            { label: "Revision", num: true },
          ],
          instances.map((i) => ({
            attrs: { "data-instance": i.id, "data-state": i.state },
            cells: [
              h("span", { class: "mono" }, i.id),
              i.node ? h("a", { href: `#/nodes/${enc(i.node)}` }, i.node) : "\u2014",
              state(i),
              i.ready ? "yes" : "no",
              addresses(i),
              i.restarts,
              fmtCpu(stat(i, "cpu_millis")),
              fmtBytes(stat(i, "memory_bytes")),
              i.revision,
            ],
          })),
          "No instances.",
        ),
      );
      fill(history,
        table(
          [{ label: "Revision", num: true }, { label: "Cause" }, { label: "Image" }, { label: "Instances", num: true }, { label: "Created" }, { label: "" }],
          revisions
            .slice()
            .reverse()
            .map((r) => ({
              attrs: { "data-revision": r.revision },
              cells: [
                r.revision,
                cause(r),
                h("span", { class: "mono" }, r.manifest.image),
                count(r.manifest),
                fmtTime(r.created_at_ms),
                r.revision === view.app.revision
                  ? badge("current")
                  : h("button", { type: "button", class: "quiet", onclick: () => rollbackTo(r.revision) }, `Roll back to ${r.revision}`),
              ],
            })),
          "No revisions.",
        ),
      );
      fill(eventsBox, eventsList(events));
    }

    return { el, title: `${name} \u2013 ${project}`, kinds: ["apps", "instances", "events"], update, stop: logs.stop };
  }

  // The app's logs, streamed while shown: one line per line the app's
  // instances print, each prefixed by the instance's id (by the API).
  function logsView(project, name) {
    const pre = h(
      "pre",
      { class: "logs", id: "logs", tabindex: 0, "aria-label": "Log lines", "aria-live": "off" },
      "Follow logs to see what the app's instances print, as they print it.\n",
    );
    let fresh = true;
    const status = h("p", { class: "muted", id: "logs-status", role: "status" }, "Not following.");
    let abort = null;
    const toggle = h(
      "button",
      {
        type: "button",
        id: "logs-toggle",
        class: "quiet",
        "aria-pressed": "false",
        onclick: () => (abort ? stop() : start()),
      },
      "Follow logs",
    );

    function append(text) {
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(text);
      while (pre.childNodes.length > LOG_LINES_KEPT) pre.firstChild.remove();
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    }

    async function start() {
      if (fresh) {
        pre.replaceChildren();
        fresh = false;
      }
      abort = new AbortController();
      const mine = abort;
      toggle.textContent = "Stop following";
      toggle.setAttribute("aria-pressed", "true");
      status.className = "muted";
      status.textContent = "Following\u2026";
      try {
        const response = await fetch(logsPath(project, name), {
          headers: { Authorization: `Bearer ${token()}` },
          signal: mine.signal,
        });
        if (!response.ok) throw await apiError(response);
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += value;
          const end = buffer.lastIndexOf("\n");
          if (end >= 0) {
            const lines = buffer.slice(0, end + 1).split("\n").filter((l) => l.length);
            buffer = buffer.slice(end + 1);
            for (const line of lines) append(`${line}\n`);
          }
        }
        if (abort === mine) status.textContent = "The stream ended.";
      } catch (e) {
        if (mine.signal.aborted) return;
        status.className = "error";
        status.textContent = e.message;
      } finally {
        if (abort === mine) {
          abort = null;
          toggle.textContent = "Follow logs";
          toggle.setAttribute("aria-pressed", "false");
        }
      }
    }

    function stop() {
      if (!abort) return;
      abort.abort();
      abort = null;
      toggle.textContent = "Follow logs";
      toggle.setAttribute("aria-pressed", "false");
      status.className = "muted";
      status.textContent = "Not following.";
    }

    return { el: h("div", {}, h("div", { class: "actions" }, toggle, status), pre), stop };
  }

  function nodePage(nodeName) {
    const facts = h("div", { id: "node-facts" }, h("p", { class: "muted" }, "Loading\u2026"));
    const capacity = h("div", { id: "capacity" });
    const instancesBox = h("div", { id: "node-instances" });
    const actionError = h("p", { class: "error", id: "action-error", role: "alert" });
    const statusBox = h("span", { id: "node-status" });
    let draining = false;
    const drainButton = h(
      "button",
      {
        type: "button",
        id: "drain",
        onclick: async () => {
          actionError.textContent = "";
          const verb = draining ? "undrain" : "drain";
          const question = draining
            ? `Let ${nodeName} take new instances again?`
            : `Drain ${nodeName}? No new instances are placed on it.`;
          if (!(await confirmAction(question, draining ? "Undrain" : "Drain", !draining))) return;
          try {
            await api("POST", `/v1/nodes/${enc(nodeName)}/${verb}`);
            refresh(ALL);
          } catch (e) {
            actionError.textContent = e.message;
          }
        },
      },
      "Drain",
    );
    const el = h(
      "div",
      {},
      h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Overview"), " / nodes /"),
      h("h1", {}, nodeName, " ", statusBox),
      h(
        "div",
        { class: "grid" },
        panel("node-title", "Node", facts),
        panel(
          "capacity-title",
          "Capacity and allocation",
          capacity,
          h("h3", {}, "Actions"),
          h("div", { class: "actions" }, drainButton),
          actionError,
        ),
      ),
      panel("node-instances-title", "Instances", instancesBox),
    );
    async function update() {
      let node;
      try {
        node = await api("GET", `/v1/nodes/${enc(nodeName)}`);
      } catch (e) {
        if (e.status === 404 || e.status === 400) {
          fill(facts, h("p", { class: "error" }, e.message));
          drainButton.disabled = true;
          return;
        }
        throw e;
      }
      drainButton.disabled = false;
      const instances = await api("GET", "/v1/instances");
      draining = node.status === "draining";
      drainButton.textContent = draining ? "Undrain" : "Drain";
      fill(statusBox, badge(node.status));
      const labels = Object.entries(node.labels || {});
      fill(facts,
        h(
          "dl",
          { class: "facts" },
          h("dt", {}, "Status"),
          h("dd", {}, badge(node.status)),
          h("dt", {}, "Region"),
          h("dd", {}, node.region),
          h("dt", {}, "Zone"),
          h("dd", {}, node.zone),
          h("dt", {}, "Address"),
          h("dd", { class: "mono" }, node.address),
          h("dt", {}, "Roles"),
          h("dd", {}, node.roles.length ? node.roles.join(", ") : "\u2014"),
          h("dt", {}, "Labels"),
          h("dd", {}, labels.length ? labels.map(([k, v]) => h("div", { class: "mono" }, `${k}=${v}`)) : "\u2014"),
          h("dt", {}, "Registered"),
          h("dd", {}, fmtTime(node.registered_at_ms)),
        ),
      );
      fill(capacity, ...capacityBars(node));
      const mine = instances.filter((i) => i.node === nodeName);
      fill(instancesBox,
        table(
          [
            { label: "App" },
            { label: "Instance" },
            { label: "State" },
            { label: "Ready" },
            { label: "Address" },
            { label: "Restarts", num: true },
            { label: "CPU", num: true },
            { label: "Memory", num: true },
          ],
          mine.map((i) => ({
            attrs: { "data-instance": i.id },
            cells: [
              h("a", { href: `#/apps/${enc(i.project)}/${enc(i.app)}` }, `${i.project}/${i.app}`),
              h("span", { class: "mono" }, i.id),
              state(i),
              i.ready ? "yes" : "no",
              addresses(i),
              i.restarts,
              fmtCpu(stat(i, "cpu_millis")),
              fmtBytes(stat(i, "memory_bytes")),
            ],
          })),
          "No instances on this node.",
        ),
      );
    }
    return { el, title: `${nodeName} \u2013 node`, kinds: ["nodes", "instances"], update };
  }

  // ---------------------------------------------------------------- routing

  function go(hash) {
    if (location.hash === hash) route();
    else location.hash = hash;
  }

  function route() {
    if (page && page.stop) page.stop();
    const parts = location.hash
      .replace(/^#\/?/, "")
      .split("/")
      .filter(Boolean)
      .map(decodeURIComponent);
    if (!token()) {
      page = signInPage(route.message);
      route.message = null;
    } else if (parts[0] === "apps" && parts.length === 3) {
      page = appPage(parts[1], parts[2]);
    } else if (parts[0] === "nodes" && parts.length === 2) {
      page = nodePage(parts[1]);
    } else {
      page = overviewPage();
    }
    document.title = `${page.title} \u00b7 Keel`;
    fill(main, page.el);
    (page.focus || main).focus({ preventScroll: true });
    window.scrollTo(0, 0);
    refresh(ALL);
  }

  function startSession() {
    nav.hidden = false;
    signOutButton.hidden = false;
    if (!watching) watch();
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    stopWatching();
    nav.hidden = true;
    signOutButton.hidden = true;
    route.message = message || null;
    route();
  }

  signOutButton.addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  if (token()) startSession();
  route();
})();
