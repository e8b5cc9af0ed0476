"""
The embedded tiny model: a Stable Audio 3-architecture model small enough to train and run on a laptop CPU.

    python tiny.py            # rebuilds tiny/ from scratch, deterministically: about 2 hours on 2 cores

Every part is trained here from random init, with this project's own code, on the synthetic music set (synth.py):
  1. the set: synthetic clips of 10 s in the MusicCaps layout (every tenth clip held out)
  2. the tokenizer: a sentencepiece BPE model trained on the captions (digits split, byte fallback, as Gemma's)
  3. the SAME autoencoder, by reconstruction: multi-resolution log-STFT + spectral convergence, with a little noise
     on the latents so that the decoder tolerates a sampler's errors, and the decoder's new-token mask noise on. Its bottleneck is then set to give
     unit-variance latents (the affine map is folded into the decoder's first layer, so decode(encode(x)) is unchanged)
  4. the T5Gemma text encoder and the DiT together, by the rectified-flow objective with every weight trainable
     (x_t = (1 − t)·x0 + t·ε, target ε − x0, logit-normal t, the text dropped for 10 % of items so CFG works)
The result is written in the official layout (model_config.json, model.safetensors, t5gemma-b-b-ul2/ with the
tokenizer), so `StableAudioModel.from_pretrained("tiny")` and every command load it
like a real checkpoint (weights stored in float16: 2 bytes each). Runs are deterministic for a given seed, torch
build and thread count (2).
"""
import argparse
import json
import math
import time
from pathlib import Path

import sentencepiece
import torch
from tqdm import tqdm

import data
import synth
from barrier import masked_mse
from model import TINY_MODEL, DyT, StableAudioModel, Tokenizer, load_safetensors, save_safetensors

LATENT_DIM = 32
COND_DIM = 64          # = the text encoder's width: SA3 feeds the T5 states to the DiT without a projection


def model_config(latent_dim=LATENT_DIM, cond_dim=COND_DIM):
    """model_config.json in the official schema: SAME-S-style autoencoder (patch 256, stride 16: 4096 samples per
    latent, as the real models), standard-attention DiT, learned-padding prompt and the seconds conditioner."""
    same = dict(channels=16, c_mults=[8], strides=[16], latent_dim=latent_dim, dim_heads=32, differential=True,
                dyt=True, variable_stride=True, chunk_size=32, chunk_midpoint_shift=True, checkpointing=False)
    return {
        "model_type": "diffusion_cond_inpaint", "sample_size": 4096 * 1024, "sample_rate": 44100, "audio_channels": 2,
        "model": {
            "pretransform": {"type": "autoencoder", "chunked": True, "config": {
                "pretransform": {"type": "patched", "config": {"patch_size": 256, "channels": 2}},
                "encoder": {"type": "same", "config": {**same, "in_channels": 512, "transformer_depths": [2],
                                                       "mask_noise": 0.0}},
                "decoder": {"type": "same", "config": {**same, "out_channels": 512, "transformer_depths": [4],
                                                       "sinusoidal_blocks": [0], "conv_mapping": True,
                                                       "mask_noise": 0.1}},
                "bottleneck": {"type": "softnorm", "config": {"dim": latent_dim, "noise_augment_dim": 0,
                                                              "noise_regularize": False, "auto_scale": True,
                                                              "freeze": True}},
                "latent_dim": latent_dim, "downsampling_ratio": 4096, "io_channels": 2}},
            "conditioning": {"cond_dim": cond_dim, "configs": [
                {"id": "prompt", "type": "t5gemma", "config": {"max_length": 80, "padding_mode": "learned",
                                                               "subfolder": "t5gemma-b-b-ul2"}},
                {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 384,
                                                                     "fourier_features_type": "expo"}}]},
            "diffusion": {
                "type": "dit", "diffusion_objective": "rectified_flow",
                "cross_attention_cond_ids": ["prompt", "seconds_total"], "global_cond_ids": ["seconds_total"],
                "local_add_cond_ids": ["inpaint_mask", "inpaint_masked_input"],
                "distribution_shift_options": {"min_length": 256, "max_length": 4096},
                "mask_padding_attention": True, "use_effective_length_for_schedule": True,
                "config": {"io_channels": latent_dim, "patch_size": 1, "embed_dim": 128, "depth": 6, "num_heads": 4,
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
# 3. The autoencoder

def stft_loss(y, x, sizes=(2048, 512, 128)):
    """Σ over resolutions n of mean|log(|Y| + 1) − log(|X| + 1)| + ‖|Y| − |X|‖/‖X‖ (log-STFT L1 + spectral
    convergence). The floor of 1 (about −45 dB below a loud bin at n = 2048) matters: with a floor far below the
    noise a small model can reach, silence scores better than any imperfect sound, and training converges to it."""
    loss = 0.0
    for n in sizes:
        window = torch.hann_window(n)
        X, Y = (torch.stft(s.reshape(-1, s.shape[-1]), n, n // 4, window=window, return_complex=True).abs()
                for s in (x, y))
        loss = loss + (torch.log(Y + 1) - torch.log(X + 1)).abs().mean() + (Y - X).norm() / X.norm()
    return loss


def init_autoencoder(ae):
    """Weights from which a small SAME trains quickly: the residual outputs (zero at construction) and the new tokens
    random, so that information flows from the first step; DyT's α at 0.5, the DyT paper's default."""
    for name, module in ae.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(("to_out", "ff.2")):
            torch.nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        if isinstance(module, DyT):
            module.alpha.data.fill_(0.5)
    for block in (ae.encoder.layers[0], ae.decoder.layers[3]):
        block.new_tokens.data.normal_(0, 0.5)


def train_autoencoder(ae, audio, steps, batch, crop, lr, g):
    """Reconstruction on random crops of the training audio (a list of [2, N] tensors), AdamW with cosine decay."""
    params = [p for p in ae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    bar = tqdm(range(steps), desc="autoencoder")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = torch.randint(len(audio), (batch,), generator=g).tolist()
        x = torch.stack([audio[i][:, o:o + crop] for i, o in
                         zip(rows, (torch.rand(batch, generator=g) * (audio[0].shape[-1] - crop)).long().tolist())])
        z = ae.encode(x)
        z = z + 0.1 * z.detach().std() * torch.randn(z.shape, generator=g)  # the decoder learns to tolerate noise
        y = ae.decode(z, noise=True, generator=g)                           # with the new tokens' mask noise
        loss = stft_loss(y, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")


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

def train_dit(model, dataset, steps, batch, lr, g):
    """Rectified flow on cached latents with every DiT, text-encoder and conditioner weight trainable."""
    params = [p for name, p in model.named_parameters() if not name.startswith("pretransform.")]
    for p in params:
        p.requires_grad_(True)
    headroom = int(6 * model.latent_rate)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    bar = tqdm(range(steps), desc="text encoder + DiT")
    for step in bar:
        for group in opt.param_groups:  # 200 warm-up steps, then cosine
            group["lr"] = lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / steps))
        items = [dataset.get(i, g) for i in torch.randint(len(dataset), (batch,), generator=g).tolist()]
        x0 = torch.stack([it["latents"] for it in items])                   # (B, C, T)
        # valid: the clip and 6 s of the silence after it, as generate() lets the model see them
        valid = torch.stack([it["mask"] for it in items]).sum(1, keepdim=True) + headroom
        mask = torch.arange(x0.shape[-1]) < valid
        noise = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(batch, generator=g))                  # logit-normal t
        # x_t = (1 − t)·x0 + t·ε;  target v = ε − x0
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        cond = model.conditioning([it["prompt"] for it in items], [it["seconds_total"] for it in items])
        drop = torch.rand(batch, generator=g) < 0.1                         # CFG dropout: zero text cond
        cross = torch.where(drop[:, None, None], 0.0, cond["cross_attn_cond"])
        v = model.velocity(x_t, t, cond, mask, cross_attn_cond=cross)
        loss = masked_mse(v, noise - x0, mask).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.requires_grad_(False)


# -----------------------------------------------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description="Rebuild the embedded tiny model from scratch (CPU, ~2 hours).")
    p.add_argument("--out", default=str(TINY_MODEL), help="model folder to write")
    p.add_argument("--work", default="runs/tiny-build", help="scratch folder: the synthetic set and its latents")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clips", type=int, default=1000, help="synthetic clips of 10 s (every tenth held out)")
    p.add_argument("--ae-steps", type=int, default=3000)
    p.add_argument("--dit-steps", type=int, default=3000)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # decaying notes and softmax tails make denormals, which are ~100× slower on CPU
    g = torch.Generator().manual_seed(args.seed)
    start = time.time()
    out, work = Path(args.out), Path(args.work)
    text_dir = out / "t5gemma-b-b-ul2"
    text_dir.mkdir(parents=True, exist_ok=True)

    # 1. the synthetic set (written once; the audio is read back through the real data path)
    if not (work / "musiccaps-public.csv").is_file():
        synth.write(work, args.clips, 10.0, args.seed)
    clips, _, _ = data.find_clips(work, "train")
    print(f"{len(clips)} training clips in {work}")

    # 2. tokenizer, then the model with random weights
    vocab = train_tokenizer([c.caption for c in clips], text_dir, 1000)  # captions: ≤ 50 pieces, none cut at 80
    config, tconfig = model_config(), text_config(vocab)
    (text_dir / "config.json").write_text(json.dumps(tconfig, indent=1))
    model = StableAudioModel.from_config(config, tconfig, device="cpu")
    model.tokenizer = Tokenizer(text_dir, model.max_length)
    print(f"parameters: DiT {sum(p.numel() for p in model.model.parameters()) / 1e6:.2f} M, autoencoder "
          f"{sum(p.numel() for p in model.pretransform.parameters()) / 1e6:.2f} M, text encoder "
          f"{sum(p.numel() for p in model.text_encoder.parameters()) / 1e6:.2f} M; tokenizer {vocab} pieces")

    # 3. the autoencoder on the training audio (kept in the scratch folder: a rerun goes on from here)
    ae = model.pretransform.model
    saved = work / f"autoencoder-{args.ae_steps}.safetensors"
    if saved.is_file():
        ae.load_state_dict(load_safetensors(saved))
    else:
        audio = [data.read_audio(c, model.sample_rate)[0] for c in tqdm(clips, desc="reading audio")]
        init_autoencoder(ae)
        train_autoencoder(ae, audio, args.ae_steps, batch=8, crop=32768, lr=2e-3, g=g)
        normalise_bottleneck(ae, audio[:200])
        save_safetensors(ae.state_dict(), saved)
    ae.requires_grad_(False)
    g.manual_seed(args.seed + 1)  # the DiT's draws do not depend on whether the autoencoder was trained just now

    # 4. latents, then text encoder + DiT
    entries, skipped = data.cache_latents(model, clips, data_folder=work)
    crop = 176  # 10 s + the 6 s of headroom generate() adds, in latents
    dataset = data.LatentDataset(entries, crop)
    train_dit(model, dataset, args.dit_steps, batch=12, lr=1e-3, g=g)

    # 5. the official layout; weights in float16 (half the bytes), rotary frequencies in float32
    half = lambda k, v: v if k.endswith("inv_freq") else v.half()
    (out / "model_config.json").write_text(json.dumps(config, indent=1))
    save_safetensors({k: half(k, v) for k, v in model.checkpoint_state_dict().items()}, out / "model.safetensors")
    save_safetensors({f"encoder.{k[len('text_encoder.'):]}": half(k, v) for k, v in model.state_dict().items()
                      if k.startswith("text_encoder.")}, text_dir / "model.safetensors")
    print(f"wrote {out} in {(time.time() - start) / 60:.0f} min")


if __name__ == "__main__":
    main()
