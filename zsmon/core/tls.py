"""The listeners' certificate and key, checked before uvicorn loads them.

uvicorn loads them inside its server task, where any failure surfaces as "could not
bind", and OpenSSL asks for a passphrase on the terminal when the key is encrypted.
Here each file is read and loaded first, so a mistake is one line naming its real
cause (a missing or unreadable file, not PEM, an encrypted key, a key that does not
belong to the certificate), and nothing ever prompts.
"""
from __future__ import annotations

import ssl
from pathlib import Path

from zsmon.core.yamlfile import ConfigError

_ENV = {"cert": "TLS_CERT_FILE (http.tls_cert_file)", "key": "TLS_KEY_FILE (http.tls_key_file)"}


def _read(path: Path, which: str) -> str:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"TLS: {_ENV[which]}: {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"TLS: {_ENV[which]}: {path} is a directory, not a PEM file") from None
    except OSError as exc:
        raise ConfigError(f"TLS: {_ENV[which]}: {path} cannot be read: {exc.strerror}") from None


def check_tls(cert: Path | None, key: Path | None) -> None:
    """Raise ``ConfigError`` (one line) unless ``cert`` and ``key`` make a usable server certificate."""
    if not (cert and key):
        raise ConfigError("TLS needs both TLS_CERT_FILE and TLS_KEY_FILE (http.tls_cert_file/tls_key_file)")
    cert_text, key_text = _read(cert, "cert"), _read(key, "key")
    if "-----BEGIN CERTIFICATE-----" not in cert_text:
        raise ConfigError(f"TLS: {_ENV['cert']}: {cert} holds no PEM certificate "
                          "(expected a '-----BEGIN CERTIFICATE-----' block)")
    if "PRIVATE KEY-----" not in key_text:
        raise ConfigError(f"TLS: {_ENV['key']}: {key} holds no PEM private key "
                          "(expected a '-----BEGIN PRIVATE KEY-----' block)")
    if "ENCRYPTED" in key_text:
        raise ConfigError(f"TLS: {_ENV['key']}: {key} is encrypted with a passphrase; zsmon does not prompt for "
                          f"one: decrypt it (openssl pkey -in {key} -out key.pem)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=cert_text)
    except (ssl.SSLError, ValueError):
        raise ConfigError(f"TLS: {_ENV['cert']}: {cert} is not a valid PEM certificate (damaged or truncated)") \
            from None

    def no_passphrase() -> bytes:  # OpenSSL asks only for an encrypted key: never the terminal
        raise ConfigError(f"TLS: {_ENV['key']}: {key} is encrypted with a passphrase; zsmon does not prompt for "
                          "one: decrypt it")

    try:
        context.load_cert_chain(str(cert), str(key), password=no_passphrase)
    except ConfigError:
        raise
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).upper()
        if "KEY_VALUES_MISMATCH" in reason or "MISMATCH" in reason:
            raise ConfigError(f"TLS: the private key {key} does not match the certificate {cert} "
                              "(TLS_KEY_FILE must be the key the certificate was issued for)") from None
        raise ConfigError(f"TLS: {_ENV['key']}: {key} is not a valid private key (damaged or truncated, or a "
                          f"format OpenSSL cannot read{': ' + exc.reason if exc.reason else ''})") from None
