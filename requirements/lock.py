"""Write requirements/constraints.txt: the one version truth of every third-party package.

    python requirements/lock.py            # pin what the tested venv (.venv) has installed
    python requirements/lock.py --fresh    # resolve anew from the index (newest allowed versions)
                                           # in a throwaway venv, then pin that
    python requirements/lock.py --check    # exit 1 when .venv differs from the file

The file is a pip constraints file (`pip install -c`): `make install`, operator/Dockerfile,
trainer_image/Dockerfile and CI (.ci/run → make test) all install through it, so the tests, the
images and a fresh checkout get the same versions. torch is pinned by its public version (the
local label is dropped): the dev venv gets the CPU build from local disk, the trainer image the
CUDA build, both `torch==<version>`. A `# python_version:` line records the interpreter the
versions were resolved for; tests/unit/test_dockerfiles.py checks that the Makefile, this file
and both Dockerfiles agree.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "constraints.txt"
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
EXTRAS = "trainer,operator,dev,bench"
HEADER = """\
# The one version truth: every third-party package of the tested environment, pinned.
# A pip constraints file, used by `make install`, operator/Dockerfile, trainer_image/Dockerfile
# and CI. Regenerate with `python requirements/lock.py` (pins .venv as installed) or
# `python requirements/lock.py --fresh` (resolves the newest allowed versions); never edit by hand.
# torch==<version> matches the CPU build here and the CUDA build in the trainer image.
"""


def freeze(python: Path) -> dict[str, str]:
    """name → version of every distribution in a venv, the editable project left out."""
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--exclude-editable"],
                         capture_output=True, text=True, check=True).stdout
    pins = {}
    for line in out.splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            pins[m.group(1)] = m.group(2).split("+", 1)[0]  # 2.13.0+cpu → 2.13.0
    return pins


def python_version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()


def render(pins: dict[str, str], py: str) -> str:
    lines = [f"{name}=={version}" for name, version in sorted(pins.items(), key=lambda kv: kv[0].lower())]
    return HEADER + f"# python_version: {py}\n" + "\n".join(lines) + "\n"


def read(path: Path = LOCK) -> dict[str, str]:
    """The pins of a constraints file: name (as written) → version."""
    pins = {}
    for line in path.read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if m:
            pins[m.group(1)] = m.group(2)
    return pins


def fresh(torch: str) -> Path:
    """A throwaway venv with the project's extras resolved anew (no constraints); its python."""
    venv = Path(tempfile.mkdtemp(prefix="lock-venv-"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch}"], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", f"{ROOT}[{EXTRAS}]"], check=True)
    subprocess.run([str(py), "-m", "pip", "uninstall", "-q", "-y", "lora-operator"], check=True)
    return py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fresh", action="store_true", help="resolve anew in a throwaway venv")
    parser.add_argument("--torch", default=None, help="torch version for --fresh (default: the current pin)")
    parser.add_argument("--check", action="store_true", help="compare .venv with the file; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        want, have = read(), freeze(VENV_PYTHON)
        norm = {k.lower().replace("_", "-"): v for k, v in have.items()}
        diff = [f"{k}: locked {v}, installed {norm.get(k.lower().replace('_', '-'), 'nothing')}"
                for k, v in want.items() if norm.get(k.lower().replace("_", "-")) != v]
        print("\n".join(diff) or "the venv matches requirements/constraints.txt")
        return 1 if diff else 0
    python = fresh(args.torch or read().get("torch", "")) if args.fresh else VENV_PYTHON
    LOCK.write_text(render(freeze(python), python_version(python)))
    print(f"wrote {LOCK.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
