"""
Stable Audio 3, from scratch: the model that the official `model_config.json` + `model.safetensors` describe.

This file owns every tensor of the model and nothing of training or sampling:
  1. safetensors I/O (our own reader/writer: no pickle, nothing executed)
  2. shared blocks: norms, rotary embedding, attention (standard and differential), feed-forward
  3. the T5Gemma text encoder (encoder half) and its sentencepiece tokenizer
  4. the conditioners: learned-padding prompt and `seconds_total`
  5. the DiT (adaLN, 64 memory tokens, local add cond, FlashAttention-2 padding semantics)
  6. the SAME autoencoder (SAME-S chunked + midpoint shift, SAME-L ±17-token sliding window)
  7. StableAudioModel: loading, conditioning, classifier-free guidance with APG, encode/decode

Module names equal the checkpoint keys (`model.model.transformer.layers.0.self_attn.to_qkv.weight`, ...), so
loading needs no rename table. Facts come from the official code (github Stability-AI/stable-audio-3, 636f906),
summarised in shared/sa3_facts.md; section numbers (§) below refer to it.

Shape legend: B batch, C latent channels, T latent frames, N tokens or samples, D width, H heads,
d head width, L text tokens, G tokens per latent group (stride + 1).
"""

import errno
import itertools
import json
import math
import os
import shutil
import sys
from pathlib import Path

import sentencepiece
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

TINY_MODEL = Path(__file__).resolve().parent / "tiny"  # the embedded default model (rebuilt by tiny.py)

# -----------------------------------------------------------------------------------------------------------------
# 1. safetensors: an 8-byte little-endian header length, a JSON header, then raw little-endian tensor bytes

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _read_safetensors_header(f, path):
    """Validate the header against the file size before anything is allocated; returns (entries, metadata, start)."""
    file_size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError(f"{path}: not a safetensors file (shorter than the 8-byte header length)")
    n = int.from_bytes(raw, "little")
    if n > MAX_HEADER_BYTES:
        raise ValueError(f"{path}: not a safetensors file (its first 8 bytes give a header length of {n} bytes, "
                         f"over the {MAX_HEADER_BYTES}-byte limit)")
    if 8 + n > file_size:
        raise ValueError(f"{path}: not a safetensors file, or a truncated one (header length {n} runs past the end "
                         f"of the {file_size}-byte file)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (header is not valid JSON: {e})") from None
    except RecursionError:
        raise ValueError(f"{path}: header nests too deeply (expected a flat JSON object of tensors)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is a {type(header).__name__}, expected a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings")
    data_size = file_size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{path}: tensor {name!r} needs exactly dtype, shape and data_offsets")
        if e["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unknown dtype {e['dtype']!r} "
                             f"(expected one of {', '.join(SAFETENSORS_DTYPES)})")
        shape, offsets = e["shape"], e["data_offsets"]
        if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
            raise ValueError(f"{path}: tensor {name!r} has a bad shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r}")
        if offsets[1] > data_size:
            raise ValueError(f"{path}: tensor {name!r} ends at byte {offsets[1]} but the file holds only "
                             f"{data_size} data bytes (truncated?)")
        nbytes = math.prod(shape) * SAFETENSORS_DTYPES[e["dtype"]].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{path}: tensor {name!r} of shape {shape} and dtype {e['dtype']} needs {nbytes} "
                             f"bytes, but data_offsets span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin < end:
            raise ValueError(f"{path}: tensor {name!r} overlaps the tensor before it (data_offsets {begin}..{stop})")
        end = stop
    return header, metadata, 8 + n


def load_safetensors(path, device="cpu", dtype=None):
    """Read every tensor of a .safetensors file, one at a time straight into its own buffer (never the whole file
    twice). `dtype` casts floating-point tensors (e.g. a bf16 file into float32)."""
    if sys.byteorder != "little":
        raise ValueError(f"{path}: reading safetensors needs a little-endian machine")
    out = {}
    with open(path, "rb") as f:
        header, _, start = _read_safetensors_header(f, path)
        for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = e["data_offsets"]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            f.seek(start + begin)
            if f.readinto(buf.numpy()) != end - begin:
                raise ValueError(f"{path}: tensor {name!r} is truncated")
            t = buf.view(SAFETENSORS_DTYPES[e["dtype"]]).reshape(e["shape"])
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[name] = t.to(device)
    return out


def read_safetensors_metadata(path):
    """The `__metadata__` of a .safetensors file (a dict of strings), read without touching the tensors."""
    with open(path, "rb") as f:
        return _read_safetensors_header(f, path)[1]


def write_atomic(path, parts, size):
    """Write the byte strings `parts` (`size` bytes in all) to `path` atomically: a temporary file of this process's
    own (two writers never share one), fsync, then a rename. On any failure the temporary file is removed and `path`
    is left as it was; a full disk is one line naming the folder and the space needed."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = Path(path).resolve().parent
            raise OSError(f"{folder}: disk full writing {Path(path).name} ({size / 1e6:.1f} MB needed, "
                          f"{shutil.disk_usage(folder).free / 1e6:.1f} MB free); free space and resume") from None
        raise


def save_safetensors(tensors, path, metadata=None):
    """Write tensors (any device/dtype above) to `path` atomically (write_atomic)."""
    names = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for name, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError(f"{path}: metadata must map strings to strings")
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    data = (t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data for t in tensors.values())
    write_atomic(path, itertools.chain([len(raw).to_bytes(8, "little"), raw], data), 8 + len(raw) + offset)


# -----------------------------------------------------------------------------------------------------------------
# Reading model_config.json: every value comes from the file, and an unsupported one names its JSON path

REQUIRED = object()
MAX_LAYERS = 1024  # blocks per stack: SA3 has 20-24; a mutated 10**9 would take hours just to build on meta


class Config:
    """One JSON object of a config file, remembering where it sits so that errors can name the field."""

    def __init__(self, data, path="", file="model_config.json"):
        if not isinstance(data, dict):
            raise ValueError(f"{file}: {path or 'the top level'} must be a JSON object, got {type(data).__name__}")
        self.data, self.path, self.file = data, path, file

    def where(self, key):
        return f"{self.file}: {self.path + '.' if self.path else ''}{key}"

    def get(self, key, default=REQUIRED, choices=None):
        if key not in self.data:
            if default is REQUIRED:
                raise ValueError(f"{self.where(key)} is missing")
            return default
        value = self.data[key]
        if choices is not None and value not in choices:
            raise ValueError(f"{self.where(key)}={value!r} is not supported (expected {' or '.join(map(repr, choices))})")
        return value

    def int(self, key, default=REQUIRED, minimum=1, maximum=None):
        value = self.get(key, default)
        if (isinstance(value, bool) or not isinstance(value, int) or value < minimum
                or (maximum is not None and value > maximum)):
            raise ValueError(f"{self.where(key)}={value!r} must be an integer >= {minimum}"
                             + (f" and <= {maximum}" if maximum is not None else ""))
        return value

    def num(self, key, default=REQUIRED, minimum=-math.inf, maximum=math.inf):
        value = self.get(key, default)
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or not minimum <= value <= maximum):
            bounds = f" in [{minimum:g}, {maximum:g}]" if math.isfinite(minimum) or math.isfinite(maximum) else ""
            raise ValueError(f"{self.where(key)}={value!r} must be a finite number{bounds}")
        return float(value)

    def ints(self, key, default=REQUIRED, minimum=1, length=None):
        """A list of integers >= minimum (of `length` items when given)."""
        value = self.get(key, default)
        if (not isinstance(value, list) or not value or (length is not None and len(value) != length)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value)):
            raise ValueError(f"{self.where(key)}={value!r} must be a list of "
                             f"{length or 'one or more'} integers >= {minimum}")
        return value

    def sub(self, key, default=REQUIRED):
        return Config(self.get(key, default), f"{self.path + '.' if self.path else ''}{key}", self.file)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nests too deeply") from None


# -----------------------------------------------------------------------------------------------------------------
# 2. Shared blocks

class Holder(nn.Module):
    """A parameter-free container. It exists only so that attribute paths equal the official keys
    (the official code has a wrapper class at each of these places: `model.model.*`, `pretransform.model.*`)."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class Transpose(nn.Module):
    """(B, X, Y) -> (B, Y, X); parameter-free, but it holds an index in the official `layers` lists."""

    def forward(self, x):
        return x.transpose(-1, -2)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · γ, optionally computed in float32 (the DiT's `force_fp32`)."""

    def __init__(self, dim, eps, force_fp32=False):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.eps, self.force_fp32 = eps, force_fp32

    def forward(self, x):
        if self.force_fp32:
            return F.rms_norm(x.float(), x.shape[-1:], self.gamma.float(), self.eps).to(x.dtype)
        return F.rms_norm(x, x.shape[-1:], self.gamma, self.eps)


class DyT(nn.Module):
    """Dynamic tanh, the SAME autoencoder's norm: y = γ·tanh(α·x) + β (α a scalar, no eps)."""

    def __init__(self, dim):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((1,), 4.0))
        self.gamma = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return self.gamma * torch.tanh(self.alpha * x) + self.beta


def inv_freqs(dim, base=10000.0):
    """inv_freq_i = base^(-2i/dim), i < dim/2."""
    return 1.0 / base ** (torch.arange(0, dim, 2).float() / dim)


def rotary_angles(inv_freq, n):
    """θ[p] = p·inv_freq for positions 0..n-1, duplicated to [θ, θ]: (n, 2·len(inv_freq)), float32."""
    freqs = torch.arange(n, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq.float()
    return torch.cat([freqs, freqs], dim=-1)


class Rotary(nn.Module):
    """Holds the rotary `inv_freq` buffer, which is in the checkpoint (and loaded from it)."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("inv_freq", inv_freqs(dim))

    def cos_sin(self, n):
        """(cos θ, sin θ) for positions 0..n-1, float32: computed once per call, used by every head and q/k."""
        angles = rotary_angles(self.inv_freq, n)
        return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, rotary):
    """Partial half-split RoPE on the leading cos.shape[-1] dims of each head, in float32, rotary = (cos θ, sin θ):
    x_rot = x·cos θ + rotate_half(x)·sin θ; the remaining dims pass through."""
    cos, sin = rotary
    r = cos.shape[-1]
    xf = x.float()
    rotated = xf[..., :r] * cos + rotate_half(xf[..., :r]) * sin
    return torch.cat([rotated, xf[..., r:]], dim=-1)


def banded_attention(q, k, v, group, window):
    """Exact sliding-window attention in O(N·W) memory: query i sees key j iff -window[0] <= j-i <= window[1].
    The sequence is cut into blocks of `group` tokens; each query block attends to the key blocks that its band
    can reach (its neighbours, padded at the ends), under a small band mask. q, k, v: (B, H, N, d), N % group == 0."""
    B, H, N, d = q.shape
    G, nb = group, N // group
    left, right = -(-window[0] // G), -(-window[1] // G)          # key blocks reachable on each side
    kb = F.pad(k.reshape(B, H, nb, G, d), (0, 0, 0, 0, left, right))  # (B, H, left+nb+right, G, d)
    vb = F.pad(v.reshape(B, H, nb, G, d), (0, 0, 0, 0, left, right))
    kw = torch.cat([kb[:, :, i:i + nb] for i in range(left + 1 + right)], dim=3)  # (B, H, nb, W, d)
    vw = torch.cat([vb[:, :, i:i + nb] for i in range(left + 1 + right)], dim=3)
    W = kw.shape[3]
    # key column c of block g is token (g - left)·G + c; query row r is token g·G + r
    col = torch.arange(W, device=q.device) - left * G
    delta = col[None, :] - torch.arange(G, device=q.device)[:, None]                      # (G, W): j - i
    key_pos = torch.arange(nb, device=q.device)[:, None] * G + col[None, :]               # (nb, W)
    mask = ((delta >= -window[0]) & (delta <= window[1]))[None] & ((key_pos >= 0) & (key_pos < N))[:, None, :]
    out = F.scaled_dot_product_attention(q.reshape(B, H, nb, G, d), kw, vw, attn_mask=mask)  # (B, H, nb, G, d)
    return out.reshape(B, H, N, d)


class Attention(nn.Module):
    """Multi-head attention as the official `Attention`: fused `to_qkv` for self-attention, `to_q` + `to_kv` for
    cross-attention, per-head qk-norm, RoPE on the leading dims, no biases. Differential attention (§4.3) splits
    to_qkv into q, k, v, q₂, k₂ (cross: to_q → q, q₂ and to_kv → k, k₂, v) and returns
    SDPA(q, k, v) − SDPA(q₂, k₂, v): no λ, no extra norm."""

    def __init__(self, dim, dim_heads, differential, qk_norm, cross=False):
        super().__init__()
        self.heads, self.differential, self.cross = dim // dim_heads, differential, cross
        n_q, n_kv = (2, 3) if differential else (1, 2)
        if cross:
            self.to_q = nn.Linear(dim, n_q * dim, bias=False)
            self.to_kv = nn.Linear(dim, n_kv * dim, bias=False)
        else:
            self.to_qkv = nn.Linear(dim, (n_q + n_kv) * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.to_out.weight)  # official init: every residual branch starts at zero
        self.q_norm, self.k_norm = qk_norm(dim_heads), qk_norm(dim_heads)

    def heads_of(self, x, n):
        """(B, N, n·H·d) -> n tensors (B, H, N, d), channel = head·d + dim within each chunk."""
        B, N, _ = x.shape
        return [c.reshape(B, N, self.heads, c.shape[-1] // self.heads).transpose(1, 2) for c in x.chunk(n, dim=-1)]

    def keys_values(self, context):
        """Cross-attention: the normed keys and the values of the context (B, Lc, D). They depend on the conditioning
        only, so a sampler computes them once per generation (DiT.prepare) and every step reuses them."""
        kv = self.heads_of(self.to_kv(context), 3 if self.differential else 2)
        v = kv[-1]
        return [self.k_norm(k).to(v.dtype) for k in kv[:-1]], v

    def forward(self, x, kv=None, rotary=None, key_mask=None, window=None, group=None):
        # x (B, N, D); kv = keys_values(context) for cross-attention; rotary = (cos, sin) of N positions
        B, N, D = x.shape
        if self.cross:
            qs = self.heads_of(self.to_q(x), 2 if self.differential else 1)
            ks, v = kv
        elif self.differential:
            q, k, v, q2, k2 = self.heads_of(self.to_qkv(x), 5)
            qs, ks = [q, q2], [k, k2]
        else:
            q, k, v = self.heads_of(self.to_qkv(x), 3)
            qs, ks = [q], [k]
        qs = [self.q_norm(q).to(v.dtype) for q in qs]
        if not self.cross:
            ks = [self.k_norm(k).to(v.dtype) for k in ks]
        if rotary is not None:
            qs = [apply_rotary(q, rotary).to(v.dtype) for q in qs]
            ks = [apply_rotary(k, rotary).to(v.dtype) for k in ks]
        outs = []
        for q, k in zip(qs, ks):
            if window is not None:
                outs.append(banded_attention(q, k, v, group, window))
            else:
                outs.append(F.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if key_mask is None else key_mask[:, None, None, :]))
        out = outs[0] - outs[1] if self.differential else outs[0]               # (B, H, N, d)
        if key_mask is not None:  # FlashAttention-2 varlen: the rows of padded queries are exactly zero
            out = out.masked_fill(~key_mask[:, None, :, None], 0.0)
        return self.to_out(out.transpose(1, 2).reshape(B, N, D))


class GLU(nn.Module):
    """[a, b] = chunk₂(W·x + c): the first half is the value, the second the gate: a ⊙ act(b)."""

    def __init__(self, dim, inner, act):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)
        self.act = act

    def forward(self, x):
        a, b = self.proj(x).chunk(2, dim=-1)
        return a * self.act(b)


def sin_pi(x):
    """The SAME decoder's sinusoidal gate sin(π·x); the official code spells π as 3.14159265359."""
    return torch.sin(3.14159265359 * x)


class FeedForward(nn.Module):
    """FF(y) = W_out(a ⊙ act(b)) + c_out with the GLU above; keys ff.ff.0.proj and ff.ff.2."""

    def __init__(self, dim, mult, act=F.silu):
        super().__init__()
        inner = int(dim * mult)
        self.ff = nn.Sequential(GLU(dim, inner, act), nn.Identity(), nn.Linear(inner, dim))
        nn.init.zeros_(self.ff[2].weight)
        nn.init.zeros_(self.ff[2].bias)

    def forward(self, x):
        return self.ff(x)


def expo_fourier(t, dim, min_freq=0.5, max_freq=10000.0):
    """ExpoFourierFeatures (§3.5): f = exp(r·(ln max − ln min) + ln min), r = linspace(0, 1, dim/2);
    a = t·f·2·π; features [cos a, sin a], computed in float32 and returned in t's dtype. t: (B,) -> (B, dim)."""
    ramp = torch.linspace(0, 1, dim // 2, device=t.device, dtype=torch.float32)
    freqs = torch.exp(ramp * (math.log(max_freq) - math.log(min_freq)) + math.log(min_freq))
    args = t.float()[:, None] * freqs * 2 * math.pi
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(t.dtype)


class ExpoFourier(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        return expo_fourier(t, self.dim)


# -----------------------------------------------------------------------------------------------------------------
# 3. T5Gemma text encoder (encoder half of google/t5gemma-b-b-ul2) and its sentencepiece tokenizer (§3)

T5GEMMA_B_ENCODER = dict(  # used by from_config when no text-encoder config.json is given (§3.3)
    vocab_size=256000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
    num_key_value_heads=12, head_dim=64, query_pre_attn_scalar=64, rms_norm_eps=1e-6, attn_logit_softcapping=50.0,
    hidden_activation="gelu_pytorch_tanh", sliding_window=4096, rope_parameters={"rope_theta": 10000.0},
    layer_types=["sliding_attention", "full_attention"] * 6)


class GemmaRMSNorm(nn.Module):
    """Gemma's norm: y = x / sqrt(mean(x²) + eps) · (1 + w), in float32, cast back; w starts at 0."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class T5Attention(nn.Module):
    """Bidirectional attention with full-head RoPE, logits (q·kᵀ)/√s soft-capped to c·tanh(z/c), grouped kv."""

    def __init__(self, c):
        super().__init__()
        D, H, Hkv, d = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, Hkv * d, bias=False)
        self.v_proj = nn.Linear(D, Hkv * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.heads, self.kv_heads, self.d = H, Hkv, d
        self.scale, self.softcap = c["query_pre_attn_scalar"] ** -0.5, c["attn_logit_softcapping"]

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.heads, self.d).transpose(1, 2)    # (B, H, L, d)
        k = self.k_proj(x).view(B, L, self.kv_heads, self.d).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.kv_heads, self.d).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        logits = torch.matmul(q, k.transpose(2, 3)) * self.scale              # (B, H, L, L)
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
        weights = F.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.o_proj(torch.matmul(weights, v).transpose(1, 2).reshape(B, L, -1))


class T5MLP(nn.Module):
    """down(gelu_tanh(gate(x)) ⊙ up(x)), no biases."""

    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.up_proj = nn.Linear(c["hidden_size"], c["intermediate_size"], bias=False)
        self.down_proj = nn.Linear(c["intermediate_size"], c["hidden_size"], bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class T5Layer(nn.Module):
    """h += post_norm(attn(pre_norm(h))); h += post_norm(mlp(pre_norm(h)))."""

    def __init__(self, c):
        super().__init__()
        D, eps = c["hidden_size"], c["rms_norm_eps"]
        self.self_attn = T5Attention(c)
        self.mlp = T5MLP(c)
        self.pre_self_attn_layernorm, self.post_self_attn_layernorm = GemmaRMSNorm(D, eps), GemmaRMSNorm(D, eps)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = GemmaRMSNorm(D, eps), GemmaRMSNorm(D, eps)

    def forward(self, h, cos, sin, mask):
        h = h + self.post_self_attn_layernorm(self.self_attn(self.pre_self_attn_layernorm(h), cos, sin, mask))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class T5GemmaEncoder(nn.Module):
    """The T5Gemma encoder; keys as in the HF file after its `model.encoder.` (or `encoder.`) prefix."""

    def __init__(self, config, file="t5gemma config.json"):
        super().__init__()
        cfg = Config(config.get("encoder", config), "encoder" if "encoder" in config else "", str(file))
        rope = cfg.sub("rope_parameters", {})
        rope.get("rope_type", "default", choices=["default"])
        window = cfg.get("sliding_window", None)
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
            raise ValueError(f"{cfg.where('sliding_window')}={window!r} must be a positive integer or null")
        self.c = c = dict(
            vocab_size=cfg.int("vocab_size"), hidden_size=cfg.int("hidden_size"),
            intermediate_size=cfg.int("intermediate_size"),
            num_hidden_layers=cfg.int("num_hidden_layers", maximum=MAX_LAYERS),
            num_attention_heads=cfg.int("num_attention_heads"), num_key_value_heads=cfg.int("num_key_value_heads"),
            head_dim=cfg.int("head_dim", cfg.int("hidden_size") // cfg.int("num_attention_heads")),
            query_pre_attn_scalar=cfg.num("query_pre_attn_scalar", minimum=1),
            rms_norm_eps=cfg.num("rms_norm_eps", minimum=0),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping", None) and cfg.num("attn_logit_softcapping",
                                                                                       minimum=1e-6),
            hidden_activation=cfg.get("hidden_activation", choices=["gelu_pytorch_tanh"]),
            rope_theta=rope.num("rope_theta", cfg.num("rope_theta", 10000.0)),
            sliding_window=window, layer_types=cfg.get("layer_types"))
        if (not isinstance(c["layer_types"], list) or len(c["layer_types"]) < c["num_hidden_layers"]
                or not all(kind in ("sliding_attention", "full_attention") for kind in c["layer_types"])):
            raise ValueError(f"{cfg.where('layer_types')}={c['layer_types']!r} must give 'sliding_attention' or "
                             f"'full_attention' for each of the {c['num_hidden_layers']} layers")
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(T5Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = GemmaRMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, ids, mask):
        """ids, mask: (B, L) -> last_hidden_state (B, L, D); keys at mask == False are never attended to."""
        B, L = ids.shape
        h = self.embed_tokens(ids)
        h = h * torch.tensor(self.c["hidden_size"] ** 0.5, dtype=h.dtype)   # the scale is rounded to h's dtype
        angles = rotary_angles(inv_freqs(self.c["head_dim"], self.c["rope_theta"]).to(ids.device), L)
        cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
        full = mask[:, None, None, :]                                        # (B, 1, 1, L) over keys
        pos = torch.arange(L, device=ids.device)
        band = (pos[:, None] - pos[None, :]).abs() <= (self.c["sliding_window"] or L)
        for layer, kind in zip(self.layers, self.c["layer_types"]):
            h = layer(h, cos, sin, full & band if kind == "sliding_attention" else full)
        return self.norm(h)


class Tokenizer:
    """SentencePiece ids with the special tokens, padding side and truncation the folder's own HF files ask for
    (§3.2): `add_bos_token`/`add_eos_token` in tokenizer_config.json when given, else the TemplateProcessing
    post-processor of tokenizer.json, else none. Truncation keeps room for the special tokens."""

    def __init__(self, folder, max_length):
        import sentencepiece
        folder = Path(folder)
        if not (folder / "tokenizer.model").is_file():
            raise FileNotFoundError(f"{folder / 'tokenizer.model'}: file not found (the sentencepiece model)")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        except (RuntimeError, OSError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{folder / 'tokenizer.model'}: not a sentencepiece model ({reason})") from None
        config = read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        fast = read_json(folder / "tokenizer.json") if (folder / "tokenizer.json").is_file() else {}
        ids = {t["content"]: t["id"] for t in fast.get("added_tokens", [])}

        def token_id(name, default):
            token = config.get(name, default)
            token = token["content"] if isinstance(token, dict) else token
            return ids[token] if token in ids else self.sp.piece_to_id(token)

        post = fast.get("post_processor") or {}
        if "add_bos_token" in config or "add_eos_token" in config or post.get("type") != "TemplateProcessing":
            self.prefix = [token_id("bos_token", "<bos>")] if config.get("add_bos_token", False) else []
            self.suffix = [token_id("eos_token", "<eos>")] if config.get("add_eos_token", False) else []
        else:
            single = post["single"]
            seq = next(i for i, p in enumerate(single) if "Sequence" in p)
            special = lambda p: post["special_tokens"][p["SpecialToken"]["id"]]["ids"]
            self.prefix = [i for p in single[:seq] for i in special(p)]
            self.suffix = [i for p in single[seq + 1:] for i in special(p)]
        self.pad_id = token_id("pad_token", "<pad>")
        self.left_pad = config.get("padding_side", "right") == "left"
        self.max_length = max_length

    def count(self, prompt):
        """How many tokens a prompt has before truncation, special tokens included."""
        return len(self.prefix) + len(self.sp.encode(prompt)) + len(self.suffix)

    def __call__(self, prompts):
        """list of str -> ids (B, max_length) int64, mask (B, max_length) bool (True = real token)."""
        keep = self.max_length - len(self.prefix) - len(self.suffix)
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for b, prompt in enumerate(prompts):
            row = self.prefix + self.sp.encode(prompt)[:keep] + self.suffix
            cols = slice(self.max_length - len(row), None) if self.left_pad else slice(0, len(row))
            ids[b, cols] = torch.tensor(row, dtype=torch.long)
            mask[b, cols] = True
        return ids, mask


# -----------------------------------------------------------------------------------------------------------------
# 4. Conditioners (§3.4–3.6)

class PromptConditioner(nn.Module):
    """`padding_mode: learned`: text-encoder outputs at padded positions are replaced by one learned vector."""

    def __init__(self, dim):
        super().__init__()
        self.padding_embedding = nn.Parameter(0.02 * torch.randn(dim))

    def forward(self, hidden, mask):
        """hidden (B, L, D), mask (B, L) -> (B, L, D) in the promoted dtype of both (float32 for a bf16 encoder)."""
        return torch.where(mask[..., None], hidden, self.padding_embedding.expand_as(hidden))


class NumberConditioner(nn.Module):
    """`seconds_total`: u = (clamp(s, lo, hi) − lo)/(hi − lo) -> ExpoFourier(256) -> Linear(256 -> D)."""

    def __init__(self, dim, min_val, max_val):
        super().__init__()
        self.min_val, self.max_val = min_val, max_val
        self.embedder = Holder(embedding=nn.Sequential(ExpoFourier(256), nn.Linear(256, dim)))

    def forward(self, seconds):
        """seconds: list of floats -> (B, 1, D)."""
        weight = self.embedder.embedding[1].weight
        s = torch.tensor([float(x) for x in seconds], device=weight.device).clamp(self.min_val, self.max_val)
        u = ((s - self.min_val) / (self.max_val - self.min_val)).to(weight.dtype)
        return self.embedder.embedding(u)[:, None, :]


# -----------------------------------------------------------------------------------------------------------------
# 5. The DiT (§4)

class DiTBlock(nn.Module):
    """adaLN block: self-attention and FF modulated by (scale, shift, gate) from the global cond; cross-attention on
    the text context; a per-block additive local conditioning. Padded positions follow FlashAttention-2 varlen:
    excluded as keys, zero attention and FF outputs. Two ways to say which positions are padded: `key_mask` (B, N)
    for a batch of mixed lengths, or `n`: every item's first n positions are valid (then attention and FF run on
    that prefix alone, without a mask, and the padded rows get the same zeros)."""

    def __init__(self, dim, dim_heads, differential, eps, qk_eps, local_dim, ff_mult, memory_tokens):
        super().__init__()
        self.memory = memory_tokens
        qk_norm = lambda d: RMSNorm(d, eps=qk_eps)  # computed in the input dtype (no force_fp32)
        self.pre_norm = RMSNorm(dim, eps, force_fp32=True)
        self.self_attn = Attention(dim, dim_heads, differential, qk_norm)
        self.cross_attend_norm = RMSNorm(dim, eps, force_fp32=True)
        self.cross_attn = Attention(dim, dim_heads, differential, qk_norm, cross=True)
        self.ff_norm = RMSNorm(dim, eps, force_fp32=True)
        self.ff = FeedForward(dim, ff_mult)
        self.to_scale_shift_gate = nn.Parameter(torch.randn(6 * dim) / dim ** 0.5)
        self.to_local_embed = nn.Sequential(nn.Linear(local_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.to_local_embed[2].weight)
        nn.init.zeros_(self.to_local_embed[2].bias)

    def share(self, context, local):
        """What this block computes from the conditioning alone: the cross-attention keys/values of the context
        (B, Lc, D) and the local cond embedding of local (B or 1, T or 1, Cl) -> (…, D)."""
        return self.cross_attn.keys_values(context), self.to_local_embed(local)

    def forward(self, h, mod, shared, rotary, key_mask=None, n=None, rows=None):
        # h (B, M+T, D); mod (B, 6D); shared = share(context, local); rotary (cos, sin) of the n (or M+T) positions;
        # rows: the items whose context is not all zeros (the shares hold only theirs), or None for all
        N = h.shape[1]
        kv, local = shared
        scale1, shift1, gate1, scale2, shift2, gate2 = (self.to_scale_shift_gate + mod)[:, None].chunk(6, dim=-1)
        # h ← h + σ(1 − gate₁)·SelfAttn(RMS(h)·(1 + scale₁) + shift₁)
        a = self.self_attn(self.pre_norm(h[:, :n]) * (1 + scale1) + shift1, rotary=rotary, key_mask=key_mask)
        h = h + F.pad(a * torch.sigmoid(1 - gate1), (0, 0, 0, N - a.shape[1]))  # padded rows add 0
        if rows is None:
            h = h + self.cross_attn(self.cross_attend_norm(h), kv=kv)
        else:  # an all-zero context (CFG's unconditional half) has zero keys and values, no biases: it adds exactly 0
            h = h.index_add(0, rows, self.cross_attn(self.cross_attend_norm(h[rows]), kv=kv))
        h = torch.cat([h[:, :self.memory], h[:, self.memory:] + local], dim=1)  # memory tokens get no local cond
        # h ← h + σ(1 − gate₂)·FF(RMS(h)·(1 + scale₂) + shift₂)
        f = self.ff(self.ff_norm(h[:, :n]) * (1 + scale2) + shift2)
        if key_mask is not None:
            f = f.masked_fill(~key_mask[..., None], 0.0)
        return h + F.pad(f * torch.sigmoid(1 - gate2), (0, 0, 0, N - f.shape[1]))


def block_with_share(layer, h, mod, context, local, rotary, key_mask, n, rows):
    """A block that computes its shares itself: what activation checkpointing recomputes, so that none is kept."""
    return layer(h, mod, layer.share(context, local), rotary, key_mask, n, rows)


class ContinuousTransformer(nn.Module):
    """project_in -> prepend memory tokens -> blocks -> drop memory tokens -> project_out."""

    def __init__(self, io_dim, dim, depth, dim_heads, differential, eps, qk_eps, local_dim, ff_mult, memory_tokens):
        super().__init__()
        self.project_in = nn.Linear(io_dim, dim, bias=False)
        self.project_out = nn.Linear(dim, io_dim, bias=False)
        self.memory_tokens = nn.Parameter(torch.randn(memory_tokens, dim))
        self.rotary_pos_emb = Rotary(max(dim_heads // 2, 32))  # official rule: max(d/2, 32) rotary dims
        self.global_cond_embedder = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.layers = nn.ModuleList(
            DiTBlock(dim, dim_heads, differential, eps, qk_eps, local_dim, ff_mult, memory_tokens)
            for _ in range(depth))
        # activation checkpointing (training): 0 off; k >= 1 recomputes every k-th block (0, k, 2k, …) in backward
        # instead of keeping its activations (k = 2: about half the memory of the activations for half the recompute)
        self.checkpointing = 0

    def forward(self, x, g, prep):
        # x (B, T, C) -> (B, T, C); g (B, D); prep from DiT.prepare
        B, T, _ = x.shape
        M = self.memory_tokens.shape[0]
        h = torch.cat([self.memory_tokens.expand(B, -1, -1), self.project_in(x)], dim=1)  # (B, M+T, D)
        mod = self.global_cond_embedder(g)                                  # (B, 6D)
        args = prep["rotary"], prep["key_mask"], prep["n"], prep["rows"]
        for i, layer in enumerate(self.layers):
            if prep["shared"] is not None:
                h = layer(h, mod, prep["shared"][i], *args)
            elif i % self.checkpointing == 0:  # recomputed in backward with its shares: none of it is kept
                h = torch.utils.checkpoint.checkpoint(block_with_share, layer, h, mod, prep["context"], prep["local"],
                                                      *args, use_reentrant=False)
            else:
                h = block_with_share(layer, h, mod, prep["context"], prep["local"], *args)
        return self.project_out(h[:, M:])


class DiT(nn.Module):
    """One network evaluation: the velocity v ≈ ε − x₀ for x_t = (1 − t)·x₀ + t·ε (t = 1 is pure noise)."""

    def __init__(self, c: Config):
        super().__init__()
        C, D, cond_dim = c.int("io_channels"), c.int("embed_dim"), c.int("cond_token_dim")
        heads, depth = c.int("num_heads"), c.int("depth", maximum=MAX_LAYERS)
        if D % heads:
            raise ValueError(f"{c.where('embed_dim')}={D} is not divisible by num_heads={heads}")
        attn, norm, ff = c.sub("attn_kwargs", {}), c.sub("norm_kwargs", {}), c.sub("ff_kwargs", {})
        attn.get("qk_norm", choices=["rms"])
        attn.get("feat_scale", False, choices=[False])
        norm.get("force_fp32", choices=[True])
        for key, value in [("no_bias", False), ("glu", True), ("use_conv", False)]:
            ff.get(key, value, choices=[value])
        for key, value in [("patch_size", 1), ("global_cond_type", "adaLN"), ("norm_type", "rms_norm"),
                           ("timestep_features_type", "expo"), ("transformer_type", "continuous_transformer"),
                           ("timestep_cond_type", "global"), ("project_cond_tokens", True),
                           ("project_global_cond", True), ("timestep_features_logsnr", False),
                           ("input_concat_dim", 0), ("prepend_cond_dim", 0), ("timestep_features_dim", 256)]:
            c.get(key, value, choices=[value])
        self.to_timestep_embed = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.to_cond_embed = nn.Sequential(nn.Linear(cond_dim, D, bias=False), nn.SiLU(), nn.Linear(D, D, bias=False))
        global_dim = c.int("global_cond_dim")
        self.to_global_embed = nn.Sequential(nn.Linear(global_dim, D, bias=False), nn.SiLU(),
                                             nn.Linear(D, D, bias=False))
        self.local_dim = c.int("local_add_cond_dim")
        self.preprocess_conv = nn.Conv1d(C, C, 1, bias=False)
        self.postprocess_conv = nn.Conv1d(C, C, 1, bias=False)
        nn.init.zeros_(self.preprocess_conv.weight)
        nn.init.zeros_(self.postprocess_conv.weight)
        self.transformer = ContinuousTransformer(
            C, D, depth, D // heads, attn.get("differential", False, choices=[True, False]),
            norm.num("eps", 1e-5), attn.num("qk_norm_eps", 1e-6), self.local_dim,
            ff.num("mult", 4.0, minimum=1, maximum=64),
            c.int("num_memory_tokens", 0, minimum=0))

    def prepare(self, cross_cond, global_cond, local_cond, padding_mask, T):
        """Everything of a call that depends on the conditioning but not on x or t, so that a sampler computes it once
        per generation and each step only `step(x, t, prep)`: the context projection and every block's cross keys/
        values (for the items whose context is not all zeros) and local cond embedding, the t-independent half of g,
        the rotary angles and the padding pattern.
        cross_cond (B, Lc, Dc); global_cond (B, Dg); local_cond (B, Cl, T), or None for the text-to-audio zeros
        (then each block embeds one zero row, a constant); padding_mask (B, T) or None."""
        dtype = self.preprocess_conv.weight.dtype
        tr = self.transformer
        B, M = cross_cond.shape[0], tr.memory_tokens.shape[0]
        rows = cross_cond.flatten(1).ne(0).any(1)                            # (B,) items with a context
        rows = None if bool(rows.all()) else rows.nonzero()[:, 0]
        context = self.to_cond_embed((cross_cond if rows is None else cross_cond[rows]).to(dtype))  # (B', Lc, D)
        local = (torch.zeros(1, 1, self.local_dim, device=context.device, dtype=dtype) if local_cond is None
                 else local_cond.to(dtype).transpose(1, 2))                  # (B, T, Cl) or (1, 1, Cl)
        key_mask, n = None, None
        if padding_mask is not None and not padding_mask.all():
            valid = padding_mask.sum(1)                                      # (B,)
            prefix = torch.arange(T, device=padding_mask.device) < valid[:, None]
            if bool((valid == valid[0]).all()) and torch.equal(padding_mask.bool(), prefix):
                n = M + int(valid[0])  # one valid prefix for all: run attention and FF on it, no mask
            else:
                key_mask = torch.cat([torch.ones(B, M, dtype=torch.bool, device=padding_mask.device),
                                      padding_mask.bool()], dim=1)           # (B, M+T)
        cos, sin = tr.rotary_pos_emb.cos_sin(M + T)                          # memory tokens hold positions 0..M-1
        recompute = tr.checkpointing and torch.is_grad_enabled()  # then each block makes its shares itself
        return {"global": self.to_global_embed(global_cond.to(dtype)),      # (B, D)
                "context": context, "local": local,
                "shared": None if recompute else [layer.share(context, local) for layer in tr.layers],
                "rotary": (cos[:n], sin[:n]), "key_mask": key_mask, "n": n, "rows": rows}

    def step(self, x, t, prep):
        """One network evaluation given prepare()'s output: x (B, C, T), t (B,) -> v (B, C, T)."""
        dtype = self.preprocess_conv.weight.dtype
        x = x.to(dtype)
        # t enters the Fourier features in float32: rounded to fp16/bf16 first (the official half path) it moves the
        # phases of the high frequencies, the largest part of the half-precision drift (README, bench.py drift)
        g = prep["global"] + self.to_timestep_embed(expo_fourier(t.float(), 256).to(dtype))  # (B, D)
        x = x + self.preprocess_conv(x)
        y = self.transformer(x.transpose(1, 2), g, prep).transpose(1, 2)    # (B, C, T)
        return y + self.postprocess_conv(y)

    def forward(self, x, t, cross_cond, global_cond, local_cond=None, padding_mask=None):
        # x (B, C, T); t (B,); cross_cond (B, Lc, Dc); global_cond (B, Dg); local_cond (B, Cl, T); mask (B, T)
        return self.step(x, t, self.prepare(cross_cond, global_cond, local_cond, padding_mask, x.shape[-1]))


# -----------------------------------------------------------------------------------------------------------------
# 6. The SAME autoencoder (§5)

class WNConv1d(nn.Module):
    """Conv1d under the legacy weight norm (keys weight_g, weight_v): W = g·v/‖v‖, norm per output channel;
    'same' zero padding."""

    def __init__(self, c_in, c_out, kernel, bias):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(c_out, 1, 1))
        self.weight_v = nn.Parameter(torch.empty(c_out, c_in, kernel))
        self.bias = nn.Parameter(torch.zeros(c_out)) if bias else None
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    def forward(self, x):
        w = self.weight_v * (self.weight_g / self.weight_v.norm(dim=(1, 2), keepdim=True))
        return F.conv1d(x, w, self.bias, padding="same")


class SAMEBlock(nn.Module):
    """Pre-norm transformer block of the autoencoder: h += Attn(DyT(h)); h += FF(DyT(h)). RoPE on the leading
    dim_heads/2 dims with positions inside the sequence the block sees; the last blocks may gate with sin(π·x)."""

    def __init__(self, dim, dim_heads, differential, ff_mult, sinusoidal):
        super().__init__()
        self.pre_norm = DyT(dim)
        self.self_attn = Attention(dim, dim_heads, differential, DyT)
        self.ff_norm = DyT(dim)
        self.ff = FeedForward(dim, ff_mult, act=sin_pi if sinusoidal else F.silu)
        self.rope = Rotary(dim_heads // 2)

    def forward(self, h, window=None, group=None):
        h = h + self.self_attn(self.pre_norm(h), rotary=self.rope.cos_sin(h.shape[1]), window=window, group=group)
        return h + self.ff(self.ff_norm(h))


class ResamplingBlock(nn.Module):
    """TransformerResamplingBlock (§5.2), stride S, groups of G = S+1 tokens per latent.
    encoder: patches (B, Cin, 16T) -> mapping -> groups [p₀…p₁₅, n] -> blocks -> last token of each group (B, C, T)
    decoder: latents (B, C, T) -> groups [z, n…n] -> blocks -> last 16 tokens of each group -> mapping (B, Cout, 16T)
    Attention is either chunked (SAME-S, chunk_size patches, optional midpoint shift) or a symmetric sliding
    window of `sliding_window` latents on each side (SAME-L)."""

    def __init__(self, c: Config, decoder, c_in, c_out):
        super().__init__()
        self.decoder = decoder
        self.stride = S = c.ints("strides")[0]
        dim = c_in if decoder else c_out
        depth = c.ints("transformer_depths")[0]
        if depth > MAX_LAYERS:
            raise ValueError(f"{c.where('transformer_depths')}={depth} must be <= {MAX_LAYERS}")
        dim_heads = min(c.int("dim_heads", 128), dim)
        sinusoidal = c.ints("sinusoidal_blocks", [0], minimum=0)[0] if decoder else 0
        window = c.ints("sliding_window", minimum=0, length=2) if c.get("sliding_window", None) is not None else None
        self.window = None if window is None else (window[0] * (S + 1), window[1] * (S + 1))  # in tokens
        self.chunk_size = c.int("chunk_size", 128)
        self.midpoint_shift = c.get("chunk_midpoint_shift", False, choices=[True, False])
        if self.window is None and self.chunk_size % S:
            raise ValueError(f"{c.where('chunk_size')}={self.chunk_size} must be a multiple of the stride {S}")
        self.mask_noise = c.num("mask_noise", 0.0, minimum=0)
        kernel = 3 if c.get("conv_mapping", False, choices=[True, False]) else 1
        self.mapping = (WNConv1d(c_in, c_out, kernel, c.get("mapping_bias", True, choices=[True, False]))
                        if c_in != c_out else nn.Identity())
        new_count = 1 if c.get("variable_stride", False, choices=[True, False]) else (S if decoder else 1)
        self.new_tokens = nn.Parameter(1e-5 * torch.randn(1, new_count, dim))
        self.transformers = nn.ModuleList(
            SAMEBlock(dim, dim_heads, c.get("differential", True, choices=[True, False]),
                      c.num("ff_mult", 3, minimum=1, maximum=64),
                      sinusoidal=depth - j < sinusoidal) for j in range(depth))

    def forward(self, x, noise=None):
        # noise: (B·T, S, D) draws for the decoder's new tokens (eval-time mask noise), or None
        S, G = self.stride, self.stride + 1
        B = x.shape[0]
        if not self.decoder:  # zero-pad patches (before the mapping) to whole chunks or whole groups
            x = F.pad(x, (0, -x.shape[-1] % (S if self.window else self.chunk_size)))
            x = self.mapping(x)
        x = x.transpose(1, 2)                                                # (B, N, D)
        if self.decoder and self.window is None:  # whole chunks of latents; the padding is not trimmed (§5.4)
            x = F.pad(x, (0, 0, 0, -x.shape[1] % (self.chunk_size // S)))
        n_in, n_new = (1, S) if self.decoder else (S, 1)
        T = x.shape[1] // n_in
        new = self.new_tokens.expand(B * T, n_new, -1)
        if noise is not None:
            new = new + noise * self.mask_noise
        x = torch.cat([x.reshape(B * T, n_in, -1), new], dim=1).reshape(B, T * G, -1)  # (B, G·T, D)
        x = self.attend(x)
        x = x.reshape(B * T, G, -1)[:, G - n_new:].reshape(B, T * n_new, -1)  # keep the new tokens of each group
        x = x.transpose(1, 2)                                                 # (B, D, n_new·T)
        return self.mapping(x) if self.decoder else x

    def attend(self, x):
        """Run the blocks over the packed (B, G·T, D) sequence with this block's attention pattern."""
        if self.window is not None:
            for block in self.transformers:
                x = block(x, window=self.window, group=self.stride + 1)
            return x
        B, N, D = x.shape
        E = self.chunk_size + self.chunk_size // self.stride                 # chunk in tokens (34 for SAME-S)
        split = len(self.transformers) // 2 if self.midpoint_shift else len(self.transformers)
        x = x.reshape(-1, E, D)
        for block in self.transformers[:split]:
            x = block(x)
        if self.midpoint_shift:  # shift the chunk grid by half a chunk: copies of the first/last E/2 tokens as halo
            x = x.reshape(B, N, D)
            x = torch.cat([x[:, :E // 2], x, x[:, -(E // 2):]], dim=1).reshape(-1, E, D)
            for block in self.transformers[split:]:
                x = block(x)
            x = x.reshape(B, N + E, D)[:, E // 2:-(E // 2)]
        return x.reshape(B, N, D)


class SAMEEncoder(nn.Module):
    def __init__(self, c: Config, latent_dim):
        super().__init__()
        width = c.int("channels") * c.ints("c_mults")[0]
        self.layers = nn.ModuleList([ResamplingBlock(c, False, c.int("in_channels"), width), Transpose(),
                                     nn.Linear(width, latent_dim), Transpose()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class SAMEDecoder(nn.Module):
    def __init__(self, c: Config, latent_dim):
        super().__init__()
        width = c.int("channels") * c.ints("c_mults")[0]
        self.layers = nn.ModuleList([Transpose(), nn.Linear(latent_dim, width), Transpose(),
                                     ResamplingBlock(c, True, width, c.int("out_channels"))])

    def forward(self, z, noise=None):
        for layer in self.layers[:3]:
            z = layer(z)
        return self.layers[3](z, noise)


class Bottleneck(nn.Module):
    """SoftNorm bottleneck (frozen): encode z = (x·scale + bias)/running_std; decode x = z·running_std."""

    def __init__(self, dim):
        super().__init__()
        self.scaling_factor = nn.Parameter(torch.ones(1, dim, 1))
        self.bias = nn.Parameter(torch.zeros(1, dim, 1))
        self.noise_scaling_factor = nn.Parameter(torch.ones(1, 0, 1))  # noise_augment_dim = 0: an empty tensor
        self.running_std = nn.Parameter(torch.ones(1), requires_grad=False)


class AudioAutoencoder(nn.Module):
    """Patchify (patch P) -> SAME encoder -> bottleneck, and back."""

    def __init__(self, c: Config):
        super().__init__()
        enc, dec = c.sub("encoder").sub("config"), c.sub("decoder").sub("config")
        bott, patch = c.sub("bottleneck").sub("config"), c.sub("pretransform").sub("config")
        self.latent_dim = c.int("latent_dim")
        self.patch = patch.int("patch_size")
        self.channels = patch.int("channels")
        patch.get("oversampling", 1, choices=[1])
        for part, kind in [("pretransform", "patched"), ("encoder", "same"), ("decoder", "same"),
                           ("bottleneck", "softnorm")]:
            c.sub(part).get("type", kind, choices=[kind])
        for sub in (enc, dec, bott):
            sub.get("dim" if sub is bott else "latent_dim", self.latent_dim, choices=[self.latent_dim])
        # the patches carry channels·patch_size values; the audio has `channels`
        for sub, key in [(enc, "in_channels"), (dec, "out_channels")]:
            sub.get(key, choices=[self.channels * self.patch])
        c.get("io_channels", self.channels, choices=[self.channels])
        patch.get("postfilter_channels", 0, choices=[0])
        for sub in (enc, dec):
            for key, value in [("layer_scale", False), ("conformer", False), ("feat_scale", False),
                               ("cross_attn", False), ("dyt", True), ("causal", False)]:
                sub.get(key, value, choices=[value])
            if any(len(sub.ints(key)) != 1 for key in ("c_mults", "strides", "transformer_depths")):
                raise ValueError(f"{sub.where('c_mults')}: only one resampling level is supported (SAME-S/SAME-L)")
        enc.get("mask_noise", 0.0, choices=[0, 0.0])  # a deterministic encoder: the latent cache relies on it
        dec.get("soft_clip", False, choices=[False])
        c.sub("decoder").get("soft_clip", False, choices=[False])
        bott.get("noise_augment_dim", 0, choices=[0])
        bott.get("auto_scale", True, choices=[True])
        self.noise_regularize = bott.get("noise_regularize", False, choices=[True, False])
        self.downsampling_ratio = c.int("downsampling_ratio")
        if self.downsampling_ratio != self.patch * enc.get("strides")[0]:
            raise ValueError(f"{c.where('downsampling_ratio')}={self.downsampling_ratio} must equal "
                             f"patch_size·stride = {self.patch * enc.get('strides')[0]}")
        self.bottleneck = Bottleneck(self.latent_dim)
        self.encoder = SAMEEncoder(enc, self.latent_dim)
        self.decoder = SAMEDecoder(dec, self.latent_dim)

    def patchify(self, audio):
        # audio (B, C, N) -> the encoder's input (B, C·P, N/P), N zero-padded to whole patches
        B, C, N = audio.shape
        x = F.pad(audio, (0, -N % self.patch))
        return x.reshape(B, C, -1, self.patch).permute(0, 1, 3, 2).reshape(B, C * self.patch, -1)

    def encode(self, audio):
        # audio (B, channels, N) -> latents (B, latent_dim, T)
        x = self.encoder(self.patchify(audio))
        b = self.bottleneck
        return (x * b.scaling_factor + b.bias) / b.running_std

    def decode(self, z, noise=False, generator=None):
        # z (B, latent_dim, T) -> audio (B, channels, P·S·T'), T' = T rounded up to whole chunks for SAME-S
        b = self.bottleneck
        x = z * b.running_std
        block = self.decoder.layers[3]
        if noise and self.noise_regularize:  # eval-time bottleneck noise: x += ε·r·1e-3 (§5.7)
            x = x + randn(x.shape, x, generator) * b.running_std * 1e-3
        new_noise = None
        if noise and block.mask_noise > 0:  # eval-time new-token noise, drawn after the bottleneck noise
            T = x.shape[-1]
            if block.window is None:
                T += -T % (block.chunk_size // block.stride)
            new_noise = randn((x.shape[0] * T, block.stride, block.new_tokens.shape[-1]), x, generator)
        y = self.decoder(x, new_noise)                                        # (B, C·P, N/P)
        B, CP, n = y.shape
        return y.reshape(B, self.channels, self.patch, n).permute(0, 1, 3, 2).reshape(B, self.channels, -1)


def randn(shape, like, generator=None):
    """Standard normal noise in float32 from `generator` (or the global RNG of like's device), cast to like."""
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(like.device, like.dtype)


def chunk_starts(total, size, overlap):
    """Official chunk layout: starts 0, size−overlap, … and a last chunk anchored at the end."""
    starts = list(range(0, total - size + 1, size - overlap))
    if starts[-1] != total - size:
        starts.append(total - size)
    return starts


def stitch(chunks, starts, total, size, half):
    """Paste chunks (…, size) at starts into (…, total), dropping `half` from every edge that faces a neighbour;
    the last chunk, anchored at the end, overwrites from its own start + half."""
    out = chunks[0].new_zeros(*chunks[0].shape[:-1], total)
    for i, (start, chunk) in enumerate(zip(starts, chunks)):
        last = i == len(starts) - 1
        start = total - size if last else start
        left, right = (0 if i == 0 else half), (size if last else size - half)
        out[..., start + left:start + right] = chunk[..., left:right]
    return out


# -----------------------------------------------------------------------------------------------------------------
# 7. StableAudioModel

def apg_project(diff, direction, mask=None):
    """Split diff into parts parallel and orthogonal to `direction` (norms over C and T, float32).
    With a padding mask (B, T): u = (d·P)/max(‖d·P‖, 1e-8), Δ∥ = ⟨Δ·P, u⟩u, Δ⊥ = (Δ − ⟨Δ, u⟩u)·P;
    without: u = d/‖d‖, Δ⊥ = Δ − ⟨Δ, u⟩u. Returns Δ⊥."""
    dtype, diff, direction = diff.dtype, diff.float(), direction.float()
    if mask is None:
        u = F.normalize(direction, dim=[-1, -2])
        return (diff - (diff * u).sum(dim=[-1, -2], keepdim=True) * u).to(dtype)
    P = mask[:, None, :].float()
    u = direction * P
    u = u / u.norm(dim=[-1, -2], keepdim=True).clamp(min=1e-8)
    return ((diff - (diff * u).sum(dim=[-1, -2], keepdim=True) * u) * P).to(dtype)


class StableAudioModel(nn.Module):
    """The whole model, with attribute paths equal to the checkpoint keys:
    model.model.* (the DiT), conditioner.conditioners.* (prompt padding + seconds), pretransform.model.* (SAME);
    the T5Gemma encoder (its own file) is `text_encoder`."""

    def __init__(self, config, text_config=None):
        super().__init__()
        root = Config(config)
        self.config = config
        self.sample_rate = root.int("sample_rate")
        self.sample_size = root.int("sample_size")
        m = root.sub("model")
        diffusion = m.sub("diffusion")
        self.objective = diffusion.get("diffusion_objective", choices=["rectified_flow", "rf_denoiser"])
        root.get("model_type", "diffusion_cond_inpaint", choices=["diffusion_cond_inpaint"])
        diffusion.get("type", "dit", choices=["dit"])
        m.sub("pretransform").get("type", "autoencoder", choices=["autoencoder"])
        for key, ids in [("cross_attention_cond_ids", ["prompt", "seconds_total"]),
                         ("global_cond_ids", ["seconds_total"]),
                         ("local_add_cond_ids", ["inpaint_mask", "inpaint_masked_input"])]:
            diffusion.get(key, choices=[ids])
        for key in ("input_concat_ids", "prepend_cond_ids", "modular_local_cond_configs"):
            diffusion.get(key, [], choices=[[]])
        self.distribution_shift = diffusion.get("distribution_shift_options", None)
        self.sampling_distribution_shift = diffusion.get("sampling_distribution_shift_options", None)
        for key in ("distribution_shift_options", "sampling_distribution_shift_options"):
            if diffusion.get(key, None) is not None:  # every option a finite number (train.py/sample.py read them)
                shift = diffusion.sub(key)
                for name in shift.data:
                    if name != "type":
                        shift.num(name)
                if shift.num("min_length", 256) >= shift.num("max_length", 4096):
                    raise ValueError(f"{shift.where('min_length')} must be below max_length")

        cond = m.sub("conditioning")
        self.cond_dim = cond.int("cond_dim")
        configs = cond.get("configs")
        if (not isinstance(configs, list) or not all(isinstance(c, dict) for c in configs)
                or [(c.get("id"), c.get("type")) for c in configs]
                != [("prompt", "t5gemma"), ("seconds_total", "number")]):
            raise ValueError(f"{cond.where('configs')}: expected a 't5gemma' conditioner 'prompt' then a 'number' "
                             f"conditioner 'seconds_total'")
        prompt = Config(configs[0], f"{cond.path}.configs[0]").sub("config")
        seconds = Config(configs[1], f"{cond.path}.configs[1]").sub("config")
        prompt.get("padding_mode", choices=["learned"])
        prompt.get("project_out", False, choices=[False])
        prompt.get("model_name", "google/t5gemma-b-b-ul2", choices=["google/t5gemma-b-b-ul2"])
        self.max_length = prompt.int("max_length", 128, maximum=8192)  # tokens per prompt (SA3: 128)
        self.text_subfolder = prompt.get("subfolder", "t5gemma-b-b-ul2")
        seconds.get("fourier_features_type", choices=["expo"])
        if seconds.num("min_val", 0) >= seconds.num("max_val", 1):
            raise ValueError(f"{seconds.where('min_val')}={seconds.num('min_val', 0)} must be below "
                             f"max_val={seconds.num('max_val', 1)}")

        self.model = Holder(model=DiT(diffusion.sub("config")))
        self.conditioner = Holder(conditioners=nn.ModuleDict({
            "prompt": PromptConditioner(self.cond_dim),
            "seconds_total": NumberConditioner(self.cond_dim, seconds.num("min_val", 0), seconds.num("max_val", 1)),
        }))
        pre = m.sub("pretransform")
        pre.get("iterate_batch", False, choices=[True, False])  # one item at a time: numerically the same
        self.chunked = pre.get("chunked", False, choices=[True, False])
        self.pretransform = Holder(model=AudioAutoencoder(pre.sub("config")))
        ae = self.pretransform.model
        root.get("audio_channels", ae.channels, choices=[ae.channels])
        # the DiT's widths must fit the autoencoder's latents and the conditioning tokens
        m.get("io_channels", ae.latent_dim, choices=[ae.latent_dim])
        for key, value in [("io_channels", ae.latent_dim), ("local_add_cond_dim", 1 + ae.latent_dim),
                           ("cond_token_dim", self.cond_dim), ("global_cond_dim", self.cond_dim)]:
            diffusion.sub("config").get(key, choices=[value])
        self.set_text_encoder(T5GemmaEncoder(text_config or T5GEMMA_B_ENCODER))
        self.tokenizer = None
        self.sampling_defaults = {}  # sampler/steps/cfg_scale a fine-tuned adapter recommends (set by sample.py)
        self.latent_rate = self.sample_rate / ae.downsampling_ratio
        self.latent_dim = ae.latent_dim

    # ---- building and loading

    @classmethod
    def from_config(cls, config, text_config=None, device="meta"):
        """Build from a model_config.json dict (weights uninitialised on meta, random elsewhere)."""
        with torch.device(device):
            return cls(config, text_config)

    @classmethod
    def from_pretrained(cls, path, text_encoder_path=None, device="cpu", dtype=torch.float32,
                        text_dtype=torch.float32):
        """Load a folder laid out like the official Hugging Face repos: model_config.json, model.safetensors and the
        text encoder + tokenizer.model in the `t5gemma-b-b-ul2/` subfolder (or `text_encoder_path`)."""
        path = Path(path)
        if not (path / "model_config.json").is_file():
            raise FileNotFoundError(f"{path}: not a model folder (expected model_config.json and model.safetensors)")
        config = read_json(path / "model_config.json")
        prompt = [c.get("config", {}) for c in config.get("model", {}).get("conditioning", {}).get("configs", [])
                  if isinstance(c, dict) and c.get("id") == "prompt"]
        text_path = (Path(text_encoder_path) if text_encoder_path
                     else path / (prompt[0] if prompt else {}).get("subfolder", "t5gemma-b-b-ul2"))
        model = cls.from_config(config, read_json(text_path / "config.json"))
        model.load_checkpoint(path / "model.safetensors", device, dtype)
        model.load_text_encoder(text_path / "model.safetensors", device, text_dtype)
        model.tokenizer = Tokenizer(text_path, model.max_length)
        return model.eval().requires_grad_(False)

    def set_text_encoder(self, encoder):
        if encoder.c["hidden_size"] != self.cond_dim:
            raise ValueError(f"model_config.json: model.conditioning.cond_dim={self.cond_dim} must equal the text "
                             f"encoder's hidden_size {encoder.c['hidden_size']} (SA3 has no prompt projection)")
        self.text_encoder = encoder

    def checkpoint_state_dict(self):
        """The tensors of model.safetensors (everything but the text encoder)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("text_encoder.")}

    def load_checkpoint(self, file, device="cpu", dtype=torch.float32):
        # every floating-point tensor, the rotary inv_freq buffers too, in the model's dtype (as the official loader
        # copies them into a model cast to its dtype); rotary_angles computes the angles in float32 either way
        assign_strict(self, self.checkpoint_state_dict(), load_safetensors(file, device, dtype), file)

    def load_text_encoder(self, file, device="cpu", dtype=torch.float32):
        # The HF file holds the full encoder-decoder: keep `model.encoder.*` (or `encoder.*`) without the prefix.
        state = {}
        for key, t in load_safetensors(file, device, dtype).items():
            for prefix in ("model.encoder.", "encoder."):
                if key.startswith(prefix):
                    state["text_encoder." + key[len(prefix):]] = t
        expected = {k: v for k, v in self.state_dict().items() if k.startswith("text_encoder.")}
        assign_strict(self, expected, state, file)

    def save_pretrained(self, folder):
        """Write model_config.json and model.safetensors (the text-encoder folder is not rewritten)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "model_config.json", "w") as f:
            json.dump(self.config, f, indent=4)
        save_safetensors(self.checkpoint_state_dict(), folder / "model.safetensors")

    def compile_blocks(self):
        """torch.compile every DiT and SAME block in place (the module names, hence the checkpoint keys, stay): each
        block is fused into fewer kernels, compiled once per input shape, i.e. per clip length."""
        for block in [*self.model.model.transformer.layers, *self.pretransform.model.decoder.layers[3].transformers,
                      *self.pretransform.model.encoder.layers[0].transformers]:
            block.compile(dynamic=False)

    # ---- the API used by sample.py and train.py

    def tokenize(self, prompts):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: load it with StableAudioModel.from_pretrained(folder)")
        return self.tokenizer(prompts)

    def conditioning(self, prompts, seconds_total):
        """prompts: str or list of str; seconds_total: float or list -> the tensors the DiT receives (§3.6):
        cross_attn_cond (B, L+1, Dc) = [prompt tokens, seconds token]; cross_attn_mask (B, L+1); global_cond (B, Dc)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seconds = [seconds_total] * len(prompts) if isinstance(seconds_total, (int, float)) else list(seconds_total)
        if len(seconds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seconds)} seconds_total values")
        device = self.model.model.preprocess_conv.weight.device
        ids, mask = self.tokenize(prompts)
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            hidden = self.text_encoder(ids, mask)                             # (B, L, Dc)
        conds = self.conditioner.conditioners
        text = conds["prompt"](hidden, mask)                                  # (B, L, Dc), learned padding
        sec = conds["seconds_total"](seconds)                                 # (B, 1, Dc)
        return {"cross_attn_cond": torch.cat([text, sec.to(text.dtype)], dim=1),
                "cross_attn_mask": torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1),
                "global_cond": sec[:, 0], "seconds_total": seconds}

    def velocity(self, x, t, cond, padding_mask=None, local_cond=None, cross_attn_cond=None):
        """One DiT evaluation (no guidance). `cross_attn_cond` overrides cond's (e.g. zeros for CFG dropout);
        local_cond None is the text-to-audio inpainting cond (§3.6): mask 0 and masked input 0."""
        cross = cond["cross_attn_cond"] if cross_attn_cond is None else cross_attn_cond
        return self.model.model(x, t, cross, cond["global_cond"], local_cond, padding_mask)

    def prepare(self, cond, T, cfg_scale=1.0, negative_cond=None, padding_mask=None, local_cond=None):
        """What every step of a generation shares (DiT.prepare), for the batch the steps run: with cfg_scale != 1 the
        conditional and unconditional halves as one batch; the unconditional cross cond is zeros, or the negative
        prompt with its padded tokens zeroed; global and local cond are shared by both halves. T latent frames."""
        cross, glob = cond["cross_attn_cond"], cond["global_cond"]
        if cfg_scale != 1.0:
            null = torch.zeros_like(cross)
            if negative_cond is not None:
                null = torch.where(negative_cond["cross_attn_mask"][..., None].bool(),
                                   negative_cond["cross_attn_cond"].to(cross.dtype), null)
            cross, glob = torch.cat([cross, null]), torch.cat([glob, glob])
            local_cond = None if local_cond is None else torch.cat([local_cond, local_cond])
            padding_mask = None if padding_mask is None else torch.cat([padding_mask, padding_mask])
        return self.model.model.prepare(cross, glob, local_cond, padding_mask, T)

    def denoise(self, x, t, cond, cfg_scale=1.0, negative_cond=None, apg_scale=1.0, padding_mask=None,
                cfg_norm_threshold=0.0, local_cond=None, prepared=None):
        """The guided velocity (§4.6). x (B, C, T), t (B,) in [0, 1] with 1 = noise. `prepared` is
        prepare(cond, T, cfg_scale, negative_cond, padding_mask, local_cond), made here when not given (a sampler
        makes it once: then negative_cond and local_cond are already in it)."""
        B, C, T = x.shape
        t = t.float()
        prep = self.prepare(cond, T, cfg_scale, negative_cond, padding_mask, local_cond) if prepared is None else prepared
        if cfg_scale == 1.0:
            return self.model.model.step(x, t, prep)
        both = self.model.model.step(torch.cat([x, x]), torch.cat([t, t]), prep)
        v_c, v_u = both.float().chunk(2)  # guidance in float32 whatever the model dtype, like the sampler state
        x = x.float()
        tb = t[:, None, None]
        # d = x − t·v (the denoised estimates); Δ = d_c − d_u
        d_c, d_u = x - v_c * tb, x - v_u * tb
        diff = d_c - d_u
        if cfg_norm_threshold > 0:  # Δ ← Δ·min(1, thr/‖Δ‖), norm over valid positions
            masked = diff if padding_mask is None else diff * padding_mask[:, None, :].float()
            diff = diff * torch.minimum(torch.ones_like(diff),
                                        cfg_norm_threshold / masked.norm(p=2, dim=[-1, -2], keepdim=True))
        if apg_scale == 0.0:
            term = diff
        elif apg_scale == 1.0:
            term = apg_project(diff, d_c, padding_mask)
        else:
            term = apg_scale * apg_project(diff, d_c, padding_mask) + (1 - apg_scale) * diff
        # d = d_c + (cfg − 1)·term;  v = (x − d)/t
        d = d_c + (cfg_scale - 1) * term
        return (x - d) / tb

    def encode(self, audio, chunked=None, chunk_size=128, overlap=32):
        """audio (B, channels, N) at sample_rate -> latents (B, latent_dim, T). Chunked (the config's
        `chunked` unless given) splits inputs of at least chunk_size latents into overlapping chunks (§5.6)."""
        ae = self.pretransform.model
        audio = audio.to(ae.bottleneck.bias.dtype)
        spl = ae.downsampling_ratio
        chunked = self.chunked if chunked is None else chunked
        if not chunked or audio.shape[-1] < chunk_size * spl:
            return ae.encode(audio)
        starts = chunk_starts(audio.shape[-1], chunk_size * spl, (overlap) * spl)
        chunks = [ae.encode(audio[..., s:s + chunk_size * spl]) for s in starts]
        return stitch(chunks, [s // spl for s in starts], audio.shape[-1] // spl, chunk_size, overlap // 2)

    def decode(self, latents, chunked=None, decode_noise=True, generator=None, chunk_size=128, overlap=32,
               progress=None):
        """latents (B, latent_dim, T) -> audio (B, channels, N). decode_noise reproduces the official eval-time
        noises (§5.7) from `generator` (or the global RNG); decode_noise=False is the deterministic decode.
        `progress` wraps the chunk loop (e.g. tqdm)."""
        ae = self.pretransform.model
        latents = latents.to(ae.bottleneck.bias.dtype)
        chunked = self.chunked if chunked is None else chunked
        T, spl = latents.shape[-1], ae.downsampling_ratio
        if not chunked or T < chunk_size:
            return ae.decode(latents, decode_noise, generator)
        starts = chunk_starts(T, chunk_size, overlap)
        chunks = [ae.decode(latents[..., s:s + chunk_size], decode_noise, generator)
                  for s in (progress(starts) if progress else starts)]
        return stitch(chunks, [s * spl for s in starts], T * spl, chunk_size * spl, overlap // 2 * spl)

    def generate(self, prompt, negative_prompt=None, duration=30.0, steps=None, cfg_scale=None, seed=None,
                 sampler=None, batch_size=1, init_audio=None, init_noise_level=1.0, inpaint_audio=None,
                 inpaint_mask=None, inpaint_mask_start_seconds=None, inpaint_mask_end_seconds=None, apg_scale=1.0,
                 return_latents=False):
        """The official StableAudioModel.generate() API, with its argument names (audio as (sample_rate, tensor
        [channels, samples]); seed None or −1: random) -> float32 audio [batch_size, channels, int(duration·sr)]
        on the CPU, or latents. Unset steps/cfg_scale/sampler come from the model (sample.resolve_defaults).
        One implementation: this is sample.generate, where the semantics are written."""
        import sample  # here, not at the top: sample.py imports this module
        return sample.generate(self, prompt, duration, steps, cfg_scale, sampler, None if seed == -1 else seed,
                               negative_prompt, apg_scale, batch=batch_size, return_latents=return_latents,
                               init_audio=init_audio, init_noise_level=init_noise_level, inpaint_audio=inpaint_audio,
                               inpaint_mask_start_seconds=inpaint_mask_start_seconds,
                               inpaint_mask_end_seconds=inpaint_mask_end_seconds, inpaint_mask=inpaint_mask)

    def decode_margin(self):
        """How many latents on each side of a latent can change its audio (the decoder's receptive field, derived from
        the config; decode_noise off). The decoder sees G = S+1 tokens per latent (S = stride, S new tokens each).
          SAME-L: each of its J blocks attends a window of w·G tokens to each side, i.e. w latents -> J·w.
          SAME-S: a block attends within a chunk of P = chunk_size/S latents, so it reaches at most P−1 latents;
            the blocks after the midpoint shift (the grid moved by half a chunk) reach P−1 more -> 2(P−1). A cut
            edge is seen as padding or as a halo copy of its own tokens, which the same bound covers.
          Both: the output mapping conv (kernel k over the S·T output patches) reaches ⌈((k−1)/2)/S⌉ latents more.
        SAME-L (12 blocks, ±17 tokens, k = 1): 12 latents; SAME-S (P = 2, k = 3): 3."""
        block = self.pretransform.model.decoder.layers[3]
        S, G = block.stride, block.stride + 1
        if block.window is not None:
            reach = len(block.transformers) * -(-max(block.window) // G)
        else:
            reach = 2 * (block.chunk_size // S - 1)
        k = block.mapping.weight_v.shape[-1] if isinstance(block.mapping, WNConv1d) else 1
        return reach + -(-((k - 1) // 2) // S)

    def decode_latents_per_call(self, budget_mb):
        """How many latents one decoder call may take within `budget_mb` of activations: per latent, G tokens of width
        C through the widest step (the GLU's 2·ff_mult·C features plus ~8·C of q, k, v, q₂, k₂, residual)."""
        block = self.pretransform.model.decoder.layers[3]
        C, inner = block.new_tokens.shape[-1], block.transformers[0].ff.ff[0].proj.out_features
        per_latent = (block.stride + 1) * (inner + 8 * C) * block.new_tokens.element_size()
        return budget_mb * 2**20 // per_latent

    def decode_heard(self, latents, start, end, decode_noise=True, generator=None, budget_mb=1024, progress=None):
        """Audio samples [start, end) of the decode of latents (B, C, T), decoding only the latents that reach them:
        those covering the samples plus decode_margin() on each side, the span aligned to whole SAME-S chunks so that
        its chunk grid is the full decode's. One call when the span fits `budget_mb` of activations, else the chunked
        decode (overlap 2·margin, so that every kept sample has its whole receptive field). With decode_noise off this
        equals decode(latents)[..., start:end] to float precision; the noise is drawn for the decoded latents only."""
        block, spl = self.pretransform.model.decoder.layers[3], self.pretransform.model.downsampling_ratio
        T, P, margin = latents.shape[-1], 1 if block.window is not None else block.chunk_size // block.stride, \
            self.decode_margin()
        a = max(0, start // spl - margin) // P * P                          # first decoded latent
        b = min(T, -(-(-(-end // spl) + margin) // P) * P)                  # one past the last
        per_call = self.decode_latents_per_call(budget_mb) // P * P
        overlap = -(-2 * margin // P) * P
        chunked = b - a > per_call
        audio = self.decode(latents[..., a:b], chunked, decode_noise, generator, max(per_call, 2 * overlap + P),
                            overlap, progress)
        return audio[..., start - a * spl:end - a * spl]


def assign_strict(model, expected, state, file):
    """Check names and shapes (one line: counts and the first few), then assign the tensors in place."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} (expected {list(expected[k].shape)})"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    wrong += [f"{k} of dtype {state[k].dtype} (expected a floating-point tensor)"  # e.g. F16 relabelled I16
              for k in expected if k in state and state[k].is_floating_point() != expected[k].is_floating_point()]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what} ({', '.join(v[:3])}{', …' if len(v) > 3 else ''})"
                 for what, v in [("missing", missing), ("unexpected", unexpected),
                                 ("with the wrong shape or dtype", wrong)] if v]
        raise ValueError(f"{file}: keys do not match the model: {'; '.join(parts)}")
    model.load_state_dict(state, strict=False, assign=True)
