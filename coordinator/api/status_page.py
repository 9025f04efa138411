"""The swarm page the coordinator serves at `/status`: one self-contained HTML document.

No build step and no CDN (the machines may be offline): inline CSS and a little JavaScript that
reads `/status.json` every two seconds and redraws. Every string from the swarm goes into the
page as text (`textContent`), never as markup: public names are chosen by volunteers.
"""

from __future__ import annotations

STATUS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>swarmtrain</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1d2330;background:#fafbfc}
h1{font-size:20px;margin:0 0 .2em} .muted{color:#667} .bar{height:8px;background:#e3e7ee;border-radius:4px}
.bar>div{height:8px;background:#3a7bd5;border-radius:4px} table{border-collapse:collapse;margin:.3em 0 1.2em}
td,th{padding:2px 10px 2px 0;text-align:left;white-space:nowrap} th{color:#667;font-weight:600}
td.n{text-align:right} .stage{margin-top:1em;font-weight:600} .bound{color:#a4400e}
.state-gone,.state-left,.state-banned,.state-revoked{color:#a00}
</style></head>
<body>
<h1 id="run">swarmtrain</h1>
<div id="summary" class="muted">loading…</div>
<div class="bar"><div id="fill" style="width:0"></div></div>
<p id="bound" class="bound"></p>
<div id="stages"></div>
<p id="checkpoint" class="muted"></p>
<div class="stage">volunteers by tokens processed</div>
<div id="leaders"></div>
<div class="stage">recent events</div>
<div id="events" class="muted"></div>
<script>
"use strict";
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
function num(x) { return Math.round(x).toLocaleString("en-US"); }
function ago(now, t) { return t ? Math.max(0, Math.round(now - t)) + "s ago" : "never"; }
function eta(s) {
  if (s === null) return "unknown";
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60);
  return h ? h + "h" + String(m).padStart(2, "0") + "m" : m + "m" + String(Math.floor(s % 60)).padStart(2, "0") + "s";
}
// the coordinator's dial-back of each worker's data plane (docs/operations.md, behind home routers)
const REACHABLE = {direct: "yes", unreachable: "no, behind NAT", unknown: "?"};
function table(workers, now) {
  const t = el("table"), head = t.insertRow();
  for (const h of ["worker", "name", "GPU", "state", "reachable", "tokens/s", "heartbeat"]) head.appendChild(el("th", h));
  for (const w of workers) {
    const r = t.insertRow();
    r.dataset.worker = w.worker_id;
    r.appendChild(el("td", w.worker_id));
    r.appendChild(el("td", w.public_name || "-", "name"));
    r.appendChild(el("td", w.gpu));
    r.appendChild(el("td", w.state, "state state-" + w.state));
    r.appendChild(el("td", REACHABLE[w.reachability] || "?", "reach reach-" + w.reachability));
    r.appendChild(el("td", num(w.tokens_per_second), "n"));
    r.appendChild(el("td", ago(now, w.last_heartbeat_unix), "n"));
  }
  return t;
}
function draw(s) {
  const p = s.progress, r = s.run, now = s.generated_unix;
  document.getElementById("run").textContent = "run " + r.run_id + " · plan " + r.plan_version;
  document.getElementById("summary").textContent =
    num(p.trained_tokens) + " of " + num(p.total_tokens) + " tokens (" + (100 * p.fraction).toFixed(1) + "%)" +
    (p.last_loss === null ? "" : " · loss " + p.last_loss.toFixed(3)) +
    " · " + num(p.tokens_per_second.measured) + " tokens/s measured, " + num(p.tokens_per_second.expected) +
    " expected · ETA " + eta(p.eta_s) + " · $" + p.usd_per_hour.toFixed(2) + "/h, $" + p.usd_spent.toFixed(2) +
    " and " + p.kwh_used.toFixed(1) + " kWh so far" + (r.note ? " · " + r.note : "");
  document.getElementById("fill").style.width = (100 * Math.min(1, p.fraction)) + "%";
  document.getElementById("bound").textContent = s.bound ? "bound by stage " + s.bound.stage + ": " + s.bound.why : "";
  const box = document.getElementById("stages"), parts = [];
  const staged = new Set(s.stages.map(x => x.index));
  for (const st of s.stages) {
    const div = el("div");
    div.dataset.stage = st.index;
    div.appendChild(el("div", "stage " + st.index + " · layers " + st.layers[0] + "-" + (st.layers[1] - 1) + " · " +
                         st.workers + " worker(s) · " + num(st.planned_tokens_per_second) + " tokens/s planned", "stage"));
    div.appendChild(table(s.workers.filter(w => w.stage === st.index), now));
    parts.push(div);
  }
  const idle = s.workers.filter(w => !staged.has(w.stage));
  if (idle.length) {
    const div = el("div");
    div.appendChild(el("div", "no stage", "stage"));
    div.appendChild(table(idle, now));
    parts.push(div);
  }
  box.replaceChildren(...parts);
  const board = el("table"), top = board.insertRow();
  for (const h of ["#", "name", "workers", "tokens", "share"]) top.appendChild(el("th", h));
  s.leaderboard.forEach((e, i) => {
    const r = board.insertRow();
    r.appendChild(el("td", i + 1, "n"));
    r.appendChild(el("td", e.name, "name"));
    r.appendChild(el("td", e.workers, "n"));
    r.appendChild(el("td", num(e.tokens), "n"));
    r.appendChild(el("td", (100 * e.share).toFixed(1) + "%", "n"));
  });
  document.getElementById("leaders").replaceChildren(board);
  const events = (s.events || []).map(e => el("div", new Date(e.unix * 1000).toLocaleTimeString() + "  " + e.what));
  document.getElementById("events").replaceChildren(...events);
  const c = s.checkpoint;
  document.getElementById("checkpoint").textContent =
    c ? "last checkpoint " + c.id + " at " + num(c.trained_tokens) + " tokens" : "no checkpoint yet";
}
async function refresh() {
  try {
    const reply = await fetch("status.json", {cache: "no-store"});
    if (reply.ok) draw(await reply.json());
  } catch (e) {
    document.getElementById("summary").textContent = "the coordinator does not answer: " + e;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body></html>
"""
