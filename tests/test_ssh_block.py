"""The SSH Connection block as Prefect users meet it: `prefect block register -m
prefect_xm`, its form (schema with titles, secrets as password fields), save and load
with secrets kept secret."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import SecretStr

from e2e import run
from prefect_xm.blocks.ssh import SSHConnection

pytestmark = pytest.mark.e2e


def test_block_register_finds_it_and_the_form_has_titles(prefect_server):
    out = subprocess.run([sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_xm"],
                         env=prefect_server.env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SSH Connection" in out.stdout

    async def read():
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            block_type = await client.read_block_type_by_slug("xm-ssh-connection")
            schemas = await client.read_block_schemas()
            return block_type, [s for s in schemas if s.block_type_id == block_type.id][0]

    block_type, schema = run(read())
    assert block_type.name == "SSH Connection"
    props = schema.fields["properties"]
    assert props["host"]["title"] == "Host" and props["jump_host"]["title"] == "Jump host"
    for secret in ("private_key", "passphrase"):  # the UI's password inputs
        assert {"format": "password", "type": "string", "writeOnly": True} in props[secret]["anyOf"]
    assert set(schema.fields["secret_fields"]) >= {"private_key", "passphrase"}


def test_secrets_are_stored_and_never_shown(prefect_server):
    key = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA-not-a-real-key\n-----END OPENSSH PRIVATE KEY-----\n"
    block = SSHConnection(host="login.example.org", username="alice", private_key=SecretStr(key),
                          passphrase=SecretStr("hunter2"))
    run(block.asave("secret-test", overwrite=True))
    loaded = run(SSHConnection.aload("secret-test"))
    assert loaded.private_key.get_secret_value() == key
    for shown in (repr(loaded), str(loaded), loaded.describe(), loaded.model_dump_json()):
        assert "not-a-real-key" not in shown and "hunter2" not in shown


def test_bad_fields_name_the_field_and_value():
    with pytest.raises(ValueError, match="host: 'login node'"):
        SSHConnection(host="login node", username="a")
    with pytest.raises(ValueError, match="jump_host: 'a b'"):
        SSHConnection(host="h", username="a", jump_host="a b")
