"""Benchmark the head-aware analysis on the bundled model; prints numbers, asserts nothing.

    .venv/bin/python benchmarks/bench_quality.py [--per-class 3] [--outdir /tmp/bench_quality]
        [--seed N] [--until select]

1. Every head classified (head_types stage): heads per class.
2. The strongest `per-class` heads of previous_token, induction, duplicate_token and self
   (and `per-class` content heads) are explained with prompt v1 and with explain_v2 on
   the embedded backend (same cache, same events), then scored.
3. Per prompt: the share of the template-class heads whose explanation names the class
   (keyword check); template, explanation and shuffled pair-AUC on easy and hard
   negatives (means over the heads where all three are defined); the per-token
   correlation against its shuffled baseline; the headline (explanation beats template
   and shuffled) with its bootstrap interval.
v2 on the embedded backend also prints the measured clause alone and what the model's
part added to it (paired, with its bootstrap interval).
4. Template check, no LLM: every head of the four template classes, with
   `--template-excerpts` held-out top and random excerpts each (3 positives, as in the
   demo, quantise the AUC to 0.5/0.67/0.83/1), template pair-AUC on easy negatives per
   class, copies as words (`evidence.word_key`) and, for comparison, as exact tokens.
Targets (issue 8): template pair-AUC >= 0.9 on easy negatives for heads of its class;
the explanation names the class for >= 80% of those heads; the new prompt's mean
pair-AUC above the shuffled baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HEAD_EXPLAIN_PROGRESS", "0")

import numpy as np
import pandas as pd

from head_explain.cli import main as cli_main
from head_explain.headline import beats_baselines, paired_stats
from head_explain.pair_scoring import auc, follows_copy, pair_table, template_predicts

REPO = Path(__file__).resolve().parents[1]
TEMPLATE_CLASSES = ("previous_token", "induction", "duplicate_token", "self")
KEYWORDS = {
    "previous_token": ("previous token", "preceding token", "token before"),
    "induction": ("followed an earlier", "after an earlier", "induction", "followed the earlier"),
    "duplicate_token": ("earlier copy", "same token", "duplicate", "earlier occurrence", "repeat"),
    "self": ("itself", "same token", "same position"),
}
CACHE_FILES = ("windows.parquet", "head_types.parquet", "raw_events.parquet",
               "head_stats.parquet", "activations.parquet", "pairs.parquet")  # fmt: skip


def names_class(explanation: str, head_class: str) -> bool:
    text = explanation.lower()
    return any(k in text for k in KEYWORDS[head_class])


def run(args: list[str]) -> float:
    t0 = time.time()
    code = cli_main(args)
    if code != 0:
        raise SystemExit(f"head-explain {' '.join(args)} exited {code}")
    return time.time() - t0


def summarise(out: Path, version: str) -> dict:
    scores = pd.read_parquet(out / "scores.parquet")
    lines = (out / "explanations.jsonl").read_text().splitlines()
    expl = pd.DataFrame([json.loads(line) for line in lines])
    df = scores.merge(expl[["layer", "head", "explanation"]], on=["layer", "head"])
    tmpl = df[df["head_class"].isin(TEMPLATE_CLASSES)]
    named = [
        names_class(e, c) for e, c in zip(tmpl["explanation"], tmpl["head_class"], strict=True)
    ]
    print(f"\n== prompt {version}: {len(df)} heads")
    for c in TEMPLATE_CLASSES:
        sub = tmpl[tmpl["head_class"] == c]
        hits = [names_class(e, c) for e in sub["explanation"]]
        print(f"  names its class, {c:16s}: {sum(hits)}/{len(hits)}")
    share = float(np.mean(named)) if named else float("nan")
    print(f"  names its class, all template heads: {sum(named)}/{len(named)} = {share:.2f}")
    for neg in ("easy", "hard"):
        cols = [f"pair_auc_{neg}", f"template_auc_{neg}", f"shuffled_auc_{neg}"]
        ok = df[cols].notna().all(axis=1)
        m = df.loc[ok, cols].mean()
        print(
            f"  pair-AUC {neg:4s} over {int(ok.sum())} heads: explanation {m.iloc[0]:.3f}, "
            f"template {m.iloc[1]:.3f}, shuffled {m.iloc[2]:.3f}"
        )
        h = beats_baselines(df, neg)
        print(f"  beats template and shuffled ({neg}): {h.get('fraction')} CI95 {h.get('ci95')}")
        if f"clause_auc_{neg}" in df and df[f"clause_auc_{neg}"].notna().any():
            st = paired_stats(df[f"pair_auc_{neg}"], df[f"clause_auc_{neg}"])
            print(
                f"  the measured clause alone ({neg}) over {st['n']} heads: {st['mean_baseline']:.3f}"
                f"; added by the model {st['mean_diff']:+.3f} CI95 [{st['ci_low']:.3f}, "
                f"{st['ci_high']:.3f}]"
            )
    own = tmpl[tmpl["pair_template"] == tmpl["head_class"]]
    ok = own["template_auc_easy"].notna()
    print(
        f"  template pair-AUC easy, heads of its class: mean {own.loc[ok, 'template_auc_easy'].mean():.3f}"
        f", >= 0.9 for {int((own.loc[ok, 'template_auc_easy'] >= 0.9).sum())}/{int(ok.sum())}"
    )
    ok = df[["score", "baseline_score"]].notna().all(axis=1)
    print(
        f"  per-token correlation over {int(ok.sum())} heads: {df.loc[ok, 'score'].mean():.3f} "
        f"vs shuffled {df.loc[ok, 'baseline_score'].mean():.3f}"
    )
    return {"names_class": share}


def exact_predicts(template: str, tokens: list[str], dest: int, src: int) -> float:
    """The template with copies as exact tokens and strict induction, to compare."""
    if template == "duplicate_token":
        return float(src < dest and tokens[src] == tokens[dest])
    if template == "induction":
        return float(1 <= src < dest and tokens[src - 1] == tokens[dest])
    return template_predicts(template, tokens, dest, src)


def strict_predicts(template: str, tokens: list[str], dest: int, src: int) -> float:
    """The template with induction strict (no `continues_here`), to compare."""
    if template == "induction":
        return float(follows_copy(tokens, dest, src))
    return template_predicts(template, tokens, dest, src)


def template_check(base: list[str], out: Path, types: pd.DataFrame, excerpts: int) -> None:
    heads = types[types["head_class"].isin(TEMPLATE_CLASSES)]
    n = str(excerpts)
    secs = run([*base, "--outdir", str(out), "--heads", ",".join(heads["head_name"]),
                "--topk", str(4 * excerpts), "--score-top-examples", n,
                "--score-random-examples", n, "--until", "select"])  # fmt: skip
    events = pd.read_parquet(out / "events.parquet")
    rows = []
    for r in heads.itertuples():
        table = pair_table(events[(events["layer"] == r.layer) & (events["head"] == r.head)])
        labels = np.array([lab for _, _, labs in table for lab in labs])
        row = {"head_class": r.head_class, "n_pos": int((labels == "pos").sum())}
        predictors = (
            ("word", template_predicts),
            ("strict", strict_predicts),
            ("exact", exact_predicts),
        )
        for name, predict in predictors:
            p = np.array([predict(r.head_class, t, d, s) for t, ps, _ in table for d, s in ps])
            row[name] = auc(p[labels == "pos"], p[labels == "easy"])[0] if len(p) else np.nan
        rows.append(row)
    df = pd.DataFrame(rows)
    print(f"\n== template check: {len(df)} heads, {excerpts}+{excerpts} held-out excerpts "
          f"each ({df['n_pos'].median():.0f} positives per head, median; {secs:.0f}s)")  # fmt: skip
    for c, sub in [*df.groupby("head_class"), ("all", df)]:
        ok = sub["word"].notna()
        print(
            f"  {c:16s} template pair-AUC easy: mean {sub.loc[ok, 'word'].mean():.3f}, "
            f">= 0.9 for {int((sub.loc[ok, 'word'] >= 0.9).sum())}/{int(ok.sum())}; "
            + "; ".join(
                f"{label} {sub.loc[ok, k].mean():.3f}, >= 0.9 for {int((sub.loc[ok, k] >= 0.9).sum())}"
                for k, label in (("strict", "strict induction"), ("exact", "exact tokens"))
            )
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=3)
    ap.add_argument("--windows", type=int, default=0, help="override params.yaml's windows")
    ap.add_argument("--outdir", default="/tmp/bench_quality")
    ap.add_argument("--template-excerpts", type=int, default=20)
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--seed", type=int, default=None, help="override params.yaml's seed")
    ap.add_argument(
        "--until",
        choices=("select", "simulate"),
        default="simulate",
        help="select: the class counts and the template check only (no LLM)",
    )
    a = ap.parse_args()
    root = Path(a.outdir)
    shutil.rmtree(root, ignore_errors=True)
    base = ["--params", a.params, "--llm-cache", str(root / "llm_cache.sqlite")]
    if a.windows:
        base += ["--windows", str(a.windows)]
    if a.seed is not None:
        base += ["--seed", str(a.seed)]
    v1, v2, tmpl = root / "v1", root / "v2", root / "template_check"
    secs = run([*base, "--outdir", str(v2), "--until", "head_types"])
    types = pd.read_parquet(v2 / "head_types.parquet")
    print(f"head_types: {len(types)} heads in {secs:.1f}s (stage, model load included)")
    print(types["head_class"].value_counts().to_string())
    picked = []
    for c in (*TEMPLATE_CLASSES, "content"):
        sub = types[types["head_class"] == c].sort_values("class_score", ascending=c == "content")
        picked += list(sub["head_name"][: a.per_class])
    heads = ",".join(picked)
    template_check(base, tmpl, types, a.template_excerpts)
    if a.until == "select":
        return
    print(f"heads explained: {heads}")
    # The new prompt first (the numbers that matter), then v1 on the same cache.
    secs = run([*base, "--outdir", str(v2), "--heads", heads, "--explain-prompt", "explain_v2",
                "--until", "simulate"])  # fmt: skip
    print(f"v2 run: {secs:.1f}s")
    summarise(v2, "explain_v2")
    v1.mkdir(parents=True)
    for name in CACHE_FILES:
        shutil.copy(v2 / name, v1 / name)
    secs = run([*base, "--outdir", str(v1), "--heads", heads, "--explain-prompt", "explain_v1",
                "--skip-cache", "--until", "simulate"])  # fmt: skip
    print(f"v1 run (cache reused): {secs:.1f}s")
    summarise(v1, "explain_v1")


if __name__ == "__main__":
    main()
