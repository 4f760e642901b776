#!/bin/sh
# usage: sh tools/interop/llamafactory.sh [WORK_DIR]   (default /tmp/lf-interop; not run in CI)
#
# emomerge → LLaMA-Factory 0.9.5 → emomerge, offline on CPU with tiny models:
#   1. an overlay venv with LLaMA-Factory's pinned versions (tools/interop/lf_overlay.sh; reused
#      when present),
#   2. for each of the six families: export a 2-stage curriculum, parse every YAML with
#      LLaMA-Factory's own argument parser, load every stage's data with its loader, and compare
#      its rendered prompt/answer with emomerge's (tools/interop/lf_parity.py),
#   3. for Qwen2.5-VL (continued) and LLaVA (stacked): run.sh trains 2 steps per stage with
#      llamafactory-cli, run.sh again skips both stages, and emomerge merges the stages
#      with --reference previous (lineage from the exported emomerge.json files).
# Output recorded in docs/INTEROP.md.
set -eu
HERE=$(cd "$(dirname "$0")/../.." && pwd)
WORK=${1:-/tmp/lf-interop}
OVERLAY=${LF_OVERLAY:-/tmp/lf-venv}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 DISABLE_VERSION_CHECK=1
export TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true
[ -x "$OVERLAY/bin/llamafactory-cli" ] || sh "$HERE/tools/interop/lf_overlay.sh" "$OVERLAY"
EM="$HERE/.venv/bin"
LFPY="$OVERLAY/bin/python"
rm -rf "$WORK" && mkdir -p "$WORK"
cd "$WORK"
echo "== versions"
"$EM/python" -c "import emomerge, transformers, peft, torch; print('emomerge', emomerge.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'torch', torch.__version__)"
"$LFPY" -c "import llamafactory, transformers, peft, torch; print('llamafactory', llamafactory.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'torch', torch.__version__)"
"$EM/emomerge" data synthetic emoart data/emoart --n 8 >/dev/null
"$EM/emomerge" data synthetic mangavqa data/mangavqa --n 8 >/dev/null

status=0
for family in qwen2_5_vl qwen3_vl mllama llava llava_next pixtral; do
    lineage=continued
    [ "$family" = llava ] && lineage=stacked
    "$EM/emomerge" tiny-model "$family" "models/$family" >/dev/null
    cat > "$family.yaml" <<YAML
base_model: $WORK/models/$family
lineage: $lineage
seed: 7
lora: {r: 4, alpha: 8}
train: {batch_size: 1, lr: 1.0e-3}
stages:
  - {name: art, dataset: emoart, path: $WORK/data/emoart, steps: 2}
  - {name: manga, dataset: mangavqa, path: $WORK/data/mangavqa, steps: 2}
YAML
    echo "== $family ($lineage)"
    "$EM/emomerge" export-llamafactory "$family.yaml" --out "export/$family" >/dev/null
    "$EM/python" "$HERE/tools/interop/lf_parity.py" ours "$family.yaml" "models/$family" "$family.expected.json"
    "$LFPY" "$HERE/tools/interop/lf_parity.py" lf "export/$family" "models/$family" "$family.expected.json" 2>"$family.lf.log" || status=1
done

for family in qwen2_5_vl llava; do
    echo "== train $family with llamafactory-cli (2 steps per stage) and merge with emomerge"
    PATH="$OVERLAY/bin:$PATH" PYTHON="$LFPY" sh "export/$family/run.sh" > "$family.train.log" 2>&1 \
        || { tail -30 "$family.train.log"; exit 1; }
    grep -E "'train_loss'|train_loss" "$family.train.log" | tail -2 || true
    for stage in art manga; do
        "$LFPY" -c "import json,sys; s=json.load(open(sys.argv[1])); print(sys.argv[2], 'steps', s['global_step'], 'losses', [round(h['loss'], 4) for h in s['log_history'] if 'loss' in h])" \
            "export/$family/adapters/$stage/trainer_state.json" "$stage"
    done
    PATH="$OVERLAY/bin:$PATH" PYTHON="$LFPY" sh "export/$family/run.sh"
    "$EM/emomerge" lineage show "export/$family/adapters/manga"
    "$EM/emomerge" linear --adapters "export/$family/adapters/art" "export/$family/adapters/manga" \
        --reference previous --out "merged/$family"
done
exit $status
