"""Soak: `gemma4 serve` under a bounded mixed load on loopback, then the same greedy probes as before it.

    .venv/bin/python bench/soak.py [--seconds 90] [--threads 16] [--flood-seconds 20] [--model PATH]

Starts the server (the embedded model by default, --parallel 8 --max-queue 32, prefix reuse on), answers
greedy probes, then sends floods of refused requests (malformed bodies, prompts over the context) twice,
then `--threads` clients for `--seconds`: chat streamed to the end, streams dropped after a few lines,
sampled and greedy chat and completions of 3-200 random words, malformed bodies, prompts over the
context. Afterwards the probes must give the same text, no answer may be a 5xx or hang, and the
server's resident memory is read (from /proc) before and after each phase. Prints a table and writes
bench/SOAK.md; exits 1 when a probe changed, a 5xx came back or a request hung.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
WORDS = (HERE / "data" / "english.txt").read_text().split()
TIMEOUT = 120.0  # seconds one request may take before it counts as hung
REFUSED = ("bad json", "missing field", "wrong type", "over context")

PROBES = [
    ("completion", "The capital of France is", 16),
    ("completion", " ".join(f"Item {i} is a small {['red', 'blue', 'green'][i % 3]} box." for i in range(60))
     + "\nWhich item is blue?", 12),  # a document: past one prefill chunk, reused by the second probe
    ("completion", " ".join(f"Item {i} is a small {['red', 'blue', 'green'][i % 3]} box." for i in range(60))
     + "\nHow many boxes are green?", 12),
    ("chat", "Name three colours.", 12),
]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def probe(client: httpx.Client, url: str, cached: list | None = None) -> list[str]:
    """The probes' texts; `cached` gets each one's prompt tokens whose KV was reused."""
    out = []
    for kind, text, n in PROBES:
        chat = kind == "chat"
        body = {"messages": [{"role": "user", "content": text}]} if chat else {"prompt": text}
        r = client.post(url + ("/v1/chat/completions" if chat else "/v1/completions"),
                        json={**body, "max_tokens": n, "temperature": 0}, timeout=TIMEOUT)
        r.raise_for_status()
        answer = r.json()
        out.append(answer["choices"][0]["message"]["content"] if chat else answer["choices"][0]["text"])
        if cached is not None:
            cached.append(answer["usage"]["prompt_tokens_details"]["cached_tokens"])
    return out


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: collections.Counter = field(default_factory=collections.Counter)  # (kind, status class)
    hung: int = 0
    issued: int = 0
    errors: list = field(default_factory=list)

    def issue(self) -> int:
        """A number for the next request (refused kinds take turns by it)."""
        with self.lock:
            self.issued += 1
            return self.issued - 1

    def add(self, kind: str, status: int | str) -> None:
        with self.lock:
            self.counts[(kind, status if isinstance(status, str) else f"{status // 100}xx")] += 1

    def total(self, status: str | None = None) -> int:
        return sum(n for (_, s), n in self.counts.items() if status is None or s == status)


def _words(rng: random.Random, lo: int = 3, hi: int = 200) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def refused(client: httpx.Client, url: str, rng: random.Random, tally: Tally, long_prompt: str) -> None:
    """One request the server must refuse with a 4xx; the kinds take turns."""
    kind = REFUSED[tally.issue() % len(REFUSED)]
    if kind == "bad json":
        r = client.post(url + "/v1/chat/completions", content=b'{"messages": [', timeout=TIMEOUT,
                        headers={"content-type": "application/json"})
    elif kind == "missing field":
        r = client.post(url + "/v1/completions", json={"max_tokens": 4}, timeout=TIMEOUT)
    elif kind == "wrong type":
        r = client.post(url + "/v1/chat/completions", json={"messages": "hello", "max_tokens": "x"}, timeout=TIMEOUT)
    else:
        r = client.post(url + "/v1/completions", json={"prompt": long_prompt, "max_tokens": 4}, timeout=TIMEOUT)
    tally.add(kind, r.status_code)
    if not 400 <= r.status_code < 500:
        tally.errors.append(f"{kind}: {r.status_code} {r.text[:200]}")


def mixed(client: httpx.Client, url: str, rng: random.Random, tally: Tally, long_prompt: str) -> None:
    """One request of the mix."""
    tally.issue()
    x = rng.random()
    sampled = rng.random() < 0.5
    params = {"max_tokens": rng.randint(4, 24), "temperature": 0.8 if sampled else 0, "seed": rng.randrange(1000)}
    if x < 0.3:  # chat streamed to the end, or dropped after a few lines
        drop = rng.random() < 0.5
        body = {"messages": [{"role": "user", "content": _words(rng)}], "stream": True, **params}
        kind = "chat stream dropped" if drop else "chat stream"
        with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=TIMEOUT) as r:
            lines = 0
            for line in r.iter_lines():
                lines += line.startswith("data:")
                if drop and lines >= rng.randint(1, 3):
                    break
        tally.add(kind, r.status_code)
    elif x < 0.55:
        r = client.post(url + "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": _words(rng)}], **params}, timeout=TIMEOUT)
        tally.add("chat", r.status_code)
    elif x < 0.85:
        r = client.post(url + "/v1/completions", json={"prompt": _words(rng), **params}, timeout=TIMEOUT)
        tally.add("completion", r.status_code)
    else:
        refused(client, url, rng, tally, long_prompt)
        return
    if r.status_code >= 500:
        tally.errors.append(f"{r.status_code}: {r.text[:200] if not r.is_stream_consumed else ''}")


def load(url: str, seconds: float, threads: int, seed: int, work, long_prompt: str,
         requests: int | None = None) -> Tally:
    """`threads` clients each running `work` until `seconds` have passed (or `requests` were sent); a
    request past TIMEOUT is hung."""
    tally = Tally()
    deadline = time.monotonic() + seconds

    def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client() as client:
            while time.monotonic() < deadline and (requests is None or tally.issued < requests):
                try:
                    work(client, url, rng, tally, long_prompt)
                except httpx.TimeoutException:
                    with tally.lock:
                        tally.hung += 1
                except httpx.HTTPError as e:
                    tally.errors.append(f"{type(e).__name__}: {e}")

    pool = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(seconds + 2 * TIMEOUT)
    return tally


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "gemma4.cli", "serve", "--port", str(port), "--parallel", "8", "--max-queue", "32"]
    if model:
        cmd += ["-m", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start in 180 s")


def soak(seconds: float, threads: int, flood_seconds: float, model: str | None = None, seed: int = 0,
         flood_requests: int | None = None) -> dict:
    """Runs the phases against a fresh server; returns the figures (see the module docstring). A flood
    lasts flood_seconds, or until flood_requests were sent."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(model, port)
    try:
        with httpx.Client() as client:
            long_prompt = " ".join(WORDS) * (40_000 // len(WORDS) + 1)  # past the embedded model's 32K context
            cached_before, cached_after = [], []
            before = probe(client, url, cached_before)
            rss = {"start": rss_bytes(proc.pid)}
            floods = []
            for i in range(2):
                floods.append(load(url, flood_seconds, threads, seed + 100 + i, refused, long_prompt, flood_requests))
                rss[f"after refused flood {i + 1}"] = rss_bytes(proc.pid)
            mix = load(url, seconds, threads, seed, mixed, long_prompt)
            rss["after mixed load"] = rss_bytes(proc.pid)
            after = probe(client, url, cached_after)
            floods.append(load(url, flood_seconds, threads, seed + 102, refused, long_prompt, flood_requests))
            rss["after refused flood 3"] = rss_bytes(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"before": before, "after": after, "rss": rss, "floods": floods, "mix": mix, "alive": alive,
            "cached": (cached_before, cached_after), "seconds": seconds, "threads": threads, "flood_seconds": flood_seconds}


def report(res: dict) -> tuple[str, bool]:
    mix, floods, rss = res["mix"], res["floods"], res["rss"]
    tallies = [*floods, mix]
    five = sum(t.total("5xx") for t in tallies)
    hung = sum(t.hung for t in tallies)
    errors = [e for t in tallies for e in t.errors]
    same = res["before"] == res["after"]
    ok = same and five == 0 and hung == 0 and not errors and res["alive"]
    mib = lambda b: f"{b / 2**20:.0f} MiB"  # noqa: E731
    lines = [f"# Soak ({time.strftime('%Y-%m-%d %H:%M')}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs)", "",
             f"`python bench/soak.py --seconds {res['seconds']:g} --threads {res['threads']} "
             f"--flood-seconds {res['flood_seconds']:g}`: the embedded model under `gemma4 serve --parallel 8 "
             "--max-queue 32` (prefix reuse on).", "",
             "| phase | requests | by kind and status | server RSS after |", "|---|---|---|---|"]
    phases = [("refused flood 1", floods[0], "after refused flood 1"), ("refused flood 2", floods[1], "after refused flood 2"),
              ("mixed load", mix, "after mixed load"), ("refused flood 3", floods[2], "after refused flood 3")]
    lines.append(f"| start (after the probes) | | | {mib(rss['start'])} |")
    for name, t, key in phases:
        kinds = ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(t.counts.items()))
        lines.append(f"| {name} | {t.total()} | {kinds} | {mib(rss[key])} |")
    lines += ["", f"- probes after the load equal those before: **{same}** ({len(res['before'])} greedy requests)",
              f"- 5xx answers: {five}; hung requests: {hung}; client errors: {len(errors)}; server alive: {res['alive']}",
              f"- RSS growth over the second refused flood: {mib(rss['after refused flood 2'] - rss['after refused flood 1'])}"
              f" ({floods[1].total()} requests); over the mixed load: "
              f"{mib(rss['after mixed load'] - rss['after refused flood 2'])}; over the third flood: "
              f"{mib(rss['after refused flood 3'] - rss['after mixed load'])}",
              f"- the probes' prompt tokens reused from the prefix store, before / after the load: "
              f"{res['cached'][0]} / {res['cached'][1]}"]
    if not same:
        lines += ["", "before: " + json.dumps(res["before"]), "after: " + json.dumps(res["after"])]
    lines += [f"- error: {e}" for e in errors[:10]]
    return "\n".join(lines) + "\n", ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=90)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--flood-seconds", type=float, default=20)
    p.add_argument("--model", help="a model path (default: the embedded model)")
    p.add_argument("--out", default=str(HERE / "SOAK.md"))
    args = p.parse_args(argv)
    text, ok = report(soak(args.seconds, args.threads, args.flood_seconds, args.model))
    print(text)
    Path(args.out).write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
