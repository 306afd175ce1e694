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

Recess: a normal recess is a thin anechoic line (thickness varies between patients, and 45% of
normal knees hold a little physiological fluid); a distended recess is a lens-shaped
anechoic-to-hypoechoic pocket, sometimes with faint internal echoes, that lifts and compresses
the suprapatellar fat pad (the soft tissue above gives way; the femur and the skin do not).
Severity is continuous (peak height ``POCKET_MIN + POCKET_RANGE * severity``, severity ~
Beta(1.1, 1.8)) and the mildest pockets overlap the physiological fluid, so image-level
detection is not trivial.

Box rule (what the protocol asks a physician to draw; one rule for both classes, and nothing in
it depends on the pocket, so box height, width or area alone cannot tell the classes apart):

* horizontal: the recess extent (where the recess line exists; it is tied to the femur
  because the recess lies on the prefemoral fat pad) widened by ``BOX_MARGIN_X`` (2%) of the
  image width on each side;
* bottom: ``BOX_BELOW_CORTEX`` (1.2% of the height, ~3 px at 256) below the deepest point of
  the femur cortex over those columns;
* top: over those columns, the highest point ``BOX_TENDON_FRACTION`` (0.1) of the way up into
  the quadriceps tendon of the patient's *pocket-free* stack (femur, prefemoral fat pad, recess
  line, suprapatellar fat pad, tendon), i.e. just above the tendon's underside as a normal scan
  shows it. A pocket lifts the tendon but not the box: in distended scans the pocket fills more
  of the box (the bigger the pocket, the higher the tendon above the box top).
* annotator noise: each edge then moves by independent Gaussian noise of sd ``BOX_EDGE_NOISE``
  (1.5 px at 256, scaled with the size), clipped to the image.

Boxes are about as tall in both classes. A pocket taller than its box is clipped from the mask
(a fraction of a percent of pocket pixels). The
segmentation of a distended scan is its pocket (the part of the recess thicker than the
normal line), inside the box; normal scans carry their thin recess line.

Null control (``null=True``, ``python -m scans phantom --null``): the same streams, labels,
boxes and masks, but each distended scan is rendered without its pocket, i.e. exactly as the
normal scan its stream would draw (every random draw is made whatever the class); its mask is
where the pocket would have been.

Appearance (``appearance``, ``python -m scans phantom --appearance``, config ``phantom.appearance``):
what fills a pocket. ``anechoic`` (the default) is the above, byte for byte as phantom v4 made it;
``echogenic`` fills it with low-to-mid-level, coarse, heterogeneous echoes (acute haemarthrosis,
``ECHOGENIC_*``); ``mixed`` keeps the anechoic fluid with echogenic clots and synovial thickening
along the walls (``MIXED_*``). Their extra draws come from a separate stream (``[seed, 3, i]``),
so labels, boxes, masks, splits and every normal scan are identical across appearances; a
distended scan differs only inside its recess and the few pixels the point-spread function
blurs around it. The appearance joins the cache key only when it is not the default.

Pocket-free twins (:func:`dataset_twins`, :func:`twins_of`, ``--twins``): each image re-rendered
from its own stream without its pocket (as the null control draws it) but with fresh speckle,
the ideal inpainting of the scan for an "ideal-inpainter ceiling".

Distended scans spread over patients: a heavy-tailed propensity per patient, capped by
:func:`distended_cap` (at most 6 of the 123 distended images per patient by default).

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> anatomy = sample_anatomy(rng)
>>> scan = render_scan(rng, anatomy, severity=0.6, size=64)
>>> scan.image.shape, scan.image.dtype, bool(scan.pocket.any())
((64, 64), dtype('float32'), True)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from runtime.env import cache_home
from runtime.io import write_png
from scans.coco import encode_mask, save_coco
from scans.folds import make_folds, save_splits
from scans.importers.core import building_folder
from scans.records import Box, Scan, box_mask

# Part of every cached dataset's name: bump it whenever a change alters the rendered scans or boxes.
GENERATOR_VERSION = 4
OVERSAMPLE = 2
BOX_MARGIN_X = 0.02
# The box's bottom edge lies this far (fraction of the height) below the deepest point of the
# femur cortex over the box's columns.
BOX_BELOW_CORTEX = 0.012
# The box's top edge lies this fraction of the way up into the quadriceps tendon of the
# pocket-free stack (chosen on the development phantom, seed 100).
BOX_TENDON_FRACTION = 0.1
# Annotator noise: standard deviation of each box edge, fraction of the image size (1.5 px at 256).
BOX_EDGE_NOISE = 1.5 / 256
# Pocket peak height (fraction of the image height): POCKET_MIN + POCKET_RANGE * severity.
POCKET_MIN = 0.012
POCKET_RANGE = 0.16
# Normal knees: 45% hold up to this much physiological fluid (overlapping mild distension).
PHYSIOLOGICAL_FLUID = 0.028
# Shape of the gamma-distributed per-patient propensity to distension (heavy-tailed below 1).
ASSIGN_PROPENSITY_SHAPE = 0.25
# Half-width of the recess's end taper (fraction of the width): short, so the thin line's end, and
# the box's side, stay visible in speckle.
RECESS_END_RAMP = 0.008

# Appearance of the effusion (``appearance``). "anechoic" is phantom v4's pocket, unchanged; the
# others model haemarthrosis. Fixed once from its clinical descriptions, not tuned against any
# method's results. Levels are fractions of the mean backscatter amplitude of the patient's
# suprapatellar fat pad (the soft tissue around the recess); anechoic fluid is 0.03-0.18 of it (5th-95th
# percentiles; median 0.07, -24 dB).
APPEARANCES = ("anechoic", "echogenic", "mixed")
# echogenic: acute haemarthrosis fills the recess with low-to-mid-level echoes, hypoechoic to the
# fat pad (0.5 = -6 dB) yet far from the black of simple fluid.
ECHOGENIC_LEVEL = 0.5
# echogenic, mixed: lateral and axial correlation lengths (output pixels) of the blood's own
# texture, coarser than the fat lobules (2.5 x 1.6) and the speckle grain: clumped cells, fibrin.
ECHOGENIC_GRAIN = (4.0, 2.0)
# echogenic, mixed: log-amplitude sd of that texture, as heterogeneous as the fat lobules (0.6):
# clotting blood is heterogeneous, not a uniform grey.
ECHOGENIC_TEXTURE_SD = 0.6
# mixed: clots per pocket (uniform integer in this range): a few clots in otherwise anechoic blood.
MIXED_CLOTS = (1, 3)
# mixed: fresh clot is echogenic, nearly isoechoic to the fat pad (0.8 = -2 dB).
MIXED_CLOT_LEVEL = 0.8
# mixed: clot half-length along the recess and half-height, as fractions of the local pocket
# thickness: rounded-to-elongated clumps, small beside the pocket.
MIXED_CLOT_LENGTH = (0.3, 1.0)
MIXED_CLOT_HEIGHT = (0.15, 0.3)
# mixed: clots settle in the deeper (dependent, supine) part: centre this far down the pocket.
MIXED_CLOT_DEPTH = (0.4, 0.8)
# mixed: synovial thickening lining both walls, this fraction of the local pocket thickness on
# each wall, capped at MIXED_SYNOVIUM_MAX of the image height, irregular (villous) along the wall.
# With the clots, about a third of a pocket is echogenic and the fluid stays the larger part.
MIXED_SYNOVIUM_SHARE = 0.1
MIXED_SYNOVIUM_MAX = 0.02
# mixed: hypertrophied synovium is abnormal hypoechoic tissue lining the recess (0.6 = -4.4 dB).
MIXED_SYNOVIUM_LEVEL = 0.6

# Log-amplitude sd of the fat lobules' texture (fat layers and pads).
LOBULE_SD = 0.6

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
    pocket_outside: int = 0  # pocket pixels the box clips off the mask


def sample_anatomy(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one patient's anatomy.

    >>> sample_anatomy(np.random.default_rng(1)).femur_depth > 0.5
    True
    """
    skin_depth = rng.uniform(0.012, 0.03)
    skin = rng.uniform(0.012, 0.02)
    femur_depth = rng.uniform(0.58, 0.74)
    # Relative layer thicknesses, scaled so the stack lands on the femur.
    fat, tendon, spfat, prefem = (
        rng.uniform(0.07, 0.2),
        rng.uniform(0.08, 0.13),
        rng.uniform(0.06, 0.11),
        rng.uniform(0.06, 0.1),
    )
    recess = rng.uniform(0.008, 0.016)
    scale = (femur_depth - skin_depth - skin - recess) / (fat + tendon + spfat + prefem)
    start = rng.uniform(0.12, 0.32)
    end = rng.uniform(0.64, 0.82)
    return PatientAnatomy(
        skin_depth=skin_depth,
        skin=skin,
        fat=fat * scale,
        tendon=tendon * scale,
        spfat=spfat * scale,
        recess=recess,
        prefemoral=prefem * scale,
        femur_depth=femur_depth,
        femur_curv=rng.uniform(-0.05, 0.22),
        femur_vertex=rng.uniform(0.3, 0.7),
        femur_slope=rng.uniform(-0.06, 0.05),
        recess_start=start,
        recess_end=end,
        patella_start=rng.uniform(end + 0.06, 1.25),
        patella_rise=rng.uniform(0.15, 0.35),
        fat_echo=rng.uniform(0.04, 0.09),
        tendon_echo=rng.uniform(0.35, 0.6),
        pad_echo=rng.uniform(0.12, 0.25),
        gain_db=rng.uniform(-3.0, 3.0),
        dynamic_range=rng.uniform(48.0, 60.0),
        tgc=rng.uniform(1.6, 2.6),
        psf_lateral=rng.uniform(1.0, 1.5),
        psf_axial=rng.uniform(0.45, 0.6),
    )


def _smoothstep(x: np.ndarray) -> np.ndarray:
    t = np.clip(x, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smooth_noise_1d(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Unit-std 1-D noise smoothed over ``sigma`` samples (gentle boundary undulation)."""
    x = cv2.GaussianBlur(
        rng.standard_normal((1, n), dtype=np.float32), (0, 0), sigmaX=sigma, borderType=cv2.BORDER_REFLECT
    )[0]
    return x / (x.std() + 1e-6)


def _texture(rng: np.random.Generator, shape: tuple[int, int], sx: float, sy: float, scale: int) -> np.ndarray:
    """Unit-std correlated noise, drawn at ``1/scale`` resolution (cheap) then upsampled."""
    h, w = shape
    noise = rng.standard_normal((h // scale, w // scale), dtype=np.float32)
    small = cv2.GaussianBlur(
        noise, (0, 0), sigmaX=max(sx / scale, 0.3), sigmaY=max(sy / scale, 0.3), borderType=cv2.BORDER_REFLECT
    )
    small = small / (small.std() + 1e-6)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def _pocket_profile(rng: np.random.Generator, v: np.ndarray, start: float, end: float) -> np.ndarray:
    """Lens-shaped unit-height profile inside ``[start, end]``, asymmetric and off-centre."""
    length = end - start
    centre = start + length * rng.uniform(0.35, 0.65)
    left = (centre - start) * rng.uniform(0.6, 1.0)
    right = (end - centre) * rng.uniform(0.6, 1.0)
    d = np.where(v < centre, (v - centre) / left, (v - centre) / right)
    return np.clip(1.0 - d * d, 0.0, None) ** rng.uniform(0.5, 0.9)


@dataclass(frozen=True)
class ScanGeometry:
    """Everything :func:`render_scan` draws before the pixels: boundary curves (one value per
    image column, depths as fractions of the height), the annotated box and the masks at the
    output size. ``anatomical_box`` is the box rule's exact box, ``box`` the annotated one (with
    annotator noise). ``pocket`` is the region of the pocket the severity calls for, even when the
    scan is rendered without it (the ``null`` control); ``pocket_height`` is its peak in pixels."""

    skin_top: np.ndarray
    fat_top: np.ndarray
    tendon_top: np.ndarray
    tendon_bot: np.ndarray
    roof: np.ndarray
    floor: np.ndarray
    femur: np.ndarray
    taper: np.ndarray
    shift: float
    press: float
    gain_db: float
    rendered_pocket: bool
    anatomical_box: Box
    box: Box
    recess: np.ndarray
    pocket: np.ndarray
    pocket_height: float
    pocket_outside: int = 0  # pocket pixels the box clips off the mask


def _soft_tissue(
    a: PatientAnatomy,
    floor: np.ndarray,
    thick: np.ndarray,
    fluid_h: np.ndarray,
    spfat: np.ndarray,
    skin_top: np.ndarray,
    vs: np.ndarray,
    press: float,
) -> tuple[np.ndarray, ...]:
    """Roof, tendon underside and top, fat top above a recess of thickness ``thick`` holding
    ``fluid_h`` of fluid: the fluid compresses the suprapatellar fat pad and lifts the rest."""
    roof = floor - thick
    spfat = np.maximum(spfat - 0.45 * fluid_h, 0.35 * spfat)
    tendon_bot = roof - spfat
    tendon_top = tendon_bot - a.tendon * (1 + 0.15 * (vs - 0.5)) * press
    fat_top = skin_top + a.skin
    # Keep the stack ordered where it overflows (big pocket, thick pads): the soft tissue above
    # gives way, never the recess, the femur or the skin.
    tendon_bot = np.minimum(tendon_bot, roof - 0.2 * a.spfat)
    tendon_top = np.minimum(np.maximum(tendon_top, fat_top + 0.3 * a.fat * press), tendon_bot - 0.3 * a.tendon)
    return roof, tendon_bot, tendon_top, fat_top


def scan_geometry(
    rng: np.random.Generator, anatomy: PatientAnatomy, severity: float, size: int, null: bool = False
) -> ScanGeometry:
    """The geometry of one scan (the first draws of :func:`render_scan`, which calls it).

    ``severity`` 0 is a normal recess, (0, 1] a distended one. With ``null`` a distended scan's
    pocket is computed (its region is the mask) but not rendered: the scan is drawn exactly as a
    normal one. The box never depends on ``severity`` (see the module docstring).

    >>> a = sample_anatomy(np.random.default_rng(0))
    >>> g0 = scan_geometry(np.random.default_rng(5), a, 0.0, 64)
    >>> g1 = scan_geometry(np.random.default_rng(5), a, 0.9, 64)
    >>> g0.box == g1.box, bool(g1.pocket.any()), bool(g1.roof.min() < g0.roof.min())
    (True, True, True)
    """
    a = anatomy
    wr = size
    v = ((np.arange(wr) + 0.5) / wr).astype(np.float32)

    # Image-level jitter: probe position, tilt, pressure, depth and gain.
    shift = rng.normal(0.0, 0.035)
    tilt = rng.normal(0.0, 0.02)
    depth = rng.normal(0.0, 0.012)
    press = rng.uniform(0.9, 1.05)
    gain_db = a.gain_db + rng.normal(0.0, 1.0)
    vs = v - shift  # anatomy coordinates under this probe position
    start, end = a.recess_start + shift, a.recess_end + shift

    femur = (
        a.femur_depth
        + depth
        + a.femur_curv * (vs - a.femur_vertex) ** 2
        + (a.femur_slope + tilt) * (v - 0.5)
        + 0.004 * _smooth_noise_1d(rng, wr, wr / 10)
    )
    prefem = a.prefemoral * (0.75 + 0.5 * np.clip(vs, 0, 1)) * (1 + 0.08 * _smooth_noise_1d(rng, wr, wr / 8))
    floor = femur - prefem

    # Recess thickness along the scan: the thin line, plus fluid. Normal knees sometimes hold a
    # little physiological fluid so that mild distension overlaps normality. Every draw is made
    # whatever the severity, so a scan's other features do not depend on its class.
    ramp = RECESS_END_RAMP
    taper = _smoothstep((v - start + ramp) / (2 * ramp)) * _smoothstep((end + ramp - v) / (2 * ramp))
    line = a.recess * rng.uniform(0.8, 1.25) * (1 + 0.25 * _smooth_noise_1d(rng, wr, wr / 12))
    physiological = rng.uniform(0.0, PHYSIOLOGICAL_FLUID) if rng.random() < 0.45 else 0.0
    profile = _pocket_profile(rng, v, start, end) * taper
    pocket_h = POCKET_MIN + POCKET_RANGE * float(severity) if severity > 0 else 0.0
    rendered_pocket = severity > 0 and not null
    fluid_h = (pocket_h if rendered_pocket else physiological) * profile
    spfat = a.spfat * (0.6 + 0.8 * np.clip(vs, 0, 1)) * (1 + 0.1 * _smooth_noise_1d(rng, wr, wr / 8))
    skin_top = np.full_like(v, a.skin_depth) + 0.002 * _smooth_noise_1d(rng, wr, wr / 6)
    roof, tendon_bot, tendon_top, fat_top = _soft_tissue(
        a, floor, line * taper + fluid_h, fluid_h, spfat, skin_top, vs, press
    )

    # Masks at output resolution (the curves are sampled at the output columns).
    rows = (np.arange(size) + 0.5)[:, None] / size
    half = 0.5 / size  # a pixel belongs when its centre is within half a pixel of the recess
    below_floor = rows <= floor[None, :] + half
    recess = (rows >= roof[None, :] - half) & below_floor & (taper > 0.5)[None, :]
    pocket = np.zeros_like(recess)
    if pocket_h > 0:  # where the pocket is, or would be (null): same rule in both cases
        fluid_pocket = pocket_h * profile
        pocket = (
            (rows >= (floor - line * taper - fluid_pocket)[None, :] - half)
            & below_floor
            & (fluid_pocket > 1.0 / size)[None, :]
            & (taper > 0.05)[None, :]
        )

    # Box: the recess extent plus a margin; from just below the femur cortex up to a fixed
    # fraction into the tendon of the *pocket-free* stack (the anatomy a normal scan shows),
    # then annotator noise on each edge. Nothing here depends on the severity.
    _, ref_bot, ref_top, _ = _soft_tissue(a, floor, line * taper, np.zeros_like(v), spfat, skin_top, vs, press)
    x1 = max(0.0, (start - BOX_MARGIN_X) * size)
    x2 = min(float(size), (end + BOX_MARGIN_X) * size)
    c0, c1 = int(x1), max(int(np.ceil(x2)), int(x1) + 1)
    top = float((ref_bot - BOX_TENDON_FRACTION * (ref_bot - ref_top))[c0:c1].min())
    bottom = float(femur[c0:c1].max()) + BOX_BELOW_CORTEX
    exact = (float(x1), max(top * size, 0.0), float(x2), min(bottom * size, float(size)))
    noise = rng.normal(0.0, BOX_EDGE_NOISE * size, 4)
    x1, x2 = np.clip([x1 + noise[0], x2 + noise[2]], 0.0, float(size))
    y1, y2 = np.clip([top * size + noise[1], bottom * size + noise[3]], 0.0, float(size))
    x2, y2 = max(x2, min(x1 + 1.0, size)), max(y2, min(y1 + 1.0, size))
    box = (round(float(x1), 2), round(float(y1), 2), round(float(x2), 2), round(float(y2), 2))
    inside = box_mask(box, size, size)
    return ScanGeometry(
        skin_top=skin_top,
        fat_top=fat_top,
        tendon_top=tendon_top,
        tendon_bot=tendon_bot,
        roof=roof,
        floor=floor,
        femur=femur,
        taper=taper,
        shift=float(shift),
        press=float(press),
        gain_db=float(gain_db),
        rendered_pocket=rendered_pocket,
        anatomical_box=exact,
        box=box,
        recess=recess & inside,
        pocket=pocket & inside,
        pocket_height=float(pocket_h * size),
        pocket_outside=int((pocket & ~inside).sum()),
    )


def _pocket_content(
    rng: np.random.Generator,
    appearance: str,
    amp: np.ndarray,
    in_recess: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    roof: np.ndarray,
    floor: np.ndarray,
    pad_mean: float,
) -> None:
    """Fill a distended recess (``in_recess``, at the oversampled grid) of ``amp`` in place with
    the ``appearance``'s echoes (see ``APPEARANCES``); every draw comes from ``rng``."""
    hr, wr = amp.shape
    sd = ECHOGENIC_TEXTURE_SD
    grain = _texture(rng, (hr, wr), sx=ECHOGENIC_GRAIN[0], sy=ECHOGENIC_GRAIN[1] * OVERSAMPLE, scale=2)
    level = pad_mean * np.exp(sd * grain - 0.5 * sd * sd)  # mean 1 x the fat pad's mean amplitude
    if appearance == "echogenic":
        amp[in_recess] = ECHOGENIC_LEVEL * level[in_recess]
        return
    # mixed: anechoic fluid (left as it is), synovial thickening along both walls, a few clots.
    thick = np.clip(floor - roof, 0.0, None)
    lining = np.minimum(MIXED_SYNOVIUM_SHARE * thick, MIXED_SYNOVIUM_MAX)
    lining = lining * (1 + 0.5 * _smooth_noise_1d(rng, wr, wr / 30)).clip(0.0)
    synovium = in_recess & ((u < (roof + lining)[None, :]) | (u > (floor - lining)[None, :]))
    clot = np.zeros_like(in_recess)
    cols = in_recess.any(axis=0)
    weight = thick * cols
    edge = _texture(rng, (hr, wr), sx=2.0, sy=1.0 * OVERSAMPLE, scale=2)
    for _ in range(int(rng.integers(MIXED_CLOTS[0], MIXED_CLOTS[1] + 1))):
        if weight.sum() <= 0:
            break
        c = int(rng.choice(wr, p=weight / weight.sum()))
        t = float(thick[c])
        cx, cy = v[c], roof[c] + t * rng.uniform(*MIXED_CLOT_DEPTH)
        rx, ry = t * rng.uniform(*MIXED_CLOT_LENGTH), t * rng.uniform(*MIXED_CLOT_HEIGHT)
        d = ((v[None, :] - cx) / max(rx, 1e-6)) ** 2 + ((u - cy) / max(ry, 1e-6)) ** 2
        clot |= d < 1.0 + 0.3 * edge  # irregular outline
    clot &= in_recess
    amp[synovium] = MIXED_SYNOVIUM_LEVEL * level[synovium]
    amp[clot] = MIXED_CLOT_LEVEL * level[clot]


def render_scan(
    rng: np.random.Generator,
    anatomy: PatientAnatomy,
    severity: float,
    size: int,
    null: bool = False,
    *,
    appearance: str = "anechoic",
    appearance_rng: np.random.Generator | None = None,
    speckle_rng: np.random.Generator | None = None,
) -> RenderedScan:
    """Render one scan. ``severity`` 0 is a normal recess; (0, 1] a distended one of growing size.

    Pure function of its arguments (the image-level jitter comes from ``rng``). The geometry
    (curves, box, masks) is :func:`scan_geometry`'s; ``null`` renders a distended scan without
    its pocket (see there).

    ``appearance`` (one of ``APPEARANCES``) is what fills a rendered pocket: ``anechoic`` (phantom
    v4), ``echogenic`` (low-to-mid-level heterogeneous echoes, ``ECHOGENIC_*``) or ``mixed``
    (anechoic fluid with clots and synovial thickening, ``MIXED_*``). The extra draws come from
    ``appearance_rng`` (default: spawned from ``rng``, which it does not advance), so ``rng``'s
    stream, and every normal or ``null`` scan, is the same whatever the appearance.

    ``speckle_rng`` draws the scatterers (the speckle) instead of ``rng``, which still makes every
    draw: a fresh speckle realisation of the same scan (see :func:`dataset_twins`).

    >>> a = sample_anatomy(np.random.default_rng(0))
    >>> s = render_scan(np.random.default_rng(1), a, 0.0, 64)
    >>> bool(s.pocket.any()), s.box[3] > s.box[1]
    (False, True)
    >>> e = render_scan(np.random.default_rng(1), a, 0.0, 64, appearance="echogenic")
    >>> bool(np.array_equal(e.image, s.image))  # a normal scan has no pocket to fill
    True
    """
    _check_appearance(appearance)
    a = anatomy
    g = scan_geometry(rng, anatomy, severity, size, null)
    # Oversampled axially only: axial speckle is finer than lateral, and this halves the cost.
    hr, wr = size * OVERSAMPLE, size
    v = ((np.arange(wr) + 0.5) / wr).astype(np.float32)
    u = ((np.arange(hr) + 0.5) / hr).astype(np.float32)[:, None]
    shift, taper = g.shift, g.taper
    skin_top, tendon_top, tendon_bot, roof, floor, femur = (
        g.skin_top,
        g.tendon_top,
        g.tendon_bot,
        g.roof,
        g.floor,
        g.femur,
    )
    bounds = [skin_top, g.fat_top, tendon_top, tendon_bot, roof, floor, femur]
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
    # Mostly anechoic; some pockets hold echogenic blood and read hypoechoic. The draws are made
    # for every scan (the streams stay aligned between classes and with the null control).
    blood = rng.beta(0.8, 2.5)
    debris, debris_rate, debris_amp = rng.random(), rng.uniform(0.003, 0.015), rng.uniform(0.1, 0.3)
    fluid = 0.006 + 0.045 * blood if g.rendered_pocket else 0.006
    echo = np.array(
        [0.004, 0.35, a.fat_echo, a.tendon_echo, a.pad_echo, fluid, a.pad_echo * 1.15, 0.02], dtype=np.float32
    )
    # Fibrillar tendon: long lateral streaks that follow the tendon's course (remapped rows).
    fib = _texture(rng, (hr, wr), sx=8.0, sy=0.6 * OVERSAMPLE, scale=2)
    mapx = np.broadcast_to(np.arange(wr, dtype=np.float32)[None, :], (hr, wr))
    mapy = (
        np.arange(hr, dtype=np.float32)[:, None] + ((tendon_top - tendon_top.mean()) * hr).astype(np.float32)[None, :]
    )
    fib = cv2.remap(fib, mapx, mapy, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # Fat lobules: blobby log-normal echogenicity.
    lob = _texture(rng, (hr, wr), sx=2.5, sy=1.6 * OVERSAMPLE, scale=2)
    tex = np.where(label == TENDON, 0.75 * fib, LOBULE_SD * lob)
    tex = np.where(label == BONE, 0.0, tex)
    amp = echo[label] * np.exp(tex)
    if g.rendered_pocket and appearance != "anechoic":
        pad_mean = float(a.pad_echo * np.exp(0.5 * LOBULE_SD**2))  # the fat pad's mean (lognormal lobules)
        if appearance_rng is None:
            appearance_rng = rng.spawn(1)[0]
        _pocket_content(appearance_rng, appearance, amp, label == RECESS, u, v, roof, floor, pad_mean)

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
        cv2.line(
            septa,
            (int(x0), int(y0)),
            (int(x1), int(y0 + (x1 - x0) * ang * OVERSAMPLE)),
            float(rng.uniform(0.2, 0.6)),
            1,
        )
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
    n = rng.standard_normal((2, hr, wr), dtype=np.float32)
    if speckle_rng is not None:
        n = speckle_rng.standard_normal((2, hr, wr), dtype=np.float32)
    if g.rendered_pocket and debris < 0.5:
        # Faint internal echoes (debris, clot) scattered in the pocket: the stream's last draw.
        r0 = max(int(roof.min() * hr) - 1, 0)
        r1 = min(int(floor.max() * hr) + 2, hr)
        sub = amp[r0:r1]
        sparkle = (rng.random(sub.shape, dtype=np.float32) < debris_rate) & (label[r0:r1] == RECESS)
        sub[sparkle] += debris_amp
    sx, sy = a.psf_lateral, a.psf_axial * OVERSAMPLE
    norm = np.float32(2.0 * np.sqrt(np.pi * sx * sy))
    scat = (amp * att + 0.008) * norm
    re = cv2.GaussianBlur(scat * n[0] + spec * att, (0, 0), sigmaX=sx, sigmaY=sy)
    im = cv2.GaussianBlur(scat * n[1], (0, 0), sigmaX=sx, sigmaY=sy)
    # The lateral beam widens away from the focus (about a third of the depth).
    w_far = np.clip(np.abs(u - 0.35) / 0.5, 0.0, 1.0)
    re += w_far * (cv2.GaussianBlur(re, (0, 0), sigmaX=sx, sigmaY=0.3) - re)
    im += w_far * (cv2.GaussianBlur(im, (0, 0), sigmaX=sx, sigmaY=0.3) - im)
    env = cv2.magnitude(re, im)

    db = 20.0 * np.log10(env + 1e-6) + (g.gain_db - 14.0)
    img = np.clip(1.0 + db / a.dynamic_range, 0.0, 1.0)
    img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    return RenderedScan(img, g.box, g.recess, g.pocket, g.pocket_height)


# ----------------------------------------------------------------------------------------
# Dataset


def distended_cap(n_distended: int, counts: np.ndarray) -> int:
    """Most distended images one patient may hold: 5% of the distended images, or twice the even
    share ``2 * n_distended / n_patients`` (rounded up) when larger (small datasets keep some
    heterogeneity), raised until the patients' image counts ``counts`` can take them all
    (nobody holds more distended images than images).

    >>> distended_cap(123, np.full(60, 8)), distended_cap(8, np.full(8, 3)), distended_cap(4, np.array([1, 1, 5]))
    (6, 2, 3)
    """
    cap = max(int(0.05 * n_distended), -(-2 * n_distended // len(counts)), 1 if n_distended else 0)
    while np.minimum(counts, cap).sum() < n_distended and cap < counts.max():
        cap += 1
    return cap


def _assign(
    rng: np.random.Generator, n_images: int, n_distended: int, n_patients: int
) -> tuple[np.ndarray, np.ndarray]:
    """Patient index per image and the distended flags: exact counts, uneven across patients.

    Distended images are drawn one at a time without replacement, each weighted by its patient's
    heavy-tailed propensity (some patients bleed often, many never), but no patient takes more
    than :func:`distended_cap`: distension spreads over many patients and no one patient's
    anatomy stands for the class.
    """
    counts = 1 + rng.multinomial(n_images - n_patients, rng.dirichlet(np.full(n_patients, 4.0)))
    patient = np.repeat(np.arange(n_patients), counts)
    propensity = rng.gamma(ASSIGN_PROPENSITY_SHAPE, size=n_patients) + 1e-3
    cap = distended_cap(n_distended, counts)
    held = np.zeros(n_patients, dtype=np.int64)
    free = np.ones(n_images, dtype=bool)
    distended = np.zeros(n_images, dtype=bool)
    for _ in range(n_distended):
        w = propensity[patient] * free * (held < np.minimum(counts, cap))[patient]
        i = int(rng.choice(n_images, p=w / w.sum()))
        free[i], distended[i] = False, True
        held[patient[i]] += 1
    return patient, distended


def _plan(
    n_images: int, n_distended: int, n_patients: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[PatientAnatomy]]:
    """Patient per image, distended flags and the patients' anatomies of a dataset."""
    patient, distended = _assign(np.random.default_rng([seed, 2]), n_images, n_distended, n_patients)
    anatomies = [sample_anatomy(np.random.default_rng([seed, 0, p])) for p in range(n_patients)]
    return patient, distended, anatomies


def _image_draws(seed: int, i: int, distended: bool) -> tuple[np.random.Generator, float]:
    """Image ``i``'s random stream and severity (drawn from it; the same with ``null``)."""
    rng = np.random.default_rng([seed, 1, i])
    severity = float(rng.beta(1.1, 1.8)) if distended else 0.0
    return rng, severity


def _appearance_rng(seed: int, i: int) -> np.random.Generator:
    """Image ``i``'s stream for the pocket's content (non-default appearances only)."""
    return np.random.default_rng([seed, 3, i])


def _check_appearance(appearance: str) -> None:
    if appearance not in APPEARANCES:
        raise ValueError(f"appearance must be one of {'|'.join(APPEARANCES)}, got {appearance!r}")


def _to_8bit(image: np.ndarray) -> np.ndarray:
    return np.round(image * 255.0).astype(np.uint8)


def _twin(seed: int, i: int, anatomy: PatientAnatomy, distended: bool, size: int, draw: int) -> np.ndarray:
    """Image ``i``'s pocket-free twin (8-bit): its stream rendered as ``null`` with fresh speckle."""
    rng, severity = _image_draws(seed, i, distended)
    speckle = np.random.default_rng([seed, 4, i, draw])
    return _to_8bit(render_scan(rng, anatomy, severity, size, null=True, speckle_rng=speckle).image)


def dataset_geometry(
    n_images: int = 483,
    n_distended: int = 123,
    n_patients: int = 60,
    size: int = 256,
    seed: int = 0,
    null: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[ScanGeometry]]:
    """Patient per image, distended flags and each image's :class:`ScanGeometry` (boxes, masks),
    exactly as :func:`generate_dataset` would make them, without rendering a pixel (fast).

    >>> p, d, g = dataset_geometry(12, 3, 6, size=64)
    >>> len(g), int(d.sum()), len(set(p.tolist()))
    (12, 3, 6)
    """
    patient, distended, anatomies = _plan(n_images, n_distended, n_patients, seed)
    geoms = []
    for i in range(n_images):
        rng, severity = _image_draws(seed, i, bool(distended[i]))
        geoms.append(scan_geometry(rng, anatomies[patient[i]], severity, size, null))
    return patient, distended, geoms


# What generate_dataset accepts: a rendered side of 32 to 2048 pixels (2048 px images take 4 MB each as PNG
# and far more while rendering), enough patients for its 5 patient-grouped folds with a validation part.
SIZE_RANGE = (32, 2048)
MIN_PATIENTS = 6
SEED_MAX = 2**32 - 1


def check_arguments(n_images: int, n_distended: int, n_patients: int, size: int, seed: int = 0) -> None:
    """Refuse a phantom that cannot be made, before anything renders; each message names the parameter
    and its ``python -m scans phantom`` option.

    >>> check_arguments(10, 12, 6, 64)
    Traceback (most recent call last):
    ...
    ValueError: n_distended (--distended) must be in [0, 10] (at most the number of images), got 12
    """

    def whole(value: object) -> bool:
        return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

    named = {"n_images": n_images, "n_distended": n_distended, "n_patients": n_patients, "size": size, "seed": seed}
    for name, value in named.items():
        if not whole(value):
            raise ValueError(f"{name} (--{name.removeprefix('n_')}) must be a whole number, got {value!r}")
    if n_images < MIN_PATIENTS:
        raise ValueError(
            f"n_images (--images) must be {MIN_PATIENTS} or more (one per patient at least), got {n_images}"
        )
    if not MIN_PATIENTS <= n_patients <= n_images:
        raise ValueError(
            f"n_patients (--patients) must be in [{MIN_PATIENTS}, {n_images}] (5 patient-grouped folds with a "
            f"validation part need {MIN_PATIENTS}; at most one patient per image), got {n_patients}"
        )
    if not 0 <= n_distended <= n_images:
        raise ValueError(
            f"n_distended (--distended) must be in [0, {n_images}] (at most the number of images), got {n_distended}"
        )
    low, high = SIZE_RANGE
    if not low <= size <= high:
        raise ValueError(f"size (--size) must be in [{low}, {high}] pixels, got {size}")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed (--seed) must be in [0, {SEED_MAX}], got {seed}")


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose another --out or remove it")


def generate_dataset(
    out: Path | str,
    n_images: int = 483,
    n_distended: int = 123,
    n_patients: int = 60,
    size: int = 256,
    seed: int = 0,
    progress: bool = True,
    null: bool = False,
    appearance: str = "anechoic",
    twins: bool = False,
) -> Path:
    """Write a phantom dataset folder (``images/``, ``annotations.json``, ``splits.json``).

    ``null`` writes the negative control: the same dataset (same streams, labels, boxes and
    masks) but every distended scan rendered without its pocket, i.e. as a normal scan; its
    mask is where the pocket would have been. Normal scans are identical in both.

    ``appearance`` fills the pockets (see :func:`render_scan`); only the distended scans'
    pixels change with it (labels, boxes, masks, splits and normal scans are the same).
    ``twins`` also writes ``twins/`` (see :func:`dataset_twins`), with the images' file names.

    Built in a temporary sibling folder and renamed into place, so a killed run leaves no
    half dataset. Refuses a non-empty existing ``out``.

    >>> import tempfile
    >>> d = generate_dataset(Path(tempfile.mkdtemp()) / "ph", 12, 3, 6, size=64, progress=False)
    >>> sorted(p.name for p in d.iterdir())
    ['annotations.json', 'images', 'splits.json']
    """
    out = Path(out)
    check_arguments(n_images, n_distended, n_patients, size, seed)
    _check_appearance(appearance)
    _check_out(out)
    with building_folder(out, "tmp") as tmp:
        (tmp / "images").mkdir()
        if twins:
            (tmp / "twins").mkdir()
        patient, distended, anatomies = _plan(n_images, n_distended, n_patients, seed)
        width = len(str(n_patients))
        scans: list[Scan] = []
        it = range(n_images)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc="phantom", unit="img", file=sys.stderr)
        for i in it:
            rng, severity = _image_draws(seed, i, bool(distended[i]))
            r = render_scan(
                rng,
                anatomies[patient[i]],
                severity,
                size,
                null,
                appearance=appearance,
                appearance_rng=_appearance_rng(seed, i),
            )
            path = tmp / "images" / f"{i + 1:04d}.png"
            write_png(path, _to_8bit(r.image))
            if twins:
                write_png(tmp / "twins" / path.name, _twin(seed, i, anatomies[patient[i]], bool(distended[i]), size, 0))
            mask = r.pocket if distended[i] else r.recess
            scans.append(
                Scan(
                    id=i + 1,
                    path=path,
                    patient=f"P{patient[i] + 1:0{width}d}",
                    label=int(distended[i]),
                    box=r.box,
                    width=size,
                    height=size,
                    segmentation=encode_mask(mask),
                )
            )
        save_coco(tmp / "annotations.json", scans, tmp)
        save_splits(tmp / "splits.json", make_folds(scans, k=5, seed=seed))
        _check_out(out)
    return out


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """Where phantoms are cached: ``cache_dir``, else ``phantom/`` in LoRIS's cache
    (:func:`runtime.env.cache_home`).

    >>> cache_root("/tmp/x").as_posix(), cache_root().name
    ('/tmp/x', 'phantom')
    """
    return Path(cache_dir) if cache_dir is not None else cache_home() / "phantom"


def dataset_key(
    n_images: int = 483,
    n_distended: int = 123,
    n_patients: int = 60,
    size: int = 256,
    seed: int = 0,
    null: bool = False,
    appearance: str = "anechoic",
) -> str:
    """Cache key naming the generator version and every parameter; the appearance only when it is
    not the default (the keys of existing anechoic datasets stay the same).

    >>> dataset_key(), dataset_key(null=True), dataset_key(appearance="mixed")
    ('v4-n483-d123-p60-s256-seed0', 'v4-n483-d123-p60-s256-seed0-null', 'v4-n483-d123-p60-s256-seed0-mixed')
    """
    _check_appearance(appearance)
    return (
        f"v{GENERATOR_VERSION}-n{n_images}-d{n_distended}-p{n_patients}-s{size}-seed{seed}"
        + (f"-{appearance}" if appearance != "anechoic" else "")
        + ("-null" if null else "")
    )


def default_dataset(
    cache_dir: Path | str | None = None,
    n_images: int = 483,
    n_distended: int = 123,
    n_patients: int = 60,
    size: int = 256,
    seed: int = 0,
    progress: bool = True,
    null: bool = False,
    appearance: str = "anechoic",
) -> Path:
    """The default dataset: generated on first use into the cache (see :func:`cache_root`), then reused.
    ``null`` gives the negative control, ``appearance`` the pockets' content (see :func:`generate_dataset`).

    >>> import tempfile
    >>> d = default_dataset(tempfile.mkdtemp(), n_images=12, n_distended=3, n_patients=6, size=64, progress=False)
    >>> d.name, (d / "annotations.json").is_file()
    ('v4-n12-d3-p6-s64-seed0', True)
    """
    target = cache_root(cache_dir) / dataset_key(n_images, n_distended, n_patients, size, seed, null, appearance)
    if (target / "annotations.json").is_file() and (target / "splits.json").is_file():
        return target
    if progress:
        print(f"generating the phantom dataset into {target} (first use only)", file=sys.stderr)
    try:
        return generate_dataset(target, n_images, n_distended, n_patients, size, seed, progress, null, appearance)
    except FileExistsError:
        # Another process finished the same dataset first; the rename makes it complete.
        if (target / "annotations.json").is_file():
            return target
        raise


# ----------------------------------------------------------------------------------------
# Pocket-free twins (the ideal inpainter)


def dataset_twins(
    n_images: int = 483,
    n_distended: int = 123,
    n_patients: int = 60,
    size: int = 256,
    seed: int = 0,
    draw: int = 0,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Each image's pocket-free twin: what an ideal inpainter could return for the dataset that
    :func:`generate_dataset` makes of these parameters (of any ``null`` or ``appearance``).

    A twin is its scan's own stream (anatomy, probe jitter, gain, tissue textures, box) rendered
    without the pocket, i.e. as the ``null`` control draws it (the recess a normal knee would
    show there, the soft tissue not lifted), with a fresh speckle (scatterer) draw: stream
    ``[seed, 4, i, draw]``. A normal scan's twin is the same scan with fresh speckle. Keys are
    the images' ``file_name`` in ``annotations.json`` (``images/0001.png`` ...), in its order;
    values float32 ``[size, size]`` in [0, 1] on the 8-bit grid of the images (what ``twins/``
    PNGs hold, see :func:`write_twins`). Deterministic in the parameters and ``draw``.

    >>> t = dataset_twins(12, 3, 6, size=64)
    >>> list(t)[:2], t["images/0001.png"].shape, t["images/0001.png"].dtype
    (['images/0001.png', 'images/0002.png'], (64, 64), dtype('float32'))
    """
    patient, distended, anatomies = _plan(n_images, n_distended, n_patients, seed)
    it = range(n_images)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="twins", unit="img", file=sys.stderr)
    return {
        f"images/{i + 1:04d}.png": _twin(seed, i, anatomies[patient[i]], bool(distended[i]), size, draw).astype(
            np.float32
        )
        / np.float32(255.0)
        for i in it
    }


def _composition(root: Path, seed: int) -> tuple[int, int, int, int]:
    """``(n_images, n_distended, n_patients, size)`` of the phantom folder ``root``, checked: its
    labels, patients and boxes must be those the phantom of ``seed`` draws."""
    doc = json.loads((root / "annotations.json").read_text())
    images = sorted(doc["images"], key=lambda im: im["id"])
    n = len(images)
    comp = (
        n,
        sum(bool(im["distended"]) for im in images),
        len({im["patient_id"] for im in images}),
        images[0]["width"],
    )
    why = ""
    if [im["id"] for im in images] != list(range(1, n + 1)) or any(
        im["file_name"] != f"images/{im['id']:04d}.png" for im in images
    ):
        why = "its ids and file names are not a phantom's"
    else:
        patient, distended, geoms = dataset_geometry(*comp, seed=seed)
        boxes = {a["image_id"]: a["bbox"] for a in doc["annotations"]}
        for i, im in enumerate(images):
            x, y, w, h = boxes.get(im["id"], (np.nan,) * 4)
            if bool(im["distended"]) != bool(distended[i]) or not np.allclose(
                (x, y, x + w, y + h), geoms[i].box, atol=0.02
            ):
                why = f"image {im['id']} differs (label or box)"
                break
    if why:
        raise ValueError(f"{root}: not the phantom of seed {seed} ({why}); twins need the seed it was made with")
    return comp


def twins_of(root: Path | str, seed: int, draw: int = 0, progress: bool = False) -> dict[str, np.ndarray]:
    """The pocket-free twins (:func:`dataset_twins`) of the phantom folder ``root`` made with ``seed``:
    the composition is read from its ``annotations.json``, which must match the seed's phantom
    (labels and boxes; ``ValueError`` otherwise). Works for any ``null`` or ``appearance``."""
    return dataset_twins(*_composition(Path(root), seed), seed=seed, draw=draw, progress=progress)


def write_twins(root: Path | str, seed: int, draw: int = 0, progress: bool = False) -> Path:
    """Write the twins of the phantom folder ``root`` (made with ``seed``) as 8-bit PNGs into
    ``root/twins/`` with the images' names (atomically; refuses an existing non-empty ``twins/``)."""
    root = Path(root)
    out = root / "twins"

    def check() -> None:
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise FileExistsError(f"{out} already exists and is not empty; remove it to write the twins again")

    check()
    twins = twins_of(root, seed, draw, progress)
    with building_folder(out, "tmp") as tmp:
        for name, image in twins.items():
            write_png(tmp / Path(name).name, _to_8bit(image))
        check()
    return out


def summary(root: Path | str) -> dict[str, float]:
    """Box heights and counts of a phantom folder (a quick sanity check)."""
    doc = json.loads((Path(root) / "annotations.json").read_text())
    dist = {im["id"]: im["distended"] for im in doc["images"]}
    h: dict[bool, list[float]] = {True: [], False: []}
    for ann in doc["annotations"]:
        h[dist[ann["image_id"]]].append(ann["bbox"][3])
    return {
        "images": len(doc["images"]),
        "distended": sum(dist.values()),
        "box_h_normal": float(np.mean(h[False])) if h[False] else float("nan"),
        "box_h_distended": float(np.mean(h[True])) if h[True] else float("nan"),
    }
