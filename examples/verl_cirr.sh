#!/usr/bin/env bash
# GRAPE on CIRR with verl 0.9.1: GRPO of a Qwen2.5-VL rewriter that sees the reference image and the modification
# text and writes a caption of the target; the reward is the target's rank in the CIRR gallery under a frozen
# composed CLIP retriever, served by `grape-rewards serve` and read through pkg://grape_rewards.adapters.verl.
#
#   bash examples/verl_cirr.sh            prepare the data if needed, start the reward service, train, stop it
#   bash examples/verl_cirr.sh --check    compose and validate verl's config, load the reward (no GPU)
#   bash examples/verl_cirr.sh --dry-run  start the service, wait for /ready, print the training command, stop
#
# Before the first run, embed the image gallery once (resumable):
#   grape-rewards index build --retriever open_clip:ViT-L-14/openai --device cuda \
#       --source "$CIRR_ROOT/img_raw" --out "$INDEX"
# (all of img_raw: the train gallery, plus dev/ so that validation rows can be rewarded too).
# Every variable below can also be set in the environment; extra Hydra overrides can follow the mode argument.
set -euo pipefail

# ---- model, data, GPUs --------------------------------------------------------------------------------------
POLICY="${POLICY:-Qwen/Qwen2.5-VL-3B-Instruct}"          # a VLM: it sees the reference image
CIRR_ROOT="${CIRR_ROOT:-/data/cirr}"                      # CIRR release: captions/, image_splits/, img_raw/
DATA_DIR="${DATA_DIR:-data/cirr}"                         # grape-rewards prepare --out
INDEX="${INDEX:-index/cirr-vitl14}"                       # grape-rewards index build --out (the CIRR images)
RETRIEVER="${RETRIEVER:-composed:open_clip:ViT-L-14/openai}"
SERVE_CONFIG="${SERVE_CONFIG:-$(dirname "$0")/serve.yaml}"   # reward shape, batching (flags below override it)
REWARD_DEVICE="${REWARD_DEVICE:-cuda:0}"
REWARD_PORT="${REWARD_PORT:-8000}"
NUM_GPUS="${NUM_GPUS:-8}"
N_SAMPLES="${N_SAMPLES:-8}"                               # GRPO group size
TRAIN_BATCH="${TRAIN_BATCH:-128}"                         # prompts per step
MINI_BATCH="${MINI_BATCH:-64}"
LR="${LR:-1e-6}"
EXPERIMENT="${EXPERIMENT:-cirr}"

MODE=train
if [[ "${1:-}" == "--check" || "${1:-}" == "--dry-run" ]]; then
    MODE="$1"
    shift
fi
REWARD_URL="http://127.0.0.1:${REWARD_PORT}"

OVERRIDES=(
    algorithm.adv_estimator=grpo algorithm.use_kl_in_reward=False
    "data.train_files=${DATA_DIR}/verl/train.parquet" "data.val_files=${DATA_DIR}/verl/val.parquet"
    data.prompt_key=prompt data.image_key=images "data.train_batch_size=${TRAIN_BATCH}" data.max_prompt_length=1024
    data.max_response_length=256 data.filter_overlong_prompts=True data.truncation=error
    "actor_rollout_ref.model.path=${POLICY}" actor_rollout_ref.model.enable_gradient_checkpointing=True
    "actor_rollout_ref.actor.optim.lr=${LR}" "actor_rollout_ref.actor.ppo_mini_batch_size=${MINI_BATCH}"
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8
    actor_rollout_ref.actor.use_kl_loss=True actor_rollout_ref.actor.kl_loss_coef=0.01
    actor_rollout_ref.actor.kl_loss_type=low_var_kl actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.rollout.name=vllm "actor_rollout_ref.rollout.n=${N_SAMPLES}"
    actor_rollout_ref.rollout.tensor_model_parallel_size=1 actor_rollout_ref.rollout.gpu_memory_utilization=0.5
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=16
    reward.custom_reward_function.path=pkg://grape_rewards.adapters.verl
    reward.custom_reward_function.name=compute_score
    "+reward.custom_reward_function.reward_kwargs.url=${REWARD_URL}"
    reward.num_workers=8
    "trainer.logger=[console]" trainer.project_name=grape "trainer.experiment_name=${EXPERIMENT}"
    "trainer.n_gpus_per_node=${NUM_GPUS}" trainer.nnodes=1 trainer.total_epochs=1
    trainer.save_freq=50 trainer.test_freq=25
    "$@"
)

if [[ "${MODE}" == "--check" ]]; then
    exec grape-rewards adapters check verl -- "${OVERRIDES[@]}"
fi

source "$(dirname "$0")/grape_service.sh"

for split in train val; do
    if [[ ! -f "${DATA_DIR}/verl/${split}.parquet" ]]; then
        grape-rewards prepare --benchmark cirr --root "${CIRR_ROOT}" --split "${split}" --out "${DATA_DIR}" --format verl
    fi
done
if [[ ! -f "${INDEX}/manifest.json" ]]; then
    echo "no index at ${INDEX}: build it first (see the top of $0)" >&2
    exit 1
fi

grape_start_service ${SERVE_CONFIG:+--config "${SERVE_CONFIG}"} --index "${INDEX}" --retriever "${RETRIEVER}" \
    --device "${REWARD_DEVICE}" --port "${REWARD_PORT}"
grape_wait_ready "${REWARD_URL}" 1800

if [[ "${MODE}" == "--dry-run" ]]; then
    printf "%q " python -m verl.trainer.main_ppo "${OVERRIDES[@]}"; echo  # quoted: copy-pasteable in bash and zsh
    exit 0
fi
python -m verl.trainer.main_ppo "${OVERRIDES[@]}"
