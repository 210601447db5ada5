"""Encryption at rest for third-party credentials (Fernet: AES-128-CBC + HMAC-SHA256).

The key comes from `SMA_CREDENTIAL_KEY` (a url-safe base64 32-byte Fernet key); the embedded
run generates one and keeps it in its data directory. Without a key, storing or reading a
credential is refused with 503 rather than falling back to plaintext.
"""
from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken

from core.errors import DependencyUnavailable

KEY_SETTING = "SMA_CREDENTIAL_KEY"


class CredentialCipher:
    def __init__(self, key: str):
        try:
            self._fernet = Fernet(key.encode() if isinstance(key, str) else key)
        except (ValueError, TypeError):
            raise DependencyUnavailable(
                f"{KEY_SETTING} is not a valid Fernet key (32 url-safe base64-encoded bytes)",
                code="credential_key_invalid") from None

    def __repr__(self) -> str:
        return "CredentialCipher()"

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode()

    def decrypt(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise DependencyUnavailable(
                f"A stored credential cannot be decrypted with the configured {KEY_SETTING} "
                "(was the key changed?); link the account again",
                code="credential_undecryptable") from None


def cipher_from_settings(settings) -> CredentialCipher:
    key = settings.credential_key.get_secret_value().strip()
    if not key:
        raise DependencyUnavailable(
            f"Credential encryption is not configured: set {KEY_SETTING} to a Fernet key "
            "(python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())')",
            code="credential_key_missing")
    return CredentialCipher(key)
