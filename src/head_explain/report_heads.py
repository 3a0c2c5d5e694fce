"""The head-aware sections of report.md: the model's head classes (every head), the
pair scores against their template and shuffled baselines, and one table row per
explained head. Plain rows of escaped strings; the layout is templates/report.md.j2's."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from head_explain.escaping import fmt, md_escape
from head_explain.evidence import evidence_text
from head_explain.head_types import CLASSES
from head_explain.headline import beats_baselines, paired_stats
from head_explain.heads import head_name

LEVELS = {"easy": "easy negatives (random low-write pairs)",
          "hard": "hard negatives (template-fitting low-write pairs)"}  # fmt: skip


def class_rows(head_types: pd.DataFrame | None, summary: pd.DataFrame) -> list[list[str]]:
    """Per class: heads of the model, their share, how many were explained, the strongest."""
    if head_types is None or head_types.empty or "head_class" not in head_types:
        return []
    explained = summary.loc[summary["explanation"].astype(str).str.strip() != "", "head"]
    total = len(head_types)
    rows = []
    for cls in CLASSES:
        g = head_types[head_types["head_class"] == cls]
        if g.empty:
            rows.append([md_escape(cls), "0", "0%", "0", "—"])
            continue
        names = {head_name(int(a), int(b)) for a, b in zip(g["layer"], g["head"], strict=True)}
        best = g.loc[g["class_score"].astype(float).idxmax()]
        strongest = (
            f"{head_name(int(best['layer']), int(best['head']))} ({fmt(best['class_score'], 2)})"
        )
        rows.append([md_escape(cls), str(len(g)), f"{100 * len(g) / total:.0f}%",
                     str(len(names & set(explained))), strongest])  # fmt: skip
    return rows


def _ci(st: dict) -> str:
    if not st["n"]:
        return "n/a"
    return f"{fmt(st['mean_diff'])} [{fmt(st['ci_low'])}, {fmt(st['ci_high'])}]"


def pair_rows(summary: pd.DataFrame, seed: int = 0) -> list[list[str]]:
    """Per negative set: explanation, template and shuffled pair-AUC over the same heads,
    the paired lifts with 95% bootstrap intervals, and the share beating both."""
    rows = []
    for level, label in LEVELS.items():
        cols = [f"pair_auc_{level}", f"template_auc_{level}", f"shuffled_auc_{level}"]
        if not set(cols) <= set(summary.columns):
            continue
        both = summary[cols].astype(float).dropna()  # the same heads for all three means
        if both.empty:
            rows.append([label, "0", *["n/a"] * 6])
            continue
        over_tmpl = paired_stats(both[cols[0]], both[cols[1]], seed)
        over_shuf = paired_stats(both[cols[0]], both[cols[2]], seed)
        wins = beats_baselines(summary, level, seed=seed)
        lo, hi = wins["ci95"]
        beats = f"{100 * wins['fraction']:.0f}% [{100 * lo:.0f}%, {100 * hi:.0f}%]"
        rows.append([label, str(len(both)), *[fmt(both[c].mean()) for c in cols],
                     _ci(over_tmpl), _ci(over_shuf), beats])  # fmt: skip
    return rows


def added_rows(summary: pd.DataFrame, seed: int = 0) -> list[list[str]]:
    """Per negative set, over the heads whose explanation completes the measured clause:
    the explanation's and the clause's own pair-AUC, and what the model's part added
    (paired mean with its 95% bootstrap interval, and the share of heads it helped)."""
    rows = []
    for level, label in LEVELS.items():
        cols = [f"pair_auc_{level}", f"clause_auc_{level}"]
        if not set(cols) <= set(summary.columns):
            continue
        both = summary[cols].astype(float).dropna()
        if both.empty:
            continue
        st = paired_stats(both[cols[0]], both[cols[1]], seed)
        rows.append([label, str(st["n"]), fmt(st["mean_real"]), fmt(st["mean_baseline"]),
                     _ci(st), f"{100 * st['share_above']:.0f}%"])  # fmt: skip
    return rows


def undefined_pairs(summary: pd.DataFrame) -> int:
    """Explained heads without an easy pair-AUC (each says why in scores.parquet)."""
    if "pair_auc_easy" not in summary:
        return 0
    explained = summary["explanation"].astype(str).str.strip() != ""
    return int((explained & ~np.isfinite(summary["pair_auc_easy"].astype(float))).sum())


def head_rows(summary: pd.DataFrame) -> list[list[str]]:
    """One row per explained head, in layer order: its class and every score."""
    cols = ("score", "baseline_score", "pair_auc_easy", "template_auc_easy",
            "shuffled_auc_easy", "lift_easy", "lift_hard", "added_easy")  # fmt: skip
    rows = []
    for _, r in summary.iterrows():
        if not str(r["explanation"]).strip():
            continue
        cls = r.get("head_class", "") or ""
        rows.append([md_escape(r["head"]), md_escape(cls or "n/a"),
                     *[fmt(r.get(c, np.nan)) for c in cols],
                     md_escape(r["explanation"], max_len=140)])  # fmt: skip
    return rows


def evidence_by_head(evidence: pd.DataFrame | None) -> dict[str, str]:
    """Head name -> its evidence as one line of escaped Markdown."""
    if evidence is None or evidence.empty or "n_events" not in evidence:
        return {}
    out = {}
    for rec in evidence.to_dict("records"):
        try:
            text = evidence_text(rec)
        except (KeyError, TypeError, ValueError):  # an older evidence file: leave it out
            continue
        out[head_name(int(rec["layer"]), int(rec["head"]))] = md_escape(text.replace("\n", " "))
    return out


def head_extras(row: pd.Series) -> dict[str, Any]:
    """The pair scores a best/worst head block shows beside its per-token score."""
    return {k: row.get(k, None) for k in ("head_class", "pair_auc_easy", "template_auc_easy",
                                      "shuffled_auc_easy", "lift_easy", "pair_auc_hard",
                                      "template_auc_hard", "lift_hard")}  # fmt: skip
