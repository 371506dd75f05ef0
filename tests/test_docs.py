"""The documentation holds each fact once and names only what exists.

Pages are README.md and docs/*.md. A sentence is what lies between ". " (or a line break that ends a paragraph, a
list item or a table row) once fenced code blocks are removed and whitespace is normalised; table rows count like
prose. Names are dotted `llava_ui.` names in the pages and in the docstrings and comments of llava_ui/, plus, in
llava_ui/, names that start with one of its modules (`qwen2.project`, `kernels.Bf16Matrix`) and `.py` files.
"""
import ast
import importlib
import io
import pkgutil
import re
import tokenize
from collections import defaultdict
from pathlib import Path

import llava_ui

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LONG = 80
API_FIELDS = {"llava_ui.dropped_turns"}  # the /v1 response's `llava_ui` object, not a module
MODULES = {info.name for info in pkgutil.walk_packages(llava_ui.__path__, "llava_ui.")}
BY_BASENAME = defaultdict(set)
for _module in MODULES:
    BY_BASENAME[_module.rsplit(".", 1)[-1]].add(_module)
FULL_NAME = re.compile(r"\bllava_ui(?:\.[A-Za-z_]\w*)+")
SHORT_NAME = re.compile(r"(?<![\w./-])([a-z_][a-z0-9_]*(?:\.[A-Za-z_]\w*)+)")


def sentences(markdown: str) -> list[str]:
    text = re.sub(r"^```.*?^```", "", markdown, flags=re.S | re.M)
    units, paragraph = [], []
    for line in text.splitlines():
        starts_unit = not line.strip() or re.match(r"\s*([-*] |\d+\. |#|\||>)", line)
        if starts_unit and paragraph:
            units.append(" ".join(paragraph))
            paragraph = []
        if line.strip():
            paragraph.append(line.strip())
    units.append(" ".join(paragraph))
    units = [re.sub(r"^([-*] |\d+\. |#+ |> )", "", " ".join(unit.split())) for unit in units]
    return [sentence.strip().rstrip(".") for unit in units for sentence in unit.split(". ")]


def test_no_long_sentence_stands_in_two_pages():
    pages_of = defaultdict(set)
    for page in PAGES:
        for sentence in sentences(page.read_text()):
            if len(sentence) >= LONG:
                pages_of[sentence].add(page.relative_to(ROOT).as_posix())
    copies = {s: sorted(p) for s, p in pages_of.items() if len(p) > 1}
    assert not copies, "\n".join(f"{pages}: {sentence[:160]}" for sentence, pages in copies.items())


def resolves(name: str) -> bool:
    """`name` is a module, or a module's attribute (of an attribute ...)."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module not in MODULES and module != "llava_ui":
            continue
        target = importlib.import_module(module)
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring in a Python file."""
    source = path.read_text()
    found = [(tok.start[0], tok.string) for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=False)
            if docstring:
                found.append((node.body[0].lineno if node.body else 1, docstring))
    return found


def short_name_resolves(name: str) -> bool:
    """`qwen2.project` or `model/packed.py`-style `packed.py`: some module of that basename has it."""
    first, _, rest = name.partition(".")
    if rest == "py":
        return first in BY_BASENAME
    if rest.split(".")[0] in ("json", "md", "txt", "safetensors", "pdparams"):
        return True  # a file name, not a Python name
    return any(resolves(f"{module}.{rest}") for module in BY_BASENAME[first])


def test_every_name_in_docs_docstrings_and_comments_resolves():
    dead = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            dead += [f"{page.relative_to(ROOT)}:{number}: {name}" for name in FULL_NAME.findall(line)
                     if name not in API_FIELDS and not resolves(name)]
    for path in sorted((ROOT / "llava_ui").rglob("*.py")):
        for number, text in prose(path):
            where = f"{path.relative_to(ROOT)}:{number}"
            dead += [f"{where}: {name}" for name in FULL_NAME.findall(text) if not resolves(name)]
            dead += [f"{where}: {name}" for name in SHORT_NAME.findall(text)
                     if name.split(".")[0] in BY_BASENAME and not short_name_resolves(name)]
    assert not dead, "names that do not resolve:\n" + "\n".join(dead)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings (outside code blocks)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def test_every_link_between_the_pages_arrives():
    """Relative links (and their #anchors) in README.md and docs/*.md name files and headings that exist."""
    broken = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)|src=\"([^\"]+)\"", text):
            target = target[0] or target[1]
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_the_checks_catch_a_copy_and_a_dead_name():
    sentence = "A sentence long enough to count, repeated on two pages, which the first test above refuses to see"
    assert sentence in sentences(f"# One\n\nIntro. {sentence}.\n") and sentence in sentences(f"- {sentence}\n")
    wrapped = sentence.replace(" repeated", "\nrepeated")
    assert sentence in sentences(f"Intro, wrapped\nover two lines. {wrapped}. More\n")
    assert resolves("llava_ui.checkpoints.hub.unreachable") and resolves("llava_ui.model")
    assert not resolves("llava_ui.caches.PrefixCache") and not resolves("llava_ui.language")
    assert short_name_resolves("qwen2.Qwen2Runner") and not short_name_resolves("qwen2.no_such_thing")
