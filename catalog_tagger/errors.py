"""Exceptions the library raises; the CLI maps ``UserError`` to exit code 2."""

from __future__ import annotations


class CatalogTaggerError(Exception):
    """Base class for every error this package raises on purpose."""


class UserError(CatalogTaggerError):
    """Bad input from the user (config, paths, arguments): refused before any work starts."""


class ConfigError(UserError):
    """A config file (tasks.yaml, job parameters) is invalid."""


class ArtifactError(UserError):
    """A model artifact is missing, incomplete, or in a refused format (pickle)."""


class TrainingDiverged(UserError):
    """The training loss became NaN or infinite (a learning rate or task weight too large): no artifact is written."""


class DecodeError(CatalogTaggerError):
    """One image could not be decoded; becomes an error row, never a crash."""


class ReadRefused(CatalogTaggerError):
    """One object is not read: not a regular file, over the size cap, or past its deadline. An error row, never
    retried (the same read would be refused again)."""


class OutputWriteError(UserError):
    """The output store refused a write for good (permission, not a folder, read-only): a rerun can resume."""


class CommitError(CatalogTaggerError):
    """A commit found its recorded state inconsistent (a staged file vanished): nothing more is published."""


class CommitLockTimeout(CatalogTaggerError, TimeoutError):
    """Another run held the output's commit lock for longer than we wait (a retry later may succeed)."""


class CommitLockLost(CatalogTaggerError):
    """Our commit lock was taken over (we were presumed dead): stop publishing; a rerun finishes the commit."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's handler so that a run stops like on Ctrl-C (Ray shut down, resume printed)."""


class RayJobFailed(CatalogTaggerError, RuntimeError):
    """A Ray Jobs API submission ended FAILED or STOPPED; ``retryable`` says whether running it again may help."""

    def __init__(self, message: str, *, status: str, submission_id: str, retryable: bool) -> None:
        super().__init__(message)
        self.status = status
        self.submission_id = submission_id
        self.retryable = retryable
