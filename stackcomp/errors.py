"""User-facing errors.

Anything a user can cause (a bad recipe, a missing file, an unknown pass) raises a
``StackcompError``. The CLI prints its message on one line and exits with code 2; it never
shows a traceback for these. Bugs stay ordinary exceptions, so they keep their traceback.
"""

from __future__ import annotations


class StackcompError(Exception):
    """A mistake the user can fix; the message says what was expected and where."""

    exit_code = 2


class RecipeError(StackcompError):
    """The recipe file or an override is malformed."""


class PlanError(StackcompError):
    """The stages do not form a valid plan (cycle, unknown parent or pass, unmet need)."""


class DataError(StackcompError):
    """A dataset or task could not be found or read."""


class ModelError(StackcompError):
    """A model could not be found, loaded or is refused as unsafe."""


class ArtifactError(StackcompError):
    """An artifact on disk is missing, corrupt or cannot be written."""


class NumericalError(StackcompError):
    """NaN/Inf appeared in weights or gradients; the message names the layer."""


class FactorizeError(StackcompError):
    """A factorization was asked something impossible (sizes, budgets) or got bad input."""


class PassError(StackcompError):
    """A pass refuses its input or parameters; raise it from a pass (plugins too) for a clean error."""
