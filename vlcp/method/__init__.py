"""The method's algorithms, one module per step: latents, outliers, clusters, text prototypes (Algorithm 2),
prompts, fine-tuning, synthesis, detector-guided refinement, SAS post-sampling and its anchors. No stage
wiring here. It may import vlcp.evaluation (the detector trains with its loop), vlcp.models, vlcp.data, vlcp.store.
"""
