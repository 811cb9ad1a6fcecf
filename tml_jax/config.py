"""Config checks that run before anything compiles, with errors that name field and fix."""

from __future__ import annotations

from tml_jax.microturn import frames_per_chunk


class ConfigError(ValueError):
  pass


def _fail(field: str, value, problem: str, fix: str):
  raise ConfigError(f"config.{field}={value!r}: {problem}. Fix: {fix}")


# The device mesh's axes, in mesh order (tml_jax.train.sharding builds the mesh from them).
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Examples are split over every axis but `tensor`, which shards within an example.
BATCH_AXES = tuple(a for a in MESH_AXES if a != "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolve the mesh axes (one may be -1: it takes the devices the others leave)."""
  axes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  free = [a for a, n in axes.items() if n == -1]
  if len(free) > 1:
    _fail(f"mesh.{free[1]}", -1, "only one mesh axis may be -1", "set the others explicitly")
  for a, n in axes.items():
    if n == 0 or n < -1:
      _fail(f"mesh.{a}", n, "mesh axis sizes must be positive or -1", "use 1 to disable an axis")
  fixed = 1
  for a, n in axes.items():
    fixed *= n if n != -1 else 1
  if free:
    if num_devices % fixed:
      _fail(f"mesh.{free[0]}", -1, f"{num_devices} devices do not divide by the other axes' "
            f"product {fixed}", f"make the fixed axes divide {num_devices}")
    axes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    _fail("mesh", dict(axes), f"the axes multiply to {fixed} but there are {num_devices} "
          "devices", "set one axis to -1 or make the product match")
  return axes


def validate(config, num_devices: int | None = None) -> None:
  m, lay = config.model, config.layout
  try:
    frames = frames_per_chunk(lay.chunk_ms, lay.sample_rate, lay.hop)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if not 80 <= lay.chunk_ms <= 400:
    _fail("layout.chunk_ms", lay.chunk_ms, "outside the supported 80-400 ms range",
          "use a micro-turn between 80 and 400 ms (200 is the default)")
  if lay.sample_rate != 16000:
    _fail("layout.sample_rate", lay.sample_rate, "the dMel recipe is defined at 16 kHz",
          "keep 16000; audio at other rates is resampled on input")
  if lay.model_audio_slots <= 0 or frames % lay.model_audio_slots:
    _fail("layout.model_audio_slots", lay.model_audio_slots,
          f"must divide the {frames} dMel frames of a chunk", f"use a divisor of {frames}")
  h, w = tuple(lay.video_size)
  if h % m.patch_size or w % m.patch_size:
    _fail("layout.video_size", tuple(lay.video_size), f"not a multiple of the "
          f"{m.patch_size} px patch", f"use multiples of {m.patch_size}, e.g. (80, 80)")
  n_patches = (h // m.patch_size) * (w // m.patch_size)
  if lay.video_slots not in (0, n_patches):
    _fail("layout.video_slots", lay.video_slots, f"a {h}x{w} frame has {n_patches} patches",
          f"set layout.video_slots={n_patches} (or 0 for no video)")
  if lay.window is not None and lay.window < 1:
    _fail("layout.window", lay.window, "the window counts chunks and must be >= 1",
          "use None for unbounded attention")
  for f in ("text_in_slots", "prefix_slots"):
    if lay[f] < 0:
      _fail(f"layout.{f}", lay[f], "slot counts cannot be negative", "use 0 to disable")
  if lay.model_text_slots < 1:
    _fail("layout.model_text_slots", lay.model_text_slots, "the model needs a text stream",
          "use at least 1 slot (12 by default)")
  if lay.num_chunks < 1:
    _fail("layout.num_chunks", lay.num_chunks, "rows need at least one chunk", "use >= 1")
  if m.d_model % 2 or m.head_dim % 2:
    _fail("model.head_dim", m.head_dim, "RoPE rotates pairs of features", "use an even size")
  if m.num_heads % m.num_kv_heads:
    _fail("model.num_kv_heads", m.num_kv_heads, f"must divide num_heads={m.num_heads} "
          "for grouped-query attention", "pick a divisor of num_heads")
  if m.d_model % m.num_heads:
    _fail("model.num_heads", m.num_heads, f"does not divide d_model={m.d_model}",
          f"pick num_heads dividing {m.d_model}")
  if m.patch_size % 8:
    _fail("model.patch_size", m.patch_size, "the hMLP stem merges 2x2 three times",
          "use a multiple of 8 (40 by default)")
  if m.ffn not in ("moe", "dense"):
    _fail("model.ffn", m.ffn, "unknown feed-forward type", "use 'moe' or 'dense'")
  if m.ffn == "moe":
    if m.top_k < 1 or m.top_k > m.num_experts:
      _fail("model.top_k", m.top_k, f"must be between 1 and num_experts={m.num_experts}",
            "lower top_k or add experts")
    from tml_jax.model.moe import resolve_impl  # also maps the deprecated names
    try:
      impl = resolve_impl(m.moe_impl)
    except ValueError:
      impl = None
    if impl is None:
      _fail("model.moe_impl", m.moe_impl, "unknown MoE implementation",
            "use 'capacity' (drops tokens over capacity) or 'grouped' (dropless)")
    if impl == "capacity" and m.capacity_factor <= 0:
      _fail("model.capacity_factor", m.capacity_factor, "must be positive", "use e.g. 1.25")
    expert_axis = int(config.mesh.expert)
    if expert_axis > 0 and m.num_experts % expert_axis:
      _fail("model.num_experts", m.num_experts, f"not divisible by the expert mesh axis "
            f"({expert_axis})", "make num_experts a multiple of mesh.expert")
  b = config.get("background")
  if b is not None and b.get("enabled", False):
    h = b.get("history_chunks", 0)
    if not isinstance(h, int) or h < 0:
      _fail("background.history_chunks", h, "the history horizon counts chunks",
            "use 0 (no history beyond the window) or a number of chunks, e.g. 1500 = 5 min")
    if h and lay.window is not None and h <= lay.window:
      _fail("background.history_chunks", h, f"does not reach beyond the window "
            f"({lay.window} chunks), which the background model already reads",
            f"use 0 or more than {lay.window}")
  if m.attention_backend not in ("reference", "pallas"):
    _fail("model.attention_backend", m.attention_backend, "unknown attention backend",
          "use 'reference' or 'pallas'")
  if m.get("remat", "none") not in ("none", "dots", "full"):
    _fail("model.remat", m.remat, "unknown rematerialisation policy",
          "use 'none', 'dots' (keep weight matmul outputs) or 'full' (keep block inputs)")
  for f in ("dtype", "param_dtype"):
    if m[f] not in ("float32", "bfloat16"):
      _fail(f"model.{f}", m[f], "unsupported dtype", "use 'float32' or 'bfloat16'")
  if m.vocab_size < 272:
    _fail("model.vocab_size", m.vocab_size, "smaller than the byte tokenizer's 272 ids",
          "use >= 272")
  if m.n_mels != 80 or m.dmel_bins != 16:
    _fail("model.n_mels", (m.n_mels, m.dmel_bins), "the dMel codec makes 80 channels x 16 "
          "bins", "keep n_mels=80, dmel_bins=16")
  if m.flow_steps < 1:
    _fail("model.flow_steps", m.flow_steps, "Euler sampling needs >= 1 step", "use e.g. 8")
  if num_devices is not None:
    mesh_shape(config.mesh, num_devices)
