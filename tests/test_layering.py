"""The import layering: lower layers never import higher ones (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "restuning"

# Layer of each top-level module or package of restuning. A module may import its own package, any lower
# layer, and the packages listed as peers in PEERS; nothing else. `testing` (the reference forms the tests
# check against) sits at the top and the library never imports it.
CORE = ("errors", "config", "checkpoint", "hooks", "attention", "spatial", "params", "memory", "model", "ops",
        "tuners", "assets", "adapters", "merging", "tasks", "card", "hub", "precision", "int8")
LAYERS = {**dict.fromkeys(CORE, 0), "data": 1, "bypass": 1, "hf_trainer": 1, "methods": 2, "baselines": 2, "train": 3,
          "diffusion": 4, "serve": 4, "demo": 5, "config_reference": 5, "__init__": 5, "cli": 6, "testing": 7}
PEERS = {("methods", "baselines"), ("baselines", "methods")}  # baselines register themselves as methods


def _part(module: str) -> str:
    """`restuning.a.b` -> `a`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute restuning module) of every import in `path`, at any depth."""
    package = ".".join(("restuning", *path.relative_to(SRC).with_suffix("").parts))
    if path.name == "__init__.py":
        package = package.rsplit(".", 1)[0]
        here = package
    else:
        here = package.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("restuning")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.rsplit(".", node.level - 1)[0] if node.level > 1 else here
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            if module.startswith("restuning"):
                names = [f"{module}.{a.name}" if module == "restuning" else module for a in node.names]
                found += [(node.lineno, n) for n in names]
    return found


def _violations() -> list[str]:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        me = rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.name != "__init__.py" else "__init__"
        assert me in LAYERS, f"{rel}: add its package to LAYERS in this test"
        for line, module in _imports(path):
            other = _part(module)
            if other == me or (me, other) in PEERS or other not in LAYERS or {me, other} <= set(CORE):
                continue
            if LAYERS[other] >= LAYERS[me]:
                bad.append(f"{rel}:{line} imports {module} (layer {LAYERS[other]} >= {me}'s {LAYERS[me]})")
    return bad


def test_lower_layers_never_import_higher_ones():
    assert _violations() == []


def test_the_check_sees_a_violation(tmp_path, monkeypatch):
    """The check itself can fail: a core module importing the bypass is reported."""
    fake = tmp_path / "restuning"
    (fake / "ops").mkdir(parents=True)
    (fake / "ops" / "bad.py").write_text("def f():\n    from ..bypass import BypassConfig\n")
    monkeypatch.setattr(__import__(__name__), "SRC", fake)
    assert _violations() == ["ops/bad.py:2 imports restuning.bypass (layer 1 >= ops's 0)"]
