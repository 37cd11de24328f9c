#!/usr/bin/env python3
"""Run vlcp from a checkout without installing it: ``python vlcp.py distill ...``.

Python resolves ``import vlcp`` to the package directory next to this file (a package wins over a
module of the same name), so this shim only forwards to the CLI.
"""
from vlcp.cli import main

if __name__ == "__main__":
    main()
