"""Real network receivers for the notification tests: a minimal HTTP/1.1 server and an SMTP server (aiosmtpd).

The HTTP receiver is a real server on a loopback port (``asyncio.start_server``), not a mocked transport:
it records each request (method, path, headers, raw body) and answers with the next status of its script.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qs

from aiosmtpd.controller import Controller

from tests.conftest import free_port


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def form(self) -> dict[str, str]:
        return {k: v[0] for k, v in parse_qs(self.body.decode(), keep_blank_values=True).items()}


@dataclass
class HttpReceiver:
    """Answers ``statuses`` in order (the last one repeats); ``response_body`` goes with every answer."""

    statuses: list[int] = field(default_factory=lambda: [200])
    response_body: bytes = b"ok"
    requests: list[Request] = field(default_factory=list)
    url: str = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append(Request(method, path, headers, body))
            status = self.statuses[min(len(self.requests) - 1, len(self.statuses) - 1)]
            writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: {len(self.response_body)}\r\n"
                         f"Content-Type: application/json\r\nConnection: close\r\n\r\n".encode() + self.response_body)
            await writer.drain()
        finally:
            writer.close()


@asynccontextmanager
async def http_receiver(statuses: list[int] | None = None, response_body: bytes = b"ok") -> AsyncIterator[HttpReceiver]:
    receiver = HttpReceiver(statuses=statuses or [200], response_body=response_body)
    server = await asyncio.start_server(receiver._handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    receiver.url = f"http://127.0.0.1:{port}"
    try:
        yield receiver
    finally:
        server.close()
        await server.wait_closed()


class _Mailbox:
    def __init__(self, reply: str) -> None:
        self.messages: list[tuple[str, list[str], EmailMessage]] = []
        self.reply = reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802 - aiosmtpd's hook name
        if self.reply.startswith("250"):
            # SMTP carries CRLF line endings; compare texts with plain newlines.
            message = email.message_from_bytes(envelope.content.replace(b"\r\n", b"\n"), policy=email.policy.default)
            assert isinstance(message, EmailMessage)
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), message))
        return self.reply


@dataclass
class SmtpServer:
    host: str
    port: int
    mailbox: _Mailbox

    @property
    def messages(self) -> list[tuple[str, list[str], EmailMessage]]:
        return self.mailbox.messages


@asynccontextmanager
async def smtp_server(reply: str = "250 Message accepted for delivery") -> AsyncIterator[SmtpServer]:
    """A real SMTP server (aiosmtpd, in its own thread) that keeps the messages it accepts."""
    mailbox = _Mailbox(reply)
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    await asyncio.to_thread(controller.start)
    try:
        yield SmtpServer("127.0.0.1", port, mailbox)
    finally:
        await asyncio.to_thread(controller.stop)
