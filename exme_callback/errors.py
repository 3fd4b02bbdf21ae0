"""The library's own errors: each is a mistake the user can fix, and its message says how.

Every deliberate refusal of the library raises one of these. Each is also the built-in exception of its kind
(`InputError` is a `ValueError`, `MissingFileError` a `FileNotFoundError`, ...), so `except ValueError` keeps
working; `exme` turns exactly these into exit status 1 with their one-line message, and lets anything else (a bug)
raise with its traceback.
"""

from __future__ import annotations

__all__ = [
    "ExMeError",
    "InputError",
    "InputTypeError",
    "MissingExtraError",
    "MissingFileError",
    "MissingNameError",
    "StorageError",
    "UnsupportedError",
]


class ExMeError(Exception):
    """An error the user can fix; its message names the argument, file or setting and the way out."""


class InputError(ExMeError, ValueError):
    """A value the library cannot use: an argument, a file's contents, a combination of settings."""


class InputTypeError(ExMeError, TypeError):
    """An argument of the wrong type."""


class MissingFileError(ExMeError, FileNotFoundError):
    """A file or folder that should be there is not (a checkpoint, a run's history, a resume state)."""


class MissingNameError(ExMeError, KeyError):
    """A name is missing: a metric from an evaluation's output or a run's history, a tensor from a checkpoint."""

    def __str__(self) -> str:  # the message, not its repr (KeyError quotes it)
        return str(self.args[0]) if self.args else ""


class UnsupportedError(ExMeError, NotImplementedError):
    """A set-up the library does not support (yet); the message says what is."""


class StorageError(ExMeError, OSError):
    """An output the library could not write, or a file it could not read whole."""


class MissingExtraError(ExMeError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""
