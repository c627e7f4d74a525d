"""
Builders of small offline image folders (`train/<class>/`, `validation/<class>/`), found by name.

Every module of this package is a builder: it defines `NAME` (one folder) or `NAMES` (several) and a function
`build(root, ...)` that writes the folder under `root` and returns it (a module with `NAMES` receives the name as
`build(root, name=NAME)`). A new builder is a new module here; nothing else is edited, the registry finds it.
A module with `HELD_OUT = True` is a held-out folder: built before any choice was made on it and used for nothing but
the final check (`held_out()` lists them; the `every-folder` study leaves them to `every-folder-held-out`).

    from benchmarks import folders
    folders.names()                              # ('scikit-image', 'scikit-image-grey', 'shipped', ...)
    folders.build("shipped", "outputs/photos")   # writes outputs/photos/{train,validation}/<class>/*.jpg
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from pathlib import Path
from types import ModuleType


def builders() -> dict[str, ModuleType]:
    """`{folder name: module}` of every module of this package (those whose name starts with `_` excepted)."""
    found: dict[str, ModuleType] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        names = getattr(module, "NAMES", None) or [getattr(module, "NAME", None)]
        if None in names or not callable(getattr(module, "build", None)):
            raise TypeError(f"{module.__name__} is not a folder builder: it needs NAME or NAMES and build(root, ...).")
        for name in names:
            if name in found:
                raise ValueError(f"Folder {name!r} is defined by both {found[name].__name__} and {module.__name__}.")
            found[name] = module
    return found


def names() -> tuple[str, ...]:
    return tuple(sorted(builders()))


def held_out() -> tuple[str, ...]:
    """The folders whose module says `HELD_OUT = True` (used for nothing but the final check)."""
    return tuple(sorted(name for name, module in builders().items() if getattr(module, "HELD_OUT", False)))


def build(name: str, root: str | Path, **options) -> Path:
    """Write folder `name` under `root` with its builder (its keyword `options`) and return the folder."""
    found = builders()
    if name not in found:
        close = difflib.get_close_matches(name, found, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"No folder builder named {name!r}; known: {', '.join(sorted(found))}.{hint}")
    module = found[name]
    return Path(
        module.build(root, name=name, **options) if hasattr(module, "NAMES") else module.build(root, **options)
    )
