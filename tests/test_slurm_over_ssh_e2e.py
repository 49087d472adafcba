"""The xm-slurm worker reaching Slurm only through a real OpenSSH server on 127.0.0.1:
the whole shared suite, plus what SSH adds (one connection, reconnects, refusals)."""

from __future__ import annotations

import re
import subprocess
import uuid

import pytest
from prefect.client.schemas.objects import StateType
from pydantic import SecretStr

from batch_suite import BatchWorkerSuite, logs_of, request_cancel, wait_state
from conftest import require_service, wait_for
from e2e import run, start_run, wait_final
from prefect_xm.blocks.ssh import SSHConnection
from sshd import SSHServer, keygen, sshd_available
from test_slurm_worker_e2e import SLURM

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

SCHEDULER_COMMANDS = ["sbatch", "squeue", "scancel", "scontrol", "sacct"]


def save_block(name: str, **fields) -> str:
    run(SSHConnection(**fields).asave(name, overwrite=True))
    return name


class TestSlurmWorkerOverSsh(BatchWorkerSuite):
    harness = SLURM

    # What SSH changes is how commands run and files are read, not what the worker decides:
    # the shared scenarios that go through the transport stay (submit, poll, cancel, the
    # stderr tail, the run environment's file, recovery's lookups, arrays), those whose
    # path is the same as on the local Slurm (TestSlurmWorker) are not run twice. The 30
    # held jobs below stand in for the many-runs scenario.
    test_flow_that_raises_ends_failed = None
    test_missing_python_on_the_node_crashes_with_its_stderr = None
    test_cancel_while_pending = None
    test_time_limit_crashes_with_timeout = None
    test_undefined_template_variable_names_it = None
    test_malformed_time_limit_and_memory_name_the_field = None
    test_many_runs_in_flight_one_status_query_per_poll = None

    @classmethod
    def prepare(cls, root, wrappers):
        require_service("sshd", sshd_available(), "apt-get install openssh-server (scripts/test.sh does)")
        # The login node's PATH has the counting wrappers; the worker's has none of the
        # scheduler's commands: everything must go through SSH.
        login_path = f"{wrappers.dir}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
        sshd = SSHServer(root / "sshd", session_path=login_path).start()
        blocker = root / "worker-bin"
        blocker.mkdir()
        for command in SCHEDULER_COMMANDS:
            shim = blocker / command
            shim.write_text(f"#!/bin/sh\necho '{command} ran on the worker, not over SSH' >&2\nexit 127\n")
            shim.chmod(0o755)
        cls.sshd, cls.root = sshd, root
        cls.block = save_block(f"login-{uuid.uuid4().hex[:6]}", **sshd.block_fields())
        return {"ssh_block": cls.block}, blocker

    @classmethod
    def cleanup(cls) -> None:
        cls.sshd.stop()

    def worker_connections(self, env) -> int:
        """Established TCP connections from the worker process to sshd."""
        out = subprocess.run(["ss", "-tnpH", "state", "established", f"( dport = :{self.sshd.port} )"],
                             capture_output=True, text=True).stdout
        return len([ln for ln in out.splitlines() if f"pid={env.worker.proc.pid}," in ln])

    def test_thirty_jobs_in_flight_share_one_ssh_connection(self, env):
        wait_for(lambda: self.worker_connections(env) == 1, 60, what="the worker's SSH connection")
        accepted_before = self.sshd.accepted()
        runs = [run(start_run(env.deployments["sleeper"], {"seconds": 1}, SLURM.hold_variables)) for _ in range(30)]
        for r in runs:
            wait_state(r.id, StateType.PENDING, name="InfrastructurePending", timeout=300)
        polls_before, commands_before = len(env.wrappers.calls("squeue")), self.sshd.commands()
        wait_for(lambda: len(env.wrappers.calls("squeue")) >= polls_before + 5, 60, what="5 more polls")
        polls, commands = len(env.wrappers.calls("squeue")) - polls_before, self.sshd.commands() - commands_before
        # each poll of the 30 held jobs is one squeue, in one SSH session (a poll in
        # flight at either end of the window may be counted on one side only)
        assert commands <= polls + 1, (commands, polls)
        assert self.sshd.accepted() == accepted_before  # no new connection for 30 jobs
        assert self.worker_connections(env) == 1
        assert not any("ran on the worker" in logs_of(r.id) for r in runs[:3])
        for r in runs:
            request_cancel(r.id)
        for r in runs:
            wait_state(r.id, StateType.CANCELLED, timeout=300)
        assert self.sshd.accepted() == accepted_before

    def test_sshd_restarted_mid_run_the_worker_reconnects(self, env):
        fr = run(start_run(env.deployments["sleeper"], {"seconds": 15}))
        wait_state(fr.id, StateType.RUNNING, timeout=240)
        accepted_before = self.sshd.accepted()
        self.sshd.restart()  # drops the worker's connection
        fr = wait_final(fr.id, timeout=240)
        assert fr.state.type == StateType.COMPLETED, fr.state
        wait_for(lambda: self.sshd.accepted() > accepted_before, 60, what="the worker to reconnect")
        assert self.worker_connections(env) == 1

    @pytest.mark.parametrize("problem", ["wrong host key", "wrong user key", "closed port"])
    def test_bad_connection_is_a_clear_error_and_submits_nothing(self, env, problem, tmp_path):
        fields = self.sshd.block_fields()
        if problem == "wrong host key":
            keygen(tmp_path / "impostor")
            k = (tmp_path / "impostor.pub").read_text().split()
            fields["known_hosts"] = f"[127.0.0.1]:{self.sshd.port} {k[0]} {k[1]}\n"
            expected = "host key"
        elif problem == "wrong user key":
            keygen(tmp_path / "stranger")
            secret = (tmp_path / "stranger").read_text()
            fields.update(private_key_path=None, private_key=SecretStr(secret))
            expected = "authentication failed"
        else:
            with __import__("socket").socket() as s:
                s.bind(("127.0.0.1", 0))
                fields["port"] = s.getsockname()[1]  # nothing listens there
            expected = "cannot connect"
        block = save_block(f"bad-{uuid.uuid4().hex[:6]}", **fields)
        fr = run(start_run(env.deployments["double"], {"x": 1}, {"ssh_block": block}))
        fr = wait_final(fr.id, timeout=120)
        assert fr.state.type == StateType.CRASHED, fr.state
        assert expected in fr.state.message
        assert not fr.infrastructure_pid
        assert not any(str(fr.id) in c for c in env.wrappers.calls("sbatch"))
        everything = fr.state.message + logs_of(fr.id) + env.worker.log_text()
        for key_file in tmp_path.glob("*"):
            if not key_file.name.endswith(".pub"):
                body = key_file.read_text().splitlines()[1]
                assert body not in everything
        assert not re.search(r"BEGIN OPENSSH PRIVATE KEY", everything)
