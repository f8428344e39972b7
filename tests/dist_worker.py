"""torchrun worker of tests/test_distributed.py: every case of dist_cases.CASES in one process group.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_worker.py MODE OUT.pt
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from dist_cases import CASES, run_case

from geffect.distributed import shutdown

mode, out = sys.argv[1], sys.argv[2]
results = {}
for case in CASES:
    results[case] = run_case(*case, parallel=mode)
    if os.environ.get("GEFFECT_DIST_VERBOSE"):
        print("done", case, flush=True)
if os.environ.get("RANK") == "0":
    torch.save(results, out)
shutdown(barrier=True)
