"""Real X.509 certificates for TLS tests (``cryptography``): a CA, a server certificate, client certificates."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path


def generate_certs(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA.

    Returns paths: ca, server_cert, server_key, client_cert, client_key, other_ca (an unrelated CA, to check
    that a client certificate from elsewhere is refused).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def ca(cn: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        k = key()
        cert = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(k.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(k, hashes.SHA256())
        )  # fmt: skip
        return cert, k

    def leaf(cn: str, issuer: x509.Certificate, issuer_key: ec.EllipticCurvePrivateKey, server: bool):
        k = key()
        b = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer.subject).public_key(k.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )  # fmt: skip
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return b.sign(issuer_key, hashes.SHA256()), k

    def write(stem: str, cert: x509.Certificate, k: ec.EllipticCurvePrivateKey | None = None) -> None:
        (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        if k is not None:
            (directory / f"{stem}.key").write_bytes(
                k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
            )

    ca_cert, ca_key = ca("kvscale-test-ca")
    other_cert, other_key = ca("some-other-ca")
    srv, srv_key = leaf("kvscale-scaler", ca_cert, ca_key, True)
    cli, cli_key = leaf("keda-operator", ca_cert, ca_key, False)
    rogue, rogue_key = leaf("rogue", other_cert, other_key, False)
    write("ca", ca_cert)
    write("other-ca", other_cert)
    write("server", srv, srv_key)
    write("client", cli, cli_key)
    write("rogue", rogue, rogue_key)
    return {
        "ca": directory / "ca.crt",
        "server_cert": directory / "server.crt",
        "server_key": directory / "server.key",
        "client_cert": directory / "client.crt",
        "client_key": directory / "client.key",
        "rogue_cert": directory / "rogue.crt",
        "rogue_key": directory / "rogue.key",
    }
