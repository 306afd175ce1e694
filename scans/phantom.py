"""Synthetic knee-ultrasound phantom: the default LoRIS dataset when no real data is given.

Each image is a B-mode longitudinal scan of the suprapatellar knee. From the top: a thin gel
gap, the skin line, subcutaneous fat with bright septa, the fibrillar hyperechoic quadriceps
tendon, the suprapatellar fat pad, the sub-quadriceps recess, the prefemoral fat pad and the
femur cortex (a bright curved line with an acoustic shadow beneath it); the patella's upper
pole often shows at the distal (right) edge with its own shadow.

Acoustics (all vectorised numpy/OpenCV, rendered at ``OVERSAMPLE`` x the output size):
complex Gaussian scatterers multiplied by a tissue echogenicity map (plus coherent specular
interfaces), depth attenuation accumulated along each scan line (bone shadows, fluid
enhances), convolution with an anisotropic baseband point-spread function (wider laterally
than axially, widening away from the focus), envelope detection, time-gain compensation,
patient gain and log compression to a patient dynamic range, then area down-sampling.

Recess: a normal recess is a thin anechoic line (thickness varies between patients, and some
normal knees hold a little physiological fluid); a distended recess is a lens-shaped
anechoic-to-hypoechoic pocket, sometimes with faint internal echoes, that lifts and
compresses the suprapatellar fat pad. Severity is continuous and the mildest pockets overlap
normal variability, so image-level detection is not trivial.

Box rule (what a physician draws around the recess; identical for both classes):

* horizontal: the recess extent (where the recess line exists; it is tied to the femur
  because the recess lies on the prefemoral fat pad) widened by ``BOX_MARGIN_X`` of the
  image width on each side;
* bottom: over those columns, the deepest point ``BOX_WALL_FRACTION`` (0.5) of the way from
  the recess floor down to the femur cortex: the box takes in half the prefemoral fat pad;
* top: over those columns, the highest point ``BOX_WALL_FRACTION`` of the way from the recess
  roof (the pocket roof when distended) up to the tendon's underside, as compressed by the
  pocket: the box takes in half the suprapatellar fat pad.

Both walls are therefore placed between interfaces the image shows (recess, tendon, cortex).
A normal box is ~47 px tall at 256 px on average (the walls, not a sliver) and a distended box
is taller by the pocket (mean ~57). The
segmentation of a distended scan is its pocket (the part of the recess thicker than the
normal line), always inside the box; normal scans carry their thin recess line.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> anatomy = sample_anatomy(rng)
>>> scan = render_scan(rng, anatomy, severity=0.6, size=64)
>>> scan.image.shape, scan.image.dtype, bool(scan.pocket.any())
((64, 64), dtype('float32'), True)
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from scans.coco import encode_mask, save_coco
from scans.folds import make_folds, save_splits
from scans.records import Box, Scan, box_mask
from scans.io import write_png

# v3: crisper recess ends and the box walls measured from the tendon and the femur cortex (the
# v2 boxes sat a fixed fraction of the *uncompressed* fat pads away, edges no image shows).
GENERATOR_VERSION = 3
OVERSAMPLE = 2
BOX_MARGIN_X = 0.02
# Each box wall lies this fraction of the way from the recess to the far border of its fat pad.
# Measured on fold 0 (YOLOv5u, GT-prior LoRIS+MSGMSD I-AUROC): 0.5 -> mAP@75 0.63, 0.957;
# 1.0 (whole fat pads) -> 0.65, 0.911 with worse Dice (the inpainted box gets too big).
BOX_WALL_FRACTION = 0.5
# Half-width of the recess's end taper (fraction of the width). v2's 0.025 faded the thin line
# out over ~13 px, so its end, and the box's side, were not visible in speckle.
RECESS_END_RAMP = 0.008

# Layer labels, top to bottom.
GEL, SKIN, FAT, TENDON, SPFAT, RECESS, PFFAT, BONE = range(8)


@dataclass(frozen=True)
class PatientAnatomy:
    """Per-patient anatomy and scanner settings; depths are fractions of the image height,
    lateral positions fractions of the width (0 proximal/left, 1 distal/right)."""

    skin_depth: float
    skin: float
    fat: float
    tendon: float
    spfat: float
    recess: float
    prefemoral: float
    femur_depth: float
    femur_curv: float
    femur_vertex: float
    femur_slope: float
    recess_start: float
    recess_end: float
    patella_start: float
    patella_rise: float
    fat_echo: float
    tendon_echo: float
    pad_echo: float
    gain_db: float
    dynamic_range: float
    tgc: float
    psf_lateral: float
    psf_axial: float


@dataclass(frozen=True)
class RenderedScan:
    """One rendered image (float32 ``[size, size]`` in [0, 1]) with its box and masks."""

    image: np.ndarray
    box: Box
    recess: np.ndarray
    pocket: np.ndarray
    pocket_height: float


def sample_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one patient's anatomy.

    >>> sample_anatomy(np.random.default_rng(1)).femur_depth > 0.5
    True
    """
    skin_depth = rng.uniform(0.012, 0.03)
    skin = rng.uniform(0.012, 0.02)
    femur_depth = rng.uniform(0.58, 0.74)
    # Relative layer thicknesses, scaled so the stack lands on the femur.
    fat, tendon, spfat, prefem = rng.uniform(0.07, 0.2), rng.uniform(0.08, 0.13), rng.uniform(0.06, 0.11), rng.uniform(0.06, 0.1)
    recess = rng.uniform(0.008, 0.016)
    scale = (femur_depth - skin_depth - skin - recess) / (fat + tendon + spfat + prefem)
    start = rng.uniform(0.12, 0.32)
    end = rng.uniform(0.64, 0.82)
    return PatientAnatomy(
        skin_depth=skin_depth, skin=skin, fat=fat * scale, tendon=tendon * scale, spfat=spfat * scale,
        recess=recess, prefemoral=prefem * scale, femur_depth=femur_depth,
        femur_curv=rng.uniform(-0.05, 0.22), femur_vertex=rng.uniform(0.3, 0.7),
        femur_slope=rng.uniform(-0.06, 0.05), recess_start=start, recess_end=end,
        patella_start=rng.uniform(end + 0.06, 1.25), patella_rise=rng.uniform(0.15, 0.35),
        fat_echo=rng.uniform(0.04, 0.09), tendon_echo=rng.uniform(0.35, 0.6), pad_echo=rng.uniform(0.12, 0.25),
        gain_db=rng.uniform(-3.0, 3.0), dynamic_range=rng.uniform(48.0, 60.0), tgc=rng.uniform(1.6, 2.6),
        psf_lateral=rng.uniform(1.0, 1.5), psf_axial=rng.uniform(0.45, 0.6),
    )


def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise_1d(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Unit-std 1-D noise smoothed over ``sigma`` samples (gentle boundary undulation)."""
    x = cv2.GaussianBlur(rng.standard_normal((1, n), dtype=np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT)[0]
    return x / (x.std() + 1e-6)


def _texture(rng: np.random.Generator, shape: tuple[int, int], sx: float, sy: float, scale: int) -> np.ndarray:
    """Unit-std correlated noise, drawn at ``1/scale`` resolution (cheap) then upsampled."""
    h, w = shape
    small = rng.standard_normal((h // scale, w // scale), dtype=np.float32)
    small = cv2.GaussianBlur(small, (0, 0), sigmaX=max(sx / scale, 0.3), sigmaY=max(sy / scale, 0.3), borderType=cv2.BORDER_REFLECT)
    small /= small.std() + 1e-6
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _pocket_profile(rng: np.random.Generator, v: np.ndarray, start: float, end: float) -> np.ndarray:
    """Lens-shaped unit-height profile inside ``[start, end]``, asymmetric and off-centre."""
    length = end - start
    centre = start + length * rng.uniform(0.35, 0.65)
    left = (centre - start) * rng.uniform(0.6, 1.0)
    right = (end - centre) * rng.uniform(0.6, 1.0)
    d = np.where(v < centre, (v - centre) / left, (v - centre) / right)
    return np.clip(1.0 - d * d, 0.0, None) ** rng.uniform(0.5, 0.9)


def render_scan(rng: np.random.Generator, anatomy: PatientAnatomy, severity: float, size: int) -> RenderedScan:
    """Render one scan. ``severity`` 0 is a normal recess; (0, 1] a distended one of growing size.

    Pure function of its arguments (the image-level jitter comes from ``rng``).

    >>> a = sample_anatomy(np.random.default_rng(0))
    >>> s = render_scan(np.random.default_rng(1), a, 0.0, 64)
    >>> bool(s.pocket.any()), s.box[3] > s.box[1]
    (False, True)
    """
    a = anatomy
    # Oversampled axially only: axial speckle is finer than lateral, and this halves the cost.
    hr, wr = size * OVERSAMPLE, size
    v = ((np.arange(wr) + 0.5) / wr).astype(np.float32)
    u = ((np.arange(hr) + 0.5) / hr).astype(np.float32)[:, None]

    # Image-level jitter: probe position, tilt, pressure, depth and gain.
    shift = rng.normal(0.0, 0.035)
    tilt = rng.normal(0.0, 0.02)
    depth = rng.normal(0.0, 0.012)
    press = rng.uniform(0.9, 1.05)
    gain_db = a.gain_db + rng.normal(0.0, 1.0)
    vs = v - shift  # anatomy coordinates under this probe position
    start, end = a.recess_start + shift, a.recess_end + shift

    femur = (a.femur_depth + depth + a.femur_curv * (vs - a.femur_vertex) ** 2 + (a.femur_slope + tilt) * (v - 0.5)
             + 0.004 * _smooth_noise_1d(rng, wr, wr / 10))
    prefem = a.prefemoral * (0.75 + 0.5 * np.clip(vs, 0, 1)) * (1 + 0.08 * _smooth_noise_1d(rng, wr, wr / 8))
    floor = femur - prefem

    # Recess thickness along the scan: thin line, plus a pocket when distended. Normal knees
    # sometimes hold a little physiological fluid so that mild distension overlaps normality.
    ramp = RECESS_END_RAMP
    taper = _smoothstep((v - start + ramp) / (2 * ramp)) * _smoothstep((end + ramp - v) / (2 * ramp))
    line = a.recess * rng.uniform(0.8, 1.25) * (1 + 0.25 * _smooth_noise_1d(rng, wr, wr / 12))
    if severity > 0:
        pocket_h = 0.012 + 0.16 * float(severity)
    elif rng.random() < 0.45:
        pocket_h = rng.uniform(0.0, 0.028)
    else:
        pocket_h = 0.0
    profile = _pocket_profile(rng, v, start, end) if pocket_h > 0 else np.zeros_like(v)
    fluid_h = pocket_h * profile * taper
    thick = line * taper + fluid_h
    roof = floor - thick

    # The pocket compresses the suprapatellar fat pad and lifts everything above it.
    spfat = a.spfat * (0.6 + 0.8 * np.clip(vs, 0, 1)) * (1 + 0.1 * _smooth_noise_1d(rng, wr, wr / 8))
    spfat = np.maximum(spfat - 0.45 * fluid_h, 0.35 * spfat)
    tendon_bot = roof - spfat
    tendon_top = tendon_bot - a.tendon * (1 + 0.15 * (vs - 0.5)) * press
    skin_top = np.full_like(v, a.skin_depth) + 0.002 * _smooth_noise_1d(rng, wr, wr / 6)
    fat_top = skin_top + a.skin
    # Keep the stack ordered where it overflows (big pocket, thick pads): the soft tissue above
    # gives way, never the recess, whose roof and floor are what the box is drawn from.
    tendon_bot = np.minimum(tendon_bot, roof - 0.2 * a.spfat)
    tendon_top = np.minimum(np.maximum(tendon_top, fat_top + 0.3 * a.fat * press), tendon_bot - 0.3 * a.tendon)
    bounds = [skin_top, fat_top, tendon_top, tendon_bot, roof, floor, femur]
    label = np.zeros((hr, wr), dtype=np.uint8)
    for b in bounds:
        label += u >= b[None, :]

    # Patella: a convex bony surface rising distally, with its own shadow.
    pv = a.patella_start + shift
    dv = np.clip(v - pv, 0.0, None)
    # Rounded upper pole: from the recess floor up to the tendon within a few percent of the width.
    pole = _smoothstep(dv / 0.08) ** 0.6
    patella = floor - (floor - tendon_bot - 0.01) * pole - a.patella_rise * dv
    on_patella = (v > pv)[None, :] & (u >= patella[None, :])
    label[on_patella] = BONE

    # Echogenicity (backscatter amplitude) per layer, modulated by tissue textures.
    # Mostly anechoic; some pockets hold echogenic blood and read hypoechoic.
    fluid = 0.006 + 0.045 * rng.beta(0.8, 2.5) if severity > 0 else 0.006
    echo = np.array([0.004, 0.35, a.fat_echo, a.tendon_echo, a.pad_echo, fluid, a.pad_echo * 1.15, 0.02],
                    dtype=np.float32)
    # Fibrillar tendon: long lateral streaks that follow the tendon's course (remapped rows).
    fib = _texture(rng, (hr, wr), sx=8.0, sy=0.6 * OVERSAMPLE, scale=2)
    mapx = np.broadcast_to(np.arange(wr, dtype=np.float32)[None, :], (hr, wr))
    mapy = np.arange(hr, dtype=np.float32)[:, None] + ((tendon_top - tendon_top.mean()) * hr).astype(np.float32)[None, :]
    fib = cv2.remap(fib, mapx, mapy, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # Fat lobules: blobby log-normal echogenicity.
    lob = _texture(rng, (hr, wr), sx=2.5, sy=1.6 * OVERSAMPLE, scale=2)
    tex = np.where(label == TENDON, 0.75 * fib, 0.6 * lob)
    tex = np.where(label == BONE, 0.0, tex)
    amp = echo[label] * np.exp(tex)
    if severity > 0 and rng.random() < 0.5:
        # Faint internal echoes (debris, clot) scattered in the pocket.
        r0 = max(int(roof.min() * hr) - 1, 0)
        r1 = min(int(floor.max() * hr) + 2, hr)
        sub = amp[r0:r1]
        sparkle = (rng.random(sub.shape, dtype=np.float32) < rng.uniform(0.003, 0.015)) & (label[r0:r1] == RECESS)
        sub[sparkle] += rng.uniform(0.1, 0.3)

    # Specular interfaces: coherent (unspeckled) bright lines after the PSF.
    spec = np.zeros((hr, wr), dtype=np.float32)
    cols = np.arange(wr)

    def interface(b: np.ndarray, strength: np.ndarray | float, width: float) -> None:
        """Add a line ``width`` output pixels thick along curve ``b`` (the PSF smooths it)."""
        n_rows = max(int(round(width * OVERSAMPLE)), 1)
        first = np.round(b * hr - n_rows / 2).astype(np.int64)
        val = np.broadcast_to(np.asarray(strength, dtype=np.float32), (wr,))
        for k in range(n_rows):
            r = first + k
            ok = (r >= 0) & (r < hr)
            spec[r[ok], cols[ok]] += val[ok]

    rough = lambda s: (1 + 0.45 * _smooth_noise_1d(rng, wr, wr / 25)).clip(0.15) * s  # noqa: E731
    interface(skin_top, 1.2, 1.5)
    interface(tendon_top, rough(0.45), 1.0)
    interface(tendon_bot, rough(0.4), 1.0)
    # Synovial walls of the recess: bright where the recess exists.
    wall = rough(0.12 + 0.4 * taper)
    interface(roof - 1.0 / size, wall, 1.0)
    interface(floor + 1.0 / size, wall, 1.0)
    interface(femur, 8.0 * (1 + 0.2 * _smooth_noise_1d(rng, wr, wr / 25)).clip(0.4), 1.5)
    pat_surface = np.where(v > pv, 6.0, 0.0).astype(np.float32) * _smoothstep((v - pv) / 0.01)
    interface(patella, pat_surface, 1.5)
    # Subcutaneous septa: a few thin, short, oblique bright lines clipped to the fat.
    septa = np.zeros((hr, wr), dtype=np.float32)
    for _ in range(int(rng.integers(2, 6))):
        y0 = rng.uniform(a.skin_depth + a.skin, a.skin_depth + a.skin + a.fat) * hr
        ang = rng.normal(0, 0.1)
        x0 = rng.uniform(-0.1, 0.9) * wr
        x1 = x0 + rng.uniform(0.15, 0.5) * wr
        cv2.line(septa, (int(x0), int(y0)), (int(x1), int(y0 + (x1 - x0) * ang * OVERSAMPLE)), float(rng.uniform(0.2, 0.6)), 1)
    spec += septa * (label == FAT)
    # Nothing specular survives inside bone (the femur line vanishes under the patella).
    bone_top = np.where(v > pv, np.minimum(femur, patella), femur)
    spec[u > bone_top[None, :] + 1.0 / size] = 0.0

    # Two-way attenuation accumulated along each scan line; bone shadows, fluid enhances.
    alpha = np.array([0.5, 2.5, 2.6, 3.0, 2.4, 0.3, 2.4, 500.0], dtype=np.float32)
    cum = np.cumsum(alpha[label], axis=0) * np.float32(1.0 / hr)
    att = np.exp(a.tgc * u - cum)

    # Speckle: complex scatterers -> anisotropic baseband PSF -> envelope. Scatterers are
    # scaled by the PSF's norm so that ``amp`` is the mean speckle amplitude after blurring.
    sx, sy = a.psf_lateral, a.psf_axial * OVERSAMPLE
    norm = np.float32(2.0 * np.sqrt(np.pi * sx * sy))
    n = rng.standard_normal((2, hr, wr), dtype=np.float32)
    scat = (amp * att + 0.008) * norm
    re = cv2.GaussianBlur(scat * n[0] + spec * att, (0, 0), sigmaX=sx, sigmaY=sy)
    im = cv2.GaussianBlur(scat * n[1], (0, 0), sigmaX=sx, sigmaY=sy)
    # The lateral beam widens away from the focus (about a third of the depth).
    w_far = np.clip(np.abs(u - 0.35) / 0.5, 0.0, 1.0)
    re += w_far * (cv2.GaussianBlur(re, (0, 0), sigmaX=sx, sigmaY=0.3) - re)
    im += w_far * (cv2.GaussianBlur(im, (0, 0), sigmaX=sx, sigmaY=0.3) - im)
    env = cv2.magnitude(re, im)

    db = 20.0 * np.log10(env + 1e-6) + (gain_db - 14.0)
    img = np.clip(1.0 + db / a.dynamic_range, 0.0, 1.0)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)

    # Annotations at output resolution from the down-sampled boundary curves.
    xs = (np.arange(size) + 0.5) / size
    roof_o = np.interp(xs, v, roof)
    floor_o = np.interp(xs, v, floor)
    fluid_o = np.interp(xs, v, fluid_h)
    taper_o = np.interp(xs, v, taper)
    rows = (np.arange(size) + 0.5)[:, None] / size
    half = 0.5 / size  # a pixel belongs when its centre is within half a pixel of the recess
    in_band = (rows >= roof_o[None, :] - half) & (rows <= floor_o[None, :] + half)
    recess = in_band & (taper_o > 0.5)[None, :]
    pocket = in_band & (fluid_o > 1.0 / size)[None, :] & (taper_o > 0.05)[None, :] if severity > 0 else np.zeros_like(recess)

    x1 = max(0.0, (start - BOX_MARGIN_X) * size)
    x2 = min(float(size), (end + BOX_MARGIN_X) * size)
    c0, c1 = int(x1), max(int(np.ceil(x2)), int(x1) + 1)
    # The walls are drawn from the two crisp interfaces around the recess (tendon underside above,
    # femur cortex below), as they appear in this image: a pocket that lifts the tendon lifts the
    # top edge with it, and a detector can anchor on edges both classes show.
    tendon_o = np.interp(xs, v, tendon_bot)
    femur_o = np.interp(xs, v, femur)
    top = float((roof_o - BOX_WALL_FRACTION * (roof_o - tendon_o))[c0:c1].min())
    bottom = float((floor_o + BOX_WALL_FRACTION * (femur_o - floor_o))[c0:c1].max())
    y1 = max(0.0, top * size)
    y2 = min(float(size), bottom * size)
    box = (round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2))
    inside = box_mask(box, size, size)
    return RenderedScan(img, box, recess & inside, pocket & inside, float(pocket_h * size))


# ----------------------------------------------------------------------------------------
# Dataset


def _assign(rng: np.random.Generator, n_images: int, n_distended: int, n_patients: int) -> tuple[np.ndarray, np.ndarray]:
    """Patient index per image and the distended flags, exact counts, uneven across patients."""
    counts = 1 + rng.multinomial(n_images - n_patients, rng.dirichlet(np.full(n_patients, 4.0)))
    patient = np.repeat(np.arange(n_patients), counts)
    # Heavy-tailed propensity: a few patients bleed often, many never show a distension.
    propensity = rng.gamma(0.25, size=n_patients) + 1e-3
    p = propensity[patient] / propensity[patient].sum()
    distended = np.zeros(n_images, dtype=bool)
    distended[rng.choice(n_images, size=n_distended, replace=False, p=p)] = True
    return patient, distended


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or remove it")


def generate_dataset(out: Path | str, n_images: int = 483, n_distended: int = 123, n_patients: int = 60,
                     size: int = 256, seed: int = 0, progress: bool = True) -> Path:
    """Write a phantom dataset folder (``images/``, ``annotations.json``, ``splits.json``).

    Built in a temporary sibling folder and renamed into place, so a killed run leaves no
    half dataset. Refuses a non-empty existing ``out``.

    >>> import tempfile
    >>> d = generate_dataset(Path(tempfile.mkdtemp()) / "ph", 12, 3, 6, size=64, progress=False)
    >>> sorted(p.name for p in d.iterdir())
    ['annotations.json', 'images', 'splits.json']
    """
    out = Path(out)
    if not 0 <= n_distended <= n_images:
        raise ValueError(f"n_distended must be in [0, {n_images}], got {n_distended}")
    if not 1 <= n_patients <= n_images:
        raise ValueError(f"n_patients must be in [1, n_images={n_images}], got {n_patients}")
    if size < 32:
        raise ValueError(f"size must be at least 32, got {size}")
    _check_out(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / "images").mkdir()
        patient, distended = _assign(np.random.default_rng([seed, 2]), n_images, n_distended, n_patients)
        anatomies = [sample_anatomy(np.random.default_rng([seed, 0, p])) for p in range(n_patients)]
        width = len(str(n_patients))
        scans: list[Scan] = []
        it = range(n_images)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="phantom", unit="img", file=sys.stderr)
        for i in it:
            rng = np.random.default_rng([seed, 1, i])
            severity = float(rng.beta(1.1, 1.8)) if distended[i] else 0.0
            r = render_scan(rng, anatomies[patient[i]], severity, size)
            path = tmp / "images" / f"{i + 1:04d}.png"
            write_png(path, np.round(r.image * 255.0).astype(np.uint8))
            mask = r.pocket if distended[i] else r.recess
            scans.append(Scan(id=i + 1, path=path, patient=f"P{patient[i] + 1:0{width}d}", label=int(distended[i]),
                              box=r.box, width=size, height=size, segmentation=encode_mask(mask)))
        save_coco(tmp / "annotations.json", scans, tmp)
        save_splits(tmp / "splits.json", make_folds(scans, k=5, seed=seed))
        _check_out(out)
        if out.exists():
            out.rmdir()  # empty: replace it
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """Where phantoms are cached: ``cache_dir``, else ``$LORIS_CACHE/phantom``, else
    ``$XDG_CACHE_HOME/loris/phantom``, else ``~/.cache/loris/phantom``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("LORIS_CACHE"):
        return Path(os.environ["LORIS_CACHE"]) / "phantom"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "loris" / "phantom"


def dataset_key(n_images: int = 483, n_distended: int = 123, n_patients: int = 60, size: int = 256, seed: int = 0) -> str:
    """Cache key naming the generator version and every parameter.

    >>> dataset_key()
    'v2-n483-d123-p60-s256-seed0'
    """
    return f"v{GENERATOR_VERSION}-n{n_images}-d{n_distended}-p{n_patients}-s{size}-seed{seed}"


def default_dataset(cache_dir: Path | str | None = None, n_images: int = 483, n_distended: int = 123,
                    n_patients: int = 60, size: int = 256, seed: int = 0, progress: bool = True) -> Path:
    """The default dataset: generated on first use into the cache (see :func:`cache_root`), then reused.

    >>> import tempfile
    >>> d = default_dataset(tempfile.mkdtemp(), n_images=12, n_distended=3, n_patients=6, size=64, progress=False)
    >>> d.name, (d / "annotations.json").is_file()
    ('v2-n12-d3-p6-s64-seed0', True)
    """
    target = cache_root(cache_dir) / dataset_key(n_images, n_distended, n_patients, size, seed)
    if (target / "annotations.json").is_file() and (target / "splits.json").is_file():
        return target
    if progress:
        print(f"generating the phantom dataset into {target} (first use only)", file=sys.stderr)
    try:
        return generate_dataset(target, n_images, n_distended, n_patients, size, seed, progress)
    except FileExistsError:
        # Another process finished the same dataset first; the rename makes it complete.
        if (target / "annotations.json").is_file():
            return target
        raise


def summary(root: Path | str) -> dict[str, float]:
    """Box heights and counts of a phantom folder (a quick sanity check)."""
    doc = json.loads((Path(root) / "annotations.json").read_text())
    dist = {im["id"]: im["distended"] for im in doc["images"]}
    h = {True: [], False: []}
    for ann in doc["annotations"]:
        h[dist[ann["image_id"]]].append(ann["bbox"][3])
    return {"images": len(doc["images"]), "distended": sum(dist.values()),
            "box_h_normal": float(np.mean(h[False])) if h[False] else float("nan"),
            "box_h_distended": float(np.mean(h[True])) if h[True] else float("nan")}
