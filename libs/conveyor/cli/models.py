"""`conveyor models prepare`: convert the packaged SmolLM2 once into the model cache."""

from __future__ import annotations

import argparse
import time


def configure(_name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["prepare"])
    parser.set_defaults(func=run)


def run(_args: argparse.Namespace) -> int:
    from conveyor.ml.smollm2 import ensure_converted, is_converted

    if is_converted():
        print("models ready (cached)")
        return 0
    started = time.monotonic()
    path = ensure_converted()
    print(f"SmolLM2 converted into {path} in {time.monotonic() - started:.1f}s")
    return 0
