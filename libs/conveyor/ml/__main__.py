"""``python -m conveyor.ml``: prepare the packaged models ahead of the first task.

Converts SmolLM2's GGUF into the model cache (tens of seconds, once) and loads every default
model once to prove it works offline. Meant for an install or image-build step.
"""

from __future__ import annotations

import logging
import sys
import time

from conveyor.ml.registry import KINDS, ModelRegistry
from conveyor.ml.smollm2 import ensure_converted

logger = logging.getLogger("conveyor.ml")


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    started = time.perf_counter()
    path = ensure_converted()
    logger.info("smollm2 ready path=%s seconds=%.1f", path, time.perf_counter() - started)
    registry = ModelRegistry()
    for kind in KINDS:
        started = time.perf_counter()
        registry.for_kind(kind)
        logger.info("model ready kind=%s seconds=%.1f", kind, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
