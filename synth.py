"""
Synthetic music set: procedurally composed stereo 44.1 kHz clips with literary captions and exact labels.

Real Stable Audio 3 weights can't be downloaded offline, so the tiny embedded model is trained on this set, and
prompt-following (tempo, register) is measured against its labels by eval.py. Clip i is a pure function of
(seed, i): a numpy Generator seeded with [seed, 0, i] draws the labels, the caption and the score in that order,
so clip i is the same whatever the number of clips. Held-out prompts come from the disjoint stream [seed, 1, i].

What varies: tempo (60-160 BPM, integer), meter (3/4, 4/4, 5/4), instruments, register (low/mid/high: disjoint
MIDI ranges, so the spectral centroid tells them apart), key and mode, scene and mood (caption only) and stereo
placement, and the form. Every piece has sections (FORMS) that change instrumentation, density and loudness and
bring its motif back (intro, A, B, A'), at one constant tempo, and ends as its caption says: a peaceful fade, a
climax in the middle and a calm close, or a sudden stop. The labels hold the form and every section's bounds and
loudness. Notes sit on the beat grid: every beat has an onset, downbeats are accented, off-beat eighths are
quieter and fall after fewer than half the beats, so the labelled tempo is recoverable from the audio.

With --kinds structured,diffuse (issue 17's two populations, for the barrier study) clip i is of the (i mod 2)-th
kind: "structured" (the pieces above without the sustained voices) or "diffuse" (drones and overlapping pad and
string chords that swell in and out, the form's loudness as one smooth curve: no onsets), captioned from the same
vocabulary; the label adds the kind and the clip's own onset contrast and energy entropy (eval.py's functions).

Usage:  python synth.py DIR --clips N --seconds S --seed K        (--seconds 30:90: each piece 30-90 s long)
        python synth.py DIR --clips 24 --seconds 4 --kinds structured,diffuse --seed 5
writes the MusicCaps layout: DIR/musiccaps-public.csv, DIR/{ytid}.wav (PCM_16 stereo) and DIR/{ytid}.json labels.
"""
import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import soundfile
from tqdm import tqdm

SR = 44100

# -----------------------------------------------------------------------------------------------------------------
# 1. vocabulary

METERS = {"3/4": [1.0, 0.7, 0.7], "4/4": [1.0, 0.7, 0.85, 0.7], "5/4": [1.0, 0.7, 0.7, 0.85, 0.7]}  # beat accents
KEYS = ["C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B"]
MODES = {  # semitones above the tonic; the first three are bright, the last three dark
    "major": [0, 2, 4, 5, 7, 9, 11], "lydian": [0, 2, 4, 6, 7, 9, 11], "mixolydian": [0, 2, 4, 5, 7, 9, 10],
    "minor": [0, 2, 3, 5, 7, 8, 10], "dorian": [0, 2, 3, 5, 7, 9, 10], "phrygian": [0, 1, 3, 5, 7, 8, 10],
}
BRIGHT_MODES = ("major", "lydian", "mixolydian")
# MIDI ranges with an octave-wide gap between them, so the spectral centroid separates the registers
REGISTERS = {"low": (36, 52), "mid": (58, 73), "high": (81, 96)}
REGISTER_WORDS = {
    "low": ["low, deep", "deep and low", "dark, low register", "low, earthy"],
    "mid": ["warm middle register", "mid-range, warm", "middle register"],
    "high": ["bright, high", "high, sparkling", "bright high register", "high and glittering"],
}
LEADS = {"celesta": "celesta", "music box": "music box", "harp": "harp", "marimba": "marimba",
         "pizzicato": "pizzicato strings"}                     # instrument: caption words; leads play every beat
SECONDS = {"strings": "bowed strings", "pad": "soft pad"}      # sustained second voices, one chord per bar
DRUMS = "soft drums"
SCENES = [
    "a small prince walking through a moonlit castle", "a lighthouse keeper watching the winter sea",
    "children chasing fireflies in a summer meadow", "a paper boat drifting down a rainy gutter",
    "an old clockmaker closing his shop at dusk", "a fox crossing a snowy forest at dawn",
    "a caravan resting under desert stars", "a girl reading by candlelight in a tower",
    "a train rolling through sleeping villages", "a dragon dozing on a pile of gold",
    "a fisherman rowing home through fog", "snow falling on a quiet cathedral square",
    "a carousel turning in an empty fairground", "two friends skating on a frozen lake",
    "a tea house in the mountains after rain", "a knight returning from a long journey",
    "a garden of glass flowers at midnight", "an owl watching over a hollow oak",
    "a ship sailing past icebergs under the northern lights", "a puppet theatre opening its curtain",
    "a bakery waking up before sunrise", "a kite rising over green hills",
    "a sleepy harbour town in autumn", "a wizard sorting stars in his observatory",
    "a whale singing under a silver moon", "a market street on a festival night",
    "a monk ringing bells in a mountain temple", "a balloon floating above patchwork fields",
    "a little robot exploring an abandoned library", "rain on the windows of a wooden cabin",
]
MOODS = {
    "bright": ["gentle lullaby", "playful", "hopeful", "joyful dance", "dreamy", "tender", "carefree",
               "whimsical", "serene", "triumphant"],
    "dark": ["melancholic", "mysterious", "wistful", "solemn procession", "haunting", "brooding",
             "bittersweet", "lonely", "eerie", "nostalgic"],
}
# the form's ending, and the words a caption uses for its arc
FORM_WORDS = {
    "peaceful": ["peaceful ending", "quiet intro, swelling middle, peaceful ending",
                 "slowly rising, then fading to rest", "gentle start, a warm climax, fading away"],
    "climax": ["building to a climax", "building to a climax in the middle, then settling",
               "rising to a bright climax, then a calm close"],
    "sudden": ["sudden end", "growing steadily, then a sudden end", "building all the way to an abrupt ending"],
}
METER_WORDS = {"3/4": ["in 3/4", "waltz time, 3/4"], "4/4": ["in 4/4", "steady 4/4"],
               "5/4": ["in 5/4", "odd 5/4 meter"]}
# The form: sections as (name, start as a fraction of the piece, loudness, an off-beat eighth after every n-th beat
# (0: none), the lead's material, the voices that play). "A" is the piece's motif, "B" a contrasting one, "A'" the
# motif back a third higher (ABA'). Every beat keeps an onset in every section, so the tempo is always audible.
FORMS = {
    "peaceful": [("intro", 0.0, 0.35, 0, "A", "lead"), ("A", 0.12, 0.6, 4, "A", "lead second"),
                 ("B", 0.35, 0.75, 4, "B", "lead second"), ("A'", 0.55, 1.0, 2, "A'", "lead second drums"),
                 ("ending", 0.8, 0.5, 0, "A", "lead second")],                # the ending fades out (see gain_at)
    "climax": [("intro", 0.0, 0.3, 0, "A", "lead"), ("A", 0.1, 0.5, 4, "A", "lead second"),
               ("B", 0.3, 0.7, 3, "B", "lead second drums"), ("A'", 0.5, 1.0, 2, "A'", "lead second drums"),
               ("outro", 0.72, 0.5, 0, "A", "lead second")],
    "sudden": [("intro", 0.0, 0.4, 0, "A", "lead"), ("A", 0.1, 0.65, 4, "A", "lead second"),
               ("B", 0.35, 0.8, 3, "B", "lead second drums"), ("A'", 0.6, 1.0, 2, "A'", "lead second drums")],
}
FADE_DB = 26.0  # a peaceful ending falls this far over its section: g(f) = g₀·10^(−26·f/20), f ∈ [0, 1]
# --kinds: two populations for the barrier study (issue 17), captioned from the same vocabulary. "structured":
# today's plucked/struck pieces without the sustained second voices (clear onsets, sections, loud/soft contrast);
# "diffuse": only the sustained voices, long overlapping chords over a drone, every note swelling in and out over
# SWELL_SECONDS, the loudness following the form as one smooth curve (no onsets, no steps)
KINDS = ("structured", "diffuse")
DIFFUSE_FORMS = ("peaceful", "climax")  # a sudden stop is an event: the diffuse kind has none
SWELL_SECONDS = 1.5


def midi_hz(m):
    # f = 440·2^((m − 69)/12)
    return 440.0 * 2.0 ** ((np.asarray(m, dtype=np.float64) - 69) / 12)


# -----------------------------------------------------------------------------------------------------------------
# 2. instruments: each returns one mono note at unit velocity, float32

def _partials(f0, ratios, amps, taus, n):
    # x(t) = Σ_k a_k·e^{−t/τ_k}·sin(2π·r_k·f0·t)   (partials above 0.45·sr are dropped: no aliasing)
    ratios, amps, taus = (np.asarray(v, dtype=np.float32)[:, None] for v in (ratios, amps, taus))
    t = np.arange(n, dtype=np.float32)[None] / SR
    keep = (ratios[:, 0] * f0 < 0.45 * SR)
    return (amps * np.exp(-t / taus) * np.sin(2 * np.pi * f0 * ratios * t))[keep].sum(0)


def _strike(x, rng):
    # x[t] += 0.3·ν[t]·e^{−t/2 ms},  ν white noise: the mallet's or hammer's contact click (a clear onset)
    n = min(len(x), int(0.01 * SR))
    x[:n] += 0.3 * rng.standard_normal(n).astype(np.float32) * np.exp(-np.arange(n, dtype=np.float32) / (0.002 * SR))
    return x


def bell(f0, rng, box):
    """Celesta or music box: additive, inharmonic partials, fast decay (higher partials faster), a hammer click."""
    ratios = [1.0, 2.76, 5.40, 8.93] if box else [1.0, 2.0, 3.01, 4.2]
    tau = (0.35 if box else 0.6) * (440 / f0) ** 0.2
    x = _partials(f0, ratios, [1.0, 0.4, 0.2, 0.1], [tau, tau / 2, tau / 4, tau / 6], int(4 * tau * SR))
    return _strike(x, rng)


def marimba(f0, rng):
    """Marimba: the bar's modal partials 1, 3.9, 9.2, the upper ones damped fast, a mallet click."""
    tau = 0.45 * (220 / f0) ** 0.3
    return _strike(_partials(f0, [1.0, 3.9, 9.2], [1.0, 0.3, 0.1], [tau, tau / 5, tau / 12], int(4 * tau * SR)), rng)


def karplus_strong(f0, rng, t60, pluck, noise):
    """Plucked string: the string's initial shape (a triangle peaking at `pluck` of its length, plus a little
    noise) recirculating through a delay line of P + ½ samples whose loop gain g rings it down 60 dB in t60 s."""
    P = max(2, int(round(SR / f0 - 0.5)))
    x = np.arange(P) / P
    burst = np.minimum(x / pluck, (1 - x) / (1 - pluck)) + noise * rng.uniform(-1, 1, P)
    g = 10 ** (-3 / (f0 * t60))                                  # g^(f0·t60) = 10^−3
    n = int(min(t60, 1.5) * SR)
    y = np.zeros(n + P + 1)
    y[1:P + 1] = burst - burst.mean()
    for s in range(P + 1, n + 1, P):  # a whole period per step: y[s:s+P] reads only y[s−P−1 : s]
        e = min(s + P, n + 1)
        # y[k] = g·(y[k−P] + y[k−P−1])/2
        y[s:e] = g * 0.5 * (y[s - P:e - P] + y[s - P - 1:e - P - 1])
    return (y[1:n + 1] / np.abs(burst).max()).astype(np.float32)


def _wavetable(f0, amps, n, vibrato=0.0):
    # x(t) = Σ_k a_k·sin(2πk·φ(t)),  φ(t) = f0·(t + d·(1 − cos 2πνt)/(2πν)),  ν = 5.5 Hz   (a one-cycle table)
    table = (np.asarray(amps)[:, None] * np.sin(2 * np.pi * np.outer(np.arange(1, len(amps) + 1),
                                                                     np.arange(2048) / 2048))).sum(0)
    t = np.arange(n) / SR
    phase = f0 * (t + vibrato * (1 - np.cos(2 * np.pi * 5.5 * t)) / (2 * np.pi * 5.5))
    return table[((phase % 1.0) * 2048).astype(np.int64)].astype(np.float32)


def _attack_release(n, attack, release):
    # env(t) = min(t/attack, 1)·min((T − t)/release, 1)
    t = np.arange(n) / SR
    return np.minimum(np.minimum(t / attack, 1.0), np.minimum((n / SR - t) / release, 1.0)).astype(np.float32)


def strings(f0, hold, attack=0.25, release=0.2):
    """Bowed strings: a sawtooth (a_k = 1/k) low-passed at 4·f0, 0.3 % vibrato, slow attack."""
    k = np.arange(1, 13)
    amps = np.where(k * f0 < 0.45 * SR, 1 / k / (1 + (k / 4) ** 2), 0.0)  # a_k = (1/k)/(1 + (k/4)²)
    n = int((hold + release) * SR)
    return _wavetable(f0, amps, n, vibrato=0.003) * _attack_release(n, attack, release)


def pad(f0, hold, attack=0.5, release=0.4):
    """Soft pad: three oscillators detuned by −8, 0, +8 cents, a_k = 1/k², very slow attack."""
    amps = [1.0, 0.25, 0.11, 0.06]
    n = int((hold + release) * SR)
    x = sum(_wavetable(f0 * 2 ** (c / 1200), amps, n) for c in (-8, 0, 8)) / 3
    return x * _attack_release(n, attack, release)


def drum(kind, rng):
    """Soft drums: kick (a 140→50 Hz sine sweep), snare (dark noise + a 190 Hz tone) or hat (a short noise tick)."""
    t = np.arange(int(0.3 * SR)) / SR
    if kind == "kick":
        # f(t) = 50 + 90·e^{−t/0.03}  ->  φ(t) = 50t + 2.7·(1 − e^{−t/0.03})
        x = 0.6 * np.sin(2 * np.pi * (50 * t + 2.7 * (1 - np.exp(-t / 0.03)))) * np.exp(-t / 0.12)
    elif kind == "snare":  # the noise averaged over 8 samples: little energy above 5 kHz
        noise = np.convolve(rng.standard_normal(len(t) + 7), np.ones(8) / 8 ** 0.5, mode="valid")
        x = 0.2 * noise * np.exp(-t / 0.05) + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.05)
    else:
        x = 0.08 * np.diff(rng.standard_normal(len(t) + 1)) * np.exp(-t / 0.015)
    return x.astype(np.float32)


def play(instrument, midi, hold, rng, swell=None):
    """One note of `instrument` at unit velocity; `hold` (s) matters only to the sustained voices, and so does
    `swell`: an attack and release of that many seconds instead of the voice's own (the diffuse kind's)."""
    f0 = float(midi_hz(midi))
    if instrument in ("celesta", "music box"):
        return bell(f0, rng, box=instrument == "music box")
    if instrument == "marimba":
        return marimba(f0, rng)
    if instrument == "harp":
        return karplus_strong(f0, rng, t60=1.5, pluck=0.2, noise=0.05)
    if instrument == "pizzicato":
        return karplus_strong(f0, rng, t60=0.4, pluck=0.4, noise=0.02)
    if instrument == "strings":
        return strings(f0, hold) if swell is None else strings(f0, hold, swell, swell)
    if instrument == "pad":
        return pad(f0, hold) if swell is None else pad(f0, hold, swell, swell)
    raise ValueError(f"unknown instrument {instrument!r}; expected one of {', '.join([*LEADS, *SECONDS])}")


# -----------------------------------------------------------------------------------------------------------------
# 3. composition: labels -> caption, labels -> score -> audio

def draw_labels(rng, seconds, kind=None):
    """Everything a caption can ask for, drawn from rng. seconds: a length, or (shortest, longest) to draw one.
    kind: None (today's set), "structured" (no sustained voices) or "diffuse" (sustained voices only, no drums)."""
    if kind == "diffuse":
        lead = str(rng.choice(list(SECONDS)))
        second = str(rng.choice([*[k for k in SECONDS if k != lead], "none"]))
        instruments = [lead] + ([second] if second != "none" else [])
    else:
        lead = str(rng.choice(list(LEADS)))
        second = str(rng.choice([*(SECONDS if kind is None else []), *[k for k in LEADS if k != lead], "none"]))
        instruments = [lead] + ([second] if second != "none" else []) + (["drums"] if rng.random() < 0.4 else [])
    mode = str(rng.choice(list(MODES)))
    pans = {name: 0.0 if name == "drums" else round(float(rng.uniform(-0.6, 0.6)), 2) for name in instruments}
    lab = {
        "bpm": int(rng.integers(60, 161)), "meter": str(rng.choice(list(METERS))), "instruments": instruments,
        "register": str(rng.choice(list(REGISTERS))), "key": str(rng.choice(KEYS)), "mode": mode,
        "scene": str(rng.choice(SCENES)),
        "mood": str(rng.choice(MOODS["bright" if mode in BRIGHT_MODES else "dark"])),
        "pans": pans, "form": str(rng.choice(list(DIFFUSE_FORMS if kind == "diffuse" else FORMS))),
    }
    lo, hi = seconds if isinstance(seconds, (tuple, list)) else (seconds, seconds)
    lab["seconds"] = float(round(rng.uniform(lo, hi), 1)) if hi > lo else float(lo)
    end = lab["seconds"]
    lab["sections"] = [{"name": name, "start": round(start * end, 3), "gain": gain}
                       for name, start, gain, *_ in FORMS[lab["form"]]]
    for sec, nxt in zip(lab["sections"], lab["sections"][1:] + [{"start": end}]):
        sec["end"] = nxt["start"]
    if kind is not None:
        lab["kind"] = kind
    return lab


def caption_of(lab, rng):
    """A literary caption: scene, instruments, mood, register, then the arc and shuffled meter/key, always ending
    'NN BPM'. The arc is always named (it is what the form follows); meter and key are each left out 20 % of the
    time, as a person would."""
    names = [{**LEADS, **SECONDS, "drums": DRUMS}[k] for k in lab["instruments"]]
    instruments = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    middle = [str(rng.choice(METER_WORDS[lab["meter"]])), f"{lab['key']} {lab['mode']}",
              str(rng.choice(FORM_WORDS[lab["form"]]))]
    middle = [middle[j] for j in rng.permutation(3) if j == 2 or rng.random() < 0.8]
    return ", ".join([lab["scene"], instruments, lab["mood"], str(rng.choice(REGISTER_WORDS[lab["register"]])),
                      *middle, f"{lab['bpm']} BPM"])


def section_at(lab, t):
    """The form's section playing at time t (s): (name, loudness, eighths every n beats, material, voices)."""
    frac = t / lab["seconds"]
    k = max(j for j, row in enumerate(FORMS[lab["form"]]) if frac >= row[1])
    name, start, gain, every, material, voices = FORMS[lab["form"]][k]
    if lab["form"] == "peaceful" and name == "ending":  # the fade: g = g₀·10^(−FADE_DB·f/20)
        f = (frac - start) / (1 - start)
        gain = gain * 10 ** (-FADE_DB * f / 20)
    return name, gain, every, material, voices.split()


def diffuse_score(lab, rng):
    """The diffuse kind's notes: a drone (the tonic and fifth at the bottom of the register, on the second voice if
    there is one) held through the piece, and a chord (I first, then I, IV, V or vi) every two bars in the upper
    half, each held a bar into the next, so chords overlap and crossfade. Velocities are constant: the loudness is
    render()'s smooth curve (form_gain)."""
    beat, bar = 60 / lab["bpm"], len(METERS[lab["meter"]])
    lo, hi = REGISTERS[lab["register"]]
    tonic = KEYS.index(lab["key"])
    pitches = [m for m in range(lo, hi + 1) if (m - tonic) % 12 in MODES[lab["mode"]]]  # the scale in range
    degrees = [MODES[lab["mode"]].index((m - tonic) % 12) for m in pitches]             # 0 = the tonic
    upper = len(pitches) // 2
    lead, *rest = lab["instruments"]
    drone = rest[0] if rest else lead
    notes = [(drone, 0.0, pitches[degrees.index(d)], 0.5, lab["seconds"]) for d in (0, 4)]
    span = 2 * bar * beat
    for k in range(int(np.ceil(lab["seconds"] / span))):
        root = 0 if k == 0 else int(rng.choice([0, 3, 4, 5]))
        for d in (root, (root + 2) % 7, (root + 4) % 7):
            step = next((s for s in range(upper, len(pitches)) if degrees[s] == d), degrees.index(d))
            notes.append((lead, k * span, pitches[step], 0.35, span + bar * beat))
    return notes


def form_gain(lab, t):
    """The diffuse kind's loudness at times t (s): the form's section loudness as one smooth curve (linear between
    the sections' middles; a peaceful ending falls FADE_DB by the end) times a slow swell of two bars' period."""
    mids = [(s["start"] + s["end"]) / 2 for s in lab["sections"]]
    gains = [s["gain"] for s in lab["sections"]]
    if lab["form"] == "peaceful":
        mids, gains = mids + [lab["seconds"]], gains + [gains[-1] * 10 ** (-FADE_DB / 20)]
    period = 2 * len(METERS[lab["meter"]]) * 60 / lab["bpm"]
    # g(t) = interp(t; section middles, gains)·(1 − 0.4·(1 − cos 2πt/P)/2)
    return (np.interp(t, mids, gains) * (1 - 0.2 * (1 - np.cos(2 * np.pi * t / period)))).astype(np.float32)


def score(lab, rng):
    """The notes [(voice, onset s, midi or drum kind, velocity, hold s)] on the beat grid of lab['bpm'], following
    the form: the lead plays its motif (a two-bar walk over the scale drawn once per piece) in A, a second motif in
    B and the first a third higher in A'; voices enter and leave by section. Only the sustained voices hold (the
    rest ring out), so a pitch's note is the same everywhere in the piece. The diffuse kind: diffuse_score."""
    if lab.get("kind") == "diffuse":
        return diffuse_score(lab, rng)
    beat, accents = 60 / lab["bpm"], METERS[lab["meter"]]
    lo, hi = REGISTERS[lab["register"]]
    tonic = KEYS.index(lab["key"])
    pitches = [m for m in range(lo, hi + 1) if (m - tonic) % 12 in MODES[lab["mode"]]]  # the scale in range
    degrees = [MODES[lab["mode"]].index((m - tonic) % 12) for m in pitches]             # 0 = the tonic
    lowest = {d: degrees.index(d) for d in range(7)}          # the lowest pitch of each degree: the bass notes
    n_top, n_mid = len(pitches) - 1, len(pitches) // 2        # the lead plays over the upper half
    lead, *rest = lab["instruments"]
    second = next((k for k in rest if k != "drums"), None)
    bar = len(accents)
    # the motifs: steps of −2…2 over two bars, centred so that a motif stays near where it starts
    motifs = {}
    for name in ("A", "B"):
        walk = np.cumsum(rng.integers(-2, 3, 2 * bar))
        motifs[name] = (walk - int(np.round(walk.mean()))).tolist()
    home = int(rng.integers(n_mid, n_top + 1))
    t0 = rng.uniform(0.05, 0.25)
    n_beats = max(1, int((lab["seconds"] - t0 - 0.3) / beat))
    if lab["form"] == "sudden":  # the piece stops dead about a second before the end, on a loud last beat
        n_beats = max(1, int((lab["seconds"] - t0 - 1.0) / beat))
    notes, chord = [], [0, 2, 4]
    for b in range(n_beats):
        t, pos = t0 + b * beat, b % bar
        name, gain, every, material, voices = section_at(lab, t)
        ending = b == n_beats - 1
        if pos == 0:  # a new chord each bar (on degree I, IV, V or vi), the first and the last on the tonic
            root = 0 if b == 0 or b + bar >= n_beats else int(rng.choice([0, 3, 4, 5]))
            chord = [root, (root + 2) % 7, (root + 4) % 7]
        # the lead: its material's motif around `home` (A' two scale steps higher; B lower), plus a little variation
        shift = {"A": 0, "B": -2, "A'": 2}[material]
        step = home + shift + motifs[material.rstrip("'")][b % (2 * bar)] + int(rng.integers(-1, 2) * (pos == bar - 1))
        step = int(np.clip(step, max(0, n_mid - 3), n_top))
        if pos == 0 or ending:  # drawn to the nearest chord tone on downbeats
            step = min(range(max(0, n_mid - 3), n_top + 1), key=lambda s: (degrees[s] not in chord, abs(s - step)))
        notes.append((lead, t, pitches[step], accents[pos] * gain * (1.3 if ending else 1.0), 0))
        eighth = every > 0 and (b + 1) % every == 0 and not ending and rng.random() < 0.8
        if eighth:  # an off-beat eighth, under half as loud as a beat (never on most beats: the beat stays clear)
            notes.append((lead, t + beat / 2, pitches[int(np.clip(step + rng.integers(-1, 2), 0, n_top))],
                          0.45 * gain, 0))
        if "second" in voices and second in SECONDS and pos == 0:  # root and fifth held for the bar
            for d in (chord[0], chord[2]):
                notes.append((second, t, pitches[lowest[d]], 0.6 * gain, beat * (1 if ending else bar)))
        elif "second" in voices and second is not None and second not in SECONDS:  # a plucked bass arpeggio
            notes.append((second, t, pitches[lowest[chord[pos % 3]]], 0.7 * accents[pos] * gain, 0))
        if "drums" in voices and "drums" in rest:
            notes.append(("drums", t, "kick" if accents[pos] > 0.8 else "snare", 0.5 * accents[pos] * gain, 0))
            if eighth:  # a hat doubles the lead's off-beat eighth
                notes.append(("drums", t + beat / 2, "hat", 0.5 * gain, 0))
    return notes


def render(lab, notes, rng):
    """Mix the notes into stereo float32 [2, N]: each voice panned at constant power, peak at −3 dBFS."""
    N = int(round(lab["seconds"] * SR))
    out = np.zeros((2, N), dtype=np.float32)
    sampled = {}  # each distinct note is synthesised once per clip and replayed, as a sampler would
    swell = SWELL_SECONDS if lab.get("kind") == "diffuse" else None
    for voice, t, pitch, vel, hold in notes:
        if (voice, pitch, hold) not in sampled:
            sampled[voice, pitch, hold] = (drum(pitch, rng) if voice == "drums"
                                           else play(voice, pitch, hold, rng, swell))
        x = sampled[voice, pitch, hold]
        i = int(round(t * SR))
        x = x[:max(0, N - i)]
        # (L, R) = (cos θ, sin θ),  θ = (pan + 1)·π/4
        theta = (lab["pans"][voice] + 1) * np.pi / 4
        out[:, i:i + len(x)] += vel * np.array([[np.cos(theta)], [np.sin(theta)]], dtype=np.float32) * x
    if swell is not None:
        out *= form_gain(lab, np.arange(N) / SR)
    fade = np.minimum(1.0, (N - np.arange(N)) / (0.05 * SR)).astype(np.float32)  # 50 ms fade-out: no end click
    out *= fade
    return out * (10 ** (-3 / 20) / max(np.abs(out).max(), 1e-9))  # peak −3 dBFS: never clips


# -----------------------------------------------------------------------------------------------------------------
# 4. the set

def measured(audio):
    """A clip's own onset contrast and temporal-energy entropy, by the functions eval.py applies to generated audio.
    eval.py imports this file (its estimators are proven on these clips), so it is imported here, when called: the
    same functions, no second copy, and no import cycle at load time."""
    import eval
    return {"onset_contrast": round(eval.onset_contrast(audio, SR), 4),
            "energy_entropy": round(eval.energy_entropy(audio), 4)}


def clip(i, seed=0, seconds=10.0, kinds=None):
    """Clip i of the set `seed`: (audio float32 [2, N] at 44.1 kHz, caption, labels). Independent of the set size.
    seconds: the length, or (shortest, longest) to draw each clip's length from. kinds: None for today's set, or a
    sequence of KINDS: clip i is of kind kinds[i % len(kinds)] (so they alternate), and its label records the kind
    and its measured onset contrast and energy entropy."""
    rng = np.random.default_rng([seed, 0, i])
    kind = kinds[i % len(kinds)] if kinds else None
    lab = draw_labels(rng, seconds, kind)
    caption = caption_of(lab, rng)
    audio = render(lab, score(lab, rng), rng)
    if kind is not None:
        lab.update(measured(audio))
    return audio, caption, {**lab, "seed": seed, "clip": i}


def prompts(n, seed=0, seconds=10.0):
    """n held-out prompts [(caption, labels)] from the stream [seed, 1, i], disjoint from every clip's."""
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, 1, i])
        lab = draw_labels(rng, seconds)
        out.append((caption_of(lab, rng), {**lab, "seed": seed, "prompt": i}))
    return out


def is_eval(i):
    # every tenth clip is held out (MusicCaps' is_audioset_eval)
    return i % 10 == 9


def held_out(n):
    """The indices of the first n held-out clips."""
    return [i for i in range(10 * n) if is_eval(i)][:n]


def write(root, n, seconds=10.0, seed=0, kinds=None):
    """Write n clips (of `kinds`: see clip) in the MusicCaps layout under root; returns the csv path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in tqdm(range(n), desc="clips"):
        audio, caption, lab = clip(i, seed, seconds, kinds)
        ytid = f"toy{i:05d}"
        soundfile.write(root / f"{ytid}.wav", audio.T, SR, subtype="PCM_16")
        (root / f"{ytid}.json").write_text(json.dumps(lab, indent=1))
        aspects = [*lab["instruments"], lab["mood"], lab["register"], lab["meter"], f"{lab['key']} {lab['mode']}",
                   f"{lab['bpm']} bpm"]
        rows.append([ytid, 0, f"{lab['seconds']:g}", str(aspects), caption, 0, False, is_eval(i)])
    path = root / "musiccaps-public.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ytid", "start_s", "end_s", "aspect_list", "caption", "author_id", "is_balanced_subset",
                    "is_audioset_eval"])
        w.writerows(rows)
    return path


def main():
    p = argparse.ArgumentParser(description="Write the synthetic music set in the MusicCaps layout.")
    p.add_argument("dir", help="output folder")
    p.add_argument("--clips", type=int, default=200)
    p.add_argument("--seconds", default="10", help="each clip's length, or SHORTEST:LONGEST (e.g. 30:90)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="", help=f"comma-separated, of {','.join(KINDS)}: clip i is of the "
                   f"(i mod n)-th; empty: today's set")
    args = p.parse_args()
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if any(k not in KINDS for k in kinds):
        raise SystemExit(f"synth.py: --kinds {args.kinds!r}: expected a comma-separated list of {', '.join(KINDS)}")
    try:
        seconds = [float(v) for v in args.seconds.split(":")]
    except ValueError:
        seconds = []
    if len(seconds) not in (1, 2) or min(seconds) < 1 or seconds[0] > seconds[-1] or args.clips < 1:
        raise SystemExit(f"synth.py: need --clips >= 1 and --seconds S or SHORTEST:LONGEST (>= 1 s each), got "
                         f"{args.clips} and {args.seconds!r}")
    print(f"writing {args.clips} synthetic clips of {args.seconds} s (seed {args.seed}"
          + (f", kinds {', '.join(kinds)}" if kinds else "") + f") to {args.dir}")
    start = time.time()
    path = write(args.dir, args.clips, seconds[0] if len(seconds) == 1 else tuple(seconds), args.seed, kinds or None)
    print(f"wrote {path} and {args.clips} wav + json pairs in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
