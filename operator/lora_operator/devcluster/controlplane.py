"""A throwaway real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager), envtest-style.

    with ControlPlane(assets_dir(), Path("/tmp/cp")) as cp:   # assets: $KUBEBUILDER_ASSETS
        cp.kubeconfig            # admin (system:masters) client certificate
        cp.service_account_kubeconfig("lora-system", "lora-operator", path)   # a TokenRequest token

Follows the convention of controller-runtime's envtest: ``KUBEBUILDER_ASSETS`` names a folder
holding ``etcd`` and ``kube-apiserver`` (and ``kube-controller-manager``, which runs when present:
garbage collection, namespace deletion and the ``default`` ServiceAccounts need it). There is no
kubelet or scheduler: pods stay Pending until a test or the dev pod runner writes their status.
Certificates are generated per start (a CA, the serving cert, an admin client cert, the
ServiceAccount signing key), ports are free loopback ports, data lives under ``workdir`` and is
removed on stop. A cold start takes about 5 s on 2 cores; the apiserver uses about 400 MB.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import ipaddress
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

ASSETS_ENV = "KUBEBUILDER_ASSETS"
HOST = "127.0.0.1"
REQUIRED = ("etcd", "kube-apiserver")
CONTROLLER_MANAGER = "kube-controller-manager"
START_TIMEOUT = 120.0  # seconds to /readyz; a loaded 2-core machine needs far more than the idle 5 s


class ControlPlaneError(RuntimeError):
    """The control plane cannot start; the message names the binary or log to look at."""


def assets_dir(env: dict[str, str] | None = None) -> Path | None:
    """The folder ``KUBEBUILDER_ASSETS`` names when it holds etcd and kube-apiserver, else None."""
    value = (env if env is not None else os.environ).get(ASSETS_ENV, "")
    if not value:
        return None
    folder = Path(value)
    if not all((folder / name).is_file() for name in REQUIRED):
        raise ControlPlaneError(f"{ASSETS_ENV}={value}: expected {' and '.join(REQUIRED)} in that folder; "
                                "unset it to use the emulator")
    return folder


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# ---- certificates (pure: in → PEM bytes) ---------------------------------------------------------

def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, issuer: x509.Name,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=7))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        usage = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.DNSName("kubernetes"), x509.DNSName("kubernetes.default"),
            x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def write_pki(folder: Path) -> None:
    """A CA, the apiserver's serving cert, admin and controller-manager client certs, the SA key pair."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_name = _key(), _name("lora-operator-test-ca")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    files: dict[str, bytes] = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM), "ca.key": _pem_key(ca_key)}
    for stem, subject, server in (("apiserver", _name("kube-apiserver"), True),
                                  ("admin", _name("admin", "system:masters"), False),
                                  ("cm", _name("system:kube-controller-manager"), False)):
        key = _key()
        files[f"{stem}.crt"] = _cert(subject, key, ca_name, ca_key, server=server).public_bytes(
            serialization.Encoding.PEM)
        files[f"{stem}.key"] = _pem_key(key)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    files["sa.key"] = _pem_key(sa_key)
    files["sa.pub"] = sa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo)
    for name, data in files.items():
        path = folder / name
        path.write_bytes(data)
        path.chmod(0o600)


def kubeconfig_document(server: str, ca: Path, *, user: str, cert: Path | None = None, key: Path | None = None,
                        token: str | None = None, namespace: str = "default") -> dict:
    """A one-context kubeconfig (client cert or bearer token)."""
    creds: dict[str, str] = {"token": token} if token else {"client-certificate": str(cert),
                                                           "client-key": str(key)}
    return {
        "apiVersion": "v1", "kind": "Config", "current-context": user,
        "clusters": [{"name": "envtest", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": creds}],
        "contexts": [{"name": user, "context": {"cluster": "envtest", "user": user, "namespace": namespace}}],
    }


# ---- processes -----------------------------------------------------------------------------------

def _die_with_parent() -> None:
    # A killed test run or dev cluster must not leave a 400 MB apiserver and etcd behind (Linux only).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on free loopback ports, stopped on exit."""

    def __init__(self, assets: Path, workdir: Path, port: int = 0, profiling: bool = False) -> None:
        self.assets = assets
        self.profiling = profiling  # the apiserver's /debug/pprof (benchmarks: where its CPU goes)
        self.workdir = workdir
        self.pki = workdir / "pki"
        self.port = port  # 0: a free one
        self.url = ""
        self.kubeconfig = workdir / "admin.kubeconfig"
        self._procs: list[_Proc] = []

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str]) -> _Proc:
        logfile = self.workdir / f"{name}.log"
        with logfile.open("wb") as out:
            popen = subprocess.Popen([str(self.assets / name), *args], stdout=out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        proc = _Proc(name, popen, logfile)
        self._procs.append(proc)
        return proc

    def _tail(self, proc: _Proc, lines: int = 15) -> str:
        try:
            return "\n".join(proc.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> ControlPlane:
        """Start all parts and wait for the apiserver's /readyz (raises ControlPlaneError)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        write_pki(self.pki)
        etcd_port, peer_port = free_port(), free_port()
        etcd_url = f"http://{HOST}:{etcd_port}"
        etcd = self._spawn("etcd", [
            f"--data-dir={self.workdir / 'etcd'}", f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}", f"--listen-peer-urls=http://{HOST}:{peer_port}",
            f"--initial-advertise-peer-urls=http://{HOST}:{peer_port}",
            f"--initial-cluster=default=http://{HOST}:{peer_port}", "--name=default",
            "--unsafe-no-fsync", "--log-level=warn"])
        self.port = self.port or free_port()
        self.url = f"https://{HOST}:{self.port}"
        p = self.pki
        apiserver = self._spawn("kube-apiserver", [
            f"--etcd-servers={etcd_url}", f"--bind-address={HOST}", f"--advertise-address={HOST}",
            f"--secure-port={self.port}", f"--cert-dir={self.workdir / 'certs'}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}", "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}", f"--service-account-signing-key-file={p / 'sa.key'}",
            "--service-cluster-ip-range=10.96.0.0/16", "--endpoint-reconciler-type=none", f"--profiling={str(self.profiling).lower()}"])
        self._write_kubeconfig(self.kubeconfig, kubeconfig_document(
            self.url, p / "ca.crt", user="admin", cert=p / "admin.crt", key=p / "admin.key"))
        try:
            self._wait_ready(apiserver, etcd)
        except BaseException:
            self.stop()
            raise
        if (self.assets / CONTROLLER_MANAGER).is_file():
            cm_config = self.workdir / "cm.kubeconfig"
            self._write_kubeconfig(cm_config, kubeconfig_document(
                self.url, p / "ca.crt", user="cm", cert=p / "cm.crt", key=p / "cm.key"))
            self._spawn(CONTROLLER_MANAGER, [
                f"--kubeconfig={cm_config}", f"--authentication-kubeconfig={cm_config}",
                f"--authorization-kubeconfig={cm_config}", f"--bind-address={HOST}",
                f"--secure-port={free_port()}", f"--root-ca-file={p / 'ca.crt'}",
                f"--service-account-private-key-file={p / 'sa.key'}", "--use-service-account-credentials=true",
                # No kubelet runs here: tests bind pods to nodes nobody registers, and PodGC deletes a pod
                # bound to a missing node once that node has been missing 40 s (a pod "vanishing" mid-test
                # in a long session). The dev pod runner registers its node, so it does not need PodGC.
                "--controllers=*,garbagecollector,namespace,serviceaccount-token,-pod-garbage-collector-controller",
                "--leader-elect=false",
                "--cluster-name=test"])
        log.info("control plane ready at %s (binaries from %s)", self.url, self.assets)
        return self

    @staticmethod
    def _write_kubeconfig(path: Path, doc: dict) -> None:
        path.write_text(yaml.safe_dump(doc), encoding="utf-8")
        path.chmod(0o600)

    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
        return ctx

    def _wait_ready(self, *procs: _Proc) -> None:
        ctx = self._ssl_context()
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while time.monotonic() < deadline:
            for proc in procs:
                if proc.popen.poll() is not None:
                    raise ControlPlaneError(f"{proc.name} exited with {proc.popen.returncode}; "
                                            f"its log ({proc.log}) ends:\n{self._tail(proc)}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", context=ctx, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise ControlPlaneError(f"kube-apiserver not ready after {START_TIMEOUT:.0f} s ({last}); "
                                f"its log ends:\n{self._tail(procs[0])}")

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path,
                                   expiration_seconds: int = 3600) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ``namespace/name`` (TokenRequest)."""
        import kubernetes  # the operator extra; imported here so pure helpers stay importable without it

        with kubernetes.config.new_client_from_config(config_file=str(self.kubeconfig)) as client:
            core = kubernetes.client.CoreV1Api(client)
            request = {"spec": {"expirationSeconds": expiration_seconds, "audiences": []}}
            token = core.create_namespaced_service_account_token(name, namespace, request).status.token
        self._write_kubeconfig(path, kubeconfig_document(self.url, self.pki / "ca.crt", user=name, token=token,
                                                         namespace=namespace))
        return path

    def stop(self) -> None:
        """Stop every process (controller-manager, apiserver, then etcd) and remove the data dir."""
        # One at a time: an apiserver whose etcd is already gone hangs in its shutdown (> 30 s).
        for proc in reversed(self._procs):
            if proc.popen.poll() is None:
                proc.popen.terminate()
            try:
                proc.popen.wait(15)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(10)
        self._procs.clear()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.workdir / "etcd")
