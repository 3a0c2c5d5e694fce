"""Pure data building: artifacts (as loaded by inputs.py) -> the JSON each page embeds.

Column names of optional artifacts are passed through as they are, so a new score or
template column shows up without a code change; only the few names the page treats
specially (colour modes, lift) are listed here. Numbers are rounded to keep pages small.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from head_explain.browser.inputs import grid_shape, model_name
from head_explain.heads import head_name

EXCERPT_MAX_CHARS = 300  # explanation shown in the index (full text on the head page)
N_NEIGHBOURS = 5
SPLIT_ORDER = {"explain": 0, "score_top": 1, "score_random": 2}
# Pair-AUC lift columns, easy negatives first; computed from their parts when absent.
LIFT_PARTS = {
    "lift_easy": ("pair_auc_easy", "template_auc_easy"),
    "lift_hard": ("pair_auc_hard", "template_auc_hard"),
}
_KEY_COLS = {"layer", "head", "head_name", "name"}


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _rows_by_head(df: pd.DataFrame | None) -> dict[tuple[int, int], dict]:
    """Last row per (layer, head) as a plain dict."""
    if df is None or not len(df):
        return {}
    out = {}
    for rec in df.to_dict("records"):
        out[(int(rec["layer"]), int(rec["head"]))] = rec
    return out


def _scalars(rec: dict | None, skip: set[str] = _KEY_COLS) -> dict[str, Any]:
    """The scalar (number, string, bool) fields of a row; lists are left to callers."""
    out = {}
    for k, v in (rec or {}).items():
        if k in skip or isinstance(v, list | tuple | dict | np.ndarray):
            continue
        if isinstance(v, float | np.floating) and not _finite(v):
            v = None
        out[k] = v
    return out


def _valid(row: dict) -> bool:
    return not row.get("error") and bool(str(row.get("explanation") or "").strip())


def explanations_by_head(rows: list[dict] | None) -> dict[tuple[int, int], list[dict]]:
    """Every explanation row of a head (one per prompt version or model run), in order."""
    out: dict[tuple[int, int], list[dict]] = {}
    for r in rows or []:
        out.setdefault((int(r["layer"]), int(r["head"])), []).append(r)
    return out


def _main_explanation(rows: list[dict]) -> str:
    valid = [r for r in rows if _valid(r)]
    return str(valid[-1]["explanation"]) if valid else ""


def cluster_of(clusters: dict | None) -> tuple[dict[str, int], list[dict]]:
    """head name -> cluster id (-1 = noise), and the clusters' id/label/size list."""
    member_of: dict[str, int] = {}
    info = []
    for c in (clusters or {}).get("clusters", []):
        info.append({"id": int(c["id"]), "label": c.get("label", ""), "size": int(c["size"])})
        for m in c.get("members", []):
            member_of[m] = int(c["id"])
    for m in (clusters or {}).get("noise", []):
        member_of.setdefault(m, -1)
    return member_of, info


def _score_fields(rec: dict | None) -> dict[str, Any]:
    out = _scalars(rec, _KEY_COLS | {"raw"})
    for lift, (auc, tmpl) in LIFT_PARTS.items():
        if out.get(lift) is None and _finite(out.get(auc)) and _finite(out.get(tmpl)):
            out[lift] = float(out[auc]) - float(out[tmpl])
    return out


def index_data(inputs: dict[str, Any], pages: set[str]) -> dict[str, Any]:
    """What index.html embeds: one entry per head of the grid, plus legends."""
    n_layers, n_heads = grid_shape(inputs)
    types = _rows_by_head(inputs.get("head_types"))
    stats = _rows_by_head(inputs.get("head_stats"))
    scores = _rows_by_head(inputs.get("scores"))
    expl = explanations_by_head(inputs.get("explanations"))
    member_of, cluster_info = cluster_of(inputs.get("clusters"))
    heads = []
    for layer in range(n_layers):
        for head in range(n_heads):
            key, name = (layer, head), head_name(layer, head)
            text = _main_explanation(expl.get(key, []))
            entry: dict[str, Any] = {"name": name, "layer": layer, "head": head}
            if key in types:
                entry["type"] = _scalars(types[key])
            if key in stats:
                entry["stats"] = _scalars(stats[key])
            if key in scores:
                entry["scores"] = _score_fields(scores[key])
            if text:
                entry["explanation"] = text[:EXCERPT_MAX_CHARS]
            elif expl.get(key):  # explained but failed: say why instead of a blank
                err = expl[key][-1].get("error") or "empty explanation"
                entry["explain_error"] = str(err)[:EXCERPT_MAX_CHARS]
            if name in member_of:
                entry["cluster"] = member_of[name]
            if name in pages:
                entry["page"] = f"heads/{name}.html"
            heads.append(entry)
    classes = sorted({str(t.get("head_class")) for t in types.values() if t.get("head_class")})
    return {
        "model": model_name(inputs),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "classes": classes,
        "clusters": cluster_info,
        "has": {
            "types": bool(types), "scores": bool(scores), "clusters": bool(cluster_info),
            "lift": any(h.get("scores", {}).get("lift_easy") is not None for h in heads),
            "explanations": bool(expl),
        },
        "heads": heads,
    }  # fmt: skip


def _as_list(x: Any) -> list:
    return [] if x is None else list(x)


def _sim_lookup(score_row: dict | None) -> dict[str, list]:
    """'split:rank' -> simulated activations, from the simulate stage's sim_* columns."""
    if not score_row:
        return {}
    sims, keys = _as_list(score_row.get("sim_acts")), _as_list(score_row.get("sim_events"))
    return {str(k): _as_list(s) for k, s in zip(keys, sims, strict=False) if s is not None}


def excerpt_rows(events: pd.DataFrame, sims: dict[str, list]) -> list[dict]:
    """The head's events as token rows: text, true act, dest, sources with attention."""
    out = []
    events = events.assign(_o=events["split"].map(SPLIT_ORDER).fillna(9))
    for r in events.sort_values(["_o", "rank"]).to_dict("records"):
        start = int(r.get("excerpt_start", 0))
        tokens = [str(t) for t in _as_list(r.get("excerpt_tokens"))]
        attn = dict(zip(_as_list(r.get("src_pos")), _as_list(r.get("src_attn")), strict=False))
        srcs = [
            {"i": int(p) - start, "w": round(float(attn[p]), 3)}
            for p in _as_list(r.get("src_pos"))
            if start <= int(p) < start + len(tokens)
        ]
        before = sum(1 for p in _as_list(r.get("src_pos")) if int(p) < start)
        key = f"{r['split']}:{int(r['rank'])}"
        acts = np.asarray(_as_list(r.get("excerpt_acts")), dtype=float)
        row = {
            "key": key, "split": r["split"], "rank": int(r["rank"]),
            "window": int(r["window_id"]), "pos": int(r["pos"]), "act": r.get("act"),
            "act_norm": r.get("act_norm"), "tokens": tokens,
            "acts": np.round(acts, 3).tolist(), "dest": int(r.get("excerpt_dest", -1)),
            "srcs": srcs, "srcs_before": before,
        }  # fmt: skip
        if key in sims:
            row["sim"] = [None if not _finite(v) else round(float(v), 2) for v in sims[key]]
        out.append(row)
    return out


def pattern_for(patterns: pd.DataFrame | None, layer: int, head: int) -> dict | None:
    if patterns is None or not len(patterns):
        return None
    p = patterns[(patterns["layer"] == layer) & (patterns["head"] == head)]
    if not len(p):
        return None
    r = p.iloc[0]
    rows = [np.round(np.asarray(x, dtype=float), 3).tolist() for x in _as_list(r["rows"])]
    return {"key": f"{r['split']}:{int(r['rank'])}", "rows": rows}


def neighbours(vectors: dict[str, np.ndarray] | None, name: str, k: int = N_NEIGHBOURS):
    """Nearest heads by cosine similarity of explanation embeddings."""
    if not vectors or name not in vectors:
        return []
    names = [n for n in vectors if n != name]
    if not names:
        return []
    mat = np.stack([vectors[n] for n in names]).astype(float)
    q = np.asarray(vectors[name], dtype=float)
    sim = mat @ q / (np.linalg.norm(mat, axis=1) * np.linalg.norm(q) + 1e-12)
    order = np.argsort(-sim, kind="stable")[:k]
    return [{"name": names[i], "cos": round(float(sim[i]), 3)} for i in order]


def lookups(inputs: dict[str, Any]) -> dict[str, Any]:
    """Per-head indexes of the inputs, built once for all head pages."""
    events = inputs.get("events")
    by_head = {}
    if events is not None and len(events):
        by_head = {(int(a), int(b)): g for (a, b), g in events.groupby(["layer", "head"])}
    return {
        "events": by_head,
        "scores": _rows_by_head(inputs.get("scores")),
        "evidence": _rows_by_head(inputs.get("evidence")),
        "explanations": explanations_by_head(inputs.get("explanations")),
        "clusters": {int(c["id"]): c for c in (inputs.get("clusters") or {}).get("clusters", [])},
    }


def head_data(inputs: dict[str, Any], entry: dict, index: dict, look: dict) -> dict[str, Any]:
    """What one head page embeds; `entry` is the head's index entry, `look` lookups()."""
    layer, head, name = entry["layer"], entry["head"], entry["name"]
    ev = look["events"].get((layer, head))
    score_row = look["scores"].get((layer, head))
    stats = entry.get("stats") or {}
    amax = stats.get("max_act")
    if ev is not None and len(ev):
        seen = max((float(np.max(a)) for a in ev["excerpt_acts"] if len(a)), default=0.0)
        amax = max(float(amax or 0.0), seen)
    expl = [_scalars(r, _KEY_COLS | {"raw"}) for r in look["explanations"].get((layer, head), [])]
    evidence = look["evidence"].get((layer, head))
    cid = entry.get("cluster")
    c = look["clusters"].get(cid) if cid is not None else None
    cluster = {k: c.get(k) for k in ("id", "label", "size", "mean_score", "members")} if c else None
    summaries = {h["name"]: h.get("explanation", "") for h in index["heads"]}
    near = neighbours(inputs.get("embeddings"), name)
    for n in near:
        n["explanation"] = summaries.get(n["name"], "")
        n["page"] = f"{n['name']}.html"
    return {
        "model": index["model"], "head": entry, "amax": amax, "explanations": expl,
        "evidence": {k: v for k, v in (evidence or {}).items() if k not in _KEY_COLS},
        "excerpts": excerpt_rows(ev, _sim_lookup(score_row)) if ev is not None else [],
        "pattern": pattern_for(inputs.get("patterns"), layer, head), "cluster": cluster,
        "noise": cid == -1, "neighbours": near,
    }  # fmt: skip
