"""What a run logs beyond params and metrics: the heads table (explanations beside
their scores in the MLflow UI) and one trace per head and LLM stage with a span per
request. Works through an MlflowClient handed in by tracking.py; imports no mlflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from head_explain.artifacts import read_parquet
from head_explain.escaping import is_finite as _finite
from head_explain.heads import head_name

# MLflow's span attribute names (mlflow.tracing.constant.SpanAttributeKey) the UI reads
MODEL_KEY = "mlflow.llm.model"
USAGE_KEY = "mlflow.chat.tokenUsage"

HEADS_TABLE = "heads_table.json"
TABLE_COLS = (
    "head", "head_class", "explanation", "score", "baseline_score", "score_top",
    "score_random", "pair_auc_easy", "pair_auc_hard", "template_auc_easy",
    "template_auc_hard", "shuffled_auc_easy", "shuffled_auc_hard", "lift_easy", "lift_hard",
    "clause_auc_easy", "added_easy", "cluster", "error",
)  # fmt: skip
PER_HEAD_METRICS = ("lift_easy", "lift_hard", "pair_auc_easy", "pair_auc_hard")


def detail_numbers(metrics: dict) -> dict[str, float]:
    """The report's non-headline numbers (`detail` of its metrics) as flat metrics."""
    detail = metrics.get("detail") or {}
    return {k: float(v) for k, v in detail.items() if _finite(v)}


def log_heads_table(client: Any, run_id: str, outdir: Path) -> int:
    """summary.csv as an MLflow table: explanations beside their scores in the UI."""
    import pandas as pd

    path = outdir / "summary.csv"
    if not path.exists():
        return 0
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    df = df[[c for c in TABLE_COLS if c in df]].rename(columns={"head_class": "class"})
    # JSON has no NaN: an absent number is null, an absent text ""
    df = df.astype(object).where(df.notna(), None)
    client.log_table(run_id, data=df, artifact_file=HEADS_TABLE)
    return len(df)


def per_head_extra_metrics(outdir: Path) -> dict[str, float]:
    """Pair-scoring numbers per head (`lift_easy/L3H2`, ...) when scores carry them."""
    path = outdir / "scores.parquet"
    if not path.exists():
        return {}
    sc, _ = read_parquet(path)
    out = {}
    for col in (c for c in PER_HEAD_METRICS if c in sc):
        for r in sc[["layer", "head", col]].itertuples(index=False):
            if _finite(r[2]):
                out[f"{col}/{head_name(int(r[0]), int(r[1]))}"] = float(r[2])
    return out


def read_llm_calls(outdir: Path) -> list[dict]:
    """Per-request records of the LLM stages (llm_calls/<stage>.jsonl), bad lines skipped."""
    records = []
    for path in sorted((outdir / "llm_calls").glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _ns(seconds: Any) -> int:
    return int(float(seconds) * 1e9)


def _call_attributes(rec: dict) -> dict[str, Any]:
    """One request's span attributes; a cached call is marked and costs nothing."""
    cached = bool(rec.get("cached"))
    tok_in, tok_out = int(rec.get("prompt_tokens") or 0), int(rec.get("completion_tokens") or 0)
    cost = 0.0 if cached else float(rec.get("cost_usd") or 0.0)
    return {
        "model": str(rec.get("model") or ""), "role": str(rec.get("role") or ""),
        "op": str(rec.get("op") or ""), "cached": cached, "prompt_tokens": tok_in,
        "completion_tokens": tok_out, "latency_s": float(rec.get("latency_s") or 0.0),
        "cost_usd": cost, "error": str(rec.get("error") or ""),
        MODEL_KEY: str(rec.get("model") or ""),
        USAGE_KEY: {
            "input_tokens": tok_in, "output_tokens": tok_out, "total_tokens": tok_in + tok_out,
        },
    }  # fmt: skip


def log_llm_traces(client: Any, exp_id: str, run_id: str, outdir: Path) -> int:
    """One MLflow trace per (stage, head), one child span per LLM request, at the
    request's real start time and latency, linked to the run. Returns traces logged."""
    records = read_llm_calls(outdir)
    groups: dict[tuple[str, str], list[dict]] = {}
    for rec in records:
        if _finite(rec.get("start_time")):
            groups.setdefault((str(rec.get("stage")), str(rec.get("head"))), []).append(rec)
    for (stage, head), recs in sorted(groups.items()):
        recs.sort(key=lambda r: float(r["start_time"]))
        ends = [float(r["start_time"]) + float(r.get("latency_s") or 0) for r in recs]
        attrs = [_call_attributes(r) for r in recs]
        total = {k: sum(a[k] for a in attrs) for k in ("prompt_tokens", "completion_tokens",
                                                          "cost_usd")}  # fmt: skip
        root = client.start_trace(
            f"{stage} {head}", span_type="CHAIN", inputs={"stage": stage, "head": head},
            tags={"stage": stage, "head": head}, experiment_id=exp_id,
            start_time_ns=_ns(recs[0]["start_time"]), run_id=run_id,
        )  # fmt: skip
        for rec, end, attr in zip(recs, ends, attrs, strict=True):
            span = client.start_span(
                f"{attr['op'] or 'call'} {attr['role']}".strip(), trace_id=root.trace_id,
                parent_id=root.span_id, span_type="LLM", attributes=attr,
                inputs={"head": head, "role": attr["role"], "model": attr["model"]},
                start_time_ns=_ns(rec["start_time"]),
            )  # fmt: skip
            client.end_span(
                root.trace_id, span.span_id, outputs={"cached": attr["cached"]},
                status="ERROR" if attr["error"] else "OK", end_time_ns=_ns(end),
            )  # fmt: skip
        client.end_trace(
            root.trace_id, outputs={"requests": len(recs), **total},
            attributes={"requests": len(recs), "cached": sum(a["cached"] for a in attrs)},
            status="ERROR" if any(a["error"] for a in attrs) else "OK",
            end_time_ns=_ns(max(ends)),
        )  # fmt: skip
    return len(groups)
