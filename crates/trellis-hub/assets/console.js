// Trellis console: a little progressive enhancement. Every page works
// without this script; with it, the Outpost URI is validated in place, the
// connection-status popup stays live, logs stream, and values copy.
"use strict";

const FRAGMENT = { "X-Trellis-Fragment": "1" };

// --- create stage: Create is enabled only after a successful validation of
// the URI currently in the field.
function setupStageForm(form) {
  const box = form.querySelector("#on-outpost");
  const uri = form.querySelector("#outpost-uri");
  const validate = form.querySelector("#validate");
  const create = form.querySelector("#create");
  const result = form.querySelector("#validation");
  let validated = form.dataset.validatedUri || null;

  const refresh = () => {
    const current = uri.value.trim();
    const stale = validated !== null && current !== validated;
    create.disabled = box.checked && (validated === null || stale);
    const shown = result.querySelector(".validation.ok");
    if (shown) shown.classList.toggle("stale", stale);
  };
  box.addEventListener("change", () => {
    refresh();
    if (box.checked) uri.focus();
  });
  uri.addEventListener("input", refresh);
  validate.addEventListener("click", async (event) => {
    event.preventDefault();
    const value = uri.value.trim();
    validate.disabled = true;
    result.setAttribute("aria-busy", "true");
    result.innerHTML = '<p class="muted">Validating…</p>';
    validated = null;
    refresh();
    try {
      const response = await fetch(form.dataset.validateUrl, {
        method: "POST",
        headers: { ...FRAGMENT, "Content-Type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams({ outpost_uri: value }),
        credentials: "same-origin",
      });
      result.innerHTML = await response.text();
      if (response.ok) validated = value;
    } catch (error) {
      result.innerHTML = "";
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = "The hub could not be reached (" + error.message + "). Check your connection and press Validate again.";
      result.append(p);
    } finally {
      validate.disabled = false;
      result.removeAttribute("aria-busy");
      refresh();
    }
  });
  refresh();
}

function follow(from, to, key) {
  if (!from || !to) return;
  to.textContent = from.textContent;
  to.dataset[key] = from.textContent;
  to.className = from.className;
}

// --- connection status: a modal dialog (focus moves in, Escape closes it)
// kept live by server-sent events while it is open.
function setupStatus(button) {
  const dialog = document.getElementById(button.dataset.dialog);
  const body = dialog.querySelector(".status-body");
  const note = dialog.querySelector(".live-note");
  const badge = button.querySelector(".badge");
  let source = null;

  const stop = () => {
    if (source) source.close();
    source = null;
  };
  button.addEventListener("click", (event) => {
    event.preventDefault();
    dialog.showModal();
    stop();
    note.textContent = "Connecting…";
    source = new EventSource(button.dataset.events);
    source.onmessage = (message) => {
      body.innerHTML = message.data;
      note.textContent = "Live: updates as the status changes.";
      // The button's badge and the page's sync badge follow the popup.
      follow(body.querySelector("#status-link"), badge, "linkState");
      follow(body.querySelector("#status-sync"), document.getElementById("sync-state"), "syncState");
    };
    source.onerror = () => {
      note.textContent = "Lost the connection to the hub; retrying. What is shown may be out of date.";
    };
  });
  dialog.querySelector("[data-close]").addEventListener("click", () => dialog.close());
  dialog.addEventListener("close", () => {
    stop();
    button.focus();
  });
}

// --- logs: the newest lines, optionally followed as they are written.
function setupLogs(section) {
  const form = section.querySelector("form");
  const out = section.querySelector("pre");
  const status = section.querySelector(".logs-status");
  const follow = form.querySelector("[name=follow]");
  const component = form.querySelector("[name=component]");
  const MAX_LINES = 5000;
  let controller = null;

  const show = (entry) => {
    if (entry.error) {
      status.textContent = entry.error.message + " — " + entry.error.hint;
      return;
    }
    const atEnd = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
    const who = entry.component + (entry.replica ? "/" + entry.replica : "");
    out.append(entry.time.slice(11, 19) + " " + who + " " + entry.line + "\n");
    while (out.childNodes.length > MAX_LINES) out.firstChild.remove();
    if (atEnd) out.scrollTop = out.scrollHeight;
  };
  const load = async () => {
    if (controller) controller.abort();
    controller = new AbortController();
    out.textContent = "";
    const params = new URLSearchParams({ tail: "200" });
    if (component.value) params.set("component", component.value);
    if (follow.checked) params.set("follow", "true");
    status.textContent = "Loading…";
    try {
      const response = await fetch(section.dataset.url + "?" + params, {
        headers: FRAGMENT,
        signal: controller.signal,
        credentials: "same-origin",
      });
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        status.textContent = body && body.error
          ? body.error.message + " — " + body.error.hint
          : "The logs could not be read (HTTP " + response.status + ").";
        return;
      }
      status.textContent = follow.checked ? "Following new lines…" : "";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, end);
          buffer = buffer.slice(end + 1);
          if (line) show(JSON.parse(line));
        }
      }
      if (!out.textContent && !status.textContent) status.textContent = "No log lines.";
      else if (follow.checked) status.textContent = "The log stream ended.";
    } catch (error) {
      if (error.name !== "AbortError") status.textContent = "Reading the logs failed: " + error.message;
    }
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    load();
  });
  follow.addEventListener("change", load);
  component.addEventListener("change", load);
  load();
}

// --- live sections: the page is fetched again every few seconds and the
// marked sections that changed are replaced (not while focus is in them,
// so a button being used stays put). Stops when the session has ended.
function setupLiveSections(sections, everyMs) {
  if (!sections.length) return;
  const timer = setInterval(async () => {
    if (document.hidden) return;
    try {
      // With its query: a filtered list stays filtered.
      const response = await fetch(location.pathname + location.search, { headers: FRAGMENT, credentials: "same-origin" });
      if (response.status === 401) clearInterval(timer);
      if (!response.ok) return;
      const fresh = new DOMParser().parseFromString(await response.text(), "text/html");
      for (const section of sections) {
        const next = fresh.getElementById(section.id);
        if (!next || section.contains(document.activeElement)) continue;
        if (next.innerHTML !== section.innerHTML) section.innerHTML = next.innerHTML;
      }
    } catch {
      // The hub is unreachable for a moment; the next round tries again.
    }
  }, everyMs);
}

// --- the terminal: a shell in a component (xterm.js, vendored) over the
// hub's WebSocket: binary messages are a channel byte and bytes (0 in, 1
// out), text messages JSON (resize from here; exit and error from the hub).
function setupTerminal(box) {
  const state = document.getElementById("terminal-state");
  if (typeof Terminal === "undefined") {
    state.textContent = "The terminal emulator did not load; reload the page.";
    return;
  }
  const term = new Terminal({ cursorBlink: true, fontSize: 14, scrollback: 5000 });
  term.open(box);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(
    `${scheme}//${location.host}${box.dataset.socket}?cols=${term.cols}&rows=${term.rows}`);
  ws.binaryType = "arraybuffer";
  let ended = false;
  const encoder = new TextEncoder();
  ws.onopen = () => {
    state.textContent = "Connected.";
    term.focus();
  };
  ws.onmessage = (event) => {
    if (typeof event.data === "string") {
      const msg = JSON.parse(event.data);
      if (msg.type === "exit") {
        ended = true;
        state.textContent = `The shell exited${msg.code === null ? "" : ` with code ${msg.code}`}.`;
      } else if (msg.type === "error") {
        ended = true;
        state.textContent = `${msg.error.message} (${msg.error.code}). ${msg.error.hint}`;
      }
      return;
    }
    const bytes = new Uint8Array(event.data);
    if (bytes.length > 1) term.write(bytes.subarray(1));
  };
  ws.onclose = () => {
    if (!ended) {
      state.textContent = ws.readyState === WebSocket.CLOSED && state.textContent === "Connected."
        ? "The connection closed."
        : "The terminal could not be opened: the component may be stopped, the outpost offline, " +
          "or too many streams open. The stage page shows which; reload to try again.";
    }
  };
  term.onData((data) => {
    if (ws.readyState !== WebSocket.OPEN) return;
    const bytes = encoder.encode(data);
    const message = new Uint8Array(bytes.length + 1);
    message.set(bytes, 1);
    ws.send(message);
  });
  term.onResize(({ cols, rows }) => {
    if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", cols, rows }));
  });
}

// --- small things: copy buttons, confirmations.
function setupCopy(button) {
  button.addEventListener("click", async () => {
    const field = document.getElementById(button.dataset.copy);
    try {
      await navigator.clipboard.writeText(field.value);
    } catch {
      field.select();
      document.execCommand("copy");
    }
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = "Copy"; }, 2000);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("stage-form");
  if (form) setupStageForm(form);
  const status = document.getElementById("connection-status");
  if (status) setupStatus(status);
  const logs = document.getElementById("logs");
  if (logs) setupLogs(logs);
  const terminal = document.getElementById("terminal");
  if (terminal) setupTerminal(terminal);
  setupLiveSections([...document.querySelectorAll("[data-live]")], 3000);
  document.querySelectorAll("[data-copy]").forEach(setupCopy);
  document.querySelectorAll("form[data-confirm]").forEach((f) => {
    f.addEventListener("submit", (event) => {
      if (!window.confirm(f.dataset.confirm)) event.preventDefault();
    });
  });
});
