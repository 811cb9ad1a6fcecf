"""`tml_duplex`: the synthetic full-duplex corpus as TFDS in ArrayRecord (docs/design.md §6).

Splits: train and validation draw from the training voices and templates, test only from the
held-out ones (`scenarios` module docstring). Record i of a split is
`scenarios.generate(split, i, seed, conversation_s)` (records are kept in index order), so
a build is deterministic and any record can be regenerated from its id. Builds live in
DATA_DIR/tml_duplex/<name>/1.0.0 with <name> = n<train>-<validation>-<test>_s<seconds>_seed<seed>
(`TmlDuplexConfig.from_data_config`); the tiny config's 600/40/40 x 24 s is ~0.6 GB.

Record schema (F = N // 400 dMel frames at 40 Hz, N samples at 16 kHz; W words, I text_in):
  id, scenario, split        text
  sample_rate                int32 scalar (16000)
  user_wav, model_wav        int16 [N]      microphone channel / the model's clean channel
  user_dmel, self_dmel       uint8 [F, 80]  dMel bins (0..15) of user_wav / model_wav
  model_mel                  float16 [F, 80] clipped log10 mel of model_wav (flow targets)
  word_text                  text [W]       all speakers, sorted by start time
  word_start_s, word_end_s   float32 [W]
  word_speaker               text [W]       'user' | 'model' | 'other'
  text_in_s                  float32 [I]    arrival time of each typed / background text
  text_in_text               text [I]
  events_json                text           json list of {kind, start_s, end_s, data}
  video_events_json          text           json list passed to vision.synthetic.make_video
  meta_json                  text           voices, augmentation, template ids, video seed
Arrays are stored zlib-compressed in their own dtype. Frame f of the cached features is
centred on sample f*400, exactly `dmel.log_mel`'s
frames without its last one (which only reads the right-hand padding), so chunk c holds
frames [8c, 8c+8) and training never runs an STFT.

Writing needs neither TensorFlow nor Beam: TFDS serialises tf.Example protos with its own
protobuf copies and ArrayRecord writes the files; `tfds.data_source` reads them back with
numpy only.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import time

import numpy as np
import tensorflow_datasets as tfds

from tml_jax import paths
from tml_jax.audio.constants import N_MELS
from tml_jax.data.conversation import featurise, to_conversation  # noqa: F401 (API)
from tml_jax.data.scenarios import CORPUS_VERSION, generate
_SPLITS = {"train": "num_train", "validation": "num_validation", "test": "num_test"}


@dataclasses.dataclass
class TmlDuplexConfig(tfds.core.BuilderConfig):
  num_train: int = 600
  num_validation: int = 40
  num_test: int = 40
  conversation_s: float = 24.0
  seed: int = 0
  workers: int = 0  # 0: one process per core, at most 2 (generation is CPU bound)

  @classmethod
  def from_data_config(cls, data_cfg) -> "TmlDuplexConfig":
    """From `config.data` of configs/interaction.py; the name encodes everything that changes
    the bytes, so differently sized builds live side by side in one data_dir."""
    kw = dict(num_train=int(data_cfg.num_train), num_validation=int(data_cfg.num_validation),
              num_test=int(data_cfg.num_test), conversation_s=float(data_cfg.conversation_s),
              seed=int(data_cfg.seed))
    name = (f"n{kw['num_train']}-{kw['num_validation']}-{kw['num_test']}"
            f"_s{kw['conversation_s']:g}_seed{kw['seed']}").replace(".", "p")
    return cls(name=name, workers=int(data_cfg.get("workers", 0)), **kw)


def _make_example(args: tuple[str, int, int, float]) -> tuple[str, dict, float]:
  split, index, seed, duration_s = args
  t0 = time.perf_counter()
  conv = generate(split, index, seed, duration_s)
  return conv.id, featurise(conv), time.perf_counter() - t0


class TmlDuplex(tfds.core.GeneratorBasedBuilder):
  """Synthetic two-channel conversations with word timestamps and cached dMel features."""

  VERSION = tfds.core.Version(CORPUS_VERSION)
  RELEASE_NOTES = {"1.0.0": "First release: 13 scenarios, eSpeak NG voices, cached dMel.",
                   "1.1.0": "Pauses keep their unfinished intonation (one synthesis cut at "
                            "the pause); 30 % of plain training questions pause.",
                   "1.2.0": "Reminders, timers and repeating reminders are delegated to the "
                            "clock tools and fire as TEXT_IN; clock 'now' and chart "
                            "delegations; delegation events record the tool's args.",
                   "1.3.0": "Held delegations: 35 % of the users ask, say 'wait' and release "
                            "the answer 5.2-6.8 s after the question (beyond the window).",
                   "1.4.0": "Typed delegations: half of the delegation questions arrive as "
                            "TEXT_IN (typed_text events with delegation=True)."}
  BUILDER_CONFIGS = [TmlDuplexConfig(name="default")]
  # Record i is conversation i (grain shuffles at read time), so an id maps to its position.
  disable_shuffling = True

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS 4.9.10 finds a builder's file through `importlib_resources`, which it does not
    # declare as a dependency (ModuleNotFoundError at download_and_prepare); the file is here.
    from etils import epath
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    f = tfds.features
    text_seq = f.Sequence(f.Text())
    # The default encoding stores every int as int64 in the tf.Example (8x for uint8 dMel);
    # zlib keeps the raw dtype and shrinks silence-heavy audio and dMel several fold for
    # ~70 ms per 24 s conversation.
    zlib = f.Encoding.ZLIB
    return self.dataset_info_from_configs(
        description=__doc__,
        features=f.FeaturesDict({
            "id": f.Text(), "scenario": f.Text(), "split": f.Text(),
            "sample_rate": f.Scalar(np.int32),
            "user_wav": f.Tensor(shape=(None,), dtype=np.int16, encoding=zlib),
            "model_wav": f.Tensor(shape=(None,), dtype=np.int16, encoding=zlib),
            "user_dmel": f.Tensor(shape=(None, N_MELS), dtype=np.uint8, encoding=zlib),
            "self_dmel": f.Tensor(shape=(None, N_MELS), dtype=np.uint8, encoding=zlib),
            "model_mel": f.Tensor(shape=(None, N_MELS), dtype=np.float16, encoding=zlib),
            "word_text": text_seq,
            "word_start_s": f.Tensor(shape=(None,), dtype=np.float32),
            "word_end_s": f.Tensor(shape=(None,), dtype=np.float32),
            "word_speaker": text_seq,
            "text_in_s": f.Tensor(shape=(None,), dtype=np.float32),
            "text_in_text": text_seq,
            "events_json": f.Text(), "video_events_json": f.Text(), "meta_json": f.Text(),
        }),
        homepage="https://github.com/tml-jax/tml_jax",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is synthesised locally
    return {split: self._generate_examples(split, getattr(self.builder_config, attr))
            for split, attr in _SPLITS.items()}

  def _generate_examples(self, split: str, num: int):
    cfg = self.builder_config
    jobs = [(split, i, cfg.seed, cfg.conversation_s) for i in range(num)]
    workers = cfg.workers or min(2, os.cpu_count() or 1)
    yield from _run(jobs, workers, desc=f"tml_duplex {split}", conv_s=cfg.conversation_s)


def _run(jobs, workers: int, desc: str, conv_s: float):
  """Yields (key, example) in job order, with a progress bar in conversation-seconds."""
  from tqdm import tqdm
  bar = tqdm(total=len(jobs), desc=desc, unit="conv", dynamic_ncols=True)
  t0 = time.perf_counter()
  pool = None
  if workers > 1 and len(jobs) > 1:
    # fork keeps start-up cheap; each worker lazily starts its own libespeak-ng.
    pool = multiprocessing.get_context("fork").Pool(workers)
    results = pool.imap(_make_example, jobs, chunksize=1)
  else:
    results = map(_make_example, jobs)
  try:
    for key, example, _ in results:
      bar.update(1)
      elapsed = time.perf_counter() - t0
      bar.set_postfix_str(f"{bar.n * conv_s / max(elapsed, 1e-9):.0f} conv-s/s")
      yield key, example
  finally:
    bar.close()
    if pool is not None:
      pool.terminate()


def build(data_dir: str, data_cfg, *, workers: int | None = None) -> tfds.core.DatasetBuilder:
  """Generate (or reuse) the corpus for `config.data` under data_dir; returns the builder."""
  cfg = TmlDuplexConfig.from_data_config(data_cfg)
  if workers is not None:
    cfg = dataclasses.replace(cfg, workers=workers)
  builder = TmlDuplex(config=cfg, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder


def dataset_dir(data_dir: str, data_cfg=None) -> str:
  """The versioned folder of one build: data_dir/tml_duplex/<config name>/<version>."""
  root = paths.join(data_dir, "tml_duplex")
  if data_cfg is not None:
    name = TmlDuplexConfig.from_data_config(data_cfg).name
  else:
    names = [n for n in paths.listdir(root) if not n.startswith(".")] if paths.isdir(
        root) else []
    if len(names) != 1:
      raise FileNotFoundError(
          f"{root} holds {len(names)} tml_duplex builds ({names}); pass the data config "
          "(config.data) to choose one, or build it: python -m tml_jax.data.build "
          f"--config=configs/interaction.py:tiny --data_dir={data_dir}")
    name = names[0]
  path = paths.join(root, name, str(TmlDuplex.VERSION))
  if not paths.isdir(path):
    raise FileNotFoundError(f"no tml_duplex build at {path}: run python -m tml_jax.data.build "
                            f"--config=configs/interaction.py:tiny --data_dir={data_dir}")
  return path


def default_dir(data_cfg, workdir: str) -> str:
  """data_cfg.dir, or data/ beside a run's workdir (where the main job builds the corpus)."""
  return paths.resolve(data_cfg.dir) if data_cfg.dir else paths.join(paths.parent(workdir),
                                                                       "data")


def load_split(data_dir: str, split: str, data_cfg=None):
  """Random-access source of one split (a `tfds.data_source`, for grain): len() and [i]."""
  builder = tfds.builder_from_directory(dataset_dir(data_dir, data_cfg))
  if split not in builder.info.splits:
    raise ValueError(f"split={split!r}: this build has {list(builder.info.splits)}")
  return builder.as_data_source(split=split)
