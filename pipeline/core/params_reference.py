"""The params reference page, ``docs/params.md``, generated from the schema in :mod:`pipeline.core.config`.

Everything on the page is read from the code, so it cannot drift from what is validated:

* keys, types and defaults from the dataclasses (``dataclasses.fields``, ``typing.get_type_hints``;
  a ``Literal`` lists the choices);
* ranges from each ``validate()``'s ``_check_range(key, value, low, high, ...)`` calls, read with
  ``ast`` and bound to ``_check_range``'s own signature;
* the meaning from the field's trailing ``# comment`` (required: a field without one is an error);
* a check that is not a range from a ``# rule: ...`` comment line right above the field. Any other
  check in ``validate()`` that names a key without such a line shows as "see validation" and is
  listed by :func:`missing_rules` (tests/test_docs.py requires it to be empty).

Conditions around a check (``if self.x is not None:``) are not rendered: the type says when null is allowed.

``python -m pipeline.core.params_reference`` writes docs/params.md; ``--check`` only compares.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.core import config

REPO_ROOT = Path(__file__).resolve().parents[2]
PAGE = REPO_ROOT / "docs" / "params.md"
RULE_PREFIX = "rule:"
ANY_ELEMENT = "*"  # stands for a loop index in a checked key: knn.k[{i}] -> knn.k[*]


@dataclass(frozen=True)
class Entry:
    """One params key. ``key`` is dotted; a field of each row of a list of rows is ``section.list[].field``."""

    key: str
    type: str
    allowed: str
    default: str
    meaning: str
    rule_missing: bool = False  # validate() checks it beyond a range and no "# rule:" line says how


@dataclass(frozen=True)
class Section:
    """The keys of one dataclass: ``key`` is its dotted path ("" for the top level)."""

    key: str
    title: str
    intro: str
    entries: tuple[Entry, ...]


def sections(root: type = config.Params) -> list[Section]:
    """Every section of the schema under ``root``, depth first in field order."""
    bindings = _validate_bindings(root)
    # a section's validate() may check the keys of its rows (compare.strategies[].name): gather them all first
    ranges: dict[str, list[str]] = {}
    other_checks: set[str] = set()
    for cls, path in _section_classes(root):
        cls_ranges, cls_other = _checks(cls, path, bindings.get(cls, {}))
        for key, texts in cls_ranges.items():
            ranges.setdefault(key, []).extend(texts)
        other_checks |= cls_other
    found: list[Section] = []

    def visit(cls: type, path: str, title: str) -> None:
        source = _class_source(cls)
        hints = typing.get_type_hints(cls)
        entries, nested = [], []
        for f in dataclasses.fields(cls):
            hint, key = hints[f.name], _join(path, f.name)
            if dataclasses.is_dataclass(hint):
                nested.append((hint, key, f"`{key}`"))
                continue
            row = _row_class(hint)
            if row is not None:
                nested.append((row, f"{key}[]", f"`{key}` rows"))
            meaning, rule = source.comments(f.name)
            if not meaning:
                raise ValueError(f"{cls.__name__}.{f.name} ({key}) has no trailing # comment to say what it means")
            missing = key in other_checks and not rule
            allowed = "; ".join([*_choices(hint), *ranges.get(key, []), *([rule] if rule else []),
                                 *(["see validation"] if missing else [])])
            if _not_output_key(key):
                meaning += " (not a stage param: changing it reruns nothing)"
            entries.append(Entry(key, _type_text(hint), allowed, _default_text(f), meaning, missing))
        intro = _intro(cls) if path else "Keys outside any section."
        found.append(Section(path, title, intro, tuple(entries)))
        for child, key, child_title in nested:
            visit(child, key, child_title)

    visit(root, "", "Top level")
    return found


def _section_classes(root: type, path: str = "") -> list[tuple[type, str]]:
    """``(class, dotted path)`` of ``root`` and every section and row class under it."""
    found = [(root, path)]
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        key = _join(path, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            found += _section_classes(hints[f.name], key)
        elif _row_class(hints[f.name]) is not None:
            found += _section_classes(_row_class(hints[f.name]), f"{key}[]")
    return found


def keys(root: type = config.Params) -> set[str]:
    """The dotted keys a params file can set (lists, including lists of rows, are one key)."""
    return {e.key for s in sections(root) for e in s.entries if "[]" not in e.key}


def missing_rules(root: type = config.Params) -> list[str]:
    """Keys that validate() checks beyond a range without a ``# rule:`` comment saying how."""
    return [e.key for s in sections(root) for e in s.entries if e.rule_missing]


def render(root: type = config.Params) -> str:
    """The Markdown page: an introduction, then one table per section."""
    all_sections = sections(root)
    lines = [
        "# `params.yaml` reference: every key, its type, allowed values, default and meaning",
        "",
        "Generated from the schema in [`pipeline/core/config.py`](../pipeline/core/config.py) by",
        "`python -m pipeline.core.params_reference`: types and defaults come from its dataclasses, ranges",
        "from its `validate()` methods, meanings from the fields' comments. Edit those, not this page;",
        "`tests/test_docs.py` fails when the two differ.",
        "",
        "The defaults are also what [`params.yaml`](../params.yaml) ships with, so a key left out of a",
        "params file means its default. Every key is checked before any work starts, and a bad one fails",
        "naming its dotted key. Change a key for one run with `dvc exp run -S key=value`.",
        "",
        "Allowed values: `[a, b]` includes both ends, `(a, b]` excludes `a`; a range may name another key;",
        "\"each\" applies to every element of a list.",
        "",
        "Sections: " + ", ".join(f"[{s.title}](#{_heading_anchor(s.title)})" for s in all_sections) + ".",
    ]
    for section in all_sections:
        lines += ["", f"## {section.title}", ""]
        if section.intro:
            lines += [section.intro, ""]
        lines += ["| key | type | allowed | default | meaning |", "|---|---|---|---|---|"]
        for e in section.entries:
            cells = (f"`{e.key}`", e.type, e.allowed or "any", e.default, e.meaning)
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _heading_anchor(title: str) -> str:
    # the same slug rule as tests/test_docs.py's link check (GitHub's); only titles of this page pass here
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _cell(text: str) -> str:
    # | ends a cell even inside a code span; <word> would be read as an HTML tag
    return text.replace("|", "\\|").replace("<", "&lt;")


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _not_output_key(key: str) -> bool:
    section, _, name = key.partition(".")
    return name in config.NOT_OUTPUT_KEYS.get(section, ())


def _intro(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    first = " ".join(doc.split("\n\n")[0].split())
    first = re.sub(r":\w+:`([^`]+)`", r"`\1`", first)  # :mod:`x` -> `x`
    return first.replace("``", "`")


# -- types and defaults -------------------------------------------------------------------------


def _row_class(hint: Any) -> type | None:
    """The dataclass of a ``tuple[Row, ...]`` field, else None."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _type_text(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in (int, float, bool, str):
        return hint.__name__
    if origin is Literal:
        return " or ".join(sorted({type(a).__name__ for a in args}))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_text(a) for a in args)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        if dataclasses.is_dataclass(args[0]):
            return "list of {" + ", ".join(f.name for f in dataclasses.fields(args[0])) + "}"
        return f"list of {_type_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    raise TypeError(f"no rendering for type {hint}")  # a new kind of field: teach this module its name


def _choices(hint: Any) -> list[str]:
    """``["one of `a`, `b`"]`` for a Literal (also inside ``X | None``), else []."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [c for a in typing.get_args(hint) for c in _choices(a)]
    if hint is bool:
        return ["one of `true`, `false`"]
    if typing.get_origin(hint) is Literal:
        return ["one of " + ", ".join(f"`{_yaml(a)}`" for a in typing.get_args(hint))]
    return []


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
        # rows are too wide for a cell: their first field names them (their fields have their own table)
        first = dataclasses.fields(value[0])[0].name
        return f"{len(value)} rows: " + ", ".join(f"`{getattr(row, first)}`" for row in value)
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """A value as params.yaml writes it (flow style)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return repr(value) if isinstance(value, float) else str(value)


# -- comments -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ClassSource:
    node: ast.ClassDef
    trailing: dict[int, str]  # line -> trailing comment text, without "#"
    whole_line: dict[int, str]  # line -> text of a comment-only line, without "#"

    def comments(self, field_name: str) -> tuple[str, str]:
        """``(meaning, rule)`` of a field: its trailing comment and a ``# rule:`` line in the comments above it."""
        for stmt in self.node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == field_name:
                rule, line = "", stmt.lineno - 1
                while line in self.whole_line:
                    if self.whole_line[line].startswith(RULE_PREFIX):
                        rule = self.whole_line[line][len(RULE_PREFIX):].strip()
                    line -= 1
                return self.trailing.get(stmt.end_lineno, ""), rule
        raise KeyError(field_name)


@functools.cache
def _module_source(path: str) -> tuple[ast.Module, dict[int, str], dict[int, str]]:
    text = Path(path).read_text()
    trailing, whole_line = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.COMMENT:
            line, col = token.start
            target = trailing if token.line[:col].strip() else whole_line
            target[line] = token.string[1:].strip()
    return ast.parse(text, path), trailing, whole_line


def _class_source(cls: type) -> _ClassSource:
    tree, trailing, whole_line = _module_source(inspect.getsourcefile(cls))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            return _ClassSource(node, trailing, whole_line)
    raise LookupError(f"class {cls.__name__} not found at module level of {inspect.getsourcefile(cls)}")


def _validate_node(cls: type) -> ast.FunctionDef | None:
    for stmt in _class_source(cls).node.body:
        if isinstance(stmt, ast.FunctionDef) and stmt.name == "validate":
            return stmt
    return None


# -- checks -------------------------------------------------------------------------------------


def _validate_bindings(root: type) -> dict[type, dict[str, str]]:
    """For each section class, what its validate()'s extra arguments are, as its parent passes them.

    ``Params.validate`` calls ``self.extract.validate(self.patch_size(), self.model.depth, "extract")``,
    so in ExtractConfig's checks ``depth`` reads as ``model.depth``.
    """
    bindings: dict[type, dict[str, str]] = {}

    def visit(cls: type, path: str) -> None:
        hints = typing.get_type_hints(cls)
        node = _validate_node(cls)
        for call in ast.walk(node) if node else ():
            func = call.func if isinstance(call, ast.Call) else None
            if (isinstance(func, ast.Attribute) and func.attr == "validate" and isinstance(func.value, ast.Attribute)
                    and isinstance(func.value.value, ast.Name) and func.value.value.id == "self"
                    and dataclasses.is_dataclass(hints.get(func.value.attr))):
                child = hints[func.value.attr]
                child_node = _validate_node(child)
                names = [a.arg for a in child_node.args.args[1:]] if child_node else []
                bindings[child] = {name: _expr(arg, path, {}) for name, arg in zip(names, call.args)}
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                visit(hints[f.name], _join(path, f.name))

    visit(root, "")
    return bindings


def _checks(cls: type, path: str, bindings: dict[str, str]) -> tuple[dict[str, list[str]], set[str]]:
    """``(ranges, other)``: range texts per key, and the keys with any other check, from ``cls.validate``."""
    ranges: dict[str, list[str]] = {}
    other: set[str] = set()
    node = _validate_node(cls)
    if node is None:
        return ranges, other
    signature = inspect.signature(config._check_range)

    def on_call(call: ast.Call, env: dict[str, str]) -> None:
        if not call.args:
            return
        key = _key(call.args[0], env, path)
        if key is None:
            return
        each = key.endswith(f"[{ANY_ELEMENT}]")
        entry_key = key.removesuffix(f"[{ANY_ELEMENT}]").replace(f"[{ANY_ELEMENT}]", "[]")
        if isinstance(call.func, ast.Name) and call.func.id == config._check_range.__name__:
            bound = signature.bind(*call.args, **{k.arg: k.value for k in call.keywords})
            text = _range(bound.arguments, signature, path, bindings)
            ranges.setdefault(entry_key, []).append(f"each {text}" if each else text)
        else:
            other.add(entry_key)

    def walk(statements: list[ast.stmt], env: dict[str, str]) -> None:
        for stmt in statements:
            if isinstance(stmt, ast.For):
                for loop_env in _loop_bindings(stmt.target, stmt.iter):
                    walk(stmt.body, {**env, **loop_env})
                walk(stmt.orelse, env)
            elif isinstance(stmt, (ast.If, ast.While)):
                walk(stmt.body, env)
                walk(stmt.orelse, env)
            elif isinstance(stmt, (ast.With, ast.Try)):
                walk(stmt.body, env)
                for handler in getattr(stmt, "handlers", ()):
                    walk(handler.body, env)
                walk(getattr(stmt, "orelse", []), env)
                walk(getattr(stmt, "finalbody", []), env)
            else:
                if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                    key = _key(stmt.value, env, path)  # key = f"{prefix}.strategies[{i}]", used by later checks
                    if key is not None:
                        env = {**env, stmt.targets[0].id: key}
                for call in ast.walk(stmt):
                    if isinstance(call, ast.Call):
                        on_call(call, env)

    walk(node.body, {"prefix": path})
    return ranges, other


def _loop_bindings(target: ast.expr, iterable: ast.expr) -> list[dict[str, str]]:
    """One name -> string binding per iteration of a loop over literal strings; [{}] when it is not one."""
    if not isinstance(iterable, (ast.Tuple, ast.List)):
        return [{}]
    found = []
    for item in iterable.elts:
        if isinstance(target, ast.Name) and isinstance(item, ast.Constant) and isinstance(item.value, str):
            found.append({target.id: item.value})
        elif isinstance(target, ast.Tuple) and isinstance(item, ast.Tuple) and len(item.elts) == len(target.elts):
            found.append({t.id: v.value for t, v in zip(target.elts, item.elts)
                          if isinstance(t, ast.Name) and isinstance(v, ast.Constant) and isinstance(v.value, str)})
        else:
            return [{}]
    return found


def _key(node: ast.expr, env: dict[str, str], path: str) -> str | None:
    """The dotted key a check names, if ``node`` builds one under ``path`` (``knn.k[*]``), else None."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.Name) and node.id in env:
        text = env[node.id]
    elif isinstance(node, ast.JoinedStr):
        parts = []
        for value in node.values:
            if isinstance(value, ast.Constant):
                parts.append(str(value.value))
            elif isinstance(value, ast.FormattedValue) and isinstance(value.value, ast.Name):
                parts.append(env.get(value.value.id, ANY_ELEMENT))
            else:
                parts.append(ANY_ELEMENT)
        text = "".join(parts)
    else:
        return None
    rest = text if not path else text[len(path) + 1:] if text.startswith(path + ".") else None
    if rest is None or not re.fullmatch(r"[A-Za-z_*][\w*]*(\[\*\])?(\.[\w*]+(\[\*\])?)*", rest):
        return None
    if ANY_ELEMENT in re.sub(r"\[\*\]", "", rest):
        if not isinstance(node, ast.JoinedStr):
            return None  # a literal such as "vit_*": not a key
        # a key this module could not read (not a loop over literal names): say so, do not drop the check
        raise ValueError(f"cannot tell which key {ast.unparse(node)} names in the validate() of section {path!r}")
    return _join(path, rest)


def _range(arguments: dict[str, Any], signature: inspect.Signature, path: str, bindings: dict[str, str]) -> str:
    """``[low, high]`` text of one bound ``_check_range`` call (an ``x if c else y`` bound gives both cases)."""
    def flag(name: str) -> bool:
        node = arguments.get(name)
        if node is None:
            parameter = signature.parameters.get(name)
            return bool(parameter.default) if parameter is not None else False
        return bool(ast.literal_eval(node))

    low, high = arguments.get("low"), arguments.get("high")
    for bound in (low, high):
        if isinstance(bound, ast.IfExp):
            def pick(branch: ast.expr, bound: ast.expr = bound) -> dict[str, Any]:
                return {**arguments, "low" if bound is low else "high": branch}
            condition = _expr(bound.test, path, bindings)
            return (f"{_range(pick(bound.body), signature, path, bindings)} if {condition}, "
                    f"else {_range(pick(bound.orelse), signature, path, bindings)}")
    low_text = None if _is_none(low) else _expr(low, path, bindings)
    high_text = None if _is_none(high) else _expr(high, path, bindings)
    low_open, high_open = flag("low_open"), flag("high_open")
    if low_text is not None and high_text is not None:
        return f"{'(' if low_open else '['}{low_text}, {high_text}{')' if high_open else ']'}"
    if low_text is not None:
        return f"{'>' if low_open else '≥'} {low_text}"
    if high_text is not None:
        return f"{'<' if high_open else '≤'} {high_text}"
    return "any"


def _is_none(node: ast.expr | None) -> bool:
    return node is None or isinstance(node, ast.Constant) and node.value is None


def _expr(node: ast.expr, path: str, bindings: dict[str, str]) -> str:
    """A bound as a reader wants it: a number, or a key in backticks (``self.epochs`` -> `pretrain.epochs`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return repr(node.value)
    if isinstance(node, ast.Name) and node.id in bindings:
        return bindings[node.id]
    chain, part = [], node
    while isinstance(part, ast.Attribute):
        chain.insert(0, part.attr)
        part = part.value
    if chain and isinstance(part, ast.Name) and part.id == "self":
        return f"`{_join(path, '.'.join(chain))}`"
    return f"`{ast.unparse(node)}`"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=PAGE, help="the page to write (default: docs/params.md)")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when the page is stale")
    args = parser.parse_args(argv)
    page = render()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != page:
            print(f"{args.output} is stale: run python -m pipeline.core.params_reference", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
