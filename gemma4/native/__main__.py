"""python -m gemma4.native [--source-dir DIR] [--build-dir DIR] [--verbose]: builds the native CPU kernels (or
finds them in torch's build cache) and says which module it built with which flags; exits 1 with the error when
the build fails. Where the kernels are not to be built (GEMMA4_NO_NATIVE=1, no AVX2/FMA) it says why and exits 0."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import CFLAGS, SOURCE_DIR, build, first_error, module_name, skip_reason, sources


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gemma4.native", description=__doc__.splitlines()[0])
    ap.add_argument("--source-dir", type=Path, default=SOURCE_DIR, help="the C++ sources (default: the package's)")
    ap.add_argument("--build-dir", default=None, help="default: torch's extension cache")
    ap.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    args = ap.parse_args(argv)
    reason = skip_reason()
    if reason is not None:
        print(f"gemma4.native: not built ({reason}); the plain torch path serves")
        return 0
    try:
        mod = build(args.source_dir, args.build_dir, verbose=args.verbose)
    except Exception as exc:
        print(f"gemma4.native: the native CPU kernels could not be built: {first_error(exc)}\n\n{exc}",
              file=sys.stderr)
        return 1
    names = ", ".join(p.name for p in sources(args.source_dir))
    print(f"gemma4.native: built {module_name(args.source_dir)} ({mod.__file__}) from {names} "
          f"with {' '.join(CFLAGS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
