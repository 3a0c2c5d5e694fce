"use strict";
// Shared helpers. Every string from the data block is untrusted (corpus text, LLM
// output): it only ever reaches the page through text nodes (el(), textContent),
// never through innerHTML, and links are built only from validated head names.
const DATA = JSON.parse(document.getElementById("data").textContent);

const SAFE_HREF = /^(\.\.\/)?(heads\/)?(L\d+H\d+|index)\.html$/;

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "style") Object.assign(e.style, v);
    else if (k === "href") { if (SAFE_HREF.test(v)) e.setAttribute("href", v); }
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k.startsWith("data-") || k === "title" || k === "type" || k === "value" ||
             k === "placeholder" || k === "step" || k === "id") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function fmt(x, d = 3) {
  return (x === null || x === undefined || Number.isNaN(x)) ? "n/a" : Number(x).toFixed(d);
}

function signed(x, d = 3) {
  return (x === null || x === undefined) ? "n/a" : (x > 0 ? "+" : "") + Number(x).toFixed(d);
}

// Token text with its whitespace made visible (one token may be a newline or a tab).
function showTok(t) {
  return t.replace(/\r\n|\r|\n/g, "↵").replace(/\t/g, "⇥") || "∅";
}

const CLASS_COLORS = {
  previous_token: "#4e79a7", induction: "#e15759", duplicate_token: "#f28e2b",
  self: "#76b7b2", bos_sink: "#e2d3b3", fixed_offset: "#59a14f", content: "#d6cce3",
};
const CAT = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1",
             "#ff9da7", "#9c755f", "#bab0ac"];
const CLASS_LABEL = {
  previous_token: "previous token", induction: "induction", duplicate_token: "duplicate token",
  self: "self (current token)", bos_sink: "BOS sink", fixed_offset: "fixed offset",
  content: "content",
};

function classColor(c) { return CLASS_COLORS[c] || "#9aa4ae"; }
function classLabel(c) { return CLASS_LABEL[c] || String(c); }
function clusterColor(id) { return id < 0 ? "#d0d4d9" : CAT[id % CAT.length]; }

// Diverging blue-white-red on [lo, hi] with 0 white (matplotlib's coolwarm ends).
function diverging(v, lo, hi) {
  const t = Math.max(-1, Math.min(1, v >= 0 ? v / hi : -v / lo));
  const w = [247, 247, 247], pos = [180, 4, 38], neg = [59, 76, 192];
  const end = t >= 0 ? pos : neg, a = Math.abs(t);
  const c = w.map((x, i) => Math.round(x + (end[i] - x) * a));
  return `rgb(${c[0]},${c[1]},${c[2]})`;
}

// Activation heat (0..1) as a warm background; the text stays dark and readable.
function heat(t) {
  if (t === null || t === undefined || Number.isNaN(t)) return "transparent";
  const a = Math.max(0, Math.min(1, t));
  return `rgba(255, 122, 26, ${(0.85 * Math.pow(a, 0.8)).toFixed(3)})`;
}

// One floating tooltip for the page; content is a list of [className, text] lines.
const TIP = el("div", { id: "tip", role: "tooltip" });
document.body.append(TIP);
function showTip(ev, lines) {
  TIP.replaceChildren(...lines.map(([cls, text]) => el("div", { class: cls }, text)));
  TIP.style.display = "block";
  moveTip(ev);
}
function moveTip(ev) {
  const pad = 14, w = TIP.offsetWidth, h = TIP.offsetHeight;
  let x = ev.clientX + pad, y = ev.clientY + pad;
  if (x + w > window.innerWidth - 4) x = ev.clientX - w - pad;
  if (y + h > window.innerHeight - 4) y = ev.clientY - h - pad;
  TIP.style.left = Math.max(4, x) + "px";
  TIP.style.top = Math.max(4, y) + "px";
}
function hideTip() { TIP.style.display = "none"; }
function tipOn(node, linesFn) {
  node.addEventListener("mouseenter", (ev) => showTip(ev, linesFn()));
  node.addEventListener("mousemove", moveTip);
  node.addEventListener("mouseleave", hideTip);
  return node;
}

function kvTable(rows) {
  return el("table", { class: "kv" }, rows.map(([k, v]) => el("tr", {}, el("td", {}, k),
    el("td", { class: typeof v === "number" ? "num" : "" }, typeof v === "number" ? fmt(v) : v))));
}

function colorBar(lo, hi, title) {
  const stops = [];
  for (let i = 0; i <= 10; i++) stops.push(diverging(lo + (hi - lo) * i / 10, lo, hi));
  return el("div", { class: "legend" }, el("div", { class: "muted small" }, title),
    el("div", { class: "bar", style: { background: `linear-gradient(90deg, ${stops.join(",")})` } }),
    el("div", { class: "ticks" }, el("span", {}, String(lo)), el("span", {}, "0"),
      el("span", {}, (hi > 0 ? "+" : "") + hi)));
}
