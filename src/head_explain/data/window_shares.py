"""How many windows each corpus source owes the sample, and the error that says what fits
when the sources are too small (the sampler's capacity arithmetic, kept apart from the
streaming and tokenizing in windows.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from head_explain.errors import DataError

if TYPE_CHECKING:
    from head_explain.config import Config


def source_shares(windows: int, n_sources: int) -> list[int]:
    """Windows per source: equal counts, the remainder to the first sources."""
    return [windows // n_sources + (1 if i < windows % n_sources else 0) for i in range(n_sources)]


def max_balanced_windows(n_sources: int, capacities: dict[int, int], upper: int) -> int:
    """Largest `windows` <= upper whose balanced shares fit the capped sources."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        shares = source_shares(mid, n_sources)
        if all(shares[i] <= cap for i, cap in capacities.items()):
            lo = mid
        else:
            hi = mid - 1
    return lo


def too_small_error(cfg: Config, sources: list[str], short: dict[int, int]) -> DataError:
    best = max_balanced_windows(len(sources), short, cfg.windows)
    hint = f"lower 'windows' to at most {best}, lower 'window_len' or add sources"
    if best == 0:  # "at most 0" is no advice: not one window fits
        hint = (
            f"no document holds a window of {cfg.window_len} tokens; lower 'window_len' "
            "or add longer documents or sources"
        )
    if len(sources) == 1:
        return DataError(
            f"sources '{sources[0]}' give only {short[0]} windows of {cfg.window_len} "
            f"tokens; {hint}"
        )
    shares = source_shares(cfg.windows, len(sources))
    parts = "; ".join(
        f"source '{sources[i]}' gives only {got} windows of {cfg.window_len} tokens but "
        f"its share of windows={cfg.windows} balanced over '{cfg.sources}' is {shares[i]}"
        for i, got in short.items()
    )
    return DataError(f"{parts}; {hint}")
