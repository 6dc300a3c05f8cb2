"""`conveyor run <service>`: run one stage service in this process (as Kubernetes does)."""

from __future__ import annotations

import argparse
import importlib

from conveyor.local.process import SERVICES


def configure(_name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("service", choices=[*SERVICES, "gateway"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"conveyor.services.{args.service}.__main__")
    if args.service == "gateway":
        code: int = module.serve()
        return code
    from conveyor.runtime.entry import run_service

    return run_service(module.SERVICE)
