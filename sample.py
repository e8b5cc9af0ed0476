"""
Sample music:  python sample.py "a small prince walking through a moonlit castle, celesta, 72 BPM" --seconds 30
Edit music:    python sample.py "..." --init-audio in.wav --init-noise-level 0.7        (audio-to-audio)
               python sample.py "..." --inpaint in.wav --mask 4:8 --mask 20:22 --seconds 30   (inpainting)
               python sample.py "..." --continue in.wav --seconds 60                     (continuation)

This file owns inference: the timestep schedule, the samplers (euler, pingpong, dpmpp, rk4, side by side, each
update written once under its formula), the official duration/headroom/padding rules, seeds, adapters and the
audio file. It follows the official `StableAudioModel.generate` (github Stability-AI/stable-audio-3, 636f906;
shared/sa3_facts.md §6) with four deliberate differences:
  - the length cap is the config's `sample_size` (the model's real maximum), and a longer request is an error
    (the official generate() silently caps every model at 120 s);
  - rk4 really integrates (the official one returns the initial noise through generate());
  - the sampler state stays float32 when the model runs in bf16 (the official code rounds x to the model dtype);
  - all noise comes from per-item CPU generators (seed + i), so a seed gives the same audio on any device and a
    batch equals single runs;
  - the decode covers only the requested samples plus the decoder's receptive field, in one call or chunked by a
    memory budget (model.decode_heard): the same audio to float precision, with less work.
"""
import argparse
import json
import math
import numbers
import os
import random
import sys
import time
from pathlib import Path

import soundfile
import torch
from tqdm import tqdm

import data
from model import TINY_MODEL, StableAudioModel

HEADROOM_SECONDS = 6.0              # generate() samples 6 s more than asked and lets the model see them (§6.4)
MAX_STEPS = 1000                    # a bound on sampler steps (the official defaults are 8 and 50): 1e9 never ends
DEFAULTS = {"rf_denoiser": ("pingpong", 8), "rectified_flow": ("euler", 50)}  # (sampler, steps) by objective (§6.3)

# -----------------------------------------------------------------------------------------------------------------
# Duration -> latent length and padding mask (§6.4)


def latent_length(model, seconds):
    """A = int((s + 6)·sr) rounded up to whole latents, then to whole SAME chunks; capped at sample_size."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if seconds * model.sample_rate > model.sample_size:
        raise ValueError(f"{seconds} s is longer than this model's maximum of "
                         f"{model.sample_size / model.sample_rate:.1f} s (model_config.json sample_size="
                         f"{model.sample_size})")
    ae = model.pretransform.model
    ratio, block = ae.downsampling_ratio, ae.encoder.layers[0]
    align = ratio * (block.chunk_size // block.stride)  # the official rule reads the encoder's chunk_size
    A = int((seconds + HEADROOM_SECONDS) * model.sample_rate)
    A = -(-A // ratio) * ratio
    A = -(-A // align) * align
    return min(A, model.sample_size) // ratio


def effective_length(model, seconds):
    """E = ceil(int(s·sr)/ratio): the latents the requested audio really covers."""
    return math.ceil(int(seconds * model.sample_rate) / model.pretransform.model.downsampling_ratio)


def padding_mask(model, seconds, L, batch):
    """Valid latents: min(E + headroom, L) with headroom = int(6·sr/ratio) (64 latents at 44.1 kHz / 4096)."""
    headroom = int(HEADROOM_SECONDS * model.sample_rate / model.pretransform.model.downsampling_ratio)
    valid = min(effective_length(model, seconds) + headroom, L)
    return (torch.arange(L) < valid)[None].expand(batch, L)


# -----------------------------------------------------------------------------------------------------------------
# Schedule (§6.1)

def logsnr_schedule(steps, seq_len, anchor_length=2000, anchor_logsnr=-6.2, rate=0.0, logsnr_end=2.0,
                    sigma_max=1.0):
    """The official sampling schedule (LogSNRShift, the default of every SA3 config), one row per batch item.
    t = linspace(σ_max, 0, steps+1); λ_start = anchor − rate·log2(L/anchor_length);
    λ = λ_end − t·(λ_end − λ_start); t' = sigmoid(−λ), with t'=0 at t=0 and t'=1 at t=1; then t'_0 = σ_max (the
    official code forces it: with σ_max < 1 the second entry can exceed the first). seq_len: (B,) effective lengths -> (B, steps+1)."""
    t = torch.linspace(sigma_max, 0, steps + 1)
    start = anchor_logsnr - rate * torch.log2(seq_len.float().clamp(min=1) / anchor_length)
    shifted = torch.sigmoid(-(logsnr_end - t[None, :] * (logsnr_end - start[:, None])))
    shifted = torch.where(t <= 0, torch.zeros_like(shifted), shifted)
    shifted = torch.where(t >= 1, torch.ones_like(shifted), shifted)
    shifted[:, 0] = sigma_max
    return shifted


def schedule(model, steps, seq_len, sigma_max=1.0):
    """The config's `sampling_distribution_shift_options` (null in every SA3 config: the LogSNR defaults);
    σ_max < 1 starts partway (audio-to-audio, §6.1)."""
    options = dict(model.sampling_distribution_shift or {"type": "logsnr"})
    kind = options.pop("type", "full")
    if kind != "logsnr":
        raise ValueError(f"model_config.json: model.diffusion.sampling_distribution_shift_options.type={kind!r} "
                         f"is not supported (expected 'logsnr')")
    return logsnr_schedule(steps, seq_len, **options, sigma_max=sigma_max)


# -----------------------------------------------------------------------------------------------------------------
# Samplers. v(x, t) is the guided velocity; ts is (B, steps+1) from t = 1 (noise) to t = 0 (data); noise(i) is the
# fresh noise of stochastic step i; x stays float32.

def euler(v, x, ts, noise):
    for i in tqdm(range(ts.shape[1] - 1), desc="euler", leave=False):
        t, t_next = ts[:, i], ts[:, i + 1]
        # x ← x + (t_{i+1} − t_i)·v(x, t_i)
        x = x + (t_next - t)[:, None, None] * v(x, t)
    return x


def pingpong(v, x, ts, noise):
    for i in tqdm(range(ts.shape[1] - 1), desc="pingpong", leave=False):
        t, t_next = ts[:, i, None, None], ts[:, i + 1, None, None]
        # x̂₀ = x − t_i·v(x, t_i);  x ← (1 − t_{i+1})·x̂₀ + t_{i+1}·ε  (fresh ε every step, the last one too)
        x0 = x - t * v(x, ts[:, i])
        x = (1 - t_next) * x0 + t_next * noise(i)
    return x


def dpmpp(v, x, ts, noise):
    """Flow DPM-Solver++(2M): first order on the first and the last step, second order in between."""
    lam = lambda t: ((1 - t).clamp(min=1e-10) / t.clamp(min=1e-10)).log()  # λ(t) = ln((1 − t)/t)
    x0_prev = None
    for i in tqdm(range(ts.shape[1] - 1), desc="dpmpp", leave=False):
        t, t_next = ts[:, i, None, None], ts[:, i + 1, None, None]
        x0 = x - t * v(x, ts[:, i])
        # c = Δt / ((1 − t_{i+1})·t_i)
        c = (t_next - t) / ((1 - t_next).clamp(min=1e-10) * t.clamp(min=1e-10))
        D = x0
        if x0_prev is not None and not (t_next == 0).all():
            # r = (λ_i − λ_{i−1}) / (λ_{i+1} − λ_i);  D = (1 + 1/(2r))·x̂₀ − 1/(2r)·x̂₀_prev
            r = (lam(t) - lam(ts[:, i - 1, None, None])) / (lam(t_next) - lam(t))
            D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
        # x ← (t_{i+1}/t_i)·x − (1 − t_{i+1})·c·D
        x = (t_next / t.clamp(min=1e-10)) * x - (1 - t_next) * c * D
        x0_prev = x0
    return x


def rk4(v, x, ts, noise):
    """Classic Runge–Kutta 4 on dx/dt = v; the last evaluation at max(t_{i+1}, 1e-5), never at exactly t = 0."""
    for i in tqdm(range(ts.shape[1] - 1), desc="rk4", leave=False):
        t, t_next = ts[:, i], ts[:, i + 1]
        dt = (t_next - t)[:, None, None]
        k1 = v(x, t)
        k2 = v(x + dt / 2 * k1, t + (t_next - t) / 2)
        k3 = v(x + dt / 2 * k2, t + (t_next - t) / 2)
        k4 = v(x + dt * k3, t_next.clamp(min=1e-5))
        # x ← x + Δt/6·(k1 + 2k2 + 2k3 + k4)
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


SAMPLERS = {"euler": euler, "pingpong": pingpong, "dpmpp": dpmpp, "rk4": rk4}


# -----------------------------------------------------------------------------------------------------------------
# Audio inputs: audio-to-audio and inpainting (§6.5)

def encode_audio_input(model, audio, samples, name):
    """(sample_rate, audio [channels, N] or [N]) -> latents (1, C, samples/ratio) float32, as the official
    generate() prepares it: resampled to the model's rate (data.py's resampler), zero-padded or cut to `samples`
    (the generation length), channels fixed (to mono: the mean; to stereo: mono duplicated, >2 keep the first
    two), encoded."""
    if not (isinstance(audio, (tuple, list)) and len(audio) == 2 and isinstance(audio[0], numbers.Integral)
            and audio[0] > 0):
        raise ValueError(f"{name} must be (sample_rate, audio [channels, samples]), got {type(audio).__name__}")
    sr, x = int(audio[0]), audio[1]
    x = torch.as_tensor(x, dtype=torch.float32).cpu()
    x = x[None] if x.dim() == 1 else x
    if x.dim() != 2 or x.shape[-1] == 0:
        raise ValueError(f"{name}: audio of shape {list(x.shape)}, expected [channels, samples]")
    x = data.resample(x, sr, model.sample_rate)
    x = torch.nn.functional.pad(x, (0, max(0, samples - x.shape[-1])))[:, :samples]
    channels = model.pretransform.model.channels
    x = x.mean(0, keepdim=True) if channels == 1 else x.expand(2, -1) if x.shape[0] == 1 else x[:2]
    device = model.model.model.preprocess_conv.weight.device
    with torch.inference_mode():
        return model.encode(x[None].to(device)).float()


def inpaint_keep_mask(model, duration, L, start_seconds=None, end_seconds=None, mask=None):
    """The inpainting mask (1 = keep, 0 = generate) of the official generate(), (1 or B, L) float, or None.
    Regions [start, end) in seconds (a number each, or lists of equal length) are 0 in a mask of ones over the
    A = L·ratio samples; else a prebuilt `mask` over samples ([N] or [B, N], cut to A). Then 0 from the requested
    length int(duration·sr) on, and nearest-interpolated to the L latents."""
    A = L * model.pretransform.model.downsampling_ratio
    if (start_seconds is None) != (end_seconds is None):
        raise ValueError("inpaint_mask_start_seconds and inpaint_mask_end_seconds go together (got only one)")
    if start_seconds is not None:
        if isinstance(start_seconds, list) != isinstance(end_seconds, list):
            raise ValueError(f"inpaint_mask_start_seconds and inpaint_mask_end_seconds must both be numbers or both "
                             f"lists, got {type(start_seconds).__name__} and {type(end_seconds).__name__}")
        starts = start_seconds if isinstance(start_seconds, list) else [start_seconds]
        ends = end_seconds if isinstance(end_seconds, list) else [end_seconds]
        if len(starts) != len(ends):
            raise ValueError(f"inpaint_mask_start_seconds has {len(starts)} entries but inpaint_mask_end_seconds "
                             f"{len(ends)} (expected one end per start)")
        mask = torch.ones(1, A)
        for start, end in zip(starts, ends):
            if not 0 <= start <= end:
                raise ValueError(f"inpaint region {start}:{end} s: expected 0 ≤ start ≤ end")
            mask[:, min(int(start * model.sample_rate), A):min(int(end * model.sample_rate), A)] = 0
    elif mask is None:
        return None
    mask = torch.as_tensor(mask).float().cpu()
    mask = (mask[None] if mask.dim() == 1 else mask)[:, :A].clone()
    mask[:, int(duration * model.sample_rate):] = 0  # nothing past the requested length is context
    return torch.nn.functional.interpolate(mask[:, None], size=L, mode="nearest")[:, 0]


# -----------------------------------------------------------------------------------------------------------------
# generate()

def check_sampling(where, sampler=None, steps=None, cfg_scale=None):
    """One line naming `where` for a sampler, step count or guidance scale that cannot work (None: not given)."""
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"{where}: unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, numbers.Integral)
                              or not 1 <= steps <= MAX_STEPS):
        raise ValueError(f"{where}: steps={steps!r} (expected an integer from 1 to {MAX_STEPS})")
    if cfg_scale is not None and (isinstance(cfg_scale, bool) or not isinstance(cfg_scale, numbers.Real)
                                  or not math.isfinite(cfg_scale) or cfg_scale < 0):
        raise ValueError(f"{where}: cfg_scale={cfg_scale!r} (expected a finite number >= 0; 1 is no guidance)")


def resolve_defaults(model, steps, cfg_scale, sampler):
    """Unset arguments come from the model: a loaded Eisbach adapter's recommendation, else the objective's
    official defaults (rf_denoiser: pingpong 8 steps; rectified_flow: euler 50 steps; CFG 1)."""
    default_sampler, default_steps = DEFAULTS[model.objective]
    recommended = model.sampling_defaults
    sampler = sampler or recommended.get("sampler", default_sampler)
    steps = recommended.get("steps", default_steps) if steps is None else steps
    cfg_scale = recommended.get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale
    check_sampling("generate", sampler, steps, cfg_scale)
    return steps, cfg_scale, sampler


def generate(model, prompt, duration=30.0, steps=None, cfg_scale=None, sampler=None, seed=None, negative_prompt=None,
             apg_scale=1.0, noise=None, step_noises=None, batch=1, return_latents=False, decode_noise=True,
             init_audio=None, init_noise_level=1.0, inpaint_audio=None, inpaint_mask_start_seconds=None,
             inpaint_mask_end_seconds=None, inpaint_mask=None):
    """Text to audio: float32 [batch, channels, int(duration·sr)] at model.sample_rate (or latents [batch, C, L]).
    Item i draws its initial noise, each stochastic step's noise and its decode noise, in that order, from
    torch.Generator().manual_seed(seed + i) on the CPU. `noise` [batch, C, L] and `step_noises`
    [steps, batch, C, L] replace those draws (exact replay); decode_noise=False is the deterministic decode.
    Editing, as the official generate() (§6.5); audio is (sample_rate, tensor [channels, samples]):
    - init_audio: audio-to-audio. Sampling starts at σ_max = init_noise_level from x = z·(1 − σ_max) + ε·σ_max.
    - inpaint_audio with inpaint_mask_start_seconds/_end_seconds (numbers, or lists for several regions) or a
      prebuilt inpaint_mask over samples (1 keep, 0 generate): the DiT sees the kept latents as context (its local
      cond [m, z·m]) and generates the rest. Continuation: a source shorter than `duration`, region from its end."""
    steps, cfg_scale, sampler = resolve_defaults(model, steps, cfg_scale, sampler)
    if isinstance(apg_scale, bool) or not isinstance(apg_scale, numbers.Real) or not math.isfinite(apg_scale):
        raise ValueError(f"generate: apg_scale={apg_scale!r} (expected a finite number; 1 is plain CFG)")
    seed = random.randrange(2**31) if seed is None else seed
    device = model.model.model.preprocess_conv.weight.device
    L = latent_length(model, duration)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    draw = lambda: torch.cat([torch.randn(1, model.latent_dim, L, generator=g) for g in gens])
    noise = draw() if noise is None else noise
    if tuple(noise.shape) != (batch, model.latent_dim, L):
        raise ValueError(f"noise has shape {list(noise.shape)}, expected {[batch, model.latent_dim, L]}")
    step_noise = lambda i: (draw() if step_noises is None else step_noises[i]).to(device, torch.float32)

    if model.tokenizer.count(prompt) > model.max_length:
        print(f"warning: the prompt has {model.tokenizer.count(prompt)} tokens; only the first {model.max_length} "
              f"are used", file=sys.stderr)
    mask = padding_mask(model, duration, L, batch).to(device)
    A = L * model.pretransform.model.downsampling_ratio
    x = noise.to(device, torch.float32)
    sigma_max = 1.0
    if init_audio is not None:
        if not 0 <= init_noise_level <= 1:
            raise ValueError(f"init_noise_level {init_noise_level} must be in [0, 1] (1: the init audio is all noise)")
        sigma_max = init_noise_level
        # x = z·(1 − σ_max) + ε·σ_max
        x = encode_audio_input(model, init_audio, A, "init_audio") * (1 - sigma_max) + x * sigma_max
    local = None  # no mask and no inpaint audio: the zero local cond of text to audio
    keep = inpaint_keep_mask(model, duration, L, inpaint_mask_start_seconds, inpaint_mask_end_seconds, inpaint_mask)
    if keep is not None or inpaint_audio is not None:
        if keep is not None and len(keep) not in (1, batch):
            raise ValueError(f"inpaint_mask has {len(keep)} rows, expected 1 or batch = {batch}")
        keep = torch.zeros(batch, L) if keep is None else keep.expand(batch, L)
        keep = keep[:, None].to(device)
        z = (torch.zeros_like(x) if inpaint_audio is None
             else encode_audio_input(model, inpaint_audio, A, "inpaint_audio"))
        local = torch.cat([keep, z * keep], dim=1)  # local cond = [m, z·m]
    ts = schedule(model, steps, torch.full((batch,), float(effective_length(model, duration))), sigma_max).to(device)
    with torch.inference_mode():
        cond = model.conditioning([prompt] * batch, [duration] * batch)
        negative = None
        if negative_prompt is not None and cfg_scale != 1.0:  # the official code ignores it without guidance
            negative = model.conditioning([negative_prompt] * batch, [duration] * batch)
        prep = model.prepare(cond, L, cfg_scale, negative, mask, local)  # what all steps share, computed once
        v = lambda x, t: model.denoise(x, t, cond, cfg_scale, apg_scale=apg_scale, padding_mask=mask,
                                       prepared=prep).float()
        latents = SAMPLERS[sampler](v, x, ts, step_noise)
        if return_latents:
            return latents
        # decode only the requested samples (the official code decodes all L latents, silences the audio beyond the
        # valid ones and trims: all of that lies past the requested length), then clamp to [−1, 1]
        chunks = lambda starts: tqdm(starts, desc="decode", leave=False)
        audio = torch.cat([model.decode_heard(latents[i:i + 1], 0, int(duration * model.sample_rate), decode_noise,
                                              gens[i], progress=chunks) for i in range(batch)]).float()
        return audio.clamp(-1, 1).cpu()


# -----------------------------------------------------------------------------------------------------------------
# Adapters and files

def load_adapters(model, files, strengths):
    """Stack Eisbach/official adapter files onto the model, each merged into the weights (W ← W' per adapter, so
    sampling costs nothing extra). An adapter whose metadata carries `eisbach` sets the sampling recommendation."""
    import dora  # only when adapters are asked for
    if len(strengths) not in (0, 1, len(files)):
        raise ValueError(f"got {len(files)} --adapter files but {len(strengths)} --adapter-strength values "
                         f"(expected one, or one per adapter)")
    if not all(math.isfinite(s) for s in strengths):
        raise ValueError(f"--adapter-strength {strengths}: expected finite numbers")
    for i, path in enumerate(files):
        strength = strengths[i] if len(strengths) == len(files) else (strengths or [1.0])[0]
        meta = dora.load_adapter(model, path, strength=strength)
        dora.merge_dora(model, keep_base=False)
        if "eisbach" in meta:
            model.sampling_defaults = recommendation(path, meta["eisbach"])


def recommendation(path, eisbach):
    """The sampling recommendation in an adapter's `eisbach` metadata, checked: {sampler, steps, cfg_scale}."""
    try:
        sampling = json.loads(eisbach).get("sampling", {})
    except (json.JSONDecodeError, RecursionError, AttributeError):
        raise ValueError(f"{path}: metadata 'eisbach' is not a JSON object") from None
    if not isinstance(sampling, dict) or not set(sampling) <= {"sampler", "steps", "cfg_scale"}:
        raise ValueError(f"{path}: metadata eisbach.sampling={sampling!r} (expected an object with sampler, steps, "
                         f"cfg_scale)")
    check_sampling(f"{path}: metadata eisbach.sampling", **sampling)
    return sampling


def check_arguments(args):
    """Everything the command line can get wrong, checked before the model is loaded and the audio generated."""
    check_sampling("sample.py", args.sampler, args.steps, args.cfg)
    if args.n < 1:
        raise ValueError(f"--n {args.n}: expected at least 1 clip")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU; "
                         f"use --device cpu")
    out = Path(args.out)
    if out.suffix.lower() not in (".wav", ".flac"):
        raise ValueError(f"-o {out}: expected a .wav or .flac file name")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise ValueError(f"-o {out}: cannot write into {out.parent} (not an existing, writable folder)")


def save_audio(path, audio, sample_rate):
    """audio [channels, N] float in [−1, 1] -> 16-bit WAV (or FLAC, by extension), through a temporary file and a
    rename: a full disk leaves no partial file, and the error is one line."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        soundfile.write(str(tmp), audio.clamp(-1, 1).T.numpy(), sample_rate, subtype="PCM_16",
                        format=path.suffix[1:].upper())
        os.replace(tmp, path)
    except (OSError, soundfile.SoundFileError) as e:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{path}: cannot write the audio ({e}); free some space or choose another -o") from None


def editing_inputs(args, sample_rate):
    """--init-audio, --inpaint with --mask START:END, --continue -> generate()'s audio arguments. Files are read by
    data.read_audio (any rate and channel count it accepts), so a bad file is the same one-line error there."""
    def read(flag, path):
        try:
            return sample_rate, data.read_audio(path, sample_rate)[0]
        except data.BadAudio as e:
            raise ValueError(f"{flag} {path}: {e}") from None
    if args.mask and not args.inpaint:
        raise ValueError("--mask needs --inpaint FILE (the audio kept outside the regions)")
    if args.inpaint and args.continue_from:
        raise ValueError("--inpaint and --continue are two ways to give the source audio: use one")
    kw = {}
    if args.init_audio:
        kw.update(init_audio=read("--init-audio", args.init_audio), init_noise_level=args.init_noise_level)
    if args.inpaint:
        if not args.mask:
            raise ValueError("--inpaint needs at least one --mask START:END (the seconds to generate anew)")
        regions = []
        for region in args.mask:
            try:
                start, end = (float(v) for v in region.split(":"))
            except ValueError:
                raise ValueError(f"--mask {region!r}: expected START:END in seconds, e.g. 2.5:4") from None
            if not 0 <= start < end <= args.seconds:
                raise ValueError(f"--mask {region}: outside the {args.seconds:g} s clip "
                                 f"(expected 0 ≤ START < END ≤ --seconds)")
            regions.append((start, end))
        kw.update(inpaint_audio=read("--inpaint", args.inpaint), inpaint_mask_start_seconds=[r[0] for r in regions],
                  inpaint_mask_end_seconds=[r[1] for r in regions])
    if args.continue_from:
        source = read("--continue", args.continue_from)
        seconds = source[1].shape[-1] / sample_rate
        if seconds >= args.seconds:
            raise ValueError(f"--continue {args.continue_from}: the source is {seconds:.2f} s long; --seconds "
                             f"{args.seconds:g} must be longer to leave room for new music")
        # continuation = inpainting from the source's end on
        kw.update(inpaint_audio=source, inpaint_mask_start_seconds=seconds, inpaint_mask_end_seconds=args.seconds)
    return kw


def main():
    p = argparse.ArgumentParser(description="Generate music from a text prompt with Stable Audio 3.")
    p.add_argument("prompt", help='what to play, e.g. "gentle celesta lullaby, 72 BPM" ("" for unconditional)')
    p.add_argument("--seconds", type=float, default=30.0, help="length of the clip in seconds")
    p.add_argument("--model", help=f"model folder (official HF layout); default: the embedded tiny model")
    p.add_argument("--steps", type=int, help="sampler steps (default: by objective or adapter)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default 1, or the adapter's)")
    p.add_argument("--sampler", choices=list(SAMPLERS), help="default: pingpong for ARC models, euler for base")
    p.add_argument("--negative", help="negative prompt (used when --cfg != 1)")
    p.add_argument("--seed", type=int, help="random seed (printed when not given)")
    p.add_argument("--n", type=int, default=1, help="how many clips (seeds seed … seed+n−1)")
    p.add_argument("--adapter", action="append", default=[], help="adapter .safetensors (repeat to stack)")
    p.add_argument("--adapter-strength", type=float, action="append", default=[], help="one, or one per adapter")
    p.add_argument("--init-audio", metavar="FILE", help="audio-to-audio: a variation of this file")
    p.add_argument("--init-noise-level", type=float, default=0.9,
                   help="how far --init-audio is noised before sampling: 0 keeps it, 1 ignores it (default 0.9, "
                        "the official CLI's)")
    p.add_argument("--inpaint", metavar="FILE", help="inpainting: keep this file's audio outside the --mask regions")
    p.add_argument("--mask", action="append", default=[], metavar="START:END",
                   help="seconds of --inpaint to generate anew (repeat for several regions)")
    p.add_argument("--continue", dest="continue_from", metavar="FILE",
                   help="continuation: this file's audio, then new music up to --seconds")
    p.add_argument("-o", "--out", default="out.wav", help="output file (.wav or .flac); n > 1 adds -<i>")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"],
                   help="model weights and activations (the sampler state stays fp32); default: fp16 on cuda (the "
                        "official CLI's model_half; bf16 drifts more, README), fp32 elsewhere")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT and SAME blocks (compiles once per length: pays off over many clips)")
    args = p.parse_args()

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp16" if args.device == "cuda" else "fp32")]
    torch.set_flush_denormal(True)  # on CPU, denormal floats (decaying tails) cost ~100× a normal multiply
    if args.model is None:
        print(f"using the embedded tiny model ({TINY_MODEL.name}/); pass --model DIR for real Stable Audio 3 weights")
    try:
        check_arguments(args)
        t0 = time.perf_counter()
        model = StableAudioModel.from_pretrained(args.model or TINY_MODEL, device=args.device, dtype=dtype)
        load_adapters(model, args.adapter, args.adapter_strength)
        if args.compile:
            model.compile_blocks()
        seed = random.randrange(2**31) if args.seed is None else args.seed
        audio_inputs = editing_inputs(args, model.sample_rate)
        t1 = time.perf_counter()
        audio = generate(model, args.prompt, args.seconds, args.steps, args.cfg, args.sampler, seed, args.negative,
                         batch=args.n, **audio_inputs)
    except (ValueError, OSError) as e:
        sys.exit(f"sample.py: {e}")
    except KeyboardInterrupt:
        sys.exit("sample.py: interrupted, nothing written")
    t2 = time.perf_counter()
    out = Path(args.out)
    for i, clip in enumerate(audio):
        path = out if args.n == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        try:
            save_audio(path, clip, model.sample_rate)
        except OSError as e:
            sys.exit(f"sample.py: {e}")
        print(f"wrote {path} ({args.seconds:g} s, seed {seed + i})")
    print(f"load {t1 - t0:.1f} s, generate {t2 - t1:.1f} s ({(t2 - t1) / (args.seconds * args.n):.2f} s per second "
          f"of audio) on {args.device}")


if __name__ == "__main__":
    main()
