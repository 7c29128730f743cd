#!/usr/bin/env python
"""Tables in the README and docs rendered from result files: no number typed by hand.

A rendered table is a template in an HTML comment, followed by its rendering::

    <!-- table
    R = benchmarks/digitsdet/distill_retinanet.json
    | student | box AP | vs. control |
    |---|---|---|
    | MGD | {{ mean(R.runs[name=retinanet_R18_from_R50_mgd].results.bbox/AP) | .2f }} | ... |
    -->
    | student | box AP | vs. control |
    |---|---|---|
    | MGD | 37.02 | ... |
    <!-- /table -->

Lines ``ALIAS = FILE`` name result files (paths from the repository root; JSON, or CSV read as
a list of rows with numeric cells as numbers); every other line of the template is copied with
each ``{{ EXPRESSION | FORMAT }}`` replaced by its value (``FORMAT`` is Python's format spec,
``.2f`` when left out; ``s`` renders a text value, such as a verdict, from one reference, and
``.Ns`` its first N characters, such as a hash's). An
expression adds and subtracts terms; a term is a number, a reference, or ``mean``, ``spread``
(max - min), ``count``, ``min`` or ``max`` of one or more references (comma-separated: the
values of several files). A reference starts at an alias and walks the file's JSON: ``.key`` or
``["any key"]`` (mapped over a list), ``[key=value]`` (the list items whose ``key`` is
``value``; one match is that item itself), ``[0]`` (an index). A reference must end at a number
unless it is aggregated; a missing file, key or match is an error that names the table.
Differences are computed from the files' values, never from rounded ones. A decimal number
typed into a template's table rows is an error: measured numbers come from files, config values
go in backticks.

``python dev/doc_tables.py [DOCUMENT ...]`` re-renders every table (of those documents) in
place; ``--check`` only reports the tables that differ from their files
(tests/dev/test_doc_tables.py runs it, and also fails on an AP table that is not rendered).
"""
import argparse
import csv
import glob
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

from d2kd.utils.io import atomic_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: the documents whose tables are checked
DOCUMENTS = ("README.md", "benchmarks/README.md", "docs/*.md", "docs/methods/*.md")

BLOCK = re.compile(r"<!-- table\n(?P<template>.*?)\n-->\n(?P<rendered>.*?)<!-- /table -->",
                   re.S)
ALIAS_LINE = re.compile(r"^(?P<alias>[A-Za-z_]\w*) = (?P<path>\S+)$")
AP_WORD = re.compile(r"\bAP(?:50|75|s|m|l)?\b")
CODE_SPAN = re.compile(r"`[^`]*`")
TYPED_NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?![\w.])")
PLACEHOLDER = re.compile(r"{{(?P<expression>.*?)}}")
STEP = re.compile(r"\.(?P<key>[^.\[\s()+]+)|\[\"(?P<quoted>[^\"]*)\"\]|\[(?P<index>\d+)\]"
                  r"|\[(?P<field>[^=\]]+)=(?P<value>[^\]]*)\]")
TERM = re.compile(r"\s*(?P<sign>[+-])?\s*(?:(?P<number>\d+(?:\.\d+)?)(?![\w.])"
                  r"|(?P<function>[a-z]+)\((?P<argument>[^()]+)\)"
                  r"|(?P<reference>(?:\[\"[^\"]*\"\]|[^\s()+])+))\s*")


class TableError(ValueError):
    """A template that cannot be rendered: a missing file, key or match, or bad syntax."""


def _spread(values: Sequence[float]) -> float:
    return max(values) - min(values)


AGGREGATES: Dict[str, Callable[[Sequence[float]], float]] = {
    "mean": lambda values: sum(values) / len(values),
    "spread": _spread,
    "count": len,
    "min": min,
    "max": max,
}


def resolve(reference: str, files: Dict[str, Any]) -> Any:
    """The value (or list of values) ``reference`` names in the loaded ``files``."""
    alias = re.match(r"[A-Za-z_]\w*", reference)
    alias, path = (alias.group(0), reference[alias.end():]) if alias else (reference, "")
    if alias not in files:
        raise TableError(f"{reference}: no file is named {alias!r} in this table")
    value, position = files[alias], 0
    while position < len(path):
        step = STEP.match(path, position)
        if step is None:
            raise TableError(f"{reference}: cannot read {path[position:]!r}")
        value = _step(value, step, reference)
        position = step.end()
    return value


def _step(value: Any, step: "re.Match[str]", reference: str) -> Any:
    key = step["key"] if step["key"] is not None else step["quoted"]
    if key is not None:
        if isinstance(value, list):
            return [_key(item, key, reference) for item in value]
        return _key(value, key, reference)
    if step["index"] is not None:
        if not isinstance(value, list):
            raise TableError(f"{reference}: {step.group(0)} needs a list")
        if int(step["index"]) >= len(value):
            raise TableError(f"{reference}: the list has {len(value)} items")
        return value[int(step["index"])]
    items = value if isinstance(value, list) else [value]
    matches = [item for item in items
               if isinstance(item, dict) and str(item.get(step["field"])) == step["value"]]
    if not matches:
        raise TableError(f"{reference}: no item has {step['field']} = {step['value']}")
    return matches[0] if len(matches) == 1 else matches


def _key(value: Any, key: str, reference: str) -> Any:
    if not isinstance(value, dict) or key not in value:
        raise TableError(f"{reference}: no key {key!r}")
    return value[key]


def _number(value: Any, reference: str) -> float:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TableError(f"{reference}: {value!r} is not one number (aggregate a list)")
    return value


def evaluate(expression: str, files: Dict[str, Any]) -> Union[int, float]:
    """The value of a placeholder's expression (terms added and subtracted)."""
    total, position, first = 0, 0, True  # an int while every term is one (for "d")
    while position < len(expression):
        term = TERM.match(expression, position)
        if term is None or term.end() == position or (not first and not term["sign"]):
            raise TableError(f"cannot read {expression[position:].strip()!r} in {expression!r}")
        if term["number"] is not None:
            value = float(term["number"]) if "." in term["number"] else int(term["number"])
        elif term["function"] is not None:
            if term["function"] not in AGGREGATES:
                raise TableError(f"{term['function']}: not one of {sorted(AGGREGATES)}")
            values = []
            for reference in term["argument"].split(","):
                value = resolve(reference.strip(), files)
                values += value if isinstance(value, list) else [value]
            if term["function"] != "count":  # count counts items of any kind
                values = [_number(v, term["argument"]) for v in values]
            value = AGGREGATES[term["function"]](values)
        else:
            value = _number(resolve(term["reference"], files), term["reference"])
        total += -value if term["sign"] == "-" else value
        position, first = term.end(), False
    if first:
        raise TableError("an empty {{ }}")
    return total


def render(template: str, load: Callable[[str], Any]) -> str:
    """The table a template renders to, its files read through ``load(path)``."""
    files: Dict[str, Any] = {}
    lines: List[str] = []
    for line in template.splitlines():
        alias = ALIAS_LINE.match(line)
        if alias:
            files[alias["alias"]] = load(alias["path"])
        else:
            lines.append(PLACEHOLDER.sub(lambda m: _placeholder(m["expression"], files), line))
    return "\n".join(lines) + "\n"


def _placeholder(body: str, files: Dict[str, Any]) -> str:
    expression, _, spec = body.partition("|")
    spec = spec.strip() or ".2f"
    if spec.endswith("s"):  # a text value (a verdict, a genome, a hash), one reference
        value = resolve(expression.strip(), files)
        if not isinstance(value, str):
            raise TableError(f"{expression.strip()}: {value!r} is not text (format {spec})")
        return format(value, spec)
    value = evaluate(expression.strip(), files)
    text = format(value, spec)
    return "0.00" if spec == ".2f" and text == "-0.00" else text


def typed_numbers(template: str) -> List[str]:
    """Decimal numbers typed into a template's table rows (outside placeholders and code
    spans): a measured number must come from a file; a config value goes in backticks."""
    found = []
    for line in template.splitlines():
        if line.startswith("|"):
            text = CODE_SPAN.sub("", PLACEHOLDER.sub("", line))
            found += TYPED_NUMBER.findall(text)
    return found


def _cell(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def load_result(path: str) -> Any:
    """A result file: JSON, or CSV as a list of rows (dicts; numeric cells as numbers)."""
    full = os.path.join(REPO, path)
    if not os.path.isfile(full):
        raise TableError(f"{path}: no such result file")
    with open(full, newline="") as f:
        if path.endswith(".csv"):
            return [{k: _cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
        return json.load(f)


@dataclass
class Table:
    document: str
    line: int  # 1-based line of its "<!-- table"
    template: str
    rendered: str


def tables(document: str, text: str) -> List[Table]:
    return [Table(document, text.count("\n", 0, m.start()) + 1, m["template"], m["rendered"])
            for m in BLOCK.finditer(text)]


def documents() -> List[str]:
    found: List[str] = []
    for pattern in DOCUMENTS:
        found += sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, pattern)))
    return found


def rerender(text: str, document: str) -> Tuple[str, List[str]]:
    """``text`` with every table re-rendered, and the errors (document:line: message)."""
    errors: List[str] = []

    def replace(match: "re.Match[str]") -> str:
        line = text.count("\n", 0, match.start()) + 1
        typed = typed_numbers(match["template"])
        if typed:
            errors.append(f"{document}:{line}: numbers typed by hand (not from a file): "
                          + ", ".join(typed))
        try:
            rendered = render(match["template"], load_result)
        except TableError as error:
            errors.append(f"{document}:{line}: {error}")
            return match.group(0)
        return f"<!-- table\n{match['template']}\n-->\n{rendered}<!-- /table -->"

    return BLOCK.sub(replace, text), errors


def unrendered_ap_tables(document: str, text: str) -> List[str]:
    """Markdown tables of AP (their header or the paragraph that introduces them names AP)
    that no template renders."""
    inside = [range(m.start(), m.end()) for m in BLOCK.finditer(text)]
    lines = text.splitlines(keepends=True)
    found, offset = [], 0
    for index, line in enumerate(lines):
        starts_table = line.startswith("|") and not (index and lines[index - 1].startswith("|"))
        if starts_table and not any(offset in r for r in inside):
            before = index - 1
            while before >= 0 and not lines[before].strip():
                before -= 1
            paragraph = []
            while before >= 0 and lines[before].strip() and not lines[before].startswith("|"):
                paragraph.append(lines[before])
                before -= 1
            if AP_WORD.search(line) or AP_WORD.search(" ".join(paragraph)):
                found.append(f"{document}:{index + 1}: an AP table that no template renders")
        offset += len(line)
    return found


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("documents", nargs="*", default=None,
                        help="only these documents (paths from the repository root)")
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when a table differs from its files")
    args = parser.parse_args(argv)
    problems: List[str] = []
    for document in args.documents or documents():
        with open(os.path.join(REPO, document)) as f:
            text = f.read()
        new, errors = rerender(text, document)
        problems += errors
        if new != text:
            if args.check:
                problems += [f"{t.document}:{t.line}: differs from its files"
                             for t, u in zip(tables(document, text), tables(document, new))
                             if t.rendered != u.rendered]
            else:
                with atomic_path(os.path.join(REPO, document)) as tmp, open(tmp, "w") as f:
                    f.write(new)
                print(f"rendered {document}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
