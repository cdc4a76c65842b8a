"""Text and media embeddings as cached `datasets.map` stages.

FiMMIA's second feature family is the embedding shift between a sample and each of its neighbours
(`Δe_k = e'_k − e`, optionally `Δm_k = m'_k − m` for the media). Both stages batch, embed each
distinct text or media item once, and store float32 vectors in Arrow through the `Stage` contract.

- `text`: `TextEmbedder`, any `AutoModel` or a sentence-transformers folder (`embedding`, `neighbor_embeddings`);
- `sentence_transformers_folder`: reads a sentence-transformers folder's pooling / Dense / Normalize modules
  (no sentence-transformers dependency);
- `media`: `ModalityEmbedder`, image / audio / video (`media_embedding`, `neighbor_media_embeddings`);
- `vectors`: what both share (dtype, pooling, normalisation); `cli`: `fimmia-hf embed`.
"""

from .media import ModalityEmbedder, media_key
from .sentence_transformers_folder import SentenceTransformerLayout, read_sentence_transformers
from .text import DEFAULT_TEXT_MODEL, DEFAULT_TEXT_TEMPLATE, TextEmbedder
from .vectors import POOLING_MODES, pool

__all__ = ["DEFAULT_TEXT_MODEL", "DEFAULT_TEXT_TEMPLATE", "POOLING_MODES", "ModalityEmbedder",
           "SentenceTransformerLayout", "TextEmbedder", "media_key", "pool", "read_sentence_transformers"]
