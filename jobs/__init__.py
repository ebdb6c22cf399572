"""RQ job functions: thin adapters that open a unit of work and call one kana/ function.

Each worker process has one Runtime (settings, engine, Redis), built by
``worker.py`` (or tests) through ``init``, or lazily from the environment.
"""

from __future__ import annotations

import config
from config import Settings
from kana.runtime import Runtime

_runtime: Runtime | None = None


def init(settings: Settings) -> Runtime:
    global _runtime
    _runtime = Runtime(settings)
    return _runtime


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(config.load())
    return _runtime
