// heads/<name>.html: one head's explanations, scores, class, evidence and excerpts.
(function () {
  const D = DATA, H = D.head, S = H.scores || {}, T = H.type || {};
  const amax = D.amax || 1;
  const isNum = (v) => typeof v === "number";
  // Simulated values are on the simulator's 0-10 scale; the score is a correlation and
  // ignores offset and scale, so the row spans the head's simulated min..max.
  const simVals = D.excerpts.flatMap((x) => (x.sim || []).filter(isNum));
  const simLo = simVals.length ? Math.min(...simVals) : 0;
  const simSpan = Math.max(1e-9, (simVals.length ? Math.max(...simVals) : 1) - simLo);

  document.getElementById("top").append(
    el("div", { class: "small" }, el("a", { href: "../index.html" }, "← all heads"), D.model ? " · " + D.model : ""),
    el("h1", {}, H.name,
      T.head_class ? el("span", { class: "badge", style: { background: classColor(T.head_class), color: "#fff" } }, classLabel(T.head_class)) : null,
      H.cluster !== undefined ? el("span", { class: "badge" }, H.cluster < 0 ? "no cluster" : "cluster c" + H.cluster) : null),
    el("div", { class: "sub" }, `layer ${H.layer}, head ${H.head}`));
  const app = document.getElementById("app");

  // ---- explanation card: every run of the head (prompt versions), the template sentence
  const runs = D.explanations;
  const main = runs.filter((r) => r.explanation && !r.error).pop();
  const explCard = el("div", { class: "card", id: "explanation" }, el("h3", {}, "Explanation"),
    main ? el("div", { class: "expl" }, main.explanation) : el("div", { class: "expl none" }, "no explanation for this head"),
    S.template_sentence ? el("div", { class: "note" }, "best template: ", el("span", { class: "mono" }, S.template_sentence)) : null);
  if (runs.length) {
    // One block per run: what produced it, then (when it differs from the text shown
    // above) the text, and for grounded prompts the measured clause and the model's part.
    const EXTRA = { template_clause: "measured clause", model_completion: "model's part" };
    const extra = (r) => Object.entries(r).filter(([k, v]) => /template|clause|prefix|completion$/.test(k) && typeof v === "string" && v && v !== r.explanation)
      .sort(([a], [b]) => (a in EXTRA ? Object.keys(EXTRA).indexOf(a) : 9) - (b in EXTRA ? Object.keys(EXTRA).indexOf(b) : 9));
    explCard.append(el("h3", {}, runs.length > 1 ? `Runs (${runs.length})` : "Run"), ...runs.map((r) => el("div", { class: "run" },
      el("div", { class: "muted small" }, el("span", { class: "mono" }, (r.prompt_version || "?") + (r.prompt_sha ? " " + String(r.prompt_sha).slice(0, 7) : "")),
        ` · ${r.explainer_model || "?"} · ${r.prompt_tokens ?? "?"} prompt + ${r.completion_tokens ?? "?"} completion tokens · ${fmt(r.latency_s, 1)} s` +
        (r.cost_usd ? ` · $${fmt(r.cost_usd, 4)}` : "")),
      r.error ? el("div", { class: "err small" }, "error: " + r.error)
        : (r !== main && r.explanation ? el("div", {}, r.explanation) : null),
      extra(r).map(([k, v]) => el("div", { class: "small" }, el("span", { class: "muted" }, (EXTRA[k] || k) + ": "), v)))));
  }

  // ---- scores card: explanation vs shuffled explanation vs template, and the lift
  const scoreRows = [
    ["simulation r (all)", S.score, S.baseline_score, null, null],
    ["simulation r (top)", S.score_top, null, null, null],
    ["simulation r (random)", S.score_random, null, null, null],
    ["pair AUC (easy neg.)", S.pair_auc_easy, S.shuffled_auc_easy, S.template_auc_easy, S.lift_easy],
    ["pair AUC (hard neg.)", S.pair_auc_hard, S.shuffled_auc_hard, S.template_auc_hard, S.lift_hard],
  ].filter((r) => r.slice(1).some((v) => v != null));
  const hasPair = scoreRows.some((r) => r[3] != null || r[4] != null);
  const scoreHead = ["", "explanation", "shuffled"].concat(hasPair ? ["template", "lift"] : []);
  const scoreCard = el("div", { class: "card", id: "scores" }, el("h3", {}, "Scores"),
    scoreRows.length ? el("table", {},
      el("tr", {}, scoreHead.map((x) => el("th", { class: "num" }, x))),
      scoreRows.map(([k, a, b, c, d]) => el("tr", {}, el("td", {}, k), el("td", { class: "num" }, fmt(a)),
        el("td", { class: "num" }, fmt(b)), hasPair ? [el("td", { class: "num" }, fmt(c)), el("td", { class: "num" }, signed(d))] : null)))
      : el("div", { class: "muted" }, "not scored in this run"),
    S.baseline_from ? el("div", { class: "note" }, "shuffled = scored with the explanation of " + S.baseline_from) : null,
    isNum(S.clause_auc_easy) ? el("div", { class: "note" }, `the measured clause alone: pair AUC ${fmt(S.clause_auc_easy)} easy, ${fmt(S.clause_auc_hard)} hard; ` +
      `the explainer's own part added ${signed(S.added_easy)} easy, ${signed(S.added_hard)} hard`) : null,
    S.method ? el("div", { class: "note" }, `method ${S.method} · simulator ${S.simulator_model || "?"} · ${S.n_tokens ?? "?"} tokens · ${S.n_failed ?? 0} excerpt(s) failed`) : null,
    S.error ? el("div", { class: "note err" }, S.error) : null);

  // ---- class card: template scores (synthetic vs natural text), the attention per
  // relative offset as small bars, then the cache stage's statistics; any other numeric
  // column of head_types is listed too, so new template scores show without a change.
  const bars = (obj, skip) => Object.entries(obj).filter(([k, v]) => isNum(v) && !skip.includes(k)).map(([k, v]) =>
    el("tr", {}, el("td", {}, k), el("td", { class: "num" }, fmt(v)),
      el("td", {}, v >= 0 && v <= 1 ? el("span", { class: "hbar", style: { width: Math.round(v * 120) + "px" } }) : "")));
  const bar = (v) => isNum(v) ? [fmt(v, 2), " ", el("span", { class: "hbar", style: { width: Math.round(Math.max(0, Math.min(1, v)) * 60) + "px" } })] : "–";
  const TEMPLATES = [["previous token", "syn_prev", "nat_prev"], ["duplicate token", "syn_duplicate", "nat_duplicate"],
    ["induction", "syn_induction", "nat_induction"], ["self", "syn_self", "nat_self"], ["first token (BOS)", "syn_bos", "nat_bos"]];
  const classCard = el("div", { class: "card", id: "class" }, el("h3", {}, "Class and attention statistics"));
  const seenT = new Set(["class_score"]);
  if (T.head_class) {
    classCard.append(el("div", {}, el("b", {}, classLabel(T.head_class)), ` (class score ${fmt(T.class_score, 2)})`,
      T.second_class ? `, second: ${classLabel(T.second_class)}` : ""));
    const rows = TEMPLATES.filter(([, a, b]) => isNum(T[a]) || isNum(T[b]));
    rows.forEach(([, a, b]) => { seenT.add(a); seenT.add(b); });
    if (rows.length) classCard.append(el("table", { class: "kv small", style: { marginTop: "6px" } },
      el("tr", {}, el("th", {}, "attention on…"), el("th", {}, "synthetic repeats"), el("th", {}, "natural text")),
      rows.map(([label, a, b]) => el("tr", {}, el("td", {}, label), el("td", {}, bar(T[a])), el("td", {}, bar(T[b]))))));
    const offs = Object.keys(T).filter((k) => /^offset_\d+$/.test(k) && isNum(T[k]));
    offs.forEach((k) => seenT.add(k));
    if (offs.length) {
      const top = Math.max(1e-9, ...offs.map((k) => T[k]));
      classCard.append(el("div", { class: "muted small", style: { marginTop: "8px" } }, `mean attention by relative offset (natural text; tallest bar = ${fmt(top, 2)})`),
        el("div", { class: "offsets" }, offs.map((k) => tipOn(el("div", { class: "ob" },
          el("div", { class: "obar", style: { height: Math.round(36 * T[k] / top) + 2 + "px" } }), el("div", { class: "olab" }, k.slice(7))),
          () => [["m", `offset ${k.slice(7)}: mean attention ${fmt(T[k])}`]]))));
    }
    const restT = Object.entries(T).filter(([k, v]) => !seenT.has(k) && isNum(v));
    if (restT.length) classCard.append(pairsTable(restT));
  } else classCard.append(el("div", { class: "muted" }, "no head class in this run"));
  if (H.stats) classCard.append(el("div", { class: "muted small", style: { marginTop: "8px" } }, "cache stage (write norm, natural text)"),
    pairsTable(Object.entries(H.stats).filter(([, v]) => isNum(v))));
  function pairsTable(entries) {
    const rows = [];
    for (let i = 0; i < entries.length; i += 2) rows.push(entries.slice(i, i + 2));
    return el("table", { class: "kv small" }, rows.map((pair) => el("tr", {}, pair.map(([k, v]) =>
      [el("td", {}, k), el("td", { class: "num" }, Number.isInteger(v) ? String(v) : fmt(v))]))));
  }

  // ---- evidence card: offset/template shares as bars, frequent tokens and pairs as
  // tables (top_X with top_X_count / top_X_lift), any other field as key: value
  const evCard = el("div", { class: "card", id: "evidence" }, el("h3", {}, "Evidence from top events"));
  const EV = D.evidence || {};
  const evKeys = Object.keys(EV);
  if (!evKeys.length) evCard.append(el("div", { class: "muted" }, "no evidence artifact in this run"));
  const used = new Set(["head_class", "class_score", "second_class"]);
  const SHARE_LABEL = { share_offset_0: "the token itself (offset 0)", share_offset_1: "the previous token (1)",
    share_offset_far: "further back", share_bos: "the first token (BOS)", share_dup: "an earlier copy of it",
    share_induction: "the token after an earlier copy" };
  for (let k = 2; k < 10; k++) SHARE_LABEL["share_offset_" + k] = `${k} tokens back`;
  const freqBox = el("div", { class: "freq" });
  const shares = evKeys.filter((k) => k.startsWith("share_") && (EV[k] === null || isNum(EV[k])));
  if (shares.length) {
    shares.forEach((k) => used.add(k));
    evCard.append(el("div", { class: "muted small" }, "share of top events whose main source is…"),
      el("table", { class: "kv small" }, bars(Object.fromEntries(shares.map((k) => [SHARE_LABEL[k] || k.replace(/^share_/, ""), EV[k]])), [])));
  }
  const freq = evKeys.filter((k) => Array.isArray(EV[k]) && !/_(count|lift)$/.test(k));
  for (const k of freq) {
    used.add(k); used.add(k + "_count"); used.add(k + "_lift");
    const cnt = EV[k + "_count"] || [], lift = EV[k + "_lift"] || [];
    freqBox.append(el("div", {}, el("div", { class: "muted small", style: { marginTop: "8px" } }, k.replace(/^top_/, "frequent ").replace(/_/g, " ").replace(/dest$/, "destinations").replace(/src$/, "sources").replace(/pair$/, "pairs (destination -> source)")),
      el("table", { class: "kv small" }, el("tr", {}, el("th", {}, ""), el("th", { class: "num" }, "count"), el("th", { class: "num" }, "lift")),
        EV[k].slice(0, 8).map((t, i) => el("tr", {}, el("td", { class: "mono" }, showTok(String(t))),
          el("td", { class: "num" }, cnt[i] ?? ""), el("td", { class: "num" }, lift[i] == null ? "" : (lift[i] >= 100 ? Math.round(lift[i]).toLocaleString("en") : fmt(lift[i], 1)) + "×"))))));
  }
  if (freq.length) evCard.append(freqBox);
  const rest = evKeys.filter((k) => !used.has(k));
  if (rest.length) evCard.append(el("table", { class: "kv small", style: { marginTop: "8px" } },
    rest.map((k) => el("tr", {}, el("td", {}, k), el("td", { class: "num" },
      isNum(EV[k]) ? (Number.isInteger(EV[k]) ? String(EV[k]) : fmt(EV[k])) : EV[k] === null ? "n/a" : typeof EV[k] === "object" ? JSON.stringify(EV[k]) : String(EV[k]))))));
  app.append(el("div", { class: "cards" }, explCard, scoreCard, classCard, evCard));

  // ---- excerpts: token heat = write norm, sources underlined, simulated row below
  const pat = D.pattern;
  const patRows = pat ? pat.rows : null;
  function tokenTip(x, i) {
    const t = x.tokens[i], v = x.acts[i];
    const L = [["q", "“" + showTok(t) + "”"],
      ["m", `activation ${fmt(v)} (${fmt(10 * v / amax, 1)}/10 of the head's max)`]];
    if (x.sim) L.push(["m", `simulated ${fmt(x.sim[i], 2)} on the simulator's 0–10 scale`]);
    if (i === x.dest) {
      L.push(["t", "destination of this event; reads:"]);
      for (const s of x.srcs) L.push(["q", `  ${fmt(s.w, 2)}  “${showTok(x.tokens[s.i])}” (${s.i - i})`]);
      if (x.srcs_before) L.push(["m", `  + ${x.srcs_before} source(s) before the excerpt`]);
    }
    if (patRows && pat.key === x.key && patRows[i]) {
      const top = patRows[i].map((w, j) => [w, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
      const rest = 1 - patRows[i].reduce((a, b) => a + b, 0);
      L.push(["t", "attends to (pattern row):"]);
      for (const [w, j] of top) L.push(["q", `  ${fmt(w, 2)}  “${showTok(x.tokens[j])}” (${j - i})`]);
      if (rest > 0.005) L.push(["m", `  ${fmt(rest, 2)} on tokens before the excerpt (BOS included)`]);
    }
    return L;
  }
  function excerptView(x) {
    const srcW = Object.fromEntries(x.srcs.map((s) => [s.i, s.w]));
    const toks = el("div", { class: "toks" });
    const spans = [];
    toks.append(el("div", { class: "col" }, el("span", { class: "rowlab" }, "true"), x.sim ? el("span", { class: "rowlab sim" }, "simulated") : null));
    x.tokens.forEach((t, i) => {
      const cls = "tok" + (i === x.dest ? " dest" : "") + (i in srcW ? " src" : "");
      const span = el("span", { class: cls, "data-i": String(i), style: { background: heat(x.acts[i] / amax) } }, showTok(t));
      if (i in srcW) span.style.textDecorationThickness = (1 + Math.round(3 * srcW[i])) + "px";
      tipOn(span, () => tokenTip(x, i));
      span.addEventListener("mouseenter", () => { if (i === x.dest) for (const s of x.srcs) spans[s.i].classList.add("hl"); });
      span.addEventListener("mouseleave", () => spans.forEach((s) => s.classList.remove("hl")));
      spans.push(span);
      const simCell = x.sim ? tipOn(el("span", { class: "tok sim", style: { background: heat(x.sim[i] == null ? null : (x.sim[i] - simLo) / simSpan) } },
        showTok(t)), () => tokenTip(x, i)) : null;
      toks.append(el("div", { class: "col" }, span, simCell));
    });
    const meta = `${x.split} #${x.rank} · window ${x.window}, token ${x.pos} · activation ${fmt(x.act)}` +
      (x.act_norm != null ? ` (${fmt(x.act_norm, 1)}/10)` : "");
    return el("div", { class: "excerpt", "data-key": x.key }, el("div", { class: "meta" }, meta), toks);
  }
  const groups = [
    ["explain", "Top activating excerpts shown to the explainer", "Background = the head's write norm at each token (darker = stronger); boxed = the event's destination token; underlined = the sources it reads most (thicker = more attention). Hover a token for its values."],
    ["score_top", "Held-out top excerpts: true vs simulated activation", "Top row: true write norm; bottom row: the simulator's prediction from the explanation, coloured from its lowest to its highest value for this head (the score, a correlation, ignores offset and scale)."],
    ["score_random", "Random excerpts: true vs simulated activation", "Random windows: a good explanation predicts low values here."],
  ];
  const exBox = el("div", { id: "excerpts" });
  for (const [split, title, note] of groups) {
    const xs = D.excerpts.filter((x) => x.split === split);
    if (!xs.length) continue;
    exBox.append(el("h2", {}, title), el("div", { class: "note" }, note), ...xs.map(excerptView));
    if (split !== "explain" && !xs.some((x) => x.sim)) exBox.append(el("div", { class: "note" }, "No simulated values were stored by this run's simulate stage."));
  }
  if (!D.excerpts.length) exBox.append(el("h2", {}, "Excerpts"), el("div", { class: "muted" }, "no events selected for this head"));

  // ---- attention pattern of one excerpt: destination x source heat map
  const patBox = el("div", { class: "card", id: "pattern" }, el("h3", {}, "Attention pattern"));
  const px = pat && D.excerpts.find((x) => x.key === pat.key);
  if (!px) patBox.append(el("div", { class: "muted" }, "no attention pattern stored for this head"));
  else {
    const n = px.tokens.length;
    const g = el("div", { class: "pat", style: { gridTemplateColumns: `110px repeat(${n}, 16px)` } });
    g.append(el("div", {}));
    px.tokens.forEach((t) => g.append(el("div", { class: "pat-label xl" }, showTok(t))));
    px.tokens.forEach((t, i) => {
      g.append(el("div", { class: "pat-label yl" + (i === px.dest ? " dest" : "") }, showTok(t)));
      for (let j = 0; j < n; j++) {
        const w = patRows[i][j] || 0;
        const c = el("div", { class: "px", style: { background: j > i ? "#f6f8fa" : `rgba(9, 105, 218, ${Math.min(1, 0.04 + w).toFixed(3)})` } });
        if (j <= i) tipOn(c, () => [["q", `“${showTok(px.tokens[i])}” → “${showTok(px.tokens[j])}”`], ["m", `attention ${fmt(w, 3)} (offset ${j - i})`]]);
        g.append(c);
      }
    });
    patBox.append(el("div", { class: "note" }, `${px.split} #${px.rank}: row = destination token, column = source token; rows leave out weight on tokens before the excerpt.`), g);
  }

  // ---- cluster and nearest heads by explanation embedding
  const near = el("div", { class: "card", id: "neighbours" }, el("h3", {}, "Cluster and nearest heads"));
  if (D.cluster) near.append(el("div", {}, `cluster c${D.cluster.id}: `, el("b", {}, D.cluster.label || "(no label)"),
    ` · ${D.cluster.size} heads · mean score ${fmt(D.cluster.mean_score)}`),
    el("div", { class: "small" }, "members: ", D.cluster.members.map((m, i) => [i ? ", " : "", m === H.name ? m : el("a", { href: m + ".html" }, m)])));
  else near.append(el("div", { class: "muted" }, D.noise ? "not in any cluster (HDBSCAN noise)" : "no cluster for this head"));
  if (D.neighbours.length) near.append(el("table", { class: "list small" },
    el("tr", {}, el("th", {}, "head"), el("th", { class: "num" }, "cosine"), el("th", {}, "explanation")),
    D.neighbours.map((nb) => el("tr", {}, el("td", { class: "mono" }, el("a", { href: nb.page }, nb.name)),
      el("td", { class: "num" }, fmt(nb.cos, 2)), el("td", {}, nb.explanation)))));
  else near.append(el("div", { class: "note" }, "no explanation embeddings to compare"));

  app.append(exBox, el("div", { class: "cards", style: { marginTop: "16px" } }, patBox, near));
})();
