"""A gang's members as one heterogeneous job.

A JobGroup whose members all go to one batch pool is a gang the scheduler itself can
start together, where it has heterogeneous jobs (Slurm: `#SBATCH hetjob` between
components): the launcher tags each member's flow run with its gang (the work unit's
run) and its place in it; the worker collects the members as they arrive and submits
them as ONE job, one component per member, each with its own requirements. Each member
is still its own flow run, followed by its component's id (`<job>+<offset>`).

The batch script runs on the first component's node. It starts every member's own
batch script (rendered from the pool's template, as for a single job) as a job step in
its component, and writes each member's exit code into the member's run directory
(`exit-code`): the scheduler records one exit code for the whole job, so the file is
what tells each member's end. When a member exits non-zero the script stops the others,
writing in each of their run directories who ended the gang (`gang-stop`), and exits
with that code: the whole job ends, nothing half started keeps its resources.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from dataclasses import dataclass
from typing import Any, Coroutine, Optional, Protocol

from prefect_xm.gang import GangPlace
from prefect_xm.workers.arrays import ArrayTask, ArrayWorker

#: written in a member's run directory by the heterogeneous job's script
MEMBER_EXIT_FILE = "exit-code"
GANG_STOP_FILE = "gang-stop"
#: written in a member's run directory before the submit: "<job name> <component>", so a
#: worker that died before recording the component's id lets its successor find it
HET_COMPONENT_FILE = "het-component"
#: seconds a gang's first member waits at the worker for the others (they are created
#: together, but may reach the worker in different polls)
GATHER_SECONDS = 60.0


@dataclass(frozen=True)
class MemberEnd:
    """How a member of a heterogeneous job ended, from its run directory's files."""

    exit_code: Optional[int] = None
    #: the run that ended the gang and its exit code, for a member the script stopped
    stopped_by: Optional[str] = None
    stopper_exit_code: Optional[int] = None

    @property
    def known(self) -> bool:
        return self.exit_code is not None or self.stopped_by is not None


def member_end(exit_text: Optional[str], stop_text: Optional[str]) -> MemberEnd:
    """Parses a member's `exit-code` and `gang-stop` files (either may be missing)."""
    exit_code = None
    if exit_text and exit_text.strip().lstrip("-").isdigit():
        exit_code = int(exit_text.strip())
    if stop_text and stop_text.split():
        parts = stop_text.split()
        code = int(parts[1]) if len(parts) > 1 and parts[1].lstrip("-").isdigit() else None
        return MemberEnd(exit_code, parts[0], code)
    return MemberEnd(exit_code)


def directives(script: str, prefix: str) -> list[str]:
    """The scheduler directive lines of a rendered batch script (before its first
    command: the scheduler reads no further)."""
    found: list[str] = []
    for line in script.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith(prefix + " ") or stripped == prefix:
            found.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return found


def het_script(components: list[list[str]], separator: str, member_dirs: list[str], launch: str) -> str:
    """The heterogeneous job's batch script: each component's directives, then the body
    that runs member k's `job.sh` as a job step of component k (`launch`, a shell
    command prefix that reads `$k` and `$d`, the member's run directory)."""
    head = ["#!/bin/bash"]
    for k, lines in enumerate(components):
        if k:
            head.append(separator)
        head.extend(lines)
    dirs = " ".join(shlex.quote(d) for d in member_dirs)
    body = f"""
# prefect-xm heterogeneous job: one component per gang member, each member's own batch
# script run as a job step of its component; each member's exit code goes to its run
# directory ({MEMBER_EXIT_FILE}); the first member to fail stops the others ({GANG_STOP_FILE}).
xm_members=({dirs})
for k in "${{!xm_members[@]}}"; do
  d=${{xm_members[$k]}}
  rm -f "$d/{MEMBER_EXIT_FILE}" "$d/{GANG_STOP_FILE}" "$d/step.pid"
  (
    {launch} /bin/bash "$d/job.sh" &
    echo $! > "$d/step.pid"
    wait $!
    rc=$?
    echo "$rc" > "$d/{MEMBER_EXIT_FILE}.tmp" && mv -f "$d/{MEMBER_EXIT_FILE}.tmp" "$d/{MEMBER_EXIT_FILE}"
  ) &
done
xm_status=0
xm_failed=""
xm_stop_polls=0
while :; do
  xm_running=0
  for k in "${{!xm_members[@]}}"; do
    d=${{xm_members[$k]}}
    if [ -f "$d/{MEMBER_EXIT_FILE}" ]; then
      rc=$(cat "$d/{MEMBER_EXIT_FILE}")
      if [ "$rc" != 0 ] && [ -z "$xm_failed" ] && [ ! -f "$d/{GANG_STOP_FILE}" ]; then
        xm_failed=$k
        xm_status=$rc
        for j in "${{!xm_members[@]}}"; do
          o=${{xm_members[$j]}}
          [ "$j" = "$k" ] || [ -f "$o/{MEMBER_EXIT_FILE}" ] ||
            printf '%s %s\\n' "$(basename "$d")" "$rc" > "$o/{GANG_STOP_FILE}"
        done
      fi
    else
      xm_running=1
    fi
  done
  [ "$xm_running" = 1 ] || break
  if [ -n "$xm_failed" ]; then
    # TERM each poll (a step may not have written its pid yet); a step that ignores it
    # for 30 s loses its srun, and the job's end takes the step with it
    xm_signal=TERM
    xm_stop_polls=$((xm_stop_polls + 1))
    [ "$xm_stop_polls" -lt 30 ] || xm_signal=KILL
    for j in "${{!xm_members[@]}}"; do
      o=${{xm_members[$j]}}
      [ -f "$o/{MEMBER_EXIT_FILE}" ] || kill -"$xm_signal" "$(cat "$o/step.pid" 2>/dev/null)" 2>/dev/null
    done
  fi
  sleep 1
done
exit "$xm_status"
"""
    return "\n".join(head) + "\n" + body


@dataclass
class HetMember(ArrayTask):
    """One gang member waiting at the worker for the rest of its gang (a run waiting to
    be submitted together with others, as an array's task is)."""

    place: Optional[GangPlace] = None


class HetJobWorker(ArrayWorker, Protocol):
    """What of the worker (a BatchWorker) the gatherer calls (see arrays.ArrayWorker)."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task: ...

    async def submit_het_job(self, members: list[HetMember]) -> list[str]: ...


class HetJobGatherer:
    """Holds gang members until their whole gang is here, then submits it as one job.
    A gang not complete within `max_wait` of its first member (a member on its way
    through another worker, or lost) goes as separate jobs: the launcher's gang start
    deadline still holds them together."""

    def __init__(self, worker: HetJobWorker, *, max_wait: float = GATHER_SECONDS):
        self.worker = worker
        self.max_wait = max_wait
        self.gangs: dict[str, list[HetMember]] = {}
        self._first: dict[str, float] = {}
        #: gangs one member of which goes its own way (see not_coming), since when
        self._apart: dict[str, float] = {}

    async def submit(self, member: HetMember) -> str:
        gang = member.place.gang
        if gang in self._apart:
            member.log.warning("a member of the gang goes as a job of its own (heterogeneous jobs off for it): "
                               "submitted as separate jobs (the work unit's start deadline still holds the gang together)")
            self.worker.spawn(self._submit_separately([member]))
            return await asyncio.shield(member.job_id)
        members = self.gangs.setdefault(gang, [])
        members.append(member)
        if len(members) == 1:
            self._first[gang] = time.monotonic()
            self.worker.spawn(self._give_up_after(gang))
        if len({m.place.index for m in members}) == member.place.size:
            self._take(gang)
            self.worker.spawn(self._submit(sorted(members, key=lambda m: m.place.index)))
        return await asyncio.shield(member.job_id)

    def not_coming(self, place: GangPlace) -> None:
        """A member of this gang reached the worker but goes its own way (its job
        variables turn heterogeneous jobs off): the gang cannot be one job, so its members
        here, and those still to come, go as separate jobs now instead of after max_wait."""
        now = time.monotonic()
        self._apart = {g: t for g, t in self._apart.items() if now - t < 10 * self.max_wait}
        self._apart[place.gang] = now
        members = self._take(place.gang)
        for m in members:
            m.log.warning(f"member {place.index} of the gang goes as a job of its own (heterogeneous jobs off "
                          f"for it): submitted as separate jobs (the work unit's start deadline still holds "
                          f"the gang together)")
        if members:
            self.worker.spawn(self._submit_separately(members))

    def _take(self, gang: str) -> list[HetMember]:
        self._first.pop(gang, None)
        return self.gangs.pop(gang, [])

    async def _give_up_after(self, gang: str) -> None:
        started = self._first.get(gang)
        while gang in self.gangs and self._first.get(gang) == started:
            if time.monotonic() - started >= self.max_wait:
                members = self._take(gang)
                for m in members:
                    m.log.warning(
                        f"only {len(members)} of the gang's {m.place.size} members reached this worker within "
                        f"{self.max_wait:g} s: submitted as separate jobs (the work unit's start deadline still "
                        f"holds the gang together)")
                await self._submit_separately(members)
                return
            await asyncio.sleep(0.5)

    async def _submit_separately(self, members: list[HetMember]) -> None:
        async def one(m: HetMember) -> None:
            try:
                m.job_id.set_result(await self.worker.submit_single(
                    m.flow_run, m.configuration, m.run_dir, m.argv, m.env, m.log))
            except BaseException as exc:
                m.job_id.set_exception(exc)
        await asyncio.gather(*(one(m) for m in members))

    async def _submit(self, members: list[HetMember]) -> None:
        first = members[0].configuration
        if any((m.configuration.cluster, m.configuration.ssh_block) != (first.cluster, first.ssh_block)
               for m in members):
            for m in members:
                m.log.warning("the gang's members are on different clusters: submitted as separate jobs")
            await self._submit_separately(members)
            return
        try:
            ids = await self.worker.submit_het_job(members)
        except BaseException as exc:
            for m in members:
                if not m.job_id.done():
                    m.job_id.set_exception(exc)
            return
        for m, job_id in zip(members, ids):
            m.job_id.set_result(job_id)
