"""TLS for SMTP: the configured certificate, or a self-signed one made once under ``data_dir/tls``.

SMTP AUTH is only offered after STARTTLS, so the gateway always has a certificate. A self-signed
one is enough between a user's mail client and their own office gateway (clients pin or accept
it); set ``security.tls.cert`` / ``.key`` to a real one for anything wider.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .config import Config
from .spool import write_durably


def server_context(config: Config) -> ssl.SSLContext:
    cert, key = config.security.tls_cert, config.security.tls_key
    if cert is None or key is None:
        cert, key = self_signed(config.data_dir / "tls", config.domains[0])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def self_signed(folder: Path, hostname: str) -> tuple[Path, Path]:
    """The certificate and key under ``folder``, made on first use."""
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_durably(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))  # 0600, like every durable file
    write_durably(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
