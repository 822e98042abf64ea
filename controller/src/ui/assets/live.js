// convoy dashboard: applies a rollout's events as they happen (server-sent
// events from /rollouts/ID/events, the JSON objects `--output json`
// prints), and refreshes the fleet table. No framework, no build step.
"use strict";
(function () {
  const me = document.currentScript;
  const text = (tag, s, cls) => {
    const el = document.createElement(tag);
    el.textContent = s;
    if (cls) el.className = cls;
    return el;
  };
  const stateWord = (s) => {
    const symbol = s === "succeeded" ? "✓" : /^(failed|rolled_back|refused)/.test(s) ? "✗" : "•";
    const span = text("span", "", "state state-" + s);
    const hidden = text("span", symbol + " ");
    hidden.setAttribute("aria-hidden", "true");
    span.append(hidden, s.replaceAll("_", " "));
    return span;
  };

  // The fleet page: refresh the matrix every 5 s.
  const matrix = document.getElementById("matrix");
  if (matrix && !me.dataset.rollout) {
    setInterval(async () => {
      const res = await fetch("/fleet/matrix", { credentials: "same-origin" });
      if (res.ok) matrix.innerHTML = await res.text();
    }, 5000);
    return;
  }

  const id = me.dataset.rollout;
  if (!id) return;
  const hostsBox = document.getElementById("hosts");
  const timeline = document.getElementById("timeline");
  const row = (host) => {
    let tr = hostsBox.querySelector('tr[data-host="' + CSS.escape(host) + '"]');
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.host = host;
      const th = text("th", host);
      th.scope = "row";
      tr.append(th, text("td", "", "step"), text("td", "waiting", "outcome"), text("td", "", "detail"));
      hostsBox.querySelector("tbody").append(tr);
    }
    return tr;
  };
  const note = (s) => {
    const li = document.createElement("li");
    li.append(text("time", new Date().toISOString().replace("T", " ").slice(0, 19) + " UTC"), " " + s);
    timeline.append(li);
    timeline.scrollTop = timeline.scrollHeight;
  };
  const refresh = async (path, box) => {
    const res = await fetch(path, { credentials: "same-origin" });
    if (res.ok) box.innerHTML = await res.text();
  };

  const source = new EventSource("/rollouts/" + encodeURIComponent(id) + "/events");
  // What happened before this page connected is read from history; events
  // that arrive meanwhile wait, then apply on top of it in order.
  let waiting = null;
  source.onopen = async () => {
    waiting = [];
    try {
      await refresh("/rollouts/" + encodeURIComponent(id) + "/hosts", hostsBox);
    } finally {
      const queued = waiting;
      waiting = null;
      queued.forEach((apply) => apply());
    }
  };
  const on = (name, apply) =>
    source.addEventListener(name, (m) => {
      if (waiting) waiting.push(() => apply(m));
      else apply(m);
    });
  on("plan", (m) => {
    const p = JSON.parse(m.data);
    const box = document.getElementById("plan");
    box.replaceChildren(text("p", p.strategy + ", " + p.hosts.length + " hosts, " + p.failure_budget + " failures tolerated"));
    const ol = document.createElement("ol");
    p.batches.forEach((b, i) => {
      const li = text("li", "Batch " + (i + 1) + ": ", "batch");
      li.append(text("span", b.hosts.join(", "), "hosts"));
      if (b.bake_ms > 0) li.append(" (then bake " + b.bake_ms / 1000 + " s)");
      ol.append(li);
    });
    box.append(ol);
    if (p.skipped_hosts.length) box.append(text("p", "Left out (not connected): " + p.skipped_hosts.join(", ")));
    p.hosts.forEach(row);
  });
  on("note", (m) => note(JSON.parse(m.data).message));
  on("host_event", (m) => {
    const e = JSON.parse(m.data);
    const tr = row(e.host);
    tr.querySelector(".step").textContent = e.step + " " + e.kind;
    tr.querySelector(".outcome").textContent = "in progress";
    tr.querySelector(".detail").textContent = e.message;
    note(e.host + " " + e.step + " " + e.kind + (e.message ? ": " + e.message : ""));
  });
  on("host_result", (m) => {
    const r = JSON.parse(m.data);
    const tr = row(r.host);
    if (/:(stage|preflight):/.test(r.op_id)) {
      // Pre-staged or checked: nothing it serves changed yet.
      tr.querySelector(".detail").textContent = r.op_id.split(":")[1] + " " + r.outcome;
      return;
    }
    tr.querySelector(".outcome").replaceChildren(stateWord(r.outcome));
    tr.querySelector(".detail").textContent = r.reason;
    note(r.host + " " + r.outcome + (r.reason ? ": " + r.reason : ""));
  });
  on("measurement", () =>
    refresh("/rollouts/" + encodeURIComponent(id) + "/gates", document.getElementById("gates")));
  on("done", (m) => {
    const d = JSON.parse(m.data);
    const verdict = d.succeeded ? "succeeded" : d.rolled_back_hosts.length ? "rolled_back" : "failed";
    const v = document.getElementById("verdict");
    v.replaceChildren("Final verdict: ", stateWord(verdict));
    if (d.reason) v.append(" — " + d.reason);
    document.getElementById("state").replaceChildren(stateWord(verdict));
    document.querySelectorAll(".actions").forEach((a) => a.closest("section").remove());
    note("rollout " + verdict + (d.reason ? ": " + d.reason : ""));
  });
  on("unavailable", (m) => {
    // Driven by another controller: its events do not pass through this one.
    source.close();
    const d = JSON.parse(m.data);
    document.getElementById("verdict").textContent =
      "Not followed live (" + d.message + "); reload for its latest state.";
  });
  on("ended", () => {
    source.close();
    if (!document.getElementById("verdict").textContent) {
      // It ended while this page was away: history has its verdict.
      location.reload();
    }
  });
})();
