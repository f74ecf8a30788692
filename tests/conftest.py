"""Put the repository root on sys.path so tests import the scripts as modules (nothing runs at import)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

# Tests use tiny tensors: one thread is as fast and leaves the other cores to whatever else runs.
torch.set_num_threads(1)
