"""One module per stage of `vlcp distill`, named after it: each reads the configuration through its Step and hands
compute functions to the cache. Rows (params, version, models) live in ../table.py. Imports as vlcp.pipeline.
"""
