#!/usr/bin/env bash
# GRAPE on CIRR with OpenRLHF 0.11.2: GRPO (group_norm) of a Qwen2.5-VL query rewriter that sees the reference
# image and the modification text and writes a caption of the target; the reward is the target's rank in the CIRR
# train gallery under a frozen composed CLIP retriever, served by `grape-rewards serve` on its own GPU.
#
#   bash examples/openrlhf_cirr.sh            prepare the data if needed, start the reward service, train, stop it
#   bash examples/openrlhf_cirr.sh --check    validate the training flags with the installed OpenRLHF (no GPU)
#   bash examples/openrlhf_cirr.sh --dry-run  start the service, wait for /ready, print the training command, stop
#
# Before the first run, embed the gallery once (hours on one GPU for ViT-L/14; resumable):
#   grape-rewards index build --retriever open_clip:ViT-L-14/openai --device cuda \
#       --source "$CIRR_ROOT/img_raw" --out "$INDEX"
# (all of img_raw: the train gallery, plus dev/ so that validation rows can be rewarded too).
# Every variable below can also be set in the environment; extra train_ppo_ray flags can follow the mode argument.
set -euo pipefail

# ---- model, data, GPUs --------------------------------------------------------------------------------------
POLICY="${POLICY:-Qwen/Qwen2.5-VL-3B-Instruct}"            # the rewriter (a VLM: it sees the reference image)
CIRR_ROOT="${CIRR_ROOT:-/data/cirr}"                      # CIRR release: captions/, image_splits/, img_raw/
DATA_DIR="${DATA_DIR:-data/cirr}"                         # grape-rewards prepare --out
INDEX="${INDEX:-index/cirr-vitl14}"                       # grape-rewards index build --out (the CIRR images)
RETRIEVER="${RETRIEVER:-composed:open_clip:ViT-L-14/openai}"
SERVE_CONFIG="${SERVE_CONFIG:-$(dirname "$0")/serve.yaml}"   # reward shape, batching (flags below override it)
REWARD_DEVICE="${REWARD_DEVICE:-cuda:0}"                  # the service's GPU (shared with training if colocated)
REWARD_PORT="${REWARD_PORT:-8000}"
NUM_GPUS="${NUM_GPUS:-8}"                                 # GPUs of the actor (and ref, colocated)
NUM_ENGINES="${NUM_ENGINES:-8}"                           # vLLM engines
N_SAMPLES="${N_SAMPLES:-8}"                               # GRPO group size
ROLLOUT_BATCH="${ROLLOUT_BATCH:-32}"                      # prompts per rollout
TRAIN_BATCH="${TRAIN_BATCH:-128}"                         # samples per optimizer step
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-256}"
LR="${LR:-1e-6}"
CKPT_DIR="${CKPT_DIR:-checkpoints/openrlhf-cirr}"

MODE=train
if [[ "${1:-}" == "--check" || "${1:-}" == "--dry-run" ]]; then
    MODE="$1"
    shift
fi
REWARD_URL="http://127.0.0.1:${REWARD_PORT}"
TRAIN_FILE="${DATA_DIR}/openrlhf/train.jsonl"

ARGS=(
    --actor.model_name_or_path "${POLICY}"
    --reward.remote_url "${REWARD_URL}/get_reward"
    --data.prompt_dataset "${TRAIN_FILE}" --data.input_key prompt --data.label_key label --data.apply_chat_template
    --data.image_key images --data.max_images_per_prompt 1 --data.max_len 4096
    --algo.advantage.estimator group_norm --rollout.n_samples_per_prompt "${N_SAMPLES}"
    --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef 1e-3
    --rollout.batch_size "${ROLLOUT_BATCH}" --rollout.micro_batch_size 4 --rollout.max_new_tokens "${MAX_NEW_TOKENS}"
    --rollout.temperature 1.0
    --train.batch_size "${TRAIN_BATCH}" --train.micro_batch_size 2 --train.max_epochs 1 --train.num_episodes 1
    --actor.num_nodes 1 --actor.num_gpus_per_node "${NUM_GPUS}"
    --ref.num_nodes 1 --ref.num_gpus_per_node "${NUM_GPUS}"
    --vllm.num_engines "${NUM_ENGINES}" --vllm.tensor_parallel_size 1 --vllm.gpu_memory_utilization 0.5
    --vllm.enable_sleep --ds.enable_sleep --train.colocate_all
    --actor.freeze_visual_encoder --actor.gradient_checkpointing_enable --actor.adam.lr "${LR}"
    --ds.zero_stage 3 --ds.param_dtype bf16 --ds.attn_implementation sdpa
    --ckpt.path "${CKPT_DIR}" --ckpt.save_steps 50 --ckpt.output_dir "${CKPT_DIR}/final" --logger.logging_steps 1
    "$@"
)

if [[ "${MODE}" == "--check" ]]; then
    exec grape-rewards adapters check openrlhf -- "${ARGS[@]}"
fi

source "$(dirname "$0")/grape_service.sh"

if [[ ! -f "${TRAIN_FILE}" ]]; then
    grape-rewards prepare --benchmark cirr --root "${CIRR_ROOT}" --split train --out "${DATA_DIR}" --format openrlhf
fi
if [[ ! -f "${INDEX}/manifest.json" ]]; then
    echo "no index at ${INDEX}: build it first (see the top of $0)" >&2
    exit 1
fi

grape_start_service --config "${SERVE_CONFIG}" --index "${INDEX}" --retriever "${RETRIEVER}" \
    --device "${REWARD_DEVICE}" --port "${REWARD_PORT}"
grape_wait_ready "${REWARD_URL}" 1800

if [[ "${MODE}" == "--dry-run" ]]; then
    printf "%q " python -m openrlhf.cli.train_ppo_ray "${ARGS[@]}"; echo  # quoted: copy-pasteable in bash and zsh
    exit 0
fi
python -m openrlhf.cli.train_ppo_ray "${ARGS[@]}"
