"""The layout's rules, read from the source (every import, also those inside functions): imports
follow the data (tools → pipelines/train, train → pipelines, never back), no import circle anywhere,
and every module named by a console script exists."""
from __future__ import annotations

import ast
import configparser
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = ("pipelines", "tools", "train")
MAY_IMPORT = {"pipelines": set(), "train": {"pipelines"}, "tools": {"pipelines", "train"}}


def modules() -> dict[str, Path]:
    out = {}
    for room in ROOMS:
        for path in sorted((REPO / room).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports: `from a.b import c` is a.b.c when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in ROOMS and n in known)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_imports_follow_the_data():
    wrong = [f"{m} imports {d}" for m, deps in graph().items() for d in deps
             if d.split(".")[0] != m.split(".")[0] and d.split(".")[0] not in MAY_IMPORT[m.split(".")[0]]]
    assert not wrong, wrong


def test_no_import_circle():
    g = graph()
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan: every strongly connected component of more than one module is a circle
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_console_scripts_point_at_modules():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    scripts = [line.split("=") for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines()]
    for name, target in scripts:
        module, func = target.strip().split(":")
        assert importlib.util.find_spec(module) is not None, (name, module)
        assert f"def {func}(" in Path(importlib.util.find_spec(module).origin).read_text(), (name, target)


def test_paths_the_moved_modules_compute_exist():
    """Modules that find repository files from their own location (they moved one folder down)."""
    from tools.bench import bench_convert, bench_train_e2e
    from tools.demo import demo
    from train.model import MODEL_CONFIGS
    assert Path(demo.CONFIG).is_file() and (bench_convert.REPO / "setup.cfg").is_file()
    assert (bench_train_e2e.REPO / "setup.cfg").is_file()
    assert Path(MODEL_CONFIGS, "lip-demo.json").is_file()
    found = [p for p in REPO.glob("*/**/*.py") if p.parts[len(REPO.parts)] in ROOMS and "__file__" in p.read_text()]
    assert sorted(str(p.relative_to(REPO)) for p in found) == [
        "tools/bench/bench_convert.py", "tools/bench/bench_train_e2e.py", "tools/demo/demo.py", "train/model.py"], \
        "a new __file__ path: test it here"


def test_the_core_model_imports_no_variant():
    """Variants hook into the built model (token pruning sets `DualPathCLIP.image_guide`); the model
    itself depends on none of them."""
    deps = graph()["train.model"]
    assert not [d for d in deps if d.startswith("train.variants")], sorted(deps)
