"""Notification helpers for tests: channel settings, the documented webhook verifier, the email footer."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from creditflow.config import Settings
from tests.receivers import HttpReceiver, SmtpServer

VERIFY_DOC = Path(__file__).resolve().parents[2] / "docs" / "concepts.md"  # the Notifications section
SMS_SID, SMS_TOKEN, SMS_FROM = "AC0123456789abcdef", "sms-token", "+15005550006"
FOOTER = ("\n--\ncreditflow billing · account {account}\n"
          "You receive this because it is the billing contact of the account.\n")


def configured(settings: Settings, *, smtp: SmtpServer | None = None, sms: HttpReceiver | None = None,
               **extra: Any) -> Settings:
    """The test settings with the channels pointed at this test's receivers."""
    update: dict[str, Any] = {"smtp_starttls": False, "smtp_timeout_seconds": 5, "slack_timeout_seconds": 5,
                              "webhook_timeout_seconds": 5, "sms_timeout_seconds": 5, **extra}
    if smtp is not None:
        update.update(smtp_host=smtp.host, smtp_port=smtp.port, smtp_from="creditflow <billing@creditflow.test>")
    if sms is not None:
        update.update(sms_api_base=sms.url, sms_account_sid=SMS_SID, sms_auth_token=SecretStr(SMS_TOKEN),
                      sms_from_number=SMS_FROM)
    return settings.model_copy(update=update)


async def set_channels(api: httpx.AsyncClient, account: str, **fields: Any) -> dict[str, Any]:
    resp = await api.put("/api/v1/billing/notification-channels", json={"account_id": account, **fields})
    assert resp.status_code == 200, resp.text
    return resp.json()


def readme_verifier() -> Any:
    """The receiver's check exactly as docs/concepts.md documents it (the code between the markers, executed)."""
    text = VERIFY_DOC.read_text()
    block = re.search(r"<!-- webhook-verify:start -->\s*```python\n(.*?)```\s*<!-- webhook-verify:end -->", text, re.S)
    assert block is not None, "docs/concepts.md lost its webhook verification snippet"
    namespace: dict[str, Any] = {}
    exec(compile(block.group(1), str(VERIFY_DOC), "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace["verify_creditflow_signature"]
