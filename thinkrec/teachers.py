"""The teacher registry, shared by the reason stage (traces for hard training samples) and the explain
stage (reference reasoning for the rows it explains), so neither reaches into the other.

Teachers register themselves with ``@register("name")`` in their own modules (thinkrec/reasoning/);
``LAZY`` names the module of each built-in one, imported only when asked for, so this module imports
no stage. A teacher is a Ray Data callable class: ``__init__(cfg)``, ``__call__(pandas batch)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, ClassVar, Protocol, runtime_checkable

import pandas as pd


@runtime_checkable
class Teacher(Protocol):
    """A reasoning backend for Ray Data ``map_batches`` (see the module docstring)."""

    name: ClassVar[str]

    def __init__(self, cfg: Any) -> None: ...

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame: ...


TEACHERS: dict[str, type] = {}
LAZY: dict[str, str] = {"grounded": "thinkrec.reasoning.teachers", "llm": "thinkrec.reasoning.llm"}
"""Teachers in modules of their own, by name -> module (importing it registers the teacher)."""


def register(name: str) -> Callable[[type], type]:
    """Class decorator: make a teacher available as ``reason.teacher=<name>``."""

    def wrap(cls: type) -> type:
        if name in TEACHERS and TEACHERS[name] is not cls:
            raise ValueError(f"teacher {name!r} is already registered ({TEACHERS[name].__qualname__})")
        TEACHERS[name] = cls
        return cls

    return wrap


def get_teacher(name: str) -> type:
    """The teacher class for a registered name or a ``package.module:Class`` path."""
    if name in TEACHERS:
        return TEACHERS[name]
    if name in LAZY:  # registered when imported; imported only when asked for (it loads a generator)
        importlib.import_module(LAZY[name])
        return TEACHERS[name]
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reason.teacher={name!r}: cannot import it ({err})") from None
        if not callable(cls):
            raise ValueError(f"reason.teacher={name!r} is not a class")
        return cls
    raise ValueError(
        f"reason.teacher={name!r} is not a registered teacher ({', '.join(sorted(set(TEACHERS) | set(LAZY)))}) "
        "nor a package.module:Class path"
    )
