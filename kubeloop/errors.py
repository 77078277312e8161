"""User-facing errors: each says what was wrong and how to fix it; the CLI prints them without a traceback."""

from __future__ import annotations


class KubeloopError(Exception):
    """Base class: the message is shown to the user as is."""


class SpecError(KubeloopError):
    """A resource spec (YAML or CR) is invalid; the message names each field path."""


class DataError(KubeloopError):
    """A dataset cannot be read or does not match what was declared."""


class GateFailed(KubeloopError):
    """A trained model did not pass the evaluation gate."""
