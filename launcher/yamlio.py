"""Strict YAML for run configs: one meaning per scalar, every key once, and a dump that loads back equal.

    load_text(text, name)   -> (data, origin)   a config file's text; ConfigError listing every problem
    load_file(path)         -> (data, origin)   the same for a file (UTF-8, an optional BOM)
    load_value(raw)         -> value            one ``key=value`` override value
    dump(data)              -> str              YAML that load_text reads back to ``data``

``origin`` maps a dotted key to the scalar as the user wrote it and its line (``("1:00:00", 7)``), so
that a message can show the value as written.

Scalars follow YAML 1.2's JSON-like rules, not PyYAML's YAML 1.1: ``true``/``false`` are the only
booleans (``yes``, ``on`` are strings), integers are decimal (``1:00:00`` is a string, not 3600
sexagesimal; ``010`` is 10, not octal 8), ``1e-4`` is a float, ``~``/``null``/empty are null, and
there are no timestamps. The dumper quotes every string that YAML 1.1 or these rules would read as
something else, so config.yaml loads back equal here and means the same to a plain
``yaml.safe_load``. Refused: a key given twice in one mapping (at any depth), keys that are not
strings, tags other than the core ones (``!!python/object``, ``!!binary``, custom ``!x``), recursive
aliases, alias expansions past :data:`MAX_NODES` values, and a raw U+0085/U+2028/U+2029 (YAML 1.1
reads them as line breaks, which silently changes the value).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Union

import yaml
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from launcher.errors import ConfigError

MAX_NODES = 100_000  # a run config has a few hundred values; alias bombs have billions
MAX_BYTES = 16 * 2**20
YAML_LINE_BREAKS = {"\x85": "U+0085 (next line)", "\u2028": "U+2028 (line separator)",
                    "\u2029": "U+2029 (paragraph separator)"}

T = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL, SEQ, MAP, MERGE = (T + x for x in ("str", "int", "float", "bool", "null", "seq",
                                                                 "map", "merge"))
ALLOWED_TAGS = {STR, INT, FLOAT, BOOL, NULL, SEQ, MAP, MERGE}

_INT = re.compile(r"[-+]?[0-9]+$")
_FLOAT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$|[-+]?\.(?:inf|Inf|INF)$"
                    r"|\.(?:nan|NaN|NAN)$")
_BOOL = re.compile(r"(?:true|True|TRUE|false|False|FALSE)$")
_NULL = re.compile(r"(?:~|null|Null|NULL|)$")


class _Resolver(yaml.resolver.BaseResolver):
    """Plain-scalar types as YAML 1.2 reads them (shared by loader and dumper)."""


_RESOLVERS = ((BOOL, _BOOL, "tTfF"), (INT, _INT, "-+0123456789"), (FLOAT, _FLOAT, "-+.0123456789"),
              (NULL, _NULL, ["~", "n", "N", ""]), (MERGE, re.compile(r"<<$"), "<"))
for _tag, _regexp, _first in _RESOLVERS:
    _Resolver.add_implicit_resolver(_tag, _regexp, list(_first))


class _Constructor(SafeConstructor):
    """Only the core tags; numbers parsed as YAML 1.2 writes them (errors are YAML errors)."""

    def _number(self, node, kind):
        text = self.construct_scalar(node)
        try:
            if kind is int:
                if not _INT.match(text):
                    raise ValueError
                return int(text)
            low = text.lower()
            if low.endswith(".inf"):
                return -math.inf if low.startswith("-") else math.inf
            if low == ".nan":
                return math.nan
            if not _FLOAT.match(text):
                raise ValueError
            return float(text)
        except ValueError:
            raise ConstructorError(None, None, f"{text!r} is not a{'n integer' if kind is int else ' number'}",
                                   node.start_mark) from None

    def construct_yaml_int(self, node):
        return self._number(node, int)

    def construct_yaml_float(self, node):
        return self._number(node, float)

    def construct_yaml_bool(self, node):
        text = self.construct_scalar(node)
        if not _BOOL.match(text):
            raise ConstructorError(None, None, f"{text!r} is not true or false", node.start_mark)
        return text.lower() == "true"


_Constructor.add_constructor(INT, _Constructor.construct_yaml_int)
_Constructor.add_constructor(FLOAT, _Constructor.construct_yaml_float)
_Constructor.add_constructor(BOOL, _Constructor.construct_yaml_bool)


class _Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser, yaml.composer.Composer,
              _Constructor, _Resolver):
    def __init__(self, stream):
        yaml.reader.Reader.__init__(self, stream)
        yaml.scanner.Scanner.__init__(self)
        yaml.parser.Parser.__init__(self)
        yaml.composer.Composer.__init__(self)
        _Constructor.__init__(self)
        _Resolver.__init__(self)


class _DumpResolver(yaml.resolver.Resolver):
    """YAML 1.1's plain-scalar types and ours: a string either would read as something else is quoted,
    so config.yaml means the same to this loader and to a plain ``yaml.safe_load``."""


for _tag, _regexp, _first in _RESOLVERS:
    _DumpResolver.add_implicit_resolver(_tag, _regexp, list(_first))


class _Dumper(yaml.emitter.Emitter, yaml.serializer.Serializer, yaml.representer.SafeRepresenter, _DumpResolver):
    def __init__(self, stream, default_style=None, default_flow_style=False, canonical=None, indent=None,
                 width=None, allow_unicode=None, line_break=None, encoding=None, explicit_start=None,
                 explicit_end=None, version=None, tags=None, sort_keys=True):
        yaml.emitter.Emitter.__init__(self, stream, canonical=canonical, indent=indent, width=width,
                                      allow_unicode=allow_unicode, line_break=line_break)
        yaml.serializer.Serializer.__init__(self, encoding=encoding, explicit_start=explicit_start,
                                            explicit_end=explicit_end, version=version, tags=tags)
        yaml.representer.SafeRepresenter.__init__(self, default_style=default_style,
                                                  default_flow_style=default_flow_style, sort_keys=sort_keys)
        _DumpResolver.__init__(self)


def _represent_float(dumper, value: float):
    if math.isnan(value):
        text = ".nan"
    elif math.isinf(value):
        text = ".inf" if value > 0 else "-.inf"
    else:
        text = repr(value)  # the shortest form that reads back equal: 0.1, 3.0, 1e-05 ...
        if "." not in text:
            text = text.replace("e", ".0e")  # ... as 1.0e-05, which YAML 1.1 reads as a float too
    return dumper.represent_scalar(FLOAT, text)


_Dumper.add_representer(float, _represent_float)


def dump(data: Any) -> str:
    """YAML (block style, keys in order, non-ASCII escaped) that :func:`load_text` reads back equal."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=False, width=1 << 16)


# --------------------------------------------------------------------------- loading


def _as_written(node: ScalarNode) -> str:
    quote = {"'": "'", '"': '"'}.get(node.style or "", "")
    return f"{quote}{node.value}{quote}"


class _Walk:
    """Checks a composed document before anything is constructed, and records where scalars are."""

    def __init__(self, name: str):
        self.name, self.problems, self.origin, self.count = name, [], {}, 0
        self.stack: set[int] = set()

    def at(self, node: Node) -> str:
        return f"line {node.start_mark.line + 1}"

    def __call__(self, node: Node, path: tuple[str, ...]) -> None:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooBig
        where = ".".join(path) or "the top level"
        if node.tag not in ALLOWED_TAGS:
            self.problems.append(f"'{where}' ({self.at(node)}) has the YAML tag {node.tag!r}; only plain values, "
                                 "lists and mappings are read (no !!python/..., !!binary, !!timestamp or custom tags)")
            return
        if isinstance(node, ScalarNode):
            self.origin[".".join(path)] = (_as_written(node), node.start_mark.line + 1)
            return
        if id(node) in self.stack:
            self.problems.append(f"'{where}' ({self.at(node)}) is a recursive alias (it contains itself); "
                                 "write the value out")
            return
        self.stack.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                for i, item in enumerate(node.value):
                    self(item, path + (str(i),))
            elif isinstance(node, MappingNode):
                self.mapping(node, path)
        finally:
            self.stack.discard(id(node))

    def mapping(self, node: MappingNode, path: tuple[str, ...]) -> None:
        seen: dict[str, int] = {}
        for key, value in node.value:
            if key.tag == MERGE:  # `<<: *base`: explicit keys may override merged ones
                self(value, path)
                continue
            if not isinstance(key, ScalarNode) or key.tag != STR:
                shown = _as_written(key) if isinstance(key, ScalarNode) else "a list or mapping"
                under = f"under '{'.'.join(path)}'" if path else "at the top level"
                self.problems.append(f"key {shown} ({self.at(key)}) {under} is not a name; keys are strings "
                                     "(quote it, or check the indentation)")
                continue
            dotted = ".".join(path + (key.value,))
            line = key.start_mark.line + 1
            if key.value in seen:
                self.problems.append(f"key '{dotted}' is given twice (lines {seen[key.value]} and {line}); the "
                                     "second would silently replace the first: merge them into one")
            else:
                seen[key.value] = line
            self(value, path + (key.value,))


class _TooBig(Exception):
    pass


def _syntax_message(e: yaml.YAMLError, name: str) -> str:
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e)
    hint = "; indent with spaces, not tabs" if "'\\t'" in problem else \
        "; a run config is one YAML document (remove the second ---)" if "another document" in problem else ""
    return f"{name} is not valid YAML{where}: {problem}{hint}"


def _compose(text: str, name: str):
    try:
        loader = _Loader(text)
        return loader, loader.get_single_node()
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        char = e.character if isinstance(e.character, str) else chr(e.character)
        raise ConfigError([f"{name} line {line} holds the control character U+{ord(char):04X}, which YAML does not "
                           "allow in a file; remove it (in a double-quoted string write it as an escape, "
                           f"e.g. \"\\x{ord(char):02x}\")"], name) from None
    except yaml.YAMLError as e:
        raise ConfigError([_syntax_message(e, name)], name) from None
    except RecursionError:
        raise ConfigError([f"{name} is nested too deeply to read"], name) from None


def load_text(text: str, name: str = "config") -> tuple[Any, dict[str, tuple[str, int]]]:
    """A config file's text -> (data, origin); ConfigError with every problem found."""
    problems = []
    for char, what in YAML_LINE_BREAKS.items():
        pos = text.find(char)
        if pos >= 0:
            problems.append(f"{name} line {text.count(chr(10), 0, pos) + 1} holds a raw {what}, which YAML reads "
                            f"as a line break (the value would silently change); remove it, or write it as "
                            f"\"\\u{ord(char):04x}\" in a double-quoted string")
    if problems:
        raise ConfigError(problems, name)
    loader, node = _compose(text, name)
    if node is None:
        return None, {}
    walk = _Walk(name)
    try:
        walk(node, ())
    except _TooBig:
        raise ConfigError([f"{name} expands to more than {MAX_NODES:,} values through aliases (&anchor / *alias); "
                           "write the config out plainly"], name) from None
    except RecursionError:
        raise ConfigError([f"{name} is nested too deeply to read"], name) from None
    if walk.problems:
        raise ConfigError(walk.problems, name)
    try:
        data = loader.construct_document(node)
    except yaml.YAMLError as e:
        raise ConfigError([_syntax_message(e, name)], name) from None
    except RecursionError:
        raise ConfigError([f"{name} is nested too deeply to read"], name) from None
    finally:
        loader.dispose()
    return data, walk.origin


def shown_path(path: Union[str, os.PathLike]) -> str:
    """A path as text that can be printed: bytes that are not UTF-8 (surrogate escapes) as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_file(path: Union[str, os.PathLike]) -> tuple[Any, dict[str, tuple[str, int]]]:
    """A config file -> (data, origin). UTF-8 (a leading BOM is fine); ConfigError otherwise."""
    path = Path(path)
    name = shown_path(path)
    if name != str(path):
        raise ConfigError([f"config file name {name!r} is not valid UTF-8 text; rename the file"], name)
    if not path.exists():
        raise ConfigError([f"config file {name!r} does not exist; check the path"], name)
    if path.is_dir():
        raise ConfigError([f"config file {name!r} is a folder; give the run config YAML file"], name)
    if not path.is_file():
        raise ConfigError([f"config file {name!r} is not a regular file (a device or a pipe?); give the run "
                           "config YAML file"], name)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ConfigError([f"config file {name!r} is {path.stat().st_size:,} bytes; a run config is a few "
                               "KB of YAML: is this the right file?"], name)
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"config file {name!r} cannot be read ({e.strerror}); check its permissions"],
                          name) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        utf16 = " (it looks like UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise ConfigError([f"{name} is not UTF-8 text{utf16}: byte 0x{raw[e.start]:02x} on line {line} cannot be "
                           "decoded; save the file as UTF-8"], name) from None
    return load_text(text, name)


def load_value(raw: str) -> Any:
    """One override value (``train.lr=1e-4`` -> 0.0001). Text that is not a YAML value stays a string;
    a value that is YAML but breaks a rule above (a duplicate key in ``{a: 1, a: 2}``) is a ConfigError."""
    if raw == "":
        return ""
    try:
        _Loader(raw).get_single_node()
    except (yaml.YAMLError, RecursionError):
        return raw  # not YAML (e.g. `a: b` in a job name): the text itself
    data, _ = load_text(raw, "the value")
    return data
