"""Errors shared by every FlowMesh process."""

from __future__ import annotations


class FlowMeshError(Exception):
    """Base of every error FlowMesh raises on purpose."""


class ConfigError(FlowMeshError):
    """A setting is missing or wrong; the message names the variable and the fix."""
