"""Vision: frames -> 40x40 patches for the VIDEO segment, and synthetic annotated video."""

from tml_jax.vision.patches import PATCH, num_patches, patchify, resize_frame, unpatchify
from tml_jax.vision.synthetic import KINDS, make_video, sample_video_events
