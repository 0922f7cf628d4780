"""The registry of file layouts: a name in `sites/*.toml` -> the loader that reads it.

It sits below both the site-set schema (`spec`, which checks a site's layout is registered and
merges the layout's defaults) and the loaders (which register themselves), so neither imports
the other's module at run time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Loader = Callable[..., list]  # (LoadContext) -> list of items; see ted_fl.data.loaders
LAYOUTS: dict[str, Loader] = {}
LAYOUT_DEFAULTS: dict[str, dict[str, Any]] = {}


def register(name: str, defaults: dict[str, Any] | None = None) -> Callable[[Loader], Loader]:
    """Register a layout; `defaults` are merged under the site's TOML entry (the entry wins)."""

    def deco(fn: Loader) -> Loader:
        LAYOUTS[name] = fn
        LAYOUT_DEFAULTS[name] = defaults or {}
        return fn

    return deco
