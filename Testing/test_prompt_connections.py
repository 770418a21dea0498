"""The AI client's kept-alive connections against upstream's web server (uvicorn, which closes a connection idle
for 5 s), with a round trip between them as through an SSH tunnel or a network."""

import asyncio
import threading
import time

import pytest

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from nninteractive_server import free_port  # noqa: E402
from SegmentationMachineLib.prompts import remote  # noqa: E402

ONE_WAY_S = 0.1


async def _answer(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b"{}"})


def _delayed_relay(listen_port: int, server_port: int):
    """A TCP relay that delays every chunk (and the close) by ONE_WAY_S each way."""
    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                await asyncio.sleep(ONE_WAY_S)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            await asyncio.sleep(ONE_WAY_S)
            writer.close()

    async def relay(client_reader, client_writer):
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", server_port)
        await asyncio.gather(pipe(client_reader, server_writer), pipe(server_reader, client_writer))

    async def main():
        async with await asyncio.start_server(relay, "127.0.0.1", listen_port) as server:
            await server.serve_forever()

    asyncio.run(main())


def test_a_prompt_after_almost_five_idle_seconds_does_not_meet_a_connection_the_server_is_closing():
    """Kept alive as long as uvicorn keeps it (5 s), a request sent 4.9 s later crossed the server's close on the way
    and failed ("Server disconnected without sending a response"): the prompt failed and the model forgot the earlier
    ones."""
    assert uvicorn.Config(_answer).timeout_keep_alive == 5  # what upstream's server runs with (its defaults)
    server_port, relay_port = free_port(), free_port()
    threading.Thread(target=uvicorn.run, args=(_answer,), kwargs=dict(host="127.0.0.1", port=server_port,
                                                                      log_level="warning"), daemon=True).start()
    threading.Thread(target=_delayed_relay, args=(relay_port, server_port), daemon=True).start()
    transport = remote._GuardedTransport(remote._AnswerGuard(lambda: 1 << 20))
    with httpx.Client(base_url=f"http://127.0.0.1:{relay_port}", transport=transport, trust_env=False,
                      timeout=10) as client:
        for _ in range(50):
            try:
                client.post("/", content=b"first")
                break
            except httpx.TransportError:
                time.sleep(0.1)  # the server is still starting
        time.sleep(4.9)
        assert client.post("/", content=b"second").status_code == 200
