"""`head-explain`: flags -> config -> the same stage functions DVC runs, into --outdir.

Every config field is a flag (`--window-len` for `window_len`); `--params FILE` reads a
flat params.yaml first and flags override it. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from head_explain import config as config_mod
from head_explain.errors import HeadExplainError
from head_explain.graph import STAGES
from head_explain.logs import setup_logging

log = logging.getLogger("head_explain")

SKIPS = {
    "skip_cache": ("sample", "cache"),
    "skip_explain": ("explain",),
    "skip_simulate": ("simulate",),
    "skip_cluster": ("cluster",),
}


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
    p.add_argument("--until", choices=STAGES, help="Stop after this stage.")
    p.add_argument("--verbose", "-v", action="store_true", help="Debug logging.")
    return p


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
        from head_explain import pipeline  # after parsing: --help stays fast

        times = pipeline.run(cfg, skipped, args.until)
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
