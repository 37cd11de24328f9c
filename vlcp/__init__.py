"""vlcp: dataset distillation with diffusion models and vision-language category prototypes.

Layers, each importing only those below it (checked by import-linter, ``.importlinter``):
``cli`` > ``pipeline`` | ``baselines`` > ``method`` > ``evaluation`` | ``report`` > ``models`` > ``data`` > ``store``.
"""

__version__ = "0.1.0"
