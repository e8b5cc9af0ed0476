"""DoRA fine-tuning of the Stable Audio 3 DiT: the adapter layer, applying/merging it, and adapter files.

A frozen layer's weight is viewed as a 2-D W0 [out, in·k] (Linear: k = 1; Conv1d: kernel size k). It gets a
low-rank update B·A (A [rank, in·k], B [out, rank]), a scale s = alpha/rank and a strength γ (default 1):

    lora:       W' = W0 + s·γ·B·A
    dora-rows:  W' = m ⊙ V / (‖V‖_row + 1e-12),   V = W0 + s·γ·B·A,   m [out]

‖·‖_row is the L2 norm of each output row, i.e. one magnitude per output unit (over its in·k inputs). These are
the semantics of the official trainer's `dora-rows` (stable_audio_3/models/lora/model.py): the norm is NOT
detached, so it passes gradient to A and B. `detach_norm=True` treats ‖V‖ as a constant, as the DoRA paper
(§4.3) and PEFT do to save memory; here it saves nothing, because V is never built (see `DoRA.row_scale`).

Adapter files use the official layout, so they move both ways between this project and the official code:
safetensors keys `<module>.parametrizations.weight.0.{lora_A, lora_B, magnitude}` with module names relative to
the adapter roots (`model.` = the DiT wrapper, `conditioners.` = the conditioner), and the metadata key
`lora_config` = JSON {rank, alpha, adapter_type, dropout, include, exclude}.
"""
import copy
import json
import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import load_safetensors, read_safetensors_metadata, save_safetensors

KINDS = ("dora-rows", "lora")  # adapter types implemented here; the official name "dora" means "dora-rows"


# ----------------------------------------------------------------------------------------------------------------
# The adapter layer

class DoRALinear(torch.autograd.Function):
    """A dora-rows Linear, y = c ⊙ (x·W0ᵀ + sγ·(x·Aᵀ)·Bᵀ) + b with c = m/n [out], as one autograd step; with c = None
    the lora Linear, y = x·W0ᵀ + sγ·(x·Aᵀ)·Bᵀ + b.

    Why it exists: autograd on that expression makes a fresh output-sized (N, out) tensor for each elementwise step
    (x·W0ᵀ, z·Bᵀ, sγ·, +, ⊙ c, + b; g ⊙ c and g ⊙ h in the backward) and saves h. Each is a memory pass, and on CPU
    a fresh allocation that page-faults. Here the forward writes y once, in place, and saves y itself instead of h
    (lora saves only x and z); the backward makes one (N, out) tensor, g ⊙ c, and then reuses it for Σ g ⊙ h. Needs
    c ≠ 0 in every row, so that h = (y − b)/c is recoverable: DoRA uses it only where W0 has no all-zero row (m
    starts at ‖W0‖_row > 0). W0 and b are frozen, so they get no gradient.
    """

    @staticmethod
    def forward(ctx, x, W0, b, A, B, c, sg):
        x2 = x.reshape(-1, x.shape[-1])                                 # (N, in)
        z, W0t = x2 @ A.T, W0.T                                         # (N, rank), (in, out)
        # y = c ⊙ (x·W0ᵀ + sγ·z·Bᵀ) + b,  in place in the one (N, out) tensor (c = 1 for lora)
        y = (x2 @ W0t).addmm_(z, B.T, alpha=sg)
        if c is not None:
            y.mul_(c)
        if b is not None:
            y.add_(b)
        ctx.save_for_backward(x2, W0t, b, A, B, c, z, None if c is None else y)
        ctx.sg, ctx.x_shape = sg, x.shape
        return y.view(*x.shape[:-1], -1)                                # (..., out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x2, W0t, b, A, B, c, z, y = ctx.saved_tensors
        g = g.reshape(-1, W0t.shape[1])                                 # (N, out)
        gh = g if c is None else g * c                                  # ∂h = g ⊙ c
        gz = (gh @ B).mul_(ctx.sg)                                      # ∂z = sγ·∂h·B  (N, rank)
        gx = None
        if ctx.needs_input_grad[0]:  # as autograd would, skip ∂x when x needs none
            gx = (gh @ W0t.T).addmm_(gz, A).view(ctx.x_shape)           # ∂x = ∂h·W0 + ∂z·A
        gA, gB = gz.T @ x2, ctx.sg * (gh.T @ z)                         # ∂A = ∂zᵀ·x,  ∂B = sγ·∂hᵀ·z
        gc = None
        if c is not None:  # ∂c = Σ_tokens g ⊙ h,  h = (y - b)/c;  computed in gh's memory, which is free now
            hs = gh.copy_(y) if b is None else torch.sub(y, b, out=gh)
            gc = hs.mul_(g).sum(0) / c
        return gx, None, None, gA, gB, gc, None


class DoRA(nn.Module):
    """A frozen nn.Linear or nn.Conv1d (`self.base`) plus trainable lora_A, lora_B and (dora-rows) magnitude.

    Dtypes: the adapter tensors are fp32 whatever the base dtype (fp64 for an fp64 base). Activations follow the
    plain layer's rules (the input dtype, or autocast's), with A and B cast to them. The row norms are computed in
    fp32 from one product W0·Aᵀ taken in the base weight's dtype, so no fp32 copy of a bf16 weight is made.
    Wrap after moving/casting the base: the cached ‖W0‖²_row belongs to the weight as it was wrapped.
    """

    def __init__(self, base, rank, alpha, kind="dora-rows", strength=1.0, detach_norm=False, dropout=0.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r}; expected one of {KINDS}")
        if isinstance(base, nn.Conv1d) and (base.groups != 1 or base.padding_mode != "zeros"):
            raise ValueError(f"Conv1d groups={base.groups} padding_mode={base.padding_mode!r}; "
                             f"expected groups=1 and padding_mode='zeros'")
        W0 = base.weight.detach().flatten(1)                            # (out, in·k)
        dtype = torch.promote_types(W0.dtype, torch.float32)            # fp32 (fp64 only for an fp64 base)
        self.base = base.requires_grad_(False)
        self.kind, self.scale, self.strength, self.detach_norm = kind, alpha / rank, strength, detach_norm
        self.dropout = nn.Dropout(dropout)
        # A ~ U(±1/√(in·k)) (kaiming-uniform, a=√5), B = 0: B·A = 0, so the layer starts equal to the base
        self.lora_A = nn.Parameter(torch.empty(rank, W0.shape[1], dtype=dtype, device=W0.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = nn.Parameter(torch.zeros(W0.shape[0], rank, dtype=dtype, device=W0.device))
        self.register_buffer("w0_sq", W0.to(dtype).square().sum(1), persistent=False)  # ‖W0‖²_row  (out,)
        if kind == "dora-rows":
            self.magnitude = nn.Parameter(self.w0_sq.sqrt())            # m = ‖W0‖_row  (out,)
        self.fused = isinstance(base, nn.Linear) and (kind == "lora" or bool(self.w0_sq.all()))

    @property
    def weight(self):
        """The frozen W0 (as PEFT's wrappers expose it), so code that asks a layer for its dtype or device still
        works on a wrapped one. The adapted weight W' is merged_weight()."""
        return self.base.weight

    def _map(self, x, W):
        """x·Wᵀ for a weight W [o, in·k]: the base layer's own map (Linear, or Conv1d with its stride/padding)."""
        if isinstance(self.base, nn.Linear):
            return F.linear(x, W)                                       # (..., o)
        b = self.base
        return F.conv1d(x, W.view(len(W), -1, b.kernel_size[0]), None, b.stride, b.padding, b.dilation)  # (B, o, T')

    def _mix(self, z, B):
        """z·Bᵀ over the channel axis: the last axis for Linear, axis 1 for Conv1d."""
        return F.linear(z, B) if isinstance(self.base, nn.Linear) else F.conv1d(z, B[:, :, None])

    def row_scale(self, A):
        """m / (‖W0 + sγ·B·A‖_row + 1e-12) without building the weight-sized V. Shape (out,)."""
        W0, B, sg = self.base.weight.flatten(1), self.lora_B, self.scale * self.strength
        with torch.autocast(W0.device.type, enabled=False):  # autocast would cast an fp32 W0 and save the copy
            W0At = (W0 @ A.to(W0.dtype).T).to(B.dtype)                  # (out, rank)
            # n² = ‖W0‖²_row + 2sγ·rowsum(B ⊙ W0·Aᵀ) + (sγ)²·rowsum(B ⊙ B·(A·Aᵀ))
            n2 = self.w0_sq + 2 * sg * (B * W0At).sum(1) + sg**2 * (B * (B @ (A @ A.T))).sum(1)
        n = n2.clamp_min(1e-24).sqrt()  # clamp ≥ 0 against rounding; 1e-24 keeps the gradient finite on a zero row
        return self.magnitude / ((n.detach() if self.detach_norm else n) + 1e-12)

    def forward(self, x):
        if self.strength == 0:  # as in the official code: strength 0 is the base layer, also for dora-rows
            return self.base(x)
        conv, b, sg = isinstance(self.base, nn.Conv1d), self.base.bias, self.scale * self.strength
        A = self.lora_A * self.dropout(torch.ones_like(self.lora_A[:1]))  # official input-feature dropout on A
        c = self.row_scale(A) if self.kind == "dora-rows" else None       # c = m/n  (out,)
        autocast = torch.is_autocast_enabled(x.device.type)
        ct = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype  # the activations' dtype
        # A Linear is one DoRALinear step; Conv1d (the DiT's two are 1×1 and tiny) and a dora-rows W0 with an
        # all-zero row (its m starts at 0, where DoRALinear can't recover h) take the plain autograd path below.
        if self.fused:
            W0 = self.base.weight
            if autocast:  # cast once, as autocast would for F.linear, so that the Function saves the casts
                x, W0, b = x.to(ct), W0.to(ct), None if b is None else b.to(ct)
            return DoRALinear.apply(x, W0, b, A.to(ct), self.lora_B.to(ct), None if c is None else c.to(ct), sg)
        # h = x·W0ᵀ + sγ·(x·Aᵀ)·Bᵀ
        h = self._map(x, self.base.weight) + sg * self._mix(
            self._map(x, A.to(x.dtype)), self.lora_B.to(x.dtype))       # (..., out) or (B, out, T')
        if c is not None:
            # y = c ⊙ h + b  =  x·W'ᵀ + b
            c = c.to(h.dtype)
            h = h * (c[:, None] if conv else c)
        return h if b is None else h + (b[:, None] if conv else b).to(h.dtype)

    @torch.no_grad()
    def merged_weight(self):
        """W' in the base weight's shape and dtype (computed in the adapter dtype)."""
        W0 = self.base.weight
        if self.strength == 0:
            return W0.clone()
        # V = W0 + sγ·B·A
        V = W0.flatten(1).to(self.lora_B.dtype) + self.scale * self.strength * self.lora_B @ self.lora_A
        if self.kind == "dora-rows":
            V = V * self.row_scale(self.lora_A)[:, None]               # W' = (m/n) ⊙ V
        return V.view_as(W0).to(W0.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Which layers: roots and include/exclude filters (as the official trainer)

def _roots(model):
    """StableAudioModel: the official roots, the DiT wrapper (names `model.…`) and the conditioner
    (`conditioners.…`). Any other module: the module itself."""
    return [model.model, model.conditioner] if hasattr(model, "model") and hasattr(model, "conditioner") else [model]


def _expand(pattern):
    """Official range syntax: 'layers.[0-2].' → ['layers.0.', 'layers.1.', 'layers.2.'] (several ranges multiply)."""
    parts = re.split(r"\[(\d+)-(\d+)\]", pattern.strip())
    out = [parts[0]]
    for a, b, literal in zip(parts[1::3], parts[2::3], parts[3::3]):
        a, b = int(a), int(b)
        step = 1 if b >= a else -1
        out = [o + str(i) + literal for o in out for i in range(a, b + step, step)]
    return out


def _matches(name, patterns):
    """True when the module name contains any expanded pattern as a substring."""
    return any(p in name for pattern in patterns for p in _expand(pattern))


def _adapters(model):
    """(root, name, DoRA) for every adapter, names relative to their root."""
    return [(root, name, m) for root in _roots(model) for name, m in root.named_modules() if isinstance(m, DoRA)]


# ----------------------------------------------------------------------------------------------------------------
# Apply, train, merge

def apply_dora(model, rank=16, alpha=16, include=(), exclude=(), kind="dora-rows", strength=1.0,
               detach_norm=False, dropout=0.0):
    """Replace every nn.Linear / nn.Conv1d under the adapter roots whose name contains an `include` pattern (all
    if empty) and no `exclude` pattern (exclude wins) by a DoRA wrapper. Returns the wrapped names.
    Defaults are the official CLI's (rank 16, alpha = rank, dora-rows, all Linear/Conv1d of DiT + conditioner)."""
    if isinstance(include, str) or isinstance(exclude, str):
        raise TypeError("apply_dora: include/exclude must be lists of patterns, not a str")
    if _adapters(model):
        raise ValueError("apply_dora: model already has adapters; merge_dora(model) first to stack another")
    names = []
    for root in _roots(model):
        for name, layer in list(root.named_modules()):
            if (isinstance(layer, (nn.Linear, nn.Conv1d)) and (not include or _matches(name, include))
                    and not _matches(name, exclude)):
                root.set_submodule(name, DoRA(layer, rank, alpha, kind, strength, detach_norm, dropout))
                names.append(name)
    # the official lora_config; an empty filter is None there (an empty include list would match nothing)
    model.lora_config = {"rank": rank, "alpha": alpha, "adapter_type": kind, "dropout": dropout,
                         "include": list(include) or None, "exclude": list(exclude) or None}
    return names


def adapter_parameters(model):
    """{file key: Parameter} of every adapter tensor, keys in the official layout. The optimizer trains only these."""
    return {f"{name}.parametrizations.weight.0.{p}": t
            for _, name, m in _adapters(model) for p, t in m.named_parameters(recurse=False)}


@torch.no_grad()
def merge_dora(model, keep_base=True):
    """Put a plain layer holding W' in place of each adapter (for inference). keep_base=True: the plain layer is a
    copy and the adapters (still holding W0) are returned for unmerge_dora. keep_base=False: W' overwrites W0 in
    place, so no second weight copy exists, and the adapters are dropped (returns [])."""
    merged = _adapters(model)
    for root, name, mod in merged:
        layer = copy.deepcopy(mod.base) if keep_base else mod.base
        layer.weight.copy_(mod.merged_weight())
        root.set_submodule(name, layer)
    return merged if keep_base else []


def unmerge_dora(merged):
    """Undo merge_dora(model, keep_base=True): put the adapters back; their base layers hold W0 bit-exactly."""
    for root, name, mod in merged:
        root.set_submodule(name, mod)


# ----------------------------------------------------------------------------------------------------------------
# Adapter files (official layout)

def save_adapter(model, path, metadata=None, dtype=torch.float32):
    """Write the adapter tensors (as `dtype`; the official export uses fp16) and metadata {lora_config, **metadata}
    atomically (save_safetensors)."""
    params = adapter_parameters(model)
    if not params:
        raise ValueError("save_adapter: model has no adapters; expected apply_dora or load_adapter first")
    if metadata and "lora_config" in metadata:
        raise ValueError("save_adapter: metadata key 'lora_config' is reserved for the adapter config")
    tensors = {k: p.detach().to("cpu", dtype).contiguous() for k, p in params.items()}
    save_safetensors(tensors, path, {**(metadata or {}), "lora_config": json.dumps(model.lora_config)})


def lora_config(path, text):
    """An adapter file's `lora_config` metadata, checked field by field (one line naming the field)."""
    try:
        cfg = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        cfg = None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: metadata lora_config is not a JSON object")
    bad = lambda field, expected: ValueError(f"{path}: lora_config {field}={cfg.get(field)!r} (expected {expected})")
    if cfg.get("adapter_type", "lora") not in (*KINDS, "dora"):
        raise bad("adapter_type", f"one of {', '.join(KINDS)} or 'dora'")
    rank = cfg.get("rank")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise bad("rank", "an integer >= 1")
    number = lambda v: not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if not number(cfg.get("alpha", rank)) or cfg.get("alpha", rank) <= 0:
        raise bad("alpha", "a finite number > 0")
    if not number(cfg.get("dropout", 0.0)) or not 0 <= cfg.get("dropout", 0.0) < 1:
        raise bad("dropout", "a number in [0, 1)")
    for field in ("include", "exclude"):
        if cfg.get(field) is not None and (not isinstance(cfg[field], list)
                                           or not all(isinstance(p, str) for p in cfg[field])):
            raise bad(field, "null or a list of name patterns")
    return cfg


def load_adapter(model, path, strength=1.0):
    """Load an adapter file (fp16/bf16/fp32) into the model's adapters, creating them from the file's lora_config
    if the model has none, and set their strength. Returns the file's metadata.
    To stack adapters, merge_dora(model) after each load: the next one then adapts W', i.e. W'' = P2(P1(W))."""
    meta = read_safetensors_metadata(path)
    if "lora_config" not in meta:
        raise ValueError(f"{path}: no 'lora_config' metadata; expected an official-layout adapter file")
    cfg = lora_config(path, meta["lora_config"])
    kind = cfg.get("adapter_type", "lora")  # official defaults: adapter_type lora, alpha = rank, no filters
    kind = "dora-rows" if kind == "dora" else kind
    rank, alpha = cfg["rank"], cfg.get("alpha", cfg["rank"])
    tensors = load_safetensors(path)
    ranks = {tuple(t.shape[:1]) for k, t in tensors.items() if k.endswith(".lora_A")}
    if ranks - {(rank,)}:  # checked before the adapters are built: a rank of 10**9 would allocate without end
        raise ValueError(f"{path}: lora_config rank={rank} but the file's lora_A tensors have "
                         f"{sorted(r[0] if r else 0 for r in ranks)} rows")
    if not _adapters(model):
        apply_dora(model, rank, alpha, cfg.get("include") or (), cfg.get("exclude") or (), kind,
                   dropout=cfg.get("dropout", 0.0))
    have = sorted({(m.kind, m.lora_A.shape[0], m.scale) for _, _, m in _adapters(model)})
    if have != [(kind, rank, alpha / rank)]:
        raise ValueError(f"{path}: lora_config (adapter_type, rank, alpha/rank) = {(kind, rank, alpha / rank)} "
                         f"disagrees with the model's adapters {have}")
    params = adapter_parameters(model)
    missing = [k for k in params if k not in tensors]
    unexpected = [k for k in tensors if k not in params]
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(p.shape)}"
              for k, p in params.items() if k in tensors and tensors[k].shape != p.shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{path}: keys do not match the model: {len(missing)} missing {missing[:2]}, "
                         f"{len(unexpected)} unexpected {unexpected[:2]}, {len(shapes)} shapes differ {shapes[:2]}")
    for k, t in tensors.items():  # a NaN here would turn every output into noise
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {k!r} ({t.dtype}) is not all finite floats (expected finite "
                             f"floating-point values)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[k])
    for _, _, m in _adapters(model):
        m.strength = strength
    return meta
