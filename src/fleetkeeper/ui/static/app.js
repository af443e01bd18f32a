// The fleet map page: Preact (+ htm templates, no build step) for the controls
// and the panels; the map itself is one canvas (map.js). One EventSource
// carries the snapshot and every change; nothing here polls the server.
import { h, render } from "preact";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import htm from "htm";
import { FleetCanvas, teamColour, NAME, ZONE, RACK, STATE, TEAM, USED, GPUS, GANGS } from "./map.js";

const html = htm.bind(h);

// --- the live store: the canvas holds the cells; the rest of the page re-renders on "tick"
const store = {
  hello: null, timeline: [], panels: null, connected: false, listeners: new Set(), ts: 0,
  emit() { for (const f of this.listeners) f(); },
};
let fleet = null;

function connect() {
  const es = new EventSource("/api/stream");
  es.onopen = () => { store.connected = true; store.emit(); };
  es.onerror = () => { store.connected = false; store.emit(); };
  es.onmessage = ev => {
    const m = JSON.parse(ev.data);
    switch (m.t) {
      case "hello":
        store.hello = m; fleet.states = m.states; break;
      case "snapshot":
        fleet.pendingTs = m.ts; fleet.reset(m.cells); break;
      case "cells":
        fleet.apply(m.cells, m.gone, m.ts); break;
      case "events": {
        const seen = m.reset ? new Map() : new Map(store.timeline.map(i => [i.id, i]));
        for (const i of m.items) seen.set(i.id, i);
        store.timeline = [...seen.values()].sort((a, b) => a.t - b.t).slice(-1000);
        break;
      }
      case "panels":
        store.panels = m; break;
    }
    store.emit();
  };
}

function useTick(ms = 250) {  // re-render on store changes: at once, then at most every `ms`
  const [, set] = useState(0);
  useEffect(() => {
    let timer = null, last = 0;
    const fire = () => { timer = null; last = performance.now(); set(x => x + 1); };
    const f = () => {
      if (timer) return;
      const wait = last + ms - performance.now();
      if (wait <= 0) fire(); else timer = setTimeout(fire, wait);
    };
    store.listeners.add(f);
    return () => { store.listeners.delete(f); clearTimeout(timer); };
  }, []);
}

function fmtTime(t) { return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z"; }

// --- components -----------------------------------------------------------------------------
function Header({ overlay, setOverlay, gang, setGang, onPick }) {
  useTick(1000);
  const caps = store.hello ? store.hello.caps : [];
  const gangs = useMemo(() => {
    const s = new Set();
    for (const c of fleet.cells.values()) for (const g of c[GANGS] || []) s.add(g);
    return [...s].sort();
  }, [fleet.cells.size, store.ts]);
  const counts = {};
  for (const c of fleet.cells.values()) counts[c[STATE]] = (counts[c[STATE]] || 0) + 1;
  return html`<header>
    <h1>fleetkeeper · fleet map</h1>
    <label>overlay <select id="overlay" value=${overlay} onChange=${e => setOverlay(e.target.value)}>
      <option value="state">lifecycle state</option>
      <option value="team">team</option>
      ${caps.includes("pods") && html`<option value="gpu">GPU use</option>`}
    </select></label>
    ${caps.includes("pods") && html`<label>gang <select id="gang" value=${gang} onChange=${e => setGang(e.target.value)}>
      <option value="">(none)</option>${gangs.map(g => html`<option value=${g}>${g}</option>`)}
    </select></label>`}
    ${caps.includes("pods") && html`<${PodSearch} onPick=${onPick} />`}
    <span class=${"status " + (store.connected ? "live" : "down")} id="status">
      ${fleet.cells.size} nodes · ${Object.entries(counts).sort().map(([k, v]) => `${v} ${k}`).join(", ")}
    </span>
  </header>`;
}

function PodSearch({ onPick }) {
  const [q, setQ] = useState(""), [hits, setHits] = useState([]);
  useEffect(() => {
    if (q.length < 2) { setHits([]); return; }
    const t = setTimeout(async () => {
      const r = await fetch("/api/pods?q=" + encodeURIComponent(q));
      if (r.ok) setHits((await r.json()).pods);
    }, 200);
    return () => clearTimeout(t);
  }, [q]);
  return html`<span style="position:relative">
    <input id="podsearch" placeholder="search a pod (namespace/name)" value=${q} onInput=${e => setQ(e.target.value)} size="28" />
    ${hits.length > 0 && html`<div class="hits tip" style="pointer-events:auto; position:absolute; top:26px; left:0">
      ${hits.map(p => html`<div class="hit" onClick=${() => { setHits([]); onPick({ pod: p.pod, node: p.node }); }}>
        ${p.pod} <span class="muted">${p.phase} ${p.node ? "on " + p.node : ""}</span></div>`)}
    </div>`}
  </span>`;
}

function Legend({ overlay }) {
  useTick(1000);
  if (!store.hello) return null;
  if (overlay === "team") {
    const teams = new Map();
    for (const c of fleet.cells.values()) teams.set(c[TEAM], (teams.get(c[TEAM]) || 0) + 1);
    return html`<div class="legend">${[...teams].sort().map(([t, n]) =>
      html`<span data-team=${t}><i style=${"background:" + teamColour(t)}></i>${t || "no team"} (${n})</span>`)}</div>`;
  }
  if (overlay === "gpu") return html`<div class="legend"><span>darker: idle GPUs · brighter: GPUs requested by pods / capacity</span></div>`;
  return html`<div class="legend">${Object.entries(store.hello.states).map(([s, col]) =>
    html`<span><i style=${"background:" + col}></i>${store.hello.labels[s]}</span>`)}</div>`;
}

function Explain({ target }) {
  const [res, setRes] = useState(null);
  useEffect(() => {
    if (!target) return;
    setRes({ loading: true });
    const q = target.pod ? "pod=" + encodeURIComponent(target.pod) : "node=" + encodeURIComponent(target.node);
    fetch("/api/explain?" + q).then(r => r.json()).then(setRes, e => setRes({ error: String(e) }));
  }, [target && (target.pod || target.node), target && target.n]);
  if (!target) return html`<p class="muted">Click a node, or search a pod, for the same answer as <code>fleetkeeper explain</code>.</p>`;
  const c = target.node && fleet.cells.get(target.node);
  return html`<div class="explain" id="explain">
    <div><b>${target.pod ? "pod " + target.pod : "node " + target.node}</b>
      ${c && html` <span class="muted">${c[ZONE]} / ${c[RACK]} · ${store.hello.labels[c[STATE]]}${c[TEAM] ? " · team " + c[TEAM] : ""}${c[USED] != null ? ` · GPUs ${c[USED]}/${c[GPUS]}` : ""}</span>`}</div>
    ${res && res.loading && html`<p class="muted">…</p>`}
    ${res && res.error && html`<pre>${res.error}</pre>`}
    ${res && res.sections && res.sections.map(([title, lines]) => html`<h3>${title}</h3><pre>${lines.join("\n")}</pre>`)}
  </div>`;
}

function Budget() {
  useTick(1000);
  const b = store.panels && store.panels.budget;
  if (!store.hello || !store.hello.caps.includes("config")) return null;
  const title = html`<h2>Disruption budget in use</h2>`;
  if (!b) return html`<section>${title}<p class="muted">…</p></section>`;
  if (b.error) return html`<section>${title}<p class="muted">${b.error}</p></section>`;
  const cap = b.max_new_per_window;
  // the cluster and the zones always; other scopes (racks, labels) only when full
  const rows = Object.entries(b.scopes);
  const full = r => r.limit != null && r.used >= r.limit;
  const shown = rows.filter(([s, r]) => s === "cluster" || s.startsWith("zone:") || full(r));
  return html`<section id="budget">${title}
    <table><tr><th>scope</th><th>out of service</th><th>limit</th><th>nodes</th></tr>
    ${shown.map(([s, r]) => html`<tr><td>${s}</td>
      <td class=${r.limit != null && r.used >= r.limit ? "bad" : ""}>${r.used}</td>
      <td>${r.limit == null ? "none" : r.limit}</td><td>${r.total}</td></tr>`)}</table>
    <div class="muted">new disruptions in the last ${Math.round(b.window_s)} s: ${b.new_in_window} / ${cap == null ? "no cap" : cap}${" · "}${rows.length - shown.length} more scope(s) with nodes out of service, none full · from ${b.source}</div></section>`;
}

function Teams() {
  useTick(1000);
  const t = store.panels && store.panels.teams;
  if (!store.hello || !store.hello.caps.includes("config")) return null;
  if (!t) return null;
  return html`<section id="teams"><h2>Teams</h2>
    ${t.error && html`<p class="muted">${t.error}</p>`}
    ${t.rows.length > 0 && html`<table><tr><th>team</th><th>desired</th><th>assigned</th><th>eligible</th><th>shortfall</th></tr>
      ${t.rows.map(r => html`<tr><td><i style=${"display:inline-block;width:9px;height:9px;margin-right:4px;background:" + teamColour(r.team)}></i>${r.team}</td>
        <td>${r.desired}</td><td>${r.assigned}</td><td>${r.eligible}</td><td class=${r.shortfall ? "bad" : ""}>${r.shortfall}</td></tr>`)}</table>`}
  </section>`;
}

function Timeline({ onPick }) {
  useTick(500);
  const [f, setF] = useState({ node: "", rack: "", team: "", action: "" });
  if (!store.hello || !store.hello.caps.includes("events")) return null;
  const racks = new Set(), teams = new Set(), actions = new Set();
  for (const c of fleet.cells.values()) { racks.add(c[RACK]); if (c[TEAM]) teams.add(c[TEAM]); }
  for (const i of store.timeline) actions.add(i.action || i.reason);
  const items = store.timeline.filter(i => {
    const c = i.kind === "Node" ? fleet.cells.get(i.name) : null;
    if (f.node && !(i.kind === "Node" && i.name.includes(f.node))) return false;
    if (f.rack && !(c && c[RACK] === f.rack)) return false;
    if (f.team && !(c && c[TEAM] === f.team)) return false;
    if (f.action && (i.action || i.reason) !== f.action) return false;
    return true;
  }).slice(-300).reverse();
  const sel = (key, values, label) => html`<select id=${"tl-" + key} value=${f[key]} onChange=${e => setF({ ...f, [key]: e.target.value })}>
    <option value="">any ${label}</option>${[...values].sort().map(v => html`<option value=${v}>${v}</option>`)}</select>`;
  return html`<section class="timeline" id="timeline"><h2>What fleetkeeper did</h2>
    <div class="filters">
      <input id="tl-node" placeholder="node" value=${f.node} onInput=${e => setF({ ...f, node: e.target.value })} />
      ${sel("rack", racks, "rack")} ${sel("team", teams, "team")} ${sel("action", actions, "action")}
    </div>
    <ol>${items.map(i => html`<li class=${i.type}>
      <div class="meta">${fmtTime(i.t)} · ${i.controller} · ${i.action}${i.count > 1 ? " ×" + i.count : ""}</div>
      <div><span class="reason">${i.reason}</span> <a href="#" onClick=${e => { e.preventDefault(); if (i.kind === "Node") onPick({ node: i.name }); }}>${i.kind}/${i.ns ? i.ns + "/" : ""}${i.name}</a></div>
      <div class="muted">${i.note}</div></li>`)}</ol>
    ${items.length === 0 && html`<p class="muted">no matching events</p>`}
  </section>`;
}

function MapView({ onPick }) {
  const ref = useRef(null), [tip, setTip] = useState(null);
  useEffect(() => {
    fleet.canvas = ref.current;
    fleet.ctx = ref.current.getContext("2d", { alpha: false });
    fleet.relayout();
    const onResize = () => fleet.relayout();
    window.addEventListener("resize", onResize);
    return () => window.removeEventListener("resize", onResize);
  }, []);
  const point = e => { const r = ref.current.getBoundingClientRect(); return fleet.at(e.clientX - r.left, e.clientY - r.top); };
  const move = e => {
    const c = point(e);
    setTip(c ? { x: e.clientX + 12, y: e.clientY + 12, text: `${c[NAME]}\n${c[ZONE]} / ${c[RACK]}\n${store.hello.labels[c[STATE]]}` +
      `${c[TEAM] ? "\nteam " + c[TEAM] : ""}${c[USED] != null ? `\nGPUs ${c[USED]}/${c[GPUS]}` : ""}${(c[GANGS] || []).length ? "\ngangs " + c[GANGS].join(", ") : ""}` } : null);
  };
  return html`<div class="mapwrap">
    <canvas class="map" id="map" ref=${ref} onMouseMove=${move} onMouseLeave=${() => setTip(null)}
      onClick=${e => { const c = point(e); if (c) onPick({ node: c[NAME] }); }}></canvas>
    ${tip && html`<div class="tip" style=${`left:${tip.x}px;top:${tip.y}px`}>${tip.text}</div>`}
  </div>`;
}

function App() {
  const [overlay, setOverlayS] = useState("state"), [gang, setGangS] = useState(""), [target, setTarget] = useState(null);
  const setOverlay = o => { setOverlayS(o); fleet.setOverlay(o); };
  const setGang = g => { setGangS(g); fleet.setGang(g); };
  const pick = t => { setTarget({ ...t, n: Date.now() }); fleet.select(t.node || ""); };
  return html`
    <${Header} overlay=${overlay} setOverlay=${setOverlay} gang=${gang} setGang=${setGang} onPick=${pick} />
    <div class="layout">
      <${MapView} onPick=${pick} />
      <div class="side">
        <section><${Legend} overlay=${overlay} /></section>
        <section><h2>Explain</h2><${Explain} target=${target} /></section>
        <${Budget} /><${Teams} /><${Timeline} onPick=${pick} />
      </div>
    </div>`;
}

// --- start ------------------------------------------------------------------------------------
fleet = new FleetCanvas(document.createElement("canvas"));
fleet.onPaint = () => { store.ts++; };
// a small read-only handle for tests and the bench (what is on screen, where)
window.__fleet = {
  count: () => fleet.cells.size,
  names: () => [...fleet.cells.keys()],
  cell: n => fleet.cells.get(n) || null,
  pixel: n => fleet.pixel(n),
  centre: n => fleet.centre(n),
  stateColour: s => (store.hello ? store.hello.states[s] : null),
  teamColour: t => teamColour(t),
  paints: () => fleet.paints,
  firstPaint: () => fleet.firstPaint,
  connected: () => store.connected,
};
document.getElementById("app").textContent = "";
render(html`<${App} />`, document.getElementById("app"));
connect();
