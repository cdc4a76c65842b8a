"""Column names of the sample table, in one place: what each stage reads and what it adds.

One row per sample; `load_samples` makes the first columns and every stage adds its own (DESIGN.md,
"Data model"). The stages name columns through these constants so that a rename is one edit and a
reader can see at a glance which stage owns which column.
"""

from __future__ import annotations

# -- the samples (load_samples) ----------------------------------------------------------------------
SAMPLE_ID = "sample_id"
INPUT = "input"
ANSWER = "answer"
DS_NAME = "ds_name"
LABEL = "label"
MEDIA_COLUMNS = ("image", "audio", "video")  # at most one per table; its name is the sample's modality

# -- NeighborGenerator -------------------------------------------------------------------------------
NEIGHBORS = "neighbors"
NEIGHBOR_OPS = "neighbor_ops"
NUM_NEIGHBORS = "num_neighbors"
MEDIA_NEIGHBORS = "media_neighbors"  # one perturbed media file per neighbour (optional)

# -- TextEmbedder, ModalityEmbedder --------------------------------------------------------------------
EMBEDDING = "embedding"
NEIGHBOR_EMBEDDINGS = "neighbor_embeddings"
MEDIA_EMBEDDING = "media_embedding"
NEIGHBOR_MEDIA_EMBEDDINGS = "neighbor_media_embeddings"

# -- TargetScorer --------------------------------------------------------------------------------------
LOSS = "loss"
NEIGHBOR_LOSSES = "neighbor_losses"
TOKEN_STATS = ("logprobs", "mean_logprob", "std_logprob", "entropy", "max_logprob")  # token_<stat>, neighbor_token_<stat>
MODEL_NAME = "model_name"
ERROR = "error"

# columns whose values may name files: a stage's input fingerprint covers those files' content
MEDIA_REFERENCES = (*MEDIA_COLUMNS, MEDIA_NEIGHBORS)

# columns holding lists, which a CSV file can only store as text (the scorer's token_<stat> lists too)
LIST_COLUMNS = (
    NEIGHBORS, NEIGHBOR_OPS, MEDIA_NEIGHBORS, EMBEDDING, NEIGHBOR_EMBEDDINGS, MEDIA_EMBEDDING, NEIGHBOR_MEDIA_EMBEDDINGS,
    NEIGHBOR_LOSSES,
)
