"""The training stage's error: a run that cannot start or continue as configured.

Leaves out: config errors (flora.config.ConfigError), checkpoint and model errors (checkpoint.py,
models.py), which keep their own classes.
"""

from __future__ import annotations

from flora.errors import FloraError


class TrainingError(FloraError, RuntimeError):
    """A run cannot start or continue as configured."""
