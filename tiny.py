"""
The embedded tiny model: a Stable Audio 3-architecture model small enough to train and run on a laptop CPU.

    python tiny.py --out runs/tiny-v2     # builds it from scratch; resumable: rerun the same command to go on

Every part is trained here from random init, with this project's own code, on the synthetic music set (synth.py):
  1. the set: pieces of 30-90 s with form, in the MusicCaps layout (every tenth piece held out)
  2. the tokenizer: a sentencepiece BPE model trained on the captions (digits split, byte fallback, as Gemma's)
  3. the SAME autoencoder, by reconstruction: multi-resolution STFT on left/right and mid/side plus a waveform term,
     with a little noise on the latents so that the decoder tolerates a sampler's errors, and the decoder's
     new-token mask noise on. Its bottleneck is then set to give unit-variance latents (the affine map is folded into
     the decoder's first layer, so decode(encode(x)) is unchanged)
  4. the T5Gemma text encoder and the DiT together, by train.py's objective (rectified flow, inpainting
     co-training, CFG dropout) with every weight trainable, on 30 s crops
Each phase checkpoints into --work (atomically, every 5 min) and a rerun goes on where it stopped; --until stops
after a phase. The result is written in the official layout (model_config.json, model.safetensors,
t5gemma-b-b-ul2/ with the tokenizer), so `StableAudioModel.from_pretrained(folder)` and every command load it like a
real checkpoint (weights stored in float16: 2 bytes each). Runs are deterministic for a given seed, torch build and
--threads.
"""
import argparse
import contextlib
import json
import math
import time
from pathlib import Path

import sentencepiece
import soundfile
import torch
from tqdm import tqdm

import data
import synth
import train
from model import (TINY_MODEL, DyT, StableAudioModel, Tokenizer, load_safetensors, read_safetensors_metadata,
                   save_safetensors)

LATENT_DIM = 64        # numbers per latent frame: 2 channels × 1024 samples in 64, 32× (the real SAME-S: 8192 in 256)
PATCH, STRIDE = 64, 16  # 64-sample patches, 16 per latent: 1024 samples per latent, 43 latents per second
WIDTH = 2 * PATCH      # the SAME's width: one token holds one stereo patch, so nothing maps it to fewer dimensions
COND_DIM = 64          # = the text encoder's width: SA3 feeds the T5 states to the DiT without a projection
MAX_LATENTS = 8192     # the longest generation: 8192·1024 samples = 190.2 s (the card samples 30-180 s)


def model_config(latent_dim=LATENT_DIM, cond_dim=COND_DIM):
    """model_config.json in the official schema: SAME-S-style autoencoder (chunked attention, DyT),
    standard-attention DiT, learned-padding prompt and the seconds conditioner."""
    # differential attention off: SDPA(q, k, v) − SDPA(q₂, k₂, v) is ~0 at init (two near-uniform maps), so nothing
    # reaches a group's new token and this small SAME's latents collapsed to a constant (measured); plain attention
    # averages the chunk at init, and the latents vary from the first steps
    # the decoder's output mapping takes each token (WIDTH numbers) to one patch (2·PATCH samples): with
    # 2·PATCH > WIDTH (tried: 512 from 128) its outputs span only WIDTH directions, so every patch is a mix of the
    # same few shapes and the audio carries a comb at the patch rate (measured); with 2·PATCH = WIDTH both mappings
    # are the identity (so no conv_mapping): each token is its patch. One new token per position of the decoder's
    # groups (not one shared: variable_stride off) tells the 16 outputs of a latent apart from the first step.
    same = dict(channels=WIDTH // 8, c_mults=[8], strides=[STRIDE], latent_dim=latent_dim, dim_heads=32,
                differential=False, dyt=True, variable_stride=False, chunk_size=4 * STRIDE, chunk_midpoint_shift=True,
                checkpointing=False)
    return {
        "model_type": "diffusion_cond_inpaint", "sample_size": PATCH * STRIDE * MAX_LATENTS, "sample_rate": 44100,
        "audio_channels": 2,
        "model": {
            "pretransform": {"type": "autoencoder", "chunked": True, "config": {
                "pretransform": {"type": "patched", "config": {"patch_size": PATCH, "channels": 2}},
                "encoder": {"type": "same", "config": {**same, "in_channels": 2 * PATCH, "transformer_depths": [2],
                                                       "mask_noise": 0.0}},
                "decoder": {"type": "same", "config": {**same, "out_channels": 2 * PATCH, "transformer_depths": [4],
                                                       "sinusoidal_blocks": [2], "mask_noise": 0.01}},
                "bottleneck": {"type": "softnorm", "config": {"dim": latent_dim, "noise_augment_dim": 0,
                                                              "noise_regularize": False, "auto_scale": True,
                                                              "freeze": True}},
                "latent_dim": latent_dim, "downsampling_ratio": PATCH * STRIDE, "io_channels": 2}},
            "conditioning": {"cond_dim": cond_dim, "configs": [
                {"id": "prompt", "type": "t5gemma", "config": {"max_length": 80, "padding_mode": "learned",
                                                               "subfolder": "t5gemma-b-b-ul2"}},
                {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 384,
                                                                     "fourier_features_type": "expo"}}]},
            "diffusion": {
                "type": "dit", "diffusion_objective": "rectified_flow",
                "cross_attention_cond_ids": ["prompt", "seconds_total"], "global_cond_ids": ["seconds_total"],
                "local_add_cond_ids": ["inpaint_mask", "inpaint_masked_input"],
                "distribution_shift_options": {"min_length": 256, "max_length": MAX_LATENTS},
                "mask_padding_attention": True, "use_effective_length_for_schedule": True,
                "config": {"io_channels": latent_dim, "patch_size": 1, "embed_dim": 192, "depth": 6, "num_heads": 6,
                           "cond_token_dim": cond_dim, "global_cond_dim": cond_dim,
                           "local_add_cond_dim": latent_dim + 1, "global_cond_type": "adaLN",
                           "timestep_features_type": "expo", "attn_kwargs": {"qk_norm": "rms", "differential": False},
                           "norm_type": "rms_norm", "norm_kwargs": {"force_fp32": True}, "ff_kwargs": {"mult": 4.0},
                           "num_memory_tokens": 16}},
            "io_channels": latent_dim}}


def text_config(vocab_size, width=COND_DIM):
    """The T5Gemma config.json (encoder-only model, as transformers' T5GemmaEncoderModel writes it)."""
    encoder = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=width // 4, query_pre_attn_scalar=width // 4, rms_norm_eps=1e-6,
                   attn_logit_softcapping=50.0, hidden_activation="gelu_pytorch_tanh", sliding_window=4096,
                   layer_types=["sliding_attention", "full_attention"], vocab_size=vocab_size,
                   rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, model_type="t5_gemma_module",
                   attention_bias=False, attention_dropout=0.0, dropout_rate=0.0, is_decoder=False,
                   max_position_embeddings=8192, pad_token_id=0, eos_token_id=1, bos_token_id=2, dtype="bfloat16")
    return {"architectures": ["T5GemmaEncoderModel"], "model_type": "t5gemma", "is_encoder_decoder": False,
            "encoder": encoder, "decoder": {**encoder, "is_decoder": True, "cross_attention_hidden_size": width},
            "vocab_size": vocab_size, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
            "tie_word_embeddings": True, "dtype": "bfloat16"}


# -----------------------------------------------------------------------------------------------------------------
# 2. The tokenizer

def train_tokenizer(captions, folder, vocab_size):
    """Gemma-style sentencepiece BPE (pad 0, eos 1, bos 2, unk 3; digits split; byte fallback) on the captions."""
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size,
        model_type="bpe", split_digits=True, byte_fallback=True, character_coverage=1.0, add_dummy_prefix=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", num_threads=1, minloglevel=2, hard_vocab_limit=False)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "vocab_file": "tokenizer.model", "add_bos_token": False,
        "add_eos_token": True, "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
        "unk_token": "<unk>", "padding_side": "right", "model_max_length": 80}, indent=1))
    return sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).vocab_size()


# -----------------------------------------------------------------------------------------------------------------
# Resumable phases: a phase's weights, AdamW state and step in one file, written atomically every few minutes. Every
# random number of step s comes from a generator of (seed, s) (train.item_generator), so a resumed phase goes on
# exactly.

def save_phase(path, step, params, optimizer):
    tensors = {f"param.{name}": p.detach() for name, p in params.items()}
    for i, p in enumerate(params.values()):
        for key, value in optimizer.state.get(p, {}).items():
            tensors[f"adam.{i}.{key}"] = value.detach().reshape(value.shape)
    save_safetensors(tensors, path, {"step": str(step)})


def load_phase(path, params, optimizer):
    """Restore a phase saved by save_phase; returns its step (0 when there is no file yet)."""
    if not Path(path).is_file():
        return 0
    tensors = load_safetensors(path)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[f"param.{name}"])
    for i, p in enumerate(params.values()):
        state = {k.split(".", 2)[2]: t for k, t in tensors.items() if k.startswith(f"adam.{i}.")}
        if state:
            optimizer.state[p] = state
    return int(read_safetensors_metadata(path)["step"])


def cosine_lr(step, steps, lr, warmup):
    # lr(s) = lr·min(1, (s+1)/warmup)·½(1 + cos(π·s/steps))
    return lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


# -----------------------------------------------------------------------------------------------------------------
# 3. The autoencoder

def stft_loss(y, x, sizes=(2048, 512, 128, 32)):
    """Σ over resolutions n of ‖|Y| − |X|‖/‖X‖ + 0.2·mean|log(|Y| + 0.01) − log(|X| + 0.01)| (spectral
    convergence + log-STFT L1). The smallest window (0.7 ms) sees the clicks a decoder makes at its frame edges."""
    loss = 0.0
    for n in sizes:
        window = torch.hann_window(n)
        X, Y = (torch.stft(s.reshape(-1, s.shape[-1]), n, n // 4, window=window, return_complex=True).abs()
                for s in (x, y))
        loss = loss + (Y - X).norm() / X.norm() + 0.2 * (torch.log(Y + 0.01) - torch.log(X + 0.01)).abs().mean()
    return loss


def reconstruction_loss(y, x):
    """STFT losses on left/right and on mid/side, M = (L + R)/2, S = (L − R)/2 (so the image between the speakers
    is kept, not only each speaker's spectrum), plus a relative waveform L1 Σ|y − x|/Σ|x| (magnitudes alone leave
    the phase, and the phase between the channels, free)."""
    mid_side = lambda a: torch.stack([a[:, 0] + a[:, 1], a[:, 0] - a[:, 1]], 1) / 2
    return (stft_loss(y, x) + stft_loss(mid_side(y), mid_side(x))
            + (y - x).abs().mean() / x.abs().mean().clamp_min(1e-8))


def init_autoencoder(ae):
    """Weights from which a small SAME trains quickly: the residual outputs (zero at construction) random, so that
    information flows from the first step; the new tokens small (a large one is a constant that drowns what its
    group's attention brings); DyT's α at 0.5, the DyT paper's default."""
    for name, module in ae.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_out", "ff.2")):
            torch.nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if isinstance(module, DyT):
            module.alpha.data.fill_(0.5)
    for block in (ae.encoder.layers[0], ae.decoder.layers[3]):
        block.new_tokens.data.normal_(0, 0.02)


def audio_crops(files, frames, batch, g):
    """batch random crops of `frames` samples from the WAV files (read from disk: the set does not fit in memory)."""
    rows = torch.randint(len(files), (batch,), generator=g).tolist()
    out = []
    for r, u in zip(rows, torch.rand(batch, generator=g).tolist()):
        path, n = files[r]
        x, _ = soundfile.read(path, start=int(u * (n - frames)), frames=frames, dtype="float32", always_2d=True)
        out.append(torch.from_numpy(x.T.copy()))
    return torch.stack(out)


def train_autoencoder(ae, files, steps, batch, crop, lr, seed, checkpoint):
    """Reconstruction on random crops, AdamW with warm-up and cosine decay; resumable from `checkpoint`."""
    params = {name: p for name, p in ae.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    start = load_phase(checkpoint, params, opt)
    bar = tqdm(range(start, steps), desc="autoencoder", initial=start, total=steps)
    last = time.time()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 100)
        g = train.item_generator(seed, step, 0)  # the whole step's draws from one generator of (seed, step)
        x = audio_crops(files, crop, batch, g)
        z = ae.encode(x)
        z = z + 0.1 * z.detach().std() * torch.randn(z.shape, generator=g)  # the decoder learns to tolerate noise
        y = ae.decode(z, noise=True, generator=g)                           # with the new tokens' mask noise
        loss = reconstruction_loss(y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if time.time() - last > 300 or step + 1 == steps:
            save_phase(checkpoint, step + 1, params, opt)
            last = time.time()


@torch.no_grad()
def normalise_bottleneck(ae, audio):
    """Make the latents unit-variance per channel: z = (x·s + b)/r with s = 1/std_c, b = −mean_c/std_c, r = 1, and
    fold the inverse into the decoder's first Linear (it sees z·r = x·s + b, so W' = W/s, c' = c − W·(b/s))."""
    x = torch.cat([ae.encoder(ae.patchify(a[None])) for a in audio], dim=-1)   # (1, latent, frames)
    mean, std = x.mean((0, 2)), x.std((0, 2)).clamp_min(1e-6)
    b = ae.bottleneck
    b.scaling_factor.copy_((1 / std)[None, :, None])
    b.bias.copy_((-mean / std)[None, :, None])
    b.running_std.fill_(1.0)
    first = ae.decoder.layers[1]
    first.bias.add_(first.weight @ mean)                                 # c' = c + W·mean
    first.weight.mul_(std[None, :])                                      # W' = W·diag(std)


# -----------------------------------------------------------------------------------------------------------------
# 4. Text encoder + DiT

def train_dit(model, dataset, steps, batch, lr, cfg, checkpoint):
    """train.py's objective (rectified flow, truncated logit-normal t with the length shift, minibatch OT, CFG
    dropout, the padding mask reaching into the silence, inpainting co-training; λ = 0: the plain masked MSE) with
    every DiT, text-encoder and conditioner weight trainable. AdamW, warm-up and cosine decay; resumable."""
    params = {name: p for name, p in model.named_parameters() if not name.startswith("pretransform.")}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params.values(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    start = load_phase(checkpoint, params, opt)
    denoiser = train.Denoiser(model)
    bar = tqdm(range(start, steps), desc="text encoder + DiT", initial=start, total=steps)
    last = time.time()
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 200)
        items = list(enumerate(train.batch_indices(len(dataset), cfg.seed, step, batch)))
        loss, _, _ = train.loss_of(denoiser, train.make_batch(dataset, model, cfg, step, items), cfg, "cpu",
                                contextlib.nullcontext())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last > 300 or step + 1 == steps:
            save_phase(checkpoint, step + 1, params, opt)
            last = time.time()
    model.requires_grad_(False)


# -----------------------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(
        description="Rebuild the embedded tiny model from scratch (2 CPU cores: ~2¼ hours; resumable).")
    p.add_argument("--out", default=str(TINY_MODEL), help="model folder to write")
    p.add_argument("--work", default="runs/tiny-build", help="scratch folder: the synthetic set, latents, phases")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=300, help="synthetic pieces (every tenth held out)")
    p.add_argument("--seconds", default="30:90", help="their length: S or SHORTEST:LONGEST")
    p.add_argument("--ae-steps", type=int, default=6000)
    p.add_argument("--dit-steps", type=int, default=3000)
    p.add_argument("--crop-seconds", type=float, default=30.0, help="the DiT's training crops")
    p.add_argument("--until", choices=["set", "autoencoder", "dit"], default="dit", help="stop after this phase")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the results depend on it, a little)")
    args = p.parse_args()
    seconds = tuple(float(v) for v in args.seconds.split(":"))
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # decaying notes and softmax tails make denormals, which are ~100× slower on CPU
    start = time.time()
    out, work = Path(args.out), Path(args.work)
    text_dir = out / "t5gemma-b-b-ul2"
    text_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    # 1. the synthetic set (written once; the audio is read back through the real data path)
    if not (work / "musiccaps-public.csv").is_file():
        synth.write(work, args.clips, seconds[0] if len(seconds) == 1 else seconds, args.seed)
    clips, _, _ = data.find_clips(work, "train")
    print(f"{len(clips)} training clips in {work}")
    if args.until == "set":
        return

    # 2. tokenizer, then the model with random weights
    vocab = train_tokenizer([c.caption for c in clips], text_dir, 1000)  # captions: ≤ 60 pieces, none cut at 80
    config, tconfig = model_config(), text_config(vocab)
    (text_dir / "config.json").write_text(json.dumps(tconfig, indent=1))
    model = StableAudioModel.from_config(config, tconfig, device="cpu")
    model.tokenizer = Tokenizer(text_dir, model.max_length)
    print(f"parameters: DiT {sum(p.numel() for p in model.model.parameters()) / 1e6:.2f} M, autoencoder "
          f"{sum(p.numel() for p in model.pretransform.parameters()) / 1e6:.2f} M, text encoder "
          f"{sum(p.numel() for p in model.text_encoder.parameters()) / 1e6:.2f} M; tokenizer {vocab} pieces")

    # 3. the autoencoder on crops of the training audio, then its latents set to unit variance
    ae = model.pretransform.model
    done = work / f"autoencoder-{args.ae_steps}.safetensors"
    if done.is_file():
        ae.load_state_dict(load_safetensors(done))
    else:
        files = [(str(c.path), soundfile.info(str(c.path)).frames) for c in clips]
        init_autoencoder(ae)
        train_autoencoder(ae, files, args.ae_steps, batch=12, crop=16384, lr=2e-3, seed=args.seed,
                          checkpoint=work / "autoencoder-phase.safetensors")
        normalise_bottleneck(ae, [data.read_audio(c, model.sample_rate)[0] for c in clips[:40]])
        save_safetensors(ae.state_dict(), done)
    ae.requires_grad_(False)
    if args.until == "autoencoder":
        return

    # 4. latents, then text encoder + DiT
    entries, skipped = data.cache_latents(model, clips, data_folder=work)
    cfg = train.TrainConfig(data=str(work), crop_seconds=args.crop_seconds, lam=0.0, seed=args.seed + 1)
    crop = math.ceil(int(cfg.crop_seconds * model.sample_rate) / ae.downsampling_ratio)  # in latents
    dataset = data.LatentDataset(entries, crop)
    train_dit(model, dataset, args.dit_steps, batch=2, lr=1e-3, cfg=cfg, checkpoint=work / "dit-phase.safetensors")

    # 5. the official layout; weights in float16 (half the bytes), rotary frequencies in float32
    half = lambda k, v: v if k.endswith("inv_freq") else v.half()
    (out / "model_config.json").write_text(json.dumps(config, indent=1))
    save_safetensors({k: half(k, v) for k, v in model.checkpoint_state_dict().items()}, out / "model.safetensors")
    save_safetensors({f"encoder.{k[len('text_encoder.'):]}": half(k, v) for k, v in model.state_dict().items()
                      if k.startswith("text_encoder.")}, text_dir / "model.safetensors")
    print(f"wrote {out} in {(time.time() - start) / 60:.0f} min")


if __name__ == "__main__":
    main()
