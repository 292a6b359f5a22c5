"""Pathfinder (Long Range Arena) as a TFDS builder, with its own numpy renderer.

A black image holds smooth random contours drawn as dashes (paddles) separated by gaps of
about one pixel, and two round markers. Two long contours are drawn; in
a positive (label 1) both markers sit on the two ends of the first one, in a negative one
marker sits on an end of each, so both classes show the same contours and markers. Short
distractor contours fill the rest.

Geometry the renderer guarantees (and the tests check with a flood fill): along one contour
consecutive bright pixels are within Chebyshev distance 2 (a gap of one pixel), and pixels of
different contours are at Chebyshev distance >= 3. So the markers are joined by a chain of
bright pixels with steps of at most 2 iff the label is 1.
"""
import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from experiments.data import synthetic

BRIDGE = 2      # largest Chebyshev step between consecutive bright pixels of one contour
CLEARANCE = 3   # smallest Chebyshev distance between pixels of different contours
_SAMPLE = 0.25  # arc-length spacing of the points a contour is rasterised from
_MAX_ATTEMPTS = 200  # tries to place one contour
_MAX_IMAGES = 50     # tries to place all contours of one image


@dataclasses.dataclass(frozen=True)
class Geometry:
  """Pixel sizes of one resolution: dash length, marker radius, contour lengths, curvature."""
  resolution: int
  dash: int
  marker_radius: float
  path_length: tuple
  distractor_length: tuple
  curvature: float  # std of the heading change per pixel of arc, radians

  @classmethod
  def for_resolution(cls, resolution):
    s = resolution / 32
    return cls(resolution=resolution, dash=int(round(2 * s)), marker_radius=1.0 * s,
               path_length=(14 * s, 22 * s), distractor_length=(6 * s, 10 * s), curvature=0.18 / s)


def _curve(rng, geometry, length):
  """Points [N, 2] (row, col) every _SAMPLE pixels along a smooth random curve inside the frame."""
  margin = geometry.marker_radius + 1
  hi = geometry.resolution - 1 - margin
  n = int(length / _SAMPLE) + 1
  start = rng.uniform(margin, hi, size=2)
  heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, geometry.curvature * np.sqrt(_SAMPLE), size=n))
  steps = _SAMPLE * np.stack([np.sin(heading), np.cos(heading)], axis=-1)
  points = start + np.concatenate([np.zeros((1, 2)), np.cumsum(steps[:-1], axis=0)])
  if points.min() < margin or points.max() > hi:
    return None
  return points


def _dash_pixels(points, dash):
  """Integer pixels [M, 2] of the dashes: dashes of `dash - 1` pixels of arc, gaps of 1.75.

  The gap from the last point of a dash to the first of the next is 1.75 pixels of arc: long
  enough to leave an unlit pixel on most straight runs, short enough that the rounded pixels
  stay within Chebyshev distance BRIDGE = 2.
  """
  arc = _SAMPLE * np.arange(len(points))
  on = np.mod(arc, dash + 0.75) < dash - 0.75
  return np.unique(np.rint(points[on]).astype(np.int64), axis=0)


def _disk_pixels(center, radius):
  """Pixels [M, 2] within `radius` of the pixel nearest `center`."""
  c = np.rint(center).astype(np.int64)
  r = int(np.ceil(radius))
  d = np.stack(np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), indexing="ij"), axis=-1).reshape(-1, 2)
  return c + d[(d ** 2).sum(-1) <= radius ** 2 + 1e-9]


def _dilate(mask, radius):
  """Boolean Chebyshev dilation of a [H, W] mask by `radius`."""
  h, w = mask.shape
  padded = np.pad(mask, radius)
  out = np.zeros_like(mask)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out |= padded[dy:dy + h, dx:dx + w]
  return out


def _place(rng, geometry, blocked, length_range, marker_ends):
  """Draws one contour (with markers at the ends listed in `marker_ends`) clear of `blocked`.

  Returns (pixels [M, 2], marker centres [len(marker_ends), 2]) or None after many tries.
  """
  for _ in range(_MAX_ATTEMPTS):
    points = _curve(rng, geometry, rng.uniform(*length_range))
    if points is None:
      continue
    ends = [points[0], points[-1]]
    if np.abs(np.rint(ends[0]) - np.rint(ends[1])).max() < 2 * CLEARANCE:
      continue  # a contour closing on itself would hide which end is which
    parts = [_dash_pixels(points, geometry.dash)]
    parts += [_disk_pixels(ends[e], geometry.marker_radius) for e in marker_ends]
    pixels = np.concatenate(parts)
    if not blocked[pixels[:, 0], pixels[:, 1]].any():
      return pixels, np.rint([ends[e] for e in marker_ends]).astype(np.int64).reshape(-1, 2)
  return None


def render(rng, *, resolution=32, label, num_distractors=2):
  """One Pathfinder image: dict(image [R, R, 1] uint8 in {0, 255}, label, markers [2, 2] (row, col)).

  `label` 1 puts both markers on one contour, 0 on two different contours.
  """
  if resolution < 16:
    raise ValueError(f"resolution={resolution}: expected >= 16")
  geometry = Geometry.for_resolution(resolution)
  for _ in range(_MAX_IMAGES):
    image = np.zeros((resolution, resolution), bool)
    blocked = np.zeros_like(image)
    plan = [((0, 1) if label else (0,), geometry.path_length), (() if label else (0,), geometry.path_length)]
    plan += [((), geometry.distractor_length)] * num_distractors
    markers = []
    for marker_ends, length_range in plan:
      placed = _place(rng, geometry, blocked, length_range, marker_ends)
      if placed is None:
        break
      pixels, centres = placed
      drawn = np.zeros_like(image)
      drawn[pixels[:, 0], pixels[:, 1]] = True
      image |= drawn
      blocked |= _dilate(drawn, CLEARANCE - 1)
      markers.extend(centres)
    else:
      return {"image": (image * 255).astype(np.uint8)[..., None], "label": int(label),
              "markers": np.asarray(markers, np.int32)}
  raise ValueError(f"resolution={resolution}, num_distractors={num_distractors}: found no room for "
                   f"{len(plan)} contours {CLEARANCE} pixels apart in {_MAX_IMAGES} tries; use resolution >= 32 "
                   "or fewer distractors")


@dataclasses.dataclass(eq=False)
class PathfinderConfig(synthetic.SyntheticConfig):
  resolution: int = 32
  num_distractors: int = 2


class Pathfinder(synthetic.SyntheticBuilder):
  """Pathfinder; each example draws its label uniformly. `r32`, `r64` are LRA's sizes."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      PathfinderConfig(name="r32", resolution=32, num_distractors=2, num_train=160_000, num_validation=20_000, num_test=20_000),
      PathfinderConfig(name="r64", resolution=64, num_distractors=8, num_train=160_000, num_validation=20_000, num_test=20_000),
  ]
  CONFIG_FIELDS = ("resolution", "num_distractors")

  def _features(self):
    r = self.builder_config.resolution
    return {
        "image": tfds.features.Tensor(shape=(r, r, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=2),
        "markers": tfds.features.Tensor(shape=(2, 2), dtype=np.int32),
    }

  def _example(self, rng):
    c = self.builder_config
    return render(rng, resolution=c.resolution, label=int(rng.integers(2)), num_distractors=c.num_distractors)
