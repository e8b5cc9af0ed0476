"""Benchmarks that print markdown tables. Every number in the README comes from here and names its device.

    python bench.py model  [--device cuda] [--dtype bf16] [--seconds 10 60 180]   # SAME encode/decode, DiT forward
    python bench.py method [--device cuda] [--dtype bf16]   # one adapted DiT layer fwd+bwd; barrier eager vs fused
    python bench.py sample [--seconds 10 60 180]   # generate(): s per second of audio, steps 8, cfg 1 and 3
    python bench.py train  [--seconds 60] [--batch 4]   # one DoRA + barrier training step, checkpointing 0/1/2
    python bench.py drift  # fp16 and bf16 generation vs fp32 on the official-parity fixtures (final latents, audio)
    python bench.py compare [--repeats 3] [--long]   # side by side with the official package (README: install)
    python bench.py checkpointing [--seconds 10] [--batch 1] [--kind lora]   # training step, which blocks recomputed

Random weights at the real Small/Medium sizes (shared/reference/sa3/config_*.json, or $SA3_REFERENCE).
On CPU each case runs in a subprocess of its own so that its peak memory (max RSS above the loaded weights)
is its own; on CUDA the peak is torch.cuda.max_memory_allocated above the weights. Times are the median of the
timed calls after one warm-up call (which also holds torch.compile's compile); the peak is that of the timed calls.

The method table compares, at DiT-Medium layer sizes, frozen Linear / LoRA / our DoRA / a naive DoRA that builds
V = W0 + s·B·A / PEFT's DoRA. PEFT is a reference, never a dependency: its row runs only when the interpreter
running bench.py can `import peft` (e.g. a separate venv with torch and peft: /path/to/venv/bin/python bench.py
method), and otherwise says "peft not installed".
"""
import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import barrier
import dora
import model as M
import sample
import train as T

HERE = Path(__file__).resolve().parent
REFERENCE = Path(os.environ.get("SA3_REFERENCE", HERE.parent / "shared" / "reference" / "sa3"))
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def status_mb(field):
    """A field of /proc/self/status in MB: VmRSS (resident), RssAnon (resident less files such as library code),
    VmHWM (peak resident)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def random_part(config, part, device, dtype):
    """Build the model on meta, then materialise one part ("dit", "ae") or all of it with random weights; "all" also
    gets a tokenizer (the reference fixture's sentencepiece model: its ids are valid for any vocabulary)."""
    m = M.StableAudioModel.from_config(config)
    module = {"dit": m.model, "ae": m.pretransform, "all": m}[part]
    if part == "all":
        m.tokenizer = M.Tokenizer(REFERENCE / "seed1" / "arc" / "t5gemma-b-b-ul2", m.max_length)
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
    """(median seconds per call, peak MB of the timed calls above the weights and inputs) after one warm-up call.
    On CPU the peak is the anonymous resident memory: library code that the calls page in is not counted."""
    base = torch.cuda.memory_allocated() if device == "cuda" else status_mb("RssAnon")  # the weights and inputs
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # peak RSS := current RSS: setup transients are not counted
            f.write("5")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = status_mb("VmHWM") - (status_mb("VmRSS") - status_mb("RssAnon")) - base
    return statistics.median(times), peak


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


def naive_dora(layer, x):
    """DoRA as a straightforward implementation writes it, building the weight-sized V and W' (autograd keeps them)."""
    # W' = m·V/‖V‖_row,  V = W0 + s·B·A
    V = layer.base.weight + layer.scale * layer.lora_B @ layer.lora_A
    W = layer.magnitude[:, None] * V / V.norm(dim=1, keepdim=True)
    return F.linear(x, W.to(x.dtype), layer.base.bias)


def layer_case(case):
    """One row of the method table: forward+backward of one DiT layer with the given adapter (rank 16, alpha 16)."""
    device, dtype = case["device"], DTYPES[case["dtype"]]
    torch.manual_seed(0)
    base = nn.Linear(case["d_in"], case["d_out"], bias=case["bias"], device=device, dtype=dtype).requires_grad_(False)
    variant = case["variant"]
    if variant == "frozen":
        module, forward = base, base
    elif variant == "peft dora":
        import peft  # a reference only (see the docstring)
        config = peft.LoraConfig(r=16, lora_alpha=16, use_dora=True, target_modules=["0"])
        module = forward = peft.inject_adapter_in_model(config, nn.Sequential(base))
    else:
        kind = "lora" if variant == "lora" else "dora-rows"
        module = forward = dora.DoRA(base, 16, 16, kind, detach_norm=variant == "dora detach")
        if variant == "naive dora":
            forward = lambda x: naive_dora(module, x)
    with torch.no_grad():  # B = 0 would make B·A trivial
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape))
    x = torch.randn(4, 646, case["d_in"], device=device, dtype=dtype, requires_grad=True)  # (B, T, D): 60 s, Medium
    grad_y = torch.randn(4, 646, case["d_out"], device=device, dtype=dtype)

    def step():
        forward(x).backward(grad_y)
        x.grad = None  # each call frees its gradients, so the next one starts from the weights and inputs
        module.zero_grad(set_to_none=True)

    seconds, peak = timed(step, device, 5 if device == "cpu" else 50)
    return {"seconds": seconds, "peak_mb": peak}


def barrier_case(case):
    """One row of the barrier table: forward+backward of the entropy-barrier loss w.r.t. pred, eager or fused."""
    device, dtype = case["device"], DTYPES[case["dtype"]]
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 256, case["T"], generator=g).to(device, dtype).requires_grad_()  # (B, C, T)
    target = torch.randn(4, 256, case["T"], generator=g).to(device, dtype)
    mask = torch.ones(4, case["T"], dtype=torch.bool, device=device)

    def step():
        barrier.barrier_loss(pred, target, mask, fused=case["fused"])[0].backward()
        pred.grad = None

    return {"seconds": timed(step, device, 20 if device == "cpu" else 100)[0]}


def sample_case(case):
    """One row of the sampler table: the whole generate() (text, 8 pingpong steps, chunked decode) of `seconds`."""
    m = random_part(M.read_json(REFERENCE / f"config_{case['config']}.json"), "all", case["device"],
                    DTYPES[case["dtype"]])
    with torch.inference_mode():
        fn = lambda: sample.generate(m, "warm lo-fi house, 122 BPM", case["seconds"], steps=8, cfg_scale=case["cfg"],
                                     sampler="pingpong", seed=0)
        seconds, peak = timed(fn, case["device"], 1)
    return {"seconds": seconds, "peak_mb": peak}


def train_case(case):
    """One row of the training table: one optimizer step of train.py's objective (DoRA rank 16 on the DiT and the
    seconds conditioner, the barrier loss, AdamW) on a batch of `seconds`-long latents with random weights."""
    device, dtype = case["device"], DTYPES[case["dtype"]]
    m = random_part(M.read_json(REFERENCE / f"config_{case['config']}.json"), "all", device, dtype)
    dora.apply_dora(m, 16, 16)
    m.model.model.transformer.checkpointing = case["checkpointing"]
    cfg = T.TrainConfig(fused=device == "cuda")
    B, L = case["batch"], math.ceil(case["seconds"] * m.latent_rate)
    g = torch.Generator().manual_seed(0)
    batch = {"x0": torch.randn(B, m.latent_dim, L, generator=g), "noise": torch.randn(B, m.latent_dim, L, generator=g),
             "t": torch.rand(B, generator=g), "mask": torch.ones(B, L, dtype=torch.bool), "inpaint": torch.zeros(B, L),
             "drop": torch.zeros(B, dtype=torch.bool), "prompts": ["warm lo-fi house, 122 BPM"] * B,
             "seconds": [case["seconds"]] * B}
    optimizer = torch.optim.AdamW(dora.adapter_parameters(m).values(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    ctx = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    denoiser = T.Denoiser(m)

    def step():
        T.loss_of(denoiser, batch, cfg, device, ctx)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed(step, device, 1 if device == "cpu" else 5)
    return {"seconds": seconds, "peak_mb": peak}


def checkpointing_case(case):
    """The checkpointing table, in one process so that the settings alternate step by step (a fair comparison on a
    shared machine): train_case's step (without the optimizer) with every k-th DiT block recomputed (k = 0: none).
    Per k: the median step time. The memory of each setting is `bench.py train`'s (one process per setting)."""
    m = random_part(M.read_json(REFERENCE / f"config_{case['config']}.json"), "all", "cpu", torch.float32)
    dora.apply_dora(m, 16, 16, kind=case["kind"])
    cfg = T.TrainConfig()
    B, L = case["batch"], math.ceil(case["seconds"] * m.latent_rate)
    g = torch.Generator().manual_seed(0)
    batch = {"x0": torch.randn(B, m.latent_dim, L, generator=g), "noise": torch.randn(B, m.latent_dim, L, generator=g),
             "t": torch.rand(B, generator=g), "mask": torch.ones(B, L, dtype=torch.bool),
             "drop": torch.zeros(B, dtype=torch.bool), "prompts": ["warm lo-fi house, 122 BPM"] * B,
             "seconds": [case["seconds"]] * B}
    denoiser = T.Denoiser(m)
    times = {k: [] for k in case["ks"]}
    for i in range(case["repeats"] + 1):  # the first round warms up
        for k in case["ks"]:
            m.model.model.transformer.checkpointing = k
            t0 = time.perf_counter()
            T.loss_of(denoiser, batch, cfg, "cpu", torch.autocast("cpu", enabled=False))[0].backward()
            m.zero_grad(set_to_none=True)
            if i:
                times[k].append(time.perf_counter() - t0)
    return {str(k): {"seconds": statistics.median(times[k])} for k in case["ks"]}


def filled(state):
    """Random weights that both codebases reproduce from the key names alone: keys in sorted order, one generator
    (the official module names are ours), rotary frequencies by their formula, running_std 1."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in sorted(state):
            t = state[name]
            if name.endswith("inv_freq"):
                t.copy_(M.inv_freqs(2 * t.numel()))
            elif name.endswith("running_std"):
                t.fill_(1.0)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.02)


def official_model(config):
    """The official StableAudioModel built from a config without the hub: its T5Gemma conditioner keeps only the
    learned padding (the text encoder is stubbed on both sides: generate() gets the conditioning tensors)."""
    import stable_audio_3.models.conditioners as oc
    import stable_audio_3.models.transformer as ot
    from stable_audio_3.factory import create_diffusion_cond_from_config
    from stable_audio_3.model import StableAudioModel as Official

    def stub(self, output_dim, max_length=128, project_out=False, padding_mode="zero", **_):
        oc.Conditioner.__init__(self, 768, output_dim, project_out=project_out, padding_mode=padding_mode)
        self.max_length = max_length

    oc.T5GemmaConditioner.__init__ = stub
    ot.flex_attention_available = False  # its CPU tier (sa3_facts.md §8)
    model = create_diffusion_cond_from_config(config).eval().requires_grad_(False)
    filled(model.state_dict())
    return Official(model, config, "cpu", False)


def ours_model(config):
    """Our model with the same weights; no text encoder is materialised (it stays on meta, stubbed)."""
    m = M.StableAudioModel.from_config(config)
    for part in (m.model, m.conditioner, m.pretransform):
        part.to_empty(device="cpu")
    filled(m.checkpoint_state_dict())
    m.tokenizer = M.Tokenizer(REFERENCE / "seed1" / "arc" / "t5gemma-b-b-ul2", m.max_length)
    return m.eval().requires_grad_(False)


def compare_case(case):
    """One measurement of `bench.py compare` on one side ("official" or "ours"): build, warm up, time one call.
    The inputs are the same on both sides: prompt tokens (B, 128, 768) with 24 valid, the seconds token, x, t."""
    torch.set_flush_denormal(True)  # as sample.py and the official CLI's defaults do not; both sides alike
    config = M.read_json(REFERENCE / f"config_{case['config']}.json")
    official = case["side"] == "official"
    m = official_model(config) if official else ours_model(config)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 128, config["model"]["conditioning"]["cond_dim"], generator=g)
    prompt_mask = torch.arange(128)[None] < 24
    seconds = case["seconds"]
    if official:
        tensors = lambda: {"prompt": [prompt, prompt_mask],
                           "seconds_total": m.model.conditioner.conditioners["seconds_total"]([seconds], "cpu")}
        sec = tensors()["seconds_total"][0]
    else:
        sec = m.conditioner.conditioners["seconds_total"]([seconds])
        cond = {"cross_attn_cond": torch.cat([prompt, sec], 1), "global_cond": sec[:, 0], "seconds_total": [seconds],
                "cross_attn_mask": torch.cat([prompt_mask, torch.ones(1, 1, dtype=torch.bool)], 1)}
        m.conditioning = lambda prompts, seconds_total: cond  # the stubbed text encoder
    L = sample.latent_length(m, seconds) if not official else None
    with torch.inference_mode():
        if case["row"] == "generate":
            if official:
                fn = lambda: m.generate(conditioning=[{"prompt": "x", "seconds_total": seconds}],
                                        conditioning_tensors=tensors(), steps=8, cfg_scale=case["cfg"], seed=0,
                                        duration=seconds, sampler_type="pingpong")
            else:
                fn = lambda: sample.generate(m, "x", seconds, steps=8, cfg_scale=case["cfg"], sampler="pingpong",
                                             seed=0)
        elif case["row"] == "decode":  # what generate() decodes for a `seconds` request
            spl = config["model"]["pretransform"]["config"]["downsampling_ratio"]
            ours = ours_model(config) if official else m  # only for the official latent length
            z = torch.randn(1, ours.latent_dim, sample.latent_length(ours, seconds), generator=g)
            if official:
                fn = lambda: m.model.pretransform.decode(z, chunked=True)
            else:
                fn = lambda: m.decode_heard(z, 0, int(seconds * m.sample_rate))
        else:  # one guided DiT call at the generate() length, padding mask included
            ours = ours_model(config) if official else m
            L = sample.latent_length(ours, seconds)
            mask = sample.padding_mask(ours, seconds, L, 1)
            x, t = torch.randn(1, ours.latent_dim, L, generator=g), torch.full((1,), 0.9)
            if official:
                inputs = m.model.get_conditioning_inputs({**tensors(), "inpaint_mask": [torch.zeros(1, 1, L)],
                                                          "inpaint_masked_input": [torch.zeros_like(x)]})
                fn = lambda: m.model.model(x, t, **inputs, cfg_scale=case["cfg"], batch_cfg=True, rescale_cfg=True,
                                           padding_mask=mask)
            else:
                fn = lambda: m.denoise(x, t, cond, case["cfg"], padding_mask=mask)
        seconds_, peak = timed(fn, "cpu", 1)
    return {"seconds": seconds_, "peak_mb": peak}


CASES = {"model": model_case, "layer": layer_case, "barrier": barrier_case, "sample": sample_case, "train": train_case,
         "compare": compare_case, "checkpointing": checkpointing_case}


def run(case):
    """CPU: in a fresh subprocess (own peak RSS); CUDA: in this process."""
    if case["device"] != "cpu":
        return CASES[case["what"]](case)
    # A layer case's tensors are all ≥ 1 MB. With a fixed mmap threshold glibc hands each back to the system when it
    # is freed, so the peak RSS follows the live tensors (by default it keeps freed blocks < 32 MB for reuse).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)} if case["what"] == "layer" else None
    out = subprocess.run([sys.executable, __file__, "--case", json.dumps(case)], capture_output=True, text=True,
                         cwd=HERE, env=env)
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
                rows.append(dict(what="model", part="SAME-S", config="small-music", op=op, seconds=s,
                                 chunked=chunked))
        rows.append(dict(what="model", part="SAME-L", config="medium", op="decode", seconds=s, chunked=False))
    for s in args.seconds:
        for config, part in (("small-music", "DiT Small"), ("medium", "DiT Medium")):
            rows.append(dict(what="model", part=part, config=config, op="dit", seconds=s, chunked=False))
    for row in rows:
        r = run({**row, "device": args.device, "dtype": args.dtype})
        if "error" in r:
            print(f"| {row['part']} | {row['config']} | {row['op']} | {row['seconds']} | {row['chunked']} | "
                  f"error: {r['error']} | | |", flush=True)
            continue
        print(f"| {row['part']} | {row['config']} | {row['op']} | {row['seconds']} | {row['chunked']} | "
              f"{r['seconds']:.2f} | {r['seconds'] / row['seconds']:.3f} | {r['peak_mb']:.0f} |", flush=True)


def print_row(head, r, ref, ms_format):
    """One markdown row: `head`, then ms, × the reference row's time and (if measured) peak MB; or the error."""
    if "error" in r:
        print(f"{head} {r['error']} |", flush=True)  # markdown fills the missing cells
        return
    ratio = r["seconds"] / ref["seconds"] if "seconds" in ref else float("nan")
    peak = f" {r['peak_mb']:.0f} |" if "peak_mb" in r else ""
    print(f"{head} {1e3 * r['seconds']:{ms_format}} | {ratio:.2f} |{peak}", flush=True)


def bench_method(args):
    mb = torch.finfo(DTYPES[args.dtype]).bits / 8 / 2**20
    print(f"\n### Method: one DiT-Medium layer, forward+backward, x (4, 646, 1536) — {device_name(args.device)}, "
          f"rank 16, alpha 16, random weights\n")
    layers = (("to_qkv 1536→7680", 7680, False), ("ff proj 1536→12288", 12288, True))
    for layer, d_out, _ in layers:
        print(f"{layer}: W0 {1536 * d_out * mb:.0f} MB, x {4 * 646 * 1536 * mb:.0f} MB, "
              f"y {4 * 646 * d_out * mb:.0f} MB")
    print("\n| device | dtype | layer | variant | ms per fwd+bwd | × LoRA | peak MB above weights+inputs |")
    print("|---|---|---|---|---|---|---|")
    variants = ("frozen", "lora", "dora", "dora detach", "naive dora", "peft dora")
    for layer, d_out, bias in layers:
        results = {}
        for v in variants:
            if v == "peft dora" and importlib.util.find_spec("peft") is None:
                results[v] = {"error": "peft not installed"}
                continue
            results[v] = run(dict(what="layer", variant=v, d_in=1536, d_out=d_out, bias=bias,
                                  device=args.device, dtype=args.dtype))
        for v, r in results.items():
            print_row(f"| {args.device} | {args.dtype} | {layer} | {v} |", r, results["lora"], ".0f")

    print(f"\n### Barrier loss: forward+backward w.r.t. pred, B=4, C=256 — {device_name(args.device)}\n")
    print("| device | dtype | T | path | ms per fwd+bwd | × eager |")
    print("|---|---|---|---|---|---|")
    for T in (646, 1938):
        eager = run(dict(what="barrier", T=T, fused=False, device=args.device, dtype=args.dtype))
        print_row(f"| {args.device} | {args.dtype} | {T} | eager |", eager, eager, ".2f")
        fused = run(dict(what="barrier", T=T, fused=True, device=args.device, dtype=args.dtype))
        print_row(f"| {args.device} | {args.dtype} | {T} | fused |", fused, eager, ".2f")


def bench_sample(args):
    print(f"\n### Sampling: generate(), pingpong 8 steps, chunked decode — {device_name(args.device)}, {args.dtype}, "
          f"random weights\n")
    print("| model | audio s | cfg | wall s | s per audio s | peak MB above weights |")
    print("|---|---|---|---|---|---|")
    for config in ("small-music", "medium"):
        for s in args.seconds:
            for cfg in (1.0, 3.0):
                r = run(dict(what="sample", config=config, seconds=s, cfg=cfg, device=args.device, dtype=args.dtype))
                cells = (f"error: {r['error']} | | |" if "error" in r else
                         f"{r['seconds']:.1f} | {r['seconds'] / s:.3f} | {r['peak_mb']:.0f} |")
                print(f"| {config} | {s:g} | {cfg:g} | {cells}", flush=True)


def bench_train(args):
    print(f"\n### Training step: DoRA rank 16 + barrier, AdamW — {device_name(args.device)}, {args.dtype}, "
          f"random weights, batch {args.batch}\n")
    print("| model | crop s | batch | checkpointed blocks (every k-th) | s per step | peak MB above weights |")
    print("|---|---|---|---|---|---|")
    for config in ("small-music", "medium"):
        for s in args.seconds:
            for ckpt in (0, 1, 2):
                r = run(dict(what="train", config=config, seconds=s, batch=args.batch, checkpointing=ckpt,
                             device=args.device, dtype=args.dtype))
                cells = (f"error: {r['error']} | |" if "error" in r else f"{r['seconds']:.2f} | {r['peak_mb']:.0f} |")
                print(f"| {config} | {s:g} | {args.batch} | {ckpt} | {cells}", flush=True)


def bench_checkpointing(args):
    print(f"\n### Activation checkpointing: one training step, {args.kind} rank 16 + barrier — {device_name('cpu')}, "
          f"fp32, random weights, batch {args.batch}, settings alternating step by step in one process\n")
    print("| model | crop s | checkpointed blocks | s per step | × no checkpointing |")
    print("|---|---|---|---|---|")
    for s in args.seconds:
        r = run(dict(what="checkpointing", config="small-music", seconds=s, batch=args.batch, kind=args.kind,
                     ks=[0, 1, 2, 3], repeats=args.repeats, device="cpu", dtype="fp32"))
        if "error" in r:
            print(f"| small-music | {s:g} | error: {r['error']} | | |")
            continue
        for k, row in r.items():
            which = {"0": "none (0)", "1": "every block (1)", "2": "every other block (2)"}.get(k, f"every {k}th ({k})")
            print(f"| small-music | {s:g} | {which} | {row['seconds']:.2f} | {row['seconds'] / r['0']['seconds']:.2f} |",
                  flush=True)


def bench_drift(args):
    """How far half-precision generation drifts from fp32: the official-parity fixtures (tiny random models) loaded
    in fp32, fp16 and bf16, the same noises, 8 steps; ‖x − x_fp32‖/‖x_fp32‖ of the final latents and of the audio
    (decode noise off). The sampler state and guidance stay fp32 in every row; only the model runs in the dtype."""
    print(f"\n### Drift from fp32: generate(), 8 steps, official-parity fixtures — {device_name(args.device)}\n")
    print("| fixture | sampler | cfg | dtype | latents rel. error | audio rel. error |")
    print("|---|---|---|---|---|---|")
    inputs = M.read_json(REFERENCE / "seed1" / "inputs.json")
    for name in ("base", "arc"):
        g = inputs["models"][name]["generation"]
        models = {d: M.StableAudioModel.from_pretrained(REFERENCE / "seed1" / name, device=args.device,
                                                        dtype=DTYPES[d]) for d in ("fp32", "fp16", "bf16")}
        for sampler, cfg in (("pingpong", 1.0), ("euler", 3.5)):
            kw = dict(duration=g["duration"], steps=8, cfg_scale=cfg, sampler=sampler, seed=g["seed"],
                      decode_noise=False)
            ref = sample.generate(models["fp32"], g["prompt"], return_latents=True, **kw)
            ref_audio = sample.generate(models["fp32"], g["prompt"], **kw)
            for d in ("fp16", "bf16"):
                lat = sample.generate(models[d], g["prompt"], return_latents=True, **kw)
                audio = sample.generate(models[d], g["prompt"], **kw)
                err = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()
                print(f"| {name} | {sampler} | {cfg:g} | {d} | {err(lat.cpu(), ref.cpu()):.2e} | "
                      f"{err(audio, ref_audio):.2e} |", flush=True)


COMPARE_ROWS = [  # (label, case, long): Small-music size, random weights, fp32, the text encoder stubbed on both sides
    ("DiT call, 10 s, cfg 1", dict(row="dit", seconds=10, cfg=1.0), False),
    ("DiT call, 10 s, cfg 3", dict(row="dit", seconds=10, cfg=3.0), False),
    ("DiT call, 120 s, cfg 1", dict(row="dit", seconds=120, cfg=1.0), True),
    ("decode of a 10 s request", dict(row="decode", seconds=10), False),
    ("generate() 10 s, 8 pingpong steps, cfg 1", dict(row="generate", seconds=10, cfg=1.0), False),
    ("generate() 10 s, 8 pingpong steps, cfg 3", dict(row="generate", seconds=10, cfg=3.0), False),
    ("generate() 120 s, 8 pingpong steps, cfg 1", dict(row="generate", seconds=120, cfg=1.0), True),
]


def bench_compare(args):
    """Side by side with the official package (when this interpreter can import stable_audio_3): one fresh process
    per measurement, official and ours interleaved, medians of --repeats processes, ratio official/ours, and each
    process's peak RSS above its weights and inputs (MB). Each process times one call after a warm-up call (a
    first generate() call here runs ~1.5× slower than the next, on both sides)."""
    have_official = importlib.util.find_spec("stable_audio_3") is not None
    print(f"\n### Official vs ours: Small-music size, random weights, fp32, text encoder stubbed — "
          f"{device_name('cpu')}, median of {args.repeats} processes per side\n")
    if not have_official:
        print("(the official package is not importable here: only our column; README says how to install it)\n")
    print("| row | official s | ours s | official/ours | official peak MB | ours peak MB |")
    print("|---|---|---|---|---|---|")
    for label, row, long in COMPARE_ROWS:
        if long and not args.long:
            continue
        results = {"official": [], "ours": []}
        for _ in range(args.repeats):
            for side in ("official", "ours") if have_official else ("ours",):
                results[side].append(run(dict(what="compare", side=side, config="small-music", device="cpu",
                                              dtype="fp32", **row)))
        cells = {}
        for side, rs in results.items():
            ok = [r for r in rs if "error" in r] == [] and rs
            cells[side] = ((statistics.median(r["seconds"] for r in rs), max(r["peak_mb"] for r in rs)) if ok
                           else None if not rs else rs[0]["error"])
        fmt = lambda c, i: "–" if c is None else c if isinstance(c, str) else f"{c[i]:.{2 - i * 2}f}"
        o, u = cells.get("official"), cells["ours"]
        ratio = f"{o[0] / u[0]:.2f}" if isinstance(o, tuple) and isinstance(u, tuple) else "–"
        print(f"| {label} | {fmt(o, 0)} | {fmt(u, 0)} | {ratio} | {fmt(o, 1)} | {fmt(u, 1)} |", flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", choices=["model", "method", "sample", "train", "drift", "compare", "checkpointing"], default="model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None)
    p.add_argument("--seconds", type=float, nargs="+", help="audio lengths (default: model/sample 10 60 180, train 60)")
    p.add_argument("--batch", type=int, default=4, help="train: batch size (the card's 4)")
    p.add_argument("--repeats", type=int, default=3, help="compare: processes per side and row (median)")
    p.add_argument("--long", action="store_true", help="compare: also the 120 s rows")
    p.add_argument("--kind", choices=dora.KINDS, default="dora-rows", help="checkpointing: the adapter")
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(CASES[case["what"]](case)))
        sys.exit()
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    args.seconds = args.seconds or ([60] if args.what == "train" else [10] if args.what == "checkpointing" else
                                    [10, 60, 180])
    {"model": bench_model, "method": bench_method, "sample": bench_sample, "train": bench_train,
     "drift": bench_drift, "compare": bench_compare, "checkpointing": bench_checkpointing}[args.what](args)
