"""The layout's rules, checked on the source: imports point core <- merge <- pipeline and core <- serve, no
module cycles, the core loads without torch, and every list of stages is the one table in core/stages.py."""
from __future__ import annotations

import ast
import re
import subprocess
import sys

from conftest import REPO

PACKAGES = ("core", "merge", "pipeline", "serve")
# What each package may import of ours (besides itself).
ALLOWED = {"core": set(), "merge": {"core"}, "pipeline": {"core", "merge"}, "serve": {"core"}}
HEAVY = ("torch", "transformers", "trl", "peft", "vllm", "gradio", "mergekit", "datasets")


def module_name(path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def our_imports() -> dict[str, set[str]]:
    """Every module of ours -> the modules of ours it imports anywhere (top level or inside functions)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from core import cli` imports core.cli when that is a module
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            found |= {t for t in targets if t.split(".")[0] in PACKAGES}
        graph[name] = found - {name}
    return graph


def test_imports_point_one_way():
    wrong = [f"{mod} imports {dep}" for mod, deps in our_imports().items() for dep in deps
             if dep.split(".")[0] != mod.split(".")[0] and dep.split(".")[0] not in ALLOWED[mod.split(".")[0]]]
    assert wrong == [], "imports must point core <- merge <- pipeline and core <- serve:\n" + "\n".join(wrong)


def test_no_import_cycles():
    graph = our_imports()
    # A package's __init__ is imported with any of its modules; count only edges between real modules.
    edges = {m: {d for d in deps if d in graph and d not in PACKAGES} for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_core_imports_no_heavy_library():
    modules = sorted(m for m in our_imports() if m.startswith("core."))
    code = (f"import sys\nimport {', '.join(modules)}\n"
            f"print(','.join(sorted(m for m in {HEAVY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"importing core loads {out.stdout.strip()}"


def test_the_makefile_lists_the_stage_table():
    from core.stages import STAGES

    makefile = (REPO / "Makefile").read_text()
    targets = re.search(r"^(base .*): setup$", makefile, re.M).group(1).split()
    assert tuple(targets) == STAGES
    assert re.search(r"^#\s+setup -> validate -> (.*?)\s+\(then serve\)$", makefile, re.M).group(1).split(" -> ") \
        == list(STAGES)
