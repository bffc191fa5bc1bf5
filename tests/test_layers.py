"""The layer arrows of ARCHITECTURE.md: no module imports a layer above it, and the low layers stay
free of ray (and config/storage free of torch.distributed / tensors)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "elastic_ckpt"

# layer -> the elastic_ckpt layers it may import (besides itself)
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "storage": {"errors", "config"},
    "checkpoint": {"errors", "config", "storage"},
    "data": {"errors", "config", "storage", "checkpoint"},
    "train": {"errors", "config", "storage", "checkpoint", "data"},
    "coordinator": {"errors", "config", "storage", "checkpoint", "data", "train"},
    "trainer": {"errors", "config", "storage", "checkpoint", "data", "train", "coordinator"},
    "cli": {"errors", "config", "storage", "checkpoint", "data", "train", "coordinator",
            "trainer"},
}
FORBIDDEN_EXTERNAL = {
    "config": ("ray", "torch"),
    "storage": ("ray", "torch"),
    "checkpoint": ("ray",),
    "data": ("ray", "torch.distributed"),
    "train": ("ray",),
}


def _layer_of(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


MODULES = sorted(p for p in PKG.rglob("*.py") if _layer_of(p) in ALLOWED)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PKG)))
def test_layer_arrows(path: Path) -> None:
    layer = _layer_of(path)
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] == "elastic_ckpt" and len(parts) > 1 and parts[1] in ALLOWED:
            target = parts[1]
            assert target == layer or target in ALLOWED[layer], (
                f"{path.relative_to(PKG)} ({layer}) imports {name}: layer {target} is above it")
        for banned in FORBIDDEN_EXTERNAL.get(layer, ()):
            assert name != banned and not name.startswith(banned + "."), (
                f"{path.relative_to(PKG)} ({layer}) must not import {name}")


def test_every_module_belongs_to_a_layer() -> None:
    stray = [p for p in PKG.rglob("*.py")
             if _layer_of(p) not in ALLOWED and p.name != "__init__.py"]
    assert not stray, f"modules outside the layers of ARCHITECTURE.md: {stray}"
