"""Registering our classes with threestudio exactly once.

threestudio's ``register(name)`` raises ``Module <name> already exists!`` on a second
registration. Our modules normally execute once (Python caches them), but the repository can be
reached along two routes -- threestudio's ``load_custom_modules`` executing
``custom/threestudio-ssd/__init__.py``, and a direct ``import threestudio_ssd.threestudio`` -- and a
module can be re-executed (``importlib.reload``). :func:`register` makes all of these idempotent:
a name already held by *our* class of the same qualified name keeps the first class; a name held
by anything else is a genuine conflict and raises threestudio's own error.
"""

from __future__ import annotations

from collections.abc import Callable

import threestudio

#: Every name this extension registers, in registration order.
REGISTERED_NAMES: list[str] = []

_MARK = "_threestudio_ssd_registered_name"


def register(name: str) -> Callable[[type], type]:
    """Class decorator: ``threestudio.register(name)`` unless this extension already registered
    the same class under ``name`` (then the registered class is returned unchanged)."""

    def decorator(cls: type) -> type:
        existing = threestudio.__modules__.get(name)
        if (
            existing is not None
            and getattr(existing, _MARK, None) == name
            and existing.__qualname__ == cls.__qualname__
        ):
            return existing
        setattr(cls, _MARK, name)
        threestudio.register(name)(cls)
        if name not in REGISTERED_NAMES:
            REGISTERED_NAMES.append(name)
        return cls

    return decorator
