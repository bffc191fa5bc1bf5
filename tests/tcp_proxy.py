"""A TCP forwarder in its own process, standing in for an S3 endpoint that goes away: the
test kills it (SIGKILL) and starts it again on the same port while the bucket behind it (a moto
server in the test process) keeps its objects. Run as ``python tcp_proxy.py LISTEN_PORT
TARGET_PORT``; ``Proxy`` starts and stops one."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def _serve(listen: int, target: int) -> None:
    async def handle(reader, writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", listen, reuse_address=True)
    async with server:
        await server.serve_forever()


class Proxy:
    """``127.0.0.1:listen`` -> ``127.0.0.1:target``, in a child process."""

    def __init__(self, listen: int, target: int) -> None:
        self.listen, self.target = listen, target
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Proxy":
        self.proc = subprocess.Popen([sys.executable, __file__, str(self.listen),
                                      str(self.target)])
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.listen), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the proxy did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
