"""Fill in the bundle's text templates (``templates/*.in``, shipped as package data).

A template is the file as it will be written, with ``@NAME@`` marking each value filled in when the bundle is
built (upper-case letters, digits and ``_``). Nothing else in it is special, so the shell script and the systemd
unit read, and are checked (``bash -n``, ``systemd-analyze verify``), as what they are: no escaped braces, no
Python around them.

Rendering is strict both ways: a marker the caller gives no value for, and a value whose marker the template does
not hold, are errors, so a renamed marker cannot leave ``@NAME@`` in a script that runs as root. A marker filled
in later, on the device (``@PREFIX@``, which ``install.sh`` replaces with its install prefix), is named as such.
"""

from __future__ import annotations

import re
from importlib import resources

from edgemed.errors import ConfigError

_MARKER = re.compile(r"@([A-Z][A-Z0-9_]*)@")


def template_text(name: str) -> str:
    """The text of the template ``templates/NAME.in`` shipped with edgemed.

    Raises:
        ConfigError: the template is missing from this installation (a broken or partial install).
    """
    try:
        return resources.files("edgemed.bundle").joinpath("templates", f"{name}.in").read_text(encoding="utf-8")
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(
            f"the bundle template {name}.in is missing from this edgemed installation ({exc}); reinstall edgemed"
        ) from exc


def render(text: str, values: dict[str, str], *, filled_on_device: frozenset[str] = frozenset()) -> str:
    """Replace every ``@NAME@`` marker in ``text`` by ``values[NAME]``, in one pass.

    Args:
        text: the template.
        values: marker name (without the ``@``) -> text to put in its place. Inserted text is not scanned again.
        filled_on_device: markers left as they are because the device fills them in at install time.

    Returns:
        The rendered text.

    Raises:
        ValueError: a marker has no value (and is not filled on the device), or a value has no marker. Both are
            mistakes in edgemed itself, not in the user's input.
    """
    found = set(_MARKER.findall(text))
    unfilled = found - set(values) - filled_on_device
    unused = set(values) - found
    if unfilled or unused:
        raise ValueError(
            f"bundle template markers do not match: no value for {sorted(unfilled)}, no marker for {sorted(unused)}"
        )

    def fill(match: re.Match[str]) -> str:
        key = match.group(1)
        return values[key] if key in values else match.group(0)

    return _MARKER.sub(fill, text)


def render_template(name: str, values: dict[str, str], *, filled_on_device: frozenset[str] = frozenset()) -> str:
    """:func:`render` the shipped template ``templates/NAME.in``.

    Raises:
        ConfigError: the template is missing from this installation.
        ValueError: markers and values do not match (see :func:`render`).
    """
    return render(template_text(name), values, filled_on_device=filled_on_device)
