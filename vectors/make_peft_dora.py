"""Make vectors/peft_dora.safetensors: PEFT's DoRA forward and gradients on a small Linear and Conv1d (float64).

Dev tooling, never imported by project code. Needs `peft` (the oracle venv has peft 0.21.2, torch 2.13 CPU):
    /work/oracle/venv/bin/python vectors/make_peft_dora.py
PEFT detaches the norm (DoRA paper §4.3), so these vectors check dora.DoRA with detach_norm=True.
Stored per layer `<lin|conv>.<name>`: W0, bias, A [r, in·k], B [out, r], m [out], x, g (upstream gradient),
y = PEFT output, dx, dA, dB, dm = gradients of Σ g·y. Also `scale` = lora_alpha/r.
"""
import os

import peft
import torch
import torch.nn as nn
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

torch.manual_seed(0)
R, ALPHA = 4, 8


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.conv = nn.Conv1d(6, 10, 3, stride=2, padding=1)


net = get_peft_model(Tiny().double(), LoraConfig(r=R, lora_alpha=ALPHA, use_dora=True, lora_dropout=0.0,
                                                 target_modules=["lin", "conv"]))
inputs = {"lin": torch.randn(3, 5, 12, dtype=torch.float64), "conv": torch.randn(2, 6, 9, dtype=torch.float64)}
out = {"scale": torch.tensor(ALPHA / R, dtype=torch.float64)}
for name, x in inputs.items():
    layer = getattr(net.base_model.model, name)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m = layer.lora_magnitude_vector["default"].weight
    with torch.no_grad():  # move away from the init (B = 0, m = ‖W0‖) so every term is exercised
        B.normal_(0, 0.5)
        m.mul_(0.5 + torch.rand_like(m))
    x = x.clone().requires_grad_(True)
    y = layer(x)
    g = torch.randn_like(y)
    dx, dA, dB, dm = torch.autograd.grad(y, [x, A, B, m], g)
    rows = len(layer.base_layer.weight)
    for k, v in dict(W0=layer.base_layer.weight, bias=layer.base_layer.bias, A=A.reshape(R, -1),
                     B=B.reshape(rows, R), m=m.reshape(rows), x=x, g=g, y=y, dx=dx, dA=dA.reshape(R, -1),
                     dB=dB.reshape(rows, R), dm=dm.reshape(rows)).items():
        out[f"{name}.{k}"] = v.detach().contiguous()

path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peft_dora.safetensors")
save_file(out, path, metadata={"peft": peft.__version__, "torch": torch.__version__})
print(f"wrote {path} ({os.path.getsize(path)} bytes, peft {peft.__version__}, torch {torch.__version__})")
