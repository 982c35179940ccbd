"""The command line: run, chat, serve, info, list, pull. Argument parsing and printing only."""

from __future__ import annotations

import argparse
import gc
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_RANK_FAILED = 3  # a rank of a split model died or stopped answering
RANK_FAILED_GRACE_S = 3.0  # for the error answers to reach the clients before the server exits


class CLIError(Exception):
    """Bad input at the command line: printed as one line, exit status 2."""


class _Unset(float):
    """A sampling default the user left: a store's parameters for the model (Ollama's) may replace it."""


class _UnsetInt(int):
    __doc__ = _Unset.__doc__


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file, HF checkpoint folder, or a name: in Ollama's store "
                                         "(gemma3:270m), the Hugging Face cache or LM Studio's (ORG/NAME[:QUANT], "
                                         "pulled from the Hub when missing), ours; hf://, ollama://, lmstudio:// "
                                         "name one store (default: the embedded Gemma 3 270M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight and activation dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: CUDA when present)")
    p.add_argument("--mmproj", metavar="FILE", help="the vision (and audio) tower of a GGUF model, as llama.cpp "
                                                    "ships it (an mmproj GGUF); HF multimodal folders carry their own")
    p.add_argument("--image-tokens", type=int, default=None, choices=[70, 140, 280, 560, 1120],
                   help="soft tokens per image at most (default: the model's, usually 280)")
    p.add_argument("--quantize", choices=["int4", "int8"], default=None,
                   help="quantise float weights at load (GGUF weights stay in their own quantised form)")
    p.add_argument("--max-memory", metavar="SIZE", default=None,
                   help="memory for the weights, e.g. 8GiB: the dense parts and the most used routed experts stay "
                        "resident, the other experts are read from the mapped file when routed to (MoE models)")
    p.add_argument("--verbose", action="store_true", help="report decode speed (and the expert hit rate under "
                                                          "--max-memory) on standard error")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="split attention heads, dense MLP, vocabulary and experts over N ranks (processes started "
                        "here, or torchrun's across machines; rank 0 runs the command)")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="N",
                   help="split the routed experts over N ranks (1 or the --tensor-parallel N)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", "--temp", type=float, default=_Unset(1.0), help="0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=_UnsetInt(64), help="0 disables (default 64)")
    p.add_argument("--top-p", type=float, default=_Unset(0.95), help="nucleus sampling (default 0.95)")
    p.add_argument("--min-p", type=float, default=_Unset(0.0), help="min-p sampling (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", help="system prompt (chat mode)")
    p.add_argument("--think", action="store_true", help="let the model think first, where its template supports it")
    p.add_argument("--thinking-budget", type=int, default=None, metavar="N",
                   help="think at most N tokens, then answer (the thought is closed for the model); implies "
                        "--think, 0 turns thinking off (default: unbounded; chat mode, Gemma 4)")


def _speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", type=int, default=0, metavar="K",
                   help="speculative decoding: draft up to K tokens per step and verify them in one forward "
                        "(same output; K adapts down when few are accepted; default 0: off)")
    p.add_argument("--draft-model", metavar="PATH",
                   help="the drafter for --speculative: a smaller model with the same tokenizer, or a Gemma 4 "
                        "assistant checkpoint (default: prompt lookup, copying from the prompt and output)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4", description="Run Gemma 4 (and Gemma 3) models locally.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one prompt, streaming")
    run.add_argument("prompt", nargs="?", help="the prompt; '-' reads it from standard input")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="use the chat format even if the model has no template")
    mode.add_argument("--raw", action="store_true", help="complete the raw text, no chat template")
    run.add_argument("--file", metavar="DOC", help="a document to use as context before the prompt ('-': standard "
                                                   "input)")
    run.add_argument("--prompt-cache", metavar="FILE", help="reuse the document's KV saved in FILE, or save it "
                                                            "there (made by this model only)")
    run.add_argument("--image", action="append", default=[], metavar="PATH",
                     help="an image (PNG, JPEG, WebP, GIF) shown before the prompt (repeatable)")
    run.add_argument("--video", action="append", default=[], metavar="PATH",
                     help="a video file (needs PyAV) or a folder of frames at 1 fps, sampled at 1 fps, at most "
                          "60 frames (repeatable)")
    run.add_argument("--audio", action="append", default=[], metavar="FILE",
                     help="an audio clip (WAV, FLAC, MP3, OGG; at most 30 s) heard before the prompt (repeatable; "
                          "models with an audio tower: E2B, E4B)")
    _model_args(run)
    _sampling_args(run)
    _speculative_args(run)

    chat = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _model_args(chat)
    _sampling_args(chat)
    _speculative_args(chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    _model_args(serve)
    _speculative_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--api-key", default=os.environ.get("GEMMA4_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $GEMMA4_API_KEY, else none)")
    serve.add_argument("--served-model-name", help="the model id clients use (default: the model's file name)")
    serve.add_argument("--parallel", "--max-num-seqs", type=int, default=8, dest="parallel",
                       help="sequences decoded together at most (default 8)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting beyond the running ones before 503 (default 64)")
    serve.add_argument("--allow-remote-images", action="store_true",
                       help="fetch http(s) image URLs that clients name (off: only data: URLs are accepted)")
    serve.add_argument("--kv-budget", metavar="SIZE", help="KV memory shared by running requests, e.g. 8GiB; a "
                                                           "request that does not fit waits (default: unbounded)")
    serve.add_argument("--kv-cache", default="float", choices=["float", "int8"],
                       help="KV storage: the model dtype, or int8 with a scale per 32 values (default float)")
    serve.add_argument("--prefix-cache-size", metavar="SIZE", default="2GiB",
                       help="memory for reusing the KV of shared prompt prefixes (default 2GiB; 0: off)")

    info = sub.add_parser("info", help="describe a model without running it")
    info.add_argument("model", nargs="?", help="GGUF file, HF folder or store name (default: the embedded model)")
    info.add_argument("--ctx", type=int, default=None, help="context length for the KV estimate (default: 8192 "
                                                            "and the model's maximum)")
    info.add_argument("--mmproj", metavar="FILE", help="a GGUF model's image/audio projector to describe with it "
                                                      "(default: the one its store keeps beside it)")

    sub.add_parser("list", help="models on disk: ours, Ollama's, the Hugging Face cache's, LM Studio's")

    pull = sub.add_parser("pull", help="download a model from the Hugging Face Hub into its cache")
    pull.add_argument("model", help="ORG/NAME, or ORG/NAME:QUANT for one quant of a GGUF repository (default "
                                    "Q4_K_M); the repository's mmproj comes along")
    return parser


# ---- helpers --------------------------------------------------------------------------------
def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(args, **engine):
    """engine: gemma4.load's engine options (run: no prefix store, a one-shot process never reuses one)."""
    import gemma4
    from gemma4 import store

    found = store.find(args.model, pull=True, note=_note)
    args.found = found
    _store_defaults(args, found.params)
    device = args.device
    dtype = args.dtype
    if dtype == "auto":
        import torch

        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dtype = "bfloat16" if cuda else "float32"
    ranks = dict(tensor_parallel=args.tensor_parallel, expert_parallel=args.expert_parallel)
    if ranks != dict(tensor_parallel=1, expert_parallel=1) and getattr(args, "prompt_cache", None):
        raise CLIError("--prompt-cache: a file holds one process's KV, not a split model's")
    try:
        return gemma4.load(found, dtype=dtype, device=device, mmproj=args.mmproj,
                           quantize=getattr(args, "quantize", None), max_memory=args.max_memory, **engine, **ranks)
    except ValueError as e:
        if "max_memory" not in str(e):
            raise
        raise CLIError(str(e).replace("max_memory", "--max-memory")) from None
    finally:
        _resume_gc(args)


class _Timed:
    """Wraps a stream of deltas: with --verbose, the decode speed (stream events after the first, one per token
    or so) and, under --max-memory, the expert hit rate, on standard error at the end."""

    def __init__(self, model, deltas, verbose: bool):
        self.model, self.deltas, self.verbose = model, deltas, verbose

    def __iter__(self):
        import time

        if not self.verbose:
            yield from self.deltas
            return
        residency = getattr(self.model.decoder, "residency", None)
        n, first = 0, None
        for d in self.deltas:
            if first is None:
                first = time.perf_counter()
                if residency is not None:
                    residency.reset_stats()  # the prompt's routing apart: the hit rate of decoding
            n += 1
            yield d
        if first is not None:
            elapsed = time.perf_counter() - first
            _note(f"\n[decode: {n - 1} steps in {elapsed:.2f} s, {(n - 1) / elapsed if elapsed else 0:.2f} tok/s]")
        if residency is not None:
            _note(f"[{residency.stats.line()}]")


def _store_defaults(args, params: dict) -> None:
    """Ollama's parameters for the model, where the command line left an option at its default."""
    for key in ("temperature", "top_k", "top_p", "min_p"):
        value, given = params.get(key), getattr(args, key, None)
        if isinstance(given, (_Unset, _UnsetInt)) and isinstance(value, (int, float)):
            setattr(args, key, float(value) if isinstance(given, _Unset) else int(value))
    stop = params.get("stop")
    if hasattr(args, "stop") and isinstance(stop, list):
        args.stop += [s for s in stop if isinstance(s, str) and s not in args.stop]


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, seed=args.seed, stop=args.stop)


def _check_sampling(args) -> None:
    """Checks the sampling options; settles --think from --thinking-budget (N > 0 implies it, 0 turns it off)."""
    from gemma4.sampling import SamplingParams

    try:
        SamplingParams(**_sampling(args), thinking_budget=args.thinking_budget)
    except ValueError as e:
        raise CLIError(str(e).replace("thinking_budget", "--thinking-budget")) from None
    if args.thinking_budget is not None:
        args.think = args.thinking_budget > 0
    _check_speculative(args)


def _thinking(model, args) -> dict:
    """model.chat()'s thinking options from the command line (checked against the model now)."""
    if args.thinking_budget is None:
        return dict(enable_thinking=args.think)
    if model.thought_tokens is None:
        raise CLIError(f"--thinking-budget: this model ({model.config.architecture}) has no thought channel")
    return dict(enable_thinking=args.think, thinking_budget=args.thinking_budget)


def _check_speculative(args) -> None:
    from gemma4.speculative import check_k

    try:
        check_k(args.speculative)
    except ValueError as e:
        raise CLIError(f"--speculative: {e}") from None
    if args.draft_model and not args.speculative:
        raise CLIError("--draft-model needs --speculative K")


def _speculation(model, args) -> dict:
    """generate()'s speculative options from the command line (the draft model loaded now)."""
    if not args.speculative:
        return {}
    from gemma4.speculative import drafter_for

    if args.draft_model is None:
        return dict(speculative=args.speculative)
    from gemma4 import store
    from gemma4.speculative.drafters import is_assistant

    if getattr(args, "tensor_parallel", 1) > 1 and is_assistant(store.resolve(args.draft_model)):
        raise CLIError("--draft-model: the Gemma 4 assistant reads the target's KV of every head, which tensor "
                       "parallelism splits over ranks (a draft model or prompt lookup works)")
    return dict(speculative=args.speculative, drafter=drafter_for(store.resolve(args.draft_model), model,
                                                                  quantize=getattr(args, "quantize", None)))


def _print_stream(deltas) -> None:
    """Prints content to stdout; a thought channel goes to stderr, dimmed when it is a terminal."""
    thinking = False
    dim = sys.stderr.isatty()
    for d in deltas:
        if d.kind == "reasoning":
            if not thinking:
                _note("\x1b[2m[thinking]" if dim else "[thinking]")
                thinking = True
            sys.stderr.write(d.text)
            sys.stderr.flush()
            continue
        if thinking:
            _note("\x1b[0m" if dim else "")
            thinking = False
        if d.kind == "tool_call":
            print(f"[tool call] {d.tool_call.name}({d.tool_call.arguments})", flush=True)
        else:
            sys.stdout.write(d.text)
            sys.stdout.flush()
    if thinking and dim:
        _note("\x1b[0m")


def _messages(system: str | None, history: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + history


def _media_parts(images: list[str], videos: list[str], audio: list[str] = ()) -> list[dict]:
    """Content parts for image, video and audio files, decoded now so that a bad file fails before the model
    loads."""
    if not images and not videos and not audio:
        return []
    from gemma4.audio_io import load_audio
    from gemma4.images import load_image
    from gemma4.video import load_video

    return ([{"type": "image", "image": load_image(p)} for p in images]
            + [{"type": "video", "video": load_video(p)} for p in videos]
            + [{"type": "audio", "audio": load_audio(p)} for p in audio])


def _user_message(text: str, media: list[dict]) -> dict:
    return {"role": "user", "content": media + [{"type": "text", "text": text}] if media else text}


def _note_media(model, messages: list[dict], args) -> None:
    prompt = model.chat_input(messages, enable_thinking=args.think, image_tokens=args.image_tokens)
    soft = sum(p.soft_tokens for p in getattr(prompt, "patches", []))
    _note(f"note: {len(getattr(prompt, 'patches', []))} images/frames/clips as {soft} soft tokens; "
          f"prompt of {len(prompt)} tokens")


# ---- commands -------------------------------------------------------------------------------
def _read_document(args) -> str | None:
    if args.file is None:
        return None
    if args.file == "-" and args.prompt == "-":
        raise CLIError("--file - and the prompt '-' cannot both read standard input")
    try:
        doc = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()
    except UnicodeDecodeError:
        raise CLIError(f"--file {args.file}: not UTF-8 text") from None
    except OSError as e:
        raise CLIError(f"--file {args.file}: {e.strerror}") from None
    if not doc.strip():
        raise CLIError(f"--file {args.file}: the document is empty")
    return doc


def _long_prompt(model, ids, head_ids, args) -> dict:
    """Generation options for a long prompt (token ids, or a multimodal prompt) whose head (the document,
    the images) is worth keeping: the prefill progress bar and the prompt cache."""
    from gemma4.engine import PREFILL_CHUNK

    run: dict = {}
    if sys.stderr.isatty() and len(ids) > PREFILL_CHUNK:
        from tqdm import tqdm

        bar = tqdm(total=len(ids), desc="prefill", unit="tok", leave=False, file=sys.stderr)

        def progress(done, total):
            bar.update(done - bar.n)
            if done >= total:
                bar.close()

        run["progress"] = progress
    if args.prompt_cache:
        from gemma4.kv import common_prefix
        from gemma4.engine.prompt_cache import PromptCache

        run["prompt_cache"] = PromptCache(args.prompt_cache, common_prefix(getattr(ids, "ids", ids), getattr(head_ids, "ids", head_ids)))
    return run


def _cache_note(run: dict) -> None:
    from gemma4.engine import PREFILL_CHUNK

    pc = run.get("prompt_cache")
    if pc is None:
        return
    if pc.reused:
        _note(f"prompt cache: reused {pc.reused} tokens from {pc.path}")
    if pc.saved:
        _note(f"prompt cache: saved {pc.saved} tokens to {pc.path}")
    elif not pc.reused:
        _note(f"prompt cache: nothing saved: the document is shorter than one prefill chunk ({PREFILL_CHUNK} tokens)")


def cmd_run(args) -> int:
    doc = _read_document(args)
    if args.prompt is None and doc is None:
        raise CLIError("no prompt: give one as an argument, or '-' to read standard input")
    prompt = (sys.stdin.read() if args.prompt == "-" else args.prompt) if args.prompt is not None else ""
    if not prompt.strip() and doc is None:
        raise CLIError("the prompt is empty")
    if args.prompt_cache and doc is None and not (args.image or args.video or args.audio):
        raise CLIError("--prompt-cache needs --file, --image, --video or --audio: it keeps the document's KV")
    question = prompt
    if doc is not None:
        prompt = doc + ("\n\n" + question if question.strip() else "")
    _check_sampling(args)
    if (args.image or args.video or args.audio) and args.raw:
        raise CLIError("--image, --video and --audio need the chat format: drop --raw")
    media = _media_parts(args.image, args.video, args.audio)
    model = _load(args, prefix_cache_bytes=0)
    if media:
        model.check_media(kinds={"audio" if "audio" in p else "vision" for p in media})
    speculation = _speculation(model, args)
    has_template = model.chat_template is not None
    use_chat = args.chat or (has_template and not args.raw) or bool(media)
    thinking = _thinking(model, args) if use_chat else {}
    if use_chat:
        if not has_template:
            _note(f"note: the model has no chat template; using the {model.config.architecture} turn format")
        messages = _messages(args.system, [_user_message(prompt, media)])
        if media:
            _note_media(model, messages, args)
        run = {}
        if doc is not None or args.prompt_cache:
            # the part worth keeping: the prompt without the question (the document, the images)
            head = _messages(args.system, [_user_message(doc or "", media)])
            run = _long_prompt(model, model.chat_input(messages, enable_thinking=args.think,
                                                       image_tokens=args.image_tokens),
                               model.chat_input(head, enable_thinking=args.think, image_tokens=args.image_tokens),
                               args)
        deltas = model.chat(messages, stream=True, image_tokens=args.image_tokens, **thinking, **_sampling(args),
                            **run, **speculation)
    else:
        if not args.raw:
            _note("note: the model has no chat template (a base model): completing the raw text; --chat uses the "
                  "turn format")
        if args.system or args.think or args.thinking_budget is not None:
            _note("note: --system, --think and --thinking-budget apply to chat mode only")
        from gemma4.chat import StreamEvent

        tok = model.tokenizer
        run = _long_prompt(model, tok.encode(prompt), tok.encode(doc), args) if doc is not None else {}
        deltas = (StreamEvent("content", c.text)
                  for c in model.generate(prompt, stream=True, **_sampling(args), **run, **speculation))
    if not use_chat:
        sys.stdout.write(question if doc is not None else prompt)  # a document is not echoed
    _print_stream(_Timed(model, deltas, args.verbose))
    print(flush=True)
    _cache_note(run)
    return 0


def cmd_chat(args) -> int:
    _check_sampling(args)
    model = _load(args)
    speculation = _speculation(model, args)
    thinking = _thinking(model, args)
    if model.chat_template is None:
        _note(f"note: the model has no chat template; using the {model.config.architecture} turn format "
              "(a base model chats poorly)")
    _note("chat: /image PATH, /video PATH and /audio PATH attach to your next message, /reset clears the history, "
          "/exit quits, Ctrl-C stops an answer")
    history: list[dict] = []
    attached: list[dict] = []
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            return 0
        if text == "/reset":
            history.clear()
            attached.clear()
            _note("(history cleared)")
            continue
        command, _, arg = text.partition(" ")
        if command in ("/image", "/video", "/audio") and arg.strip():
            try:
                model.check_media(kinds={"audio" if command == "/audio" else "vision"})
                attached += _media_parts([arg.strip()] if command == "/image" else [],
                                         [arg.strip()] if command == "/video" else [],
                                         [arg.strip()] if command == "/audio" else [])
            except ValueError as e:
                _note(f"error: {e}")
                continue
            _note(f"({len(attached)} attached to your next message)")
            continue
        if text.startswith("/"):
            _note("commands: /image PATH, /video PATH, /audio PATH, /reset, /exit")
            continue
        history.append(_user_message(line, attached))
        attached = []
        answer = []
        try:
            for d in _Timed(model, model.chat(_messages(args.system, history), stream=True,
                                              image_tokens=args.image_tokens, **thinking, **_sampling(args),
                                              **speculation), args.verbose):
                if d.kind == "content":
                    answer.append(d.text)
                _print_stream([d])
        except KeyboardInterrupt:
            _note("\n(stopped)")
        except ValueError as e:  # e.g. an image the model cannot take: the turn is dropped, the chat goes on
            history.pop()
            _note(f"error: {e}")
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(answer)})


def cmd_serve(args) -> int:
    if not 0 < args.port < 65536:
        raise CLIError(f"--port must be in 1..65535, got {args.port}")
    if args.parallel < 1 or args.max_queue < 0:
        raise CLIError("--parallel must be at least 1 and --max-queue at least 0")
    _check_speculative(args)
    from gemma4.kv import parse_bytes
    from gemma4.server import serve

    try:
        engine = dict(kv_budget=parse_bytes(args.kv_budget) if args.kv_budget else None, kv_cache=args.kv_cache,
                      prefix_cache_bytes=parse_bytes(args.prefix_cache_size))
    except ValueError as e:
        raise CLIError(f"--kv-budget / --prefix-cache-size: {e}") from None
    model = _load(args)
    failed = _exit_when_a_rank_fails(model)
    engine.update(_speculation(model, args))
    if args.verbose:
        _report_residency(model)
    name = args.served_model_name or (_model_id(args.model) if args.found.source == "path" else args.found.name)
    _note(f"serving {name!r} on http://{args.host}:{args.port}/v1" + (" (API key required)" if args.api_key else ""))
    _note(f"chat page: http://{args.host}:{args.port}/")
    serve(model, model_name=name, host=args.host, port=args.port, api_key=args.api_key, max_batch=args.parallel,
          max_queue=args.max_queue, allow_remote_images=args.allow_remote_images, **engine)
    if failed:
        _note(f"error: {failed[0]}")
        return EXIT_RANK_FAILED
    return 0


def _report_residency(model, every: float = 30.0) -> None:
    """serve --verbose under --max-memory: the expert hit rate on standard error every `every` seconds of use."""
    import threading

    residency = getattr(model.decoder, "residency", None)
    if residency is None:
        return

    def loop():
        seen = -1
        while True:
            threading.Event().wait(every)
            if residency.stats.uses != seen:
                seen = residency.stats.uses
                _note(f"[{residency.stats.line()}]")

    threading.Thread(target=loop, daemon=True, name="residency-report").start()


def _exit_when_a_rank_fails(model) -> list[str]:
    """A split model: when a rank dies or hangs, the requests in flight end with an error (the engine fails them
    as its collective fails) and, a grace period later, the server exits EXIT_RANK_FAILED."""
    link = getattr(model.decoder, "link", None)
    failed: list[str] = []
    if link is None:
        return failed

    def shut_down(reason: str) -> None:
        import threading

        failed.append(reason)
        _note(f"error: {reason}; the server stops")
        threading.Timer(RANK_FAILED_GRACE_S, lambda: os._exit(EXIT_RANK_FAILED)).start()

    link.on_failure.append(shut_down)
    return failed


def _model_id(spec: str) -> str:
    from pathlib import Path

    path = Path(spec)
    return path.stem if path.suffix == ".gguf" else path.name or spec


def cmd_info(args) -> int:
    from gemma4.info import describe

    return describe(args.model, ctx=args.ctx, mmproj=getattr(args, "mmproj", None))


def cmd_list(args) -> int:
    from gemma4 import store
    from gemma4.info import human

    print(f"{store.EMBEDDED_NAME:<24} embedded default (Gemma 3 270M, Q4_K_M GGUF)")
    models = store.list_models()
    for m in models:
        vision = " +mmproj" if m.mmproj else ""
        print(f"{m.name:<24} {m.source:<8} {m.kind:<4} {human(m.size):>10}  {m.path}{vision}")
    if not models:
        print(f"(no models in {store.store_dir()}, Ollama's store, the Hugging Face cache or LM Studio's folder: "
              f"`gemma4 pull ORG/NAME` fetches one)")
    return 0


def cmd_pull(args) -> int:
    from gemma4.stores import pull

    found = pull.pull(args.model, note=_note)
    print(f"{found.name}  {found.path}" + (f"  (mmproj {found.mmproj})" if found.mmproj else ""))
    return 0


COMMANDS = {"run": cmd_run, "chat": cmd_chat, "serve": cmd_serve, "info": cmd_info, "list": cmd_list,
            "pull": cmd_pull}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gemma4.errors import ModelLoadError

    # Start-up makes ~1M objects that live as long as the process (torch's modules, a 262K-token vocabulary):
    # the cyclic collector walking them again and again while they are made costs ~10% of a cold start and
    # frees nothing. It is off until the model is loaded (_load), or the command ends; not for a split model,
    # whose other ranks never return from loading.
    args.gc_paused = (args.command in ("run", "chat", "serve") and gc.isenabled()
                      and getattr(args, "tensor_parallel", 1) == 1 and getattr(args, "expert_parallel", 1) == 1)
    args.own_process = argv is None  # the process's own command line (not a caller's list): it ends with it
    if args.gc_paused:
        gc.disable()
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader went away (`gemma4 run ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, ModelLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as e:
        from gemma4.distributed.comm import DistributedError

        if not isinstance(e, DistributedError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_RANK_FAILED
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        _resume_gc(args)
        if args.own_process:
            gc.freeze()  # the interpreter's collections at exit would walk it all (~0.4 s after torch) to free nothing


def _resume_gc(args) -> None:
    """The collector back on after loading. In the command's own process what start-up made lives as long as the
    process, so it is frozen first: later collections (a server's, a chat's) skip it. (Not for a caller's
    main(list): a model it drops later may need the collector to be freed.)"""
    if getattr(args, "gc_paused", False):
        args.gc_paused = False
        if args.own_process:
            gc.freeze()
        gc.enable()


if __name__ == "__main__":
    sys.exit(main())
