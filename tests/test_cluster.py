"""Clustering of head explanations: HDBSCAN on embeddings, c-TF-IDF labels."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from head_explain import config
from head_explain.artifacts import write_jsonl, write_parquet
from head_explain.cluster import cluster_heads, ctfidf_labels, embed, load_embedder
from head_explain.errors import ConfigError
from head_explain.runners.cluster import run as run_cluster

BLOBS = {
    "python": [
        "python function definitions and def keywords",
        "python import statements and module names",
        "python def lines inside class bodies",
        "python keywords such as def and import",
        "python decorators before function definitions",
        "python code indentation after def",
    ],
    "brackets": [
        "closing brackets matching an opening bracket",
        "closing parentheses after function arguments",
        "brackets and parentheses that close a list",
        "closing square brackets in nested lists",
        "parentheses closing a call expression",
        "brackets closing dictionary literals",
    ],
    "names": [
        "person names repeated from earlier sentences",
        "surnames of people mentioned before",
        "names of people copied from the previous paragraph",
        "first names of people in dialogue",
        "person names after titles like mister",
        "surnames repeated later in the article",
    ],
}


def _blob_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    explanations, rows, emb = [], [], []
    for b, (_, texts) in enumerate(BLOBS.items()):
        center = np.zeros(16)
        center[b] = 1.0
        for i, text in enumerate(texts):
            layer, head = b, i
            explanations.append({"layer": layer, "head": head, "explanation": text, "error": None})
            rows.append({"layer": layer, "head": head, "score": 0.1 * b + 0.01 * i})
            v = center + rng.normal(0, 0.03, 16)
            emb.append(v / np.linalg.norm(v))
    return explanations, pd.DataFrame(rows), np.array(emb)


def test_three_blobs_give_three_labelled_clusters():
    ex, scores, emb = _blob_inputs()
    out = cluster_heads(ex, scores, emb, min_cluster_size=3, embedding_model="fake")
    assert len(out["clusters"]) == 3
    assert out["noise"] == [] and out["failed"] == []
    assert out["params"]["n_heads"] == 18 and out["params"]["embedding_model"] == "fake"
    for c in out["clusters"]:
        layers = {int(m[1]) for m in c["members"]}
        assert len(layers) == 1, "a cluster mixes blobs"
        blob = list(BLOBS)[layers.pop()]
        assert blob in c["label"].split(", "), (blob, c["label"])
        assert 3 <= len(c["label"].split(", ")) <= 5
        assert c["representative"] in c["members"]
        assert c["size"] == len(c["members"]) == 6
        assert math.isfinite(c["mean_score"])
    assert [c["id"] for c in out["clusters"]] == [0, 1, 2]
    again = cluster_heads(ex, scores, emb, min_cluster_size=3, embedding_model="fake")
    assert again == out
    json.dumps(out, allow_nan=False)


def test_failed_heads_are_excluded_either_alignment():
    ex, scores, emb = _blob_inputs()
    ex.append({"layer": 9, "head": 0, "explanation": "", "error": "timeout"})
    ex.append({"layer": 9, "head": 1, "explanation": "   ", "error": None})
    full = np.vstack([emb, np.zeros((2, emb.shape[1]))])
    a = cluster_heads(ex, scores, full, 3)
    b = cluster_heads(ex, scores, emb, 3)
    assert a == b
    assert a["failed"] == ["L9H0", "L9H1"]
    assert a["params"]["n_heads"] == 20 and a["params"]["n_embedded"] == 18
    assert "2 failed" in a["note"]
    with pytest.raises(ValueError):
        cluster_heads(ex, scores, emb[:5], 3)


@pytest.mark.parametrize("n", [0, 1, 2, 4])
def test_fewer_heads_than_min_cluster_size_is_all_noise(n):
    ex, scores, emb = _blob_inputs()
    out = cluster_heads(ex[:n], scores, emb[:n], min_cluster_size=5)
    assert out["clusters"] == []
    assert out["noise"] == [f"L0H{i}" for i in range(n)]
    assert "min_cluster_size" in out["note"]


def test_nan_scores_give_null_mean():
    ex, scores, emb = _blob_inputs()
    scores["score"] = np.nan
    out = cluster_heads(ex, scores, emb, min_cluster_size=3)
    assert all(c["mean_score"] is None for c in out["clusters"])
    json.dumps(out, allow_nan=False)
    out = cluster_heads(ex, None, emb, min_cluster_size=3)  # no scores at all
    assert all(c["mean_score"] is None for c in out["clusters"])


def test_ctfidf_prefers_distinctive_words_and_drops_stopwords():
    labels = ctfidf_labels(
        [
            ["the head attends to commas in lists", "commas between list items"],
            ["the head attends to periods at sentence ends", "periods ending sentences"],
        ]
    )
    assert labels[0].split(", ")[0] in {"commas", "list"}
    assert "periods" in labels[1]
    for word in ("the", "to", "head", "attends"):
        assert word not in labels[0].split(", ")


def test_real_minilm_embeddings_and_run_cluster(tmp_path):
    texts = [t for blob in BLOBS.values() for t in blob[:3]]
    emb = embed(texts, "all-MiniLM-L6-v2")
    assert emb.shape == (9, 384)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
    sim = emb @ emb.T
    # within-topic similarity beats cross-topic similarity
    assert sim[0, 1] > sim[0, 3] and sim[3, 4] > sim[3, 6]
    assert load_embedder("sentence-transformers/all-MiniLM-L6-v2") is not None
    assert embed([], "all-MiniLM-L6-v2").shape[0] == 0

    ex, scores, _ = _blob_inputs()
    ex[0] = {**ex[0], "explanation": "", "error": "boom"}
    write_jsonl(tmp_path / "explanations.jsonl", ex)
    sc = scores.assign(
        score_top=np.nan, score_random=np.nan, baseline_score=0.0, baseline_from="L0H1",
        method="chat", simulator_model="m", n_tokens=10, n_failed=0, error=None,
    )  # fmt: skip
    write_parquet(tmp_path / "scores.parquet", sc, {"stage": "simulate", "model": "x"})
    cfg = config.build({"outdir": str(tmp_path), "min_cluster_size": 3})
    metrics = run_cluster(cfg)
    out = json.loads((tmp_path / "clusters.json").read_text())
    assert out["failed"] == ["L0H0"]
    assert metrics["n_clusters"] == len(out["clusters"]) >= 1
    assert 0 <= metrics["noise_fraction"] <= 1 and metrics["seconds"] > 0
    members = [m for c in out["clusters"] for m in c["members"]] + out["noise"]
    assert sorted(members) == sorted(f"L{r['layer']}H{r['head']}" for r in ex[1:])


def test_unloadable_embedding_model_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="embedding_model"):
        load_embedder(str(tmp_path / "no-such-model"))
