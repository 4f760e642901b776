"""The configuration kernel: how every settings file is read, checked and refused.

Four schemas are read from files the user writes or points at — a merge recipe
(merging/recipe.py), a stage's ``emomerge.json`` lineage (merging/lineage.py), a curriculum
(training/curriculum.py) and an experiment (experiment/config.py). They share one
reader per format and one error line, so a typo reads the same whichever file it is in
(DESIGN.md, Configuration):

    <file>: key '<field.path>': <problem>

- :class:`Strict`: the base of every schema model (unknown keys are errors, not ignored).
- :data:`SafeName`: a name that becomes a folder name (a stage, a merge, an experiment).
- :func:`known_name`: a validator refusing a name outside a list the caller passes in (merging
  is the lowest layer and cannot import training's dataset registry).
- :func:`load_yaml` / :func:`load_json`: size limit, UTF-8 only, duplicate keys refused, YAML
  anchors and aliases refused, a mapping at the top level — or one :class:`ConfigError`.
- :func:`format_validation` / :func:`validate`: a pydantic error as that one line.

Merging is the lowest layer: this module imports pydantic and PyYAML only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, create_model
from pydantic.fields import FieldInfo

from .errors import InputError

#: Settings files are small; a larger file is someone pointing at the wrong file (a checkpoint,
#: a dataset) and is refused before it is read.
MAX_YAML_BYTES = 1 << 20
#: ``emomerge.json`` files carry per-module errors of a merge: larger, still far below this.
MAX_JSON_BYTES = 64 << 20

M = TypeVar("M", bound=BaseModel)


class ConfigError(InputError):
    """A settings file refused, as one line: ``<path>: [key '<key>': ]<detail>``.

    ``problem`` is the line without the path (what a file embedding this one repeats)."""

    def __init__(self, path: str | Path, detail: str, key: str | None = None) -> None:
        self.path = str(path)
        self.key = key
        self.detail = detail
        self.problem = detail if key is None else f"key '{key}': {detail}"
        super().__init__(f"{path}: {self.problem}")


def key_error(path: str | Path, key: str, problem: str) -> ConfigError:
    """The error of one key of a settings file, in the shared format (checks made after the
    schema validated, e.g. options that depend on each other)."""
    return ConfigError(path, problem, key or "(top level)")


# ---------------------------------------------------------------- models and name types


class Strict(BaseModel):
    """Base of every schema model: a key the schema does not know is an error (a typo must not
    fall back to a default silently)."""

    model_config = ConfigDict(extra="forbid")


_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SAFE_NAME_MAX = 128


def check_safe_name(value: str) -> str:
    """``value`` when it can be one folder name on POSIX file systems (no separator, no dot
    file, no parent step; Windows' reserved names such as ``CON`` are not refused); ValueError
    otherwise.

    The rule the curriculum and experiment schemas always applied (letters, digits, ``_``,
    ``-``, ``.``, starting with a letter or digit: no path separator, no leading dot), plus no
    ``..`` anywhere, no trailing newline (``re.match``'s ``$`` let one through) and a length cap.
    """
    if not _SAFE.fullmatch(value) or ".." in value or len(value) > SAFE_NAME_MAX:
        raise ValueError(
            "must be a folder-safe name (letters, digits, '_', '-', '.'; starting "
            f"with a letter or digit; no '..'; at most {SAFE_NAME_MAX} characters), "
            f"got {_short(value)}"
        )
    return value


#: A name used as a folder name (stages, merges, evaluation sets, experiments, architectures).
SafeName = Annotated[str, AfterValidator(check_safe_name)]


def known_name(
    kind: str, known: Collection[str] | Callable[[], Collection[str]]
) -> Callable[[str], str]:
    """A validator (for ``AfterValidator``) refusing a ``kind`` name not in ``known``, listing
    the known ones. ``known`` may be a callable, read when a value is checked (a registry filled
    after the schema is defined)."""

    def check(value: str) -> str:
        names = known() if callable(known) else known
        if value not in names:
            raise ValueError(f"unknown {kind} '{value}' (expected one of {sorted(names)})")
        return value

    check.__name__ = f"known_{kind.replace(' ', '_')}"
    return check


def overrides(model: type[BaseModel], name: str | None = None) -> type[Strict]:
    """A partial variant of ``model``: the same fields, types and constraints, each optional.

    For settings that override another file's (an experiment's ``lora`` / ``train`` over a
    curriculum's): an unknown key or a mistyped value is refused at load with its field path.
    A field given is validated as in ``model`` (``null`` only where ``model`` allows it); a
    field not given stays unset — :meth:`set_values` dumps only the given ones. Constraints
    live in the fields' annotations and ``Field`` arguments; a model with validator methods
    cannot be copied faithfully and is refused here.
    """
    decorators = model.__pydantic_decorators__
    if (
        decorators.field_validators
        or decorators.model_validators
        or decorators.validators
        or decorators.root_validators
    ):
        raise TypeError(
            f"{model.__name__}: put its checks in field annotations to derive "
            "overrides (validator methods are not copied)"
        )
    fields: dict[str, Any] = {}
    for field, info in model.model_fields.items():
        copy = FieldInfo.merge_field_infos(info, default=None)
        copy.default_factory = None
        fields[field] = (info.annotation, copy)
    return create_model(  # type: ignore[call-overload,no-any-return]
        name or f"{model.__name__}Overrides",
        __base__=_Overrides,
        __doc__=f"Overrides of {model.__name__}: any of its fields, each optional.",
        **fields,
    )


class _Overrides(Strict):
    def set_values(self) -> dict[str, Any]:
        """The fields the file gave (validated), as a mapping to lay over the full settings."""
        return self.model_dump(exclude_unset=True)


# ---------------------------------------------------------------- readers


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors/aliases (a billion-laughs document expands to
    gigabytes; settings never need them) and duplicate keys (the last one silently won)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(
                f"YAML anchors and aliases are not allowed (line {event.start_mark.line + 1})"
            )
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if duplicate:
                    raise _Refused(f"duplicate key '{key}' (line {key_node.start_mark.line + 1})")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


class _Refused(Exception):
    """A document refused by the loader (not a syntax error)."""


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump_yaml(data: Any) -> str:
    """YAML text :func:`load_yaml` reads back: no anchors or aliases even where ``data`` shares
    an object twice (PyYAML's safe_dump would write ``&id001`` / ``*id001``)."""
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False, allow_unicode=False)


def _read_text(path: Path, max_bytes: int, what: str) -> str:
    if not path.exists():
        raise ConfigError(path, f"{what} not found")
    if not path.is_file():
        raise ConfigError(path, f"not a file ({what} expected)")
    size = path.stat().st_size
    if size > max_bytes:
        raise ConfigError(
            path,
            f"{size} bytes, larger than the {max_bytes}-byte limit of a "
            f"{what} (is it the right file?)",
        )
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path,
            f"not a UTF-8 text file (undecodable byte "
            f"0x{data[exc.start]:02x} at offset {exc.start})",
        ) from exc


def require_mapping(data: Any, path: str | Path) -> dict[str, Any]:
    """``data`` when it is a mapping (a settings document); a ConfigError otherwise."""
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(path, f"expected a mapping at the top level, got {got}")
    return data


def load_yaml(
    path: str | Path, *, max_bytes: int = MAX_YAML_BYTES, what: str = "settings file"
) -> dict[str, Any]:
    """The mapping a YAML settings file holds, or a :class:`ConfigError` naming the file:
    missing, larger than ``max_bytes``, not UTF-8, not YAML, anchors/aliases, duplicate keys,
    not a mapping at the top level. ``what`` names the file in "not found" lines."""
    path = Path(path)
    text = _read_text(path, max_bytes, what)
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader subclass)
    except _Refused as exc:
        raise ConfigError(path, str(exc)) from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(path, f"not valid YAML ({where}{problem})") from exc
    except RecursionError as exc:
        raise ConfigError(path, "not valid YAML (nested too deeply)") from exc
    return require_mapping(data, path)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key '{key}'")
        out[key] = value
    return out


def load_json(
    path: str | Path, *, max_bytes: int = MAX_JSON_BYTES, what: str = "JSON file"
) -> dict[str, Any]:
    """The object a JSON file holds, with :func:`load_yaml`'s contract (JSON has no aliases)."""
    path = Path(path)
    text = _read_text(path, max_bytes, what)
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _Refused as exc:
        raise ConfigError(path, str(exc)) from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(
            path, f"not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})"
        ) from exc
    except RecursionError as exc:
        raise ConfigError(path, "not valid JSON (nested too deeply)") from exc
    if not isinstance(data, dict):
        raise ConfigError(
            path, f"expected a JSON object at the top level, got {type(data).__name__}"
        )
    return data


# ---------------------------------------------------------------- validation errors

#: Parts of a pydantic error location that name a union member, not a key: 'constrained-int',
#: "literal['auto']", 'function-after[...]', 'list[str]' and plain type names.
_TAG_TYPES = {"int", "float", "str", "bool", "bytes", "none", "list", "dict", "decimal"}


def _is_tag(part: Any) -> bool:
    return isinstance(part, str) and ("-" in part or "[" in part or part in _TAG_TYPES)


def _walk(loc: Sequence[Any], data: Any) -> tuple[list[Any], tuple[float, ...]]:
    """The parts of ``loc`` that are keys the user wrote, and their place in the document.

    A part is a key when it indexes ``data`` at its level (the last part may also be a key the
    data lacks: a missing or an unknown one); any other part is a union member's tag, whatever
    it is spelled like (a user's key may well contain "-" or be called "int")."""
    keys: list[Any] = []
    place: list[float] = []
    node = data
    for i, part in enumerate(loc):
        if isinstance(node, dict) and part in node:
            keys.append(part)
            place.append(list(node).index(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            keys.append(part)
            place.append(part)
            node = node[part]
        elif i == len(loc) - 1 and isinstance(node, dict) and not _is_tag(part):
            keys.append(part)  # required but missing: after everything written at its level
            place.append(math.inf)
    return keys, tuple(place)


def shown_key(part: Any) -> str:
    """A key as one printable piece of an error line."""
    text = str(part)
    return text if text.isprintable() else repr(text)[1:-1]  # one line, whatever the key holds


def field_path(loc: Sequence[Any], data: Any = None) -> str:
    """A pydantic location as the dotted key a user wrote (``stages.0.name``); union member
    tags are dropped (found by walking ``data`` when given, else by their spelling); the empty
    location is ``(top level)``."""
    parts = _walk(loc, data)[0] if data is not None else [p for p in loc if not _is_tag(p)]
    return ".".join(shown_key(p) for p in parts) or "(top level)"


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SCALARS = (str, int, float, bool, type(None))
_OWN_MESSAGE = {"value_error", "assertion_error", "extra_forbidden", "missing"}


def _problem(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required, but missing"
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if msg.startswith("Input should be "):
        msg = "must be " + msg.removeprefix("Input should be ")
    if msg[1:2].islower():  # "List should ..." → "list should ...", "NaN ..." stays
        msg = msg[:1].lower() + msg[1:]
    return msg


def _key_and_problem(
    exc: ValidationError, prefix: Sequence[str | int], data: Any = None
) -> tuple[str, str]:
    errors = exc.errors()
    if data is not None:  # the first error in document order (the user fixes one key at a time)
        errors = sorted(errors, key=lambda e: _walk(e["loc"], data)[1])
    first = errors[0]

    def key_of(err: Any) -> str:
        if data is None:
            return field_path((*prefix, *err["loc"]))
        keys = [*prefix, *_walk(err["loc"], data)[0]]
        return ".".join(shown_key(p) for p in keys) or "(top level)"

    key = key_of(first)
    group = [e for e in errors if key_of(e) == key]
    problems: list[str] = []
    for err in group:
        problem = _problem(err)
        if problem not in problems:
            problems.append(problem)
    if len(problems) > 1 and all(p.startswith("must be ") for p in problems):
        # "must be a valid boolean, unable to interpret input" → "a valid boolean"
        text = "must be " + " or ".join(p.removeprefix("must be ").split(", ")[0] for p in problems)
    else:
        text = problems[0]
    value = first.get("input")
    if first["type"] not in _OWN_MESSAGE and isinstance(value, _SCALARS):
        text += f", got {_short(value)}"
    return key, text


def format_validation(
    path: str | Path, exc: ValidationError, prefix: Sequence[str | int] = (), data: Any = None
) -> str:
    """One line for a schema error: ``<path>: key '<field.path>': <problem>``.

    The first error in document order is shown (the user fixes one key at a time). A union's
    members fail together: their problems are joined ("must be a valid boolean or a valid
    list"). The offending value is quoted when it is short and pydantic's message lacks it.
    ``prefix``: the location of the validated part inside the file; ``data``: what was
    validated (it tells keys from union tags and gives the document order).
    """
    key, text = _key_and_problem(exc, prefix, data)
    return f"{path}: key '{key}': {text}"


def validate(model: type[M], data: Any, path: str | Path, prefix: Sequence[str | int] = ()) -> M:
    """``model`` validated from ``data`` (a mapping read from ``path``); a :class:`ConfigError`
    in the shared one-line format otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        key, text = _key_and_problem(exc, prefix, data)
        raise ConfigError(path, text, key) from exc


__all__ = [
    "MAX_JSON_BYTES",
    "MAX_YAML_BYTES",
    "ConfigError",
    "SafeName",
    "Strict",
    "check_safe_name",
    "dump_yaml",
    "field_path",
    "format_validation",
    "key_error",
    "shown_key",
    "known_name",
    "load_json",
    "load_yaml",
    "overrides",
    "require_mapping",
    "validate",
]
