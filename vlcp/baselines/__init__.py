"""Baselines and `vlcp select`: real-image selection (random, herding, k-center), DM/DC matching with object masks
and caption losses, and SAS over an existing pool. It may import vlcp.method and everything below, never vlcp.pipeline.
"""
