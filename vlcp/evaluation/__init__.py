"""Evaluation: the protocols (minimax, dc, rded), the training loop, networks, augmentations, RDED's teacher,
caption fusion and the `vlcp evaluate` runner. It may import vlcp.models, vlcp.data and vlcp.store.
"""
