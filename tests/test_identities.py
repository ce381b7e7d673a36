"""`corral auth init`'s identities and the permission tables, without a server (tests/test_auth.py has the
server refuse what the tables leave out)."""

from __future__ import annotations

from contracts import subjects
from services import auth
from shared.config import Settings


def test_auth_init_makes_a_key_per_service_kind_the_operator_and_each_tenant_and_keeps_them_when_run_again(tmp_path):
    directory = tmp_path / "auth"
    first = {i.name: i.public_key for i in auth.init(directory, ["acme"])}
    again = {i.name: i.public_key for i in auth.init(directory, ["globex"])}
    assert set(first) == {*auth.SERVICE_IDENTITIES, auth.OPERATOR, "tenant-acme"}
    assert again == {**first, "tenant-globex": again["tenant-globex"]}  # kept every key, added the new tenant
    assert len(set(again.values())) == len(again)


def test_seeds_are_readable_by_their_owner_only_and_the_servers_configuration_names_public_keys_only(tmp_path):
    directory = tmp_path / "auth"
    found = auth.init(directory, ["acme"])
    config = (directory / auth.SERVER_CONFIG).read_text()
    assert {oct(i.credential.stat().st_mode & 0o777) for i in found} == {"0o600"}
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    assert all(f'nkey: "{i.public_key}"' in config for i in found)
    assert not any(i.credential.read_text().strip() in config for i in found)


def test_everything_a_tenant_may_publish_or_hear_is_its_own():
    granted = auth.permissions("tenant-acme")
    assert granted.publish == (subjects.task_submitted("acme"),)
    assert all(".acme" in subject or subject.startswith("_INBOX_acme.") for subject in granted.subscribe)
    assert not any(subject.startswith(("$", "_INBOX.")) for subject in (*granted.publish, *granted.subscribe))


def test_the_operators_commands_find_the_operator_credential_under_the_data_dir(tmp_path):
    assert auth.default_credential(Settings(), tmp_path).nats_credentials == ""  # no auth made there: none
    auth.prepare(tmp_path)
    found = auth.default_credential(Settings(), tmp_path).nats_credentials
    chosen = auth.default_credential(Settings(nats_credentials="mine.nk"), tmp_path).nats_credentials
    assert (found, chosen) == (str(tmp_path / "auth" / "operator.nk"), "mine.nk")
