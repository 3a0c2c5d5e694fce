"""Versioned prompt templates.

A template file holds `### system` / `### user` sections (chat) or plain text (a
completion prompt), with `$name` placeholders (string.Template, so braces in corpus
text are harmless). A change to a file changes its sha, which is recorded beside every
explanation and score, and which DVC sees as a changed dependency.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template

from head_explain.errors import ConfigError


@dataclass(frozen=True)
class PromptTemplate:
    name: str  # file stem, e.g. explain_v1: the prompt version
    text: str

    @property
    def sha(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def render(self, **values: object) -> str:
        return Template(self.text).substitute({k: str(v) for k, v in values.items()})

    def messages(self, **values: object) -> list[dict[str, str]]:
        """Render a chat template into OpenAI-style messages."""
        rendered = Template(self.text).substitute({k: str(v) for k, v in values.items()})
        parts = re.split(r"^### (system|user|assistant)\n", rendered, flags=re.M)
        return [
            {"role": role, "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2], strict=True)
        ]


def load(name: str) -> PromptTemplate:
    text = resources.files(__package__).joinpath(f"{name}.txt").read_text()
    return PromptTemplate(name=name, text=text)


EXPLAIN_VERSIONS = ("explain_v1", "explain_v2")
EXPLAIN_REQUIRED = ("examples",)
EXPLAIN_ALLOWED = ("examples", "evidence")


def load_explain(spec: str) -> PromptTemplate:
    """The `explain_prompt` key: a shipped version name or a user template file.

    A user file's version is `file:<stem>` and its sha is of its text, so two prompts
    compare side by side as two runs. Any problem is one ConfigError naming the key.
    """
    if spec in EXPLAIN_VERSIONS:
        return load(spec)
    looks_like_path = "/" in spec or spec.endswith(".txt") or Path(spec).exists()
    if not looks_like_path:
        raise ConfigError(
            f"key 'explain_prompt': unknown version {spec!r}; valid: "
            f"{', '.join(EXPLAIN_VERSIONS)} or the path of a template file"
        )
    path = Path(spec)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        why = type(exc).__name__ if not isinstance(exc, OSError) else (exc.strerror or "unreadable")
        raise ConfigError(
            f"key 'explain_prompt': cannot read template file '{spec}' ({why}); give a "
            f"readable text file or one of {', '.join(EXPLAIN_VERSIONS)}"
        ) from None
    try:
        names = set(Template(text).get_identifiers())
    except ValueError:
        names = set()
    if not Template(text).is_valid():
        raise ConfigError(
            f"key 'explain_prompt': template file '{spec}' has an invalid $-placeholder; "
            "write $$ for a literal $"
        )
    missing = [n for n in EXPLAIN_REQUIRED if n not in names]
    if missing:
        raise ConfigError(
            f"key 'explain_prompt': template file '{spec}' lacks the placeholder "
            f"${missing[0]}; it must contain ${', $'.join(EXPLAIN_REQUIRED)} "
            f"(optional: $evidence)"
        )
    unknown = sorted(names - set(EXPLAIN_ALLOWED))
    if unknown:
        raise ConfigError(
            f"key 'explain_prompt': template file '{spec}' has unknown placeholder "
            f"${unknown[0]}; valid: ${', $'.join(EXPLAIN_ALLOWED)}"
        )
    if not re.search(r"^### user\n", text, flags=re.M):
        raise ConfigError(
            f"key 'explain_prompt': template file '{spec}' has no '### user' section; "
            "write '### system' / '### user' / '### assistant' sections"
        )
    return PromptTemplate(name=f"file:{path.stem}", text=text)


def check_explain_prompt(spec: str) -> None:
    load_explain(spec)
