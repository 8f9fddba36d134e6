"""The strict base of every settings model, and the one formatter of their validation errors.

Every model a person writes (a device profile and each of its sections, a manifest, a training recipe, the gate's
thresholds) derives from :class:`StrictModel` (or :class:`FrozenModel`), so an unknown key, usually a typo, is
an error rather than a setting silently ignored; nowhere else says ``extra="forbid"``.

pydantic's own text is written for programmers (``Value error, ...``, ``Input should be ...``, ``Extra inputs are
not permitted``, ``Input is not a valid path for <class 'pathlib.Path'>``, ``valid dictionary or instance of
QualityConfig``). ``problems()`` keeps the location, drops that boilerplate, says what a wrong kind of value
should have been in the words of the YAML file (a mapping, a list, text, a path), says ``unknown key`` with the
nearest valid key ("did you mean `min_probability`?"), and names the command-line flag a value came from. Every
``ValidationError`` that reaches a person goes through ``describe()`` (or ``problems()``), wrapped in the
``EdgemedError`` of the module that validated it. ``describe_yaml_error()`` does the same for a file that is not
YAML at all (PyYAML ends its messages with ``in "<unicode string>"``).
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class StrictModel(BaseModel):
    """Base of every settings model: a key the model does not define is an error that names it."""

    model_config = ConfigDict(extra="forbid")


class FrozenModel(StrictModel):
    """A :class:`StrictModel` whose instances cannot be changed after validation (safe to share across threads)."""

    model_config = ConfigDict(frozen=True)  # merged with the parent's: extra="forbid" still applies


# pydantic's prefixes for exceptions raised inside validators; the text after them is ours.
_PREFIXES = ("Value error, ", "Assertion failed, ")
# pydantic's own checks read "Input should be greater than 0", "List should have at least 2 items ...".
_SHOULD = re.compile(r"^(Input|List|String|Value|Dictionary|Tuple|Set|Object|Decimal|Path) should ")
# A value of the wrong kind, said as a YAML file writes the right one (pydantic names Python classes here).
_KIND_WANTED = {
    "path_type": "must be a path, written as text",
    "model_type": "must be a section of keys (key: value)",
    "model_attributes_type": "must be a section of keys (key: value)",
    "dataclass_type": "must be a section of keys (key: value)",
    "dict_type": "must be a mapping (key: value)",
    "list_type": "must be a list ([a, b] or lines starting with -)",
    "tuple_type": "must be a list ([a, b] or lines starting with -)",
    "string_type": "must be text",
}


def _candidates(annotation: Any) -> list[Any]:
    """The types an annotation allows (the members of a union, else the annotation itself)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return [annotation]


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def model_at(root: type[BaseModel], loc: Sequence[int | str]) -> type[BaseModel] | None:
    """The model class that holds the keys at ``loc`` (a pydantic error location), or None if unknown.

    Args:
        root: the model that was validated, e.g. ``DeviceProfile``.
        loc: the path to a mapping inside the input, e.g. ``("triage", "rules", "malignant")``.

    Returns:
        The model validating that mapping, e.g. ``ClassRule``.
    """
    current: list[Any] = [root]
    for part in loc:
        following: list[Any] = []
        for tp in current:
            if _is_model(tp) and isinstance(part, str) and part in tp.model_fields:
                following.extend(_candidates(tp.model_fields[part].annotation))
            elif typing.get_origin(tp) in (dict, Mapping) and len(typing.get_args(tp)) == 2:
                following.extend(_candidates(typing.get_args(tp)[1]))  # the part is a key of the mapping
            elif typing.get_origin(tp) in (list, tuple, Sequence) and isinstance(part, int):
                following.extend(_candidates(typing.get_args(tp)[0]))
        current = following
    models = [tp for tp in current if _is_model(tp)]
    return models[0] if models else None


def _unknown_key(root: type[BaseModel] | None, loc: Sequence[int | str], reference: str | None) -> str:
    key = str(loc[-1]) if loc else ""
    model = model_at(root, loc[:-1]) if root is not None else None
    see = f" (see {reference})" if reference else ""
    if model is None:
        return f"unknown key{see}"
    valid = sorted(model.model_fields)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean `{close[0]}`? " if close else ""
    return f"unknown key; {hint}valid keys here: {', '.join(valid)}{see}"


def _shown(value: Any) -> str | None:
    if isinstance(value, (str, int, float, bool)):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return None


def _kind_of(value: Any) -> str:
    """What a YAML file wrote, in its own words: ``'abc'``, ``5``, ``a list``, ``a section of keys``, ``nothing``."""
    shown = _shown(value)
    if shown is not None:
        return shown
    if isinstance(value, Mapping):
        return "a section of keys"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "nothing (null)" if value is None else "something else"


def _message(err: Mapping[str, Any], root: type[BaseModel] | None, reference: str | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return _unknown_key(root, err["loc"], reference)
    if kind == "missing":
        return "required field is missing"
    if kind in _KIND_WANTED:
        return f"{_KIND_WANTED[kind]} (got {_kind_of(err.get('input'))})"
    msg = str(err["msg"])
    for prefix in _PREFIXES:
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    should = _SHOULD.match(msg)
    if should:
        msg = "must " + msg[should.end() :].replace(" after validation", "")
        got = _shown(err.get("input"))
        if got is not None and "(got" not in msg and ", not " not in msg:
            msg += f" (got {got})"
    return msg


def problems(
    exc: ValidationError,
    root: type[BaseModel] | None = None,
    *,
    flags: Mapping[str, str] | None = None,
    reference: str | None = None,
) -> list[str]:
    """Each validation problem as one ``where: what`` line.

    Args:
        exc: the error pydantic raised.
        root: the model that was validated, for "did you mean" suggestions of unknown keys.
        flags: dotted keys that came from command-line flags, e.g. ``{"device.id": "--device-id"}``; such a
            location is shown as ``--device-id (device.id)``.
        reference: where every key is documented, named after an unknown key.

    Returns:
        One line per problem, in pydantic's order.
    """
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        flag = (flags or {}).get(where)
        place = f"{flag} ({where})" if flag else where
        message = _message(err, root, reference)
        # A check across several fields (a model validator) has no location; its message names the fields.
        lines.append(f"{place}: {message}" if place else message)
    return lines


def describe(exc: ValidationError, root: type[BaseModel] | None = None, *, limit: int = 5, **kwargs: Any) -> str:
    """The first ``limit`` problems of ``problems()`` joined by ``; `` (with ``(+N more)`` when cut).

    Args:
        exc: the error pydantic raised.
        root: the model that was validated.
        limit: most problems shown.
        **kwargs: ``flags`` and ``reference``, as for ``problems()``.

    Returns:
        One line.
    """
    found = problems(exc, root, **kwargs)
    more = f" (+{len(found) - limit} more)" if len(found) > limit else ""
    return "; ".join(found[:limit]) + more


def describe_yaml_error(exc: Exception) -> str:
    """A PyYAML error as one line: what is wrong, and where (line and column, counted from 1).

    PyYAML's own text spans several lines, points with ``^`` at a copy of the line and names the input
    ``"<unicode string>"``; the line and column are what a person needs to find the mistake.

    Args:
        exc: a ``yaml.YAMLError`` (a ``MarkedYAMLError`` carries the marks; any other is shown as it is).

    Returns:
        For example ``expected ',' or '}', but got the end of the file at line 3, column 1 (while parsing a
        flow mapping starting at line 2, column 9)``.
    """

    def at(mark: Any) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem:
        return " ".join(str(exc).replace('in "<unicode string>", ', "").split())
    text = f"{problem} at {at(mark)}" if mark is not None else str(problem)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        started = f" starting at {at(context_mark)}" if context_mark is not None else ""
        text += f" ({context}{started})"
    for yaml_words, ours in (("'<stream end>'", "the end of the file"), ("end of stream", "end of the file")):
        text = text.replace(yaml_words, ours)
    return text
