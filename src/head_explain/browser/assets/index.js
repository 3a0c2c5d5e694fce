// index.html: the layer x head grid of every head, its filters, legend and head table.
(function () {
  const D = DATA, HEADS = D.heads;
  const clusterLabel = Object.fromEntries(D.clusters.map((c) => [c.id, c.label]));
  const state = {
    mode: D.has.types ? "class" : "score", classes: new Set(D.classes), cluster: "all",
    lo: "", hi: "", q: "", sel: null, sort: ["score", -1],
  };
  const score = (h) => h.scores ? h.scores.score : null;
  const lift = (h) => h.scores ? h.scores.lift_easy : null;
  const cls = (h) => h.type ? h.type.head_class : null;
  const MODES = [
    ["class", "class", D.has.types, "no head_types.parquet in this run"],
    ["score", "score", D.has.scores, "no scores.parquet in this run"],
    ["lift", "pair-AUC lift", D.has.lift, "no pair scores (lift_easy) in this run"],
    ["cluster", "cluster", D.has.clusters, "no clusters in this run"],
  ];

  function colorOf(h) {
    if (state.mode === "class") return cls(h) ? classColor(cls(h)) : null;
    if (state.mode === "score") return score(h) === null || score(h) === undefined ? null : diverging(score(h), -1, 1);
    if (state.mode === "lift") return lift(h) === null || lift(h) === undefined ? null : diverging(lift(h), -0.5, 0.5);
    return h.cluster === undefined ? null : clusterColor(h.cluster);
  }
  function cellText(h) {
    if (state.mode === "score" && score(h) != null) return fmt(score(h), 2);
    if (state.mode === "lift" && lift(h) != null) return signed(lift(h), 2);
    if (state.mode === "cluster" && h.cluster !== undefined) return h.cluster < 0 ? "·" : "c" + h.cluster;
    if (state.mode === "class" && h.type && h.type.class_score != null) return fmt(h.type.class_score, 2);
    return "";
  }
  function visible(h) {
    if (D.has.types && cls(h) && !state.classes.has(cls(h))) return false;
    if (state.cluster !== "all" && String(h.cluster) !== state.cluster) return false;
    const s = score(h);
    if (state.lo !== "" && !(s != null && s >= Number(state.lo))) return false;
    if (state.hi !== "" && !(s != null && s <= Number(state.hi))) return false;
    if (state.q) {
      const hay = (h.name + " " + (h.explanation || "") + " " + (cls(h) ? classLabel(cls(h)) : "")).toLowerCase();
      if (!hay.includes(state.q.toLowerCase())) return false;
    }
    return true;
  }
  function tipLines(h) {
    const L = [["t", h.name + (h.page ? "" : "  (classified only)")]];
    if (h.type) L.push(["m", "class: " + classLabel(h.type.head_class) + " (" + fmt(h.type.class_score, 2) + ")" +
      (h.type.second_class ? ", then " + classLabel(h.type.second_class) : "")]);
    if (h.scores) {
      L.push(["m", "simulation score " + fmt(h.scores.score) + " · shuffled baseline " + fmt(h.scores.baseline_score)]);
      if (h.scores.pair_auc_easy != null) L.push(["m", "pair AUC (easy) " + fmt(h.scores.pair_auc_easy) +
        " · template " + fmt(h.scores.template_auc_easy) + " · lift " + signed(h.scores.lift_easy)]);
    }
    if (h.cluster !== undefined) L.push(["m", h.cluster < 0 ? "cluster: none (noise)" :
      "cluster " + h.cluster + ": " + (clusterLabel[h.cluster] || "")]);
    if (h.stats && !h.type) L.push(["m", "prev-token " + fmt(h.stats.prev_token, 2) + " · BOS " + fmt(h.stats.bos_frac, 2)]);
    if (h.explanation) L.push(["", "“" + h.explanation + "”"]);
    if (h.explain_error) L.push(["m", "explain failed: " + h.explain_error]);
    if (h.page) L.push(["m", "click to open the head page"]);
    return L;
  }

  // ---- header and controls
  const nPages = HEADS.filter((h) => h.page).length;
  document.getElementById("top").append(
    el("h1", {}, "Attention heads" + (D.model ? " · " + D.model : "")),
    el("div", { class: "sub" }, `${D.n_layers} layers × ${D.n_heads} heads = ${HEADS.length} heads · ` +
      `${nPages} analysed (outlined, click to open) · ` +
      (D.has.types ? `${HEADS.filter((h) => h.type).length} classified` : "no head classes in this run")));
  const app = document.getElementById("app");
  const modeSeg = el("div", { class: "seg" }, MODES.map(([key, label, ok, why]) =>
    el("button", { "data-mode": key, disabled: !ok, title: ok ? "colour by " + label : why,
      onclick: () => { state.mode = key; render(); } }, label)));
  const classChips = el("span", { class: "chips" }, D.classes.map((c) =>
    el("span", { class: "chip", "data-class": c, onclick: (ev) => {
      state.classes.has(c) ? state.classes.delete(c) : state.classes.add(c);
      ev.currentTarget.classList.toggle("off", !state.classes.has(c)); render();
    } }, el("span", { class: "sw", style: { background: classColor(c) } }), classLabel(c))));
  const clusterSel = el("select", { onchange: (ev) => { state.cluster = ev.target.value; render(); } },
    el("option", { value: "all" }, "all clusters"),
    D.clusters.map((c) => el("option", { value: String(c.id) }, `c${c.id}: ${c.label} (${c.size})`)),
    D.has.clusters ? el("option", { value: "-1" }, "noise") : null);
  const lo = el("input", { type: "number", step: "0.1", placeholder: "min", oninput: (e) => { state.lo = e.target.value; render(); } });
  const hi = el("input", { type: "number", step: "0.1", placeholder: "max", oninput: (e) => { state.hi = e.target.value; render(); } });
  const search = el("input", { type: "search", id: "search", placeholder: "search explanations, heads, classes",
    oninput: (e) => { state.q = e.target.value.trim(); render(); } });
  app.append(el("div", { class: "controls" },
    el("span", {}, el("label", {}, "Colour by"), modeSeg),
    D.classes.length ? el("span", {}, el("label", {}, "Classes"), classChips) : null,
    D.has.clusters ? el("span", {}, el("label", {}, "Cluster"), clusterSel) : null,
    D.has.scores ? el("span", {}, el("label", {}, "Score"), lo, " – ", hi) : null,
    search, el("span", { class: "muted small", id: "count" })));

  // ---- grid
  const grid = el("div", { class: "grid", id: "grid",
    style: { gridTemplateColumns: `34px repeat(${D.n_heads}, 46px)` } });
  grid.append(el("div", {}));
  for (let h = 0; h < D.n_heads; h++) grid.append(el("div", { class: "lab clab" }, "H" + h));
  const cells = [];
  for (let l = 0; l < D.n_layers; l++) {
    grid.append(el("div", { class: "lab" }, "L" + l));
    for (let k = 0; k < D.n_heads; k++) {
      const h = HEADS[l * D.n_heads + k];
      const c = el("div", { class: "cell" + (h.page ? " page" : ""), "data-head": h.name,
        onclick: () => { if (h.page) window.location.href = h.page; else { state.sel = h; renderSide(); } } });
      tipOn(c, () => tipLines(h));
      cells.push([c, h]);
      grid.append(c);
    }
  }
  const side = el("div", { class: "side" });
  app.append(el("div", { class: "layout" }, el("div", {}, grid), side));
  const tableBox = el("div", {});
  app.append(tableBox);

  function legend() {
    if (state.mode === "score") return colorBar(-1, 1, "simulation score: Pearson r of simulated vs true activation");
    if (state.mode === "lift") return colorBar(-0.5, 0.5, "pair-AUC lift over the best template (easy negatives)");
    const rows = state.mode === "class"
      ? D.classes.map((c) => [classColor(c), classLabel(c), HEADS.filter((h) => cls(h) === c).length])
      : D.clusters.map((c) => [clusterColor(c.id), `c${c.id}: ${c.label}`, c.size])
          .concat([[clusterColor(-1), "noise (no cluster)", HEADS.filter((h) => h.cluster === -1).length]]);
    return el("div", { class: "legend" }, el("div", { class: "muted small" }, state.mode === "class"
      ? "head class (number in a cell: class score)" : "cluster of explanation embeddings"),
      rows.map(([col, label, n]) => el("div", { class: "row" }, el("span", { class: "sw", style: { background: col } }),
        label, el("span", { class: "muted small" }, "(" + n + ")"))));
  }
  // Means over the heads that have both numbers, so each pair compares like with like.
  function paired(a, b) {
    const hs = HEADS.filter((h) => h.scores && h.scores[a] != null && h.scores[b] != null);
    const mean = (k) => hs.reduce((t, h) => t + h.scores[k], 0) / hs.length;
    return hs.length ? [hs.length, mean(a), mean(b), hs.filter((h) => h.scores[a] > h.scores[b]).length] : null;
  }
  function summary() {
    const rows = [["simulation r vs shuffled explanation", "score", "baseline_score"],
      ["pair AUC (easy) vs best template", "pair_auc_easy", "template_auc_easy"],
      ["pair AUC (easy) vs shuffled explanation", "pair_auc_easy", "shuffled_auc_easy"],
      ["pair AUC (hard) vs best template", "pair_auc_hard", "template_auc_hard"]]
      .map(([label, a, b]) => [label, paired(a, b)]).filter(([, p]) => p);
    if (!rows.length) return null;
    return el("table", { class: "kv small" }, el("tr", {}, el("th", {}, "mean over heads with both"),
      el("th", { class: "num" }, "n"), el("th", { class: "num" }, "expl."), el("th", { class: "num" }, "base"), el("th", { class: "num" }, "expl. wins")),
      rows.map(([label, [n, a, b, wins]]) => el("tr", {}, el("td", {}, label), el("td", { class: "num" }, String(n)),
        el("td", { class: "num" }, fmt(a)), el("td", { class: "num" }, fmt(b)), el("td", { class: "num" }, `${wins}/${n}`))));
  }
  function renderSide() {
    const sum = summary();
    const parts = [el("h3", {}, "Legend"), legend(), el("div", { class: "note" },
      "Outlined cells have a head page; hatched cells have no value for this colouring."),
      sum ? [el("h3", {}, "Run summary"), sum] : null];
    const h = state.sel;
    if (h) {
      parts.push(el("h3", {}, h.name));
      const rows = [];
      if (h.type) for (const [k, v] of Object.entries(h.type)) rows.push([k, typeof v === "number" ? v : String(v)]);
      if (h.stats) for (const [k, v] of Object.entries(h.stats)) rows.push([k, v]);
      parts.push(rows.length ? kvTable(rows) : el("div", { class: "muted" }, "nothing recorded for this head"));
    }
    side.replaceChildren(el("div", { class: "card" }, parts));
  }

  const COLS = [
    ["name", "head", (h) => h.name], ["class", "class", (h) => cls(h) || ""],
    ["explanation", "explanation", (h) => h.explanation || ""],
    ["score", "score", score], ["baseline", "shuffled", (h) => h.scores ? h.scores.baseline_score : null],
    ["pair", "pair AUC", (h) => h.scores ? h.scores.pair_auc_easy : null],
    ["template", "template AUC", (h) => h.scores ? h.scores.template_auc_easy : null],
    ["lift", "lift", lift], ["cluster", "cluster", (h) => h.cluster === undefined ? null : h.cluster],
  ].filter(([k]) => (k !== "pair" && k !== "template" && k !== "lift") || D.has.lift);
  function renderTable(rows) {
    const [key, dir] = state.sort, get = COLS.find((c) => c[0] === key)[2];
    rows = rows.filter((h) => h.page).sort((a, b) => {
      const x = get(a), y = get(b);
      if (x === y) return 0; if (x === null || x === undefined) return 1; if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * dir;
    });
    const head = el("tr", {}, COLS.map(([k, label]) => el("th", { class: ["score", "baseline", "pair", "template", "lift"].includes(k) ? "num" : "",
      onclick: () => { state.sort = [k, state.sort[0] === k ? -state.sort[1] : -1]; render(); } },
      label + (state.sort[0] === k ? (state.sort[1] < 0 ? " ▾" : " ▴") : ""))));
    const body = rows.map((h) => el("tr", {}, COLS.map(([k, , get]) => {
      const v = get(h);
      if (k === "name") return el("td", { class: "mono" }, el("a", { href: h.page }, h.name));
      if (k === "class") return el("td", { style: { whiteSpace: "nowrap" } }, v ? el("span", {}, el("span", { class: "sw", style: { background: classColor(v) } }), " ", classLabel(v)) : "");
      if (k === "explanation") return el("td", {}, v || (h.explain_error ? el("span", { class: "muted" }, "explain failed: " + h.explain_error) : ""));
      if (k === "cluster") return el("td", {}, v === null ? "" : v < 0 ? "noise" : "c" + v);
      return el("td", { class: "num" }, k === "lift" ? signed(v) : fmt(v));
    })));
    tableBox.replaceChildren(el("h2", {}, `Analysed heads (${rows.length})`),
      rows.length ? el("table", { class: "list", id: "heads-table" }, head, body)
        : el("div", { class: "muted" }, "No analysed head matches the filters."));
  }

  function render() {
    for (const b of modeSeg.children) b.classList.toggle("on", b.dataset.mode === state.mode);
    let n = 0;
    const shown = [];
    for (const [c, h] of cells) {
      const col = colorOf(h), vis = visible(h);
      c.style.background = col || "";
      c.classList.toggle("na", !col);
      c.classList.toggle("dim", !vis);
      c.textContent = cellText(h);
      if (vis) { n++; shown.push(h); }
    }
    document.getElementById("count").textContent = `${n} of ${HEADS.length} heads shown`;
    renderSide();
    renderTable(shown);
  }
  render();
})();
