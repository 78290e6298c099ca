"""What each room may import.

The subprocess checks: what servers import stays light (no torch or transformers in the runtime,
nothing GPU-only at import). The source checks: every `pcee` import of every room, read from its
syntax tree, against the import rules of docs/ARCHITECTURE.md, which this file reads, so the two
cannot drift apart.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

CASES = {
    "runtime": (
        ["pcee.runtime", "pcee.runtime.cli", "pcee.runtime.backends.onnxruntime_cpu"],
        ["torch", "transformers"],
    ),
    "calibration": (
        ["pcee.calibration.cli", "pcee.calibration.report"],
        ["torch", "transformers", "matplotlib"],
    ),
    "serving": (["pcee.serving", "pcee.serving.cli"], ["torch", "transformers", "tensorrt"]),
    "gpu backends": (
        ["pcee.runtime.backends.tensorrt", "pcee.runtime.backends.onnxruntime_cuda"],
        ["torch", "tensorrt", "cuda"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_modules_do_not_import_heavy_packages(case):
    modules, forbidden = CASES[case]
    check = (
        f"import sys, {', '.join(modules)}\n"
        f"print(','.join(sorted(n for n in sys.modules if n.split('.')[0] in {forbidden!r})))"
    )
    completed = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "", f"{case} imported: {completed.stdout.strip()}"


# -- the import rules of docs/ARCHITECTURE.md, checked on the source -----------------------------------
ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
RUNTIME = "runtime"


@dataclass(frozen=True)
class Rules:
    allowed: dict[str, dict[str, frozenset[str] | None]]  # room -> room it may import -> names (None: any)
    exceptions: dict[str, frozenset[str]]  # a file -> runtime modules beyond the public surface it may import
    runtime_names: frozenset[str]  # pcee.runtime's __all__


@dataclass(frozen=True)
class PceeImport:
    line: int
    module: str  # absolute, e.g. "pcee.runtime.graphs"
    names: tuple[str, ...]  # what `from module import ...` takes; empty for `import module`


def indented_block_after(text: str, heading: str) -> list[str]:
    """The indented lines of the first code block after the paragraph that holds `heading`."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("    "))
    block = []
    for line in lines[start:]:
        if line.strip() and not line.startswith("    "):
            break
        block.append(line.strip())
    return [line for line in block if line]


def split_outside_parentheses(text: str) -> list[str]:
    return [part.strip() for part in re.split(r",(?![^(]*\))", text) if part.strip()]


def parse_arrows(lines: list[str]) -> dict[str, dict[str, frozenset[str] | None]]:
    """`a, b  ->  runtime (X, Y), modeling`: a and b may import modeling, and from runtime only X and Y."""
    allowed = {}
    for line in lines:
        importers, targets = (side.strip() for side in line.split("->"))
        may_import = {}
        for target in split_outside_parentheses(targets):
            if target.startswith("("):  # "(nothing of pcee)"
                continue
            room, _, names = target.partition("(")
            may_import[room.strip()] = frozenset(re.findall(r"\w+", names)) if names else None
        for importer in split_outside_parentheses(importers):
            allowed[importer] = may_import
    return allowed


def parse_exceptions(text: str) -> dict[str, frozenset[str]]:
    """Rows `| path | modules | why |` of the table under '## Exceptions'."""
    section = text[text.index("## Exceptions") :].split("\n## ")[0]
    exceptions = {}
    for row in section.splitlines():
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            path = cells[0].strip("`")
            exceptions[path] = frozenset(re.findall(r"`(pcee\.[\w.]+)`", cells[1]))
    return exceptions


def runtime_public_names() -> frozenset[str]:
    tree = ast.parse((ROOT / RUNTIME / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return frozenset(ast.literal_eval(node.value))
    raise AssertionError("runtime/__init__.py has no __all__")


def read_rules() -> Rules:
    text = ARCHITECTURE.read_text()
    return Rules(
        parse_arrows(indented_block_after(text, "The one direction of imports")),
        parse_exceptions(text),
        runtime_public_names(),
    )


def rooms() -> list[str]:
    return sorted(path.parent.name for path in ROOT.glob("*/__init__.py"))


def room_files(room: str) -> list[Path]:
    return sorted((ROOT / room).rglob("*.py"))


def package_of(path: Path) -> str:
    """pcee.<room>[.sub] for a file of a room (runtime/backends/tensorrt.py -> pcee.runtime.backends)."""
    return ".".join(["pcee", *path.relative_to(ROOT).parent.parts])


def is_module(module: str) -> bool:
    """Whether `pcee.a.b` names a module or package of this project (`from pcee.a import b` imports it)."""
    path = ROOT.joinpath(*module.split(".")[1:])
    return module.startswith("pcee.") and (path.with_suffix(".py").is_file() or path.is_dir())


def pcee_imports(source: str, package: str) -> list[PceeImport]:
    """Every import of a pcee module in `source`, top level or inside functions, relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [PceeImport(node.lineno, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            modules = [name for name in (alias.name for alias in node.names) if is_module(f"{module}.{name}")]
            names = tuple(alias.name for alias in node.names if alias.name not in modules)
            found += [PceeImport(node.lineno, f"{module}.{name}", ()) for name in modules]
            if names:
                found.append(PceeImport(node.lineno, module, names))
    return [found_import for found_import in found if found_import.module.startswith("pcee.")]


def problems_of(imported: PceeImport, room: str, path: str, rules: Rules) -> list[str]:
    target = imported.module.split(".")[1]
    if target == room:
        return []
    if target not in rules.allowed[room]:
        return [
            f"imports {imported.module}, but ARCHITECTURE.md lets {room} import only {sorted(rules.allowed[room])}"
        ]
    if target != RUNTIME or imported.module in rules.exceptions.get(path, ()):
        return []
    if imported.module != f"pcee.{RUNTIME}":
        return [f"imports {imported.module}; import its names from pcee.runtime (the public surface) instead"]
    private = [name for name in imported.names if name not in rules.runtime_names]
    restricted = rules.allowed[room][RUNTIME]
    outside = [name for name in imported.names if restricted is not None and name not in restricted]
    return [f"imports {name} from pcee.runtime, which is not in its __all__" for name in private] + [
        f"imports {name} from pcee.runtime, but ARCHITECTURE.md lets {room} take only {sorted(restricted)}"
        for name in outside
    ]


def violations(source: str, room: str, path: str, rules: Rules) -> list[str]:
    package = package_of(ROOT / path)
    return [
        f"{path}:{imported.line}: {problem}"
        for imported in pcee_imports(source, package)
        for problem in problems_of(imported, room, path, rules)
    ]


def test_the_architecture_names_every_room_and_only_real_exceptions():
    rules = read_rules()
    assert sorted(rules.allowed) == rooms()
    assert all(set(targets) <= set(rooms()) for targets in rules.allowed.values())
    assert rules.allowed[RUNTIME] == {}, "the runtime imports no other room"
    for path, modules in rules.exceptions.items():
        assert (ROOT / path).is_file() and modules, f"exception {path}: no such file or no module named"
        for module in modules:
            assert (ROOT / Path(*module.split(".")[1:])).with_suffix(".py").is_file(), module


@pytest.mark.parametrize("room", rooms())
def test_each_room_imports_only_what_the_architecture_allows(room):
    rules = read_rules()
    found = [
        problem
        for path in room_files(room)
        for problem in violations(path.read_text(), room, str(path.relative_to(ROOT)), rules)
    ]
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    "room, source, says",
    [
        (
            "serving",
            "from pcee.modeling.data import load_data",
            "but ARCHITECTURE.md lets serving import only",
        ),
        ("exporter", "from pcee.runtime.graphs import LOGITS", "import its names from pcee.runtime"),
        ("calibration", "import pcee.runtime.backends.tensorrt", "import its names from pcee.runtime"),
        ("benchmarks", "from pcee.runtime import graphs", "imports pcee.runtime.graphs; import its names"),
        ("serving", "from pcee.runtime import cpu_session_options", "which is not in its __all__"),
        ("modeling", "from pcee.runtime import Manifest", "lets modeling take only"),
        ("runtime", "from .. import modeling", "lets runtime import only []"),
        (
            "demo",
            "def main():\n    from pcee.runtime.loop import replay",
            "demo/cli.py:2: imports pcee.runtime.loop",
        ),
    ],
)
def test_the_check_catches_a_forbidden_import(room, source, says):
    found = violations(source, room, f"{room}/cli.py", read_rules())
    assert any(says in problem for problem in found), found


def runtime_module_order() -> list[str]:
    """The modules of 'Inside the runtime' in ARCHITECTURE.md, in the order that lets each import the earlier."""
    lines = indented_block_after(
        ARCHITECTURE.read_text(), "each module imports only the ones listed before it"
    )
    return [line.split()[0].rstrip("/") for line in lines]


def runtime_module_of(module: str) -> str:
    """pcee.runtime.backends.tensorrt -> backends; pcee.runtime.loop -> loop."""
    return module.split(".")[2]


def test_each_runtime_module_imports_only_those_listed_before_it():
    order = runtime_module_order()
    found = []
    for path in room_files(RUNTIME):
        if path.parent == ROOT / RUNTIME and path.name == "__init__.py":
            continue  # the public surface gathers every module
        relative = path.relative_to(ROOT / RUNTIME)
        module = relative.parts[0] if len(relative.parts) > 1 else path.stem
        if module not in order:
            found.append(f"runtime/{relative}: not listed under 'Inside the runtime' in ARCHITECTURE.md")
            continue
        for imported in pcee_imports(path.read_text(), package_of(path)):
            used = runtime_module_of(imported.module) if imported.module.count(".") >= 2 else "the package"
            if used != module and (used not in order or order.index(used) > order.index(module)):
                found.append(f"runtime/{relative}:{imported.line}: {module} imports {used}, listed after it")
    assert not found, "\n".join(found)
