"""
Fine-tune Stable Audio 3 with DoRA and the Eisbach barrier:  python train.py --data musiccaps/ --steps 1000

This file owns training: the objective (rectified flow with truncated logit-normal timesteps, the config's length
shift, exact minibatch OT noise coupling, CFG dropout, inpainting masks, the barrier-weighted loss), the loop,
checkpoints that resume bit-exactly, and multi-GPU. The recipe is the Eisbach card's (DoRA-rows rank/alpha 16,
λ 0.5, AdamW 5e-5 (0.9, 0.95), batch 4, 60 s crops, 1000 steps); where the card is silent it follows the official Stable Audio 3
trainer (github Stability-AI/stable-audio-3, 636f906; shared/sa3_facts.md §7.3), which trains text-to-audio and
inpainting together, and so does this one: 20 % of the items get a random inpainting mask whose kept frames the DiT
sees as context (its local cond [mask, x0·mask]), the rest a full mask (text to audio), so that fine-tuning does
not train the model away from inpainting and continuation. --inpaint-prob 0 trains text-to-audio only.

Every random number of batch item j at step s comes from its own generator seeded by (seed, s, j), and the data
order is a fixed permutation per epoch, so a run resumed from any checkpoint continues exactly as if it had never
stopped. Multi-GPU: torchrun --nproc_per_node=G train.py ... (DDP; NCCL on GPU, gloo on CPU). --batch-size is the
global batch: each of the G processes takes batch_size/G items of it, so the recipe does not change with G.
Each line of <out>/log.jsonl is one step: its loss, mean Ĥ and w, and "items", one entry per item of the global
batch: {"H", "w", "t", "kind", "file"} (H and w null for an item without generated frames; kind from the synthetic
label beside the audio, null without one), what eval.py barrier-stats summarises.
One train.py at a time per run folder (<out>/lock); every file in it is written atomically, so a kill or a full
disk leaves the last checkpoint whole.
"""
import argparse
import contextlib
import dataclasses
import fcntl
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import dora
from barrier import barrier_loss
from model import (TINY_MODEL, StableAudioModel, load_safetensors, read_safetensors_metadata, save_safetensors,
                   write_atomic)


@dataclass
class TrainConfig:
    data: str = ""                  # dataset folder: MusicCaps, audiofolder (metadata.csv/jsonl) or wav+txt layout
    model: str = ""                 # model folder in the official layout; empty: the embedded tiny model
    out: str = ""                   # run folder; empty: runs/<data folder name>
    split: str = "all"              # MusicCaps: all | train | eval (by is_audioset_eval)
    steps: int = 1000               # Eisbach card
    batch_size: int = 4             # Eisbach card; the global batch (split over processes and accumulation)
    grad_accum: int = 1             # micro-batches per step on each process
    crop_seconds: float = 60.0      # Eisbach card: 60 s crops
    lr: float = 5e-5                # Eisbach card
    beta1: float = 0.9              # Eisbach card and the official trainer
    beta2: float = 0.95
    weight_decay: float = 0.01      # official trainer
    rank: int = 16                  # Eisbach card: DoRA-rows rank 16, alpha 16
    alpha: float = 16.0
    kind: str = "dora-rows"         # dora-rows | lora
    lam: float = 0.5                # Eisbach card: barrier strength λ (0 = plain masked MSE)
    tau: float = 1.0                # barrier temperature τ (1: p is each frame's share of the energy)
    cfg_dropout: float = 0.1        # official trainer: the text cond is zeroed for 10% of items
    inpaint_prob: float = 0.2       # official trainer: random segments 0.1, causal 0.1, full 0.8 (0: t2a only)
    max_mask_segments: int = 10     # official trainer: 1..10 random segments
    mask_loss_weight: float = 1.0   # official train_lora.py: weight of the context loss (MSE on the kept frames)
    trunc: float = 0.075            # official trainer: truncated logit-normal timesteps
    ot: bool = True                 # exact minibatch OT coupling of noise to latents
    pad_extend_seconds: float = 4.0  # official trainer: the padding mask reaches Exp(mean 4 s) into the silence
    seed: int = 42                  # official trainer
    save_every: int = 250           # checkpoint every N steps (and on exit, SIGINT and SIGTERM)
    keep: int = 3                   # checkpoints kept
    checkpointing: int = 0          # recompute every k-th DiT block in backward (long crops on small GPUs; 2: bench.py)
    fused: bool = False             # barrier through torch.compile (one fused kernel)
    device: str = ""                # empty: cuda when available, else cpu
    resume: str = ""                # a checkpoint, or "latest" (also: --resume with no value)
    merge: bool = False             # also write a merged model folder (official layout) at the end
    sample_sampler: str = "pingpong"  # the sampling recommendation written into the adapter (Eisbach card)
    sample_steps: int = 8
    sample_cfg: float = 3.0


# -----------------------------------------------------------------------------------------------------------------
# The objective, one short function per term

def logit_normal_t(z, trunc):
    """Truncated logit-normal timesteps from standard normal draws z (official trainer, t = 1 is noise):
    q' = lo + (1 − lo)·Φ(z), lo = Φ(logit(trunc)); τ = sigmoid(Φ⁻¹(q')); t = 1 − (τ − trunc)/(1 − trunc)."""
    lo = torch.special.ndtr(torch.logit(torch.tensor(trunc, dtype=torch.float64)))
    tau = torch.sigmoid(torch.special.ndtri(lo + (1 - lo) * torch.special.ndtr(z.double())))
    return (1 - (tau - trunc) / (1 - trunc)).float()


def shift_t(t, length, options):
    """The config's training shift ("full") with each item's effective length L (official trainer):
    α = exp(base + (max_shift − base)·(L − min)/(max − min)), L clamped to [min, max];  t' = α·t/(1 + (α − 1)·t)."""
    if options is None:
        return t
    if options.get("type", "full") != "full":
        raise ValueError(f"model_config.json: model.diffusion.distribution_shift_options.type="
                         f"{options['type']!r} is not supported (expected 'full')")
    lo, hi = options.get("min_length", 256), options.get("max_length", 4096)
    base, top = options.get("base_shift", 0.5), options.get("max_shift", 1.15)
    alpha = torch.exp(base + (top - base) * (length.clamp(lo, hi) - lo) / (hi - lo))
    return alpha * t / (1 + (alpha - 1) * t)


def hungarian(cost):
    """Exact minimum-cost assignment (Kuhn–Munkres with potentials, O(n³)). cost: (n, n) -> col, row i ↔ col[i]."""
    n = len(cost)
    if not all(math.isfinite(c) for row in cost for c in row):  # a NaN never compares below delta: it would spin
        raise ValueError("hungarian: the cost matrix has NaN or inf entries (expected finite costs)")
    u, v, match, way = [0.0] * (n + 1), [0.0] * (n + 1), [0] * (n + 1), [0] * (n + 1)  # 1-based; column 0 is a dummy
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        slack, used = [math.inf] * (n + 1), [False] * (n + 1)
        while match[j0]:  # grow an alternating tree from row i until it reaches a free column
            used[j0], i0, delta, j1 = True, match[j0], math.inf, 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if reduced < slack[j]:
                        slack[j], way[j] = reduced, j0
                    if slack[j] < delta:
                        delta, j1 = slack[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    slack[j] -= delta
            j0 = j1
        while j0:  # flip the augmenting path
            match[j0] = match[way[j0]]
            j0 = way[j0]
    col = [0] * n
    for j in range(1, n + 1):
        col[match[j] - 1] = j - 1
    return col


def ot_pair(x0, noise):
    """Minibatch OT coupling: permute the noises to the exact minimum of Σ_i ‖x0_i − ε_π(i)‖² over permutations π."""
    cost = torch.cdist(x0.flatten(1).double(), noise.flatten(1).double()).square()
    return noise[hungarian(cost.tolist())]


# -----------------------------------------------------------------------------------------------------------------
# Batches: data order and all randomness are pure functions of (seed, step, item)

def item_generator(seed, step, j):
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_003 + j)


def batch_indices(n, seed, step, batch):
    """Dataset indices of the global batch at `step`: consecutive items of a fresh permutation per epoch."""
    first = step * batch
    out = []
    for pos in range(first, first + batch):
        epoch, k = divmod(pos, n)
        out.append(torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[k].item())
    return out


def inpaint_mask(valid, T, generator, prob=0.2, max_segments=10):
    """The official trainer's random inpainting mask (models/inpainting.py `random_inpaint_mask`, probabilities
    [0.1, 0.8, 0.1], mask_padding on) for one item: (T,) float, 1 = keep (given to the DiT as context), 0 = generate.
    With probability prob/2 random segments: n ~ U{1..max_segments} segments (they may overlap), each of length
    U{1..max(1, valid // n)} starting at U{0..valid − length}; prob/2 causal: a kept prefix of U{0..valid} frames;
    otherwise a full mask (everything generated: text to audio). Frames from `valid` on are always 0 (padding is
    never context). Draws only from `generator`; prob = 0 draws nothing."""
    mask = torch.zeros(T)
    if prob == 0:
        return mask
    u = torch.rand(1, generator=generator).item()  # the mask type: [0, prob/2) segments, [prob/2, prob) causal
    if u >= prob or valid == 0:
        return mask
    randint = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=generator))  # U{lo..hi}
    mask[:valid] = 1
    if u < prob / 2:
        n = randint(1, max_segments)
        for _ in range(n):
            length = randint(1, max(1, valid // n))
            start = randint(0, valid - length)
            mask[start:start + length] = 0
    else:
        mask[randint(0, valid):valid] = 0
    return mask


def check_finite(dataset, rows, items):
    """A NaN or inf in an item's cached latents stops the run naming that item's file (before the OT pairing)."""
    for r, (_, index) in zip(rows, items):
        if not torch.isfinite(r["latents"]).all():
            raise FloatingPointError(f"{dataset.entries[index]['path']}: the cached latents of clip {r['key']!r} "
                                     f"hold NaN/inf; delete the file to re-encode it, or remove the clip")


def make_batch(dataset, model, cfg, step, items):
    """items: [(global position j, dataset index)] at global step `step` -> the training tensors of one
    micro-batch, a pure function of (cfg.seed, step, j) (dataset: a data.LatentDataset; cfg: a TrainConfig):
    x0, noise (B, C, T) latents and their (OT-paired) noise; t (B,) timesteps (1 = noise); mask (B, T) bool, the
    valid frames (padding extended); inpaint (B, T) float, 1 = a frame given as context, 0 = generate (always 0
    on padding); drop (B,) bool, CFG dropout; prompts, seconds (seconds_total), keys (clip names).
    T is cut after the batch's last valid frame."""
    rows = []
    ratio = model.pretransform.model.downsampling_ratio
    for j, index in items:
        g = item_generator(cfg.seed, step, j)
        ex = dataset.get(index, g)                                        # crop, polarity
        T, valid = len(ex["mask"]), int(ex["mask"].sum())
        # padding mask extended by Exp(mean pad_extend_seconds) latents into the silence
        extend = int(torch.empty(1).exponential_(generator=g).item() * cfg.pad_extend_seconds * model.latent_rate)
        ex["mask"] = torch.arange(T) < min(valid + extend, T)
        ex["z"] = torch.randn(1, generator=g)                             # for the timestep
        ex["noise"] = torch.randn(ex["latents"].shape, generator=g)
        ex["drop"] = torch.rand(1, generator=g).item() < cfg.cfg_dropout
        ex["length"] = math.ceil(int(ex["seconds_total"] * model.sample_rate) / ratio)
        # drawn last, so every draw above is the same at any inpaint_prob
        ex["inpaint"] = inpaint_mask(int(ex["mask"].sum()), T, g, cfg.inpaint_prob, cfg.max_mask_segments)
        rows.append(ex)
    check_finite(dataset, rows, items)
    # Frames after the batch's last valid frame change nothing (excluded from attention and loss): cut them, so a
    # 60 s crop of 10 s clips costs what 16 s would.
    T = max(int(r["mask"].sum()) for r in rows)
    x0 = torch.stack([r["latents"][:, :T] for r in rows])                 # (B, C, T)
    noise = torch.stack([r["noise"][:, :T] for r in rows])
    t = logit_normal_t(torch.cat([r["z"] for r in rows]), cfg.trunc)
    t = shift_t(t, torch.tensor([float(r["length"]) for r in rows]), model.distribution_shift)
    return {"x0": x0, "noise": ot_pair(x0, noise) if cfg.ot and len(rows) > 1 else noise, "t": t,
            "mask": torch.stack([r["mask"][:T] for r in rows]), "drop": torch.tensor([r["drop"] for r in rows]),
            "inpaint": torch.stack([r["inpaint"][:T] for r in rows]),
            "prompts": [r["prompt"] for r in rows], "seconds": [r["seconds_total"] for r in rows],
            "keys": [r["key"] for r in rows]}


def nonfinite_items(batch, H, w):
    """The clips whose own Ĥ or weight is NaN/inf (the prediction of that item went bad), else the whole batch.
    An item without generated frames has NaN by design (see loss_of): it is not counted."""
    has = (batch["mask"] & (batch["inpaint"] == 0)).any(-1).tolist()
    bad = [k for k, h, wb, g in zip(batch["keys"], H.tolist(), w.tolist(), has) if g and not math.isfinite(h * wb)]
    return bad or batch["keys"]


class Denoiser(nn.Module):
    """Conditioning + one DiT evaluation: the part of the model that holds the adapters, as one module for DDP."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, prompts, seconds, drop, mask, local=None):
        cond = self.model.conditioning(prompts, seconds)
        cross = torch.where(drop[:, None, None], 0.0, cond["cross_attn_cond"])  # CFG dropout: zero text cond
        return self.model.velocity(x, t, cond, mask, local_cond=local, cross_attn_cond=cross)


def loss_of(denoiser, batch, cfg, device, ctx):
    """The loss of one make_batch() batch: (loss, Ĥ (B,), w (B,)), Ĥ and w detached, for logging, as barrier_loss
    computed them; NaN for an item without generated frames (it has neither). denoiser: Denoiser(model) (or its
    DDP wrapper); ctx: the autocast context."""
    x0, noise, t = batch["x0"].to(device), batch["noise"].to(device), batch["t"].to(device)
    mask, keep = batch["mask"].to(device), batch["inpaint"].to(device)
    # x_t = (1 − t)·x0 + t·ε;  target v* = ε − x0;  local cond = [m, x0·m] (m = 1 on the kept frames)
    tb = t[:, None, None]
    x_t = (1 - tb) * x0 + tb * noise
    local = torch.cat([keep[:, None], x0 * keep[:, None]], dim=1)
    with ctx:
        v = denoiser(x_t, t, batch["prompts"], batch["seconds"], batch["drop"].to(device), mask, local).float()
    target = noise - x0
    # The generation loss and the barrier both see only the generated valid frames (m = 0): the barrier judges how
    # the energy of what the model generates is spread in time; kept frames are given, and counting them would
    # make an item's weight depend on how much context it happened to get rather than on the music it generates.
    gen = mask & (keep == 0)
    has = gen.any(-1)  # a causal mask may keep every valid frame: that item has no generation loss (official: 0)
    H = torch.full(has.shape, math.nan, device=device)  # (B,): NaN stays where an item has no generated frame
    w = H.clone()
    if has.any():
        loss, H[has], w[has] = barrier_loss(v[has], target[has], gen[has], cfg.lam, cfg.tau, fused=cfg.fused)
        loss = loss * (int(has.sum()) / len(has))  # L = (1/B)·Σ_b w_b·MSE_b over the generated frames
    else:
        loss = v.sum() * 0
    context = mask & (keep == 1)
    if cfg.mask_loss_weight > 0 and context.any():
        # L += mask_loss_weight·(1/B)·Σ_b MSE_b over the kept valid frames (0 for an item without any)
        se = torch.where(context[:, None, :], (v - target).square(), 0.0).sum((1, 2))
        loss = loss + cfg.mask_loss_weight * (se / (context.sum(-1) * v.shape[1]).clamp_min(1)).mean()
    return loss, H, w


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints: <out>/ckpt-<step>.safetensors (adapter + AdamW state + RNG states) and a .json sidecar written last

def save_checkpoint(out, step, model, optimizer, cfg, position, keep):
    tensors = {f"adapter.{k}": p.detach().cpu() for k, p in dora.adapter_parameters(model).items()}
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        for name, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{i}.{name}"] = value.detach().cpu().reshape(value.shape)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    base = Path(out) / f"ckpt-{step:06d}"
    save_safetensors(tensors, f"{base}.safetensors", {"lora_config": json.dumps(model.lora_config)})
    sidecar = json.dumps({"step": step, "data_position": position, "config": dataclasses.asdict(cfg)}, indent=1)
    write_atomic(f"{base}.json", [sidecar.encode()], len(sidecar))
    for old in sorted(Path(out).glob("ckpt-*.json"))[:-keep]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def latest_checkpoint(out):
    done = sorted(Path(out).glob("ckpt-*.json"))  # the sidecar is written last: its presence means complete
    if not done:
        raise FileNotFoundError(f"{out}: no checkpoint to resume (expected ckpt-*.json)")
    return done[-1].with_suffix(".safetensors")


def load_checkpoint(path, model, optimizer):
    """Restore adapters, AdamW state and the global RNG states; returns the step the checkpoint was taken at."""
    path = Path(path)
    sidecar = path.with_suffix(".json")
    if not path.is_file() or not sidecar.is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (expected it and {sidecar.name})")
    try:
        saved = json.loads(read_safetensors_metadata(path)["lora_config"])
        step = json.loads(sidecar.read_text())["step"]
    except (KeyError, TypeError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError(f"{path}: not a checkpoint of train.py (expected lora_config metadata and a {sidecar.name} "
                         f"with the step)") from None
    if saved != model.lora_config:
        raise ValueError(f"{path}: adapter config {saved} differs from this run's {model.lora_config} "
                         f"(--rank/--alpha/--kind must match to resume)")
    tensors = load_safetensors(path)
    # every adapter tensor, its AdamW moments and the CPU RNG state, in the shapes this run has
    params = optimizer.param_groups[0]["params"]
    expected = {f"adapter.{k}": p.shape for k, p in dora.adapter_parameters(model).items()}
    expected.update({f"adam.{i}.{m}": p.shape for i, p in enumerate(params) for m in ("exp_avg", "exp_avg_sq")
                     if f"adam.{i}.step" in tensors})
    expected["rng.cpu"] = torch.get_rng_state().shape
    wrong = [k for k, shape in expected.items() if k not in tensors or tensors[k].shape != shape]
    if wrong or not isinstance(step, int) or tensors["rng.cpu"].dtype != torch.uint8:
        raise ValueError(f"{path}: damaged checkpoint ({len(wrong)} tensors missing or of the wrong shape, e.g. "
                         f"{wrong[:2]}; step {step!r}); resume from an earlier one")
    with torch.no_grad():
        for k, p in dora.adapter_parameters(model).items():
            p.copy_(tensors[f"adapter.{k}"])
    for i, p in enumerate(optimizer.param_groups[0]["params"]):
        state = {name.split(".", 2)[2]: t for name, t in tensors.items() if name.startswith(f"adam.{i}.")}
        if state:
            optimizer.state[p] = state
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return step


def truncate_log(path, step):
    """On resume, keep only the log lines of steps up to the checkpoint's: the steps after it run again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a kill
            pass
    text = "".join(kept).encode()
    write_atomic(path, [text], len(text))


# -----------------------------------------------------------------------------------------------------------------
# The per-item log: each log.jsonl line's "items", one entry per item of the step's global batch

def item_labels(clips, folder):
    """Each clip's key -> its "kind" from the synthetic label beside its audio ({ytid}.json, written by synth.py
    --kinds; None without one) and its audio file relative to the data folder."""
    out = {}
    for c in clips:
        label, kind = Path(c.path).with_suffix(".json"), None
        if label.is_file():
            try:
                kind = json.loads(label.read_text(encoding="utf-8")).get("kind")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):  # not a synth.py label
                pass
        out[c.key] = {"kind": kind, "file": Path(os.path.relpath(c.path, folder)).as_posix()}
    return out


def item_records(batch, H, w, labels):
    """One entry per item of a batch: its Ĥ, w (None for an item without generated frames) and t, kind and file.
    Reads only what the step computed: it draws no random number, so a resumed run logs the same."""
    value = lambda x: x if math.isfinite(x) else None
    return [{"H": value(h), "w": value(wb), "t": t, **labels[key]}
            for h, wb, t, key in zip(H.tolist(), w.tolist(), batch["t"].tolist(), batch["keys"])]


# -----------------------------------------------------------------------------------------------------------------
# The run

def lock_run_folder(out):
    """Hold <out>/lock for the whole run, so that a second train.py on the same --out stops at once instead of
    interleaving checkpoints and log lines. flock is released by the OS however the process ends (kill -9 too)."""
    f = open(out / "lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        if holder != str(os.getpid()):
            f.close()
            raise ValueError(f"{out}: in use by another train.py (pid {holder}); wait for it to end or pass "
                             f"another --out") from None
        # else this process holds it already: an earlier train() call here stopped with an error
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    for stale in out.glob("*.tmp"):  # temporaries of a killed run: no other process can be writing them now
        stale.unlink()
    return f


def setup_distributed(device):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: one process per GPU (NCCL), or per CPU slot (gloo)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(device)
    return rank, world, device


def prepare_data(cfg, model, clips, out, master, device, listed=()):
    """Cache the clips' latents (the master process encodes, the others wait) and report what was skipped: the rows
    and files find_clips left out (`listed`) and the bad audio files, all in <out>/skipped.txt."""
    entries = None
    if master:
        entries, skipped = data.cache_latents(model, clips, device=device, data_folder=cfg.data)
        print(data.write_skip_log([*listed, *skipped], out / "skipped.txt", total=len(clips) + len(listed)))
    if dist.is_initialized():
        holder = [entries]
        dist.broadcast_object_list(holder, src=0)
        entries = holder[0]
    if not entries:
        raise ValueError(f"{cfg.data}: no usable clips (see {out / 'skipped.txt'})")
    if cfg.crop_seconds * model.sample_rate > model.sample_size:  # the DiT never sees more at once
        raise ValueError(f"--crop-seconds {cfg.crop_seconds:g}: over this model's maximum of "
                         f"{model.sample_size / model.sample_rate:.1f} s (model_config.json sample_size)")
    crop = math.ceil(int(cfg.crop_seconds * model.sample_rate) / model.pretransform.model.downsampling_ratio)
    return data.LatentDataset(entries, crop)


def adapter_metadata(cfg, step):
    """What sample.py reads back: the method's settings and the sampling recommendation."""
    return {"eisbach": json.dumps({"lambda": cfg.lam, "tau": cfg.tau, "steps": step, "kind": cfg.kind,
                                   "sampling": {"sampler": cfg.sample_sampler, "steps": cfg.sample_steps,
                                                "cfg_scale": cfg.sample_cfg}})}


def write_merged(cfg, model_dir, adapter, folder):
    """A merged checkpoint in the official layout, in float32 like the released files: W ← W' for every adapter."""
    merged = StableAudioModel.from_pretrained(model_dir)
    dora.load_adapter(merged, adapter)
    dora.merge_dora(merged, keep_base=False)
    merged.save_pretrained(folder)
    text = Path(model_dir) / merged.text_subfolder
    shutil.copytree(text, Path(folder) / merged.text_subfolder, dirs_exist_ok=True)


def check_config(cfg):
    """One line naming the flag for a training setting that cannot work (a 0 here was a ZeroDivisionError, a NaN a
    silent run of NaN losses)."""
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)
    rules = [("steps", cfg.steps >= 0, "an integer >= 0"), ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
             ("grad_accum", cfg.grad_accum >= 1, "an integer >= 1"), ("rank", cfg.rank >= 1, "an integer >= 1"),
             ("save_every", cfg.save_every >= 1, "an integer >= 1"), ("keep", cfg.keep >= 1, "an integer >= 1"),
             ("crop_seconds", finite(cfg.crop_seconds) and cfg.crop_seconds > 0, "seconds > 0"),
             ("lr", finite(cfg.lr) and cfg.lr > 0, "a finite number > 0"),
             ("beta1", finite(cfg.beta1) and 0 <= cfg.beta1 < 1, "a number in [0, 1)"),
             ("beta2", finite(cfg.beta2) and 0 <= cfg.beta2 < 1, "a number in [0, 1)"),
             ("weight_decay", finite(cfg.weight_decay) and cfg.weight_decay >= 0, "a finite number >= 0"),
             ("alpha", finite(cfg.alpha) and cfg.alpha > 0, "a finite number > 0"),
             ("kind", cfg.kind in dora.KINDS, f"one of {', '.join(dora.KINDS)}"),
             ("lam", finite(cfg.lam) and cfg.lam >= 0, "a finite number >= 0"),
             ("tau", finite(cfg.tau) and cfg.tau > 0, "a finite number > 0"),
             ("cfg_dropout", finite(cfg.cfg_dropout) and 0 <= cfg.cfg_dropout <= 1, "a probability in [0, 1]"),
             ("trunc", finite(cfg.trunc) and 0 < cfg.trunc < 1, "a number in (0, 1)"),
             ("pad_extend_seconds", finite(cfg.pad_extend_seconds) and cfg.pad_extend_seconds >= 0, "seconds >= 0"),
             ("inpaint_prob", finite(cfg.inpaint_prob) and 0 <= cfg.inpaint_prob <= 1, "a probability in [0, 1]"),
             ("max_mask_segments", cfg.max_mask_segments >= 1, "an integer >= 1"),
             ("mask_loss_weight", finite(cfg.mask_loss_weight) and cfg.mask_loss_weight >= 0, "a finite number >= 0"),
             # sample.py's samplers and its step limit (train.py does not import sample.py)
             ("sample_sampler", cfg.sample_sampler in ("euler", "pingpong", "dpmpp", "rk4"),
              "one of euler, pingpong, dpmpp, rk4"),
             ("sample_steps", 1 <= cfg.sample_steps <= 1000, "an integer from 1 to 1000"),
             ("sample_cfg", finite(cfg.sample_cfg) and cfg.sample_cfg >= 0, "a finite number >= 0")]
    for field, ok, expected in rules:
        if not ok:
            raise ValueError(f"--{field.replace('_', '-')} {getattr(cfg, field)!r}: expected {expected}")


def train(cfg):
    check_config(cfg)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    rank, world, device = setup_distributed(device)
    master = rank == 0
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by processes × --grad-accum "
                         f"= {world} × {cfg.grad_accum}")
    if not cfg.data:
        raise ValueError("--data is required: a MusicCaps, audiofolder or wav+txt folder")
    clips, layout, listed = data.find_clips(cfg.data, cfg.split)
    labels = item_labels(clips, cfg.data)
    if master:
        print(f"data: {len(clips)} clips ({layout}) in {cfg.data}"
              + (f"; {len(listed)} rows or files left out (listed in skipped.txt)" if listed else ""))
    model_dir = Path(cfg.model or TINY_MODEL)
    if master and not cfg.model:
        print(f"model: the embedded tiny model ({TINY_MODEL.name}/); pass --model DIR for real Stable Audio 3 weights")
    out = Path(cfg.out or Path("runs") / Path(cfg.data).resolve().name)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_run_folder(out) if master else None
    cuda = device.startswith("cuda")
    torch.set_flush_denormal(True)  # on CPU, denormal floats (decaying tails) cost ~100× a normal multiply
    model = StableAudioModel.from_pretrained(model_dir, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    dataset = prepare_data(cfg, model, clips, out, master, device, listed)

    torch.manual_seed(cfg.seed)                                       # the adapters' initial A
    dora.apply_dora(model, cfg.rank, cfg.alpha, kind=cfg.kind)        # base frozen; adapters fp32
    model.model.model.transformer.checkpointing = cfg.checkpointing
    params = list(dora.adapter_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    step = 0
    if cfg.resume:
        path = latest_checkpoint(out) if cfg.resume == "latest" else cfg.resume
        step = load_checkpoint(path, model, optimizer)
        if master:
            truncate_log(out / "log.jsonl", step)
            print(f"resumed from {path} at step {step}")
    denoiser = Denoiser(model)
    if world > 1:
        denoiser = nn.parallel.DistributedDataParallel(denoiser, broadcast_buffers=False)
    ctx = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    stop = []  # the first SIGINT/SIGTERM: finish the step, checkpoint, exit; a second one: exit now

    def on_signal(sig, frame):
        if stop:  # the last checkpoint stays as it was: every write is atomic
            bar.close()
            raise SystemExit(f"train.py: stopped by a second {signal.Signals(sig).name}, without a checkpoint "
                             f"(the last one is in {out})")
        stop.append(sig)

    micro = cfg.batch_size // (world * cfg.grad_accum)
    if master:
        print(f"training {len(params)} adapter tensors ({sum(p.numel() for p in params) / 1e6:.2f} M parameters) on "
              f"{len(dataset)} clips: {cfg.steps} steps, batch {cfg.batch_size} ({world} × {cfg.grad_accum} × {micro}), "
              f"{cfg.crop_seconds:g} s crops, λ {cfg.lam}, lr {cfg.lr}, {device}")
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, desc="train")
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    log = open(out / "log.jsonl", "a") if master else None
    last_saved = step
    while step < cfg.steps and not stop:
        t0 = time.perf_counter()
        order = batch_indices(len(dataset), cfg.seed, step, cfg.batch_size)
        stats = torch.zeros(4, device=device)  # loss; Σ Ĥ, Σ w and the count of this process's items that have them
        items = []
        for a in range(cfg.grad_accum):
            first = (rank * cfg.grad_accum + a) * micro
            batch = make_batch(dataset, model, cfg, step, [(j, order[j]) for j in range(first, first + micro)])
            sync = a == cfg.grad_accum - 1 or world == 1
            with denoiser.no_sync() if not sync else contextlib.nullcontext():
                loss, H, w = loss_of(denoiser, batch, cfg, device, ctx)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: the loss is {loss.item()} on clips "
                                             f"{nonfinite_items(batch, H, w)}; stopping (the last good checkpoint "
                                             f"is in {out})")
                (loss / cfg.grad_accum).backward()
            stats += torch.stack([loss.detach() / cfg.grad_accum, H.nansum(), w.nansum(), (~H.isnan()).sum().float()])
            items += item_records(batch, H, w, labels)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            dist.all_reduce(stats)
            parts = [None] * world if master else None
            dist.gather_object(items, parts, dst=0)  # rank by rank: the global batch's order
            items = [r for part in parts for r in part] if master else items
        if master:
            loss_v, H_sum, w_sum, n = stats.tolist()
            loss_v /= world
            H_v, w_v = (H_sum / n, w_sum / n) if n else (None, None)  # means over the items with generated frames
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_v:.4f}", H=f"{H_v or 0:.3f}", w=f"{w_v or 0:.3f}", lr=cfg.lr,
                            it_s=f"{1 / dt:.2f}")
            bar.update()
            try:
                log.write(json.dumps({"step": step, "loss": loss_v, "H": H_v, "w": w_v, "lr": cfg.lr,
                                      "seconds": dt, "items": items}) + "\n")
                log.flush()
            except OSError as e:  # a full disk: one line naming the folder (the last checkpoint is intact)
                raise OSError(f"{out.resolve()}: cannot append to log.jsonl ({e.strerror}); free space and resume "
                              f"with --resume") from None
            if step % cfg.save_every == 0 or step == cfg.steps or stop:
                save_checkpoint(out, step, model, optimizer, cfg, step * cfg.batch_size, cfg.keep)
                last_saved = step
    bar.close()
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if master:
        if step != last_saved:
            save_checkpoint(out, step, model, optimizer, cfg, step * cfg.batch_size, cfg.keep)
        adapter = out / "adapter.safetensors"
        dora.save_adapter(model, adapter, metadata=adapter_metadata(cfg, step))
        print(f"wrote {adapter} (step {step}); sample with: python sample.py \"...\" --adapter {adapter}"
              + (f" --model {model_dir}" if cfg.model else ""))
        if cfg.merge:
            write_merged(cfg, model_dir, adapter, out / "merged")
            print(f"wrote {out / 'merged'} (a full model folder with the adapter merged)")
        log.close()
        lock.close()
    if dist.is_initialized():
        dist.barrier()  # every process leaves together: no rank tears down while another still writes or waits
        # Tear the group down only once gloo's worker thread has dropped its finished work (the gathered items are
        # Python tensors; freeing them takes the GIL). Destroying the group joins that thread, and a join made while
        # holding the GIL the thread waits for never returns (seen: one rank hung at exit). So: free DDP's reducer
        # (it holds the group) now, then sleep — which releases the GIL — before destroying.
        del denoiser
        time.sleep(0.5)
        dist.destroy_process_group()
    return out


def parse_args(argv=None):
    """Flags from TrainConfig's fields (each default lives in one place, with its source)."""
    p = argparse.ArgumentParser(description="Eisbach DoRA fine-tuning of Stable Audio 3.")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "resume":
            p.add_argument(flag, nargs="?", const="latest", default="", help="a checkpoint; no value: the latest in --out")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    return TrainConfig(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    try:
        train(parse_args())
    except (ValueError, OSError, FloatingPointError) as e:  # OSError: a full disk, an unreadable file
        sys.exit(f"train.py: {e}")
    except KeyboardInterrupt:  # Ctrl-C before the training loop (which checkpoints on it) began
        sys.exit("train.py: interrupted (latents cached so far are kept)")
