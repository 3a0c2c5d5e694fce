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
from string import Template


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
