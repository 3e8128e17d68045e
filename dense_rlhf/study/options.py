"""Command-line options from dataclass fields, so that each setting is written once: its type, its default and its
one-line doc (the string literal under the field, as in mkdocstrings' attribute docstrings) become the option's
type, default and help.

Why not a library such as tyro: it maps nested configurations to dotted flags (``--ppo.lr``), which would change
the commands the committed results record, and the study needs only flat options, some of which override another
configuration's fields (``dense-rlhf experiment --lr`` sets ``PPOConfig.lr`` of whichever ``--ppo`` preset runs).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line doc of each field of the dataclass ``cls`` (and of its dataclass bases): the string literal
    written right under the field, whitespace collapsed. Empty where the source cannot be read."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, after in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _option_type(hint: Any) -> tuple[type, tuple | None]:
    """(the value's type, its choices or None) of a field's annotation: ``X | None`` is X, ``Literal[...]`` the
    type of its values with them as choices."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices
    return hint, None


def is_option(field: dataclasses.Field) -> bool:
    """Whether a dataclass field is a command-line option (``metadata={"cli": False}`` says it is not)."""
    return field.init and field.metadata.get("cli", True)


def _dest(cls: type, name: str) -> str:
    return f"{cls.__module__}.{cls.__qualname__}:{name}"


def add_fields(
    parser: argparse.ArgumentParser,
    cls: type,
    names: list[str] | None = None,
    *,
    defaults: object | None = None,
    flags: dict[str, str] | None = None,
    notes: dict[str, str] | None = None,
    override: bool = False,
) -> None:
    """Add one option per field of the dataclass ``cls`` (those in ``names``, in that order; default every field
    that ``is_option``): ``--field-name`` (or ``flags[name]``), typed by the field's annotation (``Literal``:
    choices; ``bool``: a switch), its help the field's doc, then ``notes[name]``, then the default.

    ``defaults``: an instance of ``cls`` whose values are the defaults (default: the fields' own).
    ``override``: the options set fields of a configuration built elsewhere (a preset): an option not given is
    absent, and :func:`parse` returns the given ones by class; the help shows the default of ``defaults`` if given.
    """
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    for name in names if names is not None else [f.name for f in dataclasses.fields(cls) if is_option(f)]:
        field = by_name[name]
        kind, choices = _option_type(hints[name])
        if defaults is not None:
            default = getattr(defaults, name)
        elif field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = None
        text = " ".join(part for part in (docs.get(name, ""), (notes or {}).get(name, "")) if part)
        if default is not None and (defaults is not None or not override) and default is not False:
            text += f" (default {default:g})" if isinstance(default, float) else f" (default {default})"
        kwargs: dict[str, Any] = {"help": text.replace("%", "%%")}
        if override:
            kwargs.update(dest=_dest(cls, name), default=argparse.SUPPRESS)
        else:
            kwargs.update(dest=name, default=default)
        if kind is bool:
            kwargs["action"] = "store_true" if not default else argparse.BooleanOptionalAction
        else:
            kwargs.update(type=kind, choices=choices, metavar=None if choices else kind.__name__.upper())
        parser.add_argument((flags or {}).get(name, "--" + name.replace("_", "-")), **kwargs)


def parse(
    parser: argparse.ArgumentParser, cls: type[T], argv: list[str], overrides: tuple[type, ...] = ()
) -> tuple[T, dict[type, dict[str, Any]]]:
    """Parse ``argv``: an instance of the dataclass ``cls`` from its options (:func:`add_fields` without
    ``override``), and for each class of ``overrides`` the fields given on the command line, by name."""
    values = vars(parser.parse_args(argv))
    own = {f.name: values[f.name] for f in dataclasses.fields(cls) if is_option(f) and f.name in values}
    given = {}
    for klass in overrides:
        prefix = _dest(klass, "")
        given[klass] = {key[len(prefix) :]: value for key, value in values.items() if key.startswith(prefix)}
    return cls(**own), given
