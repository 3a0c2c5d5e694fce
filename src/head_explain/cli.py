"""`head-explain`: flags -> config -> the same stage functions DVC runs, into --outdir.

Every config field is a flag (`--window-len` for `window_len`); `--params FILE` reads a
flat params.yaml first and flags override it. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from head_explain import config as config_mod
from head_explain.errors import ArtifactError, HeadExplainError

log = logging.getLogger("head_explain")

SKIPS = {
    "skip_cache": ("sample", "head_types", "cache"),
    "skip_explain": ("explain",),
    "skip_simulate": ("simulate",),
    "skip_cluster": ("cluster",),
}


STAGE_NAMES = (
    "sample",
    "head_types",
    "cache",
    "select",
    "explain",
    "simulate",
    "cluster",
    "report",
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's own code)
        flags = [a for a in self._option_string_actions if a.startswith("--")]
        hint = ""
        if "unrecognized arguments" in message:
            import difflib

            bad = message.split(":", 1)[1].split()[0].split("=")[0]
            close = difflib.get_close_matches(bad, flags, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
        sys.stderr.write(f"head-explain: error: {message}{hint}\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="head-explain",
        description="Explain, simulate, score and cluster the attention heads of a language model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--params", help="Flat params.yaml to start from (flags override it).")
    for name, fld in config_mod.FIELDS.items():
        type_name = fld.type if isinstance(fld.type, str) else fld.type.__name__
        kind = {"int": int, "float": float}.get(type_name, str)
        choices = fld.metadata.get("choices")
        p.add_argument(
            f"--{name.replace('_', '-')}", dest=name, type=kind, default=None,
            choices=choices, help=f"{fld.metadata['doc']} [default: {fld.default!r}]",
        )  # fmt: skip
    for flag in SKIPS:
        p.add_argument(f"--{flag.replace('_', '-')}", action="store_true",
                       help=f"Reuse the existing {'/'.join(SKIPS[flag])} artifacts.")  # fmt: skip
    p.add_argument("--until", choices=STAGE_NAMES, help="Stop after this stage.")
    p.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    return p


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Libraries stay at WARNING unless asked; their deprecation chatter is not ours.
    for name in ("transformers", "transformer_lens", "httpx", "urllib3", "mlflow", "alembic",
                 "sentence_transformers", "datasets", "filelock", "huggingface_hub"):  # fmt: skip
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    logging.getLogger("head_explain").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        warnings.filterwarnings("ignore")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except Exception:  # transformers missing: nothing to quieten
            pass


def check_skipped(cfg, stage: str) -> None:
    """A skipped stage's artifacts must exist and belong to this model/params."""
    from head_explain import artifacts as art
    from head_explain import pipeline

    if stage == "cache":
        pipeline.check_cache_artifacts(cfg)
        return
    if stage in ("sample", "head_types"):
        return  # covered by cache's check (sample_hash); cache read head_types.parquet
    for name in pipeline.OUTPUTS[stage]:
        path = pipeline.out(cfg, name)
        if not path.exists():
            raise ArtifactError(f"--skip-{stage}: {path} is missing; run without --skip-{stage}")
    if stage == "explain":
        rows = art.read_jsonl(pipeline.out(cfg, "explanations.jsonl"))
        if rows and rows[0].get("explainer_model") not in (None, _explainer(cfg)):
            raise ArtifactError(
                f"--skip-explain: explanations.jsonl was written by {rows[0]['explainer_model']!r},"
                f" not {_explainer(cfg)!r}; run without --skip-explain"
            )
    if stage == "simulate":
        art.read_parquet(pipeline.out(cfg, "scores.parquet"), {"model": cfg.model})


def _explainer(cfg) -> str:
    from head_explain.models import BUNDLED

    return BUNDLED if cfg.llm == "embedded" else cfg.openai_model


def run(cfg, skipped: set[str], until: str | None = None) -> dict[str, float]:
    from head_explain import pipeline

    if until:
        skipped = skipped | set(pipeline.STAGES[pipeline.STAGES.index(until) + 1 :])
        later = set(pipeline.STAGES[pipeline.STAGES.index(until) + 1 :])
    else:
        later = set()
    to_run = [s for s in pipeline.STAGES if s not in skipped]
    pipeline.preflight(cfg, to_run)
    for stage in pipeline.STAGES:
        if stage in skipped and stage not in later:
            check_skipped(cfg, stage)
    times: dict[str, float] = {}
    for stage in pipeline.STAGES:
        if stage in later:
            break
        if stage in skipped:
            log.info("stage %s: skipped, reusing its artifacts", stage)
            continue
        times[stage] = pipeline.run_stage(cfg, stage)["seconds"]
    return times


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    overrides = {k: v for k, v in vars(args).items() if k in config_mod.FIELDS and v is not None}
    skipped = {stage for flag, stages in SKIPS.items() if getattr(args, flag) for stage in stages}
    t0 = time.time()
    try:
        if args.params:
            cfg = config_mod.load_params(args.params, overrides)
        else:
            cfg = config_mod.build(overrides)
        times = run(cfg, skipped, args.until)
    except HeadExplainError as exc:
        sys.stderr.write(f"head-explain: error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("head-explain: interrupted; finished work is kept and reused on rerun\n")
        return 130
    summary = ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
    log.info(
        "done in %.1fs (%s); artifacts in %s", time.time() - t0, summary, Path(cfg.outdir).resolve()
    )
    report = Path(cfg.outdir) / "report.md"
    if "report" in times:
        print(f"report: {report.resolve()}")
    return 0


def stage_main(stage: str, params: str = "params.yaml") -> None:
    """Entry of `stages/<stage>.py` under DVC: params.yaml -> one stage."""
    from head_explain import pipeline

    verbose = "--verbose" in sys.argv or "-v" in sys.argv
    setup_logging(verbose)
    try:
        cfg = config_mod.load_params(params)
        pipeline.preflight(cfg, [stage])
        pipeline.run_stage(cfg, stage)
    except HeadExplainError as exc:
        sys.stderr.write(f"head-explain {stage}: error: {exc}\n")
        raise SystemExit(exc.exit_code) from None
