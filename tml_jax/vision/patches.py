"""Video frames -> 40x40 patches, the VIDEO tokens of a chunk (docs/design.md §3: one frame per chunk,
resized to a multiple of 40 px, no vision tower; the hMLP stem embeds each patch).

Patches are row-major over the frame (patch p = row * (W // 40) + col) and each flattens its
pixels as (y, x, channel), so `unpatchify(patchify(f))` is the identity.

Shape legend: H, W frame height and width, P patches, D = patch * patch * 3.
"""

from __future__ import annotations

import numpy as np

PATCH = 40


def _check_size(size, what: str = "size") -> tuple[int, int]:
  h, w = (int(s) for s in size)
  if h <= 0 or w <= 0 or h % PATCH or w % PATCH:
    fix = (max(PATCH, round(h / PATCH) * PATCH), max(PATCH, round(w / PATCH) * PATCH))
    raise ValueError(f"{what}={tuple(size)} must be positive multiples of {PATCH} px (whole "
                     f"patches); use e.g. {fix}.")
  return h, w


def _check_frame(frame, name: str = "frame") -> np.ndarray:
  frame = np.asarray(frame)
  if frame.ndim < 3 or frame.shape[-1] != 3:
    raise ValueError(f"{name} has shape {frame.shape}; expected [..., H, W, 3] RGB. For a "
                     f"grayscale frame use np.repeat(frame[..., None], 3, axis=-1).")
  return frame


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] interpolation weights, rows sum to 1.

  Shrinking averages the input pixels each output pixel covers (area / box filter, with partial
  overlaps weighted), which avoids the aliasing bilinear sampling causes at large factors.
  Growing uses bilinear interpolation with pixel centres at i + 0.5 and clamped edges.
  """
  if n_out < n_in:
    scale = n_in / n_out
    start_O = np.arange(n_out) * scale
    stop_O = start_O + scale
    i_I = np.arange(n_in)
    overlap_OxI = np.clip(np.minimum(stop_O[:, None], i_I + 1) - np.maximum(start_O[:, None], i_I),
                          0, None)
    return overlap_OxI / scale
  src_O = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
  lo_O = np.floor(src_O).astype(int)
  hi_O = np.minimum(lo_O + 1, n_in - 1)
  frac_O = src_O - lo_O
  m_OxI = np.zeros((n_out, n_in))
  np.add.at(m_OxI, (np.arange(n_out), lo_O), 1 - frac_O)
  np.add.at(m_OxI, (np.arange(n_out), hi_O), frac_O)
  return m_OxI


def resize_frame(frame_HxWx3, size: tuple[int, int] = (80, 80)) -> np.ndarray:
  """Resizes [..., H, W, 3] to `size` (multiples of 40). uint8 stays uint8, floats float32."""
  h, w = _check_size(size)
  frame = _check_frame(frame_HxWx3, "frame_HxWx3")
  if frame.shape[-3:-1] == (h, w):
    return frame.copy()
  rows_hxH = _resize_matrix(frame.shape[-3], h)
  cols_wxW = _resize_matrix(frame.shape[-2], w)
  out = np.einsum("hH,...HWc,wW->...hwc", rows_hxH, frame.astype(np.float64), cols_wxW)
  if frame.dtype == np.uint8:
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
  return out.astype(np.float32)


def num_patches(size: tuple[int, int], patch: int = PATCH) -> int:
  h, w = (int(s) for s in size)
  return (h // patch) * (w // patch)


def patchify(frame, patch: int = PATCH) -> np.ndarray:
  """[..., H, W, 3] -> [..., P, patch*patch*3], row-major patches; dtype preserved."""
  frame = _check_frame(frame)
  *lead, h, w, c = frame.shape
  if h % patch or w % patch:
    raise ValueError(f"frame of {h}x{w} px does not split into {patch}x{patch} patches; resize "
                     f"it first, e.g. resize_frame(frame, ({max(patch, round(h / patch) * patch)}, "
                     f"{max(patch, round(w / patch) * patch)})).")
  x = frame.reshape(*lead, h // patch, patch, w // patch, patch, c)
  x = np.moveaxis(x, -4, -3)  # [..., rows, cols, patch_y, patch_x, c]
  return x.reshape(*lead, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches, size: tuple[int, int], patch: int = PATCH) -> np.ndarray:
  """Inverse of `patchify`: [..., P, patch*patch*3] -> [..., H, W, 3]."""
  patches = np.asarray(patches)
  h, w = (int(s) for s in size)
  rows, cols = h // patch, w // patch
  if h % patch or w % patch or patches.shape[-2:] != (rows * cols, patch * patch * 3):
    raise ValueError(f"patches of shape {patches.shape} do not tile a {h}x{w} frame: expected "
                     f"[..., {rows * cols}, {patch * patch * 3}] with size a multiple of {patch}.")
  lead = patches.shape[:-2]
  x = patches.reshape(*lead, rows, cols, patch, patch, 3)
  return np.moveaxis(x, -3, -4).reshape(*lead, h, w, 3)
