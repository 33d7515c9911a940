// The monitoring page: one EventSource on /live/events (a snapshot every 80 ms), plain
// canvas drawing, no libraries. Times are LSL clock seconds; each snapshot carries the
// daemon's clock `t`, and everything is drawn relative to the newest one. What changes
// slowly (model, outputs' labels, histogram, sources) comes in every 10th message and is
// kept until the next; spikes come as base64 little-endian int32 arrays (api/routes/page.py).
"use strict";

const TRACE_S = 10, RASTER_S = 5, CURSOR_S = 2;
const $ = (id) => document.getElementById(id);
const buf = { out: [], beh: [], spikes: [], now: 0, labels: [], behLabels: [], behOutput: "" };
let last = null, messages = 0, job = null;

// ------------------------------------------------------------------ token (tab only)
function token() { return sessionStorage.getItem("bci_token") || ""; }
function showToken() {
  $("token-state").textContent = token() ? "token set (kept in this tab only)" : "no token (kept in this tab only)";
}
$("token-set").onclick = () => {
  const v = $("token").value.trim();
  if (v) sessionStorage.setItem("bci_token", v); else sessionStorage.removeItem("bci_token");
  $("token").value = "";
  showToken();
};
showToken();

async function call(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  const r = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  let data = null;
  try { data = await r.json(); } catch (e) { data = null; }
  if (!r.ok) {
    let detail = data && data.detail ? data.detail : r.statusText;
    if (typeof detail !== "string") detail = JSON.stringify(detail);
    if (r.status === 401) detail += " (type the token above)";
    const err = new Error(`${method} ${path}: ${r.status} ${detail}`);
    err.status = r.status; err.detail = `${r.status} ${detail}`;
    throw err;
  }
  return data;
}
function say(text, bad) { const m = $("message"); m.textContent = text; m.className = bad ? "warn" : "muted"; }

$("start").onclick = () => call("POST", "/decoder/start").then((r) => say("decoder: " + r.state)).catch((e) => say(e.message, true));
$("stop").onclick = () => call("POST", "/decoder/stop").then((r) => say("decoder: " + r.state)).catch((e) => say(e.message, true));
// "supervised" fits the new units to the behaviour stream, "unsupervised" (label-free) to
// the spikes alone; the server decides whether it can (an MtM head, enough seconds in the
// buffer) and its 4xx text is shown as it came, next to the job line, the decoder untouched
$("calibrate").onclick = async () => {
  const mode = $("cal-kind").value;
  const kind = mode === "unsupervised" ? "label-free" : "supervised";
  const body = {
    source: "buffer",
    mode,
    seconds: Number($("cal-seconds").value),
    steps: Number($("cal-steps").value),
    auto_apply: true,
  };
  if (mode === "supervised") body.adapt = $("cal-adapt").value;  // label-free fits units only
  try {
    job = await call("POST", "/calibrations", body);
    say(`${kind} calibration ${job.name} started (${job.units} units, ${job.seconds.toFixed(0)} s)`);
    pollJob();
  } catch (e) {
    job = null;
    $("cal-progress").value = 0;
    $("cal-state").textContent = `${kind} calibration refused: ${e.detail || e.message}`;
    $("cal-state").dataset.state = "refused";
    $("cal-state").className = "warn";
    say(e.message, true);
  }
};
async function pollJob() {
  if (!job) return;
  try { job = await call("GET", "/calibrations/" + job.id); } catch (e) { say(e.message, true); return; }
  $("cal-progress").value = job.progress || 0;
  let text = `${job.name}${job.mode === "unsupervised" ? " (label-free)" : ""}: ${job.state}` + (job.phase ? ` (${job.phase})` : "") +
    ` ${Math.round(100 * (job.progress || 0))}%`;
  if (job.loss != null) text += ` · loss ${job.loss.toFixed(3)}`;
  if (job.heldout_r2 != null) text += ` · held-out R² ${job.heldout_r2.toFixed(3)}`;
  if (job.wiener_r2 != null) text += ` (Wiener ${job.wiener_r2.toFixed(3)})`;
  if (job.stage_reason) text += ` · ${job.stage_reason}`;
  if (job.applied) text += " · applied";
  if (job.error) text += ` · ${job.error}`;
  $("cal-state").textContent = text;
  $("cal-state").dataset.state = job.applied ? "applied" : job.state;
  $("cal-state").className = job.state === "failed" ? "warn" : "muted";
  if (job.state === "queued" || job.state === "running" || (job.state === "done" && job.auto_apply && !job.applied)) {
    setTimeout(pollJob, 500);
  }
}

// ------------------------------------------------------------------ feed
function connect() {
  const es = new EventSource("/live/events");
  es.onmessage = (ev) => {
    const msg = JSON.parse(ev.data);
    if (msg.error) { say(msg.error, true); return; }
    messages += 1;
    take(msg);
    draw();
  };
  es.onerror = () => { $("state").textContent = "offline"; $("state").dataset.state = "offline"; };
}

function trim(arr, t0) { let i = 0; while (i < arr.length && arr[i].t < t0) i++; if (i) arr.splice(0, i); }

function int32s(b64) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Int32Array(bytes.buffer);  // little-endian: every platform a browser runs on
}

function take(msg) {
  last = Object.assign(last || {}, msg);
  buf.now = msg.t;
  if (msg.outputs) buf.labels = msg.outputs.labels;
  if (msg.output) buf.out.push({ t: msg.output.t, y: msg.output.y });
  if (msg.behavior) {
    buf.behLabels = msg.behavior.labels; buf.behOutput = msg.behavior.output;
    for (let i = 0; i < msg.behavior.t.length; i++) buf.beh.push({ t: msg.behavior.t[i], y: msg.behavior.y[i] });
  }
  const ago = int32s(msg.spikes.ago), u = int32s(msg.spikes.u);  // ago: 0.1 ms ticks before t
  for (let i = 0; i < ago.length; i++) buf.spikes.push({ t: msg.t - 1e-4 * ago[i], u: u[i] });
  trim(buf.out, buf.now - TRACE_S); trim(buf.beh, buf.now - TRACE_S); trim(buf.spikes, buf.now - RASTER_S);
}

// ------------------------------------------------------------------ drawing
function text(id, v) { const e = $(id); if (e.textContent !== v) e.textContent = v; }
function fmt(v, d = 2) { return v == null ? "—" : Number(v).toFixed(d); }
function src(s) {
  if (!s) return "none configured";
  if (!s.name) return `${s.state} · waiting for type ${s.query.type}` + (s.query.source_id ? ` source ${s.query.source_id}` : "");
  return `${s.state} · ${s.name} (${s.source_id || "no source id"})` + (s.hostname ? ` on ${s.hostname}` : "") +
    (s.connects != null ? ` · ${s.connects} connect(s), ${s.losses} loss(es)` : "");
}

function table(id, rows) {
  const t = $(id);
  t.innerHTML = rows.map(([k, v, warn]) => `<tr><th>${k}</th><td${warn ? ' class="warn"' : ""} data-key="${k}">${v}</td></tr>`).join("");
}

function draw() {
  const m = last;
  if (!m.model) return;  // the first message of a connection carries it
  const st = $("state"); text("state", m.state); st.dataset.state = m.state;
  text("feed", `feed: ${messages} messages`);
  text("model", m.model.name);
  text("calibration", m.model.calibration || "none");
  text("session", m.model.session == null ? "—" : `${m.model.session} · ${m.model.calibrated ? "units known" : "units unknown (calibrate)"}`);
  const c = m.config;
  text("decoding", `${m.model.output || "—"} · ${c.mode} · ${c.backend} ${(c.providers || []).join(",")} · ${c.cadence_hz} Hz`);
  if (m.sources) {
    text("src-spikes", src(m.sources.spikes));
    text("src-behavior", src(m.sources.behavior));
    text("src-control", `${m.sources.control.name} (${m.sources.control.source_id}) · ${m.sources.control.state}`);
  }
  const k = m.counters || {};
  table("counters", [
    ["steps", k.steps ?? 0], ["missed deadlines", k.missed ?? 0, k.missed > 0], ["late outputs", k.late ?? 0, k.late > 0],
    ["errors", k.errors ?? 0, k.errors > 0], ["safe-value steps", k.safe_steps ?? 0], ["swaps", k.swaps ?? 0],
  ]);
  const dis = Object.entries(m.discards || {}).map(([r, n]) => [r.replace(/_/g, " "), n, n > 0]);
  for (const [r, n] of Object.entries(m.engine_rejected || {})) dis.push(["engine: " + r.replace(/_/g, " "), n, n > 0]);
  table("discards", dis);
  text("spike-rate", m.spikes.per_s.toFixed(0)); $("spike-rate").dataset.rate = m.spikes.per_s;
  drawTraces(); drawCursor(); drawLatency(); drawRaster();
}

function canvasFor(i) {
  const host = $("traces");
  while (host.children.length < buf.labels.length) {
    const cv = document.createElement("canvas");
    cv.width = 720; cv.height = 110; cv.dataset.points = "0";
    host.appendChild(cv);
  }
  while (host.children.length > buf.labels.length) host.removeChild(host.lastChild);
  return host.children[i];
}

function behIndex(label, i) {
  // behaviour channels pair with outputs by position when the stream carries the output
  if (buf.behLabels.indexOf(label) >= 0) return buf.behLabels.indexOf(label);
  return buf.behLabels.length === buf.labels.length ? i : -1;
}

function line(g, pts, x, y, colour, width) {
  g.strokeStyle = colour; g.lineWidth = width; g.beginPath();
  let up = true;
  for (const p of pts) {
    if (p[1] == null) { up = true; continue; }
    if (up) g.moveTo(x(p[0]), y(p[1])); else g.lineTo(x(p[0]), y(p[1]));
    up = false;
  }
  g.stroke();
}

function drawTraces() {
  const t0 = buf.now - TRACE_S;
  buf.labels.forEach((label, i) => {
    const cv = canvasFor(i), g = cv.getContext("2d"), W = cv.width, H = cv.height;
    const dec = buf.out.map((o) => [o.t, o.y[i]]);
    const bi = behIndex(label, i);
    const beh = bi >= 0 ? buf.beh.map((b) => [b.t, b.y[bi]]) : [];
    let lo = Infinity, hi = -Infinity;
    for (const p of dec.concat(beh)) if (p[1] != null) { lo = Math.min(lo, p[1]); hi = Math.max(hi, p[1]); }
    if (!isFinite(lo)) { lo = -1; hi = 1; }
    if (hi - lo < 1e-6) { hi += 1; lo -= 1; }
    const pad = 0.08 * (hi - lo);
    const x = (t) => 40 + (W - 50) * (t - t0) / TRACE_S, y = (v) => H - 14 - (H - 24) * (v - lo + pad) / (hi - lo + 2 * pad);
    g.clearRect(0, 0, W, H);
    g.fillStyle = "#666"; g.font = "11px sans-serif";
    g.fillText(label, 4, 14); g.fillText(hi.toPrecision(3), 4, 28); g.fillText(lo.toPrecision(3), 4, H - 16);
    g.strokeStyle = "#e5e7eb"; g.lineWidth = 1;
    for (let s = 0; s <= TRACE_S; s += 2) { g.beginPath(); g.moveTo(x(t0 + s), 4); g.lineTo(x(t0 + s), H - 12); g.stroke(); g.fillText(`${s - TRACE_S} s`, x(t0 + s) - 10, H - 2); }
    line(g, beh, x, y, "#9ca3af", 1.5);
    line(g, dec, x, y, "#2563eb", 1.8);
    cv.dataset.points = String(dec.length); cv.dataset.behavior = String(beh.length);
  });
}

function drawCursor() {
  const cv = $("cursor"), g = cv.getContext("2d"), W = cv.width, H = cv.height;
  g.clearRect(0, 0, W, H);
  if (buf.labels.length !== 2) { $("cursor-note").textContent = "no cursor: the output is not 2-D"; return; }
  const t0 = buf.now - CURSOR_S;
  const dec = buf.out.filter((o) => o.t >= t0 && o.y[0] != null).map((o) => o.y);
  const b0 = behIndex(buf.labels[0], 0), b1 = behIndex(buf.labels[1], 1);
  const beh = b0 >= 0 && b1 >= 0 ? buf.beh.filter((b) => b.t >= t0).map((b) => [b.y[b0], b.y[b1]]) : [];
  let r = 1e-6;
  for (const p of buf.out) if (p.y[0] != null) r = Math.max(r, Math.abs(p.y[0]), Math.abs(p.y[1]));
  for (const p of buf.beh) if (b0 >= 0 && b1 >= 0) r = Math.max(r, Math.abs(p.y[b0]), Math.abs(p.y[b1]));
  const sx = (v) => W / 2 + (W / 2 - 10) * v / r, sy = (v) => H / 2 - (H / 2 - 10) * v / r;
  g.strokeStyle = "#e5e7eb"; g.beginPath(); g.moveTo(W / 2, 0); g.lineTo(W / 2, H); g.moveTo(0, H / 2); g.lineTo(W, H / 2); g.stroke();
  g.fillStyle = "#666"; g.font = "11px sans-serif"; g.fillText(`${buf.labels[0]}, ${buf.labels[1]} (±${r.toPrecision(3)})`, 4, 12);
  const trail = (pts, colour) => {
    g.strokeStyle = colour; g.lineWidth = 1.5; g.beginPath();
    pts.forEach((p, i) => (i ? g.lineTo(sx(p[0]), sy(p[1])) : g.moveTo(sx(p[0]), sy(p[1]))));
    g.stroke();
    if (pts.length) { const p = pts[pts.length - 1]; g.fillStyle = colour; g.beginPath(); g.arc(sx(p[0]), sy(p[1]), 6, 0, 2 * Math.PI); g.fill(); }
  };
  trail(beh, "#9ca3af"); trail(dec, "#2563eb");
  cv.dataset.points = String(dec.length);
}

function drawLatency() {
  const L = last.latency; if (!L) return;
  const cv = $("latency"), g = cv.getContext("2d"), W = cv.width, H = cv.height;
  const e = [];  // log-spaced bin edges, as the daemon's (HIST_EDGES)
  for (let i = 0; i <= L.bins; i++) e.push(L.lo_ms * Math.pow(L.hi_ms / L.lo_ms, i / L.bins));
  const n = L.counts.slice(1, -1);  // drop under/over-flow bins from the bars
  const total = L.counts.reduce((a, b) => a + b, 0);
  // x: log ms from 0.1 to 100 (wider values are in the under/over counts)
  const lx0 = Math.log10(0.1), lx1 = Math.log10(100);
  const x = (ms) => 30 + (W - 40) * (Math.log10(Math.max(ms, 1e-3)) - lx0) / (lx1 - lx0);
  const top = Math.max(1, ...n);
  g.clearRect(0, 0, W, H);
  g.fillStyle = "#60a5fa";
  for (let i = 0; i < n.length; i++) {
    if (!n[i]) continue;
    const h = (H - 30) * Math.sqrt(n[i] / top);  // sqrt height: the tail stays visible
    g.fillRect(x(e[i]), H - 18 - h, Math.max(1, x(e[i + 1]) - x(e[i]) - 0.5), h);
  }
  g.fillStyle = "#666"; g.font = "11px sans-serif";
  for (const ms of [0.1, 1, 10, 100]) g.fillText(`${ms} ms`, x(ms) - 12, H - 4);
  const mark = (v, name, colour) => {
    if (v == null) return;
    g.strokeStyle = colour; g.lineWidth = 1.5; g.beginPath(); g.moveTo(x(v), 12); g.lineTo(x(v), H - 18); g.stroke();
    g.fillStyle = colour; g.fillText(name, x(v) + 2, 12 + (name === "p99.9" ? 24 : name === "p99" ? 12 : 0));
  };
  mark(L.p50, "p50", "#15803d"); mark(L.p99, "p99", "#d97706"); mark(L.p999, "p99.9", "#b91c1c");
  g.fillStyle = "#666"; g.fillText("√count", 2, 12);
  text("lat-text", `p50 ${fmt(L.p50)} ms · p99 ${fmt(L.p99)} ms · p99.9 ${fmt(L.p999)} ms · ${total} steps` +
    (L.counts[L.counts.length - 1] ? ` · ${L.counts[L.counts.length - 1]} over ${L.hi_ms} ms` : ""));
  text("lat-window", `(deadline to output sent, last ${L.window_s} s)`);
  cv.dataset.total = String(total);
}

function drawRaster() {
  const cv = $("raster"), g = cv.getContext("2d"), W = cv.width, H = cv.height;
  g.clearRect(0, 0, W, H);
  let units = 1; for (const s of buf.spikes) units = Math.max(units, s.u + 1);
  const rows = Math.min(units, H - 20), t0 = buf.now - RASTER_S;
  const x = (t) => 30 + (W - 40) * (t - t0) / RASTER_S;
  const rh = (H - 20) / rows;
  g.fillStyle = "#1d2330";
  for (const s of buf.spikes) {
    const row = units > rows ? Math.floor(s.u * rows / units) : s.u;
    g.fillRect(x(s.t), 2 + row * rh, 1.2, Math.max(1, rh - 0.4));
  }
  g.fillStyle = "#666"; g.font = "11px sans-serif";
  for (let s = 0; s <= RASTER_S; s++) g.fillText(`${s - RASTER_S} s`, x(t0 + s) - 10, H - 4);
  g.save(); g.translate(10, H / 2 + 20); g.rotate(-Math.PI / 2); g.fillText(`${units} units`, 0, 0); g.restore();
  cv.dataset.spikes = String(buf.spikes.length);
}

connect();
