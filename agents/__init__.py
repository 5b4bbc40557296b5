"""Agents: TorchRL loss modules (the top-p TD family and BC baselines) and the registry.

``agents.make(name, student, **kwargs)`` builds any algorithm by name (see agents.registry).
"""

from __future__ import annotations

from agents.registry import ALGORITHMS, make

__all__ = ["ALGORITHMS", "make"]
