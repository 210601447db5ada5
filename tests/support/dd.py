"""Helpers for the Don't Die tests (integration and e2e)."""
from __future__ import annotations

import uuid

import httpx
from cryptography.fernet import Fernet

from sandbox.dontdie import account_for

# Short, so a hanging upstream is cheap to test: at most (1 + retries) attempts of this.
DD_TIMEOUT_SECONDS = 0.5
DD_RETRIES = 1
CLIENT_ID = "sma-test-client"
CREDENTIAL_KEY = Fernet.generate_key().decode()


def new_dd_token(kind: str = "") -> str:
    """A fresh sandbox account per call: `sandbox-` tokens are valid, `sandbox-empty-` empty."""
    return f"sandbox-{kind + '-' if kind else ''}{uuid.uuid4().hex}"


def dd_uid(token: str) -> str:
    return account_for(token)["id"]


class SandboxControl:
    def __init__(self, url: str):
        self.url = url

    def faults(self, **config) -> None:
        httpx.post(f"{self.url}/_sandbox/faults", json=config).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/_sandbox/faults").raise_for_status()

    def requests(self, contains: str = "") -> list[str]:
        seen = httpx.get(f"{self.url}/_sandbox/requests").json()["requests"]
        return [r for r in seen if contains in r]

    def clear_requests(self) -> None:
        httpx.delete(f"{self.url}/_sandbox/requests").raise_for_status()
