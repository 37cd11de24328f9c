"""The `vlcp` command line: main.py (the group, global options, entry point), common.py (context, exit codes),
threads.py (OpenMP waits set before torch loads), needs.py (what a real run needs, for --dry-run) and one module
of thin commands per concern. Top layer: it may import every other vlcp subpackage, nothing imports it.
"""
