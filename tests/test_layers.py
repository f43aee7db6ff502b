"""The package layers are one-way and public: a module imports only from its own layer or the layers below it,
and never a private name (``_x``) or a private module of another module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# bottom to top: shared infrastructure, the BCM core, attacks, classifiers, the command-line experiments
LAYERS = ("purify.infra", "purify", "attacks", "classifiers", "bench")


def layer(module: str) -> int | None:
    matches = [i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + ".")]
    return max(matches, key=lambda i: len(LAYERS[i])) if matches else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, text: str | None = None) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in ``path`` (or ``text`` as that file), relative
    ones resolved."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text, str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


def sources() -> list[Path]:
    return sorted(path for top in ("purify", "attacks", "classifiers", "bench") for path in (ROOT / top).rglob("*.py"))


def violations(path: Path, text: str | None = None) -> list[str]:
    own = module_name(path)
    problems = []
    for line, target, names in imports(path, text):
        if layer(target) is None:
            continue
        where = f"{path.relative_to(ROOT)}:{line}"
        if layer(target) > layer(own):
            problems.append(f"{where}: {own} ({LAYERS[layer(own)]}) imports {target} from the layer above")
        private = [part for part in target.split(".") if part.startswith("_") and part != "__init__"]
        private += [name for name in names if name.startswith("_") and not name.startswith("__")]
        if private and target != own:
            problems.append(f"{where}: {own} imports the private {', '.join(private)} of {target}")
    return problems


def test_every_source_file_is_in_a_layer():
    assert sources() and all(layer(module_name(path)) is not None for path in sources())


def test_layers_are_one_way_and_public():
    problems = [problem for path in sources() for problem in violations(path)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text, problem", [
    ("from purify.defences import Vote\n", "from the layer above"),             # infra reaching into the core
    ("from attacks.eot import _helper\n", "private _helper"),                   # a private name
    ("from classifiers import train\n", "from the layer above"),
])
def test_the_check_sees_back_edges_and_private_names(text, problem):
    assert any(problem in line for line in violations(ROOT / "purify" / "infra" / "probe.py", text))


def test_relative_imports_resolve_to_their_package():
    path = ROOT / "purify" / "infra" / "probe.py"
    found = [(target, names) for _, target, names in imports(path, "from .checkpoint import a\nfrom ..bcm import b\n")]
    assert found == [("purify.infra.checkpoint", ["a"]), ("purify.bcm", ["b"])]
    assert violations(path, "from ..bcm import b\n")  # the core is above infra


def is_command(path: Path) -> bool:
    """A bench command: a module run as ``python -m bench.X`` (it has an ``if __name__ == "__main__"`` block)."""
    return path.parent.name == "bench" and '__name__ == "__main__"' in path.read_text()


def test_no_bench_command_imports_another_command():
    commands = {module_name(path) for path in sources() if is_command(path)}
    assert {"bench.transfer", "bench.adaptive", "bench.quality"} <= commands
    problems = [f"{path.relative_to(ROOT)}:{line}: imports the command {imported}"
                for path in sources() if "bench" in path.relative_to(ROOT).parts
                for line, target, names in imports(path)
                for imported in [target, *(f"{target}.{name}" for name in names)]
                if imported in commands and imported != module_name(path)]
    assert not problems, "\n".join(problems)
