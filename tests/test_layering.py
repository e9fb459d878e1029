"""The package's import direction (docs/development.md, "Layout"): every import of a q-splat module, at module
level or inside a function, goes to the same or a lower layer, and the module graph has no cycle. Also: importing
the package has no side effects, and nerfstudio finds the plugin's two entry points."""

import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "qrender_ns"

# Lowest first. A module may import modules of its own layer or of any lower one.
LAYERS = [
    ("utils",),
    ("render",),
    ("data",),
    ("teachers",),
    ("features",),
    ("gsnet",),
    ("method",),
    ("eval",),
    ("workflows",),
    ("cli",),
]


def _layer(module: str) -> int:
    parts = module.split(".")[1:]
    if not parts:  # the package itself (qrender_ns/__init__.py): below everything
        return -1
    for rank, names in enumerate(LAYERS):
        if parts[0] in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add its top-level package to LAYERS")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if "cuda_ext" in parts:
            continue
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield ".".join(parts), path, is_package


def _verb_lazy_imports(tree) -> set:
    """The import nodes inside `main()` methods of an options module: each verb's one lazy import of its code
    (which imports the options back). The only function-local q-splat imports the cycle check lets through."""
    return {node for cls in tree.body if isinstance(cls, ast.ClassDef)
            for fn in cls.body if isinstance(fn, ast.FunctionDef) and fn.name == "main"
            for node in ast.walk(fn) if isinstance(node, ast.ImportFrom)}


def _imports(module: str, path: Path, is_package: bool, skip_verb_lazy: bool = False):
    """(imported q-splat module, line) for every import statement, resolving `from X import name` to X.name
    when that is a module."""
    known = {name for name, _, _ in _modules()}
    tree = ast.parse(path.read_text())
    skip = _verb_lazy_imports(tree) if skip_verb_lazy and module.endswith(".options") else set()
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "qrender_ns":
                while name not in known and "." in name:
                    name = name.rsplit(".", 1)[0]
                yield name, node.lineno


def _graph(skip_verb_lazy: bool = False):
    return {module: sorted(set(_imports(module, path, is_package, skip_verb_lazy)))
            for module, path, is_package in _modules()}


def test_every_import_goes_to_the_same_or_a_lower_layer():
    upward = [f"{module}:{line} imports {target}" for module, targets in _graph().items()
              for target, line in targets if _layer(target) > _layer(module)]
    assert not upward, "\n".join(upward)


def test_the_module_graph_has_no_cycle():
    graph = {module: {t for t, _ in targets if t != module} for module, targets in _graph(skip_verb_lazy=True).items()}
    # a package's __init__ importing its own submodules is not a cycle through them
    graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(cycles)


def test_the_checker_sees_function_local_imports(tmp_path):
    """An import inside a function counts like one at the top (the old cycles hid behind such imports)."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from qrender_ns.method import model\n")
    assert [t for t, _ in _imports("qrender_ns.render.probe", path, False)] == ["qrender_ns.method.model"]
    assert _layer("qrender_ns.utils.fsio") < _layer("qrender_ns.render.rasterize") < _layer("qrender_ns.method.model")


def test_importing_the_package_has_no_side_effects():
    code = ("import os, sys; before = dict(os.environ); argv = list(sys.argv); import qrender_ns; "
            "assert dict(os.environ) == before and sys.argv == argv; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'nerfstudio', 'numpy')]; "
            "assert not heavy, heavy")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=PACKAGE.parent, timeout=60)


def test_nerfstudio_discovers_the_method_and_the_dataparser():
    code = ("from nerfstudio.configs.dataparser_configs import all_dataparsers; "
            "from nerfstudio.plugins.registry import discover_methods; "
            "methods, _ = discover_methods(); "
            "assert 'qsplat-data' in all_dataparsers, sorted(all_dataparsers); "
            "assert 'q-splat' in methods, sorted(methods); "
            "print(type(all_dataparsers['qsplat-data']).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180,
                         cwd=PACKAGE.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("QSplatDataParserConfig")


def _sources():
    for module, path, _ in _modules():
        yield module, path.read_text()


def test_one_atomic_writer():
    """Files are renamed into place only by utils.fsio.atomic_write (folders: teachers/tiny.py's downloaded-model
    folder, the scene generator's output folder)."""
    folder_renames = {"qrender_ns.teachers.tiny"}
    offenders = [m for m, text in _sources() if "os.replace(" in text and m not in folder_renames | {"qrender_ns.utils.fsio"}]
    assert not offenders, offenders


def test_gsplat_private_functions_only_through_the_shim():
    offenders = [m for m, text in _sources() if ("gsplat.cuda._" in text or "gsplat.cuda import _" in text)
                 and m != "qrender_ns.render.gsplat_shim"]
    assert not offenders, offenders


def test_one_quaternion_to_rotation():
    """The rotation-matrix formula of a wxyz quaternion is written once (utils/geometry.py)."""
    offenders = [m for m, text in _sources() if "1 - 2 * (y * y + z * z)" in text and m != "qrender_ns.utils.geometry"]
    assert not offenders, offenders
