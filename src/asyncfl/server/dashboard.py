"""The live dashboard at `/`: one self-contained HTML page (inline CSS, JS and SVG, no external
assets) that polls /status and /v1/history and draws test accuracy against wall time.

It needs an operator token. Without one, a browser at `/` gets SIGN_IN (other callers get a
JSON refusal), which takes the token from the URL fragment (`/#token=...`: browsers never send
the fragment, so it reaches no server or proxy log), removes it from the address bar and
history, trades it at POST /v1/session for an HttpOnly cookie, and reloads."""

SIGN_IN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>asyncfl server: sign in</title></head><body>
<p id="msg">This dashboard needs an operator token (<code>asyncfl token create --operator</code>):
open it as <code>/#token=YOUR_TOKEN</code>.</p>
<script>
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token");
history.replaceState(null, "", location.pathname);
if (token) fetch("/v1/session", {method: "POST", headers: {Authorization: "Bearer " + token}}).then(r => {
  if (r.ok) location.reload(); else document.getElementById("msg").textContent = "token refused (" + r.status + ")";
});
</script></body></html>
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>asyncfl server</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
 h1{font-size:18px;margin:0 0 12px} .cards{display:flex;gap:12px;flex-wrap:wrap;margin-bottom:16px}
 .card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px 14px;min-width:120px}
 .card b{display:block;font-size:22px} svg{background:#fff;border:1px solid #ddd;border-radius:6px}
 table{border-collapse:collapse;background:#fff;margin-top:12px} td,th{border:1px solid #ddd;padding:4px 10px;text-align:left}
 .axis{stroke:#888;stroke-width:1} .grid{stroke:#eee;stroke-width:1} .lbl{font-size:11px;fill:#555}
</style></head><body>
<h1>asyncfl server &mdash; <span id="task">?</span></h1>
<div class="cards">
 <div class="card">version<b id="version">-</b></div>
 <div class="card">test accuracy<b id="accuracy">-</b></div>
 <div class="card">active / limit<b id="concurrency">-</b></div>
 <div class="card">buffer<b id="buffer">-</b></div>
 <div class="card">accepted<b id="accepted">-</b></div>
 <div class="card">rejected<b id="rejected">-</b></div>
</div>
<svg id="acc-chart" width="720" height="300" viewBox="0 0 720 300" role="img" aria-label="accuracy vs time">
 <g id="grid"></g>
 <line class="axis" x1="50" y1="260" x2="700" y2="260"/><line class="axis" x1="50" y1="20" x2="50" y2="260"/>
 <polyline id="target-line" fill="none" stroke="#c66" stroke-dasharray="4 4" points=""/>
 <polyline id="acc-line" fill="none" stroke="#1f77b4" stroke-width="2" points="" data-points="0"/>
 <text class="lbl" x="360" y="290" text-anchor="middle">wall time (s)</text>
 <text class="lbl" x="14" y="140" transform="rotate(-90 14 140)" text-anchor="middle">test accuracy</text>
</svg>
<table><thead><tr><th>rejection reason</th><th>count</th></tr></thead><tbody id="reasons"></tbody></table>
<script>
"use strict";
const pts = []; let lastId = 0, t0 = null, target = null;
const X0 = 50, X1 = 700, Y0 = 260, Y1 = 20;
function el(id){ return document.getElementById(id); }
function draw(){
  if (!pts.length) return;
  const tmax = Math.max(1, pts[pts.length-1].t - t0);
  const sx = t => X0 + (X1 - X0) * (t - t0) / tmax, sy = a => Y0 - (Y0 - Y1) * a;
  el("acc-line").setAttribute("points", pts.map(p => sx(p.t).toFixed(1) + "," + sy(p.accuracy).toFixed(1)).join(" "));
  el("acc-line").setAttribute("data-points", String(pts.length));
  if (target !== null) el("target-line").setAttribute("points", X0 + "," + sy(target) + " " + X1 + "," + sy(target));
  let g = "";
  for (let i = 0; i <= 4; i++) { const a = i / 4, y = sy(a).toFixed(1);
    g += `<line class="grid" x1="${X0}" y1="${y}" x2="${X1}" y2="${y}"/><text class="lbl" x="44" y="${y}" text-anchor="end">${a.toFixed(2)}</text>`;
    const x = (X0 + (X1 - X0) * i / 4).toFixed(1);
    g += `<text class="lbl" x="${x}" y="275" text-anchor="middle">${(tmax * i / 4).toFixed(0)}</text>`; }
  el("grid").innerHTML = g;
}
async function get(url){
  const r = await fetch(url);
  if (r.status === 401 || r.status === 403) location.reload();  /* revoked or expired: sign in again */
  return r.json();
}
async function poll(){
  try {
    const s = await get("/status");
    target = s.target_accuracy;
    el("task").textContent = s.task + " (" + s.algorithm + ", " + s.mode + ")";
    el("version").textContent = s.version;
    el("concurrency").textContent = s.leases.active + " / " + s.concurrency;
    el("buffer").textContent = s.buffer.fill + (s.buffer.size ? " / " + s.buffer.size : "");
    el("accepted").textContent = (s.updates.buffered || 0) + (s.updates.stepped || 0);
    const rej = s.rejected, total = Object.values(rej).reduce((a, b) => a + b, 0);
    el("rejected").textContent = total;
    el("reasons").innerHTML = Object.keys(rej).sort().map(k => `<tr><td>${k}</td><td>${rej[k]}</td></tr>`).join("");
    if (s.last_eval) el("accuracy").textContent = s.last_eval.accuracy.toFixed(3);
    for (let more = true; more; ) {
      const h = await get("/v1/history?since=" + lastId);
      for (const e of h.evals) { if (t0 === null) t0 = e.t; pts.push(e); lastId = Math.max(lastId, e.id); }
      more = h.next !== null;
    }
    draw();
  } catch (err) { /* server restarting: keep polling */ }
}
poll(); setInterval(poll, 1000);
</script></body></html>
"""
