"""Stage 'cluster': explanations + scores -> clusters.json (MiniLM embeddings + HDBSCAN)."""

from __future__ import annotations

import logging
import time
from typing import Any

from head_explain.artifacts import read_jsonl, read_parquet, write_json
from head_explain.cluster import (
    check_embedding_model,
    cluster_heads,
    embed,
    explanation_is_valid,
    latest_per_head,
)
from head_explain.config import Config
from head_explain.runners.common import out

log = logging.getLogger(__name__)

STAGE = "cluster"


def preflight(cfg: Config) -> None:
    check_embedding_model(cfg.embedding_model)


def run(cfg: Config) -> dict[str, Any]:
    """Stage entry: read explanations and scores, embed, cluster, write clusters.json."""
    t0 = time.perf_counter()
    explanations = latest_per_head(read_jsonl(out(cfg, "explanations.jsonl")))
    scores, _ = read_parquet(out(cfg, "scores.parquet"))
    texts = [str(r["explanation"]) for r in explanations if explanation_is_valid(r)]
    t1 = time.perf_counter()
    emb = embed(texts, cfg.embedding_model)
    t2 = time.perf_counter()
    result = cluster_heads(
        explanations, scores, emb, cfg.min_cluster_size, embedding_model=cfg.embedding_model
    )
    t3 = time.perf_counter()
    write_json(out(cfg, "clusters.json"), result)
    n_emb = len(texts)
    metrics = {
        "n_clusters": len(result["clusters"]),
        "noise_fraction": (len(result["noise"]) / n_emb) if n_emb else None,
        "n_embedded": n_emb,
        "n_failed": len(result["failed"]),
        "embed_seconds": round(t2 - t1, 3),
        "hdbscan_seconds": round(t3 - t2, 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    log.info(
        "cluster: %d clusters over %d heads (noise %s) in %.1fs",
        metrics["n_clusters"],
        n_emb,
        metrics["noise_fraction"],
        metrics["seconds"],
    )
    return metrics
