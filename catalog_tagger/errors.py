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


class DecodeError(CatalogTaggerError):
    """One image could not be decoded; becomes an error row, never a crash."""
