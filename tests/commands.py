"""The command line as a user runs it: `gemma4 ...` in a subprocess, its output and exit status."""

import os
import subprocess
import sys


def cli(*args, input=None, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "gemma4.cli", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env={**os.environ, **(env or {})})
