"""usage: python tools/interop/lf_parity.py ours CURRICULUM MODEL OUT.json   (emomerge's venv)
       python tools/interop/lf_parity.py lf   EXPORT_DIR MODEL OUT.json   (LLaMA-Factory's venv)

``ours`` writes the prompt/answer strings emomerge trains on for every sample of the export, and
their token ids as emomerge encodes them (a BOS the prompt opens with as its id, the rest
tokenized on its own; image placeholders not expanded); ``lf`` parses every stage YAML with
LLaMA-Factory's own argument parser, loads each stage's data through its loader, renders the same
samples with its template and plugin (tokens not expanded) and compares strings and ids: one line
per stage, exit 1 on any difference (docs/INTEROP.md: none is left).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as emomerge encodes a prompt (``batching.process_texts``): a BOS it
    opens with as the id, the rest tokenized on its own; image placeholders left unexpanded."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        return [tokenizer.bos_token_id] + tokenizer.encode(
            text[len(bos) :], add_special_tokens=False
        )
    return tokenizer.encode(text, add_special_tokens=False)


def ours(curriculum: Path, model: str, out: Path) -> None:
    from emomerge.training.curriculum import load_curriculum
    from emomerge.training.models.batching import answer_text, render_prompt
    from emomerge.training.models.families import detect_family
    from emomerge.training.models.loading import load_processor
    from emomerge.training.stages import plan_stages

    cur = load_curriculum(curriculum)
    family = detect_family(model)
    processor = load_processor(model, family, cur.train.max_pixels)
    tok = processor.tokenizer
    rows = {}
    for plan in plan_stages(cur, out.parent / "unused"):
        rows[plan.stage.name] = []
        for s in plan.samples:
            prompt, answer = render_prompt(processor, s, family), answer_text(processor, family, s)
            p_ids = _ids(tok, prompt)
            full = _ids(tok, prompt + answer)
            if full[: len(p_ids)] != p_ids:
                raise SystemExit(f"sample {s.id}: prompt and answer tokens merge")
            rows[plan.stage.name].append([prompt, answer, p_ids, full[len(p_ids) :]])
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
        rows = [
            json.loads(line)
            for line in (Path("data") / f"{stage}.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        same = 0
        for rec, want in zip(rows, expected["stages"][stage], strict=True):
            want_prompt, want_answer, want_prompt_ids, want_answer_ids = want
            msgs = [{"role": m["role"], "content": m["content"]} for m in rec["messages"]]
            images = [os.path.join("data", p) for p in rec["images"]]
            msgs = template.mm_plugin.process_messages(msgs, images, [], [], processor)
            prompt_ids, answer_ids = template.encode_oneturn(tokenizer, msgs)
            got_prompt = tokenizer.decode(prompt_ids, skip_special_tokens=False)
            got_answer = tokenizer.decode(answer_ids, skip_special_tokens=False)
            if (
                got_prompt == want_prompt
                and got_answer == want_answer
                and prompt_ids == want_prompt_ids
                and answer_ids == want_answer_ids
            ):
                same += 1
            elif bad < 3:
                print(
                    f"  DIFF {stage}: {got_prompt!r} | {got_answer!r} {prompt_ids} | {answer_ids}\n"
                    f"  ours {stage}: {want_prompt!r} | {want_answer!r} {want_prompt_ids} | "
                    f"{want_answer_ids}"
                )
        bad += len(rows) - same
        print(
            f"{family} {yaml_name}: parsed (template {data_args.template}, default_system "
            f"{data_args.default_system!r}, bf16 {training_args.bf16}, fp16 "
            f"{training_args.fp16}, image_max_pixels {model_args.image_max_pixels}); "
            f"{n_loaded} samples loaded; prompt+answer strings and ids equal for {same}/{len(rows)}"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    mode, export_dir, model_path, out_json = sys.argv[1:5]
    export_dir, out_json = Path(export_dir).resolve(), Path(out_json).resolve()
    if mode == "ours":
        ours(export_dir, model_path, out_json)
    else:
        sys.exit(lf(export_dir, str(Path(model_path).resolve()), out_json))
