"""Worker threads that sleep while they wait, set up before torch is first imported.

Torch's OpenMP workers (GNU libgomp in the pip wheels, also used by MKL) spin at every barrier by
default. On a machine where another process holds a core, the worker that finished first spins on its
own core while the one it waits for sits behind that process, so every parallel region costs a
scheduler time slice: the tiny CPU demo ran 10-20x slower (docs/measurements.md, "A busy machine").
A passive wait frees the spinning core for the late thread. The OpenMP runtime reads these variables
once, when it is loaded, so they must be in the environment before ``import torch``; a value the user
set wins. Thread counts are not touched: results are byte-identical to a spinning run's.
"""
from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

# GNU OpenMP (torch, MKL's GNU layer, scikit-learn's bundled libgomp) and Intel OpenMP, if one is loaded
WAIT = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
SPIN = "VLCP_SPIN_WAIT"  # "1": keep the libraries' spinning defaults (the "before" of benchmarks/busy_machine.py)


def calm_threads(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the passive wait policy unless the user chose one (or ``VLCP_SPIN_WAIT=1``); returns what was set.

    Too late once torch is imported (the runtime has read its settings): then nothing is set."""
    if environ.get(SPIN) == "1" or "torch" in sys.modules:
        return {}
    added = {k: v for k, v in WAIT.items() if k not in environ}
    environ.update(added)
    return added
