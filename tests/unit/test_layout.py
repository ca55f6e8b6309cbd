"""The code's layout as its architecture: the listing, no import circles, one way to report an exception."""

import ast
import re

from tests.helpers import REPO

PACKAGES = ("train", "models")


def module_imports() -> dict[str, set[str]]:
    """Each module of train/ and models/ -> the modules of both it imports, lazy and TYPE_CHECKING imports too."""
    files = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            files[name.removesuffix(".__init__")] = path
    edges: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return edges


def test_no_import_circle_in_train_or_models():
    edges = module_imports()
    assert len(edges) > 40  # the walk found the modules

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges[todo.pop()] - seen:
                if nxt == goal:
                    return True
                seen.add(nxt)
                todo.append(nxt)
        return False

    circles = sorted({tuple(sorted((a, b))) for a in edges for b in edges[a] if reaches(b, a)})
    assert circles == []


def test_train_lists_the_commands_the_composition_and_the_concerns():
    modules = sorted(p.name for p in (REPO / "train").glob("*.py") if p.name != "__init__.py")
    packages = sorted(p.name for p in (REPO / "train").iterdir() if (p / "__init__.py").exists())
    assert len(modules) <= 9, modules  # 7 commands (python -m train.X), build.py and errors.py
    assert packages == ["checkpoint", "config", "data", "distributed", "observe", "planning", "preference"]
    for package in packages:  # each says in its docstring what it owns
        assert ast.get_docstring(ast.parse((REPO / "train" / package / "__init__.py").read_text()))


def test_one_way_to_turn_an_exception_into_its_line():
    offenders = [
        f"{path.relative_to(REPO)}:{number}"
        for package in (*PACKAGES, "bench")
        for path in (REPO / package).rglob("*.py")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"splitlines\(\)(\s*or\s*\[[^\]]*\]\))?\[0\]", line) and path != REPO / "models" / "errors.py"
    ]
    assert offenders == []


def test_first_line_of_an_exception_with_an_empty_message_is_its_type():
    from train.errors import first_line

    assert first_line(AssertionError()) == "AssertionError"
    assert first_line(ValueError("  \n")) == "ValueError"
    assert first_line(OSError("no such file\nmore detail")) == "no such file"
