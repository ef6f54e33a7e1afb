"""The two Dockerfiles, read as text (no Docker engine needed).

Behaviours tested:
- every COPY source exists in the repository and is not excluded by .dockerignore;
- base images are pinned by tag (ARG defaults resolved), never `latest`;
- the final USER is a non-root uid;
- ENTRYPOINT names a console script declared in pyproject.toml [project.scripts], and the script
  resolves in the project's venv (and `lora-operator --help` runs once the CLI module exists);
- the operator image installs `.[operator]` only: no trainer extra, no torch;
- the trainer image installs torch first, then `.[trainer]`, and works in /scratch;
- one version truth: requirements/constraints.txt pins every dependency pyproject.toml declares
  and is what this venv has installed; `make install` and both Dockerfiles install through it,
  with its torch version (a CUDA build in the image, checked at build time) and its Python
  version (an official python image, a final release), so they cannot disagree;
- the operator (controller, spec, crd, cli) imports and renders the CRD with torch and the rest of
  the trainer extra made unimportable, as in its image.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"operator": REPO / "operator" / "Dockerfile", "trainer": REPO / "trainer_image" / "Dockerfile"}
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction, continuation lines joined."""

    keyword: str
    args: str


def parse(path: Path) -> list[Instruction]:
    """The instructions of a Dockerfile, comments dropped and `\\` continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


def args_defaults(instructions: list[Instruction]) -> dict[str, str]:
    """ARG name → default value."""
    defaults = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.args:
            name, _, value = ins.args.partition("=")
            defaults[name] = value.strip('"')
    return defaults


def substitute(text: str, defaults: dict[str, str]) -> str:
    """Expand ${NAME} and $NAME with ARG defaults."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: defaults.get(m.group(1), m.group(0)), text)


def of(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    """The instructions with one keyword."""
    return [ins for ins in instructions if ins.keyword == keyword]


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """The argument lists of every `pip install` in RUN lines, in order (options dropped)."""
    found = []
    for ins in of(instructions, "RUN"):
        for command in ins.args.split("&&"):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"] or words[1:4] == ["-m", "pip", "install"]:
                start = words.index("install") + 1
                found.append(_drop_options(words[start:]))
    return found


def _drop_options(words: list[str]) -> list[str]:
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in ("--index-url", "--extra-index-url", "-i", "-r", "-c"):
            skip = True
        elif not word.startswith("-"):
            kept.append(word)
    return kept


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore (last matching pattern wins, `!` re-includes) drops a path."""
    excluded = False
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        anywhere = pattern.startswith("**/")  # `**/x` matches x at any depth; `x` at the root only
        pattern = pattern.removeprefix("**/")
        parts = Path(relative).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(Path(p).name if anywhere else p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


PARSED = {name: parse(path) for name, path in DOCKERFILES.items()}


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_copy_sources_exist_and_reach_the_build_context(name: str) -> None:
    copies = [ins for ins in of(PARSED[name], "COPY") if not ins.args.startswith("--from")]
    assert copies
    for ins in copies:
        sources = [w for w in shlex.split(ins.args) if not w.startswith("--")][:-1]
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY source {source} is missing"
            assert not dockerignore_excludes(source), f"{name}: .dockerignore drops {source}"


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_base_images_are_pinned_by_tag(name: str) -> None:
    defaults = args_defaults(PARSED[name])
    for ins in of(PARSED[name], "FROM"):
        image = substitute(ins.args.split()[0], defaults)
        assert "$" not in image, f"{name}: unresolved base image {image}"
        repository, _, tag = image.rpartition(":")
        assert repository and "/" not in tag and tag not in ("", "latest"), f"{name}: {image} not pinned"


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_runs_as_non_root(name: str) -> None:
    users = of(PARSED[name], "USER")
    assert users, f"{name}: no USER"
    user = users[-1].args.split(":")[0]
    assert user.isdigit() and int(user) == 1000, f"{name}: USER {user} (want uid 1000)"


@pytest.mark.parametrize(("name", "script"), [("operator", "lora-operator"), ("trainer", "lora-train")])
def test_entrypoint_is_a_declared_console_script(name: str, script: str) -> None:
    (entrypoint,) = of(PARSED[name], "ENTRYPOINT")
    assert json.loads(entrypoint.args) == [script]
    assert script in SCRIPTS, f"{script} missing from [project.scripts]"


def test_operator_default_command_is_run() -> None:
    (cmd,) = of(PARSED["operator"], "CMD")
    assert json.loads(cmd.args) == ["run"]


@pytest.mark.parametrize("script", ["lora-operator", "lora-train"])
def test_console_scripts_resolve_in_the_venv(script: str) -> None:
    assert shutil.which(script, path=str(VENV_BIN)), f"{script} not in {VENV_BIN}: pip install -e '.[dev]'"


def test_lora_operator_help_runs() -> None:
    module = SCRIPTS["lora-operator"].split(":")[0]
    if (
        importlib.util.find_spec(module.rpartition(".")[0]) is None
        or importlib.util.find_spec(module) is None
    ):
        pytest.skip(f"{module} is not written yet")
    result = subprocess.run(
        [str(VENV_BIN / "lora-operator"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "run" in result.stdout


def test_operator_image_installs_no_trainer_and_no_torch() -> None:
    installs = pip_installs(PARSED["operator"])
    assert installs == [[".[operator]"]]
    text = DOCKERFILES["operator"].read_text()
    assert "[trainer]" not in text and not re.search(r"pip install[^\n]*torch", text)


def test_trainer_image_installs_cuda_torch_then_the_trainer() -> None:
    instructions = PARSED["trainer"]
    installs = pip_installs(instructions)
    torch_at = next(
        i
        for i, words in enumerate(installs)
        if any(w.startswith("torch") or w.startswith('"torch') for w in words)
    )
    trainer_at = installs.index([".[trainer]"])
    assert torch_at < trainer_at
    defaults = args_defaults(instructions)
    torch_runs = [substitute(ins.args, defaults) for ins in of(instructions, "RUN") if "torch==" in ins.args]
    assert len(torch_runs) == 1
    (run,) = torch_runs
    # PyPI's Linux torch wheels are CUDA builds; a download.pytorch.org index must be a CUDA one.
    index = re.search(r"--index-url\s+(\S+)", run)
    assert index and re.fullmatch(r"https://(pypi\.org/simple|download\.pytorch\.org/whl/cu\d+)/?", index.group(1)), run
    assert "assert torch.version.cuda" in run, "the build must fail on a CPU-only torch"
    assert of(instructions, "WORKDIR")[-1].args == "/scratch"


# --- one version truth --------------------------------------------------------------------------
LOCK = REPO / "requirements" / "constraints.txt"
LOCK_REL = "requirements/constraints.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_pins() -> dict[str, str]:
    """Normalised name → version of every pin in the lock."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            pins[_norm(m.group(1))] = m.group(2)
    return pins


def lock_python() -> str:
    m = re.search(r"^# python_version: (\d+\.\d+)$", LOCK.read_text(), re.M)
    assert m, f"{LOCK_REL} has no '# python_version: X.Y' line: regenerate it (python requirements/lock.py)"
    return m.group(1)


def declared_requirements() -> dict[str, str]:
    """Normalised name → requirement of everything pyproject.toml declares (core and extras)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    found = {}
    for req in [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]:
        name = re.match(r"[A-Za-z0-9_.\-]+", req)
        assert name
        found[_norm(name.group(0))] = req
    return found


def test_lock_pins_everything_pyproject_declares() -> None:
    pins = lock_pins()
    missing = sorted(set(declared_requirements()) - set(pins))
    assert not missing, f"{LOCK_REL} lacks {missing}: run `python requirements/lock.py` after `make install`"
    assert all(not version.endswith((".dev", "rc")) and "+" not in version for version in pins.values())


def test_the_tests_run_what_the_lock_pins() -> None:
    installed = {_norm(d.metadata["Name"]): d.version.split("+", 1)[0] for d in importlib.metadata.distributions()}
    differ = {name: (version, installed.get(name)) for name, version in lock_pins().items()
              if installed.get(name) != version}
    assert not differ, (f"this venv differs from {LOCK_REL} (locked, installed): {differ}; run `make install`, "
                        "or `python requirements/lock.py` to lock what is installed")
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" == lock_python(), "the tests run another Python than the lock's"


def test_make_install_goes_through_the_lock() -> None:
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make")
    out = subprocess.run([make, "-n", "-B", "install", "VENV=/nonexistent-venv"], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    installs = [line for line in out.splitlines() if " pip install " in line and "--upgrade pip" not in line]
    assert len(installs) == 2, out
    torch_line, project_line = installs
    assert f"-c {LOCK_REL}" in torch_line and f"-c {LOCK_REL}" in project_line
    assert re.search(rf"\btorch=={re.escape(lock_pins()['torch'])}(\s|$)", torch_line), torch_line
    assert "-e '.[trainer,operator,dev,bench]'" in project_line
    assert f'v == "{lock_python()}"' in out, "make install must check the venv's Python against the lock's"


@pytest.mark.parametrize("name", list(DOCKERFILES))
def test_dockerfiles_install_through_the_lock(name: str) -> None:
    instructions = PARSED[name]
    defaults = args_defaults(instructions)
    copied = [i for i, ins in enumerate(instructions) if ins.keyword == "COPY" and LOCK_REL in ins.args.split()]
    assert copied, f"{name}: {LOCK_REL} is not copied into the image"
    assert not dockerignore_excludes(LOCK_REL)
    for i, ins in enumerate(instructions):
        if ins.keyword != "RUN":
            continue
        for command in ins.args.split("&&"):
            if re.search(r"\bpip install\b", command):
                assert f"-c {LOCK_REL}" in command, f"{name}: `{command.strip()}` does not use the lock"
                assert copied[0] < i, f"{name}: pip install runs before the lock is copied"
    (base,) = [substitute(ins.args.split()[0], defaults) for ins in of(instructions, "FROM")]
    m = re.fullmatch(r"python:(\d+\.\d+)(\.\d+)?-slim-\w+", base)
    assert m, f"{name}: base image {base} is not an official python:X.Y-slim-<debian> image"
    assert m.group(1) == lock_python(), f"{name}: Python {m.group(1)}, the lock {lock_python()}"
    if name == "trainer":
        assert defaults["TORCH_VERSION"] == lock_pins()["torch"], (
            f"trainer image torch {defaults['TORCH_VERSION']}, the lock and the tests {lock_pins()['torch']}")


def test_lock_carries_no_torch_for_the_operator_image_to_pick_up() -> None:
    """Constraints never install anything: the operator image gets torch only if `.[operator]` wants it."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    operator_side = [*project["dependencies"], *project["optional-dependencies"]["operator"]]
    assert not [r for r in operator_side if _norm(re.match(r"[A-Za-z0-9_.\-]+", r).group(0)) == "torch"]


BLOCKER = """
import importlib.abc, sys
BLOCKED = set({blocked!r})
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed in the operator image")
        return None
sys.meta_path.insert(0, Blocker())
"""
# The trainer extra's import names (what the operator image does not have).
TRAINER_ONLY = ["torch", "diffusers", "transformers", "peft", "safetensors", "tensorboard", "PIL", "numpy", "tqdm",
                "accelerate", "huggingface_hub"]


def test_operator_imports_without_torch(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(blocked=TRAINER_ONLY))
    code = (
        "import sys\n"
        "try:\n    import torch\nexcept ImportError as e:\n    print('blocked:', e)\nelse:\n    sys.exit('torch imported')\n"
        "import lora_operator.controller, lora_operator.spec, lora_operator.crd, lora_operator.cli\n"
        "from lora_operator.crd import render_crd\n"
        "assert 'LoRATrainingJob' in render_crd()\n"
        "assert lora_operator.cli.main(['crd']) == 0\n"
        f"loaded = sorted(m for m in sys.modules if m.partition('.')[0] in {TRAINER_ONLY!r})\n"
        "assert not loaded, loaded\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = f"{tmp_path}:{REPO}"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "blocked: torch is not installed in the operator image" in result.stdout
    assert "kind: CustomResourceDefinition" in result.stdout
