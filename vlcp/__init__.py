"""vlcp: dataset distillation with diffusion models and vision-language category prototypes."""

__version__ = "0.1.0"
