"""
Training data for fine-tuning: a folder of audio and captions -> cached SAME latents -> random latent crops.

This file owns everything between the audio on disk and one training item (the DiT never sees audio):
  1. finding clips in three layouts: MusicCaps (musiccaps-public.csv + {ytid}.wav), Hugging Face audiofolder
     (metadata.csv / metadata.jsonl) and the official trainer's audio files with a same-stem .txt caption. A row
     or file that cannot be used (not UTF-8, a duplicate, a path outside the folder, ...) is skipped with its
     file:line and reason, as bad audio is
  2. reading audio as the official trainer does (shared/sa3_facts.md §7.3): float32, resampled to the model rate
     (our own polyphase Kaiser-windowed sinc), stereo, clamped to ±1. A bad file raises BadAudio with its reason
     and is skipped and named, never replaced by another item (unlike the official dataset); a file longer than
     the model's maximum is read as one random crop of it
  3. the latent cache, like nanoGPT's prepare.py: each clip is encoded once by the deterministic SAME encoder in
     both polarities, one safetensors file per clip in <data>/.latents/<autoencoder hash>/
  4. LatentDataset: the polarity flip (p 0.5), then a random latent crop, or padding with the silence frame under a
     mask. All randomness comes from a passed torch.Generator, so a resumed run draws the same items.
`python data.py cache --data DIR --model MODELDIR` builds the cache ahead of training.

Shape legend: C latent channels, T latent frames, N audio samples.
"""

import argparse
import csv
import hashlib
import json
import math
import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import StableAudioModel, load_safetensors, read_safetensors_metadata, save_safetensors

# -----------------------------------------------------------------------------------------------------------------
# 1. Finding clips

AUDIO_EXTS = {".wav", ".flac", ".mp3", ".ogg", ".aif", ".aiff", ".opus"}  # the official trainer's list
CAPTION_FIELDS = ["caption", "text", "prompt"]  # audiofolder: the first of these columns that exists
MUSICCAPS_COLUMNS = ["ytid", "start_s", "end_s", "caption", "is_audioset_eval"]
SPLITS = ["all", "train", "eval"]  # train/eval: MusicCaps' is_audioset_eval false/true


@dataclass(frozen=True)
class Clip:
    path: Path                  # the audio file
    caption: str
    key: str                    # stable unique id, safe as a file name: the cache file is <key>.safetensors
    start: float | None = None  # MusicCaps: where the clip sits (seconds) in a longer file
    end: float | None = None


def scan_audio(folder):
    """Every audio file under folder, sorted; hidden files and folders (such as .latents) are left out."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def path_key(relative):
    """A file name from a path relative to the dataset folder: 'disc 1/a.wav' -> 'disc 1__a.wav'."""
    return Path(relative).as_posix().replace("/", "__")


def shown(path):
    """A path as printable text, even when its name is not valid UTF-8 (bad bytes as backslash escapes)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def inside(folder, name):
    """folder/name when that stays inside folder, else None. The check is on the path as written (no absolute path,
    no '..' out of the folder); a symlink placed in the folder is the owner's choice (the Hugging Face cache links
    every file to a blob elsewhere)."""
    if not isinstance(name, str) or not name:
        return None
    path = folder / name
    return path if Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder)) else None


def utf8(text):
    """False for text read with errors="surrogateescape" that held bytes which are not UTF-8."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_rows(path):
    """A metadata.csv/.jsonl -> (rows [(line, dict)], column names, skipped). A UTF-8 BOM is accepted; a row with
    bytes that are not UTF-8, a malformed JSON line or a CSV row of the wrong width is skipped with its line."""
    skipped, rows = [], []
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        if path.suffix == ".csv":
            reader = csv.DictReader(f)
            try:
                for row in reader:
                    rows.append((reader.line_num, row))
            except csv.Error as e:  # e.g. a NUL byte: the csv module cannot go on past it
                raise ValueError(f"{path}:{reader.line_num}: not CSV ({e})") from None
            fields = reader.fieldnames or []
        else:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as e:
                    skipped.append((f"{path}:{i}", f"not a JSON object ({e})"))
                    continue
                if not isinstance(row, dict):
                    skipped.append((f"{path}:{i}", f"not a JSON object (a {type(row).__name__})"))
                    continue
                rows.append((i, row))
            fields = list(rows[0][1]) if rows else []
    good = []
    for line, row in rows:
        if None in row or None in row.values():  # csv: more or fewer values than columns
            skipped.append((f"{path}:{line}", f"wrong number of fields (expected {len(fields)})"))
        elif not all(utf8(v) for v in [*row, *row.values()] if isinstance(v, str)):
            skipped.append((f"{path}:{line}", "not UTF-8 (undecodable bytes)"))
        else:
            good.append((line, row))
    return good, fields, skipped


def musiccaps_clips(folder, split):
    """Rows of musiccaps-public.csv whose {ytid}.<audio> lies anywhere under folder -> (clips, skipped rows)."""
    path = folder / "musiccaps-public.csv"
    audio = {}
    for p in scan_audio(folder):
        audio.setdefault(p.stem, p)
    rows, fields, skipped = read_rows(path)
    absent = [c for c in MUSICCAPS_COLUMNS if c not in fields]
    if absent:
        raise ValueError(f"{path}: missing columns {absent} (expected {', '.join(MUSICCAPS_COLUMNS)})")
    clips = []
    for line, row in rows:
        is_eval = row["is_audioset_eval"].strip().lower() in ("true", "1")
        if split != "all" and is_eval != (split == "eval"):
            continue
        if row["ytid"] not in audio:
            skipped.append((f"{path}:{line}", f"no audio ({row['ytid']}.<audio> not found)"))
            continue
        try:
            start, end = float(row["start_s"]), float(row["end_s"])
        except ValueError:
            start = end = math.nan
        if not 0 <= start < end < math.inf:
            skipped.append((f"{path}:{line}", f"bad start_s/end_s ({row['start_s']!r}, {row['end_s']!r}; "
                                              f"expected seconds, start below end)"))
            continue
        clips.append((f"{path}:{line}", Clip(audio[row["ytid"]], row["caption"].strip(), row["ytid"], start, end)))
    return clips, skipped


def audiofolder_clips(folder):
    """Rows of metadata.csv (or metadata.jsonl) naming a file_name and a caption -> (clips, skipped rows)."""
    path = folder / "metadata.csv"
    if not path.is_file():
        path = folder / "metadata.jsonl"
    rows, fields, skipped = read_rows(path)
    caption = next((c for c in CAPTION_FIELDS if c in fields), None)
    if "file_name" not in fields or caption is None:
        raise ValueError(f"{path}: expected rows with file_name and one of {', '.join(CAPTION_FIELDS)} "
                         f"(found {', '.join(map(str, fields)) or 'no columns'})")
    clips = []
    for line, row in rows:
        where, audio = f"{path}:{line}", inside(folder, row.get("file_name"))
        if caption not in row or row[caption] is None:
            skipped.append((where, f"no {caption}"))
        elif not isinstance(row.get("file_name"), str):
            skipped.append((where, f"no file_name (got {row.get('file_name')!r}; expected a relative path)"))
        elif audio is None:
            skipped.append((where, f"outside the data folder (file_name {row['file_name']!r}; expected a "
                                   f"relative path inside {folder})"))
        elif not audio.is_file():
            skipped.append((where, f"no audio ({row['file_name']} not found)"))
        else:
            clips.append((where, Clip(audio, str(row[caption]).strip(), path_key(row["file_name"]))))
    return clips, skipped


def wav_txt_clips(folder):
    """Audio files with a same-stem .txt caption -> (clips, skipped files)."""
    audio = scan_audio(folder)
    if not audio:
        raise ValueError(f"{folder}: no musiccaps-public.csv, metadata.csv/.jsonl or audio files "
                         f"({', '.join(sorted(AUDIO_EXTS))}) with same-stem .txt captions (a synthetic set to try: "
                         f"python synth.py {folder})")
    clips, skipped = [], []
    for p in audio:
        txt = p.with_suffix(".txt")
        if not utf8(str(p)):
            skipped.append((shown(p), "not UTF-8 (the file name has undecodable bytes)"))
        elif not txt.is_file():
            skipped.append((str(p), f"no caption ({txt.name} not found)"))
        else:
            try:
                clips.append((str(p), Clip(p, txt.read_text(encoding="utf-8-sig").strip(),
                                           path_key(p.relative_to(folder)))))
            except UnicodeDecodeError as e:
                skipped.append((str(p), f"not UTF-8 ({txt.name}: {e.reason} at byte {e.start})"))
    return clips, skipped


def find_clips(folder, split="all"):
    """Detect folder's layout and list its clips -> (clips, layout, skipped). skipped: (where, reason) of every row
    or file that cannot be used (no audio, no caption, not UTF-8, a path outside the folder, a duplicate, ...),
    where is "file:line" for metadata rows; they are left out like bad audio files, never stop the run."""
    folder = Path(folder)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such data folder (expected audio files and captions; make a synthetic set "
                         f"with `python synth.py {folder}`, or get MusicCaps: musiccaps-public.csv from "
                         f"huggingface.co/datasets/google/MusicCaps and each row's YouTube clip as <ytid>.wav)")
    if (folder / "musiccaps-public.csv").is_file():
        layout, (listed, skipped) = "musiccaps", musiccaps_clips(folder, split)
    elif split != "all":
        raise ValueError(f"{folder}: split={split!r} needs musiccaps-public.csv (is_audioset_eval); use split='all'")
    elif (folder / "metadata.csv").is_file() or (folder / "metadata.jsonl").is_file():
        layout, (listed, skipped) = "audiofolder", audiofolder_clips(folder)
    else:
        layout, (listed, skipped) = "wav+txt", wav_txt_clips(folder)
    first, clips = {}, []
    for where, clip in listed:  # one clip per id: the first row wins, later ones are noted
        if clip.key in first:
            skipped.append((where, f"duplicate (clip {clip.key!r} is already listed at {first[clip.key]})"))
        else:
            first[clip.key] = where
            clips.append(clip)
    if not clips:
        raise ValueError(f"{folder}: no usable clips in the {layout} layout ({len(skipped)} rows or files skipped"
                         + (f", e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ")"))
    return clips, layout, skipped


# -----------------------------------------------------------------------------------------------------------------
# 2. Reading audio

SILENT_DBFS = -60.0  # the official trainer skips clips quieter than this (RMS)
MAX_PEAK = 8.0       # |x| beyond this is not audio but a corrupt or mis-scaled file (a float WAV can hold 1e30)
# Kaiser-windowed sinc, 32 zero crossings each side, cutoff 0.95 of the lower Nyquist, β = 8: measured error
# < -60 dB for tones up to 0.88·Nyquist, attenuation > 60 dB from 1.02·Nyquist.
ZERO_CROSSINGS, ROLLOFF, KAISER_BETA = 32, 0.95, 8.0
MAX_KERNEL = 1 << 22  # polyphase kernel entries; only odd rate pairs (e.g. 44101 Hz) get near this


class BadAudio(ValueError):
    """An audio file that cannot be trained on; str(e) is the short reason (unreadable, empty, NaN/inf, silent)."""


def resample(x, src_rate, dst_rate):
    """x (..., N) at src_rate -> (..., ceil(N·dst/src)) at dst_rate, band-limited. With src/dst = M/L in lowest
    terms, output n = qL + p sits at input time qM + pM/L, so each phase p is one fixed kernel sliding over the
    input with stride M: a strided conv1d with L output channels."""
    if src_rate == dst_rate:
        return x
    g = math.gcd(src_rate, dst_rate)
    M, L = src_rate // g, dst_rate // g
    fc = ROLLOFF * min(1.0, L / M)   # cutoff as a fraction of the input Nyquist
    half = ZERO_CROSSINGS / fc       # kernel half-width in input samples
    W = math.ceil(half)
    K = M + 2 * W                    # taps per phase
    if L * K > MAX_KERNEL:
        raise ValueError(f"cannot resample {src_rate} Hz to {dst_rate} Hz (ratio {M}/{L} needs {L}x{K} taps)")
    # h(t) = fc·sinc(fc·t)·I0(β√(1−(t/half)²))/I0(β) for |t| ≤ half;  kernel[p, i] = h(pM/L − (i − W))
    t = torch.arange(L, dtype=torch.float64)[:, None] * M / L - (torch.arange(K, dtype=torch.float64) - W)
    u = (t / half).clamp(-1, 1)
    window = torch.special.i0(KAISER_BETA * (1 - u * u).sqrt()) / torch.special.i0(torch.tensor(KAISER_BETA))
    kernel = (fc * torch.sinc(fc * t) * window * (t.abs() <= half)).to(x.dtype)  # (L, K)
    *lead, N = x.shape
    n_out = -(-N * L // M)
    Q = -(-n_out // L)               # output frames of L samples
    x = F.pad(x.reshape(-1, 1, N), (W, max(0, (Q - 1) * M + K - W - N)))
    y = F.conv1d(x, kernel[:, None, :], stride=M)  # (B, L, Q)
    return y.transpose(1, 2).reshape(*lead, -1)[..., :n_out]


def read_audio(clip, sample_rate, max_seconds=None, seed=0):
    """A Clip or path -> (audio (2, N) float32 at sample_rate clamped to ±1, seconds of source audio read).
    A MusicCaps clip inside a clearly longer file (longer than end + 1 s) is read from [start, end]; otherwise
    (downloads already cut to the clip) the whole file. Audio longer than max_seconds (known from the header, before
    anything is read) is read as one crop of max_seconds at a random start drawn from `seed`. Mono is duplicated,
    >2 channels keep the first two."""
    path = clip.path if isinstance(clip, Clip) else Path(clip)
    try:
        with sf.SoundFile(path) as f:
            sr, first, n = f.samplerate, 0, -1  # read n frames from `first`; -1: to the end
            if isinstance(clip, Clip) and clip.end is not None and f.frames > (clip.end + 1) * sr:
                first = min(round(clip.start * sr), f.frames)
                n = max(0, round(clip.end * sr) - first)
            available = f.frames - first if n < 0 else n
            if max_seconds is not None and available > max_seconds * sr:
                n = int(max_seconds * sr)
                first += random.Random(seed).randrange(available - n + 1)
            f.seek(first)
            x = f.read(n, dtype="float32", always_2d=True)  # (N, channels)
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        raise BadAudio(f"unreadable ({getattr(e, 'error_string', e)})") from None
    if x.size == 0:
        raise BadAudio("empty")
    if not np.isfinite(x).all():
        raise BadAudio("NaN/inf samples")
    peak = float(np.abs(x).max())
    if peak > MAX_PEAK:  # clamping it to ±1 would train on a full-scale square wave
        raise BadAudio(f"corrupt (peak |x| = {peak:.3g}, over {MAX_PEAK:g})")
    rms = math.sqrt(np.mean(np.square(x, dtype=np.float64)))
    dbfs = 20 * math.log10(rms) if rms > 0 else -math.inf
    if dbfs < SILENT_DBFS:
        raise BadAudio(f"silent ({dbfs:.0f} dBFS)")
    audio = torch.from_numpy(x.T.copy())  # (channels, N)
    if audio.shape[0] == 1:
        audio = audio.repeat(2, 1)
    try:
        audio = resample(audio[:2], sr, sample_rate)
    except ValueError as e:
        raise BadAudio(str(e)) from None
    return audio.clamp(-1, 1), x.shape[0] / sr


# -----------------------------------------------------------------------------------------------------------------
# 3. The latent cache: <cache>/<key>.safetensors holds pos = E(audio), neg = E(−audio), each (C, T) float32, and
#    metadata "clip" = JSON {caption, seconds_total, sha1, start, end, latents, source}

SILENCE = "silence.safetensors"  # "silence": the mean latent frame (C,) of encoded zero audio, to pad short clips
SILENCE_LATENTS = 32             # latent frames of zero audio encoded for it


def autoencoder_hash(model):
    """First 16 hex digits of sha256 over the autoencoder's tensor names and bytes, in state_dict order."""
    h = hashlib.sha256()
    for name, t in model.pretransform.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir(model, data_folder):
    return Path(data_folder) / ".latents" / autoencoder_hash(model)


def file_sha1(path):
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha1").hexdigest()
    except OSError as e:
        raise BadAudio(f"unreadable ({e.strerror})") from None


def encode(model, audio, device):
    # audio (2, N) -> latents (C, T) float32 on the CPU
    with torch.inference_mode():
        return model.encode(audio[None].to(device))[0].float().cpu()


def clip_meta(path):
    """The "clip" metadata of a cache file, or None before the file exists (writes are atomic: never half a file)."""
    return json.loads(read_safetensors_metadata(path)["clip"]) if path.is_file() else None


def cache_entry(path, meta):
    return dict(key=path.name.removesuffix(".safetensors"), path=str(path), prompt=meta["caption"],
                seconds_total=float(meta["seconds_total"]), latents=meta["latents"])


def remove_stale_temporaries(folder):
    """Delete what a killed process left half-written in folder: save_safetensors' <file>.<pid>.tmp whose pid no
    longer runs (another run may share the cache and be writing its own). A retry after a kill or a full disk
    starts with that space free again."""
    for tmp in folder.glob("*.tmp"):
        pid = tmp.suffixes[-2][1:] if len(tmp.suffixes) >= 2 else ""
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except (PermissionError, OverflowError):  # alive but another user's; or not a pid after all
                pass


def cache_latents(model, clips, cache_dir=None, device="cpu", data_folder=None):
    """Encode every clip not yet cached (or whose audio changed: sha1 or crop differ) -> (entries, skipped).
    entries: dicts for LatentDataset; skipped: (path, reason) of each bad clip. The model must be on `device`."""
    if cache_dir is None and data_folder is None:
        raise ValueError("cache_latents: give cache_dir or data_folder (the cache goes in <data_folder>/.latents/)")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(model, data_folder)
    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(cache_dir)
    if not (cache_dir / SILENCE).is_file():
        zeros = torch.zeros(2, SILENCE_LATENTS * model.pretransform.model.downsampling_ratio)
        save_safetensors({"silence": encode(model, zeros, device).mean(dim=1)}, cache_dir / SILENCE)
    entries, skipped = [], []
    for clip in tqdm(clips, desc="caching latents", unit="clip"):
        path = cache_dir / f"{clip.key}.safetensors"
        try:
            sha1, meta = file_sha1(clip.path), clip_meta(path)
            if meta is None or (meta["sha1"], meta["start"], meta["end"]) != (sha1, clip.start, clip.end):
                # at most the model's own maximum length: the DiT never sees more at once
                audio, seconds = read_audio(clip, model.sample_rate, model.sample_size / model.sample_rate,
                                            seed=int(sha1[:15], 16))
                pos, neg = encode(model, audio, device), encode(model, -audio, device)  # polarity flip (§7.3)
                meta = dict(caption=clip.caption, seconds_total=math.ceil(seconds), sha1=sha1, start=clip.start,
                            end=clip.end, latents=pos.shape[-1], source=str(clip.path))
                save_safetensors({"pos": pos, "neg": neg}, path, {"clip": json.dumps(meta)})
            elif meta["caption"] != clip.caption:  # same audio, new caption: rewrite the metadata, keep the latents
                meta["caption"] = clip.caption
                save_safetensors(load_safetensors(path), path, {"clip": json.dumps(meta)})
        except BadAudio as e:
            skipped.append((str(clip.path), str(e)))
            continue
        entries.append(cache_entry(path, meta))
    return entries, skipped


def write_skip_log(skipped, path, total=None):
    """Write one "path<TAB>reason" line per skipped clip to path; returns a one-line summary for the console."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p}\t{reason}\n" for p, reason in skipped), encoding="utf-8",
                    errors="backslashreplace")
    kinds = Counter(reason.split(" (")[0] for _, reason in skipped)
    of = f" of {total}" if total is not None else ""
    why = f" ({', '.join(f'{n} {kind}' for kind, n in kinds.most_common())})" if skipped else ""
    return f"skipped {len(skipped)}{of} clips{why}; see {path}"


# -----------------------------------------------------------------------------------------------------------------
# 4. Training items

class LatentDataset:
    """Cached clips (cache_latents' entries, or every clip file in a cache folder) as training items of
    crop_latents frames."""

    def __init__(self, entries_or_cache_dir, crop_latents):
        if isinstance(entries_or_cache_dir, (str, Path)):
            folder = Path(entries_or_cache_dir)
            entries = [cache_entry(p, clip_meta(p)) for p in sorted(folder.glob("*.safetensors")) if p.name != SILENCE]
        else:
            folder, entries = None, list(entries_or_cache_dir)
        if not entries:
            raise ValueError(f"LatentDataset: no cached clips in {folder or 'the entries given'} "
                             f"(expected <key>.safetensors files written by cache_latents)")
        if not isinstance(crop_latents, int) or crop_latents < 1:
            raise ValueError(f"LatentDataset: crop_latents={crop_latents!r}, expected a positive number of frames")
        self.entries, self.crop = entries, crop_latents
        self.silence = load_safetensors(Path(entries[0]["path"]).parent / SILENCE)["silence"]  # (C,)

    def __len__(self):
        return len(self.entries)

    def get(self, i, generator):
        """Item i: polarity −1 with p 0.5, then a uniform crop (or silence padding, mask False). Always draws the
        same two numbers from generator."""
        e = self.entries[i]
        flip = torch.randint(2, (), generator=generator).item()
        z = load_safetensors(e["path"])["neg" if flip else "pos"]  # (C, T)
        C, T = z.shape
        offset = torch.randint(max(T - self.crop, 0) + 1, (), generator=generator).item()
        z = z[:, offset:offset + self.crop]
        n = z.shape[1]
        latents = torch.cat([z, self.silence[:, None].expand(C, self.crop - n)], dim=1)  # (C, crop)
        return dict(latents=latents, mask=torch.arange(self.crop) < n, prompt=e["prompt"],
                    seconds_total=e["seconds_total"], key=e["key"])


# -----------------------------------------------------------------------------------------------------------------
# 5. Command line

def cache_command(args):
    clips, layout, listed = find_clips(args.data, args.split)
    print(f"{args.data}: {len(clips)} clips ({layout} layout, split {args.split}), {len(listed)} rows or files skipped")
    model = StableAudioModel.from_pretrained(args.model, device=args.device)
    cache_dir = default_cache_dir(model, args.data)
    entries, skipped = cache_latents(model, clips, cache_dir, args.device)
    print(f"cached {len(entries)} clips in {cache_dir}")
    print(write_skip_log(listed + skipped, cache_dir / "skipped.txt", len(clips) + len(listed)))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prepare training data (see the docstring of data.py).")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("cache", help="encode a dataset folder into <data>/.latents/<autoencoder hash>/")
    p.add_argument("--data", required=True, help="dataset folder: musiccaps, audiofolder or audio + .txt captions")
    p.add_argument("--model", required=True, help="model folder (model_config.json + model.safetensors)")
    p.add_argument("--split", default="all", choices=SPLITS, help="MusicCaps only: train/eval by is_audioset_eval")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.command == "cache":
        cache_command(args)


if __name__ == "__main__":
    main()
