"""The strict base of every settings model, and the one formatter of their validation errors.

Every model a person writes (a device profile and each of its sections, a manifest, a training recipe, the gate's
thresholds) derives from :class:`StrictModel` (or :class:`FrozenModel`), so an unknown key, usually a typo, is
an error rather than a setting silently ignored; nowhere else says ``extra="forbid"``.

pydantic's own text is written for programmers (``Value error, ...``, ``Input should be ...``, ``Extra inputs are
not permitted``). ``problems()`` keeps the location, drops that boilerplate, says ``unknown key`` with the
nearest valid key ("did you mean `min_probability`?"), and names the command-line flag a value came from. Every
``ValidationError`` that reaches a person goes through ``describe()`` (or ``problems()``), wrapped in the
``EdgemedError`` of the module that validated it.
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


def _message(err: Mapping[str, Any], root: type[BaseModel] | None, reference: str | None) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return _unknown_key(root, err["loc"], reference)
    if kind == "missing":
        return "required field is missing"
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
