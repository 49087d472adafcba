"""XManager's metadata context (`experiment.context`, `work_unit.context`) on Prefect:
the creator, and annotations whose title is the unit's flow run name (what the Prefect
UI lists it by): `set_title` renames the run."""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import Any, Awaitable, Callable


class ContextAnnotations:
    """User-set attributes of a context: its title (XManager's interface)."""

    def __init__(self, title: Callable[[], str], set_title: Callable[[str], Awaitable[None]]) -> None:
        self._title = title
        self._set_title = set_title

    @property
    def title(self) -> str:
        return self._title()

    def set_title(self, title: str) -> Any:
        """Renames the context's flow run (returns once done; awaitable in async code)."""
        from prefect_xm.core.runtime import dual

        if not isinstance(title, str) or not title.strip():
            raise ValueError(f"set_title: {title!r} must be a non-empty string")
        return dual(lambda: self._set_title(title))


@dataclass
class MetadataContext:
    creator: str
    annotations: ContextAnnotations


def metadata_context(title: Callable[[], str], set_title: Callable[[str], Awaitable[None]]) -> MetadataContext:
    return MetadataContext(creator=getpass.getuser(), annotations=ContextAnnotations(title, set_title))
