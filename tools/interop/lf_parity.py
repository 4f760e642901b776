"""usage: python tools/interop/lf_parity.py ours CURRICULUM MODEL OUT.json   (emomerge's venv)
       python tools/interop/lf_parity.py lf   EXPORT_DIR MODEL OUT.json   (LLaMA-Factory's venv)

``ours`` writes the prompt/answer strings emomerge trains on for every sample of the export;
``lf`` parses every stage YAML with LLaMA-Factory's own argument parser, loads each stage's data
through its loader, renders the same samples with its template and plugin (tokens not expanded)
and compares: one line per stage, exit 1 on a difference beyond the known ones
(docs/INTEROP.md: a "<s>" before LLaVA-NeXT prompts, "\\n" after Qwen answers).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PROMPT_PREFIX = {"llava_next": "<s>"}
ANSWER_TAIL = {"qwen2_5_vl": "\n", "qwen3_vl": "\n"}


def ours(curriculum: Path, model: str, out: Path) -> None:
    from emomerge.training.batching import answer_prefix, render_prompt
    from emomerge.training.curriculum import load_curriculum
    from emomerge.training.families import FAMILIES, detect_family
    from emomerge.training.models import load_processor
    from emomerge.training.stages import plan_stages

    cur = load_curriculum(curriculum)
    family = detect_family(model)
    processor = load_processor(model, family, cur.train.max_pixels)
    rows = {}
    for plan in plan_stages(cur, out.parent / "unused"):
        rows[plan.stage.name] = [
            [render_prompt(processor, s),
             answer_prefix(processor, s.messages) + s.target + FAMILIES[family].answer_suffix]
            for s in plan.samples]
    out.write_text(json.dumps({"family": family, "stages": rows}, ensure_ascii=False))


def lf(export: Path, model: str, out: Path) -> int:
    import yaml
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    expected = json.loads(out.read_text())
    family = expected["family"]
    os.chdir(export)  # the YAMLs' paths are relative to the export folder
    bad = 0
    for yaml_name in sorted(p.name for p in export.glob("[0-9][0-9]_*.yaml")):
        cfg = yaml.safe_load(Path(yaml_name).read_text())
        cfg["model_name_or_path"] = model
        cfg["output_dir"] = f"/tmp/lf_parity_out/{yaml_name}"  # parsing only: no adapters
        model_args, data_args, training_args, _finetuning_args, _ = get_train_args(cfg)
        module = load_tokenizer(model_args)
        tokenizer, processor = module["tokenizer"], module["processor"]
        template = get_template_and_fix_tokenizer(tokenizer, data_args)
        data = get_dataset(template, model_args, data_args, training_args, stage="sft", **module)
        n_loaded = len(data["train_dataset"])
        template.mm_plugin.expand_mm_tokens = False
        stage = yaml_name[3:-5]
        rows = [json.loads(line) for line in
                (Path("data") / f"{stage}.jsonl").read_text(encoding="utf-8").splitlines()]
        same = 0
        for rec, (want_prompt, want_answer) in zip(rows, expected["stages"][stage], strict=True):
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
            images = [os.path.join("data", p) for p in rec["images"]]
            msgs = template.mm_plugin.process_messages(msgs, images, [], [], processor)
            prompt_ids, answer_ids = template.encode_oneturn(tokenizer, msgs)
            got_prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
            got_answer = tokenizer.decode(answer_ids, skip_special_tokens=False)
            if (got_prompt == PROMPT_PREFIX.get(family, "") + want_prompt
                    and got_answer == want_answer + ANSWER_TAIL.get(family, "")):
                same += 1
            elif bad < 3:
                print(f"  DIFF {stage}: {got_prompt!r} | {got_answer!r}\n"
                      f"  ours {stage}: {want_prompt!r} | {want_answer!r}")
        bad += len(rows) - same
        print(f"{family} {yaml_name}: parsed (template {data_args.template}, default_system "
              f"{data_args.default_system!r}, bf16 {training_args.bf16}, fp16 "
              f"{training_args.fp16}, image_max_pixels {model_args.image_max_pixels}); "
              f"{n_loaded} samples loaded; prompt+answer equal for {same}/{len(rows)}")
    return 1 if bad else 0


if __name__ == "__main__":
    mode, export_dir, model_path, out_json = sys.argv[1:5]
    export_dir, out_json = Path(export_dir).resolve(), Path(out_json).resolve()
    if mode == "ours":
        ours(export_dir, model_path, out_json)
    else:
        sys.exit(lf(export_dir, str(Path(model_path).resolve()), out_json))
