"""Make vectors/editing.safetensors: the official Stable Audio 3 `generate()` with audio inputs (audio-to-audio,
inpainting with one and two regions, continuation, both at once) on the tiny fixture models of
shared/reference/sa3/seed1: base (rectified_flow, euler) and arc (rf_denoiser, pingpong). Test-time tooling only:
it imports the official code, which the project never does.

Regenerate (official code checked out outside this repo, commit 636f906; the venv of vectors/README.md; torchaudio
may be a stub because every audio input here is already at the model's 44.1 kHz, so nothing is resampled):
    PYTHONPATH=/path/to/stable-audio-3 python vectors/make_editing.py ../shared/reference/sa3/seed1

The source audio is make_sa3_extra.test_audio (rebuilt by the tests, not stored). The noise is not stored either:
the official generate() seeds the global RNG and draws the initial noise, then (pingpong) one randn_like per step,
which equal the draws of torch.Generator().manual_seed(seed) in that order; this script records the official draws
and checks that. The decoder's eval-time noise is off, as in the other vectors.
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from make_sa3_extra import install_fa2_substitute, load_official, no_decode_noise, test_audio
from stable_audio_3.model import StableAudioModel

SR = 44100
# name: generate() arguments; "source"/"init" are test_audio lengths in seconds ("mono": the first channel only,
# "swap": the channels swapped, so that the init and the inpaint audio differ)
CASES = {
    "a2a_0.7": dict(duration=0.4, init=0.5, init_noise_level=0.7),
    "a2a_1.0": dict(duration=0.4, init=0.5, init_noise_level=1.0),
    "inpaint_one": dict(duration=0.4, source=0.5, start=0.1, end=0.25),
    "inpaint_two": dict(duration=0.4, source=0.5, mono=True, start=[0.05, 0.2], end=[0.12, 0.33]),
    "continue": dict(duration=0.5, source=0.25, start=0.25, end=0.5),
    "init_and_inpaint": dict(duration=0.4, init=0.5, swap=True, init_noise_level=0.8, source=0.4, start=0.1,
                             end=0.3),
}
SETTINGS = {"base": dict(sampler_type="euler", cfg_scale=3.5, seed=211),
            "arc": dict(sampler_type="pingpong", cfg_scale=1.0, seed=223)}
PROMPT = "warm rhodes chords over a slow hip hop beat, 84 BPM"
STEPS = 8
AUDIO_CASES = ["continue", "a2a_0.7"]  # also decoded (decode noise off); the others keep the file small


def audio_inputs(case):
    kw = {}
    if "init" in case:
        init = test_audio(int(case["init"] * SR))[0]
        kw.update(init_audio=(SR, init[[1, 0]] if case.get("swap") else init),
                  init_noise_level=case["init_noise_level"])
    if "source" in case:
        source = test_audio(int(case["source"] * SR))[0]
        kw.update(inpaint_audio=(SR, source[:1] if case.get("mono") else source),
                  inpaint_mask_start_seconds=case["start"], inpaint_mask_end_seconds=case["end"])
    return kw


def recorded(fn):
    """Run fn() recording every torch.randn / torch.randn_like draw in order."""
    draws, randn, randn_like = [], torch.randn, torch.randn_like
    torch.randn = lambda *a, **k: draws.append(randn(*a, **k)) or draws[-1]
    torch.randn_like = lambda *a, **k: draws.append(randn_like(*a, **k)) or draws[-1]
    try:
        return fn(), draws
    finally:
        torch.randn, torch.randn_like = randn, randn_like


def main(seed_dir):
    seed_dir = Path(seed_dir)
    install_fa2_substitute()
    out, meta = {}, {"prompt": PROMPT, "steps": STEPS, "sample_rate": SR, "cases": CASES, "settings": SETTINGS,
                     "audio_cases": AUDIO_CASES, "official_commit": "636f906fc0ee54b3f06edf974dc7d3aa99d6841b"}
    for name, settings in SETTINGS.items():
        model, config = load_official(seed_dir / name)
        no_decode_noise(model)
        official = StableAudioModel(model, config, "cpu", False)
        for case_name, case in CASES.items():
            kw = dict(prompt=PROMPT, duration=case["duration"], steps=STEPS, cfg_scale=settings["cfg_scale"],
                      seed=settings["seed"], sampler_type=settings["sampler_type"], **audio_inputs(case))
            latents, draws = recorded(lambda: official.generate(return_latents=True, **kw))
            g = torch.Generator().manual_seed(settings["seed"])
            replay = [torch.randn(latents.shape, generator=g) for _ in draws]
            expected = 1 + (STEPS if settings["sampler_type"] == "pingpong" else 0)
            assert len(draws) == expected and all(torch.equal(a, b) for a, b in zip(draws, replay)), case_name
            out[f"{name}.{case_name}.latents"] = latents.float()
            if case_name in AUDIO_CASES:
                out[f"{name}.{case_name}.audio"] = official.generate(**kw).float()
            print(f"{name} {case_name}: latents {list(latents.shape)}")
    path = Path(__file__).resolve().parent / "editing.safetensors"
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata={"inputs": json.dumps(meta)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1])
