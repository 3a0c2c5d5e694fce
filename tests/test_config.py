"""The config schema: defaults, typing, validation messages that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from head_explain import config
from head_explain.errors import ConfigError
from head_explain.heads import choose_heads, parse_heads

REPO = Path(__file__).resolve().parents[1]


def test_defaults_match_the_seed_cli():
    cfg = config.build()
    assert (cfg.model, cfg.device, cfg.sources, cfg.windows, cfg.window_len) == (
        "gpt2", "auto", "wikitext", 1500, 192,
    )  # fmt: skip
    assert (cfg.topk, cfg.max_heads, cfg.openai_model, cfg.min_cluster_size) == (
        200, 200, "gpt-4o-mini", 5,
    )  # fmt: skip
    assert cfg.embedding_model == "all-MiniLM-L6-v2"
    assert cfg.outdir == "outputs"


def test_every_field_is_documented():
    for name in config.FIELDS:
        assert len(config.doc(name)) > 15, name


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"topkk": 3}, "unknown key 'topkk' (did you mean 'topk'?)"),
        ({"topk": 0}, "key 'topk': 0 must be a positive integer"),
        ({"max_heads": -1}, "key 'max_heads': -1 must be a positive integer"),
        ({"windows": "many"}, "key 'windows': value 'many' is not a valid int"),
        ({"sources": "wikitext,reddit"}, "unknown source 'reddit'; valid: pydocs, wikitext"),
        ({"device": "tpu"}, "key 'device': 'tpu' is not one of auto, cpu, cuda"),
        ({"llm": "claude"}, "key 'llm': 'claude' is not one of embedded, openai"),
        ({"heads": "L3-H2"}, "key 'heads': 'L3-H2' is not a head name like L17H3"),
        ({"sources": "stackexchange"}, "key 'stackexchange_dir': empty"),
        ({"topk": 600, "candidates": 500}, "key 'topk': 600 exceeds candidates=500"),
    ],
)
def test_bad_values_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        config.build(overrides)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_params_file_errors(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("topk: [1, 2\nwindows: 3\n")
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        config.load_params(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        config.load_params(tmp_path / "nope.yaml")
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        config.load_params(bad)


def test_committed_params_yaml_is_complete_and_valid():
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(data) == set(config.FIELDS), "params.yaml must list every key (flat)"
    cfg = config.load_params(REPO / "params.yaml")
    assert cfg.model == "smollm2-135m-instruct" and cfg.llm == "embedded"


def test_heads_parsing_and_spread():
    assert parse_heads("L17H3, L18H6") == [(17, 3), (18, 6)]
    assert parse_heads("") == []
    every = choose_heads(12, 12, 200)
    assert len(every) == 144
    spread = choose_heads(30, 9, 18)
    assert len(spread) == 18 and spread == sorted(spread)
    assert {layer for layer, _ in spread} >= {0, 29}
    assert choose_heads(30, 9, 18) == spread  # deterministic
    with pytest.raises(ConfigError, match="L40H0 does not exist"):
        choose_heads(30, 9, 18, "L40H0")


def test_config_hash_depends_only_on_listed_keys():
    a = config.build({"topk": 10})
    b = config.build({"topk": 20})
    assert config.config_hash(a, ["model", "windows"]) == config.config_hash(
        b, ["model", "windows"]
    )
    assert config.config_hash(a, ["topk"]) != config.config_hash(b, ["topk"])
