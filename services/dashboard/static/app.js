// The dashboard page: the last hour from /api/history, then one sample a second from /api/now.
"use strict";

const HOUR_S = 3600;
const series = { at: [], tps: [], p50: [], p95: [], p99: [], err: [], steperr: [], tokens: [], cost: [] };
let charts = [];
let last = 0;

function chart(id, title, lines) {
  const el = document.getElementById(id);
  const scales = [...new Set(lines.map(([, , scale]) => scale || "y"))];
  const opts = { title, width: el.clientWidth - 16 || 560, height: 200,
                 series: [{}, ...lines.map(([label, stroke, scale]) => ({ label, stroke, width: 2, scale: scale || "y" }))],
                 axes: [{}, ...scales.map((scale, i) => ({ scale, side: i ? 1 : 3, grid: { show: !i }, size: 64 }))] };
  return new uPlot(opts, [[], ...lines.map(() => [])], el);
}

function push(s) {
  if (s.at <= last) return;
  last = s.at;
  series.at.push(s.at); series.tps.push(s.tasks_per_s);
  series.p50.push(s.p50_ms); series.p95.push(s.p95_ms); series.p99.push(s.p99_ms);
  series.err.push(s.error_rate * 100); series.steperr.push(s.step_error_rate * 100);
  series.tokens.push(s.tokens_per_hour); series.cost.push(s.cost_per_hour_usd);
  while (series.at.length && series.at[0] < s.at - HOUR_S) Object.values(series).forEach(a => a.shift());
}

function draw() {
  const a = series.at;
  charts[0].setData([a, series.tps]);
  charts[1].setData([a, series.p50, series.p95, series.p99]);
  charts[2].setData([a, series.err, series.steperr]);
  charts[3].setData([a, series.tokens, series.cost]);
}

function text(id, value) { document.getElementById(id).textContent = value; }

function rows(id, entries, cls) {
  const body = document.querySelector(`#${id} tbody`);
  body.replaceChildren(...entries.map(cells => {
    const tr = document.createElement("tr");
    cells.forEach(c => { const td = document.createElement("td"); td.textContent = c; tr.append(td); });
    if (cls) tr.lastChild.className = cls(cells);
    return tr;
  }));
  if (!entries.length) rows(id, [["(none yet)"]]);
}

function show(s) {
  text("tasks-per-s", s.tasks_per_s.toFixed(2));
  text("tasks-done", s.tasks_done.toLocaleString());
  text("p95", s.p95_ms.toFixed(0));
  text("error-rate", (s.error_rate * 100).toFixed(1) + " %");
  text("tokens-per-hour", s.tokens_per_hour.toLocaleString());
  text("cost-per-hour", "$" + s.cost_per_hour_usd.toFixed(4));
  text("updated", "updated " + new Date(s.at * 1000).toLocaleTimeString());
  rows("queues", Object.entries(s.queue_depth).sort());
  rows("breakers", Object.entries(s.breakers).sort(), ([, state]) => state === "closed" ? "" : "open");
  if (s.approvals_waiting !== null && s.approvals_waiting !== undefined) {
    document.getElementById("approvals-box").hidden = false;
    text("approvals", s.approvals_waiting);
  }
  if (s.alerts) {
    document.getElementById("alerts").hidden = false;
    rows("alerts", s.alerts.map(a => [a.name || a.rule || "?", a.severity || "", a.scope || ""]));
  }
}

async function json(path) {
  const reply = await fetch(path);
  if (!reply.ok) throw new Error(`${path}: ${reply.status}`);
  return reply.json();
}

async function tick() {
  try {
    const s = await json("/api/now");
    push(s); draw(); show(s);
  } catch (e) {
    text("updated", "the monitor did not answer; retrying");
  }
}

async function lookup(event) {
  event.preventDefault();
  const id = encodeURIComponent(document.getElementById("task-id").value);
  const tenant = encodeURIComponent(document.getElementById("task-tenant").value);
  const reply = await fetch(`/api/task?id=${id}&tenant=${tenant}`);
  document.getElementById("task-result").textContent = JSON.stringify(await reply.json(), null, 2);
}

async function start() {
  charts = [
    chart("chart-throughput", "Throughput (tasks/s)", [["tasks/s", "#1f77b4"]]),
    chart("chart-latency", "Latency (ms)", [["p50", "#2ca02c"], ["p95", "#ff7f0e"], ["p99", "#d62728"]]),
    chart("chart-errors", "Error rate (%)", [["tasks", "#d62728"], ["steps", "#9467bd"]]),
    chart("chart-tokens", "Tokens and cost per hour", [["tokens/h", "#8c564b", "tokens"], ["USD/h", "#17becf", "usd"]]),
  ];
  document.getElementById("lookup").addEventListener("submit", lookup);
  try { (await json("/api/history")).forEach(push); } catch (e) { /* the first tick will say so */ }
  await tick();
  setInterval(tick, 1000);
}

start();
