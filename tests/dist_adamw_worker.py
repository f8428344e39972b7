"""torchrun worker of tests/test_distributed.py's fused-AdamW test: a tiny Llama sharded with FSDP2
(the product's ``World.wrap``), ``make_optimizer``'s AdamW over its DTensor parameters, three steps
on fixed gradients; and again with torch's default AdamW (the same sharded gradients, bit for bit: only the optimizer
differs); rank 0 saves whether each took the fused kernel and the full weights.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_adamw_worker.py OUT.pt
"""
import os
import sys
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(__file__))
from test_distributed import adamw_steps

from geffect.distributed import World, shutdown

world = World.init("fsdp")
results = {"make_optimizer": adamw_steps(world.wrap)}
with mock.patch("geffect.optim.fusable", return_value=False):
    results["default"] = adamw_steps(world.wrap)
if os.environ.get("RANK") == "0":
    torch.save(results, sys.argv[1])
shutdown(barrier=True)
