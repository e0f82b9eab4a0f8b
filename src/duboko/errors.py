"""The one error type for user mistakes.

Anything a user can get wrong (a bad name, a bad file, a bad flag) raises `DubokoError` with a
message that names the received value and what was expected (Keras' rule). The CLI prints it as one
line and exits non-zero; programming errors still raise their own types with a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class DubokoError(Exception):
    """A user-facing error: one clear line, no traceback."""


def unknown_name(kind: str, got: object, known: Iterable[str]) -> DubokoError:
    """Error for a name that is not in a list of known names."""
    names = ", ".join(sorted(known))
    return DubokoError(f"unknown {kind} {got!r}; expected one of: {names}")
