"""The Fleet front: the only door devices get to a SuperLink.

Flower 1.42's SuperLink serves every API over HTTP on one address: the Fleet API that SuperNodes use
(``/v1/fleet/...``), and the Control API (``/v1/control/...``: register a node key, list runs, submit
a run, whose ServerApp then runs as the SuperLink's user), the runtime API of its app processes and a
health route. Its open-source build has no account authentication, so whoever reaches that address
controls the server. ``--control-api-address`` and ``--fleet-api-address`` are deprecated no-ops in
1.42 (``flower-superlink --help``): the APIs cannot be given separate addresses.

So the SuperLink is bound to ``127.0.0.1`` (the operator's ``flwr`` CLI and the app processes use
it there), and this front listens where the devices connect. It forwards exactly the Fleet routes,
``POST /v1/fleet/<name>`` with ``<name>`` one of :data:`FLEET_ROUTES`, with their body and headers
(the SuperNodes' signatures included), and answers everything else ``404`` without touching the
SuperLink. A SuperLink that is down answers ``502``, which a SuperNode retries, as it retries a
refused connection.

Run it as ``python -m fedrec.deploy.front --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093
--ssl-certfile server.pem --ssl-keyfile server.key --ssl-ca-certfile ca.crt`` (docs/deploy.md);
``fedrec deploy local`` starts one on loopback.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

#: the Fleet API of Flower 1.42 (``flwr/supernode/fleet_http_client.py``): all a SuperNode calls
FLEET_ROUTES = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node", "send-node-heartbeat",
    "pull-messages", "push-messages", "get-run", "get-fab", "push-object", "pull-object",
    "confirm-message-received"})
#: headers that belong to one connection, not to the request (RFC 9110 section 7.6.1)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"transfer-encoding", b"upgrade", b"host"})
TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=60.0)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def allowed(scope: Scope) -> bool:
    """A Fleet call: ``POST /v1/fleet/<route>`` with a known route and no query; nothing else passes."""
    path, method = scope.get("path", ""), scope.get("method", "")
    head, _, route = path.rpartition("/")
    return (scope.get("type") == "http" and method == "POST" and head == "/v1/fleet" and route in FLEET_ROUTES
            and not scope.get("query_string") and scope.get("raw_path", path.encode()) == path.encode())


class FleetFront:
    """An ASGI app forwarding the Fleet routes to ``upstream`` (``https://127.0.0.1:9093``, say)."""

    def __init__(self, upstream: str, verify: ssl.SSLContext | bool = True) -> None:
        self.upstream = upstream.rstrip("/")
        self.verify = verify
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif not allowed(scope):
            await _answer(send, 404, b"Not a Fleet API route.\n")
        else:
            await self._forward(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(verify=self.verify, timeout=TIMEOUT, http2=False)
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.client is None:  # served without lifespan events
            self.client = httpx.AsyncClient(verify=self.verify, timeout=TIMEOUT, http2=False)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        req = self.client.build_request("POST", self.upstream + scope["path"], headers=headers,
                                        content=_body(receive))
        try:
            resp = await self.client.send(req, stream=True)
        except httpx.HTTPError:
            await _answer(send, 502, b"The SuperLink is not reachable.\n")
            return
        try:
            await send({"type": "http.response.start", "status": resp.status_code,
                        "headers": [(k, v) for k, v in resp.headers.raw if k.lower() not in HOP_BY_HOP]})
            async for chunk in resp.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await resp.aclose()


async def _body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return
        yield msg.get("body", b"")
        if not msg.get("more_body", False):
            return


async def _answer(send: Send, status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


class FrontError(ValueError):
    """A bad argument of the front's command: one sentence."""


def _address(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise FrontError(f"{flag} should be host:port (got {text!r}).")
    return host.strip("[]"), int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fedrec.deploy.front",
                                description="Forward only Flower's Fleet API to a SuperLink bound to loopback.")
    p.add_argument("--listen", required=True, metavar="HOST:PORT", help="where the devices connect")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink (on 127.0.0.1)")
    p.add_argument("--ssl-certfile", help="the server certificate the devices see (PEM)")
    p.add_argument("--ssl-keyfile", help="its private key (PEM)")
    p.add_argument("--ssl-ca-certfile", help="the CA that signed the SuperLink's certificate")
    p.add_argument("--insecure", action="store_true", help="no TLS on either side (tests and demos only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        app, host, port = _app(args)
    except FrontError as e:
        print(f"fedrec front: {e}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"fedrec front: forwarding the Fleet API on {host}:{port} to {app.upstream}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", ssl_certfile=args.ssl_certfile,
                ssl_keyfile=args.ssl_keyfile, lifespan="on", timeout_graceful_shutdown=5)
    return 0


def _app(args: argparse.Namespace) -> tuple[FleetFront, str, int]:
    host, port = _address(args.listen, "--listen")
    up_host, up_port = _address(args.superlink, "--superlink")
    tls = [args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile]
    if args.insecure == any(tls) or not (args.insecure or all(tls)):
        raise FrontError("give --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile, or --insecure.")
    for f in filter(None, tls):
        if not Path(f).is_file():
            raise FrontError(f"{f} is not a readable file.")
    try:
        verify: ssl.SSLContext | bool = False if args.insecure else ssl.create_default_context(cafile=args.ssl_ca_certfile)
    except ssl.SSLError as e:
        raise FrontError(f"{args.ssl_ca_certfile} is not a PEM CA certificate ({e.reason}).") from None
    scheme = "http" if args.insecure else "https"
    return FleetFront(f"{scheme}://{up_host}:{up_port}", verify), host, port


if __name__ == "__main__":
    sys.exit(main())
