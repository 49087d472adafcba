"""Which flow runs form a gang: the contract between the launcher, which tags a
JobGroup's members when they all go to one work pool, and the workers, which may start
such a gang as one job (prefect_xm.workers.hetjob). Kept free of Prefect's and the
workers' imports: the launcher imports it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

#: tag of a gang member's flow run: the gang (its work unit's flow run id)
TAG_GANG = "xm-gang:"
#: tag of a gang member's flow run: "<index>/<size>", its place among the members
TAG_GANG_MEMBER = "xm-gang-member:"


@dataclass(frozen=True)
class GangPlace:
    gang: str
    index: int
    size: int


def gang_tags(gang: str, index: int, size: int) -> list[str]:
    return [f"{TAG_GANG}{gang}", f"{TAG_GANG_MEMBER}{index}/{size}"]


def gang_place(tags: Iterable[str]) -> Optional[GangPlace]:
    """A flow run's place in its gang, from its tags (None: not a gang member, or tags
    that do not make sense, which then go their own way)."""
    gang = member = None
    for tag in tags:
        if tag.startswith(TAG_GANG):
            gang = tag[len(TAG_GANG):]
        elif tag.startswith(TAG_GANG_MEMBER):
            member = tag[len(TAG_GANG_MEMBER):]
    if not gang or not member:
        return None
    index, _, size = member.partition("/")
    if not (index.isdigit() and size.isdigit()) or not 0 <= int(index) < int(size) or int(size) < 2:
        return None
    return GangPlace(gang, int(index), int(size))


