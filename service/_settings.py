"""One configuration for ``patchwire serve``, from four layers: :class:`ServerConfig`'s defaults < a TOML file <
the environment < command-line flags actually given.

The schema is read from the dataclasses themselves (:func:`settings`), so a field added to :class:`ServerConfig`
is configurable at once, with its docstring as its documentation:

- a top-level key per field of :class:`ServerConfig` and of :class:`LoggingConfig` (applied by the command line);
  fields the server sets itself (:data:`INTERNAL`) are not settable;
- a nested dataclass (:class:`~patchwire.service._limits.Limits`) is a table of its fields (``[limits]``); a mapping
  (``datasets``) a table of free keys (``NAME = "PATH.h5"``); ``[auth]`` is parsed by the auth file's own parser
  (:func:`~patchwire.service._auth.parse_auth_config`);
- byte sizes (fields named ``*_bytes``) take an int of bytes or a string such as ``"512MiB"`` or ``"1GiB"``
  (pydantic's ``ByteSize``; ``GB`` is 10^9, ``GiB`` 2^30); numbers are never negative, limits at least 1, ports at
  most 65535; relative paths in a file are relative to the file's folder;
- the environment: ``PATCHWIRE_<FIELD>`` (``PATCHWIRE_PORT=6000``), ``PATCHWIRE_<TABLE>__<FIELD>`` for a nested one
  (``PATCHWIRE_LIMITS__MAX_CALLS=64``), ``PATCHWIRE_DATASETS__<NAME>=PATH.h5`` for a mapping's entry; lists are
  comma-separated (or JSON, as any table may be); an empty variable counts as unset. Other ``PATCHWIRE_*`` variables
  (``PATCHWIRE_HOME``, ``PATCHWIRE_TOKEN``, ...) are not configuration and are left alone.

Values are checked per layer with pydantic (``TypeAdapter``), so each problem names where it came from: the file and
key, the environment variable, or the flag. :func:`load` gathers every problem before raising :class:`ConfigError`;
:func:`render` writes the effective configuration back as documented TOML (secrets redacted).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import re
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ByteSize, Field, TypeAdapter, ValidationError

from patchwire.service._auth import AuthConfigError, Authenticator, parse_auth_config
from patchwire.service._server import ServerConfig

__all__ = [
    "ENV_PREFIX",
    "INTERNAL",
    "ConfigError",
    "LoggingConfig",
    "Setting",
    "Settings",
    "load",
    "render",
    "settings",
]

ENV_PREFIX = "PATCHWIRE_"
"""Prefix of the environment variables that override the file."""
NESTED = "__"
"""Separator of a table and its key in an environment variable's name (``PATCHWIRE_LIMITS__MAX_CALLS``)."""
INTERNAL = frozenset({"options", "worker_index", "run_dir"})
"""ServerConfig fields that are not settings: gRPC's own options (set deliberately in code) and what a server sets
for its own processes."""
REDACTED = "<redacted>"


@dataclass(frozen=True)
class LoggingConfig:
    """How ``patchwire`` logs (settings of the command, next to ServerConfig's)."""

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Least severe level logged (DEBUG, INFO, WARNING, ERROR, CRITICAL)."""
    log_format: Literal["text", "json"] = "text"
    """text: a readable line per record; json: one JSON object per line, for log collectors."""


class ConfigError(ValueError):
    """A configuration that cannot be used: every problem found, each naming where it came from (the file and key,
    the environment variable, the flag) and why."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))


# -- the schema ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One configurable value: a dataclass field, at the top level or in a table."""

    key: str
    """Its name in the file: ``port``, or ``limits.max_calls`` for a field of a table."""
    kind: Any
    """The field's type."""
    owner: type
    """The dataclass that holds it."""
    doc: str
    """The field's docstring, on one line."""

    @property
    def name(self) -> str:
        """The field's name in its dataclass."""
        return self.key.rpartition(".")[2]

    @property
    def table(self) -> str | None:
        """The table it belongs to (``limits``), None at the top level."""
        return self.key.partition(".")[0] if "." in self.key else None

    @property
    def env(self) -> str:
        """Its environment variable."""
        return ENV_PREFIX + self.key.replace(".", NESTED).upper()

    @property
    def default(self) -> Any:
        """The dataclass's default (:data:`dataclasses.MISSING` for a required field)."""
        f = _fields(self.owner)[self.name]
        if f.default_factory is not dataclasses.MISSING:
            return f.default_factory()
        return f.default

    @property
    def shape(self) -> Literal["value", "mapping", "parsed"]:
        """value: one TOML value; mapping: a table of free keys; parsed: a table read by its own parser."""
        inner = _optional_inner(self.kind)
        if inner in _PARSED:
            return "parsed"
        if typing.get_origin(inner) in (Mapping, dict):
            return "mapping"
        return "value"

    @property
    def is_table(self) -> bool:
        return self.shape != "value"


_PARSED: dict[type, tuple[Callable[[Mapping[str, Any]], Any], Callable[[Any], list[str]]]] = {}
"""Types a table of their own parser builds: type -> (parser of the raw table, writer of the value as TOML)."""


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _optional_inner(kind: Any) -> Any:
    """``X`` of ``X | None``; any other type as it is."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


@functools.cache
def attribute_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string right after it in the class body), whitespace collapsed."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    previous: str | None = None
    for node in body.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            previous = node.target.id
            continue
        if previous and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            docs[previous] = " ".join(str(node.value.value).split())
        previous = None
    return docs


@functools.cache
def settings() -> dict[str, Setting]:
    """Every setting by key, in the order written: :class:`LoggingConfig`'s, then :class:`ServerConfig`'s (less
    :data:`INTERNAL`), a nested dataclass's fields under its own key."""
    found: dict[str, Setting] = {}

    def add(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls, include_extras=True)
        docs = attribute_docs(cls)
        for f in dataclasses.fields(cls):
            if not prefix and f.name in INTERNAL:
                continue
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind) and kind not in _PARSED and isinstance(kind, type):
                add(kind, f"{prefix}{f.name}.")
                continue
            found[prefix + f.name] = Setting(prefix + f.name, kind, cls, docs.get(f.name, ""))

    add(LoggingConfig, "")
    add(ServerConfig, "")
    return found


@functools.cache
def _tables() -> dict[str, type]:
    """Nested dataclasses by their key: ``{"limits": Limits}``."""
    hints = typing.get_type_hints(ServerConfig)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(ServerConfig)
        if f.name not in INTERNAL and dataclasses.is_dataclass(hints[f.name]) and hints[f.name] not in _PARSED
    }


# -- checking one value -------------------------------------------------------------------------------------------

_MAX_PORT = 65535
_AT_LEAST_ONE = frozenset({"read_threads"})
"""Numbers that must be at least 1 besides every limit (any other is at least 0)."""


def _constrained(kind: Any, setting: Setting) -> Any:
    """``kind`` with the rules every setting follows: sizes in bytes take units, numbers are never negative, limits
    are at least 1, ports at most 65535, names of a table's entries are not empty, literals match in any case."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_constrained(a, setting) for a in typing.get_args(kind))]  # noqa: UP007
    if origin is Literal:
        spelled = {str(v).lower(): v for v in typing.get_args(kind)}
        return Annotated[kind, BeforeValidator(lambda v: spelled.get(v.lower(), v) if isinstance(v, str) else v)]
    if origin is tuple:
        args = typing.get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple[_constrained(args[0], setting), ...]  # type: ignore[misc]
        return kind
    if origin in (Mapping, dict):
        key, value = typing.get_args(kind)
        return Mapping[Annotated[key, Field(min_length=1)], value]  # type: ignore[valid-type]
    if kind is bool:
        return kind
    low = 1 if setting.table == "limits" or setting.key in _AT_LEAST_ONE else 0
    if kind is int and setting.name.endswith("_bytes"):
        return Annotated[ByteSize, Field(ge=low)]
    if kind in (int, float):
        high = _MAX_PORT if setting.name == "port" or setting.name.endswith("_port") else None
        return Annotated[kind, Field(ge=low, le=high)]
    return kind


@functools.cache
def _adapter(key: str) -> TypeAdapter[Any]:
    setting = settings()[key]
    return TypeAdapter(_constrained(setting.kind, setting))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check(setting: Setting, raw: Any) -> Any:
    """``raw`` as the setting's type; raises ValueError with the reason."""
    if setting.shape == "parsed":
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a table, got {_shown(raw)}")
        parse, _ = _PARSED[_optional_inner(setting.kind)]
        try:
            return parse(raw)
        except AuthConfigError as exc:
            raise ValueError(str(exc)) from None
    try:
        value = _adapter(setting.key).validate_python(raw)
    except ValidationError as exc:
        reasons = [
            f"{_at(error['loc'])}{error['msg']} (got {_shown(error['input'])})"
            for error in exc.errors(include_url=False)
        ]
        raise ValueError("; ".join(reasons)) from None
    if isinstance(value, ByteSize):
        return int(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def _at(loc: tuple[int | str, ...]) -> str:
    """Where in a value pydantic found a problem: an entry's name, an item's position."""
    if not loc:
        return ""
    if loc[-1] == "[key]":
        return f"name {loc[0]!r}: "
    return "[" + "][".join(repr(p) for p in loc) + "]: "


def _rebased(value: Any, folder: Path) -> Any:
    """``value`` with every relative path joined to ``folder``."""
    if isinstance(value, Path):
        return value if value.is_absolute() else folder / value
    if isinstance(value, Mapping):
        return {k: _rebased(v, folder) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_rebased(v, folder) for v in value)
    return value


def _suggestion(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- the layers ---------------------------------------------------------------------------------------------------


@dataclass
class _Layer:
    """What one source sets: key -> (value, where it came from); problems found in it."""

    values: dict[str, tuple[Any, str]] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)

    def take(self, setting: Setting, raw: Any, where: str, source: str = "", folder: Path | None = None) -> None:
        """Checks ``raw`` for ``setting``: its value with ``source`` (default ``where``), or a problem that says
        ``where``; relative paths are joined to ``folder`` when given."""
        try:
            value = _check(setting, raw)
        except ValueError as exc:
            self.problems.append(f"{where}: {exc}")
            return
        if folder is not None:
            value = _rebased(value, folder)
        self.values[setting.key] = (value, source or where)


def _from_file(path: Path, read: Callable[[Path], bytes]) -> _Layer:
    layer = _Layer()
    try:
        data = tomllib.loads(read(path).decode())
    except (OSError, UnicodeDecodeError) as exc:
        layer.problems.append(f"{path}: cannot read: {exc}")
        return layer
    except tomllib.TOMLDecodeError as exc:
        layer.problems.append(f"{path}: not valid TOML: {exc}")
        return layer
    known = settings()
    tables = _tables()
    folder = path.parent.absolute()  # the effective paths hold wherever the server (or its printout) goes
    for key, raw in data.items():
        if key in tables:
            if not isinstance(raw, dict):
                layer.problems.append(f"{path}: {key}: expected a table [{key}], got {_shown(raw)}")
                continue
            for sub, value in raw.items():
                full = f"{key}.{sub}"
                if full not in known:
                    names = [k for k in known if k.startswith(key + ".")]
                    layer.problems.append(f"{path}: unknown key {full!r}{_suggestion(full, names)}")
                    continue
                layer.take(known[full], value, f"{path}: {full}", str(path), folder)
            continue
        setting = known.get(key)
        if setting is None or setting.table is not None:
            why = " (the server sets it itself)" if key in INTERNAL else _suggestion(key, _top_keys())
            layer.problems.append(f"{path}: unknown key {key!r}{why}")
            continue
        where = f"{path}: {key}"
        if setting.is_table and not isinstance(raw, dict):
            layer.problems.append(f"{where}: expected a table [{key}], got {_shown(raw)}")
            continue
        layer.take(setting, raw, where, str(path), folder)
    return layer


def _top_keys() -> list[str]:
    return [*(k for k in settings() if "." not in k), *_tables()]


def _env_value(setting: Setting, text: str, where: str, layer: _Layer) -> Any:
    """An environment variable's text as the raw value of ``setting``: JSON for a table or list written as one,
    comma-separated items for a list, the text otherwise (pydantic converts it)."""
    inner = _optional_inner(setting.kind)
    structured = setting.is_table or typing.get_origin(inner) in (tuple, list)
    if structured and text.lstrip()[:1] in ("[", "{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            layer.problems.append(f"{where}: not valid JSON: {exc}")
            return None
    if typing.get_origin(inner) in (tuple, list):
        return [item.strip() for item in text.split(",") if item.strip()]
    return text


def _from_environment(environ: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    known = settings()
    by_env = {s.env: s for s in known.values()}
    mapping_prefixes = {s.env + NESTED: s for s in known.values() if s.shape == "mapping"}
    table_prefixes = {ENV_PREFIX + t.upper() + NESTED for t in _tables()}
    entries: dict[str, dict[str, Any]] = {}
    for name in sorted(environ):
        text = environ[name]
        if not name.startswith(ENV_PREFIX) or text == "":
            continue
        where = f"environment {name}"
        setting = by_env.get(name)
        if setting is not None:
            raw = _env_value(setting, text, where, layer)
            if raw is not None:
                layer.take(setting, raw, where)
            continue
        owner = next((s for prefix, s in mapping_prefixes.items() if name.startswith(prefix)), None)
        if owner is not None:
            entries.setdefault(owner.key, {})[name[len(owner.env + NESTED) :]] = text
            continue
        if any(name.startswith(prefix) for prefix in table_prefixes):
            # a table's own namespace: a misspelt limit is a mistake (other PATCHWIRE_* variables are not ours)
            layer.problems.append(f"{where}: not a setting{_suggestion(name, by_env)}")
    for key, found in entries.items():
        setting = known[key]
        before = layer.values.get(key, ({}, ""))[0] or {}
        names = ", ".join(f"{setting.env}{NESTED}{n}" for n in found)
        layer.take(setting, {**before, **found}, f"environment {names}")
    return layer


def _from_flags(flags: Mapping[str, Any], flag_names: Mapping[str, str]) -> _Layer:
    layer = _Layer()
    known = settings()
    for key, raw in flags.items():
        setting = known.get(key)
        if setting is None:
            raise KeyError(f"no setting {key!r}")  # a programming error: flags are mapped to known settings
        layer.take(setting, raw, flag_names.get(key, f"--{key.replace('_', '-')}"))
    return layer


# -- merging ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """The effective configuration and where each value came from."""

    config: ServerConfig
    logging: LoggingConfig
    sources: Mapping[str, str]
    """Key -> where its value came from (the file, the variable, the flag); absent: the default."""

    def value(self, key: str) -> Any:
        """The effective value of ``key`` (``port``, ``limits.max_calls``)."""
        setting = settings()[key]
        holder: Any = self.logging if setting.owner is LoggingConfig else self.config
        if setting.table is not None:
            holder = getattr(holder, setting.table)
        return getattr(holder, setting.name)


def load(
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
    flag_names: Mapping[str, str] | None = None,
    *,
    require_datasets: bool = True,
    read: Callable[[Path], bytes] = Path.read_bytes,
) -> Settings:
    """The effective settings: defaults < ``file`` < ``environ`` < ``flags`` (key -> value of the flags given;
    ``flag_names``: key -> the flag, for messages). A mapping (``datasets``) merges by entry across the layers;
    any other value is replaced. ``require_datasets``: no dataset at all is a problem (``serve`` needs one).

    Raises :class:`ConfigError` with every problem found."""
    layers = [
        _from_file(file, read) if file is not None else _Layer(),
        _from_environment(environ or {}),
        _from_flags(flags or {}, flag_names or {}),
    ]
    problems = [p for layer in layers for p in layer.problems]
    merged: dict[str, tuple[Any, str]] = {}
    for layer in layers:
        for key, (value, where) in layer.values.items():
            if settings()[key].shape == "mapping" and key in merged:
                before, was = merged[key]
                value, where = {**before, **value}, f"{was}; {where}"
            merged[key] = (value, where)
    problems += _combinations(merged, require_datasets)
    if problems:
        raise ConfigError(problems)
    values = {key: value for key, (value, _) in merged.items()}
    try:
        config = _build(ServerConfig, values, "")
    except ValueError as exc:  # ServerConfig's own checks
        raise ConfigError([str(exc)]) from None
    return Settings(
        config=config,
        logging=_build(LoggingConfig, values, ""),
        sources={key: where for key, (_, where) in merged.items()},
    )


def _build(cls: type[Any], values: Mapping[str, Any], prefix: str) -> Any:
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if key in _tables():
            kwargs[f.name] = _build(_tables()[key], values, key + ".")
        elif key in values:
            kwargs[f.name] = values[key]
    if cls is ServerConfig:
        kwargs.setdefault("datasets", {})
    return cls(**kwargs)


def _combinations(merged: Mapping[str, tuple[Any, str]], require_datasets: bool) -> list[str]:
    """Problems of values that do not go together (each named with where it came from)."""

    def named(key: str) -> str:
        return f"{key} (from {merged[key][1]})" if key in merged else key

    def given(key: str) -> bool:
        return merged.get(key, (None, ""))[0] is not None

    problems = []
    if given("tls_cert") != given("tls_key") or (given("tls_client_ca") and not given("tls_cert")):
        present = [named(k) for k in ("tls_cert", "tls_key", "tls_client_ca") if given(k)]
        problems.append(
            f"tls_cert and tls_key (--tls-cert, --tls-key) go together (tls_client_ca needs them); given: "
            f"{', '.join(present)}"
        )
    if given("auth") and given("auth_config"):
        problems.append(f"give identities in one place: {named('auth_config')} or {named('auth')}, not both")
    if require_datasets and not merged.get("datasets", ({}, ""))[0]:
        problems.append(
            "no dataset: give at least one --dataset NAME=PATH.h5 (or --phantom), a [datasets] table in the "
            f'configuration file (NAME = "PATH.h5") or {ENV_PREFIX}DATASETS{NESTED}NAME=PATH.h5'
        )
    return problems


# -- writing ------------------------------------------------------------------------------------------------------

_UNITS = (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_WIDTH = 118


def _toml(value: Any, setting: Setting | None = None) -> str:
    """One TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if setting is not None and setting.name.endswith("_bytes") and value:
            for unit, size in _UNITS:
                if value % size == 0:
                    return f'"{value // size}{unit}"'
        return str(value)
    if isinstance(value, float):
        return repr(value)  # TOML spells inf and nan as Python does
    if isinstance(value, Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (tuple, list, frozenset, set)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _key(name: str) -> str:
    return name if name and all(c.isalnum() or c in "_-" for c in name) else json.dumps(name, ensure_ascii=False)


def _comment(text: str) -> list[str]:
    """``text`` (a docstring) as comment lines, its reStructuredText roles and literals as plain backticks."""
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text).replace("``", "`")
    return textwrap.wrap(text, _WIDTH, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)


def _assignment(setting: Setting, value: Any, source: str | None) -> list[str]:
    lines = _comment(setting.doc)
    if value is None:
        return [*lines, f"# {setting.name} is not set"]
    line = f"{setting.name} = {_toml(value, setting)}"
    return [*lines, f"{line}  # from {source}" if source else line]


def _auth_lines(auth: Authenticator) -> list[str]:
    """The identities of ``auth`` as ``[[auth.identity]]`` tables, tokens redacted (their digests too)."""
    found: dict[str, dict[str, Any]] = {}
    for _, identity in auth.tokens:
        entry = found.setdefault(identity.name, {"roles": identity.roles, "tokens": 0, "subjects": []})
        entry["tokens"] += 1
    for subject, identity in auth.subjects.items():
        entry = found.setdefault(identity.name, {"roles": identity.roles, "tokens": 0, "subjects": []})
        entry["subjects"].append(subject)
    lines: list[str] = []
    for name, entry in found.items():
        lines += ["", "[[auth.identity]]", f"name = {_toml(name)}", f"roles = {_toml(sorted(entry['roles']))}"]
        if entry["tokens"]:
            lines.append(f"token_sha256 = {_toml([REDACTED] * entry['tokens'])}  # redacted")
        if entry["subjects"]:
            lines.append(f"subjects = {_toml(entry['subjects'])}")
    return lines


_PARSED[Authenticator] = (parse_auth_config, _auth_lines)


def render(effective: Settings, title: str = "") -> str:
    """``effective`` as a TOML file: every setting, defaults included, each under its docstring as a comment and,
    when not the default, with where it came from; secrets redacted (a redacted file does not load as it is)."""
    known = settings()
    lines = _comment(title)
    if lines:
        lines.append("")
    lines += _comment(
        'Byte sizes take an int or a string such as "512MiB" or "1GiB"; relative paths are relative to the file\'s '
        f"folder. Environment: {ENV_PREFIX}<KEY>, {ENV_PREFIX}<TABLE>{NESTED}<KEY>; command-line flags win."
    )
    tables: dict[str, list[Setting]] = {}
    for setting in known.values():
        if setting.table is not None:
            tables.setdefault(setting.table, []).append(setting)
        elif setting.is_table:
            tables.setdefault(setting.key, []).append(setting)
        else:
            lines += ["", *_assignment(setting, effective.value(setting.key), effective.sources.get(setting.key))]
    for table, members in tables.items():
        if len(members) == 1 and members[0].key == table:
            setting = members[0]
            value = effective.value(setting.key)
            source = effective.sources.get(setting.key)
            lines += ["", *_comment(setting.doc)]
            if setting.shape == "parsed":
                _, write = _PARSED[_optional_inner(setting.kind)]
                lines += [f"# [{table}] is not set"] if value is None else [f"# from {source}", *write(value)]
                continue
            lines.append(f"[{table}]" + (f"  # from {source}" if source else ""))
            if not value:
                lines.append('# NAME = "PATH.h5"' if table == "datasets" else '# NAME = "VALUE"')
            lines += [f"{_key(k)} = {_toml(v)}" for k, v in value.items()]
            continue
        cls = _tables()[table]
        lines += ["", *_comment(inspect.getdoc(cls) or ""), f"[{table}]"]
        for setting in members:
            lines += [*_assignment(setting, effective.value(setting.key), effective.sources.get(setting.key))]
    return "\n".join(lines) + "\n"


def defaults() -> Settings:
    """The settings of nothing given: the documented defaults."""
    return load(require_datasets=False)
