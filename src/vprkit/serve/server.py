"""Running the app under uvicorn on a socket bound here (so `--port 0` gets a free port and
the caller knows it before the first request), in the foreground or in a thread."""

from __future__ import annotations

import ipaddress
import socket
import threading

import uvicorn


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket; connections made before the server starts wait in its
    backlog instead of being refused."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are
    # TCP, and without it each keep-alive answer waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config):
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        self.ready.set()


def config(app, log_level: str = "info") -> uvicorn.Config:
    # One event loop is plenty: the work is in the pool's threads, not on the loop.
    return uvicorn.Config(app, log_level=log_level, timeout_keep_alive=5, server_header=False)


def serve_forever(app, sock: socket.socket, log_level: str = "info") -> None:
    _Server(config(app, log_level)).run(sockets=[sock])


class ServerThread:
    """`with ServerThread(app) as url:` serves on 127.0.0.1 at a free port until the block
    ends (for tests and benchmarks)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = _Server(config(app, log_level))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> str:
        self.thread.start()
        if not self.server.ready.wait(timeout=60):
            raise RuntimeError("the server did not start within 60 s")
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()
