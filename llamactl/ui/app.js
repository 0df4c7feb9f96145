// The llamactl dashboard: plain JavaScript, no dependencies, nothing loaded from elsewhere.
// The API key (if the daemon needs one) lives in sessionStorage and goes in the Authorization header only;
// streams are read with fetch() (EventSource cannot send headers). Text from the daemon is always set with
// textContent, never parsed as HTML.
"use strict";

const KEY_NAME = "llamactl-api-key";
const MAX_ROWS = 100;
const MAX_LOG_LINES = 1000;
const SERIES = 60;

let key = sessionStorage.getItem(KEY_NAME) || "";
let status = null;
const requests = [];                // newest first
const classSeries = new Map();      // "lane/class" -> {tok_s: [], drafted, accepted, samples: []}
const queueSeries = new Map();      // lane -> [depth]
let logLines = [];
let logAbort = null;
let eventsAbort = null;

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "width%") node.style.width = v;  // CSSOM, which the page's CSP allows (style attributes it does not)
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function headers(json) {
  const h = {};
  if (key) h["Authorization"] = "Bearer " + key;
  if (json) h["Content-Type"] = "application/json";
  return h;
}

async function api(path, options = {}) {
  const json = options.body !== undefined;
  const response = await fetch(path, {method: options.method || "GET", headers: headers(json),
    body: json ? JSON.stringify(options.body) : undefined, signal: options.signal});
  if (response.status === 401) { showLogin("The key was refused."); throw new Error("unauthorized"); }
  return response;
}

// ------------------------------------------------------------------ login

function showLogin(message) {
  if (eventsAbort) eventsAbort.abort();
  if (logAbort) logAbort.abort();
  $("app").hidden = true;
  $("app").replaceChildren();  // nothing stays on the page without a key
  $("login").hidden = false;
  $("logout").hidden = true;
  $("login-error").textContent = key ? (message || "") : "";
  $("conn").textContent = "";
}

async function start() {
  let response;
  try {
    response = await fetch("/llamactl/status", {headers: headers(false)});
  } catch (e) {
    $("conn").textContent = "cannot reach llamactl: " + e;
    return;
  }
  if (response.status === 401) { showLogin("The key was refused."); return; }
  status = await response.json();
  $("login").hidden = true;
  $("app").hidden = false;
  $("logout").hidden = !key;
  renderStatus();
  fillProfiles();
  refreshDevices();
  followEvents();
  setInterval(pollStatus, 2000);
}

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  key = $("key").value.trim();
  $("key").value = "";
  sessionStorage.setItem(KEY_NAME, key);
  location.reload();
});
$("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY_NAME); key = ""; location.reload(); });

// ------------------------------------------------------------------ streams

async function readSSE(path, signal, onEvent) {
  const response = await api(path, {signal});
  if (!response.ok || !response.body) throw new Error(path + ": HTTP " + response.status);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) { try { onEvent(JSON.parse(data)); } catch (e) { console.warn("bad event", e); } }
    }
  }
}

async function followEvents() {
  eventsAbort = new AbortController();
  for (;;) {
    try {
      $("conn").textContent = "live";
      await readSSE("/llamactl/events", eventsAbort.signal, onEvent);
    } catch (e) {
      if (eventsAbort.signal.aborted || e.message === "unauthorized") return;
    }
    $("conn").textContent = "reconnecting…";
    await new Promise((r) => setTimeout(r, 2000));
  }
}

let statusTimer = null;
function onEvent(event) {
  switch (event.type) {
    case "request": addRequest(event); break;
    case "memory": renderDevices(event); break;
    case "lane": case "engine": case "alert":
      if (!statusTimer) statusTimer = setTimeout(() => { statusTimer = null; pollStatus(); }, 100);
      if (event.type === "engine" && event.state === "starting" && event.progress) loadProgress[event.profile] = event;
      break;
  }
}

async function pollStatus() {
  try {
    status = await (await api("/llamactl/status")).json();
    renderStatus();
  } catch (e) { /* shown by the stream's state */ }
}

// ------------------------------------------------------------------ devices

async function refreshDevices() {
  try {
    const response = await api("/llamactl/devices");
    if (response.ok) renderDevices(await response.json());
    else $("devices").textContent = "device memory is sampled by `llamactl serve` only";
  } catch (e) { /* not fatal */ }
}

function gib(mib) { return (mib / 1024).toFixed(1); }

function renderDevices(sample) {
  const rows = (sample.devices || []).map((d) => {
    const pct = (v) => (100 * v / Math.max(1, d.total_mib)).toFixed(2) + "%";
    return el("div", {class: "device", "data-device": d.name},
      el("span", {}, d.name),
      el("div", {class: "bar", title: `ours ${d.ours_mib} MiB, others ${d.others_mib} MiB, free ${d.free_mib} MiB`},
        el("div", {class: "ours", "width%": pct(d.ours_mib)}),
        el("div", {class: "others", "width%": pct(d.others_mib)})),
      el("span", {class: "muted"}, `ours ${gib(d.ours_mib)} · others ${gib(d.others_mib)} · free ${gib(d.free_mib)} of ${gib(d.total_mib)} GiB`));
  });
  if (sample.error) rows.push(el("div", {class: "muted"}, sample.error));
  $("devices").replaceChildren(...rows);
}

function renderLedger(box) {
  const owned = (m) => Object.entries(m).map(([p, v]) => `${p} ${v}`).join(", ") || "none";
  const rows = box.devices.map((d) => el("div", {class: "ledger-device", "data-device": d.device},
    `${d.device}: ours ${owned(d.ours_mib)} MiB · loading ${owned(d.loading_mib)} · reserve ${d.reserve_mib} · ` +
    (d.others_mib === null ? "" : `others ${d.others_mib} · `) + `free ${d.free_mib} MiB`));
  for (const [profile, w] of Object.entries(box.waiting || {}))
    rows.push(el("div", {class: "error", "data-waiting": profile}, `${profile} waits for memory: ${w.why}`));
  for (const e of (box.evictions || []).slice(-5))
    rows.push(el("div", {}, `${new Date(e.at_unix * 1000).toLocaleTimeString()} stopped idle ${e.lane} for ${e.for}: ${e.why}`));
  $("ledger").replaceChildren(...rows);
}

function renderPromptCache(cache) {
  const mib = (b) => (b / 1048576).toFixed(1);
  const rows = [el("div", {}, `${mib(cache.bytes)} MiB of ${mib(cache.budget_bytes)} MiB on disk`)];
  for (const [profile, r] of Object.entries(cache.profiles)) {
    const p = r.persist;
    let text = `${profile}: ` + (p ? `${p.on ? "on" : "off"} (${p.reason}) · ` : "") + `${r.files} slot file(s), ${mib(r.bytes)} MiB`;
    if (r.restores) text += ` · ${r.restores} restore(s), ${r.restored_tokens} tokens in ${r.restore_s.toFixed(2)} s, ` +
      `${r.reused_tokens} reused (about ${r.prefill_saved_s.toFixed(1)} s of prefill saved)`;
    if (r.not_taken || r.failed) text += ` · ${r.not_taken + r.failed} dropped`;
    rows.push(el("div", {"data-prompt-cache": profile}, text));
  }
  $("prompt-cache").replaceChildren(...rows);
}

// ------------------------------------------------------------------ lanes

const loadProgress = {};

async function act(button, path, body) {
  button.disabled = true;
  try {
    const response = await api(path, {method: "POST", body: body || {}});
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      alert((err.error && err.error.message) || ("HTTP " + response.status));
    }
  } finally { button.disabled = false; pollStatus(); }
}

function renderStatus() {
  if (!status) return;
  const alerts = (status.alerts || []).map((a) => el("div", {class: "alert"},
    `acceptance alert: ${a.lane} / ${a["class"]}: ${(a.acceptance * 100).toFixed(0)}% accepted over ${a.drafted} drafted tokens (threshold ${(a.threshold * 100).toFixed(0)}%)`));
  $("alerts").replaceChildren(...alerts);
  $("lanes").replaceChildren(...status.lanes.map(renderLane));
  if (status.box) renderLedger(status.box);
  if (status.prompt_cache) renderPromptCache(status.prompt_cache);
  for (const lane of status.lanes) {
    const s = queueSeries.get(lane.lane) || [];
    s.push(lane.queue_depth); if (s.length > SERIES) s.shift();
    queueSeries.set(lane.lane, s);
  }
  renderClasses();
}

function renderLane(lane) {
  const members = Object.entries(lane.members).map(([name, role]) => {
    const loaded = lane.loaded.includes(name), loading = lane.loading.includes(name);
    const progress = loading && loadProgress[name] ? loadProgress[name].progress : null;
    return el("div", {class: "member" + (name === lane.active ? " active" : ""), "data-member": name},
      el("span", {class: "name"}, name + (role === "spec" ? " (speculative)" : "")),
      el("span", {class: "muted"}, loaded ? "loaded" : loading ? "loading" : "unloaded"),
      lane.group ? el("button", {onclick: (e) => act(e.target, "/llamactl/switch", {group: lane.lane, member: name}),
        "data-action": "force"}, "force") : null,
      el("button", {onclick: (e) => act(e.target, `/llamactl/profiles/${encodeURIComponent(name)}/load`), "data-action": "load"}, "load"),
      el("button", {onclick: (e) => act(e.target, `/llamactl/profiles/${encodeURIComponent(name)}/unload`), "data-action": "unload"}, "unload"),
      el("button", {onclick: (e) => act(e.target, `/llamactl/profiles/${encodeURIComponent(name)}/restart`), "data-action": "restart"}, "restart"),
      progress ? el("span", {class: "muted progress"}, progress) : null);
  });
  const d = lane.last_decision;
  const switches = (lane.recent_switches || []).slice(-8).map((s) =>
    el("div", {}, `${new Date(s.at_unix * 1000).toLocaleTimeString()} ${s.from} → ${s.to} (${s.trigger}, ${s.seconds}s): ${s.reason}`));
  return el("div", {class: "card lane", "data-lane": lane.lane},
    el("h3", {}, lane.lane, " ", el("span", {class: "state " + lane.state}, lane.state), " ",
      el("span", {class: "muted"}, "active: "), el("span", {class: "active-member"}, lane.active),
      lane.forced ? el("span", {class: "muted"}, " (forced)") : null),
    lane.group ? el("div", {class: "muted"}, (lane.keep_both_warm ? "warm switching: " : "hard switching: ") + lane.warm_reason) : null,
    lane.group ? el("div", {},
      el("button", {onclick: (e) => act(e.target, "/llamactl/switch", {group: lane.lane, member: "auto"}), "data-action": "auto"},
        "auto" + (lane.forced ? "" : " ✓"))) : null,
    ...members,
    d ? el("div", {class: "muted"}, `last decision: ${d.target} — ${d.reason}`) : null,
    ...Object.entries(lane.passed_over || {}).map(([m, p]) =>
      el("div", {class: "error"}, `${m} passed over for ${Math.round(p.for_s)}s more: it failed to start: ${p.reason}`)),
    Object.keys(lane.per_request || {}).length ? el("div", {class: "per-request"}, "served per request, one engine: " +
      Object.entries(lane.per_request).map(([m, h]) => `${m} by ${h}'s (drafting off)`).join(", ")) : null,
    ...Object.entries(lane.depths || {}).map(([m, ds]) =>
      el("div", {class: "per-request depths"}, `${m}: draft depth chosen per request among ${ds.join(", ")}`)),
    ...Object.entries(lane.depths_refused || {}).map(([m, why]) =>
      el("div", {class: "muted"}, `${m}: depths not chosen per request: ${why}`)),
    lane.last_error ? el("div", {class: "error"}, lane.last_error) : null,
    switches.length ? el("div", {class: "timeline"}, el("div", {}, "switches:"), ...switches) : null);
}

// ------------------------------------------------------------------ activity

// What the request was given: drafting on (at which depth) or off, on which member's engine, and why.
function choiceText(r) {
  if (r.drafting === null || r.drafting === undefined) return "";
  const what = r.drafting ? "on" + (r.depth ? ` (depth ${r.depth})` : "") : "off";
  const where = r.process && r.process !== r.member ? ` in ${r.process}'s engine` : "";
  return `${what}${where}, ${r.why}`;
}

function addRequest(r) {
  requests.unshift(r);
  if (requests.length > MAX_ROWS) requests.pop();
  const id = r.lane + "/" + r["class"];
  const c = classSeries.get(id) || {tok_s: [], samples: []};
  if (r.tok_s) { c.tok_s.push(r.tok_s); if (c.tok_s.length > SERIES) c.tok_s.shift(); }
  if (r.drafted) { c.samples.push([r.drafted, r.accepted || 0]); if (c.samples.length > 50) c.samples.shift(); }
  classSeries.set(id, c);
  const ms = (s) => (s === null || s === undefined ? "" : (s * 1000).toFixed(0));
  const row = el("tr", {},
    el("td", {}, new Date(r.at * 1000).toLocaleTimeString()), el("td", {}, r.lane), el("td", {}, r.member),
    el("td", {}, r["class"]), el("td", {}, r.status), el("td", {}, ms(r.queue_wait_s)), el("td", {}, ms(r.ttft_s)),
    el("td", {class: "tok-s"}, r.tok_s ? r.tok_s.toFixed(1) : ""), el("td", {}, r.prompt_tokens ?? ""),
    el("td", {}, r.completion_tokens ?? ""),
    el("td", {}, r.drafted ? `${r.accepted}/${r.drafted} (${(100 * r.accepted / r.drafted).toFixed(0)}%)` : ""),
    el("td", {class: "choice"}, choiceText(r)));
  const body = $("activity").tBodies[0];
  body.prepend(row);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  renderClasses();
}

function sparkline(values, label) {
  const canvas = el("canvas", {width: 220, height: 36, title: label});
  const ctx = canvas.getContext("2d");
  ctx.strokeStyle = "#4c9be8";
  ctx.beginPath();
  const max = Math.max(1, ...values);
  values.forEach((v, i) => {
    const x = values.length > 1 ? i * 219 / (values.length - 1) : 0, y = 34 - 32 * v / max;
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  });
  ctx.stroke();
  return canvas;
}

function renderClasses() {
  const summary = new Map(((status && status.classes) || []).map((c) => [c.lane + "/" + c["class"], c]));
  const ids = new Set([...summary.keys(), ...classSeries.keys()]);
  const cards = [...ids].sort().map((id) => {
    const s = summary.get(id) || {}, c = classSeries.get(id) || {tok_s: [], samples: []};
    const drafted = c.samples.reduce((a, x) => a + x[0], 0), accepted = c.samples.reduce((a, x) => a + x[1], 0);
    const lane = id.split("/")[0];
    const meanLen = Object.values(s.mean_accepted_length || {})[0];
    return el("div", {class: "cls", "data-class": id},
      el("strong", {}, id),
      el("div", {}, "acceptance: " + (drafted ? (100 * accepted / drafted).toFixed(0) + "%" : "–"),
        " · mean accepted length: " + (meanLen ? meanLen.toFixed(2) : "–"),
        " · speedup: " + (s.speedup ? s.speedup.toFixed(2) + "×" : "–")),
      el("div", {class: "muted"}, "tok/s"), sparkline(c.tok_s, "tok/s"),
      el("div", {class: "muted"}, "queue depth of " + lane), sparkline(queueSeries.get(lane) || [], "queue depth"));
  });
  $("classes").replaceChildren(el("div", {class: "classes"}, ...cards));
}

// ------------------------------------------------------------------ logs and plan

function fillProfiles() {
  const names = [...new Set(status.lanes.flatMap((l) => Object.keys(l.members)))].sort();
  for (const id of ["log-profile", "plan-profile"]) {
    $(id).replaceChildren(...names.map((n) => el("option", {value: n}, n)));
  }
  $("log-profile").addEventListener("change", followLog);
  $("log-filter").addEventListener("input", renderLog);
  $("plan-run").addEventListener("click", runPlan);
  if (names.length) followLog();
}

async function followLog() {
  if (logAbort) logAbort.abort();
  logAbort = new AbortController();
  logLines = [];
  renderLog();
  const profile = $("log-profile").value;
  try {
    await readSSE(`/llamactl/logs/${encodeURIComponent(profile)}?follow=1&lines=200`, logAbort.signal, (e) => {
      logLines.push(e.line);
      if (logLines.length > MAX_LOG_LINES) logLines.shift();
      renderLog();
    });
  } catch (e) { /* aborted or gone */ }
}

function renderLog() {
  const filter = $("log-filter").value.toLowerCase();
  const shown = filter ? logLines.filter((l) => l.toLowerCase().includes(filter)) : logLines;
  const pre = $("log");
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 5;
  pre.textContent = shown.join("\n");
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

async function runPlan() {
  const profile = $("plan-profile").value;
  $("plan").textContent = "planning " + profile + "…";
  const response = await api(`/llamactl/plan/${encodeURIComponent(profile)}`);
  const body = await response.json();
  const error = typeof body.error === "string" ? body.error + (body.hint ? "\nhint: " + body.hint : "")
    : body.error && body.error.message;
  $("plan").textContent = body.text || error || JSON.stringify(body);
}

start();
