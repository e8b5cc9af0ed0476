"""Make vectors/sa3_extra.safetensors: more reference outputs of the official Stable Audio 3 code on the tiny
fixture models of shared/reference/sa3/seed1 (paths those fixtures do not cover). Test-time tooling only: it
imports the official code and transformers, which the project never does.

Regenerate (official code checked out outside this repo, commit 636f906; a venv with torch 2.13 CPU,
transformers 5.24, einops, safetensors; torchaudio may be a stub because no path here resamples):
    PYTHONPATH=/path/to/stable-audio-3 python vectors/make_sa3_extra.py ../shared/reference/sa3/seed1

FlashAttention-2 semantics (what the official models run with on CUDA) are emulated exactly in float32 by
replacing `Attention.apply_attn`: with a padding mask, padded keys are excluded and padded query rows are zero,
and the feed-forward runs on valid tokens only (the official varlen path, through index_first_axis/pad_input).
"""
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import stable_audio_3.models.transformer as tr
from stable_audio_3.factory import create_diffusion_cond_from_config
from stable_audio_3.loading_utils import copy_state_dict
from stable_audio_3.models.conditioners import T5GemmaConditioner
from transformers import AutoTokenizer, T5GemmaEncoderModel


def exact_attention(q, k, v, key_mask=None, window=None):
    """q, k, v (B, H, N, d), float32; key_mask (B, N) bool; window (left, right) in tokens."""
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    allowed = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool)
    if window is not None:
        i = torch.arange(q.shape[-2])[:, None]
        j = torch.arange(k.shape[-2])[None, :]
        allowed = (j - i >= -window[0]) & (j - i <= window[1])
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :]
    out = logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v
    if key_mask is not None:
        out = out * key_mask[:, None, :, None]
    return out


def fa2_apply_attn(self, q, k, v, causal=None, flex_attention_block_mask=None, flex_attention_score_mod=None,
                   flash_attn_sliding_window=None, padding_mask=None, varlen_metadata=None):
    key_mask = padding_mask if varlen_metadata is not None else None
    return exact_attention(q, k, v, key_mask, flash_attn_sliding_window)


def install_fa2_substitute():
    tr.Attention.apply_attn = fa2_apply_attn
    tr.flash_attn_varlen_func = object()  # only tested for None: makes ContinuousTransformer build varlen metadata
    tr.unpad_input = object()
    tr.index_first_axis = lambda x, idx: x[idx]

    def pad_input(x, idx, batch, seqlen):
        out = x.new_zeros(batch * seqlen, *x.shape[1:])
        out[idx] = x
        return out.view(batch, seqlen, *x.shape[1:])
    tr.pad_input = pad_input


def load_official(folder):
    config = json.loads((folder / "model_config.json").read_text())
    prompt = config["model"]["conditioning"]["configs"][0]["config"]
    prompt["model_path"] = str(folder)  # with its `subfolder`: the T5 folder beside the checkpoint
    T5GemmaConditioner.T5GEMMA_MODEL_DIMS["google/t5gemma-b-b-ul2"] = config["model"]["conditioning"]["cond_dim"]
    model = create_diffusion_cond_from_config(config)
    copy_state_dict(model, load_file(str(folder / "model.safetensors")))
    return model.eval().requires_grad_(False), config


def no_decode_noise(model):
    ae = model.pretransform.model
    ae.bottleneck.noise_regularize = False
    for layer in ae.decoder.layers:
        if hasattr(layer, "mask_noise"):
            layer.mask_noise = 0


def test_audio(n):
    """Deterministic smooth stereo test signal, rebuilt by the tests instead of stored."""
    t = torch.arange(n, dtype=torch.float64) / 44100
    left = 0.3 * torch.sin(2 * math.pi * 220 * t) + 0.2 * torch.sin(2 * math.pi * 331 * t + 0.5)
    right = 0.25 * torch.sin(2 * math.pi * 147 * t + 1.0) + 0.1 * torch.sin(2 * math.pi * 1234 * t)
    return torch.stack([left, right])[None].float()


PROMPTS = ["  spaced   out\tambient\n\nwith newlines, 120 BPM 3/4 ", "",
           "café ☕ lo-fi 😀 groove — 0123456789", "A" * 700]
SECONDS = [0.0, 1.5, 383.9, 384.0, 1000.0, -5.0]


def main(seed_dir):
    seed_dir = Path(seed_dir)
    install_fa2_substitute()
    inputs = json.loads((seed_dir / "inputs.json").read_text())
    ref = load_file(str(seed_dir / "reference.safetensors"))
    out, notes = {}, {}
    for name in ("base", "arc"):
        folder = seed_dir / name
        model, config = load_official(folder)
        no_decode_noise(model)
        dit, cond_mod = model.model, model.conditioner
        g = torch.Generator().manual_seed(1234 + len(name))
        # --- tokenizer: the folder's own template, and the config-flag variant (add_bos/add_eos false)
        tok = AutoTokenizer.from_pretrained(str(folder / "t5gemma-b-b-ul2"))
        enc = tok(PROMPTS, truncation=True, max_length=256, padding="max_length", return_tensors="pt")
        out[f"{name}.tok.template.ids"] = enc["input_ids"]
        out[f"{name}.tok.template.mask"] = enc["attention_mask"].bool()
        tok2 = AutoTokenizer.from_pretrained(str(folder / "t5gemma-b-b-ul2"), add_bos_token=False,
                                             add_eos_token=False)
        enc2 = tok2(PROMPTS, truncation=True, max_length=256, padding="max_length", return_tensors="pt")
        out[f"{name}.tok.noflags.ids"] = enc2["input_ids"]
        out[f"{name}.tok.noflags.mask"] = enc2["attention_mask"].bool()
        # --- conditioning of the tricky prompts (incl. the empty one: every position is padding)
        if name == "arc":  # (one fixture is enough: the T5 path is the same in both)
            c = cond_mod([{"prompt": p, "seconds_total": s} for p, s in zip(PROMPTS[:3], SECONDS)], "cpu")
            out[f"{name}.cond.tricky.cross"] = torch.cat([c["prompt"][0], c["seconds_total"][0]], dim=1)
        c = cond_mod([{"prompt": "x", "seconds_total": s} for s in SECONDS], "cpu")
        out[f"{name}.cond.seconds.global"] = c["seconds_total"][0][:, 0]
        # --- the text encoder in bfloat16 (what transformers' dtype="auto" does with the real bf16 files)
        if name == "base":
            t5 = T5GemmaEncoderModel.from_pretrained(str(folder / "t5gemma-b-b-ul2"), dtype=torch.bfloat16)
            out[f"{name}.t5.bf16"] = t5(input_ids=ref[f"{name}.cond.input_ids"], attention_mask=ref[
                f"{name}.cond.attention_mask"])["last_hidden_state"].float()
        # --- guided denoise with padding, negative prompts, APG blends and the CFG norm threshold
        prompts = inputs["models"][name]["conditioning"]["prompts"]
        T = 40
        x = torch.randn(2, dit.model.transformer.project_in.in_features, T, generator=g)
        t = torch.tensor([0.9, 0.45])
        pmask = torch.arange(T)[None] < torch.tensor([[T], [29]])
        local = torch.zeros(2, 1 + x.shape[1], T)

        def conditioning(texts, negative=False):  # as generate() builds it, inpaint cond included
            tensors = cond_mod([{"prompt": p, "seconds_total": 12.0} for p in texts], "cpu")
            tensors["inpaint_mask"], tensors["inpaint_masked_input"] = [local[:, :1]], [local[:, 1:]]
            return model.get_conditioning_inputs(tensors, negative=negative)
        pos, neg = conditioning(prompts), conditioning(["", "noisy, distorted"], negative=True)
        common = dict(cross_attn_cond=pos["cross_attn_cond"], cross_attn_mask=pos["cross_attn_mask"],
                      global_cond=pos["global_cond"], local_add_cond=local)
        out[f"{name}.den.x"], out[f"{name}.den.t"], out[f"{name}.den.pmask"] = x, t, pmask
        cases = {"cfg1_mask": dict(cfg_scale=1.0, padding_mask=pmask),
                 "cfg4_neg_mask": dict(cfg_scale=4.0, padding_mask=pmask, **neg),
                 "cfg2.5_apg0.5_thr_mask": dict(cfg_scale=2.5, apg_scale=0.5, cfg_norm_threshold=5.0,
                                                padding_mask=pmask),
                 "cfg3_apg0": dict(cfg_scale=3.0, apg_scale=0.0)}
        for case, kw in cases.items():
            kw.setdefault("apg_scale", 1.0)
            out[f"{name}.den.{case}"] = dit(x, t, **common, **kw)
            notes[f"{name}.den.{case}"] = {k: v for k, v in kw.items() if isinstance(v, float)}
        # --- chunked encode/decode (chunk 16, overlap 4 latents, to keep the vectors small)
        ae = model.pretransform.model
        ratio = ae.downsampling_ratio
        audio = test_audio(40 * ratio + 77)
        out[f"{name}.chunk.encode"] = ae.encode_audio(audio, chunked=True, chunk_size=16, overlap=4)
        out[f"{name}.chunk.encode_full"] = ae.encode_audio(audio, chunked=False)
        z = torch.randn(1, ae.latent_dim, 41, generator=g)
        out[f"{name}.chunk.z"] = z
        out[f"{name}.chunk.decode"] = ae.decode_audio(z, chunked=True, chunk_size=16, overlap=4)
    meta = {"prompts": PROMPTS, "seconds": SECONDS, "chunk": {"size": 16, "overlap": 4, "audio_extra": 77},
            "cases": notes, "official_commit": "636f906fc0ee54b3f06edf974dc7d3aa99d6841b"}
    save_file({k: v.contiguous() for k, v in out.items()}, "vectors/sa3_extra.safetensors",
              metadata={"inputs": json.dumps(meta)})


if __name__ == "__main__":
    main(sys.argv[1])
