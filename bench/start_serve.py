"""Start-up and serving against llama.cpp, from one run, on the embedded Gemma 3 270M Q4_K_M.

    .venv/bin/python bench/start_serve.py [--runs 5] [--tokens 128] [--clients 8] [--threads 2]

- cold start: a new process to its first generated token and exit, `gemma4 run -n 1` against llama-cpp-python
  loading the same file and generating one token (medians of --runs, the two in turn); `gemma4 --help`;
  `import gemma4`;
- one client: decode tokens per second of one streamed greedy completion (--tokens) through `gemma4 serve`,
  against `gemma4.load(...).generate(stream=True)` in a process of its own; llama-server's the same way;
- --clients concurrent clients: their tokens over the wall time from the first request to the last answer,
  `gemma4 serve` against llama-server `-np <clients>` on the same file.

Every engine gets --threads threads (OMP_NUM_THREADS, llama's -t). llama-server is built once from the
llama-cpp-python sdist's vendored llama.cpp (prepare.llama_cmake_args flags) and kept under
$GEMMA4_BENCH_CACHE/llama-server; without it, its rows are skipped with the reason.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import prepare  # noqa: E402

PY = sys.executable
PROMPT = "The history of the Roman Empire began"  # a base model continues it well past 128 tokens
LLAMA_CPP_VERSION = "0.3.36"

LLAMA_FIRST_TOKEN = """
import sys
import llama_cpp
m = llama_cpp.Llama(sys.argv[1], n_threads=int(sys.argv[2]), n_ctx=512, verbose=False)
for c in m(sys.argv[3], max_tokens=1, temperature=0.0, stream=True):
    print(c["choices"][0]["text"], flush=True)
"""

IN_PROCESS = """
import json, sys, time
import gemma4
model = gemma4.load(sys.argv[1], progress=False)
n = int(sys.argv[3])
list(model.generate(sys.argv[2], max_tokens=8, temperature=0.0, stream=True))  # first calls pick kernels
rates = []
for _ in range(3):  # the median of three, as the server's
    stamps = [time.perf_counter() for _ in model.generate(sys.argv[2], max_tokens=n, temperature=0.0, stream=True,
                                                           ignore_eos=True)]
    rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
print(json.dumps({"rate": sorted(rates)[1]}))
"""


def env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}


def timed(cmd: list[str], threads: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds: user + system) of one run of cmd. CPU time moves less than wall time
    on a shared machine."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, env=env(threads), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def medians(cmds: dict[str, list[str]], runs: int, threads: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds of each command, run in turn (one warm-up each first: the page cache)."""
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for i in range(runs + 1):
        for k, cmd in cmds.items():
            t = timed(cmd, threads)
            if i:
                times[k].append(t)
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in times.items()}


# ---- llama-server -----------------------------------------------------------------------------
def llama_server_binary() -> Path | None:
    """llama-server built from the llama-cpp-python sdist's vendored llama.cpp, once (about 10 minutes on 2
    cores); None when it cannot be built here (the reason is printed)."""
    home = prepare.cache_dir() / "llama-server"
    binary = home / "llama-server"
    if binary.is_file():
        return binary
    src = prepare.cache_dir() / "llama-server-src"
    tree = src / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    try:
        if not tree.is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                subprocess.run([PY, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                                f"llama-cpp-python=={LLAMA_CPP_VERSION}"], check=True, capture_output=True)
                with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tar:
                    members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
                    tar.extractall(src, members=members, filter="data")
        build = src / "build"
        prepare.log("building llama-server (about 10 minutes)")
        subprocess.run(["cmake", "-S", str(tree), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                        *prepare.llama_cmake_args().split()], check=True, capture_output=True)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", "2"], check=True,
                       capture_output=True)
        home.mkdir(parents=True, exist_ok=True)
        for f in (build / "bin").iterdir():
            shutil.copy2(f, home / f.name, follow_symlinks=False)
    except (OSError, subprocess.CalledProcessError, StopIteration) as e:
        print(f"llama-server: not available ({e})", file=sys.stderr)
        return None
    return binary


# ---- servers and clients ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, cmd: list[str], port: int, threads: int, extra_env: dict | None = None):
        self.port = port
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, env={**env(threads), **(extra_env or {})}, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{cmd[0]} exited: {self.log.read()[-2000:].decode(errors='replace')}")
            try:
                if self._get("/v1/models") == 200 and self._get("/health") in (200, 404):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{cmd} did not start in 300 s")

    def _get(self, path: str) -> int:
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        c.request("GET", path)
        status = c.getresponse().status
        c.close()
        return status

    def stream(self, prompt: str, n: int) -> dict:
        """One streamed greedy completion: tokens (the usage count), the seconds from its first chunk to its
        last, and the wall seconds from the request to the last chunk."""
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0.0, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        start = time.perf_counter()
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        first = last = None
        tokens = 0
        for line in r:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if any(ch.get("text") for ch in chunk.get("choices", [])):
                last = time.perf_counter()
                first = first or last
        c.close()
        return {"tokens": tokens, "decode_s": (last or 0) - (first or 0), "wall_s": time.perf_counter() - start}

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def single(server: Server, n: int, repeats: int = 3) -> float:
    """The median decode rate of `repeats` streamed completions, one at a time."""
    rates = []
    for _ in range(repeats):
        r = server.stream(PROMPT, n)
        rates.append((r["tokens"] - 1) / r["decode_s"])
    return statistics.median(rates)


def concurrent(server: Server, n: int, clients: int) -> list[dict]:
    """Each client's result; clients stream distinct prompts (no shared prefix) at once."""
    results: list[dict] = []

    def client(p: str) -> None:
        results.append(server.stream(p, n))

    threads = [threading.Thread(target=client, args=(f"{PROMPT} (part {i + 1})",)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def aggregate(server: Server, n: int, clients: int) -> float:
    start = time.perf_counter()
    results = concurrent(server, n, clients)
    return sum(r["tokens"] for r in results) / (time.perf_counter() - start)


def warm(server: Server, clients: int) -> None:
    """Every slot used once first: llama-server's first answer in a slot is several times slower."""
    concurrent(server, 16, clients)
    server.stream(PROMPT, 16)


# ---- the report ---------------------------------------------------------------------------------
def row(name: str, ours: float | None, theirs: float | None, unit: str) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.3f}" if unit == "s" else f"{x:.1f}"

    ratio = "" if not ours or not theirs else f"{ours / theirs:.2f}x"
    return f"| {name} | {fmt(ours)} {unit} | {fmt(theirs)} {unit} | {ratio} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="start,serve", help="what to measure: start, serve, or both")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))

    from gemma4.native import isa

    model = str(prepare.embedded_gguf())
    t = args.threads
    load = os.getloadavg()
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {isa.describe()}; load {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f}; {t} threads each; model {Path(model).name}")

    rows = ["| what | gemma4 | llama.cpp | gemma4 / llama.cpp |", "|---|---|---|---|"]
    if "start" in parts:
        rows += start_rows(model, args.runs, t)
    if "serve" in parts:
        rows += serve_rows(model, args)
    print("\n".join(rows))
    load = os.getloadavg()
    print(f"load after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


def start_rows(model: str, runs: int, t: int) -> list[str]:
    # our modules byte-compiled first, as an installed package's are (llama_cpp's and torch's are): where
    # PYTHONDONTWRITEBYTECODE is set, a checkout would otherwise compile every module of ours on each start
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "gemma4")], check=True, stdout=subprocess.DEVNULL)
    starts = medians({"ours": [PY, "-m", "gemma4.cli", "run", "-n", "1", "--temp", "0", "Hello"],
                      "llama": [PY, "-c", LLAMA_FIRST_TOKEN, model, str(t), "Hello"],
                      "help": [PY, "-m", "gemma4.cli", "--help"],
                      "import": [PY, "-c", "import gemma4"]}, runs, t)
    return [row("cold start to the first token (run -n 1), wall", starts["ours"][0], starts["llama"][0], "s"),
            row("cold start to the first token (run -n 1), CPU", starts["ours"][1], starts["llama"][1], "s"),
            row("`gemma4 --help`, wall", starts["help"][0], None, "s"),
            row("`import gemma4`, wall", starts["import"][0], None, "s")]


def serve_rows(model: str, args) -> list[str]:
    t = args.threads
    inproc = json.loads(subprocess.run([PY, "-c", IN_PROCESS, model, PROMPT, str(args.tokens)], env=env(t),
                                       capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    in_rate = inproc["rate"]

    port = free_port()
    ours = Server([PY, "-m", "gemma4.cli", "serve", "--port", str(port), "--parallel", str(args.clients)], port, t)
    try:
        warm(ours, args.clients)
        our_single = single(ours, args.tokens)
        our_many = aggregate(ours, args.tokens, args.clients)
    finally:
        ours.close()

    llama_single = llama_many = None
    binary = llama_server_binary()
    if binary is not None:
        port = free_port()
        ctx = args.clients * (args.tokens + 64)
        llama = Server([str(binary), "-m", model, "--port", str(port), "-t", str(t), "-tb", str(t), "-np",
                        str(args.clients), "-c", str(ctx), "--no-webui"], port, t,
                       {"LD_LIBRARY_PATH": str(binary.parent)})
        try:
            warm(llama, args.clients)
            llama_single = single(llama, args.tokens)
            llama_many = aggregate(llama, args.tokens, args.clients)
        finally:
            llama.close()
    return [row("one client: decode, in process (`generate`)", in_rate, None, "tok/s"),
            row("one client: decode through the server", our_single, llama_single, "tok/s"),
            f"| one client: server / in process | {our_single / in_rate:.0%} | | |",
            row(f"{args.clients} clients: aggregate through the server", our_many, llama_many, "tok/s")]


if __name__ == "__main__":
    sys.exit(main())
