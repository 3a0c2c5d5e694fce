"""User-facing errors. The CLI and stage scripts print them as one line and exit 2."""


class HeadExplainError(Exception):
    """An error the user can fix; its message names the input and what is valid."""

    exit_code = 2


class ConfigError(HeadExplainError):
    """A bad key or value in params.yaml, the CLI or the environment."""


class DataError(HeadExplainError):
    """A corpus that is missing, corrupt or too small."""


class ArtifactError(HeadExplainError):
    """A missing, stale or foreign artifact; the message names the stage to rerun."""


class LLMError(HeadExplainError):
    """An LLM endpoint that cannot be used (no key, unreachable, unsupported)."""


class StageFailed(HeadExplainError):
    """A stage finished but too many heads failed; artifacts are valid and resumable."""

    exit_code = 1
