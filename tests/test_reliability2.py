"""Reliability, round two (issue 12): one test per class of failure.

Resume that can get stuck, stage outputs swapped in together, artifacts checked against
their contracts, text shown as text, corpora that are not text, concurrent runs, file
modes. Real files, real parquet, real MLflow SQLite; only a full disk is simulated (an
OSError raised by the parquet writer).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from head_explain import artifacts as art
from head_explain.errors import ArtifactError, DataError
from head_explain.locks import outdir_lock

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ resume
def _row(layer: int, head: int, text: str = "attends to the previous token") -> dict:
    return {"layer": layer, "head": head, "explanation": text, "error": None,
            "explainer_model": "m", "prompt_sha": "s"}  # fmt: skip


def _journal(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / ".explanations.jsonl.partial"
    path.write_bytes(body)
    return path


def test_torn_last_line_of_the_explain_journal_is_dropped_not_fatal(tmp_path):
    good = b"".join(json.dumps(_row(0, h)).encode() + b"\n" for h in range(3))
    for torn in (b'{"layer": 0, "head": 3, "expl', b'{"layer": 0, "head": 3, "explanation": "\xc3'):
        rows, dropped = art.read_partial_jsonl(_journal(tmp_path, good + torn))
        assert [r["head"] for r in rows] == [0, 1, 2] and dropped == 1
    # a complete last line with its newline is kept; an empty journal is no error
    assert art.read_partial_jsonl(_journal(tmp_path, good))[0][-1]["head"] == 2
    assert art.read_partial_jsonl(_journal(tmp_path, b"")) == ([], 0)


def test_damage_before_the_last_journal_line_names_the_file_to_delete(tmp_path):
    lines = [json.dumps(_row(0, h)).encode() for h in range(3)]
    path = _journal(tmp_path, lines[0] + b"\n" + b'{"layer": 0, "he\n' + lines[2] + b"\n")
    with pytest.raises(ArtifactError) as err:
        art.read_partial_jsonl(path)
    assert f"delete {path}" in str(err.value) and "line 2" in str(err.value)


def _tiny_cfg(out: Path, **extra):
    from conftest import TINY_ARGS

    from head_explain import config

    pairs = dict(zip(TINY_ARGS[::2], TINY_ARGS[1::2], strict=True))
    overrides = {k.removeprefix("--").replace("-", "_"): v for k, v in pairs.items()}
    base = config.load_params(REPO / "params.yaml", {"outdir": str(out), "llm_cache": "off"})
    return config.build({**config.to_dict(base), **overrides, **extra})


def test_explain_stage_resumes_past_a_torn_journal(tiny_artifacts, tmp_path, caplog):
    """The explain runner itself: the cut-off last line is dropped and logged, the
    finished heads are reused (no LLM call: both heads are in the journal)."""
    from head_explain import prompts
    from head_explain.runners import explain

    out = tmp_path / "out"
    shutil.copytree(tiny_artifacts, out)
    cfg = _tiny_cfg(out)
    stamp = {
        "explainer_model": explain.explainer_name(cfg),
        "prompt_sha": prompts.load_explain(cfg.explain_prompt).sha,
    }
    body = "".join(json.dumps(_row(*k) | stamp) + "\n" for k in ((8, 7), (17, 5)))
    _journal(out, body.encode() + b'{"layer": 17, "head": 5, "explanation": "caf\xc3')
    with caplog.at_level("WARNING"):
        metrics = explain.run(cfg)
    assert metrics["resumed"] == 2 and metrics["heads"] == 2 and metrics["failed"] == 0
    assert "dropped the cut-off last line" in caplog.text
    rows = art.read_jsonl(out / "explanations.jsonl")
    assert [(r["layer"], r["head"]) for r in rows] == [(8, 7), (17, 5)]


# ------------------------------------------------------------------ all-or-none outputs
def _frames() -> dict[str, pd.DataFrame]:
    """One-row cache outputs whose columns have their contract's kinds."""
    value = {"int": 1, "float": 0.5, "str": "top", "list": [1, 2]}

    def frame(name: str) -> pd.DataFrame:
        cols = art.CONTRACTS[name][1]
        return pd.DataFrame({c: [value[art.COLUMN_KINDS.get(c, "float")]] for c in cols})

    return {
        n: frame(n) for n in ("raw_events.parquet", "head_stats.parquet", "activations.parquet")
    }


def test_a_full_disk_swaps_in_no_output_of_the_stage(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    frames = _frames()
    art.write_parquet_set({tmp_path / n: df for n, df in frames.items()}, {"stage": "cache"})
    before = {n: (tmp_path / n).read_bytes() for n in frames}
    real, calls = pq.write_table, []

    def write_until_disk_full(table, where, *a, **kw):
        calls.append(where)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(table, where, *a, **kw)

    monkeypatch.setattr(pq, "write_table", write_until_disk_full)
    with pytest.raises(OSError):
        art.write_parquet_set({tmp_path / n: df for n, df in frames.items()}, {"stage": "cache"})
    assert {n: (tmp_path / n).read_bytes() for n in frames} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(frames)  # no temp files left


@pytest.mark.slow
def test_cache_stage_on_a_full_disk_leaves_the_old_outputs(tiny_artifacts, tmp_path, monkeypatch):
    """The cache runner (tiny model run): the disk fills while writing activations."""
    import pyarrow.parquet as pq

    from head_explain.runners import cache

    out = tmp_path / "out"
    shutil.copytree(tiny_artifacts, out)
    names = ("raw_events.parquet", "head_stats.parquet", "activations.parquet")
    before = {n: (out / n).read_bytes() for n in names}
    real = pq.write_table

    def disk_full_on_activations(table, where, *a, **kw):
        if ".activations.parquet." in str(where):
            raise OSError(28, "No space left on device")
        return real(table, where, *a, **kw)

    monkeypatch.setattr(pq, "write_table", disk_full_on_activations)
    with pytest.raises(OSError, match="No space left"):
        cache.run(_tiny_cfg(out))
    assert {n: (out / n).read_bytes() for n in names} == before


def test_outputs_of_two_runs_are_refused_as_a_set(tmp_path):
    frames = _frames()
    art.write_parquet_set({tmp_path / n: df for n, df in frames.items()}, {"stage": "cache"})
    art.check_same_run([tmp_path / n for n in frames])
    art.write_parquet(tmp_path / "activations.parquet", frames["activations.parquet"], {})
    with pytest.raises(ArtifactError, match="come from different runs of 'cache'"):
        art.check_same_run([tmp_path / n for n in frames])


# ------------------------------------------------------------------ contracts on read
def _corrupt_pages(path: Path) -> None:
    """Overwrite the data pages, keep the footer: read_schema works, reading fails."""
    data = bytearray(path.read_bytes())
    footer_len = int.from_bytes(data[-8:-4], "little")
    end = len(data) - 8 - footer_len
    data[4:end] = bytes(len(data[4:end]))
    path.write_bytes(bytes(data))


def test_parquet_with_intact_footer_and_corrupt_pages_is_an_artifact_error(tmp_path):
    frames = _frames()
    path = tmp_path / "raw_events.parquet"
    art.write_parquet(path, frames["raw_events.parquet"], {"stage": "cache"})
    _corrupt_pages(path)
    art.read_meta(path)  # the footer still reads
    with pytest.raises(ArtifactError, match="raw_events.parquet is damaged"):
        art.read_parquet(path)
    with pytest.raises(ArtifactError, match="is damaged"):
        art.check_parquet(path, full=True)


def test_a_column_of_the_wrong_type_is_refused(tmp_path):
    df = _frames()["head_stats.parquet"].assign(layer=["zero"])
    art.write_parquet(tmp_path / "head_stats.parquet", df, {"stage": "cache"})
    with pytest.raises(
        ArtifactError, match="column 'layer' has type (large_)?string, expected int"
    ):
        art.read_parquet(tmp_path / "head_stats.parquet")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"[1, 2]\n", "is a JSON list, not an object"),
        (b'{"layer": 0, "head": 1}\n', "field 'explanation' is None, expected str"),
        (b'{"layer": 0, "head": 1, "explanation": "caf\xe9", "error": null}\n', "is not UTF-8"),
        (b"", "holds no rows"),
        (b'{"layer": "0", "head": 1, "explanation": "x", "error": null}\n', "field 'layer'"),
    ],
    ids=["array", "missing-field", "not-utf8", "empty", "wrong-type"],
)
def test_explanations_jsonl_against_its_contract(tmp_path, body, fragment):
    path = tmp_path / "explanations.jsonl"
    path.write_bytes(body)
    with pytest.raises(ArtifactError, match=fragment.replace("(", r"\(")):
        art.read_jsonl(path)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [("{not json", "is not valid JSON"), ("[]", "is a JSON list, expected an object")],
    ids=["not-json", "empty-list"],
)
def test_clusters_json_against_its_contract(tmp_path, body, fragment):
    (tmp_path / "clusters.json").write_text(body)
    with pytest.raises(ArtifactError, match=fragment):
        art.read_json(tmp_path / "clusters.json")


# ------------------------------------------------------------------ text in, text out
def test_tokens_show_the_text_they_cover(smol_tokenizer):
    from head_explain.token_display import display_tokens

    text = "Café — naïve 日本語 😀 and “quotes”"
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in smol_tokenizer.decode([i]) for i in ids)  # the bug's premise
    shown = display_tokens(smol_tokenizer, ids)
    assert len(shown) == len(ids) and "".join(shown) == text
    assert not any("\ufffd" in s for s in shown)
    # an excerpt cut inside a character shows escapes, never the replacement character
    cut = display_tokens(smol_tokenizer, ids[1:-1])
    assert not any("\ufffd" in s for s in cut)


def test_select_renders_excerpts_through_display_tokens(smol_tokenizer):
    import numpy as np

    from head_explain.select import SelectSettings, attach_excerpts
    from head_explain.token_display import display_tokens

    ids = smol_tokenizer("Le café était très bon — vraiment", add_special_tokens=False)["input_ids"]
    windows = pd.DataFrame({"window_id": [0], "tokens": [np.array([0, *ids])]})
    acts = pd.DataFrame({"layer": [0], "head": [0], "window_id": [0],
                         "acts": [np.zeros(len(ids) + 1)]})  # fmt: skip
    events = pd.DataFrame({"layer": [0], "head": [0], "window_id": [0], "pos": [len(ids) - 1],
                           "src_pos": [[1]], "act": [1.0], "split": ["explain"]})  # fmt: skip
    s = SelectSettings(topk=1, explain_examples=1, score_top_examples=0,
                       score_random_examples=0, excerpt_len=64)  # fmt: skip
    ev = attach_excerpts(events, windows, acts, lambda t: display_tokens(smol_tokenizer, t), s)
    assert "".join(ev.excerpt_tokens[0]) == "Le café était très bon — vraiment"


# ------------------------------------------------------------------ non-text corpora
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4


def _zip_with(path: Path, entries: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)


def _patch_entry(path: Path, name: str, *, flag: int | None = None, method: int | None = None):
    """Set an entry's flag bits / compression method in its local and central headers
    (zipfile cannot write encrypted entries or foreign methods itself)."""
    data = bytearray(path.read_bytes())
    enc = name.encode()
    for sig, flag_at, method_at, name_at in ((b"PK\x03\x04", 6, 8, 30), (b"PK\x01\x02", 8, 10, 46)):
        i = data.find(sig)
        while i >= 0:
            if data[i + name_at : i + name_at + len(enc)] == enc:
                if flag is not None:
                    data[i + flag_at : i + flag_at + 2] = flag.to_bytes(2, "little")
                if method is not None:
                    data[i + method_at : i + method_at + 2] = method.to_bytes(2, "little")
            i = data.find(sig, i + 4)
    path.write_bytes(bytes(data))


def test_stackexchange_zip_skips_non_text_encrypted_and_unsupported_entries(tmp_path, caplog):
    from head_explain.data.stackexchange import iter_zip

    path = tmp_path / "coffee.stackexchange.zip"
    text = "Q: grind? A: medium-fine, about like table salt. " * 10
    _zip_with(path, {"a_1.txt": text.encode(), "logo.png": PNG, "b_2.txt": b"secret " * 20,
                     "c_3.txt": b"deflate64 " * 20, "d_4.txt": "ü".encode("latin-1") * 50})  # fmt: skip
    _patch_entry(path, "b_2.txt", flag=0x1)
    _patch_entry(path, "c_3.txt", method=9)
    with caplog.at_level("WARNING"):
        docs = list(iter_zip(path))
    assert [d.doc_id for d in docs] == ["coffee.stackexchange/a_1.txt"]
    log = caplog.text
    assert "skipped 2 entries" in log and "logo.png" in log and "d_4.txt" in log
    assert "encrypted" in log and "b_2.txt" in log
    assert "unsupported compression method 9" in log and "c_3.txt" in log


def test_jsonl_corpus_with_a_bom_is_read(tmp_path):
    from head_explain.data.files import iter_jsonl

    path = tmp_path / "c.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "first document"}).encode() + b"\n")
    assert [d.text for d in iter_jsonl(str(path))] == ["first document"]


def test_deeply_nested_jsonl_line_is_a_data_error(tmp_path):
    from head_explain.data.files import iter_jsonl

    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match="deep.jsonl' line 1: JSON nested too deeply"):
        list(iter_jsonl(str(path)))


# ------------------------------------------------------------------ concurrency, modes
@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_artifacts_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        art.write_text(tmp_path / "a.txt", "x")
        art.write_parquet(tmp_path / "b.parquet", pd.DataFrame({"a": [1]}), {})
    finally:
        os.umask(old)
    for name in ("a.txt", "b.parquet"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_second_run_into_a_held_outdir_is_refused(tmp_path):
    from head_explain.errors import ConfigError

    held = outdir_lock(tmp_path / "out")
    with held, pytest.raises(ConfigError, match="is in use by another head-explain run"):  # noqa: SIM117
        with outdir_lock(tmp_path / "out"):
            pass
    assert not (tmp_path / "out").exists()  # made for the lock only: removed again
    with outdir_lock(tmp_path / "out"):  # released
        pass


def test_a_killed_run_does_not_hold_the_outdir(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from head_explain.locks import outdir_lock
        with outdir_lock({str(tmp_path / "out")!r}):
            print("held", flush=True)
            time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"held"
    from head_explain.errors import ConfigError

    with pytest.raises(ConfigError), outdir_lock(tmp_path / "out"):
        pass
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with outdir_lock(tmp_path / "out"):  # the kernel dropped the dead run's lock
        pass


@pytest.mark.slow
def test_concurrent_first_use_of_the_mlflow_store(tmp_path):
    """Three processes create the same fresh mlflow.db and experiment at once."""
    code = textwrap.dedent("""
        import sys, time
        from head_explain import tracking
        tracking._quiet()
        from mlflow.tracking import MlflowClient
        uri = sys.argv[1]
        while time.time() < float(sys.argv[2]):
            time.sleep(0.01)
        with tracking.store_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            print(tracking._experiment_id(client, "race", uri))
    """)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    start = str(time.time() + 8)  # all three past their imports, then go together
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, start], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]  # fmt: skip
    results = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert len({out.strip() for out, _ in results}) == 1  # one experiment


@pytest.mark.slow
def test_concurrent_first_use_converts_the_bundled_model_once(tmp_path):
    """Two processes first use the bundled model at once, into an empty cache (a fresh
    machine's `dvc exp run --queue -j 2`): one converts it, the other waits and loads it.
    Before the lock both converted, and the second's rename met the first's folder."""
    code = textwrap.dedent("""
        import logging, sys, time
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        from transformers import AutoConfig
        from head_explain.bundled_models import hf_dir
        while time.time() < float(sys.argv[1]):
            time.sleep(0.01)
        path = hf_dir("smollm2-135m-instruct")
        AutoConfig.from_pretrained(path)  # whole: the other process deleted nothing
        print(path)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"),
           "HEAD_EXPLAIN_CACHE": str(tmp_path / "cache")}  # fmt: skip
    start = str(time.time() + 8)  # both past their imports, then go together
    procs = [subprocess.Popen([sys.executable, "-c", code, start], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-2000:]
    assert len({out.strip() for out, _ in results}) == 1
    logs = "".join(err for _, err in results)
    assert logs.count("converting the bundled smollm2-135m-instruct") == 1, logs[-3000:]
    left = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())
    assert [n for n in left if ".tmp" in n] == [], left  # no half-made folder left behind
