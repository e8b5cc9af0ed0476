"""Benchmarks that print markdown tables. Every number in the README comes from here and names its device.

    python bench.py model  [--device cuda] [--dtype bf16] [--seconds 10 60 180]   # SAME encode/decode, DiT forward

Random weights at the real Small/Medium sizes (shared/reference/sa3/config_*.json, or $SA3_REFERENCE).
On CPU each case runs in a subprocess of its own so that its peak memory (max RSS above the loaded weights)
is its own; on CUDA the peak is torch.cuda.max_memory_allocated above the weights.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

import model as M

HERE = Path(__file__).resolve().parent
REFERENCE = Path(os.environ.get("SA3_REFERENCE", HERE.parent / "shared" / "reference" / "sa3"))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_part(config, part, device, dtype):
    """Build one part of the model on meta, then materialise only it with random weights (no text encoder)."""
    m = M.StableAudioModel.from_config(config)
    module = {"dit": m.model, "ae": m.pretransform}[part]
    module.to_empty(device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, t in module.state_dict().items():
        if name.endswith("inv_freq"):
            t.copy_(M.inv_freqs(2 * t.numel()))
        elif name.endswith("running_std"):
            t.fill_(1.0)
        else:
            t.copy_(torch.randn(t.shape, generator=g) * 0.02)
    module.to(dtype)
    for mod in module.modules():  # rotary frequencies stay float32, as the loader keeps them
        if isinstance(mod, M.Rotary):
            mod.inv_freq = mod.inv_freq.float()
    return m


def timed(fn, device, repeats):
    base = torch.cuda.memory_allocated() if device == "cuda" else rss_mb()  # the weights and inputs
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    return seconds, peak


def model_case(case):
    """One row of the model table: SAME encode/decode of `seconds` of audio, or one DiT forward."""
    config = M.read_json(REFERENCE / f"config_{case['config']}.json")
    device, dtype = case["device"], DTYPES[case["dtype"]]
    m = random_part(config, "dit" if case["op"] == "dit" else "ae", device, dtype)
    n = int(case["seconds"] * m.sample_rate)
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        if case["op"] == "encode":
            audio = (0.1 * torch.randn(1, 2, n, generator=g)).to(device)
            fn = lambda: m.encode(audio, chunked=case["chunked"])
        elif case["op"] == "decode":
            z = torch.randn(1, m.latent_dim, round(n / m.pretransform.model.downsampling_ratio), generator=g).to(device)
            fn = lambda: m.decode(z, chunked=case["chunked"])
        else:
            T = round(n / m.pretransform.model.downsampling_ratio)
            x = torch.randn(1, m.latent_dim, T, generator=g).to(device)
            cond = {"cross_attn_cond": torch.randn(1, m.max_length + 1, m.cond_dim, generator=g).to(device),
                    "global_cond": torch.randn(1, m.cond_dim, generator=g).to(device)}
            t = torch.full((1,), 0.5, device=device)
            fn = lambda: m.denoise(x, t, cond)
        seconds, peak = timed(fn, device, case.get("repeats", 1))
    return {"seconds": seconds, "peak_mb": peak}


def run(case):
    """CPU: in a fresh subprocess (own peak RSS); CUDA: in this process."""
    if case["device"] != "cpu":
        return model_case(case)
    out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                         cwd=HERE)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads)"


def bench_model(args):
    print(f"\n### Model: SAME encode/decode and DiT forward — {device_name(args.device)}, {args.dtype}, random weights\n")
    print("| part | config | op | audio s | chunked | wall s | s per audio s | peak MB above weights |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for s in args.seconds:
        for op in ("encode", "decode"):
            for chunked in (False, True):
                rows.append(dict(part="SAME-S", config="small-music", op=op, seconds=s, chunked=chunked))
        rows.append(dict(part="SAME-L", config="medium", op="decode", seconds=s, chunked=False))
    for s in args.seconds:
        for config, part in (("small-music", "DiT Small"), ("medium", "DiT Medium")):
            rows.append(dict(part=part, config=config, op="dit", seconds=s, chunked=False))
    for row in rows:
        r = run({**row, "device": args.device, "dtype": args.dtype})
        if "error" in r:
            print(f"| {row['part']} | {row['config']} | {row['op']} | {row['seconds']} | {row['chunked']} | "
                  f"error: {r['error']} | | |", flush=True)
            continue
        print(f"| {row['part']} | {row['config']} | {row['op']} | {row['seconds']} | {row['chunked']} | "
              f"{r['seconds']:.2f} | {r['seconds'] / row['seconds']:.3f} | {r['peak_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["model"], default="model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--seconds", type=float, nargs="+", default=[10, 60, 180])
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(model_case(json.loads(args.case))))
        sys.exit()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    {"model": bench_model}[args.what](args)
