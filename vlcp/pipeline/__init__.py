"""The `vlcp distill` pipeline: the configuration, the stage table (table.py), one module per stage (stages/), the
Run/Step a stage sees (run.py) and the loop (loop.py). It may import vlcp.method and everything below, never
vlcp.baselines or vlcp.cli.
"""
