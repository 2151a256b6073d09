"""A userspace TCP proxy that makes a loopback S3 server cost what a real one does, and can cut it off.

``tc netem`` is not available here, so nodes talk to the S3 server through this
proxy instead. The model, per TCP connection (one HTTP keep-alive stream):

- **Latency per request.** A request starts when the client sends bytes that
  begin with an HTTP request line (``PUT /b/k HTTP/1.1``) and the connection is
  idle: it is its first request, or the server has sent bytes since the last
  request started. That request's bytes are held ``latency_s`` before they go
  upstream (stands for the round trip plus the server's time to first byte).
  Body bytes sent after a ``100 Continue`` are not a new request. HTTP/1.1
  clients here (urllib3, aiohttp) do not pipeline, so this counts exactly one
  delay per request. Opening a connection costs nothing extra.
- **Bandwidth per stream.** Each direction of each connection is paced to
  ``bandwidth_bps`` bytes per second (a chunk leaves when the previous bytes
  would have finished; idle time earns no burst credit).
- **Cut and restore.** ``cut()`` resets every open connection (the client sees
  a connection reset at once). New connections are then refused (``mode="refuse"``:
  accepted and reset, so a call fails fast) or blackholed (``mode="blackhole"``:
  accepted, read and never answered, so the client waits out its own timeout).
  ``restore()`` lets new connections through again and resets blackholed ones.

Every delay the proxy adds is also added to its counters (``stats()``), so
tests assert the accounting and pass an instant ``sleep`` instead of timing.

    with ShapingProxy(upstream=("127.0.0.1", port), latency_s=0.02, bandwidth_bps=100e6) as proxy:
        client = boto3.client("s3", endpoint_url=proxy.endpoint, ...)
        proxy.cut(); proxy.restore()

Command line (commands on stdin: ``cut``, ``blackhole``, ``restore``, ``stats``, ``quit``;
or SIGUSR1 = cut, SIGUSR2 = restore):

    python benchmarks/shaping_proxy.py --upstream 127.0.0.1:8333 [--listen 127.0.0.1:0] \
        [--latency-ms 20] [--bandwidth-mbps 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

CHUNK = 64 * 1024
CONTROL_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 10.0
MODES = ("refuse", "blackhole")
# An HTTP/1.x request line's start: a method token, a space. Bodies here are binary or JSON, never this.
_REQUEST_START = re.compile(rb"^[A-Z]{3,10} \S")

Sleep = Callable[[float], Awaitable[None]]


@dataclass
class ProxyStats:
    """What the proxy did; every added delay is counted here whether or not it was slept for real."""

    connections: int = 0
    refused: int = 0
    blackholed: int = 0
    reset_by_cut: int = 0
    requests: int = 0
    latency_s: float = 0.0  # sum of per-request delays
    bytes_up: int = 0
    bytes_down: int = 0
    transmission_s: float = 0.0  # sum over chunks of len(chunk) / bandwidth, both directions
    cuts: int = 0
    restores: int = 0


@dataclass(eq=False)  # identity: one per TCP connection, kept in a set
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    idle: bool = True  # no request in flight: the next request line starts a new request
    free_at: dict[str, float] = field(default_factory=lambda: {"up": 0.0, "down": 0.0})


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close with a TCP RST (SO_LINGER 0) so the peer's pending call fails at once, not on a timeout."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def _parse_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address {text!r} is not host:port")
    return host, int(port)


class ShapingProxy:
    """A shaping, cuttable TCP proxy on its own event-loop thread; ``with`` starts and stops it."""

    def __init__(
        self,
        upstream: tuple[str, int] | str,
        latency_s: float = 0.0,
        bandwidth_bps: float | None = None,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        sleep: Sleep | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``bandwidth_bps`` is bytes per second per connection and direction (None: unlimited).

        ``sleep`` replaces ``asyncio.sleep`` for the added delays (tests pass an instant one and read ``stats()``).
        """
        if isinstance(upstream, str):
            upstream = _parse_address(upstream.removeprefix("http://").rstrip("/"))
        if latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {latency_s}")
        if bandwidth_bps is not None and bandwidth_bps <= 0:
            raise ValueError(f"bandwidth_bps must be > 0 bytes/s or None, got {bandwidth_bps}")
        self.upstream = upstream
        self.latency_s = float(latency_s)
        self.bandwidth_bps = None if bandwidth_bps is None else float(bandwidth_bps)
        self._listen = listen
        self._sleep: Sleep = sleep or asyncio.sleep
        self._clock = clock
        self._stats = ProxyStats()
        self._state = "open"  # or one of MODES
        self._connections: set[_Connection] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> ShapingProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, self._listen[0], self._listen[1], limit=CHUNK)
                )
                self.address = self._server.sockets[0].getsockname()[:2]
            except BaseException as error:  # handed to the starting thread
                failure.append(error)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="shaping-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(CONTROL_TIMEOUT_S):
            raise RuntimeError("shaping proxy did not start within 10 s")
        if failure:
            raise failure[0]
        return self

    def close(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop may already be gone
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(CONTROL_TIMEOUT_S)
        self._loop = None

    def __enter__(self) -> ShapingProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        """``http://host:port`` of the proxy, to hand to an S3 client as its endpoint."""
        if self.address is None:
            raise RuntimeError("the proxy is not started")
        return f"http://{self.address[0]}:{self.address[1]}"

    # -- controls (any thread) -------------------------------------------------------------------------------------

    def cut(self, mode: str = "refuse") -> None:
        """Reset every open connection; refuse (reset at once) or blackhole new ones until ``restore()``."""
        if mode not in MODES:
            raise ValueError(f"cut mode must be one of {MODES}, got {mode!r}")
        self._call(self._cut(mode))

    def restore(self) -> None:
        """Let new connections through again; blackholed ones are reset (what they sent was lost)."""
        self._call(self._restore())

    @property
    def state(self) -> str:
        return self._state

    def stats(self) -> dict[str, Any]:
        return asdict(self._stats)

    def _call(self, coroutine: Coroutine[Any, Any, None]) -> None:
        if self._loop is None:
            raise RuntimeError("the proxy is not started")
        asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(CONTROL_TIMEOUT_S)

    async def _cut(self, mode: str) -> None:
        self._state = mode
        self._stats.cuts += 1
        for connection in list(self._connections):
            self._stats.reset_by_cut += 1
            _reset(connection.client)
            _reset(connection.upstream)
        self._connections.clear()

    async def _restore(self) -> None:
        self._state = "open"
        self._stats.restores += 1
        for writer in list(self._held):
            _reset(writer)
        self._held.clear()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            _reset(connection.client)
            _reset(connection.upstream)
        for writer in list(self._held):
            _reset(writer)
        # The resets end every connection task; wait for them so none is destroyed pending when the loop stops.
        tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        if tasks:
            _, stuck = await asyncio.wait(tasks, timeout=CONTROL_TIMEOUT_S / 2)
            for task in stuck:
                task.cancel()

    # -- data path (event-loop thread) -----------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._state == "refuse":
            self._stats.refused += 1
            _reset(writer)
            return
        if self._state == "blackhole":
            await self._hold(reader, writer)
            return
        self._stats.connections += 1
        connection = _Connection(client=writer)
        self._connections.add(connection)
        try:
            up_reader, upstream = await asyncio.wait_for(
                asyncio.open_connection(*self.upstream, limit=CHUNK), CONNECT_TIMEOUT_S
            )
            connection.upstream = upstream
            if connection not in self._connections:  # cut while connecting
                _reset(upstream)
                return
            await asyncio.gather(
                self._pump(connection, reader, upstream, "up"),
                self._pump(connection, up_reader, writer, "down"),
            )
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # shutdown; not re-raised: Python 3.11's stream callback chokes on it
            pass
        finally:
            self._connections.discard(connection)
            for side in (writer, connection.upstream):
                if side is not None and not side.is_closing():
                    side.close()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Blackhole: read and drop everything, answer nothing, until ``restore()`` resets the connection."""
        self._stats.blackholed += 1
        self._held.add(writer)
        try:
            while await reader.read(CHUNK):
                pass
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._held.discard(writer)

    async def _pump(
        self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if direction == "up":
                    self._stats.bytes_up += len(data)
                    if connection.idle and _REQUEST_START.match(data):
                        connection.idle = False
                        self._stats.requests += 1
                        if self.latency_s > 0:
                            self._stats.latency_s += self.latency_s
                            await self._sleep(self.latency_s)
                else:
                    self._stats.bytes_down += len(data)
                    connection.idle = True  # any answer (a 100 Continue too) ends the request's wait
                await self._pace(connection, direction, len(data))
                if connection not in self._connections:
                    return  # cut while this chunk waited
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof() and not writer.is_closing():
                writer.write_eof()
        except (OSError, RuntimeError):
            # One side went away: take the other down too, so neither end waits on a dead stream.
            for side in (connection.client, connection.upstream):
                if side is not None and not side.is_closing():
                    side.close()

    async def _pace(self, connection: _Connection, direction: str, size: int) -> None:
        """Hold a chunk until the stream's earlier bytes would have left at ``bandwidth_bps``."""
        if self.bandwidth_bps is None:
            return
        seconds = size / self.bandwidth_bps
        self._stats.transmission_s += seconds
        now = self._clock()
        free_at = max(connection.free_at[direction], now) + seconds
        connection.free_at[direction] = free_at
        await self._sleep(free_at - now)


class ProxyProcess:
    """The same proxy in a child process, so it never competes for the GIL with the clients it shapes.

    Benchmarks with many node threads use this; the controls go over the command line's stdin.
    """

    def __init__(self, upstream: tuple[str, int] | str, latency_s: float = 0.0, bandwidth_bps: float | None = None):
        if isinstance(upstream, str):
            upstream = _parse_address(upstream.removeprefix("http://").rstrip("/"))
        ShapingProxy(upstream, latency_s, bandwidth_bps)  # validates the options here, in the caller
        self.upstream = upstream
        self.latency_s = latency_s
        self.bandwidth_bps = bandwidth_bps
        self._process: subprocess.Popen[str] | None = None
        self.endpoint = ""

    def start(self) -> ProxyProcess:
        command = [
            sys.executable,
            __file__,
            f"--upstream={self.upstream[0]}:{self.upstream[1]}",
            f"--latency-ms={self.latency_s * 1000}",
            f"--bandwidth-mbps={(self.bandwidth_bps or 0) / 1e6}",
        ]
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.endpoint = self._answer()["endpoint"]
        return self

    def _answer(self) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], CONTROL_TIMEOUT_S)
        if not ready:
            raise RuntimeError("the shaping proxy process did not answer within 10 s")
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the shaping proxy process exited (code {self._process.poll()})")
        return dict(json.loads(line))

    def _command(self, command: str) -> dict[str, Any]:
        assert self._process is not None and self._process.stdin is not None
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        return self._answer()

    def cut(self, mode: str = "refuse") -> None:
        if mode not in MODES:
            raise ValueError(f"cut mode must be one of {MODES}, got {mode!r}")
        self._command("cut" if mode == "refuse" else mode)

    def restore(self) -> None:
        self._command("restore")

    def stats(self) -> dict[str, Any]:
        return self._command("stats")

    def close(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        with contextlib.suppress(OSError):
            assert self._process.stdin is not None
            self._process.stdin.write("quit\n")
            self._process.stdin.close()
        try:
            self._process.wait(CONTROL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(CONTROL_TIMEOUT_S)

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="host:port of the S3 server")
    parser.add_argument("--listen", default="127.0.0.1:0", help="host:port to listen on (port 0: any free one)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="added per HTTP request")
    parser.add_argument("--bandwidth-mbps", type=float, default=100.0, help="MB/s (1e6 bytes) per stream; 0 = no cap")
    args = parser.parse_args(argv)
    bandwidth = args.bandwidth_mbps * 1e6 if args.bandwidth_mbps > 0 else None
    proxy = ShapingProxy(
        _parse_address(args.upstream), args.latency_ms / 1000, bandwidth, listen=_parse_address(args.listen)
    )
    with proxy:
        signal.signal(signal.SIGUSR1, lambda *_: threading.Thread(target=proxy.cut).start())
        signal.signal(signal.SIGUSR2, lambda *_: threading.Thread(target=proxy.restore).start())
        print(json.dumps({"endpoint": proxy.endpoint, "upstream": list(proxy.upstream)}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command in ("cut", "refuse"):
                proxy.cut("refuse")
            elif command == "blackhole":
                proxy.cut("blackhole")
            elif command == "restore":
                proxy.restore()
            elif command == "quit":
                break
            elif command and command != "stats":
                print(json.dumps({"error": f"unknown command {command!r}"}), flush=True)
                continue
            print(json.dumps({"state": proxy.state, **proxy.stats()}), flush=True)
        else:  # stdin closed (run in the background): serve until a signal ends the process
            with contextlib.suppress(KeyboardInterrupt):
                threading.Event().wait()


if __name__ == "__main__":
    main()
