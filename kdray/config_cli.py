"""The command line and files of a config class: defaults < job defaults < ``--config FILE.yaml`` < flags.

:func:`load_config` reads any frozen pydantic dataclass (the classes of :mod:`kdray.config`): the flags and the
YAML file become one nested dict over the class's defaults, pydantic checks it, and every problem (an unknown
key or option, a wrong type, a value out of range, a flag without a value, bad YAML, a ``REQUIRED`` key left
empty) is one ``KdrayError`` line that names the key, raised before the job starts anything.
:func:`dump_yaml` writes the resolved config (``args.yaml``, as timm does), which loads back to an equal one.

Flags: ``--optim.lr 3e-4`` or ``--optim.lr=3e-4``; a class's ``ALIASES`` (``--data`` = ``--data.root``); a leaf
name that is unique in the tree, alone (``--lr``: the docs, tests and benchmarks use it); ``-`` for ``_``
(``--train-per-class``); a class's ``POSITIONAL`` field as bare arguments too (``kdray predict a.png b.png``).
Every flag takes a value: bools true/false/1/0/yes/no, lists comma-separated (``--modalities CR,DX``; ``""`` is
the empty list), ``none`` for an optional value. ``--help`` is written from the fields: default (after the
job's own defaults), choices, range and description.

The parser is argparse, built from the fields, rather than pydantic-settings' CLI, which needs a BaseSettings
class (a dataclass only through a private wrapper; it also reads environment variables), cannot map ``--data``
onto a leaf of the ``data`` section, reads ``--modalities ""`` as ``[""]`` and prints a help without ranges or
the job's defaults: the glue around it would have been this module and more.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
from typing import Any, Literal, TypeVar, get_args, get_origin

import annotated_types
import yaml
from pydantic import TypeAdapter, ValidationError

from kdray import KdrayError, first_line

T = TypeVar("T")


@functools.cache
def _adapter(cls: type) -> TypeAdapter:
    return TypeAdapter(cls)


def to_dict(cfg: Any) -> dict:
    """The config as plain YAML/JSON values (tuples as lists), as :func:`from_dict` reads it back."""
    return _adapter(type(cfg)).dump_python(cfg, mode="json")


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(cls: type[T], values: dict | None) -> T:
    """``cls`` from a (possibly partial) nested dict over its defaults, checked; a problem is one KdrayError line.

    A partial section changes only the keys it names: the rest keep the default of the field that holds it
    (PipelineConfig's ``run.output`` "" or ``teacher.optim``, not RunConfig's or OptimConfig's own)."""
    try:
        return _adapter(cls).validate_python(_merge(to_dict(cls()), values or {}))
    except ValidationError as exc:
        raise KdrayError(_one_line(cls, exc)) from None


def _merge(base: dict, extra: dict, where: str | None = None) -> dict:
    """``extra`` over ``base``, section by section. With ``where`` (a dotted prefix: the merge of the job's
    defaults, the file and the flags), a section over a value is an error: YAML ``data: 5``, then
    ``--data.image_size 32``; without it (over the class's defaults), pydantic judges what results."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(out[key], value, None if where is None else f"{where}{key}.")
        elif isinstance(value, dict) and out.get(key) is not None and where is not None:
            raise KdrayError(f"config key {where}{key}: expected a section (key: value mapping), got {out[key]!r}")
        out[key] = value
    return out


def _fields(cls: type) -> dict[str, Any]:
    """Field name → pydantic FieldInfo (its resolved ``annotation``, ``metadata``, ``description``)."""
    return dict(cls.__pydantic_fields__) if dataclasses.is_dataclass(cls) else {}


def _leaves(cls: type, prefix: str = "") -> dict[str, Any]:
    """Dotted path → FieldInfo of every leaf (non-section field) below ``cls``."""
    out = {}
    for name, info in _fields(cls).items():
        if dataclasses.is_dataclass(info.annotation):
            out.update(_leaves(info.annotation, f"{prefix}{name}."))
        else:
            out[prefix + name] = info
    return out


def _key(cls: type, loc: tuple) -> tuple[str, type | None]:
    """The dotted key an error's location names, and the section class there (None at a leaf)."""
    key, section = "", cls
    for part in loc:
        if isinstance(part, int):
            key += f"[{part}]"
        elif section is not None and part in _fields(section):
            key = f"{key}.{part}" if key else part
            annotation = _fields(section)[part].annotation
            section = annotation if dataclasses.is_dataclass(annotation) else None
        # any other part names a member of a union (``literal['auto']``, ``bool``), not a key
    return key, section


def _one_line(cls: type, exc: ValidationError) -> str:
    """The first problem pydantic found, as one line naming the key (a union's alternatives joined by "or")."""
    errors = exc.errors()
    first = errors[0]
    key, section = _key(cls, first["loc"])
    if first["type"] in ("unexpected_keyword_argument", "invalid_key"):
        parent, section = _key(cls, first["loc"][:-1])
        name = f"{parent}.{first['loc'][-1]}" if parent else str(first["loc"][-1])
        return f"unknown config key {name}; known in {parent or cls.__name__}: {', '.join(_fields(section))}"
    if first["type"] == "dataclass_type":
        return f"config key {key}: expected a section (keys: {', '.join(_fields(section))}), got {_show(first['input'])}"
    problems = " or ".join(dict.fromkeys(_say(e) for e in errors if _key(cls, e["loc"])[0] == key))
    return f"config key {key}: {problems.replace(' or must be ', ' or ')}, got {_show(first['input'])}"


def _say(error: dict) -> str:
    """pydantic's "Input should be a valid integer, unable to parse ..." as "must be a valid integer"."""
    if error["type"] == "literal_error":
        return f"must be {error['ctx']['expected']}"
    message = error["msg"].removeprefix("Value error, ")
    if message.startswith("Input should be "):
        return "must be " + message.removeprefix("Input should be ").split(", ")[0]
    return message


def _show(value: Any) -> str:
    return repr(value)[:80]


def _read_yaml(config_file: str) -> dict:
    try:
        with open(config_file) as fh:
            values = yaml.safe_load(fh)
    except FileNotFoundError:
        raise KdrayError(f"config file not found: {config_file}") from None
    except OSError as exc:
        raise KdrayError(f"config file {config_file}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or first_line(exc)
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise KdrayError(f"config file {config_file} is not valid YAML: {problem}{where}") from None
    if values is not None and not isinstance(values, dict):
        raise KdrayError(f"config file {config_file} must hold a mapping at the top level, got {_show(values)}")
    return values or {}


def _names(cls: type) -> dict[str, str]:
    """Every flag name (without ``--``) → the dotted path it sets: the paths, unique leaf names, ``ALIASES``."""
    paths = list(_leaves(cls))
    tails = [p.rsplit(".", 1)[-1] for p in paths]
    names = {tail: p for tail, p in zip(tails, paths) if tails.count(tail) == 1}
    return {**names, **{p: p for p in paths}, **getattr(cls, "ALIASES", {})}


def _from_text(info: Any) -> Any:
    """How a flag's text becomes a value for pydantic: ``a,b`` a list, ``none`` (or nothing) None where allowed."""
    members = (info.annotation, *get_args(info.annotation))
    optional, listed = type(None) in members, any(get_origin(m) in (list, tuple) for m in members)

    def read(text: str) -> Any:
        if optional and text.strip().lower() in ("", "none", "null"):
            return None
        return [v.strip() for v in text.split(",") if v.strip()] if listed else text

    return read


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse names the flag; the job reports one line, with no usage text
        if message.startswith("unrecognized arguments: "):
            message = f"unexpected argument {message.partition(': ')[2]!r}: options are --key value"
        raise KdrayError(message)


def _underscored(arg: str) -> str:
    """``--train-per-class=5`` → ``--train_per_class=5`` (the value unchanged); any other argument as it is."""
    if not arg.startswith("--"):
        return arg
    name, equals, value = arg[2:].partition("=")
    return f"--{name.replace('-', '_')}{equals}{value}"


def _parse_flags(cls: type, argv: list[str]) -> tuple[str | None, dict]:
    """The ``--config`` file and a nested dict of the flags' values (still text, for pydantic to read)."""
    names, leaves = _names(cls), _leaves(cls)
    argv = [_underscored(arg) for arg in argv]
    for arg in argv:
        name = arg[2:].partition("=")[0]
        if arg.startswith("--") and name != "config" and name not in names:
            matches = [p for p in leaves if p.rsplit(".", 1)[-1] == name]
            if len(matches) > 1:
                raise KdrayError(f"--{name} is ambiguous: use one of {', '.join('--' + m for m in matches)}")
            close = difflib.get_close_matches(name, names, 3)
            raise KdrayError(f"unknown option --{name}; " + (f"did you mean {', '.join('--' + c for c in close)}?"
                                                              if close else "--help lists the options"))
    parser = _Parser(add_help=False, allow_abbrev=False)
    parser.add_argument("--config")
    flags_of: dict[str, list[str]] = {}
    for name, path in names.items():
        flags_of.setdefault(path, []).append("--" + name)
    for path, flags in flags_of.items():
        parser.add_argument(*sorted(flags, key=lambda f: f != "--" + path), dest=path, type=_from_text(leaves[path]),
                            default=argparse.SUPPRESS)
    positional = getattr(cls, "POSITIONAL", None)
    if positional:
        listed = get_origin(leaves[positional].annotation) is list
        parser.add_argument(positional, nargs="*" if listed else "?", default=argparse.SUPPRESS)
    values = vars(parser.parse_args(argv))
    config_file, flags = values.pop("config", None), {}
    for path, value in values.items():
        *parents, leaf = path.split(".")
        functools.reduce(lambda tree, part: tree.setdefault(part, {}), parents, flags)[leaf] = value
    return config_file, flags


def load_config(cls: type[T], argv: list[str] | None = None, job_defaults: dict | None = None) -> T:
    """Resolve ``cls`` from its defaults < the job's own defaults < YAML file (``--config``) < flags.

    ``--help`` (or ``-h``) prints every option with its default, choices and range, and exits 0. Every problem
    raises one ``KdrayError`` line naming the key; last, a ``REQUIRED`` key left empty is
    ``--key is required (what it is)``."""
    argv = list(argv or [])
    if "-h" in argv or "--help" in argv:
        print(_help(cls, job_defaults))
        raise SystemExit(0)
    config_file, flags = _parse_flags(cls, argv)
    values = _merge(_merge(job_defaults or {}, _read_yaml(config_file) if config_file else {}, ""), flags, "")
    cfg = from_dict(cls, values)
    for key, phrase in getattr(cls, "REQUIRED", {}).items():
        if functools.reduce(getattr, key.split("."), cfg) in (None, "", []):
            raise KdrayError(f"{'' if key == getattr(cls, 'POSITIONAL', None) else '--'}{key} is required ({phrase})")
    return cfg


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _notes(info: Any) -> list[str]:
    """What ``--help`` says of a field beyond its default: its choices and its range."""
    members = get_args(info.annotation) if get_origin(info.annotation) is not Literal else (info.annotation,)
    choices = [str(c) for m in members if get_origin(m) is Literal for c in get_args(m)]
    choices += ["true", "false"] if choices and bool in members else []
    bounds = [f"{sign} {getattr(m, key)}" for m in info.metadata if isinstance(m, annotated_types.BaseMetadata)
              for key, sign in _BOUNDS.items() if hasattr(m, key)]
    return [text for text in (" | ".join(choices), ", ".join(bounds)) if text]


def _help(cls: type, job_defaults: dict | None = None) -> str:
    """Every option of ``cls``: its default (after the job's own defaults), choices, range and description."""
    defaults = to_dict(from_dict(cls, job_defaults))
    required, positional = getattr(cls, "REQUIRED", {}), getattr(cls, "POSITIONAL", None)
    aliases: dict[str, list[str]] = {}
    for alias, path in getattr(cls, "ALIASES", {}).items():
        aliases.setdefault(path, []).append("--" + alias)
    lines = ["options (defaults < --config FILE.yaml < --key value; a leaf name unique in the tree works alone):",
             "  --config FILE.yaml"]
    for path, info in _leaves(cls).items():
        value = functools.reduce(lambda tree, part: tree[part], path.split("."), defaults)
        notes = (["required"] if path in required else []) + _notes(info) + [f"= {a}" for a in aliases.get(path, [])]
        if path == positional:
            notes.append(f"or {path.upper()}... as arguments")
        lines.append(f"  --{path} {json.dumps(value)}" + (f"  ({'; '.join(notes)})" if notes else "")
                     + (f"  {info.description}" if info.description else ""))
    return "\n".join(lines)
