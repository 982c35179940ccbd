"""A rank started by rank 0 on this machine: join the group, load this rank's shard, follow rank 0, exit.

Exit status 0 when rank 0 said stop; 1 (with one line on standard error) when anything failed, including
rank 0 going away (its sockets close, or its parent process is gone).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _exit_with_parent() -> None:
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    rank = spec["rank"]
    _exit_with_parent()
    try:
        import torch

        from ..api import _dtype
        from ..checkpoint import open_checkpoint
        from . import group
        from .mirror import follow
        from .shard import build_shard
        from .sharding import Plan

        device = torch.device(spec["device"])
        if device.type == "cuda":
            device = torch.device("cuda", rank % max(1, torch.cuda.device_count()))
        group.join(rank, spec["world"], device, spec["init_method"])
        plan = Plan.of(rank, spec["tensor_parallel"], spec["expert_parallel"])
        decoder = build_shard(open_checkpoint(spec["path"]), plan, _dtype(spec["dtype"]), device,
                              quantize=spec.get("quantize"))
        group.loaded()
        follow(decoder)
        return 0
    except KeyboardInterrupt:
        return 1
    except Exception as e:  # one line: rank 0 reports the rank's exit
        print(f"gemma4 rank {rank}: error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # no interpreter teardown of the process group's threads
