"""Typed configuration: one source for defaults, CLI help, validation and the saved config.

Each field's metadata carries its help text and, where it has one, its accepted range:
``choices`` (a tuple), ``min`` (inclusive), ``gt`` (exclusive lower bound), ``max``. Floats must be
finite. :func:`validate` checks a config object against that metadata in one pass, before any
model loads, and raises :class:`ConfigError` naming the option. Torch-free: ``geffect --help``
imports this module only.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

from geffect.errors import ConfigError

DEFAULT_MODEL = "smollm2-135m"
SCOPES = ("global", "group", "tensor")
OPTIMIZERS = ("adamw", "sgd")


def opt(default, help: str, **check):
    """A dataclass field with its help text and accepted range (see the module docstring)."""
    return field(default=default, metadata={"help": help, **check})


@dataclass
class UnlearnConfig:
    """Settings of an unlearning run."""
    method: str = opt("npo+gd", "forget objective [+ retain regulariser] [+pcgrad], e.g. ga, gd, npo+gd, npo+kl, "
                                "wga+kl, rmu, rmu-wmdp, rmu-full, llmu, tvn (with --lora), gd+pcgrad")
    model: str = opt(DEFAULT_MODEL, "built-in name (smollm2-135m, tiny-llama, tiny-gpt2), local HF dir, .gguf file "
                                    "or hub id")
    forget: str | None = opt(None, "forget set, TOFU-format JSON or JSON Lines (default: the bundled fictitious "
                                   "authors)")
    retain: str | None = opt(None, "retain set (default: bundled)")
    tofu: str | None = opt(None, "TOFU instead of --forget/--retain: a folder of TOFU's split files (forget10.json, "
                                 "retain90.json, …) or locuslab/TOFU (needs the datasets package and the hub)")
    tofu_split: str = opt("forget10", "the TOFU forget split; its retain and holdout splits follow "
                                      "(forget10: retain90, holdout10)", choices=("forget01", "forget05", "forget10"))
    memorize: str = opt("auto", "first fine-tune on forget+retain so the facts are known (cached): auto = only "
                                "for the bundled data, yes, no", choices=("auto", "yes", "no"))
    steps: int = opt(20, "optimizer steps (ignored if --epochs is set)", min=1)
    epochs: float | None = opt(None, "passes over the forget set instead of --steps", gt=0)
    forget_batch: int = opt(4, "forget samples per micro-batch", min=1)
    retain_batch: int = opt(4, "retain samples per micro-batch", min=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", min=1)
    optimizer: str = opt("adamw", "adamw or sgd", choices=OPTIMIZERS)
    lr: float = opt(2e-5, "peak learning rate", gt=0)
    lr_scheduler: str = opt("constant", "learning-rate schedule after the warm-up, by transformers.get_scheduler: "
                                        "constant, linear (decay to 0 at the last step: TOFU's and open-unlearning's) "
                                        "or cosine", choices=("constant", "linear", "cosine"))
    warmup_steps: int = opt(0, "linear warm-up steps (as transformers: the first step then runs at lr 0)", min=0)
    weight_decay: float = opt(0.0, "AdamW weight decay", min=0)
    clip: float | None = opt(None, "clip the gradient norm to this value", gt=0)
    max_length: int = opt(128, "maximum tokens per row (prompt + answer)", min=4)
    pcgrad: bool = opt(False, "PCGrad surgery on the forget and retain parts' gradients (same as appending "
                              "+pcgrad to --method)")
    pcgrad_scope: str = opt("global", "global (all parameters as one vector, the reference), group (per layer "
                                      "group) or tensor (per parameter tensor)", choices=SCOPES)
    prompt_format: str = opt("chat", "how a question and answer become tokens, as the model was trained: chat (its "
                                      "chat template), tofu-llama2, tofu-phi (TOFU's formats), open-unlearning "
                                      "(its chat-template use with system prompt and date), raw (continuation)",
                             choices=("chat", "tofu-llama2", "tofu-phi", "open-unlearning", "raw"))
    seed: int = opt(0, "seed for sampling, initialisation and RMU's control")
    device: str = opt("auto", "auto (a CUDA GPU when there is one, else MPS, else the CPU), cpu, cuda, cuda:N or mps")
    dtype: str = opt("float32", "dtype of the weights, their gradients and the optimizer states (G-effects "
                                "accumulate in float32 whatever it is)", choices=("float32", "bfloat16", "float16"))
    gradient_checkpointing: bool = opt(False, "recompute block activations in the backward (less memory, "
                                              "about a third more compute); the G-effects are unchanged")
    lora: str | None = opt(None, "train LoRA adapters instead of the weights, e.g. "
                                 "r=16,alpha=32,targets=q_proj,v_proj[,dropout=0.0] (peft); θ_o is the model "
                                 "with its adapters disabled")
    reference: str = opt("auto", "how θ_o is kept: cache (its log-probabilities of every row the objective reads, "
                                 "computed once: NPO, TNPO, WTNPO, IdkDPO), copy (a frozen copy: needed by KL and "
                                 "RMU), auto (cache when it suffices)", choices=("auto", "cache", "copy"))
    parallel: str = opt("ddp", "under torchrun (WORLD_SIZE > 1): ddp (DistributedDataParallel; every process holds the "
                               "model) or fsdp (FSDP2 fully_shard: parameters, gradients and optimizer state sharded)",
                        choices=("ddp", "fsdp"))
    reference_device: str | None = opt(None, "device of θ_o's frozen copy (default: the model's), e.g. cpu")
    keep_freed_memory: bool = opt(True, "CPU, glibc: keep freed memory in the process for reuse (no heap "
                                        "trimming, no fresh mmaps for large blocks) so steps stop faulting in fresh "
                                        "pages, and back large tensors with transparent huge pages where the kernel "
                                        "allows; resident memory stays at its peak (geffect/engine/allocator.py)")
    checkpoint_every: int = opt(0, "save a checkpoint (weights, optimizer, random states, data position) every N "
                                   "steps into OUT.partial/checkpoint for geffect resume; 0 = only when stopped by "
                                   "Ctrl-C or SIGTERM", min=0)
    on_nonfinite: str = opt("stop", "a non-finite loss, gradient or G-effect: stop (the records up to it are kept "
                                    "and marked; the bad update is not applied), skip-step (drop that update, go on) "
                                    "or continue", choices=("stop", "skip-step", "continue"))
    memory_check: bool = opt(True, "estimate the memory the run needs first and refuse when it will not fit")
    save_model: bool = opt(True, "save the final model (safetensors; with --lora, the adapters)")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class Hyper:
    """Objective hyperparameters (reference defaults, REFERENCE.md §2)."""
    gamma: float = opt(1.0, "weight γ of the forget part", min=0)
    alpha: float | None = opt(None, "weight α of the retain part (default 1; 1200 for rmu)", min=0)
    npo_beta: float = opt(0.1, "NPO β (open-unlearning default)", gt=0)
    simnpo_beta: float = opt(4.5, "SimNPO β", gt=0)
    simnpo_delta: float = opt(0.0, "SimNPO margin δ")
    wga_alpha: float = opt(1.0, "WGA exponent α in w_t = p_t^α", min=0)
    tnpo_beta: float = opt(4.0, "TNPO β", gt=0)
    wtnpo_alpha: float = opt(1.5, "WTNPO α", min=0)
    wtnpo_beta: float = opt(4.0, "WTNPO β", gt=0)
    dpo_beta: float = opt(0.1, "IdkDPO β", gt=0)
    rmu_layer: int | None = opt(None, "RMU layer ℓ (default: a quarter of the depth; rmu-wmdp: 7 of 32 blocks, "
                                      "scaled to the depth); layers ℓ-2..ℓ are updated (rmu-full: every layer)",
                                min=0)
    rmu_coeff: float | None = opt(None, "RMU control scale c (default: 6.5 for rmu and rmu-wmdp, as WMDP; 2 for "
                                        "rmu-full, as the G-effect paper)", gt=0)
    rmu_stop_cosine: float | None = opt(None, "RMU: stop early once the mean cosine similarity between block ℓ's "
                                              "activations on the step's forget rows under θ and under θ_o falls "
                                              "below this (the Spunge paper: 0.5)", gt=0, max=1)
    llmu_ga: float = opt(0.5, "LLMU weight of the GA term", min=0)
    llmu_mismatch: float = opt(1.0, "LLMU weight of the random-mismatch term", min=0)
    tvn_lambda: float = opt(1.0, "TVN: scale λ of the negated LoRA task vector, θ = θ_base − λ·ΔW", gt=0)


@dataclass
class ProfileConfig:
    """What the G-effect engine measures and how often."""
    direction: str = opt("grad", "grad: the raw objective gradient ∇L (paper); update: the optimizer's step "
                                 "−Δθ/lr", choices=("grad", "update"))
    resolution: str = opt("group", "group (embed/shallow/middle/deep/lm) or block", choices=("group", "block"))
    boundaries: str | None = opt(None, "block indices b1,b2 splitting shallow|middle|deep (default: thirds)")
    probe_every: int = opt(0, "every k steps also measure against the risk over a fixed probe set (whole forget "
                              "set and a retain sample); 0 = off", min=0)
    probe_retain: int = opt(16, "retain samples in the probe set", min=1)
    probe_size: int = opt(0, "forget samples in the probe set, a seeded sample (0: the whole forget set)", min=0)
    probe_batch: int = opt(16, "rows per forward of the probe set (bounded memory on large probes)", min=1)
    probe_forget: bool = opt(True, "the probe set includes the whole forget set (off: the retain sample only, a "
                                   "cheaper e_r on a fixed sample instead of the rows the retain part trains on)")
    conflicts: bool = opt(True, "conflict statistics of the forget and retain parts' gradients every step "
                                "(conflicts.csv), from the one training backward (no second backward)")
    instances: bool = opt(True, "per-instance G-effects (instances.csv), the Fig. 5b pairs and per-token G-effects; "
                                "off (--no-instances): the layer groups' G-effects and the conflict statistics only. "
                                "For GA and GD (gradients proportional to the risks') these then come from three dot "
                                "products per tensor over the training backward split into its two parts, without "
                                "per-instance products; other objectives, or --direction update, still take "
                                "per-instance values and write only their group means")
    pairs_every: int = opt(5, "every k steps, for each forget instance, the G-effect of its own objective term on "
                              "the forget and on the retain risk (the paper's Fig. 5b; pairs.csv), from the "
                              "captured pass (no extra backward); 0 = off", min=0)
    tokens_every: int = opt(5, "every k steps, the G-effect on each forget answer token's NLL (tokens.csv "
                               "'geffect'), by one forward-mode pass; 0 = off", min=0)
    stream: bool = opt(True, "take each module's inner products the moment the backward completes its gradient "
                             "and free what was captured for it (off: after the backward); applies along ∇L with one "
                             "micro-batch and no PCGrad (the pairs steps included)")
    instance_form: str = opt("auto", "where the Linear layers' per-instance products come from along ∇L: on = "
                                     "formed inside the training backward as each row's own weight gradient, "
                                     "tile by tile (memory-bound passes), off = one extra product per layer "
                                     "(matmul or Gram form, compute-bound); the same values up to rounding. auto "
                                     "= on CPU, a run of a model with 10M+ Linear weights times both on its first "
                                     "steps (after one: on, off, and where those two differ by under a fifth: off, on) and keeps the faster "
                                     "(summary.json's instance_form; reruns may then differ by rounding: fix it "
                                     "with on/off); smaller models: on; off elsewhere (on a GPU unmeasured)", choices=("auto", "on", "off"))
    blocks_path: str | None = opt(None, "dotted name of the ModuleList of transformer blocks, for a model whose "
                                         "blocks geffect cannot find (e.g. model.layers)")
    group_map: str | None = opt(None, "explicit layer groups for modules geffect cannot place: "
                                      "'prefix=group,prefix=group' (groups: embed, shallow, middle, deep, lm)")
    eval_every: int = opt(0, "every k steps, and before the first and after the last, TOFU's metrics of a sample "
                             "of the forget and retain sets (probability, ROUGE-L recall of greedy answers, truth "
                             "ratio, model utility; forget quality with --eval-reference) into eval.csv; 0 = off",
                          min=0)
    eval_size: int = opt(8, "forget and retain items per --eval-every evaluation, a seeded sample (0: all)", min=0)
    eval_max_new_tokens: int = opt(24, "greedy answer length limit of the --eval-every evaluations", min=1)
    eval_reference: str | None = opt(None, "forget truth ratios of a model never trained on the forget set, for "
                                           "forget quality in eval.csv: an eval.json, TOFU logs, or a model "
                                           "(see geffect eval --reference)")
    reuse_backward: bool = opt(True, "when the objective is a per-instance reweighting of the NLL (GA, GD, NPO, "
                                     "SimNPO …), derive the risk cotangents from the training backward instead "
                                     "of an extra backward")


@dataclass
class DiagnoseConfig:
    """Settings of ``geffect diagnose``."""
    methods: list[str] | None = field(default=None, metadata={
        "help": "candidate methods (default: every forget objective alone, +gd, +kl, and +pcgrad variants)"})
    steps: int = opt(2, "profiled optimizer steps per candidate (K)", min=1)
    lr: float = opt(2e-5, "learning rate of every candidate (no warm-up)", gt=0)
    forget_batch: int = opt(2, "forget samples per step (small: 44 candidates)", min=1)
    retain_batch: int = opt(2, "retain samples per step", min=1)
    eval_retain: int = opt(8, "retain samples in the NLL check (plus the whole forget set)", min=1)
    eval: bool = opt(False, "also measure TOFU's metrics (forget probability, ROUGE-L recall, truth ratio, model "
                            "utility) of each candidate's weights after its steps, on --eval-size items per split, "
                            "so the ranking can be checked against the outcome")
    eval_size: int = opt(8, "forget and retain items of the --eval measurement, a seeded sample (0: all)", min=0)


@dataclass
class SpungeConfig:
    """Settings of ``geffect spunge`` (split the forget set, unlearn each part, merge with TIES)."""
    split_by: str = opt("genre", "record field to split the forget set by (e.g. genre, author, group); every "
                                 "forget record must have it")
    min_split: int = opt(2, "fewest forget records a split may have", min=1)
    small_splits: str = opt("error", "splits below --min-split: error, or pool them into one split named 'pooled'",
                            choices=("error", "pool"))
    merge: str = opt("ties", "how the split runs' models are merged", choices=("ties", "task-arithmetic"))
    density: float = opt(0.2, "TIES: share of each task vector's entries kept (by magnitude)", gt=0, max=1)
    lam: float = opt(1.0, "scale λ of the merged task vector (θ = θ_base + λ·τ)", gt=0)
    trim: str = opt("tensor", "TIES trim scope: per tensor (PEFT, mergekit) or over the whole model (original TIES)",
                    choices=("tensor", "model"))
    compare: bool = opt(True, "also run the method on the whole forget set with the same steps (the plain "
                              "baseline of the per-attribute table)")
    profile: bool = opt(False, "profile every run (G-effects per layer group of each split's run, side by side)")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def validate(obj) -> None:
    """Check every field of a config dataclass against its metadata; raise :class:`ConfigError`
    naming the first bad option (``--option value: what it accepts``)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, meta, name = getattr(obj, f.name), f.metadata, flag(f.name)
        if value is None:
            continue
        typ = _base_type(hints[f.name])
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if typ in (int, float, str, bool) and not isinstance(value, typ) or typ is int and isinstance(value, bool):
            raise ConfigError(f"{name} {value!r}: expected {typ.__name__}")
        if typ is float and not math.isfinite(value):
            raise ConfigError(f"{name} {value!r}: must be a finite number")
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{name} {value!r}: choose one of {', '.join(map(str, meta['choices']))}")
        if "min" in meta and value < meta["min"]:
            raise ConfigError(f"{name} {value!r}: must be ≥ {meta['min']}")
        if "gt" in meta and not value > meta["gt"]:
            raise ConfigError(f"{name} {value!r}: must be > {meta['gt']}")
        if "max" in meta and value > meta["max"]:
            raise ConfigError(f"{name} {value!r}: must be ≤ {meta['max']}")


def parse_group_map(text: str | None) -> dict[str, str] | None:
    """``--group-map 'cls.predictions=lm,bert.pooler=deep'`` as {module name prefix: group}."""
    if not text:
        return None
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        prefix, eq, group = item.partition("=")
        if not eq or not prefix or group not in ("embed", "shallow", "middle", "deep", "lm"):
            raise ConfigError(f"--group-map {text!r}: expected prefix=group items with groups embed, shallow, "
                              f"middle, deep or lm, got {item!r}")
        out[prefix.strip()] = group.strip()
    return out


def parse_boundaries(text: str | None) -> tuple[int, int] | None:
    """``--boundaries b1,b2`` as two non-negative integers b1 ≤ b2 (checked against the depth later)."""
    if not text:
        return None
    try:
        b1, b2 = (int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"--boundaries {text!r}: expected two integers 'b1,b2'") from None
    if not 0 <= b1 <= b2:
        raise ConfigError(f"--boundaries {text!r}: expected 0 ≤ b1 ≤ b2")
    return b1, b2
