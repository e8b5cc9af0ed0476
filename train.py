"""
Fine-tune Stable Audio 3 with DoRA and the Eisbach barrier:  python train.py --data musiccaps/ --steps 1000

This file owns training: the objective (rectified flow with truncated logit-normal timesteps, the config's length
shift, exact minibatch OT noise coupling, CFG dropout, the barrier-weighted loss), the loop, checkpoints that
resume bit-exactly, and multi-GPU. The recipe is the Eisbach card's (DoRA-rows rank/alpha 16, λ 0.5, AdamW 5e-5
(0.9, 0.95), batch 4, 60 s crops, 1000 steps); where the card is silent it follows the official Stable Audio 3
trainer (github Stability-AI/stable-audio-3, 636f906; shared/sa3_facts.md §7), which trains text-to-audio and
inpainting together: this one trains text-to-audio only (the inpainting cond stays zero, as generate() passes it).

Every random number of batch item j at step s comes from its own generator seeded by (seed, s, j), and the data
order is a fixed permutation per epoch, so a run resumed from any checkpoint continues exactly as if it had never
stopped. Multi-GPU: torchrun --nproc_per_node=G train.py ... (DDP; NCCL on GPU, gloo on CPU). --batch-size is the
global batch: each of the G processes takes batch_size/G items of it, so the recipe does not change with G.
"""
import argparse
import contextlib
import dataclasses
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
from model import TINY_MODEL, StableAudioModel, load_safetensors, read_safetensors_metadata, save_safetensors


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


def make_batch(dataset, model, cfg, step, items):
    """items: [(global position j, dataset index)] -> the training tensors of one micro-batch."""
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
        rows.append(ex)
    # Frames after the batch's last valid frame change nothing (excluded from attention and loss): cut them, so a
    # 60 s crop of 10 s clips costs what 16 s would.
    T = max(int(r["mask"].sum()) for r in rows)
    x0 = torch.stack([r["latents"][:, :T] for r in rows])                 # (B, C, T)
    noise = torch.stack([r["noise"][:, :T] for r in rows])
    t = logit_normal_t(torch.cat([r["z"] for r in rows]), cfg.trunc)
    t = shift_t(t, torch.tensor([float(r["length"]) for r in rows]), model.distribution_shift)
    return {"x0": x0, "noise": ot_pair(x0, noise) if cfg.ot and len(rows) > 1 else noise, "t": t,
            "mask": torch.stack([r["mask"][:T] for r in rows]), "drop": torch.tensor([r["drop"] for r in rows]),
            "prompts": [r["prompt"] for r in rows], "seconds": [r["seconds_total"] for r in rows],
            "keys": [r["key"] for r in rows]}


class Denoiser(nn.Module):
    """Conditioning + one DiT evaluation: the part of the model that holds the adapters, as one module for DDP."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, prompts, seconds, drop, mask):
        cond = self.model.conditioning(prompts, seconds)
        cross = torch.where(drop[:, None, None], 0.0, cond["cross_attn_cond"])  # CFG dropout: zero text cond
        return self.model.velocity(x, t, cond, mask, cross_attn_cond=cross)


def loss_of(denoiser, batch, cfg, device, ctx):
    x0, noise, t = batch["x0"].to(device), batch["noise"].to(device), batch["t"].to(device)
    mask = batch["mask"].to(device)
    # x_t = (1 − t)·x0 + t·ε;  target v* = ε − x0
    tb = t[:, None, None]
    x_t = (1 - tb) * x0 + tb * noise
    with ctx:
        v = denoiser(x_t, t, batch["prompts"], batch["seconds"], batch["drop"].to(device), mask)
    return barrier_loss(v.float(), noise - x0, mask, cfg.lam, cfg.tau, fused=cfg.fused)  # L = mean_b w_b·MSE_b


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
    sidecar = {"step": step, "data_position": position, "config": dataclasses.asdict(cfg)}
    with open(f"{base}.json.tmp", "w") as f:
        json.dump(sidecar, f, indent=1)
    os.replace(f"{base}.json.tmp", f"{base}.json")
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
    saved = json.loads(read_safetensors_metadata(path)["lora_config"])
    if saved != model.lora_config:
        raise ValueError(f"{path}: adapter config {saved} differs from this run's {model.lora_config} "
                         f"(--rank/--alpha/--kind must match to resume)")
    tensors = load_safetensors(path)
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
    with open(sidecar) as f:
        return json.load(f)["step"]


# -----------------------------------------------------------------------------------------------------------------
# The run

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


def prepare_data(cfg, model, clips, out, master, device):
    """Cache the clips' latents (the master process encodes, the others wait) and report skipped files."""
    entries = None
    if master:
        entries, skipped = data.cache_latents(model, clips, device=device, data_folder=cfg.data)
        print(data.write_skip_log(skipped, out / "skipped.txt", total=len(clips)))
    if dist.is_initialized():
        holder = [entries]
        dist.broadcast_object_list(holder, src=0)
        entries = holder[0]
    if not entries:
        raise ValueError(f"{cfg.data}: no usable clips (see {out / 'skipped.txt'})")
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


def train(cfg):
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, device = setup_distributed(device)
    master = rank == 0
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must be divisible by processes × --grad-accum "
                         f"= {world} × {cfg.grad_accum}")
    if not cfg.data:
        raise ValueError("--data is required: a MusicCaps, audiofolder or wav+txt folder")
    clips, layout, missing = data.find_clips(cfg.data, cfg.split)
    if master:
        print(f"data: {len(clips)} clips ({layout}) in {cfg.data}"
              + (f"; {missing} listed without audio or caption, left out" if missing else ""))
    model_dir = Path(cfg.model or TINY_MODEL)
    if master and not cfg.model:
        print(f"model: the embedded tiny model ({TINY_MODEL.name}/); pass --model DIR for real Stable Audio 3 weights")
    out = Path(cfg.out or Path("runs") / Path(cfg.data).resolve().name)
    out.mkdir(parents=True, exist_ok=True)
    cuda = device.startswith("cuda")
    torch.set_flush_denormal(True)  # on CPU, denormal floats (decaying tails) cost ~100× a normal multiply
    model = StableAudioModel.from_pretrained(model_dir, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    dataset = prepare_data(cfg, model, clips, out, master, device)

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
            print(f"resumed from {path} at step {step}")
    denoiser = Denoiser(model)
    if world > 1:
        denoiser = nn.parallel.DistributedDataParallel(denoiser, broadcast_buffers=False)
    ctx = torch.autocast("cuda", torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    stop = []  # SIGINT/SIGTERM: finish the step, checkpoint, exit
    handlers = {sig: signal.signal(sig, lambda *_: stop.append(True)) for sig in (signal.SIGINT, signal.SIGTERM)}
    micro = cfg.batch_size // (world * cfg.grad_accum)
    if master:
        print(f"training {len(params)} adapter tensors ({sum(p.numel() for p in params) / 1e6:.2f} M parameters) on "
              f"{len(dataset)} clips: {cfg.steps} steps, batch {cfg.batch_size} ({world} × {cfg.grad_accum} × {micro}), "
              f"{cfg.crop_seconds:g} s crops, λ {cfg.lam}, lr {cfg.lr}, {device}")
    bar = tqdm(total=cfg.steps, initial=step, disable=not master, desc="train")
    log = open(out / "log.jsonl", "a") if master else None
    last_saved = step
    while step < cfg.steps and not stop:
        t0 = time.perf_counter()
        order = batch_indices(len(dataset), cfg.seed, step, cfg.batch_size)
        stats = torch.zeros(3, device=device)  # loss, mean Ĥ, mean w over this process's items
        for a in range(cfg.grad_accum):
            first = (rank * cfg.grad_accum + a) * micro
            batch = make_batch(dataset, model, cfg, step, [(j, order[j]) for j in range(first, first + micro)])
            sync = a == cfg.grad_accum - 1 or world == 1
            with denoiser.no_sync() if not sync else contextlib.nullcontext():
                loss, H, w = loss_of(denoiser, batch, cfg, device, ctx)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: the loss is {loss.item()} on clips {batch['keys']}; "
                                             f"stopping (the last good checkpoint is in {out})")
                (loss / cfg.grad_accum).backward()
            stats += torch.stack([loss.detach(), H.mean(), w.mean()]) / cfg.grad_accum
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            dist.all_reduce(stats)
            stats /= world
        if master:
            loss_v, H_v, w_v = stats.tolist()
            dt = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss_v:.4f}", H=f"{H_v:.3f}", w=f"{w_v:.3f}", lr=cfg.lr, it_s=f"{1 / dt:.2f}")
            bar.update()
            log.write(json.dumps({"step": step, "loss": loss_v, "H": H_v, "w": w_v, "lr": cfg.lr,
                                  "seconds": dt}) + "\n")
            log.flush()
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
    if dist.is_initialized():
        dist.barrier()  # every process leaves together: no rank tears down while another still writes or waits
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
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"train.py: {e}")
