"""The exceptions model code raises. Both are ValueErrors whose message says what to fix.

    LatentError      a latent, sigma, statistics or latent-space name PiD cannot use
    CheckpointError  a checkpoint that cannot be loaded into the requested network

This module imports nothing, so any model module (network.py, checkpoints.py, latents/) can raise
them without importing another's machinery.
"""

from __future__ import annotations


class LatentError(ValueError):
    """A latent (or its sigma, statistics or space name) that PiD cannot use; the message says why."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the requested network; the message says why."""
