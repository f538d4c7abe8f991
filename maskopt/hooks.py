"""The one patching layer: every hook maskopt puts on a module goes on here under a name and comes off by name.

    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> with hooked(layer, "demo", post=lambda module, args, y: 2 * y):
    ...     has(layer, "demo")
    True
    >>> has(layer, "demo")
    False

Three kinds, one per hook:
- `pre(module, args, kwargs) -> (args, kwargs) or None`: before the module's forward (torch's forward pre-hook
  with kwargs); None leaves the inputs as they are.
- `post(module, args, output) -> output or None`: after it (torch's forward hook).
- `around`: a callable that runs instead of the module's forward (the trajectory stepper, which may not run
  the U-Net at all); it was built around the forward it replaces.

Names in use: `maskopt.bucket` (apply: the bucket's weights), `maskopt.inputs` (backbone scales of a live U-Net),
`maskopt.per_sample` (per-sample output scales), `maskopt.stepper` (trajectory replay), `maskopt.input_scale`
(a baked variant's backbone scales, which stay).

Why torch's own hooks and not diffusers' HookRegistry: the registry rewrites `module.forward` as a closure over
the module it was registered on, so a `copy.deepcopy` of a hooked module keeps running the original's forward
and weights (checked with diffusers 0.42.1); a baked variant is a deep copy with a hook, and torch's hooks are
copied with their module.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from torch import nn

from .errors import MaskoptError

_ATTR = "_maskopt_hooks"  # {name: [(kind, handle or the forward it replaced), ...]} on each hooked module


def register(module: nn.Module, name: str, *, pre: Callable | None = None, post: Callable | None = None,
             around: Callable | None = None) -> None:
    """Put one hook of one kind on `module` under `name` (a name is on a module at most once)."""
    if sum(h is not None for h in (pre, post, around)) != 1:
        raise TypeError("give one of pre, post or around")
    table = module.__dict__.setdefault(_ATTR, {})
    if name in table:
        raise MaskoptError(f"{name} is already on this module; leave the block that put it there first")
    if pre is not None:
        table[name] = ("pre", module.register_forward_pre_hook(pre, with_kwargs=True))
    elif post is not None:
        table[name] = ("post", module.register_forward_hook(post))
    else:
        table[name] = ("around", module.__dict__.get("forward"))  # an instance forward it covers, or None
        module.forward = around


def remove(module: nn.Module, name: str) -> None:
    """Take the hook `name` off `module` (an `around` gives back the forward it covered)."""
    kind, held = module.__dict__.get(_ATTR, {}).pop(name)
    if kind != "around":
        held.remove()
    elif held is None:
        del module.forward  # back to the class's forward
    else:
        module.forward = held


def has(module: nn.Module, name: str) -> bool:
    return name in module.__dict__.get(_ATTR, {})


@contextmanager
def hooked(module: nn.Module, name: str, **hook: Callable) -> Iterator[None]:
    """`register` for the block's duration, removed also after an exception."""
    register(module, name, **hook)
    try:
        yield
    finally:
        remove(module, name)


class Hooks:
    """Several hooks put on and taken off together (one `apply` or `per_sample` block), last on first off."""

    def __init__(self) -> None:
        self._on: list[tuple[nn.Module, str]] = []

    def add(self, module: nn.Module, name: str, **hook: Callable) -> None:
        register(module, name, **hook)
        self._on.append((module, name))

    def remove(self) -> None:
        while self._on:
            remove(*self._on.pop())

