"""The command line: run, chat, info, list. Argument parsing and printing only."""

from __future__ import annotations

import argparse
import os
import sys

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """Bad input at the command line: printed as one line, exit status 2."""


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", help="GGUF file, HF checkpoint folder, or a name in the local store "
                                         "(default: the embedded Gemma 3 270M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="weight and activation dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (auto: CUDA when present)")
    p.add_argument("--quantize", choices=["int4", "int8"], default=None,
                   help="quantise float weights at load (GGUF weights stay in their own quantised form)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", "--temp", type=float, default=1.0, help="0 is greedy (default 1.0)")
    p.add_argument("--top-k", type=int, default=64, help="0 disables (default 64)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.0, help="min-p sampling (default 0: off)")
    p.add_argument("--seed", type=int, default=None, help="makes sampling reproducible")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--system", help="system prompt (chat mode)")
    p.add_argument("--think", action="store_true", help="let the model think first, where its template supports it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma4", description="Run Gemma 4 (and Gemma 3) models locally.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="answer one prompt, streaming")
    run.add_argument("prompt", nargs="?", help="the prompt; '-' reads it from standard input")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--chat", action="store_true", help="use the chat format even if the model has no template")
    mode.add_argument("--raw", action="store_true", help="complete the raw text, no chat template")
    _model_args(run)
    _sampling_args(run)

    chat = sub.add_parser("chat", help="multi-turn chat in the terminal")
    _model_args(chat)
    _sampling_args(chat)

    info = sub.add_parser("info", help="describe a model without running it")
    info.add_argument("model", nargs="?", help="GGUF file, HF folder or store name (default: the embedded model)")
    info.add_argument("--ctx", type=int, default=None, help="context length for the KV estimate (default: 8192 "
                                                            "and the model's maximum)")

    sub.add_parser("list", help="models in the local store")
    return parser


# ---- helpers --------------------------------------------------------------------------------
def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(args):
    import gemma4
    from gemma4 import store

    path = store.resolve(args.model)
    device = args.device
    dtype = args.dtype
    if dtype == "auto":
        import torch

        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        dtype = "bfloat16" if cuda else "float32"
    return gemma4.load(path, dtype=dtype, device=device, quantize=getattr(args, "quantize", None))


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, seed=args.seed, stop=args.stop)


def _check_sampling(args) -> None:
    from gemma4.sampling import SamplingParams

    try:
        SamplingParams(**_sampling(args))
    except ValueError as e:
        raise CLIError(str(e)) from None


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


# ---- commands -------------------------------------------------------------------------------
def cmd_run(args) -> int:
    if args.prompt is None:
        raise CLIError("no prompt: give one as an argument, or '-' to read standard input")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise CLIError("the prompt is empty")
    _check_sampling(args)
    model = _load(args)
    has_template = model.chat_template is not None
    use_chat = args.chat or (has_template and not args.raw)
    if use_chat:
        if not has_template:
            _note(f"note: the model has no chat template; using the {model.config.architecture} turn format")
        deltas = model.chat(_messages(args.system, [{"role": "user", "content": prompt}]),
                            enable_thinking=args.think, stream=True, **_sampling(args))
    else:
        if not args.raw:
            _note("note: the model has no chat template (a base model): completing the raw text; --chat uses the "
                  "turn format")
        if args.system or args.think:
            _note("note: --system and --think apply to chat mode only")
        from gemma4.api import ChatDelta

        deltas = (ChatDelta("content", c.text) for c in model.generate(prompt, stream=True, **_sampling(args)))
    if not use_chat:
        sys.stdout.write(prompt)
    _print_stream(deltas)
    print(flush=True)
    return 0


def cmd_chat(args) -> int:
    _check_sampling(args)
    model = _load(args)
    if model.chat_template is None:
        _note(f"note: the model has no chat template; using the {model.config.architecture} turn format "
              "(a base model chats poorly)")
    _note("chat: /reset clears the history, /exit quits, Ctrl-C stops an answer")
    history: list[dict] = []
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
            _note("(history cleared)")
            continue
        if text.startswith("/"):
            _note("commands: /reset, /exit")
            continue
        history.append({"role": "user", "content": line})
        answer = []
        try:
            for d in model.chat(_messages(args.system, history), enable_thinking=args.think, stream=True,
                                **_sampling(args)):
                if d.kind == "content":
                    answer.append(d.text)
                _print_stream([d])
        except KeyboardInterrupt:
            _note("\n(stopped)")
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(answer)})


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "Ki", "Mi", "Gi", "Ti"):
        if abs(n) < 1024 or prefix == "Ti":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{int(n)} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    for suffix, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{suffix}"
    return str(n)


def cmd_info(args) -> int:
    from gemma4 import store
    from gemma4.checkpoint import open_checkpoint

    path = store.resolve(args.model)
    ckpt = open_checkpoint(path)
    cfg = ckpt.config
    total, active = cfg.parameter_counts()
    n_full = sum(1 for t in cfg.layer_types if t == "full_attention")
    print(f"model          {path}")
    print(f"architecture   {cfg.architecture}, {cfg.num_hidden_layers} layers ({cfg.num_hidden_layers - n_full} "
          f"sliding, window {cfg.sliding_window}; {n_full} full), hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads")
    if cfg.enable_moe_block:
        print(f"experts        {cfg.num_experts}, top-{cfg.top_k_experts}, width {cfg.moe_intermediate_size}; "
              f"dense MLP {cfg.intermediate_size}")
    print(f"parameters     {_count(total)} total, {_count(active)} active per token")
    print(f"context        {cfg.max_position_embeddings} tokens; vocabulary {cfg.vocab_size}")
    weights = ckpt.weight_bytes()
    print(f"tensor types   {', '.join(f'{k} x{v}' for k, v in sorted(ckpt.tensor_types().items()))}")
    print(f"weights        {_human(weights)} on disk")
    print(f"chat template  {'yes' if ckpt.chat_template() else 'none (base model: raw completion)'}")
    contexts = [args.ctx] if args.ctx else sorted({min(8192, cfg.max_position_embeddings), cfg.max_position_embeddings})
    for ctx in contexts:
        kv = sum(cfg.kv_bytes_per_token(i) * (min(ctx, cfg.sliding_window) if cfg.is_sliding(i) else ctx)
                 for i in range(cfg.num_hidden_layers))
        print(f"KV at {ctx:>6}   {_human(kv)} (bf16); weights + KV {_human(weights + kv)}")
    return 0


def cmd_list(args) -> int:
    from gemma4 import store

    print(f"{store.EMBEDDED_NAME:<24} embedded default (Gemma 3 270M, Q4_K_M GGUF)")
    models = store.list_models()
    for m in models:
        print(f"{m.name:<24} {m.kind:<5} {_human(m.size):>10}  {m.path}")
    if not models:
        print(f"(no models in {store.store_dir()}: put NAME.gguf files or HF folders there)")
    return 0


COMMANDS = {"run": cmd_run, "chat": cmd_chat, "info": cmd_info, "list": cmd_list}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from gemma4.errors import ModelLoadError

    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader went away (`gemma4 run ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (CLIError, ModelLoadError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
