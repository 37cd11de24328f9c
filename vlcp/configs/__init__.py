"""Example ``vlcp distill --config`` files: the paper's settings, one YAML file per table row."""
