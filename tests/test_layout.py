"""The package's layers: the chat side, the remote front end, the API and the web chat import without Paddle, and
no module imports one that stands above it."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llava_ui"
# bottom to top: a module may import its own folder and the folders before it
LAYERS = ["errors", "config", "chat", "model", "checkpoints", "backends", "engine", "openai", "web", "eval", "commands"]


@pytest.mark.parametrize("module", ["llava_ui.chat", "llava_ui.chat.conversation", "llava_ui.chat.prompt",
                                    "llava_ui.chat.media", "llava_ui.chat.export", "llava_ui.backends.remote",
                                    "llava_ui.openai.server", "llava_ui.openai.fetch", "llava_ui.web.page",
                                    "llava_ui.commands.serve", "llava_ui.commands.main"])
def test_the_light_side_imports_without_paddle_or_paddlenlp(module):
    code = (f"import sys, {module}\n"
            "print(sorted(m for m in ('paddle', 'paddlenlp') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def layer(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else ""
    return LAYERS.index(part) if part in LAYERS else -1


def imports(path: Path):
    """(imported llava_ui module, line, inside a function) for every import in a file."""
    tree = ast.parse(path.read_text())
    functions = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llava_ui"):
            names = [node.module] if node.module.count(".") >= 1 else [f"llava_ui.{a.name}" for a in node.names]
            for name in names:
                yield name, node.lineno, id(node) in functions


def test_no_module_imports_one_that_stands_above_it():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = layer(module)
        for imported, line, _ in imports(path):
            if imported != "llava_ui" and layer(imported) > own >= 0:
                upward.append(f"{module}:{line} imports {imported}")
    assert upward == []


def test_no_import_circles():
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        graph[module] = {name for name, _, _ in imports(path)} - {"llava_ui"}

    def visit(module, trail):
        if module in trail:
            return trail[trail.index(module):] + [module]
        for imported in sorted(graph.get(module, ())):
            cycle = visit(imported, trail + [module])
            if cycle:
                return cycle
        return None

    cycles = [visit(module, []) for module in sorted(graph)]
    assert [c for c in cycles if c] == []
