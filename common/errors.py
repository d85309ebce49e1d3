"""User-facing errors: one clear line, no traceback, exit code 2.

Anything a user can get wrong (config, model name, data, template, vector shapes) raises
`DfoloraError`; command-line entry points catch it and print only its message.
"""


class DfoloraError(Exception):
    """A mistake in the user's input, reported as one readable line."""

    exit_code = 2


class ConfigError(DfoloraError):
    """An invalid configuration key or value."""


class DataError(DfoloraError):
    """Missing, unreadable or ill-formed task data."""


class ModelError(DfoloraError):
    """A model that cannot be found, loaded or adapted."""


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of `err`'s message, cut to `limit` characters ("" when it has none), to
    name an underlying error inside a one-line DfoloraError."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else ""
