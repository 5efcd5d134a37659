"""Errors shared by every FlowMesh process."""

from __future__ import annotations

# `failure` lives in flowmesh.failures with the table of failure kinds; re-exported here
# for code that still imports it from this module.
from flowmesh.failures import failure

__all__ = ["ConfigError", "FlowMeshError", "failure"]


class FlowMeshError(Exception):
    """Base of every error FlowMesh raises on purpose."""


class ConfigError(FlowMeshError):
    """A setting is missing or wrong; the message names the variable and the fix."""
