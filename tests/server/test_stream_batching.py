"""Outputs reach the event loop in bursts: one wake-up for all the outputs the engine thread emitted before
the loop ran, and a step's outputs of one HTTP request framed and written together, in order."""

import asyncio
import json
import threading

import httpx

from gemma4.server.backend import Mailbox
from test_server import LiveServer, embedded, server  # noqa: F401


class Box:
    def __init__(self):
        self.ready = asyncio.Event()


def test_one_wakeup_per_burst():
    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a: (calls.append(a), real(*a))[1]
        box = Mailbox(loop)
        outputs = [Box() for _ in range(8)]
        engine = threading.Thread(target=lambda: [box.post(o) for o in outputs])
        engine.start()
        engine.join()  # the loop is held here: all eight arrive before it can run
        assert len(calls) == 1
        await asyncio.sleep(0)
        assert all(o.ready.is_set() for o in outputs)
        box.post(outputs[0])  # a later output wakes the loop again
        assert len(calls) == 2
        await asyncio.sleep(0)
        assert not box.dirty and not box.scheduled

    asyncio.run(main())


def test_several_choices_of_one_request_stream_whole(server, embedded):  # noqa: F811
    """n=3 greedy choices decode in the same steps: their chunks come framed together and every one parses."""
    body = {"model": "gemma3-270m", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0,
            "n": 3, "stream": True}
    texts = ["", "", ""]
    done = False
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith("data: ")
            if line == "data: [DONE]":
                done = True
                continue
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] += choice["text"]
    assert done
    expected = embedded.generate("The capital of France is", max_tokens=12, temperature=0).text
    assert texts == [expected] * 3
