import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.manual_seed(0)

from reference import GEMMA4_CONFIGS, build_gemma4  # noqa: E402


@pytest.fixture(scope="session")
def gemma4_models(tmp_path_factory):
    """name -> (checkpoint folder, transformers model), built once per session."""
    built = {}
    for i, name in enumerate(GEMMA4_CONFIGS):
        path = tmp_path_factory.mktemp(name)
        built[name] = (path, build_gemma4(path, name, seed=i))
    return built
