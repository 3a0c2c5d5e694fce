"""What the LLM stages would cost, before any of it is spent: requests, tokens, dollars.

Sends nothing. Each request is built as the stages build it (the same prompts, from
events.parquet and explanations.jsonl where they exist already), then:

- cache hits are subtracted: a request whose cache key (llm/base.py `chat_payload`,
  `score_payload`) is in the LLM cache costs nothing;
- where the inputs do not exist yet, the prompts are built from stand-in excerpts of
  the configured size (`excerpt_len` tokens of 5 characters, one model token each) and
  a stand-in explanation of 12 words: an estimate, marked as such, and no cache hits;
- prompt tokens: tiktoken's count where tiktoken and its encoding are available
  offline, else characters / 4 (OpenAI's rule of thumb for English) plus 4 tokens per
  chat message; completion tokens: the request's max_tokens (explain: an upper bound)
  or, for a chat simulation, the reply's known length (8 tokens per value at most);
- dollars: llm/pricing.py (0 for local servers and the embedded model).

Which simulation method is priced: `chat` on OpenAI's API (it cannot score prompts),
`echo` elsewhere under `auto` (what a server that scores prompts gets).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from head_explain.config import Config

log = logging.getLogger(__name__)

# (layers, heads) of common models, for planning offline when their config is not cached
KNOWN_SHAPES = {"gpt2": (12, 12), "gpt2-medium": (24, 16), "gpt2-large": (36, 20),
                "gpt2-xl": (48, 25), "EleutherAI/pythia-70m": (6, 8)}  # fmt: skip
STANDIN_TOKEN = " word"
STANDIN_EXPLANATION = "attends from closing brackets to the matching opening bracket in code."


@dataclass
class StagePlan:
    stage: str
    model: str
    requests: int = 0  # requests the stage makes, cache hits included
    cached: int = 0  # of those, answered by the LLM cache (free)
    prompt_tokens: int = 0  # of the requests still to send
    completion_tokens: int = 0
    cost_usd: float = 0.0
    estimated: bool = False  # prompts from stand-ins (inputs not there yet)
    method: str = ""


def _counter(model: str):
    """(count(text) -> tokens, how): tiktoken offline if possible, else chars / 4."""
    try:
        import tiktoken

        try:
            enc = tiktoken.encoding_for_model(model)
        except KeyError:
            enc = tiktoken.get_encoding("o200k_base")
        return (lambda t: len(enc.encode(t))), f"tiktoken {enc.name}"
    except Exception:  # not installed, or its encoding file cannot be fetched offline
        return (lambda t: (len(t) + 3) // 4), "chars/4"


def _standin_events(cfg: Config, heads: list[tuple[int, int]]):
    import pandas as pd

    from head_explain.pair_candidates import N_EASY, N_HARD

    n = cfg.excerpt_len
    tokens = [STANDIN_TOKEN] * n
    rows = []
    for layer, head in heads:
        for split, k in (("explain", cfg.explain_examples), ("score_top", cfg.score_top_examples),
                         ("score_random", cfg.score_random_examples)):  # fmt: skip
            for rank in range(k):
                # the pairs select marks: a top event's own pair; a random excerpt's
                # easy and hard negatives (at most, where a window has them all)
                labels = {"score_top": ["pos"], "score_random": ["easy"] * N_EASY + ["hard"] * N_HARD}.get(split, [])  # fmt: skip
                rows.append(dict(layer=layer, head=head, split=split, rank=rank, act_norm=5.0,
                                 excerpt_tokens=tokens, excerpt_dest=n - 1,
                                 excerpt_src=[max(0, n - 3)], excerpt_acts=[0.0] * n,
                                 pair_dest=[n - 1] * len(labels),
                                 pair_src=[max(0, n - 2 - i) for i in range(len(labels))],
                                 pair_label=labels))  # fmt: skip
    return pd.DataFrame(rows)


def _heads_from_config(cfg: Config) -> tuple[list[tuple[int, int]], str]:
    from head_explain.heads import choose_heads, parse_heads

    if cfg.heads:
        return parse_heads(cfg.heads), "heads"
    from head_explain.models import head_shape

    try:
        shape = head_shape(cfg.model)
        how = "its config"
    except Exception as exc:  # offline and not cached
        shape, how = KNOWN_SHAPES.get(cfg.model), "known shape; config not readable offline"
        if shape is None:  # plan for the most it could be
            log.warning("plan: cannot read %s's config (%s); assuming max_heads=%d heads",
                        cfg.model, str(exc)[:120], cfg.max_heads)  # fmt: skip
            return [(0, i) for i in range(cfg.max_heads)], f"max_heads ({cfg.model} unread)"
    layers, per = shape if shape else (1, cfg.max_heads)
    heads = choose_heads(layers, per, cfg.max_heads)
    return heads, f"{cfg.model}: {layers}x{per} heads, {how}"


def plan(cfg: Config) -> dict[str, Any]:
    """{"stages": [StagePlan...], "heads": n, "tokens_by": how, "source": ...}."""
    from head_explain import artifacts as art
    from head_explain import explain, pair_scoring, prompts, simulate
    from head_explain.llm import identity_for, model_for
    from head_explain.llm.base import chat_payload, score_payload
    from head_explain.llm.cache import cache_key, open_cache
    from head_explain.llm.openai_backend import is_openai_url, resolve_base_url
    from head_explain.llm.pricing import cost_usd
    from head_explain.runners.common import out

    events_path = out(cfg, "events.parquet")
    if events_path.exists():
        events, _ = art.read_parquet(events_path, {"model": cfg.model})
        heads = sorted(
            {(int(a), int(b)) for a, b in events[["layer", "head"]].itertuples(index=False)}
        )
        source, estimated = f"{events_path}", False
    else:
        heads, source = _heads_from_config(cfg)
        events, estimated = _standin_events(cfg, heads), True
    expl_path = out(cfg, "explanations.jsonl")
    explanations, clauses = {}, {}  # clauses: the measured clause alone, as the stage judges it
    if expl_path.exists() and not estimated:
        records = {(r["layer"], r["head"]): r for r in art.read_jsonl(expl_path)}
        explanations = {k: r.get("explanation") or "" for k, r in records.items()}
        clauses = {k: explain.clause_alone(r) for k, r in records.items()}
    url, _ = resolve_base_url(cfg.openai_base_url)
    local = cfg.llm == "embedded" or not is_openai_url(url)
    cache = open_cache(cfg.llm_cache)
    groups = dict(iter(events.groupby(["layer", "head"], sort=True)))
    try:
        result = []
        # --- explain: one chat request per head
        model = model_for(cfg, "explainer")
        count, how = _counter(model)
        ident = identity_for(cfg, "explainer")
        tpl = prompts.load_explain(cfg.explain_prompt)  # the prompt the stage will send
        evidence = {}
        if not estimated and out(cfg, "evidence.parquet").exists():
            from head_explain.evidence import read_evidence

            ev_df = read_evidence(out(cfg, "evidence.parquet"), cfg.model)
            evidence = {(int(r["layer"]), int(r["head"])): r for r in ev_df.to_dict("records")}
        sp = StagePlan("explain", model, estimated=estimated, method="chat")
        for key in heads:
            ev = evidence.get(key)
            msgs = explain.build_messages(tpl, groups[key], ev)
            stop = ""
            if cfg.llm == "embedded" and tpl.name != explain.PROMPT:  # as explain_head:
                clause = explain.template_clause(ev)  # the measured clause starts the answer
                msgs.append({"role": "assistant", "content": clause + explain.WHEN})
                if key not in explanations:  # not explained yet: its clause will be judged
                    clauses[key] = explain.clause_alone({"template_clause": explain.clause_body(clause),
                                                         "explanation": STANDIN_EXPLANATION})  # fmt: skip
                stop = explain.COMPLETION_STOP
            elif cfg.llm == "embedded":
                msgs.append({"role": "assistant", "content": explain.PREFILL})
            payload = chat_payload(msgs, cfg.explain_max_tokens, 0.0, 0, None, stop)
            _add(sp, cache, cache_key({**ident, **payload}), not estimated,
                 sum(count(m["content"]) + 4 for m in msgs), cfg.explain_max_tokens)  # fmt: skip
        result.append(sp)
        # --- simulate: every scoring excerpt, with the head's own and a baseline explanation
        model = model_for(cfg, "simulator")
        ident = identity_for(cfg, "simulator")
        method = cfg.simulation_method
        if method == "auto":
            method = "chat" if cfg.llm == "openai" and is_openai_url(url) else "echo"
        sp = StagePlan("simulate", model, estimated=estimated or not explanations, method=method)
        tpl = prompts.load(simulate.ECHO_PROMPT if method == "echo" else simulate.CHAT_PROMPT)
        explained = [h for h in heads if explanations.get(h)] if explanations else heads
        base = simulate.baseline_assignment(explained, cfg.seed)
        pair_tpl = pair_scoring.load_templates(cfg.pair_prompt)
        for key in explained:
            own = explanations.get(key) or STANDIN_EXPLANATION
            partner = base.get(key)  # as the stage: no partner, no baseline
            texts = [own]
            if partner is not None and partner != key:
                texts.append(explanations.get(partner) or STANDIN_EXPLANATION)
            pair_texts = texts + [c for c in [clauses.get(key, "")] if c and c != own]
            for tokens, pairs, _ in pair_scoring.pair_table(groups[key]):
                for text in pair_texts:  # one pair-judging request per excerpt and explanation
                    req = pair_scoring.pair_request(pair_tpl, method, text, tokens, pairs)
                    if method == "echo":
                        payload = score_payload(req["prompt"], req["slots"], pair_scoring.YES_NO)
                        pt, ct = count(req["prompt"]), 1
                    else:
                        payload = chat_payload(req["messages"], req["max_tokens"], 0.0, 0,
                                               req["json_schema"])  # fmt: skip
                        pt = sum(count(m["content"]) + 4 for m in req["messages"])
                        ct = count(json.dumps({str(i): 10 for i in range(1, len(pairs) + 1)}))
                    _add(sp, cache, cache_key({**ident, **payload}), not sp.estimated, pt, ct)
            excerpts = simulate.head_excerpts(groups[key])
            for batch in simulate.request_batches(excerpts, cfg.excerpts_per_request):
                seqs = [excerpts[i].tokens for i in batch]
                n = sum(len(t) for t in seqs)
                for text in texts:
                    req = simulate.simulation_request(tpl, method, text, seqs)
                    if method == "echo":
                        payload = score_payload(req["prompt"], req["slots"], simulate.ECHO_VALUES)
                        pt, ct = count(req["prompt"]), 1
                    else:
                        msgs = req["messages"]
                        payload = chat_payload(msgs, req["max_tokens"], 0.0, 5, req["json_schema"])
                        pt = sum(count(m["content"]) + 4 for m in msgs)
                        ct = count(json.dumps({str(i): 0 for i in range(1, n + 1)}))
                    _add(sp, cache, cache_key({**ident, **payload}), not sp.estimated, pt, ct)
        result.append(sp)
    finally:
        if cache is not None:
            cache.close()
    for sp in result:
        sp.cost_usd = round(cost_usd(sp.model, sp.prompt_tokens, sp.completion_tokens,
                                     local=local), 4)  # fmt: skip
    return {"stages": [asdict(s) for s in result], "heads": len(heads), "heads_from": source,
            "tokens_by": how, "total_usd": round(sum(s.cost_usd for s in result), 4)}  # fmt: skip


def _add(sp: StagePlan, cache, key: str, exact: bool, prompt_tokens: int, completion: int) -> None:
    sp.requests += 1
    if exact and cache is not None and cache.entry(key) is not None:
        sp.cached += 1
        return
    sp.prompt_tokens += prompt_tokens
    sp.completion_tokens += completion


def format_plan(p: dict[str, Any]) -> str:
    lines = [f"LLM plan for {p['heads']} heads (from {p['heads_from']}; tokens by "
             f"{p['tokens_by']}); nothing was sent:",
             f"{'stage':<9} {'model':<24} {'method':<6} {'requests':>8} {'cached':>7} "
             f"{'prompt tok':>11} {'compl. tok':>11} {'USD':>9}"]  # fmt: skip
    for s in p["stages"]:
        lines.append(
            f"{s['stage']:<9} {s['model'][:24]:<24} {s['method']:<6} {s['requests']:>8} "
            f"{s['cached']:>7} {s['prompt_tokens']:>11} {s['completion_tokens']:>11} "
            f"{s['cost_usd']:>9.4f}" + ("  (estimate: inputs not there yet)" if s["estimated"] else "")
        )  # fmt: skip
    lines.append(f"total: ${p['total_usd']:.4f} (completion tokens are upper bounds)")
    return "\n".join(lines)
