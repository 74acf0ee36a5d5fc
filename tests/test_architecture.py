"""The house plan, checked on the code's own imports (every import statement, inside functions too):
no module reaches itself through others, kdlib's top level stays small, stages never import each other,
and kdlib/runtime imports nothing of the distillation code (only errors and the config loader)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("data_pipeline", "teacher", "pretrain", "finetune", "evaluate", "deploy", "report", "launch")
PACKAGES = ("kdlib",) + STAGES + ("bench",)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(name: str, path: Path, known: dict) -> set[str]:
    """Project modules this one imports: `from a.b import c` is a.b.c when that is a module, else a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]; counter[0] += 1; stack.append(root); on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]; counter[0] += 1; stack.append(child); on.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop(); on.discard(m); component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    out.append(sorted(component))
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_module_imports_a_module_that_imports_it():
    assert _cycles(import_graph()) == []


def test_no_package_of_kdlib_imports_a_package_that_imports_it():
    graph: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        if mod.startswith("kdlib."):
            group = ".".join(mod.split(".")[:2])
            graph.setdefault(group, set()).update(".".join(d.split(".")[:2]) for d in deps
                                                  if d.startswith("kdlib.") and not d.startswith(group))
    for deps in graph.values():
        deps.intersection_update(graph)
    assert _cycles(graph) == []


def test_kdlib_top_level_holds_at_most_four_modules():
    top = sorted(p.name for p in (ROOT / "kdlib").glob("*.py"))
    assert top == ["__init__.py", "config.py", "errors.py", "schemas.py"]


def test_stages_never_import_each_other():
    crossings = [(m, d) for m, deps in import_graph().items() if m.split(".")[0] in STAGES
                 for d in deps if d.split(".")[0] in STAGES and d.split(".")[0] != m.split(".")[0]]
    assert crossings == []


def test_runtime_imports_no_distillation_code():
    allowed = ("kdlib.runtime", "kdlib.errors", "kdlib.config")
    bad = [(m, d) for m, deps in import_graph().items() if m.startswith("kdlib.runtime")
           for d in deps if d.startswith("kdlib") and not d.startswith(allowed)]
    assert bad == []


def test_every_kdlib_package_says_what_belongs_there():
    for init in (ROOT / "kdlib").glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 20, f"{init.relative_to(ROOT)} needs a docstring saying what belongs there"
