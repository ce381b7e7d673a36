"""TLS for client connections: a server with a certificate from a CA the test makes (trustme); clients that
trust that CA connect, others are refused with what to set."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import trustme

from services import auth
from services.stack import ServerTls, nats_server
from shared.bus import Bus
from shared.config import Settings
from shared.errors import InsecureConnection, UntrustedServer

pytestmark = [pytest.mark.anyio, pytest.mark.integration]


class Pki:
    """A CA, and a server and a client certificate it signed, as files."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA()
        self.ca = directory / "ca.pem"
        ca.cert_pem.write_to_path(self.ca)
        self.server_cert, self.server_key = self._issue(ca.issue_cert("127.0.0.1", "localhost"), directory / "server")
        self.client_cert, self.client_key = self._issue(ca.issue_cert("corral-guard@example.com"), directory / "client")

    @staticmethod
    def _issue(issued: trustme.LeafCert, stem: Path) -> tuple[Path, Path]:
        cert, key = stem.with_suffix(".pem"), stem.with_suffix(".key")
        cert.write_bytes(b"".join(pem.bytes() for pem in issued.cert_chain_pems))
        issued.private_key_pem.write_to_path(key)
        return cert, key


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_url(tmp_path: Path, auth_dir: Path, pki: Pki, request) -> Iterator[str]:
    """A server with auth and TLS; `client_ca` (indirect) makes it verify clients' certificates too."""
    verify = getattr(request, "param", False)
    tls = ServerTls(cert=pki.server_cert, key=pki.server_key, client_ca=pki.ca if verify else None)
    with nats_server(tmp_path / "tls", config=auth_dir / auth.SERVER_CONFIG, tls=tls) as url:
        yield url


async def test_a_client_that_trusts_the_servers_ca_connects_over_tls(settings: Settings, tls_url: str, pki: Pki):
    async with Bus.connect(settings.with_changes(nats_url=tls_url, nats_tls_ca=str(pki.ca)), "test-tls") as bus:
        assert bus.nc.uses_tls
        assert (await bus.js.account_info()).streams >= 1


async def test_a_client_that_does_not_trust_the_servers_ca_is_refused_and_told_to_set_the_ca(settings: Settings,
                                                                                            tls_url: str):
    with anyio.fail_after(10), pytest.raises(UntrustedServer, match="does not trust.*nats_tls_ca"):
        async with Bus.connect(settings.with_changes(nats_url=tls_url), "test-tls"):
            pass


@pytest.mark.parametrize("tls_url", [True], indirect=True, ids=["server verifies clients"])
async def test_a_client_with_a_certificate_from_the_ca_connects_to_a_server_that_verifies_clients(
        settings: Settings, tls_url: str, pki: Pki):
    mutual = settings.with_changes(nats_url=tls_url, nats_tls_ca=str(pki.ca), nats_tls_cert=str(pki.client_cert),
                                   nats_tls_key=str(pki.client_key))
    async with Bus.connect(mutual, "test-tls") as bus:
        assert bus.nc.uses_tls


async def test_a_client_that_asks_for_tls_is_refused_by_a_server_without_it(settings: Settings, pki: Pki):
    with anyio.fail_after(10), pytest.raises(InsecureConnection, match="does not offer it"):
        async with Bus.connect(settings.with_changes(nats_tls_ca=str(pki.ca)), "test-tls"):
            pass
