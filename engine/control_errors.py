"""Errors of the engine's control plane.

Every refusal is an exception with a message a person can act on, never a crash: the HTTP
server maps ``status`` onto the response code and ``str(exc)`` onto ``{"error": ...}``.
"""

from __future__ import annotations


class ControlError(RuntimeError):
    """A control command the engine refused. ``status`` is the HTTP code it maps to."""

    status = 400


class AlreadyPausedError(ControlError):
    status = 409


class NotPausedError(ControlError):
    status = 409


class NotIdleError(ControlError):
    """The command needs a fully idle engine (seed 004); the message says what is busy."""

    status = 409


class ProfileInProgressError(ControlError):
    status = 409


class ProfileNotRunningError(ControlError):
    status = 409


class WeightsMismatchError(ControlError):
    """New weights do not fit the model: unknown names, missing file or wrong shapes."""

    status = 400


class StateKeyError(ControlError):
    """set_internal_state with a key that is unknown or not safe to change at run time."""

    status = 400
