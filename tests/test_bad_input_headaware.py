"""Bad input to the head-aware keys: exit 2, one line naming key, value and what is
valid, nothing written (the `cli` fixture of test_bad_input checks the folder)."""

from __future__ import annotations

import pytest
from test_bad_input import assert_user_error, cli  # noqa: F401  (cli is a fixture)


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--class-induction", "1.5"], ["key 'class_induction': 1.5", "value in [0, 1]"]),
        (["--class-bos-sink", "-0.1"], ["key 'class_bos_sink': -0.1", "value in [0, 1]"]),
        (["--type-windows", "0"], ["key 'type_windows': 0 must be a positive integer"]),
        (["--min-event-pos", "0"], ["key 'min_event_pos': 0 must be a positive integer"]),
        (
            ["--min-event-pos", "64", "--window-len", "64"],
            ["key 'min_event_pos': 64 leaves no event position", "give 1 to 63"],
        ),
        (["--head-choice", "best"], ["--head-choice", "invalid choice: 'best'", "classes"]),
        (
            ["--explain-prompt", "explain_v9"],
            ["key 'explain_prompt'", "unknown version 'explain_v9'", "explain_v1, explain_v2"],
        ),
        (
            ["--explain-prompt", "missing.txt"],
            ["key 'explain_prompt'", "cannot read template file 'missing.txt'"],
        ),
    ],
    ids=["threshold-above-1", "threshold-negative", "type-windows-0", "min-event-pos-0",
         "min-event-pos-past-window", "head-choice",
         "unknown-prompt-version", "prompt-file-missing"],
)  # fmt: skip
def test_bad_head_aware_value(cli, args, fragments):  # noqa: F811
    assert_user_error(cli(*args), *fragments)


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("### user\nExplain this head.\n$evidence\n", ["lacks the placeholder $examples"]),
        ("### user\n$examples\n$head_name\n", ["unknown placeholder $head_name", "$examples"]),
        ("$examples only, no sections\n", ["no '### user' section"]),
        ("### user\n$examples costs $5\n", ["invalid $-placeholder"]),
    ],
    ids=["no-examples", "unknown-placeholder", "no-sections", "bad-dollar"],
)
def test_bad_prompt_template_file(cli, tmp_path, text, fragments):  # noqa: F811
    path = tmp_path / "my_prompt.txt"
    path.write_text(text)
    line = assert_user_error(cli("--explain-prompt", str(path)), *fragments)
    assert "key 'explain_prompt'" in line and "my_prompt.txt" in line


def test_prompt_file_that_is_a_folder(cli, tmp_path):  # noqa: F811
    folder = tmp_path / "prompts.txt"
    folder.mkdir()
    assert_user_error(cli("--explain-prompt", str(folder)), "cannot read template file")
