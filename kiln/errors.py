"""Typed exceptions for what a user can fix.

Each carries a message that names the setting and the fix; the CLI prints the message
without a traceback.
"""


class KilnError(Exception):
    """Base class of every error kiln raises on purpose."""


class KilnConfigError(KilnError, ValueError):
    """The run config (or a command-line override) is invalid."""


class KilnDataError(KilnError):
    """A dataset is missing, incomplete, or does not match the run config."""


class KilnCheckpointError(KilnError):
    """A checkpoint is missing, incomplete or corrupt."""


class KilnEnvironmentError(KilnError):
    """The machine lacks something the config asks for (a GPU, Transformer Engine, ...)."""
