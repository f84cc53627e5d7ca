"""SSRF: customer-chosen webhook and Slack URLs never reach loopback, private, link-local, multicast or reserved
addresses, in any notation, whether the host is written as an address or is a name that resolves to one; the
worker connects to the address it checked (no second DNS lookup) and follows no redirects."""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest

from creditflow.api.app import create_app
from creditflow.config import Settings
from creditflow.notify import destinations
from creditflow.notify.channels import DeliveryError, Outgoing, send_slack, send_webhook
from creditflow.notify.destinations import Destinations
from creditflow.notify.templates import Rendered
from tests.conftest import ADMIN_KEY
from tests.receivers import http_receiver
from tests.support.api import new_account

INTERNAL_HOSTS = [
    "127.0.0.1", "127.1", "0x7f000001", "0x7f.1", "2130706433", "017700000001", "0177.0.0.1", "0", "0.0.0.0",
    "127.0.0.1.", "localhost.", "LOCALHOST", "api.localhost", "10.1.2.3", "012.1.2.3", "172.16.0.1",
    "192.168.1.1", "169.254.169.254", "2852039166", "100.64.0.1", "224.0.0.1", "239.255.255.250",
    "240.0.0.1", "255.255.255.255", "[::1]", "[::]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::ffff:a9fe:a9fe]",
    "[64:ff9b::7f00:1]", "[2002:7f00:1::]", "[fe80::1]", "[fc00::1]", "[fd12:3456::1]", "[ff02::1]",
    "[::127.0.0.1]",
]


def _settings(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update={"notify_allow_http_urls": False, "notify_allow_private_urls": False,
                                       **update})


async def test_customer_urls_pointing_inside_are_refused_in_every_notation(settings: Settings) -> None:
    app = create_app(_settings(settings))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://creditflow.test",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as api:
        account = await new_account(api)
        accepted = []
        for host in INTERNAL_HOSTS:
            for field in ("webhook_url", "slack_webhook_url"):
                resp = await api.put("/api/v1/billing/notification-channels",
                                     json={"account_id": account, field: f"https://{host}:8443/hook"})
                if resp.status_code != 422:
                    accepted.append((host, field, resp.status_code))
                else:
                    assert resp.json()["error"]["details"]["problems"][0]["field"] == field
        assert accepted == []
        for url in ("https://93.184.216.34/hook", "https://[2606:4700::1111]/hook", "https://hooks.acme.example/x"):
            ok = await api.put("/api/v1/billing/notification-channels",
                               json={"account_id": account, "webhook_url": url})
            assert ok.status_code == 200, (url, ok.text)
            assert ok.json()["webhook_url"] == url


def _outgoing(**dest: str) -> Outgoing:
    return Outgoing(kind="balance.low", event_id="ntf_ssrf", created=1, payload={"balance": 1},
                    rendered=Rendered(email_subject="s", email_body="b", slack="low balance", sms="low"),
                    destinations=Destinations(account_id="acc_1", account_name="A", billing_email="a@b.co",
                                              webhook_secret="whsec_x", **dest))


class FakeDns:
    """The DNS answers of a name the test controls (a real resolver offers none offline); counts lookups."""

    def __init__(self, *answers: list[str]) -> None:
        self.answers = list(answers)
        self.lookups: list[str] = []

    async def __call__(self, host: str, port: int) -> list[Any]:
        self.lookups.append(host)
        if not self.answers:
            raise socket.gaierror("no more answers")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in self.answers.pop(0)]


@pytest.mark.parametrize("channel", ["webhook", "slack"])
async def test_send_refuses_a_name_that_resolves_inside(settings: Settings, monkeypatch: pytest.MonkeyPatch,
                                                        channel: str) -> None:
    dns = FakeDns(["127.0.0.1"], ["93.184.216.34", "10.0.0.5"], ["::ffff:169.254.169.254"])
    monkeypatch.setattr(destinations, "getaddrinfo", dns)
    strict = _settings(settings, notify_allow_http_urls=True)
    async with http_receiver() as receiver:
        port = receiver.url.rsplit(":", 1)[1]
        url = f"http://hooks.rebind.test:{port}/hook"
        out = _outgoing(webhook_url=url) if channel == "webhook" else _outgoing(slack_webhook_url=url)
        send = send_webhook if channel == "webhook" else send_slack
        for _ in range(3):
            with pytest.raises(DeliveryError) as refused:
                await send(strict, out)
            assert refused.value.transient is False
            assert "destination refused" in str(refused.value)
        assert receiver.requests == []
    assert dns.lookups == ["hooks.rebind.test"] * 3


async def test_send_refuses_urls_stored_before_the_check_without_a_lookup(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    dns = FakeDns()
    monkeypatch.setattr(destinations, "getaddrinfo", dns)
    strict = _settings(settings, notify_allow_http_urls=True)
    async with http_receiver() as receiver:
        port = receiver.url.rsplit(":", 1)[1]
        for host in ("2130706433", "127.1", "0x7f000001", "[::ffff:127.0.0.1]", "localhost"):
            with pytest.raises(DeliveryError) as refused:
                await send_webhook(strict, _outgoing(webhook_url=f"http://{host}:{port}/hook"))
            assert refused.value.transient is False, host
        assert receiver.requests == []
    assert dns.lookups == []


async def test_send_connects_to_the_checked_address_with_no_second_lookup(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    # The first answer is checked and used; a second lookup (a rebinding attack's chance) would find nothing.
    dns = FakeDns(["127.0.0.1"])
    monkeypatch.setattr(destinations, "getaddrinfo", dns)
    private_ok = _settings(settings, notify_allow_http_urls=True, notify_allow_private_urls=True)
    async with http_receiver() as receiver:
        port = receiver.url.rsplit(":", 1)[1]
        await send_webhook(private_ok, _outgoing(webhook_url=f"http://hooks.pinned.test:{port}/hook"))
        assert len(receiver.requests) == 1
        assert receiver.requests[0].headers["host"] == f"hooks.pinned.test:{port}"
        assert receiver.requests[0].path == "/hook"
    assert dns.lookups == ["hooks.pinned.test"]


async def test_send_does_not_follow_redirects(settings: Settings) -> None:
    private_ok = _settings(settings, notify_allow_http_urls=True, notify_allow_private_urls=True)
    async with http_receiver(statuses=[302]) as receiver:
        with pytest.raises(DeliveryError) as failed:
            await send_slack(private_ok, _outgoing(slack_webhook_url=f"{receiver.url}/hook"))
        assert "HTTP 302" in str(failed.value) and failed.value.transient is False
        assert len(receiver.requests) == 1


async def test_send_to_an_unresolvable_name_is_transient(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(destinations, "getaddrinfo", FakeDns())
    with pytest.raises(DeliveryError) as failed:
        await send_webhook(_settings(settings), _outgoing(webhook_url="https://hooks.gone.test/hook"))
    assert failed.value.transient is True and "cannot resolve" in str(failed.value)
