"""The seams the code is built on: the import graph of launcher/ and trainer/ has no cycle (lazy
imports inside functions count), the launcher imports no torch, the trainer's entry point stays
readable, and the run-dir layout is spelled in one module."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PACKAGES = ("launcher", "trainer")


def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p
            for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (top level, in functions,
    under TYPE_CHECKING), packages' __init__ left out."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
            for name in names:
                if name in mods and name != mod and not name.endswith("__init__"):
                    graph[mod].add(name)
    return graph


def find_cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 25 and "trainer.loop" in graph["trainer.finish"]  # the walk really sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = import_graph()
    graph["trainer.data"] = graph["trainer.data"] | {"trainer.loop"}  # loop -> data -> loop
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1]


def test_launcher_never_imports_the_trainer():
    graph = import_graph()
    assert not [(m, n) for m, deps in graph.items() if m.startswith("launcher.") for n in deps
                if n.startswith("trainer.")]


def test_importing_every_launcher_module_loads_no_torch():
    mods = [m for m in _modules() if m.startswith("launcher.") and not m.endswith("__init__")]
    code = f"import sys, {', '.join(mods)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_entry_point_reads_top_to_bottom_in_200_lines():
    assert len((ROOT / "trainer" / "main.py").read_text().splitlines()) <= 200


def test_run_dir_file_names_are_spelled_only_in_rundir():
    """A literal run-dir name ("checkpoints", "DONE", ...) in code outside launcher/rundir.py means a
    second place that knows the layout."""
    names = ["config.yaml", "ds_config.json", "finetune.sh", "world.json", "metrics.jsonl", "loss_curve.png",
             "checkpoints", "adapter", "export", "STOP", "DONE", "_generated_by"]
    pattern = re.compile(r"""["'](%s)["']""" % "|".join(map(re.escape, names)))
    hits = []
    for mod, path in _modules().items():
        if mod == "launcher.rundir":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(repr(node.value)):
                hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not hits, hits
