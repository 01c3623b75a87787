"""One exception hierarchy for everything peftkit raises on purpose.

The CLI turns any ``PeftkitError`` into a one-line message; anything else is a bug.
"""


class PeftkitError(Exception):
    """Base class of every error peftkit raises for bad input or bad state."""


class ConfigError(PeftkitError, ValueError):
    """A configuration value is invalid, unsupported, or matches nothing."""


class DataError(PeftkitError, ValueError):
    """A data file is unreadable or malformed (the message names file and line)."""


class AdapterFileError(PeftkitError, ValueError):
    """An adapter directory is missing files, keys, or has shapes that do not fit."""


class ModelError(PeftkitError, RuntimeError):
    """The model is in a state the operation cannot work on (e.g. merged, unknown adapter)."""


class PeftkitWarning(UserWarning):
    """Something peftkit accepted but the user should know (e.g. an unknown, empty config field);
    the CLI prints it as one ``Warning: ...`` line."""
