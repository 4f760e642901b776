"""The model side: one loaded base, adapters switched with PEFT, raw outputs into the cache.

Evaluating ten variants loads the base once: each adapter folder is loaded into the same
``PeftModel`` under its own name and activated for its variant (a stacked chain activates its
parents too); the base alone runs with the adapters disabled.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from emomerge.merging.errors import InputError
from tqdm.auto import tqdm

from .cache import PredictionCache
from .scoring import (
    answer_prefix,
    continuation_ids,
    encode_prompts,
    label_sets,
    load_images,
    render_prompt,
    score_labels,
    set_text,
)
from .variants import Variant

#: Called after each flushed batch with the number of samples done so far (tests use it to
#: simulate a kill; a progress UI could use it too).
BatchHook = Callable[[int], None]


def base_fingerprint(name_or_path: str | Path) -> str:
    """The base's identity for cache keys: the merging core's content-bound checkpoint
    fingerprint (the same ``base.hash`` training records); the id itself for a hub id."""
    p = Path(name_or_path)
    if (p / "config.json").is_file():
        from emomerge.merging.checkpoint import Checkpoint

        try:
            return Checkpoint(p).fingerprint()
        except InputError:
            pass  # no safetensors weights: fall back to the name
    return hashlib.sha256(str(name_or_path).encode()).hexdigest()


def answer_suffix(family: str, tokenizer: Any) -> str:
    """The text that closes an assistant turn (what the model learned to stop on)."""
    try:
        from emomerge.training.families import get_family

        return get_family(family).answer_suffix
    except (ImportError, KeyError, AttributeError):
        return tokenizer.eos_token or ""


@dataclass
class ModelHost:
    """A base model and its processor, with PEFT adapters loaded on demand."""

    model: Any
    processor: Any
    family: str
    peft: Any = None
    _loaded: dict[Path, str] = field(default_factory=dict)
    #: The base's local folder (exact merged weights of modules_to_save need it), if any.
    base_path: str | None = None

    @classmethod
    def load(cls, base: str | Path, family: str | None = None, dtype: str | None = None,
             device: str = "cpu") -> ModelHost:
        """Load the base with the training module's loader (family detection, precision)."""
        from emomerge.training.models import load_vlm

        model, processor, family = load_vlm(base, family=family, dtype=dtype, device=device)
        local = str(base) if Path(base, "config.json").is_file() else None
        return cls(model.eval(), processor, family, base_path=local)

    def _adapter_name(self, folder: Path) -> str:
        if folder not in self._loaded:
            name = f"a{len(self._loaded)}"
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
                self.peft.eval()
            else:
                self.peft.load_adapter(str(folder), adapter_name=name)
            self._loaded[folder] = name
        return self._loaded[folder]

    @contextlib.contextmanager
    def activate(self, variant: Variant) -> Iterator[Any]:
        """The model to run for ``variant`` (adapters of its chain active, or none for the base;
        a variant with exact weights has them written into the base for the duration)."""
        if variant.exact:
            from .inplace import exact_variant

            off = self.peft.disable_adapter() if self.peft is not None else contextlib.nullcontext()
            with off, exact_variant(self.model, variant, self.base_path):
                yield self.peft if self.peft is not None else self.model
            return
        if not variant.chain:
            if self.peft is None:
                yield self.model
            else:
                with self.peft.disable_adapter():
                    yield self.peft
            return
        names = [self._adapter_name(f) for f in variant.chain]
        # LoraModel.set_adapter takes a list: several active adapters add their updates.
        self.peft.base_model.set_adapter(names if len(names) > 1 else names[0])
        yield self.peft

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def _uncached(cache: PredictionCache, split_hash: str, samples: list[Any]) -> list[Any]:
    """The samples without a cached output yet, in split order (what a resumed run still does)."""
    missing = set(cache.missing(split_hash, [s.id for s in samples]))
    return [s for s in samples if s.id in missing]


def candidate_answers(label_set: list[str], max_labels: int | None) -> tuple[list[str], list[tuple[int, ...]] | None]:
    """The answers scored for one sample: each label (``max_labels`` None), else every label set
    of up to ``max_labels`` labels in training's target spelling, with their label indices."""
    if max_labels is None:
        return list(label_set), None
    sets = label_sets(label_set, max_labels)
    return [set_text([label_set[i] for i in c]) for c in sets], sets


def run_likelihood(host: ModelHost, variant: Variant, samples: list[Any], cache: PredictionCache,
                   split_hash: str, *, append_eot: bool = False, max_labels: int | None = None,
                   batch_size: int = 8, progress: bool = True,
                   on_batch: BatchHook | None = None) -> int:
    """Score every candidate answer of every uncached sample; returns how many were scored.

    ``max_labels`` None scores each label as the whole answer (end-of-turn text after it when
    ``append_eot``); an integer scores every label set up to that size (:mod:`.scoring`), always
    closed by the end-of-turn text (a complete "Fear" is not the prefix of "Fear, Surprise"), and
    records the candidates' label indices as ``sets``.
    """
    todo = _uncached(cache, split_hash, samples)
    if not todo:
        return 0
    tok = host.tokenizer
    eot = answer_suffix(host.family, tok) if append_eot or max_labels is not None else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    done = 0
    with host.activate(variant) as model, tqdm(total=len(todo), desc=variant.name,
                                               disable=not progress, leave=False) as bar:
        for batch in _batches(todo, batch_size):
            records = []
            for s in batch:
                prompt = render_prompt(host.processor, s.messages)
                prefix = answer_prefix(host.processor, s.messages)  # as training encodes answers
                answers, sets = candidate_answers(list(s.label_set), max_labels)
                conts = continuation_ids(tok, prompt, [prefix + a for a in answers], eot)
                inputs = encode_prompts(host.processor, host.family, [prompt],
                                        [load_images(s.images)])
                scores = score_labels(model, inputs, conts, pad)
                rec: dict[str, Any] = {"id": s.id,
                                       "scores": [[x.logprob, x.n_tokens] for x in scores]}
                if sets is not None:
                    rec["sets"] = [list(c) for c in sets]
                records.append(rec)
            cache.add(split_hash, records)
            done += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(done)
    return done


@torch.inference_mode()
def run_generation(host: ModelHost, variant: Variant, samples: list[Any], cache: PredictionCache,
                   split_hash: str, *, max_new_tokens: int = 32, batch_size: int = 8,
                   progress: bool = True, on_batch: BatchHook | None = None) -> int:
    """Greedy answers of every uncached sample (left-padded batches); returns how many."""
    todo = _uncached(cache, split_hash, samples)
    if not todo:
        return 0
    tok = host.tokenizer
    old_side, tok.padding_side = tok.padding_side, "left"  # new tokens line up at the end
    done = 0
    try:
        with host.activate(variant) as model, tqdm(total=len(todo), desc=variant.name,
                                                   disable=not progress, leave=False) as bar:
            device = next(model.parameters()).device
            for batch in _batches(todo, batch_size):
                inputs = encode_prompts(host.processor, host.family,
                                        [render_prompt(host.processor, s.messages) for s in batch],
                                        [load_images(s.images) for s in batch])
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                new = out[:, inputs["input_ids"].shape[1]:]
                texts = tok.batch_decode(new, skip_special_tokens=True)
                cache.add(split_hash, [{"id": s.id, "text": t} for s, t in zip(batch, texts)])
                done += len(batch)
                bar.update(len(batch))
                if on_batch is not None:
                    on_batch(done)
    finally:
        tok.padding_side = old_side
    return done
