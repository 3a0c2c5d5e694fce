"""Event selection: per head, what the explainer sees and what scoring holds out.

From a head's top candidates we take the `topk` strongest (already at most
`max_events_per_window` per window). A seeded sample of their *windows* is held out as
the top scoring set (one excerpt per window, its strongest event); the explainer sees
`explain_examples` events from the remaining windows, spread evenly over the top-k
ranking (the strongest always included), so a larger `topk` shows a broader picture of
the head. Random scoring excerpts come from the random windows, never from a window
used to explain. This is OpenAI's "top-and-random" scoring set with a delphi-style
quantile spread for explanation.

Each event carries its excerpt (token strings, destination index, source indices and
the true per-token activations), so later stages need neither the model nor the
tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class SelectSettings:
    topk: int
    explain_examples: int
    score_top_examples: int
    score_random_examples: int
    excerpt_len: int
    seed: int = 0
    tail: int = 4  # tokens shown after the destination token


# A held-out top excerpt reaches back to its event's main source, up to this many times
# excerpt_len tokens: the pair score's positive is then the pair the head wrote. Cut at
# excerpt_len, duplicate and induction heads (which read far back) lost most positives,
# and what was left favoured the events whose source happened to be near.
REACH_BACK = 3


def excerpt_bounds(
    pos: int, n_tokens: int, excerpt_len: int, tail: int, reach_back_to: int = -1
) -> tuple[int, int]:
    """[start, end) of an excerpt of `excerpt_len` tokens ending `tail` tokens after pos.

    BOS (index 0) is never shown. `reach_back_to`: a source the excerpt must show; it
    starts one token before it when that keeps the excerpt within REACH_BACK ×
    excerpt_len tokens (else it is left out, as without it).
    """
    end = min(n_tokens, pos + 1 + tail)
    start = max(1, end - excerpt_len)
    end = min(n_tokens, max(end, start + excerpt_len))
    if 1 <= reach_back_to < start and end - max(1, reach_back_to - 1) <= REACH_BACK * excerpt_len:
        start = max(1, reach_back_to - 1)
    return start, end


def spread(n_items: int, n_pick: int) -> list[int]:
    """Evenly spaced indices over a ranked list, always including the first."""
    if n_pick >= n_items:
        return list(range(n_items))
    return sorted(set(np.linspace(0, n_items - 1, n_pick).round().astype(int).tolist()))


def select_head_events(
    top: pd.DataFrame, random: pd.DataFrame, s: SelectSettings, rng: np.random.Generator
) -> pd.DataFrame:
    """Split one head's events; `top` sorted by act desc, `random` its random events."""
    pool = top.head(s.topk)
    windows = list(dict.fromkeys(pool["window_id"].tolist()))  # ranked, unique
    # Keep at least half of the windows (and >= 1) for explanation.
    n_score = min(s.score_top_examples, len(windows) // 2)
    score_windows = (
        set(rng.choice(windows, size=n_score, replace=False).tolist()) if n_score else set()
    )
    explain_pool = pool[~pool["window_id"].isin(score_windows)]
    explain = explain_pool.iloc[spread(len(explain_pool), s.explain_examples)]
    score_top = pool[pool["window_id"].isin(score_windows)].drop_duplicates("window_id")
    used = set(explain["window_id"]) | score_windows
    rand = random[~random["window_id"].isin(used)]
    if len(rand) > s.score_random_examples:
        rand = rand.iloc[np.sort(rng.choice(len(rand), s.score_random_examples, replace=False))]
    parts = []
    for split, df in (("explain", explain), ("score_top", score_top), ("score_random", rand)):
        df = df.sort_values("act", ascending=False).copy()
        df["split"] = split
        df["rank"] = np.arange(len(df), dtype=np.int32)
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def attach_excerpts(
    events: pd.DataFrame,
    windows: pd.DataFrame,
    acts: pd.DataFrame,
    token_text,
    s: SelectSettings,
) -> pd.DataFrame:
    """Add excerpt_tokens/_dest/_src/_acts/_start/_end and act_norm to each event.

    `token_text(ids) -> list[str]` renders a run of tokens, one string each (a run, not
    one id: a character split over tokens is only text together, see token_display);
    `acts` holds (layer, head, window_id, acts) rows for every window an event lies in.
    """
    tokens_by_window = dict(zip(windows["window_id"], windows["tokens"], strict=True))
    acts_by_key = {(r.layer, r.head, r.window_id): r.acts for r in acts.itertuples(index=False)}

    rows = []
    for ev in events.itertuples(index=False):
        toks = tokens_by_window[ev.window_id]
        main_src = int(ev.src_pos[0]) if ev.split == "score_top" and len(ev.src_pos) else -1
        start, end = excerpt_bounds(int(ev.pos), len(toks), s.excerpt_len, s.tail, main_src)
        true = np.asarray(acts_by_key[(ev.layer, ev.head, ev.window_id)], dtype=np.float32)
        rows.append(
            dict(
                excerpt_start=start,
                excerpt_end=end,
                excerpt_tokens=token_text(toks[start:end]),
                excerpt_dest=int(ev.pos) - start,
                excerpt_src=[int(p) - start for p in ev.src_pos if start <= p < end],
                excerpt_acts=true[start:end],
            )
        )
    out = pd.concat([events.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
    return out


def normalise(events: pd.DataFrame, head_max: dict[tuple[int, int], float]) -> pd.DataFrame:
    """act_norm: 0-10 relative to the head's largest activation (OpenAI's scale)."""
    scale = np.array([head_max[(r.layer, r.head)] for r in events.itertuples(index=False)])
    events["act_norm"] = np.where(
        scale > 0, 10.0 * events["act"] / np.where(scale > 0, scale, 1), 0.0
    )
    return events


def select_events(
    raw: pd.DataFrame,
    windows: pd.DataFrame,
    acts: pd.DataFrame,
    token_text,
    s: SelectSettings,
) -> pd.DataFrame:
    """All heads: split, attach excerpts, normalise. Deterministic for `s.seed`."""
    parts = []
    head_max: dict[tuple[int, int], float] = {}
    for (layer, head), grp in raw.groupby(["layer", "head"], sort=True):
        top = grp[grp["kind"] == "top"].sort_values("act", ascending=False, kind="stable")
        rand = grp[grp["kind"] == "random"].sort_values("window_id", kind="stable")
        rng = np.random.default_rng([s.seed, int(layer), int(head)])
        parts.append(select_head_events(top, rand, s, rng))
        head_max[(int(layer), int(head))] = float(grp["act"].max())
    events = pd.concat(parts, ignore_index=True)
    events = attach_excerpts(events, windows, acts, token_text, s)
    events = normalise(events, head_max)
    cols = [c for c in events.columns if c != "kind"]
    return events[cols]


def explain_pools(
    raw: pd.DataFrame, events: pd.DataFrame, topk: int
) -> dict[tuple[int, int], pd.DataFrame]:
    """Each head's top-`topk` pool without its held-out scoring windows: what evidence
    is measured on, so nothing the scores test leaks into the explainer's prompt."""
    held = {
        (int(k[0]), int(k[1])): set(g["window_id"])
        for k, g in events[events["split"] == "score_top"].groupby(["layer", "head"])
    }
    pools = {}
    for (layer, head), grp in raw[raw["kind"] == "top"].groupby(["layer", "head"], sort=True):
        top = grp.sort_values("act", ascending=False, kind="stable").head(topk)
        key = (int(layer), int(head))
        pools[key] = top[~top["window_id"].isin(held.get(key, set()))]
    return pools


def add_pairs(
    events: pd.DataFrame, pairs: pd.DataFrame, raw: pd.DataFrame, templates: dict, seed: int,
    topk: int,
) -> pd.DataFrame:  # fmt: skip
    """pair_dest/pair_src/pair_label/pair_write on each scoring event (see
    pair_scoring.py): the positive of a held-out top excerpt, easy and hard negatives of
    a random excerpt. `templates`: (layer, head) -> the template hard negatives fit."""
    from head_explain.pair_candidates import mark_pairs

    cand = {
        (int(r.layer), int(r.head), int(r.window_id)): r for r in pairs.itertuples(index=False)
    } if len(pairs) else {}  # fmt: skip
    top = raw[raw["kind"] == "top"]
    by_window: dict[tuple[int, int, int], list] = {}
    for (layer, head), grp in top.groupby(["layer", "head"], sort=False):
        pool = grp.sort_values("act", ascending=False, kind="stable").head(topk)
        for r in pool.itertuples(index=False):
            by_window.setdefault((int(layer), int(head), int(r.window_id)), []).append(r)
    head_max = {
        (int(k[0]), int(k[1])): float(max((w[0] for w in g["src_write"] if len(w)), default=0.0))
        for k, g in top.groupby(["layer", "head"])
    }
    rows = []
    for ev in events.itertuples(index=False):
        key = (int(ev.layer), int(ev.head))
        wkey = (*key, int(ev.window_id))
        rng = np.random.default_rng([seed, *wkey, 3])
        scoring = ev.split in ("score_top", "score_random")
        rows.append(
            mark_pairs(
                ev, cand.get(wkey) if scoring else None, head_max.get(key, 0.0),
                templates.get(key, "previous_token"), rng, by_window.get(wkey, []),
            )
        )  # fmt: skip
    return pd.concat([events.reset_index(drop=True), pd.DataFrame(rows)], axis=1)
