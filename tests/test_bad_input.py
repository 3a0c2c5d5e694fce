"""Bad input to `head-explain`: exit 2, one line naming the input and what is valid.

Every case runs the CLI from a temp folder (in-process through `cli.main`, or as the
real console script where its exit status, stderr or start-up time is the point) and
checks that nothing there was written: the outdir is neither created nor changed,
whatever the stage at which the input is found to be bad.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import zstandard
from helpers import head_explain_command

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
BUNDLED = "smollm2-135m-instruct"
ERROR = "head-explain: error: "
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) \S+: ")


def _command() -> list[str]:
    return head_explain_command()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        HEAD_EXPLAIN_PROGRESS="0", MLFLOW_ENABLE_TELEMETRY="false", DO_NOT_TRACK="1",
    )  # fmt: skip
    env.update(extra)
    return env


def snapshot(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every path under `root` -> (is_dir, mtime_ns, size)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (p.is_dir(), st.st_mtime_ns, st.st_size)
    return out


class Run:
    def __init__(self, code: int, stdout: str, stderr: str, seconds: float = 0.0):
        self.code, self.stdout, self.stderr, self.seconds = code, stdout, stderr, seconds


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    """`cli(*args, params=PARAMS, in_subprocess=False)`: run head-explain in `tmp_path`.

    In-process (`cli.main`, stderr from capsys) by default: one import of torch and one
    tokenizer load for the whole file. `in_subprocess=True` runs the real console script,
    for the cases where its exit status, log lines or start-up time matter. Either way
    the run must leave every file under `tmp_path` as it was.
    """
    from head_explain import cli as cli_mod

    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("OPENAI_")]:
        monkeypatch.delenv(key)
    # setup_logging sets process-wide warning filters and library log levels.
    monkeypatch.setattr(cli_mod, "setup_logging", lambda verbose: None)

    def call(*args: str, params: Path | None = PARAMS, in_subprocess: bool = False) -> Run:
        base = ["--params", str(params)] if params else []
        argv = [*base, "--outdir", str(tmp_path / "out"), "--llm-cache", "off", *args]
        before = snapshot(tmp_path)
        capsys.readouterr()
        t0 = time.time()
        if in_subprocess:
            proc = subprocess.run(
                [*_command(), *argv], cwd=tmp_path, env=_env(), capture_output=True,
                text=True, timeout=300,
            )  # fmt: skip
            run = Run(proc.returncode, proc.stdout, proc.stderr, time.time() - t0)
        else:
            try:
                code = cli_mod.main(argv)
            except SystemExit as exc:  # argparse's own errors
                code = exc.code
            out, err = capsys.readouterr()
            run = Run(code, out, err, time.time() - t0)
        after = snapshot(tmp_path)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"files written or changed: {changed}\nstderr:\n{run.stderr}"
        return run

    return call


def assert_user_error(run: Run, *fragments: str, preflight: bool = True) -> str:
    """Exit 2, no traceback, one error line that names `fragments`; returns the line.

    preflight: the input was refused before any stage started, so stderr is that one
    line. Otherwise (corrupt data found while sampling) only log records precede it.
    """
    assert run.code == 2, f"exit {run.code}\nstderr:\n{run.stderr}"
    assert "Traceback" not in run.stderr, run.stderr
    lines = run.stderr.splitlines()
    assert lines, "no message on stderr"
    errors = [line for line in lines if line.startswith(ERROR)]
    assert len(errors) == 1 and lines[-1] == errors[0], run.stderr
    if preflight:
        assert lines == errors, f"more than one line on stderr:\n{run.stderr}"
    else:
        others = [line for line in lines[:-1] if not LOG_LINE.match(line)]
        assert not others, f"stray stderr lines: {others}"
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    return errors[0]


# ------------------------------------------------------------------ config and flags
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ["--sources", "pydocs,reddit"],
            ["key 'sources'", "unknown source 'reddit'", "valid: pydocs, wikitext, stackexchange, files"],
        ),
        (["--topk", "0"], ["key 'topk': 0 must be a positive integer"]),
        (["--max-heads", "0"], ["key 'max_heads': 0 must be a positive integer"]),
        (["--max-heads", "-3"], ["key 'max_heads': -3 must be a positive integer"]),
        (["--windows", "-5"], ["key 'windows': -5 must be a positive integer"]),
        (["--topkk", "3"], ["unrecognized arguments: --topkk", "(did you mean --topk?)"]),
        (["--heads", "L3-H2"], ["key 'heads': 'L3-H2' is not a head name like L17H3"]),
        (
            ["--model", BUNDLED, "--heads", "L0H0,L99H0"],
            ["key 'heads': L99H0 does not exist", "layers 0-29", "heads 0-8"],
        ),
        (["--windows", "many"], ["--windows", "invalid int value: 'many'"]),
        (["--device", "tpu"], ["--device", "invalid choice: 'tpu'", "cpu", "cuda"]),
        (
            ["--sources", "stackexchange", "--stackexchange-dir", ""],
            ["key 'stackexchange_dir': empty", "EleutherAI/stackexchange-dataset"],
        ),
        (
            ["--sources", "files", "--data-files", "notes.docx"],
            ["key 'data_files'", "'notes.docx'", "valid: .txt, .jsonl, .parquet"],
        ),
        (
            ["--sources", "files", "--data-files", "missing.txt"],
            ["key 'data_files'", "'missing.txt' does not exist"],
        ),
    ],
    ids=[
        "unknown-source", "topk-0", "max-heads-0", "max-heads-negative", "windows-negative",
        "misspelled-flag", "head-name-syntax", "head-not-in-model", "not-an-int", "bad-choice",
        "stackexchange-dir-empty-string", "data-files-extension", "data-files-missing",
    ],
)  # fmt: skip
def test_bad_value_or_flag(cli, args, fragments):
    assert_user_error(cli(*args), *fragments)


def test_a_head_not_in_the_model_on_a_fresh_machine_converts_nothing(tmp_path):
    """Checking --heads needs the model's shape. Before its first conversion that comes
    from the GGUF's metadata: the one error line, no progress bars before it, and nothing
    written to the (empty) model cache."""
    cache = tmp_path / "cache"
    cache.mkdir()
    argv = ["--params", str(PARAMS), "--outdir", str(tmp_path / "out"), "--llm-cache", "off",
            "--model", BUNDLED, "--heads", "L99H0"]  # fmt: skip
    proc = subprocess.run([*_command(), *argv], cwd=tmp_path, capture_output=True, text=True,
                          env=_env(HEAD_EXPLAIN_CACHE=str(cache)), timeout=300)  # fmt: skip
    run = Run(proc.returncode, proc.stdout, proc.stderr)
    assert_user_error(run, "key 'heads': L99H0 does not exist", "layers 0-29", "heads 0-8")
    assert list(tmp_path.iterdir()) == [cache] and not any(cache.iterdir())


def test_misspelled_flag_from_the_console_script(cli):
    run = cli("--topkk", "3", in_subprocess=True)
    assert_user_error(run, "unrecognized arguments: --topkk", "(did you mean --topk?)")


def test_unknown_params_key(cli, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text() + "topkk: 3\n")
    line = assert_user_error(cli(params=params), "unknown key 'topkk'", "(did you mean 'topk'?)")
    assert "valid keys: model, device" in line and "outdir" in line


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("topk: [1, 2\nwindows: 3\n", "is not valid YAML at line 2"),
        ("- topk\n- windows\n", "must be a mapping of key: value"),
        ("windows: lots\n", "key 'windows': value 'lots' is not a valid int"),
    ],
    ids=["not-yaml", "not-a-mapping", "wrong-type"],
)
def test_params_file_not_usable(cli, tmp_path, text, fragment):
    params = tmp_path / "bad-params.yaml"
    params.write_text(text)
    line = assert_user_error(cli(params=params), fragment)
    if "params file" in fragment or "YAML" in fragment:
        assert "bad-params.yaml" in line


def test_params_file_missing(cli, tmp_path):
    assert_user_error(
        cli(params=tmp_path / "nope.yaml"), "params file", "nope.yaml' does not exist"
    )


# ------------------------------------------------------------------ model and device
def test_unknown_model_fails_fast_offline(cli):
    run = cli("--model", "no-such/model-xyz", in_subprocess=True)
    assert_user_error(run, "key 'model'", "'no-such/model-xyz'", f"--model {BUNDLED}")
    assert run.seconds < 60, f"took {run.seconds:.0f}s to refuse an unknown model offline"


def test_window_len_over_the_model_context(cli):
    assert_user_error(
        cli("--model", BUNDLED, "--window-len", "9000"),
        "key 'window_len': 9000 exceeds",
        f"{BUNDLED}'s context of 8192",
        "use at most 8192",
    )


def test_cuda_without_a_gpu(cli):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here")
    assert_user_error(
        cli("--model", BUNDLED, "--device", "cuda"),
        "key 'device': 'cuda'",
        "no CUDA GPU",
        "use cpu",
    )


def test_dtype_the_device_cannot_run(cli):
    assert_user_error(
        cli("--model", BUNDLED, "--device", "cpu", "--dtype", "float16"),
        "key 'dtype': float16",
        "on cpu",
        "float32 or bfloat16",
    )


# ------------------------------------------------------------------ LLM endpoint
def test_openai_without_api_key_fails_before_any_work(cli):
    run = cli("--model", BUNDLED, "--llm", "openai", in_subprocess=True)
    assert_user_error(run, "OPENAI_API_KEY", "--llm embedded")
    assert "stage" not in run.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_base_url_that_does_not_answer(cli):
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    run = cli("--model", BUNDLED, "--llm", "openai", "--openai-base-url", url)
    assert_user_error(run, f"openai_base_url '{url}'", "does not answer", "--llm embedded")
    assert run.seconds < 60


# ------------------------------------------------------------------ outdir
@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_outdir_not_writable(tmp_path, where):
    # Tests run as root, which chmod cannot lock out: a regular file in the path can.
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file\n")
    outdir = blocker / "out" if where == "under-a-file" else blocker
    before = snapshot(tmp_path)
    proc = subprocess.run(
        [*_command(), "--params", str(PARAMS), "--outdir", str(outdir), "--llm-cache", "off"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert snapshot(tmp_path) == before
    assert_user_error(
        Run(proc.returncode, proc.stdout, proc.stderr),
        "key 'outdir'",
        f"'{outdir}'",
        "is a file",
        "folder",
    )


# ------------------------------------------------------------------ corpus
def test_stackexchange_dir_missing(cli):
    assert_user_error(
        cli("--sources", "stackexchange", "--stackexchange-dir", "no-such-dir"),
        "key 'stackexchange_dir': 'no-such-dir' is not a folder",
        "EleutherAI/stackexchange-dataset",
    )


def test_stackexchange_dir_empty(cli, tmp_path):
    (tmp_path / "dump").mkdir()
    assert_user_error(
        cli("--sources", "stackexchange", "--stackexchange-dir", "dump"),
        "key 'stackexchange_dir': 'dump' holds no .zip, .txt or .jsonl.zst files",
        "<site>.zip",
    )


def _stackexchange_entries() -> list[str]:
    return [
        f"Q: How fine should I grind beans for a {kind}? A: " + "Medium-fine grind. " * 40
        for kind in ("moka pot", "french press", "pour-over", "espresso", "cold brew")
    ]


def test_stackexchange_corrupt_zip(cli, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    good = dump / "coffee.stackexchange.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, text in enumerate(_stackexchange_entries()):
            zf.writestr(f"coffee.stackexchange_{i}.txt", text)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # cut short, as by an interrupted download
    line = assert_user_error(  # a subprocess: only log records may precede the error
        cli("--sources", "stackexchange", "--stackexchange-dir", "dump", in_subprocess=True),
        "coffee.stackexchange.zip'",
        "is not a valid zip archive",
        preflight=False,
    )
    assert "dump" in line


def test_stackexchange_corrupt_jsonl_zst(cli, tmp_path):
    dump = tmp_path / "dump"
    dump.mkdir()
    rows = "".join(
        json.dumps({"text": t, "meta": {"name": f"coffee.stackexchange_{i}"}}) + "\n"
        for i, t in enumerate(_stackexchange_entries())
    )
    blob = zstandard.ZstdCompressor().compress(rows.encode())
    (dump / "data_0_time1700000000_coffee.stackexchange.jsonl.zst").write_bytes(
        blob[: len(blob) // 2]
    )
    assert_user_error(
        cli("--sources", "stackexchange", "--stackexchange-dir", "dump"),
        "data_0_time1700000000_coffee.stackexchange.jsonl.zst'",
        "is not a valid zstd stream",
        preflight=False,
    )


def test_corpus_with_no_window(cli, tmp_path):
    (tmp_path / "tiny.txt").write_text("A corpus of one short sentence.\n")
    assert_user_error(
        cli("--sources", "files", "--data-files", "tiny.txt"),
        "sources 'files' give only 0 windows of 64 tokens",
        "lower 'window_len'",
        preflight=False,
    )


def test_corpus_smaller_than_windows_times_window_len(cli, tmp_path):
    words = " ".join(f"item{i} costs {i * 7 % 97} coins." for i in range(150))
    (tmp_path / "small.txt").write_text(words + "\n")
    line = assert_user_error(
        cli("--sources", "files", "--data-files", "small.txt"),
        "sources 'files' give only",
        "windows of 64 tokens",
        preflight=False,
    )
    got = int(re.search(r"give only (\d+) windows", line).group(1))
    assert 0 < got < 160
    assert f"lower 'windows' to at most {got}" in line


# ------------------------------------------------------------------ skip flags
def _fake_cache_artifacts(outdir: Path, **params) -> None:
    """Sample + cache artifacts (no rows) stamped as the pipeline stamps them."""
    from head_explain import artifacts as art
    from head_explain import config
    from head_explain.pipeline import OUTPUTS, STAGE_PARAMS

    cfg = config.load_params(PARAMS, {"outdir": str(outdir), "llm_cache": "off", **params})
    sample_hash = config.config_hash(cfg, STAGE_PARAMS["sample"])
    cache_meta = {
        "stage": "cache", "model": cfg.model, "sample_hash": sample_hash,
        "config_hash": config.config_hash(cfg, STAGE_PARAMS["cache"]),
    }  # fmt: skip
    sample_meta = {"stage": "sample", "model": cfg.model, "config_hash": sample_hash}

    def empty(name: str) -> pd.DataFrame:
        return pd.DataFrame({c: [] for c in art.CONTRACTS[name][1]})

    art.write_parquet(outdir / "windows.parquet", empty("windows.parquet"), sample_meta)
    art.write_parquet_set({outdir / n: empty(n) for n in OUTPUTS["cache"]}, cache_meta)
    types_meta = {
        "stage": "head_types", "model": cfg.model,
        "config_hash": config.config_hash(cfg, STAGE_PARAMS["head_types"]),
    }  # fmt: skip
    art.write_parquet(outdir / "head_types.parquet", empty("head_types.parquet"), types_meta)


def test_skip_cache_with_missing_artifacts(cli):
    assert_user_error(
        cli("--skip-cache"),
        "--skip-cache:",
        "windows.parquet is missing",
        "run without --skip-cache",
    )


def test_skip_cache_with_artifacts_made_with_other_windows(cli, tmp_path):
    _fake_cache_artifacts(tmp_path / "out", windows=41)
    assert_user_error(
        cli("--skip-cache"),
        "--skip-cache:",
        "windows.parquet was made with other sample params",
        "windows, window_len",
        "run without --skip-cache",
    )


def test_skip_cache_with_a_corrupt_artifact(cli, tmp_path):
    _fake_cache_artifacts(tmp_path / "out")
    (tmp_path / "out" / "raw_events.parquet").write_bytes(b"PAR1 not really parquet")
    assert_user_error(
        cli("--skip-cache"),
        "--skip-cache:",
        "raw_events.parquet is not a readable parquet file",
        "run without --skip-cache",
    )


def test_skip_cache_with_artifacts_of_another_model(cli, tmp_path):
    _fake_cache_artifacts(tmp_path / "out", model="gpt2")
    assert_user_error(
        cli("--skip-cache"),
        "windows.parquet was made with model 'gpt2', not 'smollm2-135m-instruct'",
        "run without --skip-cache",
    )


def test_skip_explain_with_missing_explanations(cli):
    assert_user_error(
        cli("--skip-explain"),
        "--skip-explain:",
        "explanations.jsonl is missing",
        "run without --skip-explain",
    )


def test_skip_explain_after_cache_with_missing_explanations(cli, tmp_path):
    _fake_cache_artifacts(tmp_path / "out")
    assert_user_error(
        cli("--skip-cache", "--skip-explain"),
        "--skip-explain:",
        "explanations.jsonl is missing",
        "run without --skip-explain",
    )


def test_unknown_embedding_model_is_refused_before_any_stage(tmp_path, capsys, monkeypatch):
    from head_explain.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    code = main(["--params", str(REPO / "params.yaml"), "--outdir", str(out),
                 "--embedding-model", "no-such/embedder-xyz"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert (
        "key 'embedding_model': 'no-such/embedder-xyz'" in err[0] and "all-MiniLM-L6-v2" in err[0]
    )
    assert not out.exists()


# ------------------------------------------------------------------ round two (issue 12)
@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--seed", "-1"], ["key 'seed': -1 must be an integer from 0"]),
        (["--llm-timeout-s", "nan"], ["key 'llm_timeout_s': nan must be a finite number"]),
        (["--llm-timeout-s", "inf"], ["key 'llm_timeout_s': inf must be a finite number"]),
        (["--mlflow-experiment", ""], ["key 'mlflow_experiment': empty"]),
        (["--mlflow-experiment", "  "], ["key 'mlflow_experiment': empty"]),
        (["--outdir", ""], ["key 'outdir': empty"]),
        (["--llm-max-retries", "-1"], ["key 'llm_max_retries': -1 must be >= 0"]),
        (["--explain-max-tokens", "0"], ["key 'explain_max_tokens': 0 must be a positive"]),
    ],
    ids=["seed-negative", "timeout-nan", "timeout-inf", "experiment-empty", "experiment-blank",
         "outdir-empty", "retries-negative", "max-tokens-0"],
)  # fmt: skip
def test_values_that_used_to_fail_late(cli, args, fragments):
    assert_user_error(cli(*args), *fragments)


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda p: p.mkdir(), "is not a file"),
        (lambda p: p.write_bytes(b"model: caf\xe9\n"), "is not UTF-8 text"),
        (lambda p: p.write_text("topk: 3\nwindows: 4\ntopk: 5\n"), "key 'topk' is given twice"),
    ],
    ids=["folder", "not-utf8", "duplicate-key"],
)
def test_params_file_that_used_to_crash_or_pass(cli, tmp_path, make, fragment):
    params = tmp_path / "p.yaml"
    make(params)
    assert_user_error(cli(params=params), "params file", "p.yaml", fragment)


@pytest.mark.parametrize(
    ("uri", "fragments"),
    [
        ("ftp://example.org/mlruns", ["MLFLOW_TRACKING_URI", "scheme 'ftp' is not supported"]),
        (None, ["MLFLOW_TRACKING_URI", "does not answer"]),
        ("sqlite:////no/such/folder/mlflow.db", ["folder /no/such/folder does not exist"]),
    ],
    ids=["scheme", "unreachable", "sqlite-folder-missing"],
)
def test_mlflow_store_checked_before_any_stage(cli, monkeypatch, uri, fragments):
    if uri is None:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            uri = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert_user_error(cli(), *fragments)


@pytest.mark.parametrize(
    ("name", "data", "fragment"),
    [
        ("logo.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)), "is not UTF-8 text"),
        ("latin1.txt", "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e. ".encode("latin-1") * 50, "latin-1"),
        ("image.jsonl", b"\x00\x01\x02" * 100, "is not UTF-8 text"),
    ],
    ids=["png", "latin-1", "binary-jsonl"],
)  # fmt: skip
def test_non_text_corpus_files_are_refused_up_front(cli, tmp_path, name, data, fragment):
    (tmp_path / name).write_bytes(data)
    assert_user_error(
        cli("--sources", "files", "--data-files", name), "key 'data_files'", name, fragment
    )


def test_parquet_corpus_whose_text_column_holds_numbers(cli, tmp_path):
    pd.DataFrame({"text": [1, 2, 3]}).to_parquet(tmp_path / "nums.parquet")
    assert_user_error(
        cli("--sources", "files", "--data-files", "nums.parquet"),
        "'nums.parquet' column 'text' holds int64, not strings",
    )


def test_deeply_nested_jsonl_corpus(cli, tmp_path):
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert_user_error(
        cli("--sources", "files", "--data-files", "deep.jsonl"),
        "'deep.jsonl' line 1: JSON nested too deeply",
        preflight=False,
    )


# --- reused artifacts: the tiny sample/cache/select set, copied into the run's outdir
def _tiny(tmp_path: Path, tiny_artifacts: Path) -> Path:
    import shutil

    out = tmp_path / "out"
    shutil.copytree(tiny_artifacts, out)
    return out


def _tiny_args() -> list[str]:
    """TINY_ARGS on top of params.yaml: the schema default max_heads, as conftest ran."""
    from conftest import TINY_ARGS

    from head_explain.config import Config

    return [*TINY_ARGS, "--max-heads", str(Config().max_heads)]


def _explanations(out: Path, heads=((8, 7), (17, 5))) -> None:
    rows = [{"layer": a, "head": b, "head_name": f"L{a}H{b}", "explanation": "previous token",
             "error": None, "explainer_model": BUNDLED, "prompt_sha": "x"} for a, b in heads]  # fmt: skip
    (out / "explanations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _scores(out: Path) -> None:
    from head_explain import artifacts as art

    cols = art.CONTRACTS["scores.parquet"][1]
    row = {c: 0.5 for c in cols} | {"layer": 8, "head": 7, "baseline_from": "L17H5",
           "method": "echo", "simulator_model": BUNDLED, "n_tokens": 9, "n_failed": 0, "error": None}  # fmt: skip
    art.write_parquet(
        out / "scores.parquet", pd.DataFrame([row]), {"stage": "simulate", "model": BUNDLED}
    )


def _corrupt_pages(path: Path) -> None:
    data = bytearray(path.read_bytes())
    end = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    data[4:end] = bytes(len(data[4:end]))
    path.write_bytes(bytes(data))


def test_skip_cache_with_corrupt_pages_behind_an_intact_footer(cli, tmp_path, tiny_artifacts):
    out = _tiny(tmp_path, tiny_artifacts)
    _corrupt_pages(out / "activations.parquet")
    assert_user_error(
        cli(*_tiny_args(), "--skip-cache", "--until", "select"),
        "--skip-cache:", "activations.parquet is damaged", "run without --skip-cache",
    )  # fmt: skip


def test_skip_cache_with_outputs_of_two_cache_runs(cli, tmp_path, tiny_artifacts):
    from head_explain import artifacts as art

    out = _tiny(tmp_path, tiny_artifacts)
    df, meta = art.read_parquet(out / "head_stats.parquet")
    art.write_parquet(
        out / "head_stats.parquet", df, {k: v for k, v in meta.items() if k != "run_token"}
    )
    assert_user_error(
        cli(*_tiny_args(), "--skip-cache", "--until", "select"),
        "--skip-cache:", "come from different runs of 'cache'",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"[8, 7]\n", "is a JSON list, not an object"),
        (b'{"layer": 8, "head": 7}\n', "field 'explanation' is None"),
        (b'{"layer": 8, "head": 7, "explanation": "caf\xe9", "error": null}\n', "is not UTF-8"),
        (b"", "holds no rows"),
    ],
    ids=["array-line", "lacks-fields", "not-utf8", "empty"],
)
def test_skip_explain_with_explanations_that_break_the_contract(
    cli, tmp_path, tiny_artifacts, body, fragment
):
    out = _tiny(tmp_path, tiny_artifacts)
    (out / "explanations.jsonl").write_bytes(body)
    assert_user_error(
        cli(*_tiny_args(), "--skip-cache", "--skip-explain", "--until", "simulate"),
        "--skip-explain:", "explanations.jsonl", fragment,
    )  # fmt: skip


def test_skip_explain_with_explanations_of_other_heads(cli, tmp_path, tiny_artifacts):
    out = _tiny(tmp_path, tiny_artifacts)
    _explanations(out, heads=((8, 7), (3, 1)))
    assert_user_error(
        cli(*_tiny_args(), "--skip-explain", "--until", "simulate"),
        "--skip-explain:", "has heads not in the heads this config analyses: L3H1", "lacks L17H5",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("body", "fragment"),
    [("[]", "is a JSON list, expected an object"), ("{clusters", "is not valid JSON")],
    ids=["empty-list", "not-json"],
)
def test_skip_cluster_with_a_bad_clusters_json(cli, tmp_path, tiny_artifacts, body, fragment):
    out = _tiny(tmp_path, tiny_artifacts)
    _explanations(out)
    _scores(out)
    (out / "clusters.json").write_text(body)
    args = ["--skip-cache", "--skip-explain", "--skip-simulate", "--skip-cluster"]
    assert_user_error(cli(*_tiny_args(), *args), "--skip-cluster:", "clusters.json", fragment)


def test_skip_cache_into_a_missing_outdir_creates_no_llm_cache(cli, tmp_path):
    assert_user_error(
        cli("--skip-cache", "--llm-cache", str(tmp_path / "out" / "llm.sqlite")),
        "--skip-cache:", "windows.parquet is missing",
    )  # fmt: skip


def test_a_second_run_into_the_same_outdir_is_refused(cli, tmp_path):
    from head_explain.locks import outdir_lock

    (tmp_path / "out").mkdir()
    with outdir_lock(tmp_path / "out"):
        line = assert_user_error(
            cli("--windows", "4", "--until", "sample"), "key 'outdir'", "is in use by another"
        )
    assert f"pid {os.getpid()}" in line


def test_explain_journal_damaged_before_its_last_line(cli, tmp_path, tiny_artifacts):
    out = _tiny(tmp_path, tiny_artifacts)
    row = {"layer": 8, "head": 7, "explanation": "x", "error": None}
    (out / ".explanations.jsonl.partial").write_text("{torn\n" + json.dumps(row) + "\n")
    assert_user_error(
        cli(*_tiny_args(), "--skip-cache", "--until", "explain"),
        ".explanations.jsonl.partial is damaged at line 1", "delete", "and rerun",
    )  # fmt: skip
