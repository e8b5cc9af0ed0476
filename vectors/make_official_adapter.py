"""Make official-layout adapter files with the official Stable Audio 3 LoRA code, plus the weights it produces.

Dev tooling, never imported by project code. Needs the official checkout (github:Stability-AI/stable-audio-3) and
the oracle venv (torch 2.13 CPU, safetensors):
    PYTHONPATH=/work/oracle/sa3:/work/oracle/stubs /work/oracle/venv/bin/python vectors/make_official_adapter.py

The model is a tiny mock whose module names are shaped like SA3's (root.model = DiT wrapper, root.conditioner);
`mock_sa3()` is repeated in test_method.py. Writes:
  official_adapter.safetensors        dora-rows, rank 2, alpha 4, exclude ["layers.[1-3].ff"]   (adapter 1)
  official_adapter_stack.safetensors  lora, rank 2, alpha 2, include ["layers.[0-1].self_attn", "conditioners"] (adapter 2)
      both written by the official `save_lora_safetensors` (fp16 tensors, metadata lora_config), random A, B, m.
  official_adapter_expected.safetensors  (fp32)
      base.<key>             the mock's base weights (root state_dict)
      strength1.<module>     weight of each adapted module after the official `load_and_apply_loras` of adapter 1
      strength0.5.<module>   the same after `set_lora_strength(0.5)`
      stacked.<module>       after loading adapters 1 and 2 together (chained parametrizations P2(P1(W)))
"""
import os
import subprocess
from functools import partial

import stable_audio_3
import torch
import torch.nn as nn
from safetensors.torch import save_file
from stable_audio_3.models.lora import (add_lora, get_lora_state_dict, load_and_apply_loras,
                                        LoRAParametrization, save_lora_safetensors, set_lora_strength)

HERE = os.path.dirname(os.path.abspath(__file__))


def mock_sa3():
    """Tiny module tree with SA3's names: the DiT under root.model.model, seconds_total under root.conditioner.
    postprocess_conv has kernel 3 (SA3's is 1) to exercise the kernel axis."""
    def seq(*mods):
        return nn.Sequential(*mods)
    dit = nn.Module()
    dit.to_timestep_embed = seq(nn.Linear(16, 8), nn.SiLU(), nn.Linear(8, 8))
    dit.preprocess_conv = nn.Conv1d(6, 6, 1, bias=False)
    dit.postprocess_conv = nn.Conv1d(6, 6, 3, padding=1, bias=False)
    dit.transformer = nn.Module()
    dit.transformer.project_in = nn.Linear(6, 8, bias=False)
    dit.transformer.layers = nn.ModuleList()
    for _ in range(2):
        block = nn.Module()
        block.self_attn = nn.Module()
        block.self_attn.to_qkv = nn.Linear(8, 24, bias=False)
        block.ff = nn.Module()
        proj = nn.Module()
        proj.proj = nn.Linear(8, 16)
        block.ff.ff = seq(proj, nn.SiLU(), nn.Linear(16, 8))
        dit.transformer.layers.append(block)
    root = nn.Module()
    root.model = nn.Module()
    root.model.model = dit
    root.conditioner = nn.Module()
    root.conditioner.conditioners = nn.ModuleDict({"seconds_total": nn.Module()})
    root.conditioner.conditioners["seconds_total"].embedder = nn.Module()
    root.conditioner.conditioners["seconds_total"].embedder.embedding = seq(nn.Identity(), nn.Linear(16, 8))
    return root


def train_like(cfg, seed):
    """Adapters as the official trainer adds them (diffusion.py), moved off their init, in the official file form."""
    torch.manual_seed(seed)
    root = mock_sa3()
    root.load_state_dict(base)
    make = dict(rank=cfg["rank"], lora_alpha=cfg["alpha"], adapter_type=cfg["adapter_type"])
    lora_config = {nn.Linear: {"weight": partial(LoRAParametrization.from_linear, **make)},
                   nn.Conv1d: {"weight": partial(LoRAParametrization.from_conv1d, **make)}}
    for sub in (root.model, root.conditioner):
        add_lora(sub, lora_config, include=cfg["include"], exclude=cfg["exclude"])
    with torch.no_grad():
        for name, p in root.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)
            if name.endswith("magnitude"):
                p.mul_(0.5 + torch.rand_like(p))
    return {**get_lora_state_dict(root.model), **get_lora_state_dict(root.conditioner)}


def adapted_weights(paths, strength=None):
    """{module: weight} of every adapted module after the official loader (weights seen through parametrizations)."""
    root = mock_sa3()
    root.load_state_dict(base)
    load_and_apply_loras(root, paths, "diffusion_cond")
    if strength is not None:
        set_lora_strength(root, strength)
    return {name: m.weight.detach().clone() for name, m in root.named_modules() if hasattr(m, "parametrizations")}


commit = subprocess.run(["git", "-C", os.path.dirname(stable_audio_3.__file__), "rev-parse", "HEAD"],
                        capture_output=True, text=True).stdout.strip()
torch.manual_seed(0)
base = {k: v.clone() for k, v in mock_sa3().state_dict().items()}
configs = {
    "official_adapter.safetensors": dict(rank=2, alpha=4, adapter_type="dora-rows", dropout=0.0,
                                         include=None, exclude=["layers.[1-3].ff"]),
    "official_adapter_stack.safetensors": dict(rank=2, alpha=2, adapter_type="lora", dropout=0.0,
                                               include=["layers.[0-1].self_attn", "conditioners"], exclude=None),
}
paths = []
for seed, (fname, cfg) in enumerate(configs.items(), start=1):
    paths.append(os.path.join(HERE, fname))
    save_lora_safetensors(train_like(cfg, seed), cfg, paths[-1])

expected = {f"base.{k}": v for k, v in base.items()}
for tag, w in (("strength1", adapted_weights(paths[:1])), ("strength0.5", adapted_weights(paths[:1], 0.5)),
               ("stacked", adapted_weights(paths))):
    expected.update({f"{tag}.{k}": v for k, v in w.items()})
save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(HERE, "official_adapter_expected.safetensors"),
          metadata={"torch": torch.__version__, "stable_audio_3_commit": commit})
for f in [*configs, "official_adapter_expected.safetensors"]:
    print(f, os.path.getsize(os.path.join(HERE, f)), "bytes")
