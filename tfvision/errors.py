"""Errors that end a command with exit code 2 and one clear line on stderr."""


class UserError(ValueError):
    """Something the user can fix: a config, a path, a dataset."""


class ConfigError(UserError):
    """A config is wrong. The message names the file, the key path and the problem."""


class DataError(UserError):
    """The data on disk does not match what the config promises."""
