#!/usr/bin/env bash
# CIFAR-10 robust guard, end to end, for a GPU: the reference ResNet trained on the data, then `harden`
# (PGD-AT with random shifts and flips) with Adam and with SGD side by side on the one GPU, each guard
# evaluated on the test images with the full adaptive suite. Writes, under $OUT (default runs/robust-cifar):
#   <variant>.log, <variant>.json and <variant>.md (the evaluation report), clean.log, and timing.json
#   (seconds from the start to the end of each stage). The guards stay in $WORK (a ResNet-9 is 26 MB).
#   Every stage runs under one deadline (BUDGET_S seconds from the start), so the script ends by itself
#   and keeps what finished.
#
#   KERAS_BACKEND=jax bash benchmarks/robust_cifar.sh                       # the full run (GPU)
#   EPOCHS=35 OTHER=trades OTHER_OPTS="--learning-rate 1e-3 --trades 6" bash benchmarks/robust_cifar.sh  # Adam against TRADES
#   WIDTH=8 CLEAN_EPOCHS=1 EPOCHS=1 N_ATTACK=200 N_EVAL=50 DATA=/tmp/cifar-small bash benchmarks/robust_cifar.sh  # a CPU check
set -uo pipefail
start=$(date +%s)
deadline=$((start + ${BUDGET_S:-540}))
data=${DATA:-../shared/data/cifar10}
out=${OUT:-runs/robust-cifar}
work=${WORK:-$(mktemp -d)}
width=${WIDTH:-64}
mkdir -p "$out" "$work"
safetynet() { python3 -c 'import sys; from safetynet.cli import main; sys.exit(main())' "$@"; }
left() { echo $((deadline - $(date +%s))); }
stamp() { echo "\"$1\": $(($(date +%s) - start))," >> "$work/timing"; }

timeout "$(left)" bash -c "$(declare -f safetynet); safetynet train-classifier --data '$data' --architecture resnet \
    --width $width --epochs ${CLEAN_EPOCHS:-20} --batch-size 512 --out '$work/clean.keras'" > "$out/clean.log" 2>&1
stamp clean

variant() {  # name, then harden's optimizer options
    local name=$1; shift
    timeout "$(left)" bash -c "$(declare -f safetynet); safetynet harden --model '$work/clean.keras' --data '$data' \
        --out '$work/$name' --attack pgd:steps=${STEPS:-7} --epochs ${EPOCHS:-30} --eps-warmup 3 --patience 8 \
        --batch-size ${BATCH:-256} --n-attack ${N_ATTACK:-10000} --no-evaluate $*" > "$out/$name.log" 2>&1 || return
    stamp "$name-harden"
    timeout "$(left)" bash -c "$(declare -f safetynet); safetynet evaluate --model '$work/$name/classifier.keras' \
        --detector '$work/$name/detector' --data '$data' --n ${N_EVAL:-1000} --batch-size ${EVAL_BATCH:-500} \
        --out '$work/$name/report'" >> "$out/$name.log" 2>&1 && cp "$work/$name/report/report.json" "$out/$name.json" \
        && cp "$work/$name/report/report.md" "$out/$name.md"
    stamp "$name-evaluate"
}
# shellcheck disable=SC2086  # the options are word lists
variant adam ${ADAM_OPTS:---learning-rate 1e-3} &
variant "${OTHER:-sgd}" ${OTHER_OPTS:---optimizer sgd --learning-rate 0.05} &
wait
echo "{$(tr -d '\n' < "$work/timing") \"total\": $(($(date +%s) - start))}" > "$out/timing.json"
cat "$out/timing.json"
