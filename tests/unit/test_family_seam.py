"""The family seam is the only place that knows SDXL (or Flux) exists.

Behaviours tested (by reading the source of the trainer and the operator, no imports), for each
image family added behind the seam (`sdxl`, `flux`; parametrized):
- outside the family's own modules (tasks/<family>.py, tiny_<family>.py), no code names it: no
  identifier containing `sdxl` (import, function, variable, attribute, argument) and no string
  constant equal to the family's name `sdxl` (what a `family == "sdxl"` branch, a dict keyed by it
  or a getattr would need). Prose that mentions SDXL (docstrings, comments, field descriptions for
  the CRD) is documentation and is not counted;
- the few places that must name it do so only inside one named scope each: the registry table
  (tasks.REGISTRY), the user-facing enum of family names (config.ModelFamily, kept equal to the
  registry by test_tasks), the single-file checkpoint classifier (single_file.family_from_keys, which
  turns key layouts into kind names the registry maps to families) and the tiny-model CLI
  (tiny.main, `python -m lora_trainer.tiny sdxl PATH`);
- the scanner itself finds a planted branch, a planted import and a planted dict key.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (ROOT / "trainer_image" / "lora_trainer", ROOT / "operator" / "lora_operator")
FAMILY = "sdxl"
# The families held to the rule (SD 1.5 predates the seam and is the default, so it is not one).
FAMILIES = ("sdxl", "flux")


def own(family: str) -> set[str]:
    """The family's own modules: anything goes there."""
    return {f"trainer_image/lora_trainer/tasks/{family}.py", f"trainer_image/lora_trainer/tiny_{family}.py"}

# file -> the one top-level scope (assignment target or function) where the family's name may appear.
SCOPED = {
    "trainer_image/lora_trainer/tasks/__init__.py": "REGISTRY",
    "trainer_image/lora_trainer/config.py": "ModelFamily",
    "trainer_image/lora_trainer/single_file.py": "family_from_keys",
    "trainer_image/lora_trainer/tiny.py": "main",
}


def mentions(tree: ast.AST, word: str = FAMILY) -> list[tuple[int, str]]:
    """(line, what) for every identifier containing `word` and every string constant equal to it."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip().lower() == word:
            found.append((node.lineno, repr(node.value)))
        for attr in ("id", "attr", "name", "asname", "module", "arg"):
            value = getattr(node, attr, None)
            if isinstance(value, str) and word in value.lower():
                found.append((getattr(node, "lineno", 0), f"{type(node).__name__} {value}"))
    return found


def scope_lines(tree: ast.Module, name: str) -> range:
    """Lines of the top-level function, class or assignment called `name`."""
    for node in tree.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        if name in targets:
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
            return range(start, node.end_lineno + 1)
    raise AssertionError(f"no top-level {name}")


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in pkg.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_packages_are_scanned(family: str) -> None:
    names = {p.relative_to(ROOT).as_posix() for p in sources()}
    assert own(family) | set(SCOPED) <= names
    assert "trainer_image/lora_trainer/train.py" in names and "operator/lora_operator/controller.py" in names


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_seam_names_the_family(family: str) -> None:
    leaks = []
    for path in sources():
        rel = path.relative_to(ROOT).as_posix()
        if rel in own(family):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        allowed = scope_lines(tree, SCOPED[rel]) if rel in SCOPED else range(0)
        leaks += [f"{rel}:{line}: {what}" for line, what in mentions(tree, family) if line not in allowed]
    assert leaks == [], f"{family} named outside its family module; move it behind tasks/ (the Family protocol):\n" + \
        "\n".join(leaks)


@pytest.mark.parametrize("planted", [
    'if config.model_family == "sdxl":\n    pass\n',
    "from lora_trainer.tasks.sdxl import time_ids\n",
    'EXTRA = {"sdxl": 1024}\n',
    "def is_sdxl(x):\n    return x\n",
    'if family == "flux":\n    pass\n',
    "from lora_trainer.tasks.flux import pack_latents\n",
])
def test_the_scanner_finds_a_planted_leak(planted: str) -> None:
    assert mentions(ast.parse(planted), "flux" if "flux" in planted else FAMILY)


def test_prose_is_not_a_leak() -> None:
    prose = 'def f():\n    """Works for SDXL too."""\n    # sdxl: fine\n    return "512 for SD, 1024 for SDXL"\n'
    assert mentions(ast.parse(prose)) == []
