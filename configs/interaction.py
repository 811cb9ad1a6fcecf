r"""Interaction model configs: `get_config("VARIANT[,MODIFIER...]")`.

Variants
  tiny       CPU, 8.3 M parameters (2 blocks, 8 experts, top-2; 3.9 M active), 20 minutes on
             2 cores.
             python -m tml_jax.main --config=configs/interaction.py:tiny --workdir=runs/tiny
             # expected (2 cores, jax 0.11.2): 0.44-0.65 steps/s, 500-720 steps (the corpus
             # build counts against the budget); validation text cross-entropy ~0.8 nats
             # (unigram baseline 2.28), byte accuracy ~0.6, flow loss 1.2 -> ~0.3 (speech
             # chunks only). The voice takes some turns, but the gate's pause/turn-end
             # separation is the limit (it grows with steps: benchmarks/probe_curve.py), and
             # the model does not yet emit DELEGATE, so the behaviour rows (delegation,
             # reminders) are zeros; per-task figures in runs/tiny/eval/report.md, runs and
             # seeds in benchmarks/RESULTS.md.
             python -m tml_jax.params --config=configs/interaction.py:tiny
             python -m tml_jax.demo --config=configs/interaction.py:tiny --out=out/demo
  small      one GPU, 1.95 B total / 0.59 B active parameters.
             python -m tml_jax.train --config=configs/interaction.py:small --workdir=runs/small
             python -m tml_jax.params --config=configs/interaction.py:small
  tml_small  the reference system's scale: 276 B total / 12 B active. Never materialised;
             checked by parameter counting under `jax.eval_shape`, and compiled ahead of
             time for a v5p-512 slice (no TPU needed; pip install -e ".[plan]"):
             python -m tml_jax.params --config=configs/interaction.py:tml_small
             # expected: total_params within 2 % of 276e9, active_params within 5 % of 12e9
             python -m tml_jax.plan --config=configs/interaction.py:tml_small --topology=v5p-512
             # expected: FITS, 39.4 GiB per chip of 95.7 (about 8 minutes on 2 cores)

Modifiers (comma-separated after the variant)
  smoke      shrink corpus and run to a couple of minutes end to end (CI and scripts).
  dense      replace the MoE FFN by a dense SwiGLU FFN of the same active width.

Any field can be overridden on the command line: `--config.model.num_experts=16`.
"""

import ml_collections as mlc

# Logical parameter/activation axis -> mesh axis. One table for the whole model.
SHARDING_RULES = (
    ("batch", ("data", "fsdp", "expert")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("vocab", "tensor"),
    ("mel", None),
    ("dmel_channel", None),
    ("dmel_bin", None),
    ("patch", None),
    ("norm", None),
    ("length", None),
)


def parse_arg(arg: str) -> tuple[str, set[str]]:
  parts = [p.strip() for p in (arg or "tiny").split(",") if p.strip()]
  return parts[0], set(parts[1:])


def _layout(**overrides) -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.chunk_ms = 200
  c.sample_rate = 16000
  c.hop = 400               # dMel hop: 40 Hz frames, 8 per 200 ms chunk
  c.window = 25             # attention window in chunks (None = unbounded)
  c.video_size = (80, 80)   # frame size fed to the model (multiple of 40)
  c.video_slots = 4         # (80/40)**2 patches
  c.text_in_slots = 4
  c.model_text_slots = 8
  c.model_audio_slots = 4   # 4 queries, 2 mel frames each (8 -> one frame each)
  c.prefix_slots = 0
  c.num_chunks = 32         # training rows: 6.4 s of conversation
  c.update(overrides)
  return c


def _model(**overrides) -> mlc.ConfigDict:
  c = mlc.ConfigDict()
  c.d_model = 192
  # 2 blocks, not 4: the blocks are ~all of the tiny step's time (benchmarks/step_profile.py),
  # and at equal steps 2 blocks matched 4 on every loss and on the speak probe
  # (benchmarks/RESULTS.md), so the 20-minute budget buys twice the steps.
  c.num_layers = 2
  c.num_heads = 4
  c.num_kv_heads = 2
  c.head_dim = 48
  c.ffn = "moe"             # "moe" | "dense"
  c.dense_hidden = 1024
  c.num_experts = 8
  c.top_k = 2
  c.expert_hidden = 640
  c.shared_expert_hidden = 0  # 0: no shared expert
  # "grouped" (dropless grouped matmul: Pallas gmm on GPU/TPU, its tile scan on CPU, as fast
  # as "capacity" there) | "capacity" (drops tokens over capacity): benchmarks/moe.py.
  c.moe_impl = "grouped"
  c.capacity_factor = 1.25
  # Expert-parallel dispatch in n sequential token chunks per device: exact, and the
  # worst-case exchange buffers (ep x the local assignments) shrink n-fold.
  c.moe_token_chunks = 1
  c.vocab_size = 272        # bytes + 16 control tokens (tml_jax.text.tokenizer)
  c.n_mels = 80
  c.dmel_bins = 16
  c.patch_size = 40
  c.flow_hidden = 192
  c.flow_layers = 3
  c.flow_steps = 8          # Euler steps when sampling audio
  c.attention_backend = "reference"  # "reference" (dense mask) | "pallas"
  c.dtype = "float32"       # compute dtype: "float32" | "bfloat16"
  c.param_dtype = "float32"
  c.rope_theta = 10_000.0
  c.norm_eps = 1e-6
  # A binary "speak in chunk t+1" head beside the text softmax; the engine stays silent
  # when it says no (serve.speak_threshold). False for configs saved before it existed.
  c.speak_gate = True
  # The gate also reads the chunk's USER_AUDIO states directly (ModelConfig.speak_gate_audio).
  c.speak_gate_audio = True
  # SELF_AUDIO also carries "my voice plays now" (ModelConfig.self_speaking).
  c.self_speaking = True
  # What each block keeps for the backward pass: "none" | "dots" | "full"
  # (tml_jax.model.transformer.REMAT_POLICIES; `python -m tml_jax.plan` measures the effect).
  c.remat = "none"
  # One lax.scan over the blocks (tml_jax.model.transformer.ModelConfig.scan_layers): one
  # block compiled instead of num_layers; the paper-scale config needs it to compile.
  c.scan_layers = False
  c.update(overrides)
  return c


def get_config(arg: str = "tiny") -> mlc.ConfigDict:
  variant, mods = parse_arg(arg)
  config = mlc.ConfigDict()
  config.variant = variant
  config.seed = 0
  config.layout = _layout()
  config.model = _model()
  config.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  config.sharding_rules = SHARDING_RULES

  config.train = mlc.ConfigDict(dict(
      batch_size=6, num_steps=720, lr=3e-3, warmup_steps=20, min_lr_ratio=0.1,
      weight_decay=0.05, clip_norm=1.0, b2=0.98,
      log_every=10, eval_every=90, eval_batches=4, checkpoint_every=90, keep_checkpoints=3,
      time_budget_s=20 * 60.0,
      # The end-of-run report's free-running speak probe: validation conversations the
      # engine runs through on its own voice (tml_jax.probe.free_running_on_validation).
      probe_free_running_conversations=4,
      # The serving threshold (serve.speak_threshold="auto") is the lowest at which at most
      # this share of the validation chunks where a silent model should stay silent would
      # start speech (tml_jax.probe.calibrate_threshold). 1 % let 14 % of the onsets
      # through (threshold 0.85). Voice-scored on the validation export: 0.55 (3.4 % false
      # onsets) took 75 % of the turns at 0.53 s, 0.65 (2.6 %) 62 % at 0.73 s; but those
      # pause clips could not show a takeover (export format 1), and on format 2 a 3 %
      # model takes pauses as often as vad_0.5s (benchmarks/RESULTS.md).
      speak_max_false_onsets=0.03,
      # Speak-gate targets also say "speak" from 0.2 s after a user's turn ends to the reply
      # (tml_jax.data.speak_labels.reply_windows): the corpus' random reply delay is a rule.
      speak_reply_window=True,
      # Share of the crops of conversations with a fired reminder placed to hold the firing
      # and the model saying it (tml_jax.data.pipeline.MicroTurnExample.crop_start).
      reminder_crop_share=0.5,
      # Share of the crops of conversations with a delegation placed to hold its DELEGATE
      # (a window into the row) or its result's arrival and the answer (same function).
      delegation_crop_share=0.4,
      # The serving DELEGATE threshold (serve.delegate_threshold="auto") is the lowest at
      # which at most this share of the chunks the gate lets speak, not within 3 of a
      # delegation, would emit one, the model running free on this many validation
      # conversations with a delegation (tml_jax.probe.calibrate_delegate_free_running).
      delegate_max_false=0.002, delegate_calibration_conversations=6,
      loss_weights=mlc.ConfigDict(dict(text=1.0, audio=1.0, balance=0.01, z=1e-3,
                                       background=1.0, speak=1.0, heard=0.5,
                                       # mean CE over the DELEGATE targets of a batch
                                       # (tml_jax.train.losses.text_terms): each counts
                                       # ~120x a text target instead of 1x (0.05, ~30x:
                                       # CE 2.7-4.2 at the targets after 400-490 steps)
                                       delegate=0.2,
                                       # onsets/offsets of the model's speech in the gate
                                       # loss (tml_jax.train.losses.speak_terms)
                                       speak_transition=3.0,
                                       # chunks in a user's mid-utterance pause
                                       speak_pause=3.0,
                                       # a barge-in while the model still speaks
                                       speak_barge_in=3.0)),
  ))
  config.data = mlc.ConfigDict(dict(
      dir="", num_train=300, num_validation=24, num_test=40, conversation_s=24.0, seed=0,
      workers=0,
  ))
  # Background model (docs/design.md §5, tml_jax/model/background.py), trained jointly through
  # train.loss_weights.background; `serve` holds the streaming engine's settings.
  config.background = mlc.ConfigDict(dict(
      enabled=True, d_model=128, num_layers=2, num_heads=4, head_dim=32, hidden=512,
      max_len=128, max_delegations=2, tool_timeout_s=5.0,
      # The conversation before the window, as one pooled vector per chunk (tml_jax.model.
      # background.pool_history): 1500 chunks = 5 minutes, 1.2 MB per conversation for tiny.
      history_chunks=1500,
      # Training only: a free background slot of every row holds the words the user said in
      # its last chunk's window, prompted with HEARD (tml_jax.data.background_targets.
      # heard_sequence; loss term `heard`, train.loss_weights.heard). A few dozen
      # delegations per run cannot teach the background model to read what was asked, nor
      # the interaction model to keep it. Off: in the main job's 20 minutes (tiny, 2 CPU
      # cores) heard vs heard_other showed no gap at any step and the text loss rose
      # (benchmarks/RESULTS.md, 2026-12-04 twelfth session); for longer runs.
      heard_targets=False,
      # Serving: outstanding delegations at most (each holds a device copy of the context).
      max_pending=3,
  ))
  config.serve = mlc.ConfigDict(dict(
      temperature=0.0, griffin_lim_iters=4, seed=0,
      # P(speak) below it: the micro-turn is silent (speak gate only). "auto": the threshold
      # the trainer calibrated on validation (W/speak_threshold.json), else 0.5.
      speak_threshold="auto",
      # Once speaking, the gate keeps the voice on while P(speak) stays above this (a
      # hysteresis, as voice-activity detectors use). "auto": min(0.5, speak_threshold).
      speak_keep_threshold="auto",
      # A text slot whose P(DELEGATE) reaches it emits DELEGATE (tml_jax.model.transformer
      # _decode_text). "auto": the threshold the trainer calibrated on validation
      # (W/delegate_threshold.json, train.delegate_max_false), else 1 (plain decoding).
      delegate_threshold="auto",
      # Live input: a chunk arriving up to this late is still used (else it is silence).
      jitter_buffer_ms=100,
      # TEXT_IN queue bound in tokens; past it the oldest are dropped (and reported).
      text_in_capacity=512,
  ))

  if variant == "tiny":
    pass
  elif variant == "small":
    config.layout.window = 50
    config.layout.num_chunks = 100
    config.layout.video_size = (160, 160)
    config.layout.video_slots = 16
    config.model.update(dict(
        d_model=1536, num_layers=16, num_heads=12, num_kv_heads=4, head_dim=128,
        num_experts=8, top_k=2, expert_hidden=3072, flow_hidden=1024, dtype="bfloat16",
        attention_backend="pallas", moe_impl="grouped"))
    config.train.update(dict(batch_size=16, lr=3e-4, num_steps=50_000, warmup_steps=1000,
                             time_budget_s=0.0))
  elif variant == "tml_small":
    config.layout.window = 50
    config.layout.num_chunks = 100
    config.layout.video_size = (320, 320)
    config.layout.video_slots = 64
    config.model.update(dict(
        d_model=5120, num_layers=48, num_heads=40, num_kv_heads=8, head_dim=128,
        num_experts=128, top_k=4, expert_hidden=2880, shared_expert_hidden=512,
        flow_hidden=2048, dtype="bfloat16", param_dtype="bfloat16",
        attention_backend="pallas", moe_impl="grouped",
        # From the plan (python -m tml_jax.plan --topology=v5p-512, benchmarks/RESULTS.md):
        # without remat the activations alone overflow HBM, and the expert exchange's
        # worst-case buffers (ep x the local assignments) need chunking to fit.
        remat="full", moe_token_chunks=8, scan_layers=True))
    # 256 chips (v5p-512): one 9600-token row per chip, experts over 16, the rest FSDP.
    config.mesh = mlc.ConfigDict(dict(data=-1, fsdp=16, expert=16, tensor=1))
    config.train.update(dict(batch_size=256, lr=1.5e-4, num_steps=200_000, warmup_steps=2000,
                             time_budget_s=0.0))
  else:
    raise ValueError(f"unknown variant {variant!r} in config arg {arg!r}: "
                     "use one of tiny, small, tml_small (e.g. configs/interaction.py:tiny)")

  for mod in sorted(mods):
    if mod == "smoke":
      # A model small enough that CI can train, kill, resume and compare runs in seconds.
      config.model.update(dict(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                               head_dim=16, num_experts=4, expert_hidden=64, flow_hidden=64,
                               flow_layers=2))
      config.layout.num_chunks = 20
      config.data.update(dict(num_train=24, num_validation=4, num_test=4, conversation_s=12.0))
      config.train.update(dict(num_steps=30, batch_size=4, log_every=5, eval_every=15,
                               eval_batches=1, checkpoint_every=10, warmup_steps=5,
                               time_budget_s=0.0, probe_free_running_conversations=1))
      config.background.update(dict(d_model=32, num_heads=2, head_dim=16, hidden=64,
                                    max_len=96))
    elif mod == "dense":
      config.model.ffn = "dense"
      config.model.dense_hidden = config.model.top_k * config.model.expert_hidden
    else:
      raise ValueError(f"unknown config modifier {mod!r} in {arg!r}: known are smoke, dense")
  return config
