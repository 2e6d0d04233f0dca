"""A griffe extension for the docs site: Sphinx roles in docstrings become Markdown code.

The package's docstrings cite names as :class:`~choreograph.events.JoinTimedOut` or
:meth:`Runtime.unit_of_work` (readable in an editor and in ``help()``); the API reference renders
them as `JoinTimedOut` and `Runtime.unit_of_work`. Loaded by mkdocs.yml, nowhere else.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|meth|func|mod|attr|exc|data|obj):`~?([^`]+)`")


def _plain(match: re.Match[str]) -> str:
    target = match.group(1)
    # "~a.b.C" shows "C"; "a.b.C" shows as written (Sphinx's own rule)
    shown = target.rsplit(".", 1)[-1] if match.group(0).find("`~") >= 0 else target
    return f"`{shown}`"


class RstRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_plain, obj.docstring.value)
