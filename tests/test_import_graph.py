"""Imports run one way.

* Statically (ast, function-level imports included): no module of ``langsam`` or ``sam`` imports,
  directly or through others, a module that imports it back; ``sam`` never imports ``langsam``;
  nothing below the command line and the demo imports them.
* In a fresh interpreter: every module imports on its own, and the light entry points stay light
  (``import langsam`` pulls in neither gradio, open_clip nor transformers, ``import sam`` none of
  them, and ``langsam.cli`` / ``langsam.demo`` not even torch).

An edge ``a -> b`` means module ``a`` names module ``b`` in an import statement. Importing
``a.b.c`` also runs the ``__init__`` of ``a`` and ``a.b``; those implicit edges to parent packages
are left out, as every package's ``__init__`` may re-export its own submodules.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("langsam", "sam")
HEAVY = ("gradio", "open_clip", "transformers")
#: The layer on top: nothing else may import these. Each entry is a package prefix, so the
#: subpackages (``langsam.serve.*``, ``langsam.cli.*``) belong to it too.
TOP_LAYER = ("langsam.cli", "langsam.demo", "langsam.__main__", "langsam.serve", "langsam.distributed",
             "langsam.label.review")  # the review page is a server, like langsam.serve
#: Heavy optional libraries and the only modules (package prefixes) that may import them: the
#: module built on the library, and the command that checks for it to give a clear error.
HEAVY_OWNERS = {
    "gradio": ("langsam.demo", "langsam.serve"),
    "open_clip": ("langsam.clip_scorer", "sam.sam3.text"),  # sam3.text: only the CLIP BPE tokenizer, lazily
    "transformers": ("langsam.detector",),
    "ray": ("langsam.distributed",),
    "litserve": ("langsam.serve", "langsam.cli.serve"),
    "onnxruntime": ("sam.export", "langsam.cli.export"),
    "onnx": ("sam.export", "langsam.cli.export"),
    "peft": ("sam.training", "langsam.cli.finetune"),
    "motmetrics": ("langsam.video.metrics",),
    "matplotlib": ("langsam.label.train",),
}


def discover_modules() -> dict[str, Path]:
    """{dotted module name: file} for every module of :data:`PACKAGES`."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _known(dotted: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``dotted`` that is one of our modules (None: a third-party import)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``name`` names in any import statement, at any depth of the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: "from . import x", "from ..modeling import y"
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else _known(base, modules))
    found.discard(None)
    found.discard(name)
    return found  # type: ignore[return-value]


def import_graph() -> dict[str, set[str]]:
    modules = discover_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            following = next(stack[-1], None)
            if following is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(following) == 1:
                return path[path.index(following):] + [following]
            elif not state.get(following):
                state[following] = 1
                path.append(following)
                stack.append(iter(sorted(graph.get(following, ()))))
    return None


def _in(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    # Relative imports and function-level imports are both seen.
    modules = discover_modules()
    assert "sam.modeling" in imports_of("sam.sam1.build", modules["sam.sam1.build"], modules)
    assert "langsam.pipeline" in imports_of("langsam.cli.options", modules["langsam.cli.options"], modules)
    # Layers are package prefixes: a subpackage of the top layer is in it, a look-alike name is not.
    assert _in("langsam.serve.routes", TOP_LAYER) and not _in("langsam.server_utils", TOP_LAYER)


def test_no_import_cycles():
    graph = import_graph()
    assert {"langsam", "langsam.cli", "langsam.demo", "sam", "sam.build", "sam.sam1", "sam.sam2", "sam.export.runtime"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_layers_import_downwards_only():
    graph = import_graph()
    upward = []
    for module, imported in sorted(graph.items()):
        for target in sorted(imported):
            if module.startswith("sam") and _in(target, ("langsam",)):
                upward.append(f"{module} -> {target} (sam never depends on langsam)")
            elif not _in(module, TOP_LAYER) and _in(target, TOP_LAYER):
                upward.append(f"{module} -> {target} (below the command line and demo)")
            elif _in(module, ("langsam.demo",)) and _in(target, ("langsam.cli",)) and target != "langsam.cli.options":
                upward.append(f"{module} -> {target} (the demo shares only langsam.cli.options)")
    assert upward == [], "\n".join(upward)


def third_party_imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a file, at any depth (``import ray.data`` -> ray)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_heavy_optional_libraries_are_imported_only_in_their_own_modules():
    modules = discover_modules()
    # The scan sees function-level imports (the lazy ones) too.
    assert "open_clip" in third_party_imports(modules["langsam.clip_scorer"])
    strays = [
        f"{name} imports {library} (only {', '.join(owners)} may)"
        for name, path in sorted(modules.items())
        for library, owners in HEAVY_OWNERS.items()
        if library in third_party_imports(path) and not _in(name, owners)
    ]
    assert strays == [], "\n".join(strays)


_FRESH_PROBE = r"""
import importlib, json, sys

heavy, packages, modules = json.loads(sys.argv[1])
report = {"pulled": {}, "failed": {}}
# Lightest first: each check then also holds for the module alone (sys.modules only grows).
for name, forbidden in (("langsam.cli", heavy + ["torch"]), ("langsam.demo", heavy + ["torch"]),
                        ("langsam", heavy), ("sam", heavy)):
    importlib.import_module(name)
    report["pulled"][name] = sorted(m for m in forbidden if m in sys.modules)
for name in modules:
    # Forget every module of ours (third-party ones stay loaded) so `name` imports on its own.
    for loaded in [m for m in sys.modules if m in packages or m.startswith(tuple(p + "." for p in packages))]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except BaseException as error:
        report["failed"][name] = f"{type(error).__name__}: {error}"
print(json.dumps(report))
"""


def test_each_module_imports_alone_and_entry_points_stay_light():
    modules = sorted(discover_modules())
    completed = subprocess.run(
        [sys.executable, "-c", _FRESH_PROBE, json.dumps([list(HEAVY), list(PACKAGES), modules])],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["failed"] == {}
    assert report["pulled"] == {"langsam.cli": [], "langsam.demo": [], "langsam": [], "sam": []}
