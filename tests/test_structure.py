"""The house rules a reviewer checks by hand, checked on every run: no source file outside tests
passes 450 lines (split by concept instead), and no two modules of the package import each other,
directly or around a circle (lazy imports inside functions count: they circle just the same)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the package's folders as pyproject.toml maps them
PACKAGES = {"vdit_deploy": ROOT / "vdit_deploy", "vdit_deploy.export": ROOT / "export",
            "vdit_deploy.runtimes": ROOT / "runtimes", "vdit_deploy.calibration": ROOT / "calibration"}
MAX_LINES = 450


def modules() -> dict[str, Path]:
    out = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            out[".".join([package, *rel.parts[:-1], *([] if rel.name == "__init__" else [rel.name])])] = path
    return out


def imports(path: Path, known) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found & set(known)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles():
    mods = modules()
    graph = {name: imports(path, mods) - {name} for name, path in mods.items()}
    assert cycles(graph) == []


def test_no_source_file_over_450_lines():
    sources = [*modules().values(), *(ROOT / "benchmarks").glob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in sources if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by concept: {long}"
