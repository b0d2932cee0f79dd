// The amiworker call board: fetches the JSON API, then follows /api/stream (SSE).
// Every value that came from a PBX or the log is put into the page as text
// (textContent, createTextNode): never as HTML.
"use strict";

(function () {
  const COLORS = ["#2f7ed8", "#d9534f", "#5cb85c", "#f0ad4e", "#8e44ad", "#16a085", "#7f8c8d"];
  const state = { offset: 0, calls: null, rates: null, fleet: null, failures: null, status: null };
  const $ = (id) => document.getElementById(id);

  // -- building nodes, text only ---------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else if (name.startsWith("data-")) node.setAttribute(name, String(value));
      else if (name === "title" || name === "colspan" || name === "rowspan" || name === "type") {
        node.setAttribute(name, String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const text = (value) => (value === null || value === undefined || value === "" ? "—" : String(value));
  const unknown = (value) => value === null || value === undefined || value === "" || value === "<unknown>";

  function callerId(name, num) {
    if (unknown(name) && unknown(num)) return el("span", { class: "muted" }, "unknown");
    const parts = [];
    if (!unknown(name)) parts.push(el("span", { class: "cid-name" }, name));
    if (!unknown(num)) parts.push(el("span", { class: "cid-num" }, num));
    return el("span", { class: "cid" }, ...parts);
  }

  // -- time --------------------------------------------------------------------------------------

  const serverNow = () => Date.now() + state.offset;

  function syncClock(payload) {
    if (payload && payload.now) {
      const then = Date.parse(payload.now);
      if (!Number.isNaN(then)) state.offset = then - Date.now();
    }
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || Number.isNaN(seconds)) return "—";
    const s = Math.max(0, Math.floor(seconds));
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const pad = (n) => String(n).padStart(2, "0");
    return h > 0 ? `${h}:${pad(m)}:${pad(s % 60)}` : `${m}:${pad(s % 60)}`;
  }

  function clock(iso) {
    if (!iso) return "—";
    const t = new Date(iso);
    if (Number.isNaN(t.getTime())) return String(iso);
    return t.toISOString().slice(11, 19);
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    if (seconds < 60) return `${seconds.toFixed(1)} s ago`;
    if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
    if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
    return `${Math.floor(seconds / 86400)} days ago`;
  }

  function tick() {
    const now = serverNow();
    for (const node of document.querySelectorAll("[data-since]")) {
      const since = Date.parse(node.getAttribute("data-since"));
      node.textContent = Number.isNaN(since) ? "—" : duration((now - since) / 1000);
    }
  }

  // -- sections ----------------------------------------------------------------------------------

  function renderCalls(data) {
    state.calls = data;
    syncClock(data);
    const rows = [];
    for (const call of data.calls) {
      const channels = call.channels.length ? call.channels : [null];
      channels.forEach((channel, index) => {
        const cells = [];
        if (index === 0) {
          const span = channels.length;
          cells.push(
            el("td", { rowspan: span, class: "pbx" }, call.server),
            el("td", { rowspan: span, class: "mono linkedid" }, call.linkedid),
            el("td", { rowspan: span }, clock(call.started)),
            el("td", { rowspan: span, class: "duration", "data-since": call.started }, "")
          );
        }
        if (channel) {
          cells.push(
            el("td", { class: "mono channel" }, text(channel.channel)),
            el("td", { class: "state state-" + String(channel.state || "").toLowerCase().replace(/[^a-z]/g, "") }, text(channel.state)),
            el("td", { class: "caller" }, callerId(channel.caller_id_name, channel.caller_id_num)),
            el("td", { class: "connected" }, callerId(channel.connected_line_name, channel.connected_line_num))
          );
        } else {
          cells.push(el("td", { colspan: 4, class: "muted" }, "no channel"));
        }
        rows.push(el("tr", {
          "data-linkedid": call.linkedid,
          "data-server": call.server,
          "data-uniqueid": channel ? channel.uniqueid : null,
          class: index === 0 ? "call-first" : null,
        }, ...cells));
      });
    }
    $("calls").tBodies[0].replaceChildren(...rows);
    $("calls-empty").hidden = data.calls.length > 0;
    $("calls-count").textContent = String(data.calls.length);

    const ended = data.ended.map((call) => el("tr", { "data-linkedid": call.linkedid },
      el("td", {}, clock(call.ended)),
      el("td", { class: "pbx" }, call.server),
      el("td", { class: "mono" }, call.linkedid),
      el("td", {}, callerId(call.caller_id_name, call.caller_id_num)),
      el("td", { class: "num" }, duration(call.duration)),
      el("td", { class: "cause" }, unknown(call.cause) ? "—" : `${call.cause} ${call.cause_txt || ""}`.trim())
    ));
    $("ended").tBodies[0].replaceChildren(...ended);
    $("ended-empty").hidden = data.ended.length > 0;
    renderPbxs();
    tick();
  }

  function renderRates(data) {
    state.rates = data;
    drawChart();
    renderPbxs();
  }

  function lastRate(series, bucket) {
    // The last complete bucket: the newest one is still filling.
    return series.length > 1 ? series[series.length - 2] / bucket : 0;
  }

  function renderPbxs() {
    const names = new Set();
    if (state.rates) Object.keys(state.rates.servers).forEach((n) => names.add(n));
    if (state.calls) state.calls.calls.forEach((c) => names.add(c.server));
    const up = {};
    if (state.fleet) {
      for (const worker of state.fleet.workers) {
        for (const session of worker.sessions) {
          names.add(session.pbx);
          if (session.connected && !worker.stale && worker.state !== "stopped") up[session.pbx] = (up[session.pbx] || 0) + 1;
        }
      }
    }
    const chips = [...names].sort().map((name, index) => {
      const calls = state.calls ? state.calls.calls.filter((c) => c.server === name).length : 0;
      const series = state.rates && state.rates.servers[name];
      const rate = series ? lastRate(series, state.rates.bucket).toFixed(1) : "—";
      const sessions = up[name] || 0;
      return el("div", { class: "chip" + (state.fleet && sessions === 0 ? " down" : ""), "data-pbx": name },
        el("span", { class: "swatch", "data-color": index % COLORS.length }),
        el("strong", {}, name),
        el("span", {}, `${calls} call${calls === 1 ? "" : "s"}`),
        el("span", {}, `${rate} ev/s`),
        el("span", { title: "workers holding a session with this PBX" }, `${sessions} session${sessions === 1 ? "" : "s"}`)
      );
    });
    $("pbxs").replaceChildren(...chips);
  }

  function drawChart() {
    const data = state.rates;
    const canvas = $("chart");
    const ctx = canvas.getContext("2d");
    if (!ctx || !data) return;
    const width = canvas.width, height = canvas.height, left = 40, bottom = 20, top = 10;
    ctx.clearRect(0, 0, width, height);
    const names = Object.keys(data.servers).sort();
    let max = 1;
    for (const name of names) for (const n of data.servers[name]) max = Math.max(max, n / data.bucket);
    ctx.strokeStyle = "#ddd";
    ctx.fillStyle = "#666";
    ctx.font = "11px sans-serif";
    ctx.lineWidth = 1;
    for (const fraction of [0, 0.5, 1]) {
      const y = top + (height - top - bottom) * (1 - fraction);
      ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width, y); ctx.stroke();
      ctx.fillText((max * fraction).toFixed(max < 10 ? 1 : 0), 4, y + 4);
    }
    const labels = ["-15 min", "-10 min", "-5 min", "now"];
    labels.forEach((label, i) => {
      const x = left + ((width - left - 30) * i) / (labels.length - 1);
      ctx.fillText(label, x, height - 4);
    });
    names.forEach((name, index) => {
      const series = data.servers[name];
      if (series.length < 2) return;
      ctx.strokeStyle = COLORS[index % COLORS.length];
      ctx.lineWidth = 2;
      ctx.beginPath();
      // The newest bucket is still filling: leave it out of the line.
      const points = series.slice(0, -1);
      points.forEach((n, i) => {
        const x = left + ((width - left) * i) / Math.max(1, points.length - 1);
        const y = top + (height - top - bottom) * (1 - n / data.bucket / max);
        if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
      });
      ctx.stroke();
    });
    const legend = names.map((name, index) => el("span", { class: "legend-item" },
      el("span", { class: "swatch", "data-color": index % COLORS.length }), name));
    if (!data.complete) legend.push(el("span", { class: "muted" }, "counting the past 15 minutes…"));
    $("legend").replaceChildren(...legend);
  }

  function renderFleet(data) {
    state.fleet = data;
    const rows = data.workers.map((w) => {
      const c = w.counters || {};
      const sessions = w.sessions.map((s) => el("span", {
        class: "session " + (s.connected ? "up" : "down"),
        title: s.connected ? `connected since ${s.since || "?"}` + (s.ami_version ? `, AMI ${s.ami_version}` : "") : (s.last_error || "not connected"),
      }, `${s.pbx} ${s.connected ? "up" : "DOWN"}`));
      const heartbeat = el("td", { class: w.stale ? "stale" : null }, age(w.age));
      if (w.stale) heartbeat.appendChild(el("span", { class: "badge" }, "STALE"));
      if (w.state === "stopped") heartbeat.appendChild(el("span", { class: "badge muted-badge" }, "stopped"));
      const spill = w.spill ? `${w.spill.events ?? 0} ev` + (w.spill.events && w.spill.oldest_age != null ? ` (${age(w.spill.oldest_age)})` : "") : "—";
      const hedged = w.mode === "hedged" ? `owned ${c.owned ?? 0}, hedged ${c.hedged ?? 0} (as a standby), covered ${c.covered ?? 0}` : null;
      return el("tr", { "data-worker": w.id, class: w.stale ? "stale-row" : (w.state === "stopped" ? "stopped-row" : null) },
        el("td", { class: "mono" }, w.id),
        el("td", {}, text(w.host)),
        el("td", { class: "num" }, text(w.pid)),
        el("td", { title: hedged }, text(w.mode)),
        el("td", {}, ...sessions),
        heartbeat,
        el("td", { class: "num" }, text(w.backlog ?? w.queue_depth)),
        el("td", { class: "num" }, text(c.events_seen)),
        el("td", { class: "num" }, text(c.races_won)),
        el("td", { class: "num" }, text(c.handled)),
        el("td", { class: "num" + (c.failed ? " bad" : "") }, text(c.failed)),
        el("td", { class: "num" + (c.dropped ? " bad" : "") }, text(c.dropped)),
        el("td", { class: "num" }, spill)
      );
    });
    $("fleet").tBodies[0].replaceChildren(...rows);
    $("fleet-empty").hidden = rows.length > 0;
    const stale = data.workers.filter((w) => w.stale).length;
    $("fleet-count").textContent = `${data.workers.length} worker${data.workers.length === 1 ? "" : "s"}` +
      (stale ? `, ${stale} stale (no heartbeat within the ${data.lease} s lease)` : "");
    renderPbxs();
  }

  function renderFailures(data) {
    state.failures = data;
    const rows = data.failures.map((f) => {
      const action = el("td", {});
      if (f.state === "dead") {
        const button = el("button", { type: "button", class: "retry", "data-id": f.id }, "Retry");
        button.addEventListener("click", () => retry(f.id, button));
        action.appendChild(button);
      } else if (f.retry_at) {
        action.appendChild(el("span", { class: "muted" }, `retry at ${clock(f.retry_at)}`));
      }
      return el("tr", { "data-id": f.id, "data-state": f.state },
        el("td", {}, clock(f.ts)),
        el("td", { class: "pbx" }, text(f.server)),
        el("td", {}, text(f.event)),
        el("td", { class: "mono" }, text(f.channel)),
        el("td", { class: "state-" + f.state }, text(f.state)),
        el("td", { class: "num" }, text(f.attempts)),
        el("td", { class: "error" }, text(f.error)),
        action
      );
    });
    $("failures").tBodies[0].replaceChildren(...rows);
    $("failures-empty").hidden = rows.length > 0;
    $("failures-count").textContent = rows.length ? String(rows.length) : "";
  }

  function renderStatus(data) {
    state.status = data;
    const live = $("live");
    if (data.problem) {
      live.textContent = data.problem;
      live.className = "live problem";
    } else if (!data.ready) {
      live.textContent = "reading the log…";
      live.className = "live";
    } else {
      live.textContent = data.live === "poll" ? `live (polling every ${data.poll_interval} s)` : "live (change stream)";
      live.className = "live ok";
    }
  }

  // -- the Retry action --------------------------------------------------------------------------

  async function retry(id, button) {
    const message = $("failures-message");
    button.disabled = true;
    message.textContent = "";
    for (let attempt = 0; attempt < 2; attempt++) {
      const headers = { "Content-Type": "application/json" };
      const token = sessionStorage.getItem("amiworker-board-token");
      if (token) headers["Authorization"] = "Bearer " + token;
      let response;
      try {
        response = await fetch(`/api/failures/${encodeURIComponent(id)}/retry`, { method: "POST", headers, body: "{}" });
      } catch (error) {
        message.textContent = "The board cannot be reached.";
        button.disabled = false;
        return;
      }
      if (response.status === 401 && attempt === 0) {
        const given = window.prompt("This board needs its token (board_token) to retry events:");
        if (!given) break;
        sessionStorage.setItem("amiworker-board-token", given);
        continue;
      }
      let body = {};
      try { body = await response.json(); } catch (error) { body = {}; }
      if (response.ok) {
        button.replaceWith(el("span", { class: "muted queued" }, "re-queued"));
        return;
      }
      if (response.status === 401) sessionStorage.removeItem("amiworker-board-token");
      message.textContent = `Retry refused: ${body.error || response.status}`;
      break;
    }
    button.disabled = false;
  }

  // -- loading and following -----------------------------------------------------------------------

  const renderers = { calls: renderCalls, rates: renderRates, fleet: renderFleet, failures: renderFailures, status: renderStatus };

  async function load(name) {
    try {
      const response = await fetch(`/api/${name}`);
      if (response.ok) renderers[name](await response.json());
    } catch (error) {
      // The stream below brings the same data; a failed first fetch is not fatal.
    }
  }

  function follow() {
    const source = new EventSource("/api/stream");
    for (const [name, render] of Object.entries(renderers)) {
      source.addEventListener(name, (event) => render(JSON.parse(event.data)));
    }
    source.addEventListener("error", () => {
      const live = $("live");
      live.textContent = "connection to the board lost; reconnecting…";
      live.className = "live problem";
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    load("status");
    Promise.all(["calls", "rates", "fleet", "failures"].map(load)).finally(follow);
    setInterval(tick, 1000);
  });
})();
