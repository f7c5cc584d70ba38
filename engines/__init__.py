"""Engines: one interface (`Engine.decode(batch) -> uint8 images + timings`) and its backends.

Public API (other folders use exactly these names):
    Engine, EngineCapabilities, DecodeBatch, DecodeResult, EngineInputError, EngineConfigError,
    ShapeProfile, BACKENDS, open_engine
"""

from .base import DecodeBatch, DecodeResult, Engine, EngineCapabilities, EngineConfigError, EngineInputError
from .export import ShapeProfile
from .factory import BACKENDS, open_engine

__all__ = [
    "BACKENDS",
    "DecodeBatch",
    "DecodeResult",
    "Engine",
    "EngineCapabilities",
    "EngineConfigError",
    "EngineInputError",
    "ShapeProfile",
    "open_engine",
]
