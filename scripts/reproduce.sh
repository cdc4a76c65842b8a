#!/usr/bin/env bash
# The original FiMMIA recipe, step for step, with real models on GPUs.
#
#   scripts/reproduce.sh image data/train.csv runs/image
#   scripts/reproduce.sh audio data/audio.csv runs/audio
#   scripts/reproduce.sh video data/video.csv runs/video
#
# The table holds the original's columns (input, answer, ds_name, image|audio|video) plus `label`
# (1 = the samples to fine-tune on). Every stage is cached: rerunning resumes where it stopped.
# Set NPROC to the number of GPUs; PYTHON/ACCELERATE override the interpreters.
set -euo pipefail
modality=${1:?modality: image, audio or video}
data=${2:?sample table}
out=${3:?output folder}
NPROC=${NPROC:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
launch=(accelerate launch --config_file "$(dirname "$0")/accelerate_multi_gpu.yaml" --num_processes "$NPROC" -m fimmia_hf.cli)

case "$modality" in
  image|video) target=Qwen/Qwen2.5-VL-3B-Instruct; media_model=openai/clip-vit-large-patch14 ;;
  audio)       target=Qwen/Qwen2-Audio-7B-Instruct; media_model=laion/clap-htsat-unfused ;;
  *) echo "unknown modality $modality" >&2; exit 2 ;;
esac
neighbor_model=ai-forever/FRED-T5-1.7B
embedding_model=intfloat/e5-mistral-7b-instruct
mkdir -p "$out"

# 1. controlled members: SFT-LoRA (r=8, alpha=16, dropout 0.05 on q_proj/v_proj, lr 2e-4, 5 epochs)
"${launch[@]}" finetune --modality "$modality" --model "$target" --data "$data" --members-only \
  --out "$out/leak" --epochs 5 --learning-rate 2e-4 --training-args '{"bf16": true}'

# 2. neighbours: K = 24 (6 per operation), FRED-T5 span filling
fimmia-hf neighbors --data "$data" --model "$neighbor_model" --infill-style fred-t5 --num-neighbors 24 \
  --out "$out/neighbors"

# 3. embeddings: e5-mistral (last-token pooling, L2-normalised) + a media encoder
fimmia-hf embed --data "$out/neighbors" --model "$embedding_model" --media-model "$media_model" \
  --prefix "Instruct: Retrieve semantically similar text.
Query: " --out "$out/embedded"

# 4. losses of the original and each neighbour under the base (no_leak) and fine-tuned (leak) targets
"${launch[@]}" score --data "$out/embedded" --model "$target" --name base --dtype bfloat16 --out "$out/scored_no_leak"
"${launch[@]}" score --data "$out/embedded" --model "$out/leak" --name finetuned --dtype bfloat16 --out "$out/scored_leak"

# 5. the attack network (paired protocol as the original: base = 0, fine-tuned = 1), split by sample
"${launch[@]}" train --train-base "$out/scored_no_leak" --train-finetuned "$out/scored_leak" --eval-size 0.2 \
  --modality "$modality" --target-model "$target" --neighbor-model "$neighbor_model" \
  --embedding-model "$embedding_model" --media-embedding-model "$media_model" --out "$out/detector"

# 6. inference with metrics (exact TPR@FPR with bootstrap CIs)
fimmia-hf predict --model "$out/detector" --base "$out/scored_no_leak" --finetuned "$out/scored_leak" \
  --out "$out/predictions.parquet"

# 7. member / non-member report with every classic attack and the blind baselines on the same split
fimmia-hf evaluate --model "$out/detector" --test "$out/scored_leak" --out "$out/report"

# 8. gradient attribution of ΔL vs Δe vs Δm
fimmia-hf attribute --model "$out/detector" --base "$out/scored_no_leak" --finetuned "$out/scored_leak" --graphs

# 9. blind distribution-shift baselines on the sample table alone
fimmia-hf shift --data "$data" --modality "$modality" --out "$out/shift.json"
