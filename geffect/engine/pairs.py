"""Fig. 5b of Wang et al.: each forget instance's own objective term against both risks, from the
captured training pass alone (no extra backward).

For forget instance s_i with term L(s_i) (its forget row, and its ``idk`` / ``mismatch`` rows when
the objective reads them) the pair is n_f·(∇R_uᵀ∇L(s_i), ∇R_rᵀ∇L(s_i)) per group, scaled so that
the mean over instances is the forget part's G-effect. Per module m:

- ∇_m R_u = (1/n_f) Σ_{forget rows} ∇_m ℓ_j and ∇_m R_r likewise over the retain rows: weight-
  gradient products of the risk's cotangents on those rows (:mod:`gradients`), held one module
  at a time (a tied tensor's gradient collects both of its uses first);
- ⟨∇_m L(s_i), V⟩ for V = those two, per row, from the training cotangents of the forget-side rows
  (which are the forget part's, since the retain part reads only the retain rows) with the same
  inner-product rules as the G-effects (:mod:`rules`).

A bias-free Linear layer that owns its weight alone skips forming ∇_m R where the Gram form is
cheaper: with forget-side positions s (inputs a_s, training cotangents δ_s) and the risk's
positions t (a_t, risk cotangents g_t),

    ⟨∇_m L(s_i), ∇_m R⟩ = (1/n) Σ_{s∈i} Σ_t (δ_s·g_t)(a_s·a_t),

both risks from one (K_s, K_u + K_r) product: K_s·(K_u + K_r)·(d_in + d_out) multiply-adds instead
of (2K_s + K_u + K_r)·d_in·d_out (one process only: across processes ∇_m R is the global batch's).
"""
from __future__ import annotations

import torch

from geffect.engine import gram
from geffect.engine.engine import Captured, Pairs
from geffect.engine.gradients import grad_rule_for
from geffect.engine.parts import forget_side
from geffect.engine.rules import known_dense, nonzero_rows, rule_for


def _select(rec, rows: list[int]):
    """(local indices, global rows) of ``rows`` present in the record's chunk, or None."""
    if rec.rows is None:
        return rows, rows
    pos = {int(r): k for k, r in enumerate(rec.rows.tolist())}
    hit = [i for i in rows if i in pos]
    return ([pos[i] for i in hit], hit) if hit else None


def _inputs(rec, local, n_chunk):
    """(index, the record's inputs on those rows): a slice, so views and no copies, when the rows
    are contiguous."""
    ref = rec.train if rec.train is not None else rec.grad
    if local == list(range(local[0], local[-1] + 1)):
        idx = slice(local[0], local[-1] + 1)
    else:
        idx = torch.tensor(local, device=ref.device)
    return idx, tuple(x[idx] if torch.is_tensor(x) and x.dim() > 0 and x.shape[0] == n_chunk else x
                      for x in rec.inputs)


def _rows_index(rows: list[int], device) -> slice | torch.Tensor:
    """Rows as a slice (a view, no copy) when contiguous, else an index tensor."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def _flat2(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])                                    # (rows·T, d)


def _risk_gradient(mod, names, recs, rows: list[int], cap) -> dict[str, torch.Tensor]:
    """Σ over ``rows`` of ∇_m ℓ_j (risk cotangents: the captured ones, rescaled per row on the reuse path)."""
    total: dict[str, torch.Tensor] = {}
    for rec in recs:
        sel = _select(rec, rows)
        if sel is None or rec.grad is None:
            continue
        local, glob = sel
        idx, inputs = _inputs(rec, local, rec.grad.shape[0])
        g = rec.grad[idx]
        if cap.row_scale is not None:
            scale = cap.row_scale[torch.tensor(glob, device=cap.row_scale.device)].to(g.dtype)
            g = g * scale.reshape(-1, *([1] * (g.dim() - 1)))
        for k, G in grad_rule_for(mod)(mod, inputs, g.detach(), names).items():
            total[k] = G if k not in total else total[k] + G
    return total


class PairsAccumulator:
    """The pairs of one captured micro-batch, taken module by module (:meth:`add`): during the
    backward as modules complete (streaming) or after it, while their tensors are still held."""

    def __init__(self, model: torch.nn.Module, assignment: dict[str, str], groups: list[str], c: Captured,
                 world=None):
        """``world``: across processes the risks' gradients are the global batch's (their products
        summed over the ranks, one module at a time) and n_f, n_r its counts."""
        self.model, self.assignment, self.groups, self.c, self.world = model, assignment, list(groups), c, world
        seg = c.segments
        f, r = seg["forget"], seg["retain"]
        self.n_f, self.n_r = f.stop - f.start, r.stop - r.start
        self.n_local = self.n_f                   # this process's forget instances (rows of ``out``)
        if world is not None and world.active:
            self.n_f, self.n_r = (int(v) for v in world.sum_floats([self.n_f, self.n_r]))
        self.f_rows, self.r_rows, self.side = list(range(f.start, f.stop)), list(range(r.start, r.stop)), forget_side(seg)
        self.owner = {}                             # the forget instance each forget-side row belongs to
        for name in ("forget", "idk", "mismatch"):
            if name in seg:
                self.owner |= {seg[name].start + k: k for k in range(seg[name].stop - seg[name].start)}
        self.modules = {name: model.get_submodule(name) for name in assignment}
        self.params = {name: tuple(n for n, p in m._parameters.items() if p is not None and p.requires_grad)
                       for name, m in self.modules.items()}
        self.device = next(model.parameters()).device
        self.out = {risk: torch.zeros(self.n_local, len(self.groups), device=self.device)
                    for risk in ("unlearn", "retain")}

    def _risk_grad(self, name: str, rows: list[int], n: int) -> dict[str, torch.Tensor]:
        """∇_m R of module ``name`` for the risk over ``rows`` (n of them globally), per tensor."""
        mod, recs = self.modules[name], self.c.cap.seen.get(name, [])
        total = _risk_gradient(mod, self.params[name], recs, rows, self.c.cap)
        if self.world is not None and self.world.active:     # whole tensors: the rules need all of V
            for k in self.params[name]:         # a tensor this rank's rows never reached: zeros to reduce
                if k not in total:
                    total[k] = torch.zeros(mod._parameters[k].shape, dtype=torch.float32, device=self.device)
            total = {k: self.world.all_reduce_(total[k]) for k in self.params[name]}
        return {k: v.div_(n) for k, v in total.items()}

    @torch.no_grad()
    def add(self, names: list[str]) -> None:
        """Take the pairs' share of these modules (a tied tensor's modules must come together). One
        risk at a time: only one risk's gradients of these modules are held at once. A module whose
        pairs were taken with its G-effect products (``cap.pair_products``, :mod:`gramrows`) adds them."""
        taken = [n for n in names if n in self.c.cap.pair_products]
        for name in taken:
            gi, v = self.groups.index(self.assignment[name]), self.c.cap.pair_products.pop(name).to(self.device)
            self.out["unlearn"][:, gi] += v[:, 0]                          # v: (n_f, 2) for (R_u, R_r)
            self.out["retain"][:, gi] += v[:, 1]
        names = [n for n in names if n not in taken]
        side = {}
        for name in names:            # the forget-side rows of each captured chunk, and their instances
            for j, rec in enumerate(self.c.cap.seen.get(name, [])):
                sel = _select(rec, self.side)
                if sel is not None and rec.train is not None:
                    local, glob = sel
                    idx, inputs = _inputs(rec, local, rec.train.shape[0])
                    inst = torch.tensor([self.owner[i] for i in glob], device=self.device)
                    side[(name, j)] = (inputs, rec.train[idx].detach(), inst)
        in_gram_form = {name for name in names if self._gram(name)} | self._tied_gram(names)
        formed = [name for name in names if name not in in_gram_form]
        for risk, rows, n in (("unlearn", self.f_rows, self.n_f), ("retain", self.r_rows, self.n_r)):
            shared: dict[int, torch.Tensor] = {}      # V per tensor: a tied tensor's uses summed
            for name in formed:
                for k, g in self._risk_grad(name, rows, n).items():
                    pid = id(self.modules[name]._parameters[k])
                    shared[pid] = g if pid not in shared else shared[pid].add_(g)
            for name in formed:
                mod = self.modules[name]
                gi = self.groups.index(self.assignment[name])
                V = {k: shared[id(mod._parameters[k])].to(mod._parameters[k].dtype)
                     for k in self.params[name] if id(mod._parameters[k]) in shared}
                for (owner, _), (inputs, cot, inst) in side.items():
                    if owner == name and V:
                        vals = rule_for(mod)(mod, inputs, cot, V)            # (rows,) per-row ⟨∇L_row, V⟩
                        self.out[risk][:, gi].index_add_(0, inst, vals.to(self.device))
            del shared

    def _gram(self, name: str) -> bool:
        """This module's pairs for both risks in Gram form (see the module docstring), if it applies
        and is cheaper than forming ∇_m R_u and ∇_m R_r; False: form them."""
        mod, cap = self.modules[name], self.c.cap
        recs = cap.seen.get(name, [])
        if (self.world is not None and self.world.active) or not isinstance(mod, torch.nn.Linear) \
                or self.params[name] != ("weight",) or cap._owners.get(id(mod.weight)) != [name] or len(recs) != 1:
            return False
        rec = recs[0]
        if rec.rows is not None or rec.train is None or rec.grad is None or not self.f_rows or not self.r_rows:
            return False
        a_s, d_s, row_s = self._positions(name, self.side, train=True)    # (K_s, in), (K_s, out), (K_s,)
        a_u, g_u, _ = self._positions(name, self.f_rows, train=False)     # the forget risk's positions
        a_r, g_r, _ = self._positions(name, self.r_rows, train=False)     # the retain risk's
        K_s, K_u, K_r = a_s.shape[0], a_u.shape[0], a_r.shape[0]
        d_in, d_out = a_s.shape[1], d_s.shape[1]
        if not gram.use_gram(K_s * (K_u + K_r) * (d_in + d_out), (2 * K_s + K_u + K_r) * d_in * d_out):
            return False
        a_t, g_t = torch.cat([a_u, a_r]), torch.cat([g_u, g_r])          # (K_u + K_r, ·)
        P = (d_s @ g_t.T).float() * (a_s @ a_t.T).float()                # (K_s, K_u + K_r) (δ_s·g_t)(a_s·a_t)
        gi, inst = self.groups.index(self.assignment[name]), self._instances(row_s)
        for risk, cols, n in (("unlearn", slice(0, K_u), self.n_f), ("retain", slice(K_u, K_u + K_r), self.n_r)):
            self.out[risk][:, gi].index_add_(0, inst, P[:, cols].sum(1).div_(n).to(self.device))
        return True

    def _positions(self, name: str, rows: list[int], train: bool):
        """(a, cotangent, row of each position) of module ``name`` on ``rows``: the training
        cotangents, or the risk's (the captured ones, rescaled per row on the reuse path), at the
        positions that carry one. -> (K, in) inputs (token ids for an embedding), (K, out), (K,)"""
        cap = self.c.cap
        rec = cap.seen[name][0]
        idx = _rows_index(rows, rec.grad.device)
        g = (rec.train if train else rec.grad)[idx]
        if not train and cap.row_scale is not None:
            g = g * cap.row_scale[idx].to(g.dtype).reshape(-1, *([1] * (g.dim() - 1)))
        x = rec.inputs[0][idx]
        row = torch.tensor(rows, device=g.device).repeat_interleave(g.shape[1])
        x, g = (x.reshape(-1, x.shape[-1]) if x.dim() > 2 else x.reshape(-1)), _flat2(g)
        mod = self.modules[name]
        if known_dense(mod):                  # every position carries a cotangent (rules.linear_rule)
            return x, g, row
        live = nonzero_rows(g)
        if isinstance(mod, torch.nn.Embedding) and mod.padding_idx is not None:
            live &= x != mod.padding_idx
        return x[live], g[live], row[live]

    def _instances(self, rows: torch.Tensor) -> torch.Tensor:
        """The forget instance each of these forget-side rows belongs to."""
        owner = torch.tensor([self.owner.get(i, -1) for i in range(max(self.side) + 1)], device=rows.device)
        return owner[rows]

    def _tied_gram(self, names: list[str]) -> set[str]:
        """An output projection tied to the input embedding, both risks in Gram form: with the
        projection's positions (a_s, δ_s) and the embedding's (id_u, e_u) on the instance's side, and
        the risk's (a_t, g_t) and (id_v, e_v), ∇R = (1/n)(Σ_t g_t a_tᵀ + Σ_v onehot(id_v) e_vᵀ), so

            projection:  ⟨δ_s a_sᵀ, ∇R⟩       = (1/n)[Σ_t (δ_s·g_t)(a_s·a_t) + Σ_v δ_s[id_v] (a_s·e_v)],
            embedding:   ⟨onehot(id_u) e_uᵀ, ∇R⟩ = (1/n)[Σ_t g_t[id_u] (e_u·a_t) + Σ_{v: id_v = id_u} e_u·e_v],

        each module's share to its own group, as the formed path splits them. -> the modules done."""
        cap = self.c.cap
        if (self.world is not None and self.world.active) or not self.f_rows or not self.r_rows:
            return set()
        for lm in names:
            mod = self.modules[lm]
            owners = cap._owners.get(id(mod.weight), []) if isinstance(mod, torch.nn.Linear) else []
            emb = next((o for o in owners if o != lm), None)
            if len(owners) != 2 or emb not in names or not isinstance(self.modules[emb], torch.nn.Embedding) \
                    or self.params[lm] != ("weight",) or self.params[emb] != ("weight",):
                continue
            recs = [r for n in (lm, emb) for r in cap.seen.get(n, [])]
            if len(recs) != 2 or any(r.rows is not None or r.train is None or r.grad is None for r in recs):
                continue
            a_s, d_s, row_s = self._positions(lm, self.side, train=True)
            id_u, e_u, row_u = self._positions(emb, self.side, train=True)
            V, d = mod.weight.shape
            sides = {}
            for risk, rows in (("unlearn", self.f_rows), ("retain", self.r_rows)):
                a_t, g_t, _ = self._positions(lm, rows, train=False)
                id_v, e_v, _ = self._positions(emb, rows, train=False)
                sides[risk] = (a_t, g_t, id_v, e_v)
            K_s, K_t = a_s.shape[0], sum(x[0].shape[0] for x in sides.values())
            if not gram.use_gram(K_s * K_t * (d + V), (2 * K_s + K_t) * d * V):
                continue
            inst = {lm: self._instances(row_s), emb: self._instances(row_u)}
            for risk, n in (("unlearn", self.n_f), ("retain", self.n_r)):
                a_t, g_t, id_v, e_v = sides[risk]
                uniq, inv = torch.unique(id_v, return_inverse=True)                  # E_R compact: one row per id
                E = torch.zeros(len(uniq), d, dtype=e_v.dtype, device=e_v.device).index_add_(0, inv, e_v)
                lm_vals = (((d_s @ g_t.T).float() * (a_s @ a_t.T).float()).sum(1)
                           + (d_s[:, uniq].float() * (a_s @ E.T).float()).sum(1))      # (K_s,)
                pos = torch.searchsorted(uniq, id_u).clamp_max(max(len(uniq) - 1, 0))
                match = (uniq[pos] == id_u) if len(uniq) else torch.zeros_like(id_u, dtype=torch.bool)
                same_id = (e_u.float() * E[pos].float()).sum(-1) * match if len(uniq) else 0.0
                emb_vals = (g_t[:, id_u].T.float() * (e_u @ a_t.T).float()).sum(1) + same_id   # (K_u,)
                for name, vals in ((lm, lm_vals), (emb, emb_vals)):
                    gi = self.groups.index(self.assignment[name])
                    self.out[risk][:, gi].index_add_(0, inst[name], vals.div(n).to(self.device))
            return {lm, emb}
        return set()

    def result(self) -> Pairs:
        c = self.c
        return Pairs(self.groups, (self.n_f * self.out["unlearn"]).cpu(), (self.n_f * self.out["retain"]).cpu(),
                     c.forget_index, c.weights.cpu() if c.weights is not None else None)


def instance_pairs(model: torch.nn.Module, assignment: dict[str, str], groups: list[str], c: Captured) -> Pairs:
    """The pairs of one captured micro-batch (its tensors must still be held)."""
    acc = PairsAccumulator(model, assignment, groups, c)
    acc.add(list(assignment))
    return acc.result()
