"""Optional packages, imported where first used: one helper instead of a try/except ImportError per module.

    >>> from maskopt.lazy import lazy_import, require
    >>> json = lazy_import("json", install="part of Python")       # nothing is imported yet
    >>> json.dumps([1])                                              # the first attribute imports it
    '[1]'
    >>> fast = lazy_import("no_such_package", install="pip install no-such-package")  # no error yet
    >>> fast.run
    Traceback (most recent call last):
    ...
    maskopt.errors.MaskoptError: no_such_package is not installed: pip install no-such-package
    >>> require("no_such_package", "pip install no-such-package", reason="--fast needs no_such_package")
    Traceback (most recent call last):
    ...
    maskopt.errors.MaskoptError: --fast needs no_such_package: pip install no-such-package

`lazy_import` is Polygraphy's `mod.lazy_import`: importing the module that holds it never needs the
package. `require` imports at once, for the checks a command makes before any work. Either way a missing
package is one line, "REASON: INSTALL", with REASON by default "NAME is not installed".
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from .errors import MaskoptError


def require(name: str, install: str, reason: str | None = None) -> ModuleType:
    """The module `name` ("pkg" or "pkg.sub"), or a one-line MaskoptError "REASON: INSTALL".

    `reason`: what needs it, e.g. "--ray needs Ray" (default "NAME is not installed"); `install`: how to
    install it, e.g. 'pip install -e ".[ray]"'.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        raise MaskoptError(f"{reason or f'{name} is not installed'}: {install}") from None


class _LazyModule(ModuleType):
    """Stands in for a module; each attribute read imports it (a no-op once imported) or raises `require`'s error."""

    def __init__(self, name: str, install: str, reason: str | None) -> None:
        super().__init__(name)
        self.__dict__["_lazy_args"] = (name, install, reason)

    def __getattr__(self, attr: str) -> Any:  # only for what the proxy itself lacks: the module's own names
        return getattr(require(*self.__dict__["_lazy_args"]), attr)

    def __setattr__(self, attr: str, value: Any) -> None:
        setattr(require(*self.__dict__["_lazy_args"]), attr, value)

    def __repr__(self) -> str:
        return f"<lazily imported module {self.__name__!r}>"


def lazy_import(name: str, install: str, reason: str | None = None) -> Any:
    """A stand-in for module `name` that imports it on its first attribute read; `require`'s error if missing."""
    return _LazyModule(name, install, reason)


__all__ = ["lazy_import", "require"]
