"""Neighbour generation: K perturbed copies of each sample's prompt (and media), as a cached stage.

FiMMIA compares the target's loss on a sample with its loss on slightly changed copies
("neighbours"). Four word-level operations make them, about `mask_ratio` of the words each:
span filling by an infilling model (T5 sentinels, FRED-T5's `<SC1>` prefix, or a BERT-style masked
LM), deletion, duplication and swap. Unlike the original, every mask of a neighbour is filled by one
batched model call, protected spans and the original's whitespace are kept, every random choice is
seeded by (seed, sample_id, op, k), and neighbours are distinct.

- `words`: a prompt as words and separators, and which words are protected;
- `operations`: the four operations (fill is planned here, filled by a back-end);
- `infill`: the infilling back-ends (seq2seq sentinels, masked LM);
- `perturb_media`: seeded image / audio / video perturbations written as standard files;
- `generator`: `NeighborGenerator`, the stage; `cli`: `fimmia-hf neighbors`.
"""

from .generator import NeighborGenerator
from .infill import INFILL_STYLES
from .operations import OPS, derive_seed
from .perturb_media import MediaPerturbation
from .words import DEFAULT_PROTECTED, truncate_tail

__all__ = ["DEFAULT_PROTECTED", "INFILL_STYLES", "OPS", "MediaPerturbation", "NeighborGenerator", "derive_seed",
           "truncate_tail"]
