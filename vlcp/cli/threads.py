"""Worker threads that stop spinning soon, set up before torch is first imported.

Torch's OpenMP workers (GNU libgomp in the pip wheels, also MKL's threads) spin for about 3 ms at every
barrier by default. On a machine where another process holds a core, the worker that finished first
spins on its own core while the one it waits for sits behind that process, so every parallel region
costs a scheduler time slice: the tiny CPU demo ran 10-20x slower. Sleeping at once
(``OMP_WAIT_POLICY=PASSIVE``) cures that but costs a wake-up per region on a quiet machine (1.7x slower
there); one thread changes float reductions (the fine-tuning loss curve). A short spin, then sleep, kept
both (docs/measurements.md, "A busy machine"). libgomp reads it once, when it is loaded, so it must be in
the environment before ``import torch``; a wait the user chose (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``)
wins. Thread counts are not touched: results are byte-identical to a spinning run's.
"""
from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

WAIT = {"GOMP_SPINCOUNT": "1000"}  # spins before sleeping: about 10 us (libgomp reckons 100,000 per ms)
USER_CHOICES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # GOMP_SPINCOUNT would override OMP_WAIT_POLICY
SPIN = "VLCP_SPIN_WAIT"  # "1": keep the libraries' defaults (the "before" of benchmarks/busy_machine.py)


def calm_threads(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the short spin unless the user chose a wait (or ``VLCP_SPIN_WAIT=1``); returns what was set.

    Too late once torch is imported (its OpenMP runtime has read its settings): then nothing is set."""
    if environ.get(SPIN) == "1" or "torch" in sys.modules or any(k in environ for k in USER_CHOICES):
        return {}
    environ.update(WAIT)
    return dict(WAIT)
