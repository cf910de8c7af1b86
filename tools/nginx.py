"""A real nginx on 127.0.0.1 for tests, benchmarks and the demo (no mocks of HTTP).

``start_nginx(base)`` makes a throw-away CA with openssl, writes a config with four servers
(plain HTTP, HTTP rate-limited to 2 MB/s, HTTPS, HTTPS with ``ssl_verify_client on``) and starts
nginx in the foreground of a new session; ``stop_nginx`` ends it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited early with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} did not open in {timeout}s")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(d: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate signed by the CA,
    and a client certificate from another (untrusted) CA."""
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "rogue-ca"):
        _openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-subj", f"/CN=vfs test {ca}",
            cwd=d,
        )  # fmt: skip
    (d / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ca, ext in (
        ("server", "ca", "server.ext"),
        ("client", "ca", "client.ext"),
        ("rogue-client", "rogue-ca", "client.ext"),
    ):
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN=vfs test {name}", cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", ext, cwd=d,
        )  # fmt: skip
    return d


@dataclass
class Nginx:
    webroot: Path
    pki: Path
    ports: dict[str, int]

    def url(self, name: str, kind: str = "http") -> str:
        scheme = "http" if kind in ("http", "slow", "proxy") else "https"
        return f"{scheme}://127.0.0.1:{self.ports[kind]}/{name}"

    @property
    def proxy(self) -> str:
        """The caching forward proxy (in front of the plain HTTP server)."""
        return f"http://127.0.0.1:{self.ports['proxy']}"

    @property
    def ca(self) -> str:
        return str(self.pki / "ca.pem")

    @property
    def client_cert(self) -> str:
        return str(self.pki / "client.pem")

    @property
    def client_key(self) -> str:
        return str(self.pki / "client.key")


NGINX_CONF = """
user root;
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    sendfile on;
    keepalive_timeout 65;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path {prefix}/tmp;
    proxy_temp_path {prefix}/tmp;
    fastcgi_temp_path {prefix}/tmp;
    uwsgi_temp_path {prefix}/tmp;
    scgi_temp_path {prefix}/tmp;
    proxy_cache_path {prefix}/cache keys_zone=vfs:8m max_size=1g inactive=1d;
    server {{
        listen 127.0.0.1:{http};
        root {webroot};
    }}
    # A caching forward proxy in front of the plain server, as a site squid in front of a
    # CernVM-FS stratum: objects are immutable, so cache them for a day.
    server {{
        listen 127.0.0.1:{proxy};
        location / {{
            proxy_pass http://127.0.0.1:{http};
            proxy_cache vfs;
            proxy_cache_valid 200 206 1d;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
    server {{
        listen 127.0.0.1:{slow};
        root {webroot};
        limit_rate 2m;
    }}
    server {{
        listen 127.0.0.1:{https} ssl;
        root {webroot};
        ssl_certificate {pki}/server.pem;
        ssl_certificate_key {pki}/server.key;
    }}
    server {{
        listen 127.0.0.1:{mtls} ssl;
        root {webroot};
        ssl_certificate {pki}/server.pem;
        ssl_certificate_key {pki}/server.key;
        ssl_client_certificate {pki}/ca.pem;
        ssl_verify_client on;
    }}
}}
"""


def start_nginx(base: Path) -> tuple[subprocess.Popen, Nginx]:
    exe = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(exe):
        raise RuntimeError("nginx is not installed (make test/demo install nginx-light)")
    base.mkdir(parents=True, exist_ok=True)
    webroot = base / "www"
    webroot.mkdir(exist_ok=True)
    (base / "tmp").mkdir(exist_ok=True)
    pki = make_pki(base / "pki")
    ports = {k: free_port() for k in ("http", "slow", "https", "mtls", "proxy")}
    conf = base / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=base, webroot=webroot, pki=pki, **ports))
    proc = subprocess.Popen(
        [exe, "-p", str(base), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        for port in ports.values():
            wait_for_port(port, proc=proc)
    except BaseException:
        stop_nginx(proc)
        raise
    return proc, Nginx(webroot, pki, ports)


def stop_nginx(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGQUIT)
        proc.wait(timeout=10)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
