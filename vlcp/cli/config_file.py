"""``vlcp distill --config``: options from a YAML/TOML file, a shipped config or a run's manifest.json.

The file only changes the command's defaults (Click's ``default_map``), so a flag given on the command
line always wins, and every value passes the same type and range checks as the flag would. A mistake in
the file (unknown key, wrong type, unreadable file) is a usage error (exit code 2) naming the key and file.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import click

SUFFIXES = (".yaml", ".yml", ".toml")
NOT_OPTIONS = ("config", "list_configs", "help")  # distill parameters a file cannot set
# recorded in a manifest's parameters but not distill options: global options (--data-dir, --device) and
# --force, which a rerun must ask for itself
MANIFEST_SKIPS = ("data_dir", "device", "force", "progress", "warnings")


def shipped() -> dict[str, object]:
    """The configs shipped in ``vlcp/configs`` (the paper's settings), by name (file name less .yaml)."""
    folder = resources.files("vlcp.configs")
    return {f.name[:-len(".yaml")]: f for f in sorted(folder.iterdir(), key=lambda f: _order(f.name))
            if f.name.endswith(".yaml")}


def _order(name: str) -> tuple:
    """imagewoof-ipc10 before imagewoof-ipc20 before imagewoof-ipc100: the IPC as a number."""
    stem, _, ipc = name.removesuffix(".yaml").rpartition("-ipc")
    return (stem, int(ipc)) if ipc.isdigit() else (name, 0)


def describe(text: str) -> str:
    """The first comment line of a config file: what it reproduces."""
    for line in text.splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def list_configs(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """--list-configs: the shipped names with the table each reproduces, then exit."""
    if not value or ctx.resilient_parsing:
        return
    configs = shipped()
    width = max(map(len, configs), default=0)
    for name, f in configs.items():
        click.echo(f"{name:<{width}}  {describe(f.read_text())}")
    ctx.exit()


def apply_config(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """The --config callback (eager: it runs before the other options are read)."""
    if value is None or ctx.resilient_parsing:
        return value
    values, where, manifest = read(value)
    defaults = check(ctx, values, where, manifest)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def read(value: str) -> tuple[dict, str, bool]:
    """The mapping a --config value names, where it came from, and whether it is a run's manifest."""
    path = Path(value)
    configs = shipped()
    if not path.exists() and value in configs:
        f = configs[value]
        return parse(f.read_text(), ".yaml", str(f)), str(f), False
    if not path.exists():
        raise click.BadParameter(f"{value}: no such file, nor a shipped config (vlcp distill --list-configs: "
                                 f"{', '.join(configs)})", param_hint="--config")
    if path.suffix not in SUFFIXES + (".json",):
        raise click.BadParameter(f"{value}: not a .yaml, .yml, .toml or manifest.json file", param_hint="--config")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{value}: cannot be read ({exc.__class__.__name__}: {exc})",
                                 param_hint="--config") from None
    data = parse(text, path.suffix, value)
    if path.suffix != ".json":
        return data, value, False
    params = data.get("parameters")
    if not isinstance(params, dict):
        raise click.BadParameter(f"{value}: not a vlcp manifest (no \"parameters\" object)", param_hint="--config")
    return {k: v for k, v in _data_from_anywhere(params, data).items() if k not in MANIFEST_SKIPS}, value, True


def _data_from_anywhere(params: dict, manifest: dict) -> dict:
    """A run's ``--data`` as it was typed is relative to where it ran: from another folder, take the dataset
    folder the manifest recorded in full (``dataset.name``) when that one exists."""
    data, ident = params.get("data"), manifest.get("dataset")
    if not isinstance(data, str) or Path(data).is_absolute() or Path(data).exists() or not isinstance(ident, dict):
        return params
    from vlcp.data.datasets import KNOWN

    full = ident.get("name")
    if data in KNOWN or not isinstance(full, str) or not Path(full).is_absolute() or not Path(full).is_dir():
        return params
    return {**params, "data": full}


def parse(text: str, suffix: str, where: str) -> dict:
    """A YAML, TOML or JSON text as a mapping; a syntax error names the file."""
    try:
        data = _load(text, suffix)
    except ValueError as exc:
        raise click.BadParameter(f"{where}: {exc}", param_hint="--config") from None
    if data is None:  # an empty YAML file
        return {}
    if not isinstance(data, dict):
        raise click.BadParameter(f"{where}: must be a mapping of option names to values, got "
                                 f"{type(data).__name__}", param_hint="--config")
    return data


def _load(text: str, suffix: str):
    """Parse by suffix; every syntax error comes out as a ValueError (json's and tomllib's already are)."""
    if suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    if suffix == ".json":
        import json

        return json.loads(text)
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def check(ctx: click.Context, values: dict, where: str, manifest: bool) -> dict:
    """Option name -> value, checked as the command line would check it; raises a usage error naming the key."""
    by_key = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.expose_value and p.name not in NOT_OPTIONS:
            by_key[p.name] = p
            for opt in p.opts:
                by_key[opt.lstrip("-")] = p
    out: dict = {}
    for key, value in values.items():
        param = by_key.get(str(key))
        if param is None:
            what = "a distill parameter of another vlcp version" if manifest else "a vlcp distill option"
            raise click.BadParameter(f"{where}: {key!r} is not {what}", param_hint="--config")
        if param.name in out:
            raise click.BadParameter(f"{where}: {param.name} is given twice", param_hint="--config")
        if param.name == "force":  # a shared file must not replace folders: the one who runs it asks
            raise click.BadParameter(f"{where}: {key!r} is not taken from a file; pass --force on the command line",
                                     param_hint="--config")
        out[param.name] = convert(ctx, param, key, value, where)
    return out


def convert(ctx: click.Context, param: click.Option, key: str, value, where: str):
    """One value, of the type its option takes (no silent 2.5 -> 2), then through the option's own checks."""
    def bad(message: str) -> click.BadParameter:
        return click.BadParameter(f"{where}: {key}: {message}", param_hint="--config")

    if value is None:  # fine where DistillConfig itself takes None ("the per-dataset default", "no clipping")
        from vlcp.pipeline.config import DistillConfig

        field = DistillConfig.__dataclass_fields__.get(param.name)
        if field is not None and (field.default is None or "None" in str(field.type)):
            return None
        raise bad("must not be empty (null)")
    kind = param.type
    if param.name == "classes" and isinstance(value, list):  # the manifest's list, or a YAML list
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            raise bad(f"must be a list of class names or ids, got {value!r}")
        value = ",".join(str(v) for v in value)
    if param.is_flag and param.is_bool_flag:
        ok = isinstance(value, bool)
        expected = "true or false"
    elif isinstance(kind, click.types.IntParamType):
        ok = isinstance(value, int) and not isinstance(value, bool)
        expected = "an integer"
    elif isinstance(kind, click.types.FloatParamType):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
            try:
                value, ok = float(value), True
            except ValueError:
                pass
        expected = "a number"
    else:
        ok = isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                        and isinstance(kind, click.types.StringParamType))
        expected = "a string"
    if not ok:
        raise bad(f"must be {expected}, got {value!r}")
    try:
        return param.type_cast_value(ctx, value)
    except click.BadParameter as exc:
        raise bad(exc.message) from None
