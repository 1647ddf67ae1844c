"""Strict types for the run config: every field is checked by its type before pydantic sees it.

An int field takes a whole number (not true/false, not 8.0, not "8"), a float field a finite number,
a bool field true/false, a str field a string without NUL or unpaired surrogates; lists, tuples and
mappings are checked item by item, and free-form values (``model.config``) keep strings clean, numbers
finite and 64-bit, keys strings. Two field types add a rule of their own:

    PathStr       a path: not empty, no control, line-separator or invisible characters
    SlurmMinutes  minutes, or a Slurm time string as sbatch --time reads it ("1-12:00:00", "90:00")

``StrictSection`` is the base of every schema section (launcher/config.py), so a key added there gets
these rules from its type alone. Messages say what was given and what is meant ("a boolean
(true/false) where a whole number is meant"); launcher/rules.py adds the key and the value as written.
"""
from __future__ import annotations

import math
import re
import types
import unicodedata
from typing import Annotated, Any, Callable, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from launcher import yamlio

INT_MAX = 2**63 - 1  # values end up in JSON, C and torch: 64-bit integers at most


class TextForm:
    """Field metadata: a number that may also be written as a string in one documented form."""

    def __init__(self, parse: Callable[[str], Any], form: str):
        self.parse, self.form = parse, form


class PathText:
    """Field metadata: a filesystem path (not empty; no control, separator or invisible characters)."""


def parse_slurm_minutes(text: str) -> int:
    """A Slurm time string -> minutes, as sbatch --time reads it (seconds round up to a minute):
    MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if text.strip().upper() in ("-1", "INFINITE", "UNLIMITED"):
        raise ValueError("means no time limit, but Slurm needs one to send the preemption signal "
                         "(slurm.signal_lead_s before it): give a time such as 2-00:00:00")
    m = re.fullmatch(r"([0-9]+)-([0-9]+)(?::([0-9]+)(?::([0-9]+))?)?", text)  # D-HH[:MM[:SS]]
    if m:
        d, h, mi, s = (int(x or 0) for x in m.groups())
    else:
        m = re.fullmatch(r"([0-9]+)(?::([0-9]+)(?::([0-9]+))?)?", text)  # MM[:SS] or HH:MM:SS
        if not m:
            raise ValueError("is not a Slurm time: write minutes (90) or MM:SS, HH:MM:SS, D-HH, D-HH:MM, "
                             "D-HH:MM:SS (e.g. 1-12:00:00), as for sbatch --time")
        parts = [int(x) for x in m.groups() if x is not None]
        d, (h, mi, s) = 0, (parts if len(parts) == 3 else [0, parts[0], parts[1] if len(parts) == 2 else 0])
    minutes = (d * 86400 + h * 3600 + mi * 60 + s + 59) // 60
    if minutes == 0:
        raise ValueError("is zero, which Slurm reads as no time limit: give a time")
    return minutes


SlurmMinutes = Annotated[int, TextForm(parse_slurm_minutes, "a Slurm time string (MM:SS, HH:MM:SS, D-HH:MM:SS, ...)")]
PathStr = Annotated[str, PathText()]
_BAD_PATH_CATEGORIES = {"Cc": "a control character", "Cf": "an invisible format character",
                        "Cs": "an unpaired surrogate", "Zl": "a line separator", "Zp": "a paragraph separator"}


class _Wrong(Exception):
    """A value of the wrong kind; the message is the reason (the key and value are added around it)."""


def _what(value: Any) -> str:
    for kind, name in ((bool, "a boolean (true/false)"), (int, "a whole number"), (float, "a decimal number"),
                       (str, "a string"), (dict, "a mapping"), ((list, tuple), "a list")):
        if isinstance(value, kind):
            return name
    return "null (no value)" if value is None else f"a {type(value).__name__}"


def describe(ann: Any, meta: tuple = ()) -> str:
    """What a field of this type takes, in words."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return describe(args[0], (*meta, *ann.__metadata__))
    if origin in (Union, types.UnionType):
        arms = [describe(a, meta) for a in args if a is not type(None)]
        return " or ".join(arms + (["null"] if type(None) in args else []))
    if origin is Literal:
        return "one of " + ", ".join(yamlio.dump(c).strip().removesuffix("...").strip() for c in args)
    if origin in (list, tuple):
        n = f"{len(args)} " if origin is tuple and ... not in args else ""
        return f"a list of {n}items, each {describe(args[0])}"
    if origin is dict or ann is dict:
        return "a mapping (key: value)"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a section (a mapping of keys)"
    form = next((m.form for m in meta if isinstance(m, TextForm)), None)
    base = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}.get(ann, str(ann))
    if any(isinstance(m, PathText) for m in meta):
        base = "a path"
    return f"{base} or {form}" if form else base


def _text(value: str, meta: tuple) -> str:
    if "\x00" in value:
        raise _Wrong("holds a NUL character (\\x00), which no file, path or command can carry")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise _Wrong("is not valid Unicode text (it holds an unpaired surrogate, e.g. from a command-line byte "
                     "that is not UTF-8)")
    if any(isinstance(m, PathText) for m in meta):
        if not value.strip():
            raise _Wrong("is an empty path (relative paths are relative to the directory you launch from)")
        for c in value:
            kind = _BAD_PATH_CATEGORIES.get(unicodedata.category(c))
            if kind:
                raise _Wrong(f"holds {kind} (U+{ord(c):04X}): paths may hold spaces, quotes and $, but not control "
                             "characters (newline, tab, ...), line separators or invisible characters (a stray one "
                             "from a YAML block scalar or a copy-paste?)")
    return value


def _any(value: Any, where: str = "") -> Any:
    """A free-form value (model.config): strings clean, numbers finite and 64-bit, keys strings."""
    at = f"{where}: " if where else ""
    if isinstance(value, str):
        try:
            return _text(value, ())
        except _Wrong as e:
            raise _Wrong(f"{at}{e}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise _Wrong(f"{at}{value} is not a finite number")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > INT_MAX:
        raise _Wrong(f"{at}{value} is too large (more than 2**63 - 1)")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise _Wrong(f"{at}key {k!r} is not a string (quote it)")
            _any(v, f"{where}.{k}" if where else k)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _any(v, f"{where}[{i}]")
    return value


def strict_value(ann: Any, meta: tuple, value: Any) -> Any:
    """``value`` checked against type ``ann`` without lax conversions; returns it (a TextForm string
    parsed), or raises _Wrong with the reason."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return strict_value(args[0], (*meta, *ann.__metadata__), value)
    if ann is Any:
        return _any(value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        tries = []
        for arm in (a for a in args if a is not type(None)):
            try:
                return strict_value(arm, meta, value)
            except _Wrong as e:
                tries.append(str(e))
        specific = [t for t in tries if not t.startswith(_what(value) + " where")]
        raise _Wrong(specific[0] if len(specific) == 1 else f"{_what(value)} where {describe(ann, meta)} is meant")
    wrong = _Wrong(f"{_what(value)} where {describe(ann, meta)} is meant")
    if value is None:
        raise _Wrong(f"null (an empty value) where {describe(ann, meta)} is meant (give a value, or remove the key "
                     "to use the default)")
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        if isinstance(value, (dict, ann)):
            return value
        raise wrong
    if origin is Literal:
        if type(value) in {type(c) for c in args}:
            return value  # pydantic says which choices there are when the value is not one of them
        raise wrong
    if ann is bool:
        if type(value) is bool:
            return value
        raise wrong
    if ann is int:
        if type(value) is int:
            if abs(value) > INT_MAX:
                raise _Wrong(f"{value} is too large (more than 2**63 - 1)")
            return value
        form = next((m for m in meta if isinstance(m, TextForm)), None)
        if isinstance(value, str) and form is not None:
            try:
                value = form.parse(value)
            except ValueError as e:
                raise _Wrong(f"{value!r} {e}") from None
            if value > INT_MAX:
                raise _Wrong(f"{value} is too large (more than 2**63 - 1)")
            return value
        if type(value) is float and value.is_integer():
            raise _Wrong(f"a decimal number where {describe(ann, meta)} is meant (write {int(value)})")
        if isinstance(value, str):
            raise _Wrong(f"a string where {describe(ann, meta)} is meant (write the number without quotes)")
        raise wrong
    if ann is float:
        if type(value) is int:
            if abs(value) > 2**1023:
                raise _Wrong(f"{value} is too large for a floating-point number")
            return value
        if type(value) is float:
            if not math.isfinite(value):
                raise _Wrong(f"{value} is not a finite number (DeepSpeed's JSON and the optimizer need one)")
            return value
        if isinstance(value, str):
            raise _Wrong(f"a string where {describe(ann, meta)} is meant (write the number without quotes; 1e-4 "
                         "and 0.0001 both work)")
        raise wrong
    if ann is str:
        if type(value) is str:
            return _text(value, meta)
        raise wrong
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise wrong
        return [_item(args[0], v, i) for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise wrong
        return [_item(a, v, i) for i, (a, v) in enumerate(zip(args, value))]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        for k in value:
            if not isinstance(k, str):
                raise _Wrong(f"key {k!r} is not a string (quote it)")
        return {k: _any(v, k) if args[1] is Any else _item(args[1], v, k) for k, v in value.items()}
    return value


def _item(ann: Any, value: Any, at: Union[int, str]) -> Any:
    """One list item (``at`` its index) or mapping value (``at`` its key)."""
    try:
        return strict_value(ann, (), value)
    except _Wrong as e:
        raise _Wrong(f"item {at} ({value!r}): {e}" if isinstance(at, int) else f"{at}: {e}") from None


class StrictSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_types(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields[info.field_name]
        try:
            return strict_value(field.annotation, tuple(field.metadata), value)
        except _Wrong as e:
            raise PydanticCustomError("strict_type", "{reason}", {"reason": str(e)}) from None


def path_text_ok(value: Any) -> bool:
    """A string that passes the PathStr text rule (what else is wrong is the schema's to report)."""
    try:
        strict_value(PathStr, (), value)
        return True
    except _Wrong:
        return False
