// crowdfl dashboard: plain JS, no build step, no external assets. Plots are drawn client-side
// (SVG) from the JSON endpoints listed in API below; the page polls them while a task runs.
"use strict";

const API = {
  tasks: () => "/api/v1/tasks",
  rounds: (t) => `/api/v1/tasks/${t}/rounds`,
  updates: (t, r) => `/api/v1/tasks/${t}/rounds/${r}/updates`,
  reputation: (t) => `/api/v1/tasks/${t}/reputation`,
  rewards: (t) => `/api/v1/tasks/${t}/rewards`,
  verify: (h) => `/api/v1/models/${h}/verify`,
  customer: (id) => `/api/v1/customers/${id}`,
  proof: (t, r, c) => `/api/v1/tasks/${t}/rounds/${r}/proofs/${c}`,
};

const POLL_MS = 2000;
const COLORS = ["#2f6fde", "#1f8a4c", "#c0392b", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#b7950b", "#2c3e50", "#e84393"];

async function getJSON(url, options) {
  const resp = await fetch(url, options);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.detail || body.error || `${resp.status} ${resp.statusText}`);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function short(h, n = 12) { return h ? `${h.slice(0, n)}…` : "—"; }
function fmt(x, d = 3) { return x === null || x === undefined || Number.isNaN(x) ? "—" : Number(x).toFixed(d); }

// ---- amounts: shown in ETH, the exact wei on hover ---------------------------------------------
// Exact with BigInt (wei exceed 2^53); cut, never rounded up, to `decimals` places, so the page
// never shows more than is owed. The API sends wei as integers or decimal strings.
function weiToEth(wei, decimals = 6) {
  let w;
  try { w = BigInt(typeof wei === "number" ? (Number.isSafeInteger(wei) ? wei : Math.trunc(wei).toLocaleString("fullwide", { useGrouping: false })) : String(wei ?? 0)); } catch { return "—"; }
  const neg = w < 0n; if (neg) w = -w;
  const unit = 10n ** 18n;
  const frac = (w % unit).toString().padStart(18, "0").slice(0, decimals).replace(/0+$/, "");
  const text = `${w / unit}${frac ? "." + frac : ""}`;
  return `${neg ? "-" : ""}${text === "0" && w > 0n ? "<0." + "0".repeat(decimals - 1) + "1" : text}`;
}
function ethAmount(wei, attrs = {}) {
  return el("span", { ...attrs, class: `eth ${attrs.class || ""}`.trim(), title: `${String(wei ?? 0)} wei` }, `${weiToEth(wei)} ETH`);
}

// ---- a small SVG line chart: one <circle class="point"> per data point -------------------------
function lineChart(svg, series, { yMin = 0, yMax = 1, xLabel = "round", yLabel = "" } = {}) {
  const NS = "http://www.w3.org/2000/svg";
  const W = svg.clientWidth || 600, H = svg.clientHeight || 220, L = 42, R = 12, T = 10, B = 30;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const xs = series.flatMap((s) => s.points.map((p) => p.x));
  const xMin = Math.min(1, ...xs), xMax = Math.max(2, ...xs);
  const sx = (x) => L + ((x - xMin) / (xMax - xMin)) * (W - L - R);
  const sy = (y) => H - B - ((y - yMin) / (yMax - yMin || 1)) * (H - T - B);
  const add = (name, attrs, text) => {
    const n = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  for (let i = 0; i <= 4; i++) {
    const y = yMin + ((yMax - yMin) * i) / 4;
    add("line", { class: "grid", x1: L, x2: W - R, y1: sy(y), y2: sy(y) });
    add("text", { x: 4, y: sy(y) + 4 }, fmt(y, 2));
  }
  for (let x = Math.ceil(xMin); x <= xMax; x++) add("text", { x: sx(x) - 3, y: H - 12 }, String(x));
  add("text", { x: W / 2 - 16, y: H - 1 }, xLabel);
  if (yLabel) add("text", { x: L + 4, y: T + 10 }, yLabel);
  add("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B });
  add("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B });
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const pts = s.points.filter((p) => p.y !== null && !Number.isNaN(p.y));
    if (pts.length > 1) add("polyline", { fill: "none", stroke: color, "stroke-width": 2, points: pts.map((p) => `${sx(p.x)},${sy(p.y)}`).join(" ") });
    for (const p of pts) {
      const c = add("circle", { class: "point", cx: sx(p.x), cy: sy(p.y), r: 4, fill: color, "data-x": p.x, "data-y": p.y, "data-series": s.name });
      c.append(Object.assign(document.createElementNS(NS, "title"), { textContent: `${s.name} round ${p.x}: ${fmt(p.y)}` }));
    }
  });
}

// ---- Merkle proof check in the browser (same scheme as crowdfl/merkle.py and the contract) -----
function hexToBytes(hex) { return new Uint8Array(hex.match(/../g).map((b) => parseInt(b, 16))); }
function bytesToHex(b) { return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join(""); }
async function sha256(...parts) {
  const len = parts.reduce((a, p) => a + p.length, 0), buf = new Uint8Array(len);
  let off = 0; for (const p of parts) { buf.set(p, off); off += p.length; }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
}
function lessThan(a, b) { for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] < b[i]; return false; }
async function verifyMerkleProof(leafHex, proofHex, rootHex) {
  let node = await sha256(new Uint8Array([0]), hexToBytes(leafHex));
  for (const s of proofHex) {
    const sib = hexToBytes(s);
    node = lessThan(node, sib) ? await sha256(new Uint8Array([1]), node, sib) : await sha256(new Uint8Array([1]), sib, node);
  }
  return bytesToHex(node) === rootHex;
}

if (typeof window !== "undefined") window.crowdfl = { API, getJSON, el, short, fmt, weiToEth, ethAmount, lineChart, verifyMerkleProof, sha256, hexToBytes, POLL_MS, COLORS };
if (typeof module !== "undefined") module.exports = { weiToEth };  // the unit test runs it under node
