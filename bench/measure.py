"""Measurements, each in its own process: bench/run.py starts `python bench/measure.py '<json spec>'`,
so every engine starts from empty memory and frees all of it when done.

A one-shot worker (bandwidth, quality) prints its result as one JSON line after RESULT_MARK. A speed
worker (gemma4, llama.cpp, transformers) loads its engine and then times one repetition per request
(see serve). Loading is never timed; each repetition prefills the same prompt ids into an empty cache,
then decodes greedily, one token per step.
"""

from __future__ import annotations

import inspect
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

RESULT_MARK = "@@bench-result@@ "
READY_MARK = "@@bench-ready@@ "
WARMUP_PROMPT, WARMUP_DECODE = 16, 4  # one untimed run first: first calls allocate and pick kernels


# ---- bytes of weights a decode step reads --------------------------------------------------------
def _active_bytes(sizes: dict[str, int], config) -> int:
    """Bytes read per decoded token, given our tensor name -> bytes: everything once, the experts in
    the proportion top_k / num_experts, the LM head whole (the tied embedding, or lm_head plus one
    embedding row)."""
    share = config.top_k_experts / config.num_experts if config.enable_moe_block else 1.0
    total = 0.0
    for name, n in sizes.items():
        if ".experts." in name:
            total += n * share
        elif name.startswith("embed_tokens.") and "lm_head.weight" in sizes:
            total += n / config.vocab_size  # one row looked up; the logits read lm_head
        else:
            total += n
    return int(total)


def file_weights(path: str | Path) -> dict:
    """Total and active-per-token bytes of a checkpoint's weights, from the file's own tensor sizes."""
    from gemma4.checkpoint import open_checkpoint
    from gemma4.checkpoint import names

    path = Path(path)
    ckpt = open_checkpoint(path)
    sizes: dict[str, int] = {}
    if path.suffix == ".gguf":
        for gguf_name, t in ckpt.file.tensors.items():
            sizes[names.from_gguf(gguf_name) or gguf_name] = int(t.n_bytes)
        types = ckpt.tensor_types()
    else:
        types = {}
        for f in sorted(path.glob("*.safetensors")):
            with open(f, "rb") as fh:
                header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                name = next((key[len(p):] for p in names.HF_PREFIXES if key.startswith(p)), key)
                sizes[name] = end - start
                types[info["dtype"]] = types.get(info["dtype"], 0) + 1
    return {"total_bytes": sum(sizes.values()), "active_bytes": _active_bytes(sizes, ckpt.config), "types": types}


def resident_active_bytes(decoder) -> int:
    """What gemma4 itself reads per decoded token: its weights as they sit in memory."""
    seen, sizes = set(), {}
    for name, t in decoder.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        sizes[name] = t.numel() * t.element_size()
    return _active_bytes(sizes, decoder.config)


# ---- workers ------------------------------------------------------------------------------------
def bandwidth(spec: dict) -> dict:
    """Read bandwidth: the sum of a large float32 tensor, `threads` threads, median of `reps`."""
    torch.set_num_threads(spec.get("threads", 2))
    x = torch.ones(spec.get("mib", 1024) * (1 << 18), dtype=torch.float32)  # touched, so its pages exist
    x.sum()
    runs = []
    for _ in range(spec.get("reps", 7)):
        t = time.perf_counter()
        x.sum()
        runs.append(x.nbytes / (time.perf_counter() - t) / 1e9)
    return {"gb_per_s": statistics.median(runs), "runs": runs, "mib": spec.get("mib", 1024)}


def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def _gemma4_dtype(path: str, dtype: str, quantize: str | None) -> str:
    """`auto`: the file's own dtype for a bf16 checkpoint (bf16 weights are read by the native kernel at
    decode and widened per matrix at prefill), else float32 (GGUF: the quantised matrices' activations)
    when it fits in 80% of the available memory, else bfloat16; an error line when the chosen dtype
    does not fit (the machine is shared: better no figure than a swap storm)."""
    if quantize:
        return "float32" if dtype == "auto" else dtype
    from gemma4.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    params = sum(int(np.prod(ckpt.shape(n))) for n in ckpt.names())
    room = 0.8 * _mem_available()
    if dtype == "auto":
        stored_bf16 = not str(path).endswith(".gguf") and "BF16" in ckpt.tensor_types()
        dtype = "bfloat16" if stored_bf16 or params * 4 >= room else "float32"
    need = params * (4 if dtype == "float32" else 2)
    if need > room:
        raise SystemExit(f"gemma4 in {dtype} needs {need / 1e9:.1f} GB, more than 80% of the "
                         f"{_mem_available() / 1e9:.1f} GB available now")
    return dtype


def load_gemma4(spec: dict):
    import gemma4

    quantize = spec.get("quantize")
    dtype = _gemma4_dtype(spec["path"], spec.get("dtype", "auto"), quantize)
    kwargs = {"dtype": dtype, "progress": False}
    if quantize:
        if "quantize" not in inspect.signature(gemma4.load).parameters:
            raise SystemExit(f"--quantize {quantize}: this gemma4 has no quantize option in gemma4.load() yet")
        kwargs["quantize"] = quantize
    if "prefix_cache_bytes" in inspect.signature(gemma4.load).parameters:
        kwargs["prefix_cache_bytes"] = 0  # every repetition sends the same prompt: each must prefill it whole
    t = time.perf_counter()
    model = gemma4.load(spec["path"], **kwargs)
    return model, {"dtype": dtype, "quantize": quantize, "load_s": time.perf_counter() - t}


def _gemma4_run(model, ids: list[int], decode: int) -> tuple[float, float]:
    stream = model.generate(ids, max_tokens=decode + 1, temperature=0, ignore_eos=True, stream=True)
    t0 = time.perf_counter()
    next(stream)  # prefill, then the first token from its logits
    t1 = time.perf_counter()
    steps = sum(1 for _ in stream)  # each step: one token through the model, its logits, the pick
    t2 = time.perf_counter()
    assert steps == decode, (steps, decode)
    return t1 - t0, t2 - t1


def gemma4_session(spec: dict):
    torch.set_num_threads(spec["threads"])
    model, info = load_gemma4(spec)
    info.update(resident_active_bytes=resident_active_bytes(model.decoder), threads=torch.get_num_threads())
    return info, lambda ids, decode: _gemma4_run(model, ids, decode)


def llamacpp_session(spec: dict):
    import llama_cpp

    n_ctx = len(spec["ids"]) + spec["decode"] + 16
    t = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["path"], n_ctx=n_ctx, n_batch=len(spec["ids"]), n_ubatch=len(spec["ids"]),
                          n_threads=spec["threads"], n_threads_batch=spec["threads"], verbose=False, seed=0)
    load_s = time.perf_counter() - t
    n_vocab = llm.n_vocab()

    def pick() -> int:  # greedy, on the last position's logits (all llama.cpp keeps without logits_all)
        row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(row.argmax())

    def run(prompt: list[int], n: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = pick()
        t1 = time.perf_counter()
        for _ in range(n):
            llm.eval([tok])
            tok = pick()
        return t1 - t0, time.perf_counter() - t1

    return {"load_s": load_s, "threads": spec["threads"]}, run


def transformers_session(spec: dict):
    from transformers import Gemma4ForCausalLM

    torch.set_num_threads(spec["threads"])
    need = sum(f.stat().st_size for f in Path(spec["path"]).glob("*.safetensors"))  # bf16, as stored
    if need > 0.8 * _mem_available():
        raise SystemExit(f"transformers in bfloat16 needs {need / 1e9:.1f} GB, more than 80% of the "
                         f"{_mem_available() / 1e9:.1f} GB available now")
    t = time.perf_counter()
    model = Gemma4ForCausalLM.from_pretrained(spec["path"], dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t

    @torch.inference_mode()
    def run(prompt: list[int], n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        out = model(input_ids=torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        t1 = time.perf_counter()
        cache = out.past_key_values
        for _ in range(n):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
        return t1 - t0, time.perf_counter() - t1

    return {"load_s": load_s, "dtype": "bfloat16", "threads": torch.get_num_threads()}, run


SESSIONS = {"gemma4": gemma4_session, "llama.cpp": llamacpp_session, "transformers": transformers_session}


def serve(spec: dict) -> None:
    """Load the engine, warm it up, print READY_MARK and its facts; then time one repetition per
    `run` line on stdin (printing RESULT_MARK [prefill_s, decode_s]) until `quit` or end of input.
    run.py drives two of these in turn, so gemma4 and its peer share whatever else the machine does."""
    info, run = SESSIONS[spec["worker"]](spec)
    run(spec["ids"][:WARMUP_PROMPT], WARMUP_DECODE)
    print(READY_MARK + json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        print(RESULT_MARK + json.dumps(run(spec["ids"], spec["decode"])), flush=True)


def embedded_quality(spec: dict) -> dict:
    """Teacher-forced top-1 agreement and KL divergence from llama.cpp's logits (parity_llamacpp's
    method), for gemma4 loaded as it is benchmarked."""
    import parity_llamacpp

    torch.set_num_threads(spec["threads"])
    model, info = load_gemma4(spec)
    llm = parity_llamacpp._llama(Path(spec["path"]))
    tf = parity_llamacpp.teacher_forced(model, llm, Path(spec["text"]).read_text())
    return {**info, **tf}


WORKERS = {"bandwidth": bandwidth, "quality": embedded_quality}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec["worker"] in SESSIONS:
        serve(spec)
    else:
        print(RESULT_MARK + json.dumps(WORKERS[spec["worker"]](spec)), flush=True)


if __name__ == "__main__":
    main()
