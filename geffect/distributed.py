"""Data-parallel and sharded runs under ``torch.distributed``: ``torchrun --nproc-per-node N -m geffect …``.

Every rank builds the same global batch (same seed, same draws: nothing depends on N) and takes its
share of each segment's rows (:meth:`World.shard`); its micro-batch carries the share of each
part's mean that its rows are (``MicroBatch.shares``), so the gradients of the ranks' losses sum to
∇L of the global batch. The model is wrapped by PyTorch's own data parallelism:

- ``ddp``: ``DistributedDataParallel`` with a summing all-reduce (a comm hook), so after the
  backward ``.grad`` holds the global ∇L on every rank;
- ``fsdp``: FSDP2's ``fully_shard`` on every transformer block and the root, gradients summed by
  the reduce-scatter (divide factor 1): each rank holds its shard of ∇L.

The engine then takes every rank's own rows' inner products against the global direction: under
DDP ``.grad`` itself; under FSDP each module's direction is all-gathered when its inner products are
taken and dropped after (one module at a time; never the whole gradient). Quantities that need the
two parts' *global* gradients reduce the forget part's weight-gradient products: one all-reduce of
g_f per tensor under DDP (then g_r = ∇L − g_f locally), one reduce-scatter per tensor under FSDP
(then three partial dot products per tensor, summed in one small all-reduce). Per-instance rows
are gathered to every rank in global order; rank 0 writes the run directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace

import torch

from geffect.errors import ConfigError

MODES = ("ddp", "fsdp")


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process() -> bool:
    """Rank 0, or the only process (what prints warnings and notes, once)."""
    return os.environ.get("RANK", "0") == "0"


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def split_sizes(n: int, parts: int) -> list[int]:
    """Row counts of ``n`` rows over ``parts`` ranks, as even as possible, the first ranks larger."""
    return [n // parts + (1 if k < n % parts else 0) for k in range(parts)]


def shutdown(barrier: bool = False) -> None:
    """Destroy the default process group when one is initialised (a torchrun run at its end), so its
    communication threads are joined before the interpreter exits (a group left to exit can abort a
    rank: "terminate called without an active exception"). ``barrier``: first wait until every rank
    is there (a normal end: no rank tears its group down while another still communicates; not
    after an error, which other ranks may never reach)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


@dataclass
class World:
    """This process's place in the run: rank, world size and the parallel mode (``none`` alone)."""
    rank: int = 0
    size: int = 1
    mode: str = "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def sharded(self) -> bool:
        return self.active and self.mode == "fsdp"

    # ---- set-up -------------------------------------------------------------------------------------

    @classmethod
    def init(cls, mode: str = "ddp", device: str = "auto") -> World:
        """The world of this process: a single process unless launched with WORLD_SIZE > 1, then the
        process group (gloo on CPU, nccl on CUDA) is initialised once."""
        import torch.distributed as dist
        if not launched():
            return cls()
        if mode not in MODES:
            raise ConfigError(f"--parallel {mode!r}: choose one of {', '.join(MODES)}")
        if not dist.is_initialized():
            cuda = torch.cuda.is_available() and device in ("auto", "cuda")
            if cuda:
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group(backend="nccl" if cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), mode)

    def device(self, spec: str) -> str:
        """The device spec of this rank: its own GPU (LOCAL_RANK) when on CUDA."""
        if self.active and spec in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return spec

    def check_batch(self, forget_batch: int, retain_batch: int) -> None:
        for name, n in (("--forget-batch", forget_batch), ("--retain-batch", retain_batch)):
            if n < self.size:
                raise ConfigError(f"{name} {n} with {self.size} processes: every process needs at least one row of "
                                  f"each split (the global batch is split across processes)")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module to run forwards through: a DDP wrapper (summing all-reduce) or the model itself
        sharded in place by ``fully_shard`` (blocks first, then the root; gradients summed)."""
        if not self.active:
            return model
        if self.mode == "ddp":
            import torch.distributed as dist
            from torch.nn.parallel import DistributedDataParallel as DDP
            dev = next(model.parameters()).device
            ddp = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)

            def sum_hook(_state, bucket):
                return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])
            ddp.register_comm_hook(None, sum_hook)
            return ddp
        from torch.distributed.fsdp import fully_shard

        from geffect.layers import find_blocks
        for block in find_blocks(model)[1]:
            fully_shard(block)
        fully_shard(model)
        from torch.distributed.fsdp import FSDPModule
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)              # a sum, not a mean, over the ranks
                m.set_force_sum_reduction_for_comms(True)      # gloo has no pre-multiplied sum
        return model

    # ---- the data -----------------------------------------------------------------------------------

    def shard(self, mb):
        """This rank's rows of a global micro-batch: a contiguous share of each segment (the forget
        rows and their idk/mismatch rows alike), with the shares of each part's mean they carry."""
        if not self.active:
            return mb
        from geffect.data.batching import Batch
        seg = mb.batch.segments
        f, r = seg["forget"], seg["retain"]
        n_f, n_r = f.stop - f.start, r.stop - r.start
        lo_f = sum(split_sizes(n_f, self.size)[:self.rank])
        lo_r = sum(split_sizes(n_r, self.size)[:self.rank])
        k_f, k_r = split_sizes(n_f, self.size)[self.rank], split_sizes(n_r, self.size)[self.rank]
        rows, segments = [], {}
        for name, s in seg.items():                 # in the batch's own segment order
            lo, k = (lo_r, k_r) if name == "retain" else (lo_f, k_f)
            segments[name] = slice(len(rows), len(rows) + k)
            rows += range(s.start + lo, s.start + lo + k)
        idx = torch.tensor(rows, dtype=torch.long)
        b = mb.batch
        width = int(b.attention_mask[idx].sum(1).max())      # drop the columns only padding fills
        local = Batch(b.input_ids[idx, :width], b.attention_mask[idx, :width], b.labels[idx, :width], segments)
        base = mb.shares or (1.0, 1.0)
        return replace(mb, batch=local, forget_index=mb.forget_index[lo_f:lo_f + k_f],
                       retain_index=mb.retain_index[lo_r:lo_r + k_r],
                       shares=(base[0] * k_f / n_f, base[1] * k_r / n_r))

    # ---- collectives --------------------------------------------------------------------------------

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks, in place."""
        if self.active:
            import torch.distributed as dist
            dist.all_reduce(t)
        return t

    def sum_floats(self, values: list[float]) -> list[float]:
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        return self.all_reduce_(t).tolist()

    def gather_objects(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def _comm_device(self) -> torch.device:
        import torch.distributed as dist
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist
            dist.barrier()

    # ---- the global direction and the parts' global gradients ----------------------------------------

    @staticmethod
    def full(t: torch.Tensor) -> torch.Tensor:
        """The whole tensor of a sharded one (an all-gather), else the tensor itself."""
        return t.full_tensor() if _is_dtensor(t) else t

    def reduce_part(self, p: torch.nn.Parameter, G: torch.Tensor) -> torch.Tensor:
        """The global gradient of a part from this rank's products ``G`` (full shape), laid out as
        ``p.grad``: summed over the ranks (DDP), or summed and scattered into this rank's shard (FSDP)."""
        if not self.active:
            return G
        if _is_dtensor(p.grad):
            from torch.distributed.tensor import DTensor, Partial
            g = p.grad
            partial = DTensor.from_local(G.to(g.dtype) if G.dtype != g.dtype else G, g.device_mesh,
                                         [Partial()] * g.device_mesh.ndim, run_check=False,
                                         shape=g.shape, stride=g.stride())
            return partial.redistribute(g.device_mesh, g.placements).to_local()
        return self.all_reduce_(G)

    @staticmethod
    def local(t: torch.Tensor) -> torch.Tensor:
        """This rank's part of a tensor (a DTensor's local shard)."""
        return t.to_local() if _is_dtensor(t) else t

    def grad_norm(self, grads: list[torch.Tensor]) -> float:
        """‖∇L‖ over every rank's shards (DDP: every rank holds all of it)."""
        if not any(_is_dtensor(g) for g in grads):
            return torch.nn.utils.get_total_norm(grads).item() if grads else 0.0
        local = sum(float(self.local(g).double().square().sum()) for g in grads)
        return self.sum_floats([local])[0] ** 0.5

    # ---- one step's records, global -------------------------------------------------------------------

    def merge(self, res):
        """The global StepResult from every rank's: losses summed (each rank's carry its rows' shares),
        the batch's per-instance effects, pairs, tokens and weights in global (rank) order; conflicts,
        the gradient norm and the probe's effects are already global (every rank computed the same)."""
        if not self.active:
            return res
        from geffect.engine.engine import Effects
        local = {"losses": res.losses, "weights": res.weights, "pairs": res.pairs, "tokens": res.tokens,
                 "batch": [e for e in res.effects if e.source == "batch"], "nonfinite": res.nonfinite}
        every = self.gather_objects(local)
        losses = {k: sum(r["losses"][k] for r in every) for k in res.losses}
        if all(r["losses"]["loss_retain"] != r["losses"]["loss_retain"] for r in every):
            losses["loss_retain"] = float("nan")            # no retain part anywhere
        ws = [r["weights"] for r in every]
        batch = [Effects.concat([r["batch"][k] for r in every]) for k in range(len(every[0]["batch"]))]
        probe = [e for e in res.effects if e.source != "batch"]
        return replace(res, losses=losses, weights=torch.cat(ws) if all(w is not None for w in ws) else None,
                       effects=batch + probe, pairs=[p for r in every for p in r["pairs"]],
                       tokens=[t for r in every for t in r["tokens"]],
                       nonfinite=sorted({x for r in every for x in r["nonfinite"]}))


SINGLE = World()
