"""mkdocs hook: the params reference page, generated from the schema in pipeline/config.py at every
build, so that it cannot drift from what `params.yaml` is validated against. Each key's text is the
comment above it or beside it in the schema's source, each section's the class docstring."""

from __future__ import annotations

import ast
import inspect
import io
import tokenize
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel

from pipeline import config

MARKER = "<!-- params-reference -->"


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """The comment lines right above each field of `model`'s class body, and the one at its line's end."""
    source, _ = inspect.getsourcelines(model)
    comments = {tok.start[0]: tok.string.lstrip("# ").rstrip()
                for tok in tokenize.generate_tokens(io.StringIO("".join(source)).readline) if tok.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse("".join(source)).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, line = [], node.lineno - 1
            while line in comments and source[line - 1].lstrip().startswith("#"):
                above.insert(0, comments[line])
                line -= 1
            beside = [comments[node.end_lineno]] if node.end_lineno in comments and \
                not source[node.end_lineno - 1].lstrip().startswith("#") else []
            found[node.target.id] = " ".join(above + beside)
    return found


BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def type_text(annotation, metadata=()) -> str:
    """A type as a user writes its values: "a" or "b" for a Literal, `int > 0` for a bounded int."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " or ".join(f'"{v}"' for v in args)
    if origin is Annotated:
        return type_text(args[0], args[1:])
    if origin in (Union, UnionType):
        return " or ".join(type_text(arg) for arg in args)
    if annotation is type(None):
        return "null"
    text = str(annotation).replace("typing.", "") if args else annotation.__name__
    bounds = [f"{sign} {getattr(m, attr)}" for m in metadata for attr, sign in BOUNDS if hasattr(m, attr)]
    return " ".join([text, ", ".join(bounds)]) if bounds else text


def default_text(field) -> str:
    if field.is_required():
        return "required"
    value = field.default
    return "`null`" if value is None else f"`{value!r}`".replace("'", '"')


def section_tables(model: type[BaseModel], prefix: str) -> list[str]:
    """Markdown for `model`'s keys under `prefix`: a table of its plain keys, then each sub-section."""
    comments = field_comments(model)
    rows, subsections = [], []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        if inspect.isclass(field.annotation) and issubclass(field.annotation, BaseModel):
            subsections.append((key, field.annotation))
            continue
        cells = (f"`{key}`", f"`{type_text(field.annotation, field.metadata)}`", default_text(field), comments.get(name, ""))
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines = [f"## `{prefix.rstrip('.')}`", ""] if prefix else []
    doc = inspect.getdoc(model)
    if prefix and doc and model.__doc__ is not config.Section.__doc__:
        lines += [" ".join(doc.split()), ""]
    if rows:
        lines += ["| key | type | default | what |", "|---|---|---|---|", *rows, ""]
    for key, sub in subsections:
        lines += section_tables(sub, f"{key}.")
    return lines


def params_reference() -> str:
    return "\n".join(section_tables(config.Params, ""))


def on_page_markdown(markdown: str, page, **_) -> str:
    return markdown.replace(MARKER, params_reference()) if MARKER in markdown else markdown


if __name__ == "__main__":  # print the reference (what the docs page shows)
    print(params_reference())
