// The Coordinator's status page: polls the read-only REST API and draws the job with plain DOM and SVG (no libraries).
"use strict";

const POLL_MS = 2000;
const SVG = "http://www.w3.org/2000/svg";
const wanted = new URLSearchParams(location.search).get("job");

function el(tag, attrs, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, v);
  for (const c of children) if (c !== undefined && c !== null) e.append(c instanceof Node ? c : String(c));
  return e;
}

function fmt(n, digits) { return typeof n === "number" && isFinite(n) ? n.toFixed(digits) : "–"; }
function flops(n) { return typeof n !== "number" ? "–" : n >= 1e12 ? fmt(n / 1e12, 1) + " TFLOP/s" : fmt(n / 1e9, 1) + " GFLOP/s"; }
function bytes(n) { return typeof n !== "number" ? "–" : n >= 1e9 ? fmt(n / 1e9, 2) + " GB" : n >= 1e6 ? fmt(n / 1e6, 1) + " MB" : fmt(n / 1e3, 1) + " kB"; }
function ago(iso) {
  if (!iso) return "never";
  const s = (Date.now() - Date.parse(iso)) / 1000;
  return s < 1 ? "now" : s < 90 ? fmt(s, 0) + " s ago" : fmt(s / 60, 1) + " min ago";
}
function stateCell(state) { return el("td", { class: "state state-" + (state || "").toLowerCase() }, state || "?"); }

async function getJson(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

// ---- Charts ----

function niceTicks(lo, hi, n) {
  if (hi === lo) { hi = lo + 1; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(t);
  return ticks;
}

/** A line chart of points [{x, y}] into the given svg; data-points says how many points it drew (the tests read it). */
function lineChart(svg, points, seriesClass, emptyText, yDigits) {
  svg.replaceChildren();
  svg.setAttribute("data-points", String(points.length));
  const W = 480, H = 220, L = 52, R = 10, T = 10, B = 26;
  if (points.length === 0) {
    svg.append(el("svg:text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, emptyText));
    return;
  }
  const xs = points.map(p => p.x), ys = points.map(p => p.y);
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.05 || Math.abs(y0) * 0.05 || 1;
  y0 -= pad; y1 += pad;
  const sx = x => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = y => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  for (const t of niceTicks(y0, y1, 4)) {
    svg.append(el("svg:line", { class: "axis", x1: L, x2: W - R, y1: sy(t), y2: sy(t) }));
    svg.append(el("svg:text", { x: L - 6, y: sy(t) + 4, "text-anchor": "end" }, fmt(t, yDigits)));
  }
  for (const t of niceTicks(x0, x1, 5)) {
    if (t < x0 || t > x1) continue;
    svg.append(el("svg:text", { x: sx(t), y: H - 8, "text-anchor": "middle" }, String(Math.round(t))));
  }
  // Points with a series key (p.s) draw one line per series: the study chart's trials.
  const groups = new Map();
  for (const p of points) { if (!groups.has(p.s)) groups.set(p.s, []); groups.get(p.s).push(p); }
  for (const g of groups.values()) {
    const d = g.map((p, i) => (i ? "L" : "M") + sx(p.x).toFixed(1) + " " + sy(p.y).toFixed(1)).join(" ");
    svg.append(el("svg:path", { class: "series " + seriesClass, d }));
  }
  if (points.length === 1) svg.append(el("svg:circle", { cx: sx(points[0].x), cy: sy(points[0].y), r: 3, class: "series " + seriesClass }));
}

/** Layers (rows) by experts (columns), each cell the expert's share of its layer's routed tokens. */
function heatmap(box, load) {
  box.replaceChildren();
  const rows = load && Array.isArray(load.fractions) ? load.fractions.filter(Array.isArray) : [];
  if (rows.length === 0) {
    box.setAttribute("data-cells", "0");
    box.append(el("p", { class: "muted" }, "no routing data yet"));
    return;
  }
  const experts = load.experts || Math.max(...rows.map(r => r.length));
  const layers = Array.isArray(load.layers) ? load.layers : rows.map((_, i) => i);
  const cell = Math.max(6, Math.min(44, Math.floor(400 / experts))), L = 60, T = 4;
  const W = L + experts * cell + 4, H = T + rows.length * cell + 4;
  // Drawn at its own size (shrunk, never stretched, to fit the card), so its labels keep the charts' 11px.
  const svg = el("svg:svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-label": "expert load by layer" });
  // Balanced is 1/E: colour by the share relative to twice that, so balance reads as mid-blue and collapse as dark.
  const full = 2 / experts;
  let cells = 0;
  rows.forEach((row, i) => {
    svg.append(el("svg:text", { x: L - 6, y: T + i * cell + cell * 0.7, "text-anchor": "end" }, "layer " + layers[i]));
    row.forEach((f, j) => {
      const a = Math.max(0.04, Math.min(1, (f || 0) / full));
      const r = el("svg:rect", { x: L + j * cell, y: T + i * cell, width: cell - 1, height: cell - 1, fill: `rgba(47,111,223,${a.toFixed(3)})`, class: "cell" });
      r.append(el("svg:title", {}, `layer ${layers[i]}, expert ${j}: ${fmt(100 * (f || 0), 1)}% of tokens`));
      svg.append(r);
      cells++;
    });
  });
  box.setAttribute("data-cells", String(cells));
  // The caption is text in the page, not in the SVG: it wraps in a narrow card instead of being clipped by the viewBox.
  box.append(svg, el("p", { class: "muted caption" },
    `${typeof load.step === "number" ? `step ${load.step}: ` : ""}layers (rows) by experts 0…${experts - 1} (columns); darker: more tokens; balanced = ${fmt(100 / experts, 1)}% each`));
}

// ---- Sections ----

function renderJobs(jobs, selected) {
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...jobs.map(j => {
    const tr = el("tr", { "data-job": j.jobId, class: j.jobId === selected ? "selected" : null },
      el("td", {}, el("a", { href: "?job=" + encodeURIComponent(j.jobId) }, j.jobId)),
      stateCell(j.state), el("td", {}, j.generation), el("td", {}, j.step), el("td", {}, j.workers), el("td", {}, fmt(j.loss, 4)));
    return tr;
  }));
  if (jobs.length === 0) body.append(el("tr", {}, el("td", { colspan: 6, class: "muted" }, "no jobs submitted")));
}

function renderJob(s) {
  const spec = s.spec || {};
  const last = (s.loss || [])[(s.loss || []).length - 1];
  document.getElementById("job-title").textContent = "Job " + s.jobId + (spec.name && spec.name !== s.jobId ? " · " + spec.name : "");
  const item = (label, value, cls) => el("span", {}, label + " ", el("b", { class: cls }, value));
  const total = spec.steps || 0;
  const items = [
    item("state", s.state, "state state-" + (s.state || "").toLowerCase()),
    item("generation", s.generation),
    item("step", total ? `${s.step}/${total}` : s.step),
    item("loss", fmt(last && last.loss, 4)),
    item("tokens/s", last ? fmt(last.tokensPerSecond, 0) : "–"),
    // The members' summed model FLOP/s over their devices' summed peaks; which peaks, and where they came from, beside it.
    item("MFU", s.utilization ? `${fmt(s.utilization.mfu * 100, 2)}% of ${flops(s.utilization.peakFlops)}` +
      (s.utilization.peakTooLow ? " (capped: the peak looks too low)" : "") : "–"),
    ...(s.utilization ? [item("peak", s.utilization.peaks.join("; "))] : []),
    item("workers", (s.workers || []).length),
    item("model", spec.modelPreset || "custom"),
  ];
  if (s.error) items.push(item("error", s.error, "state-failed"));
  const summary = document.getElementById("job-summary");
  summary.setAttribute("data-state", s.state || "");
  summary.replaceChildren(...items);

  const loss = (s.loss || []).map(p => ({ x: p.step, y: p.loss }));
  lineChart(document.getElementById("loss-chart"), loss, "loss", "no steps reported yet", 2);
  lineChart(document.getElementById("tps-chart"), (s.loss || []).map(p => ({ x: p.step, y: p.tokensPerSecond })), "tps", "no steps reported yet", 0);
  // Validation history is optional in the status (older coordinators have none).
  const val = s.validationLoss || s.validation || [];
  lineChart(document.getElementById("validation-chart"), val.map(p => ({ x: p.step, y: p.loss })), "validation", "no validation run yet", 2);
  heatmap(document.getElementById("heatmap"), s.expertLoad);

  const committed = new Set((s.committed || []).map(c => c.step));
  const rows = [];
  for (const c of (s.committed || []).slice().reverse())
    rows.push(el("tr", { "data-step": c.step }, el("td", {}, c.step), el("td", {}, c.generation),
      c.deletedAt ? el("td", { class: "muted", title: "deleted " + new Date(c.deletedAt).toLocaleTimeString() }, "deleted (keepLast)") : el("td", { class: "state-completed" }, "committed"),
      el("td", {}, c.files), el("td", {}, bytes(c.bytes))));
  for (const c of (s.checkpoints || []).slice().reverse())
    if (!committed.has(c.step))
      rows.push(el("tr", { "data-step": c.step }, el("td", {}, c.step), el("td", {}, c.generation), el("td", { class: "state-pending" }, c.complete ? "reported" : `${(c.files || []).length}/${c.world} ranks`), el("td", {}, (c.files || []).length), el("td", {}, "–")));
  const body = document.querySelector("#checkpoints tbody");
  body.replaceChildren(...rows);
  evaluation(document.getElementById("evaluation"), s.evaluations || [], (spec.evalTasks || []).length > 0);
  if (rows.length === 0) body.append(el("tr", {}, el("td", { colspan: 5, class: "muted" }, "no checkpoint yet")));
  const c = s.consumption;
  document.getElementById("consumption").textContent = c ? `data consumed: ${c.samples} samples in ${Array.isArray(c.ranges) ? c.ranges.length : c.ranges} ranges${c.complete ? " (epoch complete)" : ""}` : "";

  const events = (s.events || []).slice().reverse().map(e => {
    const details = [];
    if (e.workerId) details.push("worker " + e.workerId);
    if (e.reason) details.push(e.reason);
    if (e.resumeSource) details.push("resumed from " + e.resumeSource);
    if (typeof e.stepsRedone === "number") details.push(e.stepsRedone + " steps redone");
    if (typeof e.recoverySeconds === "number") details.push("recovered in " + fmt(e.recoverySeconds, 1) + " s");
    return el("li", { "data-kind": e.kind || "" },
      el("span", { class: "muted" }, new Date(e.at).toLocaleTimeString() + " · gen " + e.generation + " "),
      e.kind ? el("span", { class: "kind" }, e.kind + " ") : null, e.message,
      details.length ? el("span", { class: "muted" }, " (" + details.join(", ") + ")") : null);
  });
  document.getElementById("events").replaceChildren(...events);
}

function renderWorkers(workers) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...workers.map(w => {
    const age = w.lastHeartbeat ? (Date.now() - Date.parse(w.lastHeartbeat)) / 1000 : Infinity;
    const health = !w.online ? "offline" : age > 15 ? "stale" : "online";
    const a = w.assignment;
    return el("tr", { "data-worker": w.workerId },
      el("td", {}, w.workerId), el("td", { class: "health-" + health }, health),
      el("td", {}, w.capabilities ? w.capabilities.device : "–"),
      el("td", {}, a ? `${a.jobId} / ${a.rank} of ${a.world}` : "free"),
      el("td", {}, w.generation), el("td", {}, w.metrics ? w.metrics.step : "–"), el("td", {}, ago(w.lastHeartbeat)));
  }));
  if (workers.length === 0) body.append(el("tr", {}, el("td", { colspan: 7, class: "muted" }, "no worker has joined")));
}

// ---- Studies: trials by state, each trial's metric against its steps, the rung cut-offs, the best trial ----

function renderStudy(s) {
  document.getElementById("studies").hidden = false;
  document.getElementById("study-title").textContent = "Study " + s.studyId + " (" + s.state + ")";
  const counts = {};
  for (const t of s.trials) counts[t.state] = (counts[t.state] || 0) + 1;
  const rungs = s.rungs.map(r => "rung " + r.rung + " @" + r.step + ": cut-off " + fmt(r.cutoff, 4) + ", " + r.stopped + " stopped of " + r.results).join("; ");
  const best = s.best ? "best " + s.best.jobId + " (" + fmt(s.best.metric, 4) + ")" + (s.best.checkpointStep ? ", checkpoint step " + s.best.checkpointStep : "") : "no result yet";
  document.getElementById("study-summary").textContent =
    Object.entries(counts).map(([k, v]) => v + " " + k).join(", ") + " | " + s.metric + " (" + s.mode + ") | " + best + (rungs ? " | " + rungs : "");
  document.querySelector("#trials tbody").replaceChildren(...s.trials.map(t => el("tr", {},
    el("td", {}, el("a", { href: "?job=" + encodeURIComponent(t.jobId) }, t.jobId)), stateCell(t.state), el("td", {}, t.step),
    el("td", {}, fmt(t.metric, 4)), el("td", {}, Object.entries(t.parameters).map(([k, v]) => k + " = " + v).join(", ")),
    el("td", {}, t.checkpointStep || "–"))));
  // Every trial's curve in one chart, one line each.
  const points = s.trials.flatMap(t => t.curve.map(p => ({ x: p.step, y: p.loss, s: t.index })));
  lineChart(document.getElementById("study-chart"), points, "series", "no metric yet", 3);
}

async function poll() {
  try {
    const [jobs, workers] = await Promise.all([getJson("/jobs"), getJson("/workers")]);
    // The job to show: ?job=, else the first one still running, else the newest.
    const active = jobs.find(j => !["completed", "failed", "stopped"].includes(j.state));
    const selected = wanted || (active || jobs[jobs.length - 1] || {}).jobId;
    renderJobs(jobs, selected);
    renderWorkers(workers);
    if (selected) renderJob(await getJson("/jobs/" + encodeURIComponent(selected)));
    const studies = await getJson("/studies");
    const study = studies.find(s => s.state === "running") || studies[studies.length - 1];
    if (study) renderStudy(await getJson("/studies/" + encodeURIComponent(study.studyId)));
    const u = document.getElementById("updated");
    u.textContent = "updated " + new Date().toLocaleTimeString();
    u.removeAttribute("data-error");
  } catch (e) {
    const u = document.getElementById("updated");
    u.textContent = "cannot reach the coordinator: " + e.message;
    u.setAttribute("data-error", e.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();

// The newest checkpoint evaluation (JobSpec.evalTasks): every task's metrics at that step, with their standard errors.
function evaluation(node, scores, asked) {
  if (scores.length === 0) {
    node.textContent = asked ? "evaluation: none yet (the tasks are scored at each checkpoint)" : "";
    return;
  }
  const step = Math.max(...scores.map(e => e.step));
  const byTask = new Map();
  for (const e of scores.filter(e => e.step === step)) {
    const text = `${e.metric} ${fmt(e.value, 4)}` + (e.stderr == null ? "" : ` ± ${fmt(e.stderr, 4)}`);
    byTask.set(e.task, [...(byTask.get(e.task) || []), text]);
  }
  node.textContent = `evaluation at step ${step}: ` + [...byTask].map(([task, m]) => `${task} ${m.join(", ")}`).join("; ");
}
