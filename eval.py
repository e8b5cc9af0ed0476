"""
Measurements on audio: tempo, temporal-energy entropy, onset contrast and onsets, stereo correlation, frame-rate
flutter, the loudness form, spectral centroid and register, and reconstruction quality.

Each function takes numpy or torch audio, [2, N] (channels first, as the model decodes) or [N], so a model
evaluation can apply them to generated audio as they are. The estimators are proven on the synthetic set (synth.py),
whose labels are exact:

    python eval.py estimators --clips 200 --seed 1

prints a markdown table: tempo within 2 % and 5 % of the label, the median relative tempo error, register accuracy,
and each register's centroid range (what REGISTER_EDGES is calibrated from). The autoencoder alone:

    python eval.py autoencoder [--model tiny] [--clips 30] [--seconds 30]

round-trips held-out clips: onset F1, tempo kept, left/right correlation, flutter, SNR. Then a model:

    python eval.py model [--model tiny] [--adapter FILE] [--prompts 30] [--seconds 30:60] [--steps 0]

generates one piece per held-out prompt (synth.prompts: captions never used in training), as long as its label says,
and measures it against the prompt: tempo (plain and octave-folded error, rank correlation), register, onset
contrast and stereo against the training clips', flutter, whether the form follows the caption, silent gaps.
What the DiT reads of a caption is measured without sampling:

    python eval.py captions [--model tiny] [--clips 48]

prints its loss on held-out clips with their own caption, with the tempo in it moved, and with another clip's.
The barrier study's two kinds (synth.py --kinds structured,diffuse) and a training run's per-item weights:

    python eval.py kinds [--clips 40] [--seconds 4] [--seed 1]
    python eval.py barrier-stats RUN_DIR [--data DIR]

prove kind_of (structured or diffuse, from onset contrast) on labelled clips, and summarise train.py's log.jsonl:
mean w per kind and t-bin, each kind's share of the loss weight, w against the clips' own onset contrast, and w in
the first and last quarter of the steps.
Like bench.py, this is a measuring tool: it may import sample.py.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import barrier
import sample
import synth
from model import TINY_MODEL, StableAudioModel

TEMPO_RANGE = (60.0, 180.0)      # BPM the estimator may answer; the synthetic set spans 60-160
ONSET_HOP = 256                  # 44.1 kHz / 256 = 172 onset frames per second
# centroid edges (Hz) between low|mid and mid|high: the geometric midpoints of the gaps between the registers'
# centroid ranges on synthetic clips (low ≤ 239, mid 309-616, high ≥ 890 over 1200 clips of 6 s, seeds 1, 3-7)
REGISTER_EDGES = (270.0, 740.0)
# onset contrast between synth.py's two kinds: diffuse ≤ 0.74, structured ≥ 1.43 (clips of 4-10 s, seeds 1, 2, 3, 5;
# 102 clips), so 1.0 sits in the gap (steady sounds measure under 1: see onset_contrast)
KIND_CONTRAST = 1.0


# -----------------------------------------------------------------------------------------------------------------
# 1. spectra and onsets

def as_array(x):
    """numpy or torch, [N] or [channels, N] -> float64 numpy [channels, N]."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    x = x[None] if x.ndim == 1 else x
    if x.ndim != 2:
        raise ValueError(f"got an array of shape {x.shape}; expected [N] or [channels, N]")
    return x


def as_audio(audio):
    """as_array for audio: at most 2 channels, channels first."""
    x = as_array(audio)
    if x.shape[0] > 2:
        raise ValueError(f"audio has shape {x.shape}; expected [N] or [channels <= 2, N] (channels first)")
    return x


def stft_power(x, n_fft, hop):
    # |X[c, t, f]|² = |Σ_n w[n]·x[c, t·hop + n]·e^{−2πi·f·n/n_fft}|²,  w = Hann
    if x.shape[-1] < n_fft:
        x = np.pad(x, [(0, 0), (0, n_fft - x.shape[-1])])
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft, axis=-1)[:, ::hop]
    return np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=-1)) ** 2          # (C, T, n_fft/2 + 1)


def spectral_flux(audio, sr):
    """Onset strength: the half-wave rectified flux of a compressed band spectrogram. Returns (o (T,), frames/s)."""
    x = as_audio(audio)
    x = x.mean(0, keepdims=True) / max(np.abs(x).max(), 1e-9)                    # mono, peak 1
    P = stft_power(x, 2048, ONSET_HOP)[0]                                          # (T, 1025)
    edges = np.unique(np.geomspace(3, 1024, 48).astype(np.int64))                  # ~40 log-spaced bands
    B = np.add.reduceat(P, edges, axis=-1)[:, :-1] ** 0.25                        # band magnitude^½
    # o[t] = Σ_b max(0, B[t, b] − B[t−1, b])
    return np.maximum(0.0, np.diff(B, axis=0)).sum(1), sr / ONSET_HOP


def onset_envelope(audio, sr):
    """The flux relative to its 1-s running mean (so loud and quiet passages count alike), smoothed over ±2 frames."""
    o, fps = spectral_flux(audio, sr)
    if len(o) < 2 * fps:
        raise ValueError(f"onset_envelope: {len(o) / fps:.2f} s of audio; need at least 2 s")
    n = int(fps)
    mean = np.convolve(o, np.ones(n) / n, mode="same")
    # o'[t] = max(0, o[t]/ō[t] − 1),  ō = the 1-s running mean of o
    o = np.maximum(0.0, o / np.maximum(mean, 1e-9 * o.max() + 1e-30) - 1)
    k = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)                              # Gaussian, σ = 2 frames
    return np.convolve(o, k / k.sum(), mode="same"), fps


# -----------------------------------------------------------------------------------------------------------------
# 2. tempo

def _autocorr(o):
    # r[ℓ] = Σ_t o[t]·o[t+ℓ] / (T − ℓ)   (unbiased: long lags are not penalised for their shorter overlap)
    T = len(o)
    f = np.fft.rfft(o, 2 * T)
    return np.fft.irfft(f * np.conj(f))[:T] / (T - np.arange(T))


def _comb(r, lags):
    # S(ℓ) = mean over k = 1..4 with k·ℓ ≤ T/2 of r(k·ℓ)   (r linearly interpolated between integer lags)
    kl = np.arange(1, 5)[:, None] * lags[None]
    valid = kl <= len(r) / 2
    return (np.interp(kl, np.arange(len(r)), r) * valid).sum(0) / np.maximum(valid.sum(0), 1)


def _pulse(o, period, phases):
    # g(φ) = median over k of o[φ + k·period]: the onset strength that falls at phase φ of (nearly) every period
    n = max(1, int((len(o) - 1 - max(phases)) / period) + 1)
    idx = np.rint(np.asarray(phases, dtype=np.float64)[:, None] + period * np.arange(n)[None]).astype(np.int64)
    return np.median(o[np.minimum(idx, len(o) - 1)], 1)


def _salience(o, period):
    """The onset strength halfway between the pulses of `period` over that of the pulses (both as _pulse medians),
    at the phase where the pulses are strongest: ~1 when the half-period is a pulse too, ~0 when nothing is there."""
    g = _pulse(o, period, np.arange(int(period)))
    phi = int(np.argmax(g))
    return float(_pulse(o, period, [phi + period / 2])[0] / max(g[phi], 1e-12))


def tempo(audio, sr):
    """Beat tempo in BPM within TEMPO_RANGE (nan for audio without onsets). An autocorrelation comb finds the pulse
    train; of it, its half and its double, the beat is the level whose every other pulse is strong (_salience(2ℓ)
    high: not half-notes over beats) but whose off-beats are weak (_salience(ℓ) low: not a subdivision)."""
    o, fps = onset_envelope(audio, sr)
    if not o.any():
        return float("nan")
    bpms = np.arange(TEMPO_RANGE[0], TEMPO_RANGE[1] + 0.05, 0.1)
    S = _comb(_autocorr(o), 60 * fps / bpms)
    b0 = bpms[np.argmax(S)]
    levels = [b for b in (b0 / 2, b0, 2 * b0) if TEMPO_RANGE[0] <= b <= TEMPO_RANGE[1]]
    beat = max(levels, key=lambda b: _salience(o, 120 * fps / b) - _salience(o, 60 * fps / b))
    near = np.abs(bpms / beat - 1) <= 0.03                                       # refine on the comb within ±3 %
    return float(bpms[near][np.argmax(S[near])])


# -----------------------------------------------------------------------------------------------------------------
# 3. energy, onsets, spectrum

def energy_entropy(x, frame=2048):
    """Normalised temporal-energy entropy Ĥ in [0, 1]: 0 when all the energy is in one frame, 1 when it is spread
    evenly. x is audio [channels, N] cut into frames of `frame` samples, or latents [C, T] with frame=1. It is the
    barrier's own quantity, computed by barrier.py's functions (energy per frame, softmax at τ = 1, entropy)."""
    x = torch.from_numpy(as_array(x))
    C, N = x.shape
    T = N // frame
    if T < 2:
        raise ValueError(f"energy_entropy: {N} samples make {T} frames of {frame}; need 2 (frame=1 for latents)")
    v = x[:, :T * frame].reshape(C, T, frame).transpose(1, 2).reshape(1, C * frame, T)  # (1, C·frame, T)
    mask = torch.ones(1, T, dtype=torch.bool)
    p = barrier.temporal_distribution(barrier.frame_energy(v), mask, 1.0)
    return float(barrier.normalized_entropy(p, mask))


def onset_contrast(audio, sr):
    """How peaky the onset envelope is: the coefficient of variation std(o)/mean(o) of the spectral flux o (see
    spectral_flux). Under 1 for steady sounds and noise (a sine 0.6, white noise 0.3), ~1-4.5 for the synthetic
    clips, 5.6 for a click train at 90 BPM; 0 for silence."""
    o, _ = spectral_flux(audio, sr)
    return float(o.std() / o.mean()) if o.mean() > 0 else 0.0


def kind_of(audio, sr):
    """'structured' (clear onsets) or 'diffuse' (drones, swells), synth.py's two kinds: onset contrast at or above
    KIND_CONTRAST is structured. Proven on labelled clips by `python eval.py kinds`."""
    return "structured" if onset_contrast(audio, sr) >= KIND_CONTRAST else "diffuse"


def onsets(audio, sr, threshold=0.5):
    """Onset times in seconds: the peaks of the onset envelope that are the largest within ±35 ms and above
    `threshold` (the flux 1.5× its 1-s running mean)."""
    o, fps = onset_envelope(audio, sr)
    w = int(round(0.035 * fps))
    padded = np.pad(o, w, constant_values=-1.0)
    local_max = np.lib.stride_tricks.sliding_window_view(padded, 2 * w + 1).max(-1)
    # flux frame t compares the windows starting at t and t + 1 hops: time it by the later window's centre
    return (np.flatnonzero((o >= local_max) & (o > threshold)) + 1) / fps + 1024 / sr


def onset_f1(ref_times, est_times, tolerance=0.05):
    """F1 of estimated against reference onsets, each reference matched to at most one estimate within ±tolerance
    s (greedy in time order): F1 = 2·hits/(|ref| + |est|); 1 when both are empty."""
    ref, est = sorted(ref_times), list(sorted(est_times))
    if not ref and not est:
        return 1.0
    hits, j = 0, 0
    for r in ref:
        while j < len(est) and est[j] < r - tolerance:
            j += 1
        if j < len(est) and est[j] <= r + tolerance:
            hits, j = hits + 1, j + 1
    return 2 * hits / (len(ref) + len(est))


def stereo_correlation(audio):
    """corr(L, R) = Σ L·R / √(Σ L² · Σ R²): 1 for mono, 0 for unrelated channels, −1 for L = −R."""
    x = as_audio(audio)
    if x.shape[0] != 2:
        raise ValueError(f"stereo_correlation: audio has {x.shape[0]} channel(s); expected 2")
    return float((x[0] * x[1]).sum() / max(np.sqrt((x[0] ** 2).sum() * (x[1] ** 2).sum()), 1e-30))


def frame_flutter(audio, sr, period):
    """How much a decoder stamps its frame rate onto the audio: the spectral flux's autocorrelation at the lag of
    one latent frame (`period` samples) over its mean at the three lags on either side. ~1 for music (no special
    lag), > 1.1 when something recurs every frame."""
    o, fps = spectral_flux(audio, sr)
    r = _autocorr(o)
    lag = int(round(period * fps / sr))
    near = np.r_[r[lag - 3:lag], r[lag + 1:lag + 4]]
    return float(r[lag] / max(np.abs(near).mean(), 1e-30))


def spectral_centroid(audio, sr):
    """Energy-weighted mean frequency of the whole clip, in Hz (all channels and frames pooled)."""
    P = stft_power(as_audio(audio), 2048, 512).sum((0, 1))                        # power per bin
    f = np.arange(len(P)) * sr / 2048
    # c = Σ_f f·P(f) / Σ_f P(f)
    return float((f * P).sum() / max(P.sum(), 1e-30))


def register_of(centroid):
    """'low', 'mid' or 'high' for a spectral centroid in Hz (edges: REGISTER_EDGES)."""
    return "low" if centroid < REGISTER_EDGES[0] else "mid" if centroid < REGISTER_EDGES[1] else "high"


def loudness_db(audio, sr, window=0.5):
    """Loudness per window of `window` s: 10·log10(mean over channels and samples of x²), in dBFS."""
    x = as_audio(audio)
    n = max(1, int(window * sr))
    T = x.shape[-1] // n
    return 10 * np.log10((x[:, :T * n] ** 2).reshape(x.shape[0], T, n).mean((0, 2)) + 1e-12)


def form(audio, sr):
    """The arc of a piece from its loudness (0.5 s windows): where its loudest stretch is (the centre of the loudest
    window of 20 s, or a quarter of the piece if shorter, as a fraction of the length), how far its last 10 % lies
    below that stretch (dB), and its longest silent gap (s under −60 dBFS) before the last 10 %."""
    db = loudness_db(audio, sr)
    T = len(db)
    w = max(1, min(40, T // 4))
    power = np.convolve(10 ** (db / 10), np.ones(w) / w, mode="valid")       # mean power of each w-window stretch
    loudest = int(np.argmax(power))
    tail = max(1, T // 10)
    quiet, gap, longest = db[:T - tail] < -60, 0, 0
    for q in quiet:
        gap = gap + 1 if q else 0
        longest = max(longest, gap)
    return {"loudest_at": (loudest + w / 2) / T,
            "ending_drop_db": float(10 * np.log10(power[loudest]) - 10 * np.log10(np.mean(10 ** (db[-tail:] / 10)))),
            "silent_gap_s": longest * 0.5}


def reconstruction_metrics(ref, out, sr):
    """How close `out` is to `ref` (same shape): {'snr_db': SNR, 'log_stft': multi-resolution log-STFT distance}.
    The STFTs use windows of 11.6, 23.2 and 46.4 ms (512, 1024, 2048 samples at 44.1 kHz), hop = window/4."""
    ref, out = as_audio(ref), as_audio(out)
    if ref.shape != out.shape:
        raise ValueError(f"reconstruction_metrics: out has shape {out.shape}, expected the shape of ref {ref.shape}")
    # SNR = 10·log10(Σ ref² / Σ (ref − out)²)   (+1e-20 on both: identical signals give a huge finite SNR)
    snr = 10 * np.log10(((ref ** 2).sum() + 1e-20) / (((ref - out) ** 2).sum() + 1e-20))
    dist = []
    for n in (512, 1024, 2048):
        n = int(round(n * sr / 44100))
        # D_n = mean over (c, t, f) of |ln(|X_out| + 1e-5) − ln(|X_ref| + 1e-5)|
        A, B = np.sqrt(stft_power(ref, n, n // 4)), np.sqrt(stft_power(out, n, n // 4))
        dist.append(np.abs(np.log(B + 1e-5) - np.log(A + 1e-5)).mean())
    return {"snr_db": float(snr), "log_stft": float(np.mean(dist))}


# -----------------------------------------------------------------------------------------------------------------
# 4. proof on the synthetic set

def prove_estimators(clips, seed, seconds):
    """Tempo and register estimated on synthetic clips against their labels; prints a markdown table."""
    print(f"measuring tempo and register on {clips} synthetic clips of {seconds:g} s (seed {seed})")
    rel, hits, cents = [], 0, {r: [] for r in synth.REGISTERS}
    start = time.time()
    for i in tqdm(range(clips), desc="clips"):
        audio, _, lab = synth.clip(i, seed, seconds)
        rel.append(abs(tempo(audio, synth.SR) / lab["bpm"] - 1))
        c = spectral_centroid(audio, synth.SR)
        cents[lab["register"]].append(c)
        hits += register_of(c) == lab["register"]
    rel = np.array(rel)
    print(f"\n| {clips} synthetic clips of {seconds:g} s, seed {seed} | |\n|---|---|")
    print(f"| tempo within 2 % | {100 * (rel <= 0.02).mean():.1f} % |")
    print(f"| tempo within 5 % | {100 * (rel <= 0.05).mean():.1f} % |")
    print(f"| median relative tempo error | {100 * np.median(rel):.3f} % |")
    print(f"| register accuracy | {100 * hits / clips:.1f} % |")
    for r, c in cents.items():
        if c:
            print(f"| centroid, {r} (min / median / max) | {min(c):.0f} / {np.median(c):.0f} / {max(c):.0f} Hz |")
    print(f"\n{clips} clips generated and measured in {time.time() - start:.1f} s")


def prove_kinds(clips, seed, seconds):
    """kind_of against the labels of synthetic clips of both kinds (synth.py --kinds); prints a markdown table and
    returns the share it gets right."""
    print(f"classifying {clips} synthetic clips of {seconds} s (seed {seed}, kinds {', '.join(synth.KINDS)})")
    right, contrast = 0, {k: [] for k in synth.KINDS}
    for i in tqdm(range(clips), desc="clips"):
        audio, _, lab = synth.clip(i, seed, seconds, synth.KINDS)
        contrast[lab["kind"]].append(lab["onset_contrast"])
        right += kind_of(audio, synth.SR) == lab["kind"]
    print(f"\n| {clips} synthetic clips of {seconds} s, seed {seed} | |\n|---|---|")
    print(f"| kind right (onset contrast ≥ {KIND_CONTRAST:g}: structured) | {100 * right / clips:.1f} % |")
    for k, c in contrast.items():
        if c:
            print(f"| onset contrast, {k} (min / median / max) | {min(c):.2f} / {np.median(c):.2f} / {max(c):.2f} |")
    return right / clips


# -----------------------------------------------------------------------------------------------------------------
# 5. the barrier's weights in a training run (train.py's per-item log)

def read_run(run, data=None):
    """A train.py run folder -> (log lines, its config, labels {file: the synthetic label beside it, or {}}). The
    data folder is `data`, else the one in the run's latest checkpoint config."""
    run = Path(run)
    if not (run / "log.jsonl").is_file():
        raise ValueError(f"{run}: no log.jsonl (expected a train.py run folder)")
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text(encoding="utf-8").splitlines() if line]
    sidecars = sorted(run.glob("ckpt-*.json"))
    config = json.loads(sidecars[-1].read_text())["config"] if sidecars else {}
    if not any("items" in r for r in lines):
        raise ValueError(f"{run}/log.jsonl: no per-item entries (written by train.py since issue 17)")
    folder = Path(data or config.get("data", "."))
    labels = {}
    for r in lines:
        for item in r.get("items", []):
            f = item["file"]
            if f not in labels:
                path = (folder / f).with_suffix(".json")
                labels[f] = json.loads(path.read_text()) if path.is_file() else {}
    return lines, config, labels


def pearson(a, b):
    """Pearson's r, nan when either side is constant or has fewer than 3 values."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def barrier_stats(lines, labels, t_bins=4):
    """Per kind (and all items): count, mean Ĥ and w, its share of the total loss weight Σw (and of the items), mean
    w per t-bin, in the first and last quarter of the steps, and the correlation of w with each item's own onset
    contrast (from its label). Items without generated frames (w null) are left out. Returns {column: {row: value}}."""
    kind_name = lambda item: "unlabelled" if item["kind"] is None else str(item["kind"])
    rows = [(r["step"], item, labels.get(item["file"], {})) for r in lines for item in r.get("items", [])
            if item["w"] is not None]
    if not rows:
        raise ValueError("log.jsonl: no item with a weight")
    steps = sorted({s for s, _, _ in rows})
    q = max(1, len(steps) // 4)
    first, last = set(steps[:q]), set(steps[-q:])
    total = sum(item["w"] for _, item, _ in rows)
    order = list(synth.KINDS)
    kinds = sorted({kind_name(item) for _, item, _ in rows}, key=lambda k: (order.index(k) if k in order else 9, k))
    out = {}
    for kind in kinds + ["all"]:
        mine = [(s, item, lab) for s, item, lab in rows if kind == "all" or kind_name(item) == kind]
        w = np.array([item["w"] for _, item, _ in mine])
        col = {"items": len(mine), "mean Ĥ": float(np.mean([item["H"] for _, item, _ in mine])),
               "mean w": float(w.mean()), "share of Σw": float(w.sum() / total),
               "share of items": len(mine) / len(rows)}
        for b in range(t_bins):
            lo, hi = b / t_bins, (b + 1) / t_bins
            sel = [item["w"] for _, item, _ in mine if lo <= item["t"] < hi or (b == t_bins - 1 and item["t"] == 1)]
            col[f"mean w, t in [{lo:g}, {hi:g})"] = float(np.mean(sel)) if sel else float("nan")
        for name, part in (("first", first), ("last", last)):
            sel = [item["w"] for s, item, _ in mine if s in part]
            col[f"mean w, {name} quarter of steps"] = float(np.mean(sel)) if sel else float("nan")
        pairs = [(item["w"], lab["onset_contrast"]) for _, item, lab in mine if "onset_contrast" in lab]
        col["corr(w, onset contrast)"] = pearson(*zip(*pairs)) if pairs else float("nan")
        out[kind] = col
    return out


def print_barrier_stats(run, stats, config, steps):
    kinds = list(stats)
    how = f"λ {config['lam']:g}, τ {config['tau']:g}, lr {config['lr']:g}" if config else "config not found"
    print(f"\n| {run}: {steps} steps, {how} | " + " | ".join(kinds) + " |\n" + "|---" * (len(kinds) + 1) + "|")
    for row in stats["all"]:
        cells = []
        for k in kinds:
            v = stats[k][row]
            cells.append(f"{v}" if row == "items" else f"{100 * v:.1f} %" if row.startswith("share") else
                         "n/a" if not np.isfinite(v) else f"{v:.3f}")
        print(f"| {row} | " + " | ".join(cells) + " |")


# -----------------------------------------------------------------------------------------------------------------
# 6. a model, measured on held-out prompts and clips

def folded_error(bpm, label):
    """Tempo error up to an octave: min over k ∈ {−1, 0, 1} of |bpm·2^k/label − 1| (half or double time counts)."""
    return min(abs(bpm * 2.0 ** k / label - 1) for k in (-1, 0, 1))


def spearman(a, b):
    """Rank correlation: Pearson's r of the ranks (no ties expected)."""
    ra, rb = (np.argsort(np.argsort(v)).astype(np.float64) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def measure(audio, sr, period):
    """Every measurement of one stereo clip; `period` is the model's samples per latent frame (for flutter)."""
    return {"tempo": tempo(audio, sr), "centroid": spectral_centroid(audio, sr), "entropy": energy_entropy(audio),
            "onset_contrast": onset_contrast(audio, sr), "stereo": stereo_correlation(audio),
            "flutter": frame_flutter(audio, sr, period), "peak": float(np.abs(as_audio(audio)).max()),
            **form(audio, sr)}


def training_reference(seed, seconds, n=30):
    """The same measurements on the first n training clips (not held out) of the set: what the outputs should
    resemble."""
    clips = [synth.clip(i, seed, seconds)[0] for i in [i for i in range(2 * n) if not synth.is_eval(i)][:n]]
    return {"onset_contrast": float(np.median([onset_contrast(x, synth.SR) for x in clips])),
            "stereo": float(np.median([stereo_correlation(x) for x in clips])),
            "entropy": float(np.median([energy_entropy(x) for x in clips]))}


def evaluate_model(model, prompts, seed, **sampling):
    """Generate one clip per held-out prompt [(caption, labels)], as long as the label says, and measure it against
    the prompt's labels. Returns the per-prompt rows and a summary dict."""
    rows = []
    period = model.pretransform.model.downsampling_ratio
    for i, (caption, lab) in enumerate(tqdm(prompts, desc="prompts")):
        if sampling.get("steps") == 0:  # the baseline: the initial noise decoded, what no sampling step makes
            z = torch.randn(1, model.latent_dim, sample.latent_length(model, lab["seconds"]),
                            generator=torch.Generator().manual_seed(seed + i))
            audio = model.decode(z, decode_noise=False)[0, :, :int(lab["seconds"] * model.sample_rate)].clamp(-1, 1)
        else:
            audio = sample.generate(model, caption, lab["seconds"], seed=seed + i, **sampling)[0]
        m = measure(audio, model.sample_rate, period)
        bpm = m["tempo"] if np.isfinite(m["tempo"]) else 0.0  # no onsets at all counts as a miss
        rows.append({**m, "bpm": lab["bpm"], "rel_error": abs(bpm / lab["bpm"] - 1),
                     "folded_error": folded_error(bpm, lab["bpm"]) if bpm else 1.0, "form": lab["form"],
                     "register_ok": register_of(m["centroid"]) == lab["register"]})
    col = lambda k, form=None: np.array([r[k] for r in rows if form in (None, r["form"])], dtype=np.float64)
    summary = {"prompts": len(rows), "median_tempo_error": float(np.median(col("rel_error"))),
               "median_folded_error": float(np.median(col("folded_error"))),
               "within_5": float((col("rel_error") <= 0.05).mean()),
               "folded_within_8": float((col("folded_error") <= 0.08).mean()),
               "tempo_spearman": spearman(col("bpm"), col("tempo")),
               "register_accuracy": float(col("register_ok").mean()),
               "onset_contrast": float(np.median(col("onset_contrast"))), "entropy": float(np.mean(col("entropy"))),
               "stereo_min": float(col("stereo").min()), "stereo": float(np.median(col("stereo"))),
               "flutter_max": float(col("flutter").max()), "silent_gap_max": float(col("silent_gap_s").max()),
               "peak": float(col("peak").max())}
    if len(col("ending_drop_db", "peaceful")):
        summary["peaceful_drop_db"] = float(np.median(col("ending_drop_db", "peaceful")))
        summary["peaceful_ok"] = float((col("ending_drop_db", "peaceful") >= 6).mean())
    if len(col("loudest_at", "climax")):
        summary["climax_ok"] = float(((col("loudest_at", "climax") >= 0.2) & (col("loudest_at", "climax") <= 0.8))
                                     .mean())
    return rows, summary


def evaluate_autoencoder(model, clips, seed, seconds):
    """Encode and decode held-out synthetic clips (every tenth index, never trained on): onsets kept (F1 at ±50 ms),
    tempo kept within 2 %, left/right correlation against the source's, frame-rate flutter, SNR and log-STFT
    distance. Returns the per-clip rows."""
    out = []
    period = model.pretransform.model.downsampling_ratio
    for i in tqdm(synth.held_out(clips), desc="clips"):
        audio, _, lab = synth.clip(i, seed, seconds)
        x = torch.from_numpy(np.round(audio * 32767) / 32767).float()[None]  # as the WAV files hold it
        with torch.inference_mode():
            y = model.decode(model.encode(x), decode_noise=False)[0, :, :x.shape[-1]]
        x = x[0]
        bpm = tempo(y, model.sample_rate)
        out.append({**reconstruction_metrics(x, y, model.sample_rate),
                    "onset_f1": onset_f1(onsets(x, model.sample_rate), onsets(y, model.sample_rate)),
                    "tempo_ok": abs(bpm / lab["bpm"] - 1) <= 0.02,
                    "stereo_gap": abs(stereo_correlation(y) - stereo_correlation(x)),
                    "flutter": frame_flutter(y, model.sample_rate, period),
                    "flutter_source": frame_flutter(x, model.sample_rate, period)})
    return out


@torch.no_grad()
def caption_use(model, clips, seed, seconds, ts=(0.3, 0.6, 0.8, 0.9, 0.97)):
    """Which parts of the caption the DiT reads: its rectified-flow loss on held-out clips (each with 6 s of silence
    after it, as in training) given (a) the clip's own caption, (b) that caption with the tempo moved by 40 BPM and
    (c) another clip's caption, at the same noise and t for all three. loss(b)/loss(a) = 1 means the tempo is not
    read. Returns {t: (loss a, loss b, loss c)}."""
    x0, captions, moved = [], [], []
    for i in tqdm(synth.held_out(clips), desc="encoding"):
        audio, caption, lab = synth.clip(i, seed, seconds)
        x = torch.from_numpy(audio).float()[None]
        x0.append(model.encode(torch.nn.functional.pad(x, (0, 6 * model.sample_rate)))[0])
        b = lab["bpm"]
        captions.append(caption)
        moved.append(caption.replace(f"{b} BPM", f"{b + 40 if b < 110 else b - 40} BPM"))
    x0 = torch.stack(x0)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    conds = [model.conditioning(c, [seconds] * len(c)) for c in (captions, moved, captions[1:] + captions[:1])]
    out = {}
    for t in ts:
        x_t = (1 - t) * x0 + t * noise                   # as in train.py: x_t = (1 − t)·x0 + t·ε, target ε − x0
        out[t] = tuple(float((model.velocity(x_t, torch.full((len(x0),), t), c) - (noise - x0)).square().mean())
                       for c in conds)
    return out


def seconds_arg(text):
    """'30' -> 30.0; '30:60' -> (30.0, 60.0): each clip's or prompt's length drawn from that range."""
    v = [float(x) for x in text.split(":")]
    return v[0] if len(v) == 1 else tuple(v)


def print_autoencoder(name, rows, seconds):
    col = lambda k: np.array([r[k] for r in rows], dtype=np.float64)
    print(f"\n| {name}: autoencoder round trip of {len(rows)} held-out clips ({seconds} s) | |\n|---|---|")
    print(f"| onset F1 at ±50 ms: mean / min / share ≥ 0.9 | {col('onset_f1').mean():.3f} / "
          f"{col('onset_f1').min():.3f} / {100 * (col('onset_f1') >= 0.9).mean():.0f} % |")
    print(f"| tempo kept within 2 % | {100 * col('tempo_ok').mean():.0f} % |")
    print(f"| left/right correlation, gap to the source's: mean / max | {col('stereo_gap').mean():.3f} / "
          f"{col('stereo_gap').max():.3f} |")
    print(f"| frame-rate flutter: max (source's max) | {col('flutter').max():.2f} ({col('flutter_source').max():.2f}) |")
    print(f"| SNR / log-STFT distance (mean) | {col('snr_db').mean():.1f} dB / {col('log_stft').mean():.2f} |")


def print_model(name, s, reference, sampling):
    print(f"\n| {name}: {s['prompts']} held-out prompts, {sampling} | generated | training clips |\n|---|---|---|")
    print(f"| tempo: median error / octave-folded / folded within 8 % | {100 * s['median_tempo_error']:.1f} % / "
          f"{100 * s['median_folded_error']:.1f} % / {100 * s['folded_within_8']:.0f} % | |")
    print(f"| tempo: rank correlation with the prompt's BPM | {s['tempo_spearman']:.2f} | |")
    print(f"| register accuracy | {100 * s['register_accuracy']:.0f} % | |")
    print(f"| onset contrast (median) | {s['onset_contrast']:.2f} (×{s['onset_contrast'] / reference['onset_contrast']:.2f})"
          f" | {reference['onset_contrast']:.2f} |")
    print(f"| left/right correlation: median / min | {s['stereo']:.2f} / {s['stereo_min']:.2f} | "
          f"{reference['stereo']:.2f} |")
    print(f"| temporal-energy entropy (mean) | {s['entropy']:.3f} | {reference['entropy']:.3f} |")
    print(f"| frame-rate flutter (max) | {s['flutter_max']:.2f} | |")
    if "peaceful_ok" in s:
        print(f"| 'peaceful ending': last 10 % below the loudest 20 s (median; share ≥ 6 dB) | "
              f"{s['peaceful_drop_db']:.1f} dB; {100 * s['peaceful_ok']:.0f} % | |")
    if "climax_ok" in s:
        print(f"| 'building to a climax': loudest stretch in the middle 60 % | {100 * s['climax_ok']:.0f} % | |")
    print(f"| longest silent gap (max) / peak level (max) | {s['silent_gap_max']:.1f} s / {s['peak']:.2f} | |")


def main():
    p = argparse.ArgumentParser(description="Measurements on audio.")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("estimators", help="prove tempo and register estimation on synthetic clips")
    e.add_argument("--clips", type=int, default=200)
    e.add_argument("--seed", type=int, default=1)
    e.add_argument("--seconds", type=float, default=10.0)
    a = sub.add_parser("autoencoder", help="the autoencoder's round trip of held-out clips")
    a.add_argument("--model", default=str(TINY_MODEL))
    a.add_argument("--clips", type=int, default=30)
    a.add_argument("--seed", type=int, default=0, help="the synthetic set's seed (held-out clips of its stream)")
    a.add_argument("--seconds", type=seconds_arg, default=30.0, help="S or SHORTEST:LONGEST")
    m = sub.add_parser("model", help="generate from held-out prompts and measure them against their labels")
    m.add_argument("--model", default=str(TINY_MODEL))
    m.add_argument("--adapter", action="append", default=[])
    m.add_argument("--prompts", type=int, default=30)
    m.add_argument("--seed", type=int, default=0, help="the synthetic set's seed (prompts from its held-out stream)")
    m.add_argument("--seconds", type=seconds_arg, default=(30.0, 60.0), help="S or SHORTEST:LONGEST per prompt")
    m.add_argument("--steps", type=int, help="0: the decoded initial noise, as a baseline")
    m.add_argument("--cfg", type=float)
    m.add_argument("--sampler")
    m.add_argument("--json", help="also write the summary here")
    k = sub.add_parser("kinds", help="prove the structured/diffuse classifier on labelled synthetic clips")
    k.add_argument("--clips", type=int, default=40)
    k.add_argument("--seed", type=int, default=1)
    k.add_argument("--seconds", type=seconds_arg, default=4.0, help="S or SHORTEST:LONGEST")
    b = sub.add_parser("barrier-stats", help="the barrier's per-item weights in a train.py run, by kind and t")
    b.add_argument("run", help="the run folder (its log.jsonl)")
    b.add_argument("--data", help="the data folder with the clips' labels (default: the run's --data)")
    c = sub.add_parser("captions", help="the DiT's loss with the caption's tempo moved, or another caption")
    c.add_argument("--model", default=str(TINY_MODEL))
    c.add_argument("--clips", type=int, default=48)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    if args.command == "estimators":
        prove_estimators(args.clips, args.seed, args.seconds)
        return
    if args.command == "kinds":
        prove_kinds(args.clips, args.seed, args.seconds)
        return
    if args.command == "barrier-stats":
        lines, config, labels = read_run(args.run, args.data)
        print_barrier_stats(args.run, barrier_stats(lines, labels), config, len(lines))
        return
    torch.set_flush_denormal(True)  # on CPU, denormal floats (decaying tails) cost ~100× a normal multiply
    model = StableAudioModel.from_pretrained(args.model)
    start = time.time()
    if args.command == "captions":
        print(f"\n| {args.model}: {args.clips} held-out clips, loss at t | own caption | tempo moved 40 BPM | "
              f"another clip's caption |\n|---|---|---|---|")
        for t, (own, moved, other) in caption_use(model, args.clips, args.seed, args.seconds).items():
            print(f"| {t:g} | {own:.4f} | {moved:.4f} (×{moved / own:.3f}) | {other:.4f} (×{other / own:.3f}) |")
    elif args.command == "autoencoder":
        print_autoencoder(args.model, evaluate_autoencoder(model, args.clips, args.seed, args.seconds), args.seconds)
    else:
        sample.load_adapters(model, args.adapter, [])
        reference = training_reference(args.seed, args.seconds)
        _, s = evaluate_model(model, synth.prompts(args.prompts, args.seed, args.seconds), seed=1000,
                              steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler)
        name = args.model + (" + " + ", ".join(args.adapter) if args.adapter else "")
        if args.steps == 0:
            how = "no sampling (the initial noise decoded)"
        else:
            steps, cfg, sampler = sample.resolve_defaults(model, args.steps, args.cfg, args.sampler)
            how = f"{sampler} {steps} steps, cfg {cfg:g}"
        print_model(name, s, reference, f"{args.seconds} s, {how}")
        if args.json:
            Path(args.json).write_text(json.dumps({**s, "training_clips": reference}, indent=1))
    print(f"\nmeasured in {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
