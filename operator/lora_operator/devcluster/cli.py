"""`lora-operator dev`: a local dev cluster (S3 + Kubernetes API + pod runner) on 127.0.0.1.

    lora-operator dev up [--state-dir .dev] [--s3-port 9000] [--api-port 0] [--kube auto|real|emulator] [--foreground]
    lora-operator dev status [--state-dir .dev]
    lora-operator dev reclaim NAMESPACE/POD [--reason TerminationByKubelet]
    lora-operator dev down [--state-dir .dev]

`up` starts the cluster in a detached background process (its log: `<state dir>/devcluster.log`)
and returns once the API and S3 answer; `--foreground` runs it attached until Ctrl-C. `--kube real`
runs a real control plane (etcd, kube-apiserver, kube-controller-manager from KUBEBUILDER_ASSETS),
`--kube emulator` the Kubernetes API emulator; `auto` (the default) picks real when the binaries
are found. Exit codes:
0 done, 1 the cluster is not running (status, reclaim) or failed to start, 2 bad usage.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lora_operator.devcluster.cluster import (
    DEFAULT_S3_PORT,
    KUBE_CHOICES,
    KUBE_WORDS,
    KUBECONFIG_FILE,
    STATE_FILE,
    DevCluster,
    DevClusterError,
    annotate_reclaim,
    answers,
    parse_pod_ref,
    read_state,
)

LOG_FILE = "devcluster.log"
START_TIMEOUT = 180.0  # seconds `up` waits for the background cluster (imports, and a real control plane)
STOP_TIMEOUT = 20.0  # seconds `down` waits after SIGTERM before SIGKILL
QUIET_LOGGERS = ("aiohttp.access", "werkzeug", "urllib3", "botocore", "kubernetes")  # one line per request


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-operator dev", description="A local dev cluster on 127.0.0.1.")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the dev cluster (in the background unless --foreground)")
    up.add_argument("--s3-port", type=int, default=DEFAULT_S3_PORT, help="S3 port (default %(default)s; 0 picks one)")
    up.add_argument("--api-port", type=int, default=0, help="Kubernetes API port (default: a free one)")
    up.add_argument("--kube", choices=KUBE_CHOICES, default="auto",
                    help="the Kubernetes API: a real control plane from KUBEBUILDER_ASSETS, or the emulator "
                         "(default auto: real when the binaries are found)")
    up.add_argument("--foreground", action="store_true", help="run attached until Ctrl-C")
    up.add_argument("--log-file", help=argparse.SUPPRESS)  # set by `up` for its background process
    for name, text in (("status", "show whether it runs and where"), ("down", "stop it")):
        sub.add_parser(name, help=text)
    reclaim = sub.add_parser("reclaim", help="reclaim a pod like a spot node shutdown (SIGTERM, grace, exit)")
    reclaim.add_argument("pod", help="NAMESPACE/POD, e.g. default/tiny-job-a1")
    reclaim.add_argument("--reason", help="DisruptionTarget reason (default TerminationByKubelet)")
    for sp in sub.choices.values():
        sp.add_argument("--state-dir", default=".dev", help="where kubeconfig, state.json and pods live (default %(default)s)")
    return parser


def _exited(pid: int) -> bool:
    """True when `pid` is gone, or exited and waiting to be reaped (a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def _ours(pid: Any) -> bool:
    """True when `pid` is a live `lora-operator dev up` process, so `down` may signal it.

    A pid from a stale state.json may have been reused by an unrelated process: its command line
    must name lora_operator.
    """
    if not isinstance(pid, int) or pid <= 0 or _exited(pid):
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return False  # not ours to signal
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid
    return b"lora_operator" in cmdline or b"lora-operator" in cmdline


def _running(state: dict[str, Any] | None) -> bool:
    """True when state.json names a dev cluster whose API answers (whoever runs it: `up`, the demo)."""
    return bool(state and state.get("apiUrl") and answers(str(state["apiUrl"]) + "/version"))


def _forget(state_dir: Path) -> None:
    """Remove what a dead cluster left behind (state.json, kubeconfig); pod logs stay."""
    for name in (STATE_FILE, KUBECONFIG_FILE):
        (state_dir / name).unlink(missing_ok=True)


def _describe(state: dict[str, Any]) -> str:
    kubeconfig = Path(state["kubeconfig"])
    lines = [
        f"  API         {state['apiUrl']}   ({KUBE_WORDS.get(state.get('kube', 'emulator'), state.get('kube'))})",
        f"  S3          {state['s3Endpoint']}   (moto; any access key works, e.g. testing/testing: dev only)",
        f"  kubeconfig  {kubeconfig}",
        f"  pods        {state['podsDir']}/<ns>_<pod>_<uid>/container.log",
    ]
    if state.get("log"):
        lines.append(f"  log         {state['log']}")
    lines.append(f"export KUBECONFIG={kubeconfig}")
    return "\n".join(lines)


def _configure_logging(log_file: Path | None) -> None:
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _foreground(args: argparse.Namespace, state_dir: Path) -> int:
    """Run the cluster in this process until SIGTERM or Ctrl-C."""
    log_file = Path(args.log_file).resolve() if args.log_file else None
    _configure_logging(log_file)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    try:
        cluster = DevCluster(state_dir, s3_port=args.s3_port, api_port=args.api_port, log_file=log_file,
                             kube=args.kube).start()
    except DevClusterError as exc:
        print(f"lora-operator dev up: {exc}", file=sys.stderr)
        return 1
    try:
        if not log_file:
            print(f"dev cluster up (pid {os.getpid()}); Ctrl-C stops it\n{_describe(cluster.state())}",
                  flush=True)
        while not done.wait(1.0):
            pass
    finally:
        cluster.stop()
    return 0


def _wait_started(proc: subprocess.Popen[bytes], state_dir: Path, log_file: Path) -> dict[str, Any] | str:
    """The state of the background cluster once both servers answer, or why it did not start."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        state = read_state(state_dir)
        if state and state.get("pid") == proc.pid and answers(state["apiUrl"] + "/version") \
                and answers(state["s3Endpoint"]):
            return state
        code = proc.poll()
        if code is not None:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] if log_file.exists() else []
            return tail[0] if tail else f"the background process exited with code {code}"
        time.sleep(0.1)
    return f"not ready after {START_TIMEOUT:.0f} s (see {log_file})"


def _up(args: argparse.Namespace, state_dir: Path) -> int:
    state = read_state(state_dir)
    if _running(state):
        assert state is not None
        print(f"dev cluster already up (pid {state['pid']})\n{_describe(state)}")
        return 0
    _forget(state_dir)
    if args.foreground:
        return _foreground(args, state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    log_file = state_dir / LOG_FILE
    argv = [sys.executable, "-m", "lora_operator", "dev", "up", "--foreground", "--state-dir", str(state_dir),
            "--s3-port", str(args.s3_port), "--api-port", str(args.api_port), "--kube", args.kube,
            "--log-file", str(log_file)]
    with log_file.open("ab") as out:
        # Own session: the cluster outlives this shell command and a Ctrl-C typed into it.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    started = _wait_started(proc, state_dir, log_file)
    if isinstance(started, str):
        if proc.poll() is None:
            proc.terminate()
        print(f"lora-operator dev up: {started.removeprefix('lora-operator dev up: ')}", file=sys.stderr)
        return 1
    print(f"dev cluster up (pid {proc.pid})\n{_describe(started)}")
    return 0


def _down(state_dir: Path) -> int:
    state = read_state(state_dir)
    pid = (state or {}).get("pid")
    if not _ours(pid):
        if _running(state):
            print(f"lora-operator dev down: the cluster in {state_dir} runs inside pid {pid}, which `dev up` "
                  "did not start (the demo or a test?); stop that process", file=sys.stderr)
            return 1
        _forget(state_dir)
        print(f"dev cluster not running (state dir {state_dir})")
        return 0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and not _exited(pid):
        time.sleep(0.1)
    if not _exited(pid):
        os.kill(pid, signal.SIGKILL)  # did not stop in time; its pods are in their own sessions
        _forget(state_dir)
    print(f"dev cluster stopped (pid {pid})")
    return 0


def _status(state_dir: Path) -> int:
    state = read_state(state_dir)
    if not _running(state):
        print(f"dev cluster not running (state dir {state_dir}); start it with `lora-operator dev up`")
        return 1
    assert state is not None
    s3 = "answers" if answers(state["s3Endpoint"]) else "DOES NOT ANSWER"
    print(f"dev cluster up (pid {state['pid']}, since {state.get('started')}); API answers, S3 {s3}")
    print(_describe(state))
    return 0


def _reclaim(args: argparse.Namespace, state_dir: Path) -> int:
    try:
        namespace, name = parse_pod_ref(args.pod)
    except ValueError as exc:
        print(f"lora-operator dev reclaim: {exc}", file=sys.stderr)
        return 2
    state = read_state(state_dir)
    if not _running(state):
        print(f"lora-operator dev reclaim: no dev cluster running in {state_dir}; `lora-operator dev up` first",
              file=sys.stderr)
        return 1
    assert state is not None
    try:
        annotate_reclaim(state["kubeconfig"], namespace, name, args.reason)
    except DevClusterError as exc:
        print(f"lora-operator dev reclaim: {exc}", file=sys.stderr)
        return 1
    print(f"pod {namespace}/{name}: reclaimed like a spot node shutdown (DisruptionTarget, SIGTERM, "
          "then SIGKILL after its grace period); watch it with `kubectl get pods -w`")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lora-operator dev`; returns the exit code."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    state_dir = Path(args.state_dir).resolve()
    if args.command == "up":
        return _up(args, state_dir)
    if args.command == "down":
        return _down(state_dir)
    if args.command == "status":
        return _status(state_dir)
    return _reclaim(args, state_dir)


if __name__ == "__main__":
    sys.exit(main())
