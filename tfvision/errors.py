"""Errors that end a command with exit code 2 and one clear line on stderr."""

import difflib


class UserError(ValueError):
    """Something the user can fix: a config, a path, a dataset."""


class ConfigError(UserError):
    """A config is wrong. The message names the file, the key path and the problem."""


class DataError(UserError):
    """The data on disk does not match what the config promises."""


def did_you_mean(name, choices, known: str | None = None) -> str:
    """The hint for a misspelt `name`: its closest match among `choices`, else the choices.

    >>> did_you_mean("image_sise", ["image_size", "channels"])
    " (did you mean 'image_size'?)"
    >>> did_you_mean("zzz", ["a", "b"], known="known keys")
    ' (known keys: a, b)'

    Returns:
        ``" (did you mean 'x'?)"``; with no close match ``" (<known>: a, b)"`` when
        `known` names the list, else ``""``.
    """
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), choices, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" ({known}: {', '.join(choices)})" if known else ""
