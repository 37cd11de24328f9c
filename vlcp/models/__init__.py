"""Models: hub resolution and loading (LLaVA, Stable Diffusion, an LLM), the tiny models built from config, the
captioner call, CLIP embeddings and the CLIPSeg segmenter. It may import vlcp.data and vlcp.store.
"""
