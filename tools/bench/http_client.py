"""Our HTTP client (:class:`vfs.redirect.http_remote.HttpRemote`, on ``http.client``) against
the well-kept libraries that would replace it (urllib3, httpx) and curl, fetching the same objects
from nginx on 127.0.0.1 in the same run.

    python -m tools.bench.http_client [--runs 7] [--small 2000] [--json]

Rows, over plain HTTP, HTTPS, mutual TLS and nginx's forward proxy (HTTP through the proxy):

* ``1 MiB`` and ``64 MiB`` objects: one GET, the body streamed in the store's 1 MiB blocks into
  SHA-256 (what the resolver does before it writes) — MB/s;
* ``4 KiB x N``: N GETs of small objects over one keep-alive connection — requests per second
  (per-request overhead: headers, pool, checks).

urllib3 is used the way a careful caller would: one ``PoolManager`` (or ``ProxyManager``),
``preload_content=False``, ``enforce_content_length=True``, no redirects, no automatic retries
(the comparison is of the transport, ours does no retry here either). curl (``-o /dev/null``,
one process per fetch; ``--keepalive`` over a URL list for the small row) shows the floor.

urllib3 and httpx (``httpx.Client``, streamed with ``iter_raw``) are not vfs dependencies:
``pip install urllib3 httpx`` into the venv to run this (the benchmark says so and exits 2
without it). Why we keep our client: README, "HTTP client".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tools.nginx import Nginx, start_nginx, stop_nginx
from vfs.redirect.file_remote import FileRemote
from vfs.redirect.http_remote import HttpRemote
from vfs.redirect.remote import BLOCK

KINDS = ("http", "https", "mtls", "proxy")


def ours(server: Nginx, kind: str) -> tuple[Callable[[str, int], int], Callable[[], None]]:
    tls = {"ca": server.ca} if kind in ("https", "mtls") else {}
    if kind == "mtls":
        tls |= {"cert": server.client_cert, "key": server.client_key}
    proxy = server.proxy if kind == "proxy" else None
    remote = HttpRemote(server.url("repo", "http" if kind == "proxy" else kind), proxy=proxy, **tls)

    def fetch(oid: str, size: int) -> int:
        h = hashlib.sha256()
        n = 0
        for block in remote.iter_object(oid, BLOCK, expected_size=size):
            h.update(block)
            n += len(block)
        return n

    return fetch, remote.close


def theirs(server: Nginx, kind: str) -> tuple[Callable[[str, int], int], Callable[[], None]]:
    import urllib3

    kw: dict = {"retries": False, "timeout": urllib3.Timeout(connect=10, read=10)}
    if kind in ("https", "mtls"):
        kw["ca_certs"] = server.ca
    if kind == "mtls":
        kw |= {"cert_file": server.client_cert, "key_file": server.client_key}
    pool = (
        urllib3.ProxyManager(server.proxy, **kw) if kind == "proxy" else urllib3.PoolManager(**kw)
    )
    base = server.url("repo", "http" if kind == "proxy" else kind)

    def fetch(oid: str, size: int) -> int:
        resp = pool.request(
            "GET",
            f"{base}/objects/{oid[:2]}/{oid}",
            preload_content=False,
            redirect=False,
            enforce_content_length=True,
        )
        if resp.status != 200:
            raise RuntimeError(f"urllib3: HTTP {resp.status}")
        if int(resp.headers.get("Content-Length", -1)) != size:
            raise RuntimeError("urllib3: wrong Content-Length")
        h = hashlib.sha256()
        n = 0
        for block in resp.stream(BLOCK):
            h.update(block)
            n += len(block)
        resp.release_conn()
        return n

    return fetch, pool.clear


def httpx_client(server: Nginx, kind: str) -> tuple[Callable[[str, int], int], Callable[[], None]]:
    import httpx

    verify: object = False
    if kind in ("https", "mtls"):
        import ssl

        ctx = ssl.create_default_context(cafile=server.ca)
        if kind == "mtls":
            ctx.load_cert_chain(server.client_cert, server.client_key)
        verify = ctx
    client = httpx.Client(
        verify=verify,  # type: ignore[arg-type]
        proxy=server.proxy if kind == "proxy" else None,
        follow_redirects=False,
        timeout=10,
    )
    base = server.url("repo", "http" if kind == "proxy" else kind)

    def fetch(oid: str, size: int) -> int:
        with client.stream("GET", f"{base}/objects/{oid[:2]}/{oid}") as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"httpx: HTTP {resp.status_code}")
            h = hashlib.sha256()
            n = 0
            for block in resp.iter_raw(BLOCK):
                h.update(block)
                n += len(block)
        if n != size:
            raise RuntimeError("httpx: short body")
        return n

    return fetch, client.close


def curl_args(server: Nginx, kind: str) -> list[str]:
    args = ["curl", "-s", "-f"]
    if kind in ("https", "mtls"):
        args += ["--cacert", server.ca]
    if kind == "mtls":
        args += ["--cert", server.client_cert, "--key", server.client_key]
    if kind == "proxy":
        args += ["--proxy", server.proxy]
    return args


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def interleaved(runs: int, cases: dict[str, Callable[[], object]]) -> Iterator[tuple[str, float]]:
    """Each case once per round, rounds repeated: load drifts hit every case alike."""
    for _ in range(runs):
        for name, fn in cases.items():
            yield name, timed(fn)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--small", type=int, default=2000, help="4 KiB objects of the small row")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    try:
        import httpx  # noqa: F401
        import urllib3  # noqa: F401
    except ImportError:
        print("http_client bench: needs .venv/bin/pip install urllib3 httpx", file=sys.stderr)
        return 2

    base = Path(tempfile.mkdtemp(prefix="vfs-bench-http-"))
    proc, server = start_nginx(base / "nginx")
    results: dict[str, dict] = {}
    try:
        repo = FileRemote(server.webroot / "repo", create=True)
        big = {label: (repo.put(os.urandom(size)), size) for label, size in
               (("1 MiB", 1 << 20), ("64 MiB", 64 << 20))}  # fmt: skip
        small = [repo.put(os.urandom(4096)) for _ in range(args.small)]
        url_list = base / "urls"
        for kind in KINDS:
            clients = {
                "ours": ours(server, kind),
                "urllib3": theirs(server, kind),
                "httpx": httpx_client(server, kind),
            }
            for label, (oid, size) in big.items():
                obj_url = server.url("repo", "http" if kind == "proxy" else kind)
                obj_url += f"/objects/{oid[:2]}/{oid}"
                cases: dict[str, Callable[[], object]] = {
                    name: (lambda f=f, o=oid, s=size: f(o, s)) for name, (f, _) in clients.items()
                }
                cases["curl"] = lambda a=curl_args(server, kind), u=obj_url: subprocess.run(
                    [*a, "-o", "/dev/null", u], check=True
                )
                for name, _ in clients.items():
                    cases[name]()  # connect once: rows compare transfers, not handshakes
                times: dict[str, list[float]] = {n: [] for n in cases}
                for name, t in interleaved(args.runs, cases):
                    times[name].append(t)
                results[f"{kind} {label}"] = {
                    n: round(size / statistics.median(ts) / 1e6, 1) for n, ts in times.items()
                } | {"unit": "MB/s"}
            root = server.url("repo", "http" if kind == "proxy" else kind)
            urls = [f"{root}/objects/{o[:2]}/{o}" for o in small]
            url_list.write_text("".join(f'url = "{u}"\noutput = "/dev/null"\n' for u in urls))
            cases = {
                name: (lambda f=f: [f(o, 4096) for o in small]) for name, (f, _) in clients.items()
            }
            cases["curl"] = lambda a=curl_args(server, kind): subprocess.run(
                [*a, "-K", str(url_list)], check=True
            )
            times = {n: [] for n in cases}
            for name, t in interleaved(max(3, args.runs // 2), cases):
                times[name].append(t)
            results[f"{kind} 4 KiB x {args.small}"] = {
                n: round(len(small) / statistics.median(ts)) for n, ts in times.items()
            } | {"unit": "req/s"}
            for _, close in clients.values():
                close()
    finally:
        stop_nginx(proc)
        shutil.rmtree(base, ignore_errors=True)

    for r in results.values():
        r["ours/urllib3"] = round(r["ours"] / r["urllib3"], 2)
        r["ours/httpx"] = round(r["ours"] / r["httpx"], 2)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        cols = ("ours", "urllib3", "httpx", "curl", "unit", "ours/urllib3", "ours/httpx")
        print(f"{'case':<22}" + "".join(f"{c:>13}" for c in cols))
        for case, r in results.items():
            print(f"{case:<22}" + "".join(f"{r[c]:>13}" for c in cols))
        print(f"medians of {args.runs} interleaved rounds; load average {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
