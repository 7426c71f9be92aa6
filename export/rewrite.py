"""Copies of a network with some submodules swapped, the rest shared (no weights copied)."""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn


def swapped(module: nn.Module, swap: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """`module` with every submodule for which `swap` returns a replacement replaced by it: a shallow
    copy along the path to each replaced module, sharing every other submodule and parameter;
    `module` itself is not modified. Returns `module` when nothing is swapped."""
    replacement = swap(module)
    if replacement is not None:
        return replacement
    children = {name: swapped(child, swap) for name, child in module.named_children()}
    if all(children[name] is child for name, child in module.named_children()):
        return module
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._modules.update(children)
    return clone
