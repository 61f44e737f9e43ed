"""A private CA and a server certificate for the secure local services (``slsrec local up --secure``).

Issued with ``cryptography`` at run time into a folder under ``var/`` (git-ignored); nothing here is
ever committed. The CA's private key is never written: it signs the server certificate and is
dropped, so nobody can issue another certificate that the clients would trust. Starting over means
deleting the folder (both services then get a fresh pair).

>>> import tempfile
>>> tls = issue(Path(tempfile.mkdtemp()), key_password="pw")
>>> sorted(p.name for p in tls.folder.iterdir())
['ca.crt', 'server.crt', 'server.key', 'server.p12']
>>> oct(tls.server_key.stat().st_mode & 0o777)
'0o600'
>>> subject_alt_names(tls.server_cert)
['localhost', '127.0.0.1']
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HOSTS = ("localhost", "127.0.0.1")  # what clients dial; hostname verification checks these names
VALID_DAYS = 397  # the longest validity browsers and most TLS stacks still accept for a server cert


@dataclass(frozen=True)
class TlsFiles:
    folder: Path

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"  # what clients trust

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"  # unencrypted PKCS#8, mode 0600 (Redis reads it)

    @property
    def server_p12(self) -> Path:
        # Kafka's key store. Not PEM: Kafka requires a PEM key file to be encrypted, and Java 17 cannot
        # read the PBES2 encryption of PEM keys; its PKCS#12 reader can.
        return self.folder / "server.p12"

    def exists(self) -> bool:
        return all(p.is_file() for p in (self.ca_cert, self.server_cert, self.server_key, self.server_p12))


def issue(folder: Path, key_password: str, hosts: tuple[str, ...] = HOSTS) -> TlsFiles:
    """Write a fresh CA certificate and a server certificate (and key) for ``hosts`` into ``folder``."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"slsrec local CA {now:%Y-%m-%d %H:%M:%S}")])
    ca = (_builder(ca_name, ca_name, ca_key.public_key(), now)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(_key_usage(cert_sign=True), critical=True)
          .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
    server = (_builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), ca_name, key.public_key(), now)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(_key_usage(cert_sign=False), critical=True)
              # clientAuth too: the Kafka broker presents this certificate to its own controller (mutual TLS)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                             critical=False)
              .add_extension(x509.SubjectAlternativeName(names), critical=False)
              .sign(ca_key, hashes.SHA256()))

    tls = TlsFiles(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    write_file(tls.server_key, key.private_bytes(pem, pkcs8, serialization.NoEncryption()), secret=True)
    write_file(tls.server_p12, pkcs12.serialize_key_and_certificates(
        b"server", key, server, [ca], serialization.BestAvailableEncryption(key_password.encode())), secret=True)
    write_file(tls.server_cert, server.public_bytes(pem) + ca.public_bytes(pem))
    write_file(tls.ca_cert, ca.public_bytes(pem))
    return tls


def subject_alt_names(cert_file: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(n.value) for n in san]


def _builder(subject: x509.Name, issuer: x509.Name, public_key, now: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a little clock skew
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS)))


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=cert_sign, crl_sign=cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False, key_agreement=not cert_sign,
                         encipher_only=False, decipher_only=False)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def write_file(path: Path, data: bytes, secret: bool = False) -> None:
    """Write ``path`` whole; a secret is created with mode 0600 (never world-readable, not even briefly)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
