// The fleet map on one <canvas>: every node one cell, grouped by zone (bands)
// and rack (small blocks), coloured by the chosen overlay. Drawing rectangles is
// what Canvas 2D does natively, so no drawing library: a full draw of 15,000
// cells is one pass of fillRect, and a delta repaints only the changed cells.

// cell fields: [name, zone, rack, state, team, gpusUsed, gpus, gangs]
export const NAME = 0, ZONE = 1, RACK = 2, STATE = 3, TEAM = 4, USED = 5, GPUS = 6, GANGS = 7;

const BG = "#15181d", RACK_BG = "#1d2128", TEXT = "#8a93a0", NO_TEAM = "#30353d", DIM_ALPHA = 0.22;
const ZONE_HEAD = 18, PAD = 8;

export function teamColour(team) {
  if (!team) return NO_TEAM;
  let h = 0;
  for (const ch of team) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  // a well-spread hue per team name (golden-angle steps), fixed saturation and lightness
  return hsl((h * 137.508) % 360, 62, 56);
}

function hsl(h, s, l) {  // as #rrggbb, so a pixel read back compares exactly
  s /= 100; l /= 100;
  const k = n => (n + h / 30) % 12, a = s * Math.min(l, 1 - l);
  const f = n => Math.round(255 * (l - a * Math.max(-1, Math.min(k(n) - 3, 9 - k(n), 1))));
  return "#" + [f(0), f(8), f(4)].map(v => v.toString(16).padStart(2, "0")).join("");
}

export function gpuColour(used, cap) {
  if (used == null) return NO_TEAM;
  if (!cap) return "#262a31";
  const r = Math.max(0, Math.min(1, used / cap));
  return hsl(200, 70, 18 + r * 50);
}

function byName(a, b) { return a < b ? -1 : a > b ? 1 : 0; }

// Positions of every cell for a width: zones are bands, racks flow left to right.
export function layout(cells, width, maxHeight) {
  const zones = new Map();
  let biggest = 1;
  for (const c of cells.values()) {
    const zone = c[ZONE] || "(no zone)", rack = c[RACK] || "(no rack)";
    if (!zones.has(zone)) zones.set(zone, new Map());
    const racks = zones.get(zone);
    if (!racks.has(rack)) racks.set(rack, []);
    racks.get(rack).push(c[NAME]);
    biggest = Math.max(biggest, racks.get(rack).length);
  }
  const cols = Math.max(2, Math.ceil(Math.sqrt(biggest)));
  const zoneNames = [...zones.keys()].sort(byName);
  // the largest cell size (3..14 px) at which the whole fleet fits the height, else 3 px and scroll
  let best = null;
  for (let size = 14; size >= 3; size--) {
    const l = place(zones, zoneNames, cols, size, width);
    best = l;
    if (l.height <= maxHeight) break;
  }
  return best;
}

function place(zones, zoneNames, cols, size, width) {
  const gap = Math.max(2, Math.round(size / 2)), rackGap = Math.max(3, size);
  const pos = new Map(), racks = [], bands = [];
  let y = PAD;
  for (const zone of zoneNames) {
    const rackMap = zones.get(zone);
    bands.push({ name: zone, y, count: [...rackMap.values()].reduce((a, r) => a + r.length, 0) });
    y += ZONE_HEAD;
    let x = PAD, rowH = 0;
    for (const rack of [...rackMap.keys()].sort(byName)) {
      const nodes = rackMap.get(rack).sort(byName);
      const rows = Math.ceil(nodes.length / cols);
      const w = cols * size + (cols - 1) * 1 + gap, h = rows * size + (rows - 1) * 1 + gap;
      if (x + w > width - PAD && x > PAD) { x = PAD; y += rowH + rackGap; rowH = 0; }
      racks.push({ name: rack, zone, x, y, w, h });
      nodes.forEach((n, i) => pos.set(n, [x + gap / 2 + (i % cols) * (size + 1), y + gap / 2 + Math.floor(i / cols) * (size + 1)]));
      x += w + rackGap;
      rowH = Math.max(rowH, h);
    }
    y += rowH + PAD * 2;
  }
  return { pos, racks, bands, size, height: y + PAD, width };
}

export class FleetCanvas {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", { alpha: false });
    this.cells = new Map();
    this.lay = null;
    this.overlay = "state";
    this.states = {};
    this.gang = "";
    this.selected = "";
    this.dirty = new Set();
    this.full = true;
    this.frame = 0;
    this.paints = [];       // [name, state, paintedAtMs, serverTs] for the bench and tests
    this.firstPaint = null; // ms from navigation start to the first full map
    this.onPaint = null;
  }

  colour(c) {
    switch (this.overlay) {
      case "team": return teamColour(c[TEAM]);
      case "gpu": return gpuColour(c[USED], c[GPUS]);
      default: return this.states[c[STATE]] || "#888888";
    }
  }

  reset(cells) { this.cells = new Map(cells.map(c => [c[NAME], c])); this.relayout(); }

  apply(changed, gone, ts) {
    let relayout = gone.length > 0;
    for (const c of changed) {
      const old = this.cells.get(c[NAME]);
      if (!old || old[ZONE] !== c[ZONE] || old[RACK] !== c[RACK]) relayout = true;
      this.cells.set(c[NAME], c);
      this.dirty.add(c[NAME]);
      this.pendingTs = ts;
    }
    for (const n of gone) this.cells.delete(n);
    if (relayout) this.relayout(); else this.schedule();
  }

  relayout() { this.lay = null; this.full = true; this.schedule(); }

  setOverlay(o) { this.overlay = o; this.full = true; this.schedule(); }
  setGang(g) { this.gang = g; this.full = true; this.schedule(); }
  select(name) { const prev = this.selected; this.selected = name; if (prev) this.dirty.add(prev); if (name) this.dirty.add(name); this.schedule(); }

  schedule() { if (!this.frame) this.frame = requestAnimationFrame(() => { this.frame = 0; this.draw(); }); }

  resize() {
    const parent = this.canvas.parentElement;
    const width = Math.max(320, parent.clientWidth - 2), avail = Math.max(200, parent.clientHeight - 4);
    this.lay = layout(this.cells, width, avail);
    const dpr = window.devicePixelRatio || 1;
    this.canvas.style.width = width + "px";
    this.canvas.style.height = this.lay.height + "px";
    this.canvas.width = Math.round(width * dpr);
    this.canvas.height = Math.round(this.lay.height * dpr);
    this.ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  }

  drawCell(c) {
    const p = this.lay.pos.get(c[NAME]);
    if (!p) return;
    const s = this.lay.size, ctx = this.ctx;
    const highlighted = this.gang && c[GANGS] && c[GANGS].includes(this.gang);
    ctx.fillStyle = RACK_BG;
    ctx.fillRect(p[0], p[1], s, s);
    ctx.globalAlpha = this.gang && !highlighted ? DIM_ALPHA : 1;
    ctx.fillStyle = highlighted ? "#ff4fd8" : this.colour(c);
    ctx.fillRect(p[0], p[1], s, s);
    ctx.globalAlpha = 1;
    if (c[NAME] === this.selected && s >= 4) {
      ctx.strokeStyle = "#ffffff";
      ctx.lineWidth = 1;
      ctx.strokeRect(p[0] + 0.5, p[1] + 0.5, s - 1, s - 1);
    }
  }

  draw() {
    if (!this.canvas.isConnected) return;  // not mounted yet: the mount relayouts
    const now = Date.now(), painted = [];
    if (this.full || !this.lay) {
      if (!this.lay) this.resize();
      const ctx = this.ctx, lay = this.lay;
      ctx.fillStyle = BG;
      ctx.fillRect(0, 0, lay.width, lay.height);
      ctx.font = "11px system-ui, sans-serif";
      ctx.fillStyle = TEXT;
      for (const b of lay.bands) ctx.fillText(`${b.name} · ${b.count} nodes`, PAD, b.y + 12);
      ctx.fillStyle = RACK_BG;
      for (const r of lay.racks) ctx.fillRect(r.x, r.y, r.w, r.h);
      for (const c of this.cells.values()) this.drawCell(c);
      for (const n of this.dirty) painted.push(n);
      this.full = false;
      if (this.firstPaint === null && this.cells.size) {
        this.firstPaint = performance.now();
      }
    } else {
      for (const n of this.dirty) {
        const c = this.cells.get(n);
        if (c) { this.drawCell(c); painted.push(n); }
      }
    }
    this.dirty.clear();
    for (const n of painted) {
      const c = this.cells.get(n);
      if (c) this.paints.push([n, c[STATE], now, this.pendingTs]);
    }
    if (this.paints.length > 20000) this.paints.splice(0, this.paints.length - 10000);
    if (this.onPaint) this.onPaint();
  }

  at(x, y) {  // the node under a point (css px, canvas coordinates)
    if (!this.lay) return null;
    const s = this.lay.size;
    for (const [n, p] of this.lay.pos) {
      if (x >= p[0] && x < p[0] + s && y >= p[1] && y < p[1] + s) return this.cells.get(n);
    }
    return null;
  }

  centre(name) {
    const p = this.lay && this.lay.pos.get(name);
    return p ? [p[0] + this.lay.size / 2, p[1] + this.lay.size / 2] : null;
  }

  pixel(name) {  // the colour actually on the canvas at the cell's centre, as #rrggbb
    const c = this.centre(name);
    if (!c) return null;
    const dpr = window.devicePixelRatio || 1;
    const d = this.ctx.getImageData(Math.floor(c[0] * dpr), Math.floor(c[1] * dpr), 1, 1).data;
    return "#" + [d[0], d[1], d[2]].map(v => v.toString(16).padStart(2, "0")).join("");
  }
}
