"""`lora-operator`: run the operator, print the CRD, or (when installed) manage a dev cluster.

    lora-operator run [--namespace NS ...] [--trainer-image IMG] [--standalone] ...
    lora-operator crd > crds/loratrainingjobs.lora-operator.dev.yaml
    lora-operator crd --markdown > docs/spec-reference.md
    lora-operator dev ...      (lora_operator.devcluster.cli, when present)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from lora_operator import __version__
from lora_operator.settings import Settings, add_arguments, from_args, peering_priority

DEV_MODULE = "lora_operator.devcluster.cli"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-operator", description="LoRATrainingJob operator.")
    parser.add_argument("--version", action="version", version=f"lora-operator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator (settings from LORA_OPERATOR_* and flags)")
    add_arguments(run)
    run.add_argument("--kubeconfig", help="kubeconfig file; default in-cluster, then $KUBECONFIG")
    run.add_argument("--verbose", "-v", action="store_true", help="debug logs")
    crd = sub.add_parser("crd", help="print the CustomResourceDefinition YAML")
    crd.add_argument("--markdown", action="store_true", help="print the spec/status reference as Markdown instead")
    sub.add_parser("dev", help="a local dev cluster (emulator + S3); see `lora-operator dev --help`", add_help=False)
    return parser


def _configure_logging(settings: Settings, verbose: bool) -> None:
    import kopf

    kopf.configure(
        debug=verbose, verbose=verbose,
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
    )


def _with_api_server(settings: Settings, kubeconfig: str | None) -> Settings:
    """The settings, with the API server this process talks to among those jobs may not name."""
    from lora_operator.kube import load_configuration

    try:
        host = load_configuration(kubeconfig).host
    except Exception:  # no configuration: run_operator reports it
        return settings
    if not host or host in settings.api_servers:
        return settings
    return settings.model_copy(update={"api_servers": [*settings.api_servers, host]})


def _tune_gc() -> None:
    """Fewer, cheaper cyclic garbage collections for a long-running server.

    With Python's default gen-0 threshold (700 allocations) the collector ran about a thousand times
    during a 500-job burst, 3 of the operator's 14 CPU-seconds (bench_operator_scale); the objects
    loaded at start-up (modules, schemas, Kopf) are frozen out of every later collection."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 10)


def _run(args: argparse.Namespace) -> int:
    try:
        settings = from_args(args)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']} (got {e.get('input')!r})" for e in exc.errors())
        print(f"lora-operator: invalid settings: {errors}", file=sys.stderr)
        return 2
    from lora_operator.controller import run_operator

    _configure_logging(settings, args.verbose)
    settings = _with_api_server(settings, args.kubeconfig)
    logging.getLogger(__name__).info(
        "starting: namespaces=%s image=%s peering=%s allowed endpoints=%s", settings.namespaces or "all",
        settings.trainer_image,
        "standalone" if settings.standalone else f"{settings.peering} priority={peering_priority(settings)}",
        ",".join(settings.allowed_endpoints),
    )
    _tune_gc()
    try:
        asyncio.run(run_operator(settings, kubeconfig=args.kubeconfig))
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lora-operator`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["dev"]:
        if importlib.util.find_spec(DEV_MODULE) is None:
            print("lora-operator dev: not available in this installation", file=sys.stderr)
            return 2
        return int(importlib.import_module(DEV_MODULE).main(argv[1:]) or 0)
    args = _parser().parse_args(argv)
    if args.command == "crd":
        if args.markdown:
            from lora_operator.specdoc import render_markdown

            sys.stdout.write(render_markdown())
        else:
            from lora_operator.crd import render_crd

            sys.stdout.write(render_crd())
        return 0
    return _run(args)
