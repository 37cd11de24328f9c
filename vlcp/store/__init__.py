"""The store: the checksummed content-addressed cache, lazy array references, the per-item runner, many-process
coordination (parallel, ddp), cache merge, checkpoints, safetensors writing and atomic output folders.
It is the bottom layer: it may import no other vlcp subpackage.
"""
