#!/usr/bin/env bash
# The LilT paper's runs (MODE = clip | lit | lilt): base/base towers, 256 px, 128 per GPU x 4 GPUs, 15 epochs.
# Usage: launch/pretrain_paper.sh MODE TRAIN_JSON [EVAL_JSON EVAL_IMAGE_ROOT] [more --overrides]
#   HOSTFILE=launch/hostfile.example launch/pretrain_paper.sh MODE ...   for several nodes
#   DS_CONFIG=ds_configs/zero2_offload.json launch/pretrain_paper.sh MODE ...   to pick another ds_config
set -euo pipefail
usage="usage: $0 clip|lit|lilt TRAIN_JSON [EVAL_JSON EVAL_IMAGE_ROOT] [overrides...]"
mode=${1:?$usage}; train_json=${2:?$usage}; shift 2
eval_args=()
if [[ $# -ge 2 && $1 != *=* ]]; then eval_args=(data.eval_file="$1" data.eval_image_root="$2"); shift 2; fi
launcher=(deepspeed --num_gpus "${NUM_GPUS:-4}")
if [[ -n "${HOSTFILE:-}" ]]; then
  python launch/check_hostfile.py "$HOSTFILE"
  launcher=(deepspeed --hostfile "$HOSTFILE")
fi
exec "${launcher[@]}" launch/pretrain.py --deepspeed_config "${DS_CONFIG:-ds_configs/zero2.json}" \
  --config "$mode" --output_dir "${OUTPUT_DIR:-outputs/$mode}" \
  --overrides vision_encoder=base text_encoder=base image_size=256 train.micro_batch_size=128 train.epochs=15 \
  "data.train_files=[$train_json]" "${eval_args[@]}" "$@"
