"""The model side: one loaded base, adapters switched with PEFT, raw outputs into the cache.

Evaluating ten variants loads the base once: each adapter folder is loaded into the same
``PeftModel`` under its own name and activated for its variant (a stacked chain activates its
parents too); the base alone runs with the adapters disabled.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emomerge.merging.progress import phase

from .cache import PredictionCache
from .scoring import (
    answer_context,
    answer_prefix,
    common_prefix,
    continuation_ids,
    cut_rows,
    encode_prompts,
    label_sets,
    load_images,
    render_prompt,
    score_labels_batch,
    score_shared_prefix,
    set_text,
)
from .variants import Variant

#: Called after each flushed batch with the number of samples done so far (tests use it to
#: simulate a kill; a progress UI could use it too).
BatchHook = Callable[[int], None]


def answer_suffix(family: str, tokenizer: Any) -> str:
    """The text that closes an assistant turn (what the model learned to stop on): the scored
    end of a candidate. What training supervises after it (Qwen's "\n", ``answer_tail``) is not
    scored: it follows the end of the turn whatever the label."""
    try:
        from emomerge.training.models.families import get_family

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
    def load(
        cls,
        base: str | Path,
        family: str | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        *,
        quantize_4bit: bool | str = False,
        device_map: str | None = None,
        max_pixels: int | None = None,
    ) -> ModelHost:
        """Load the base with the training module's loader (family detection, precision, the
        image cap training used, 4-bit or spread over GPUs for models one GPU cannot hold).
        Exact evaluation of merges writes into the weights: it needs them unquantized."""
        from emomerge.training.models.loading import load_vlm

        model, processor, family = load_vlm(
            base,
            family=family,
            dtype=dtype,
            device=device,
            quantize_4bit=quantize_4bit,
            device_map=device_map,
            max_pixels=max_pixels,
        )
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
        yield items[i : i + size]


def _uncached(cache: PredictionCache, split_hash: str, samples: list[Any]) -> list[Any]:
    """The samples without a cached output yet, in split order (what a resumed run still does)."""
    missing = set(cache.missing(split_hash, [s.id for s in samples]))
    return [s for s in samples if s.id in missing]


def candidate_answers(
    label_set: list[str], max_labels: int | None
) -> tuple[list[str], list[tuple[int, ...]] | None]:
    """The answers scored for one sample: each label (``max_labels`` None), else every label set
    of up to ``max_labels`` labels in training's target spelling, with their label indices."""
    if max_labels is None:
        return list(label_set), None
    sets = label_sets(label_set, max_labels)
    return [set_text([label_set[i] for i in c]) for c in sets], sets


def _image_key(images: list[Any]) -> tuple:
    """Which samples show the same images (EmoComics35's utterances share their page file)."""
    return tuple(str(im) if isinstance(im, (str, Path)) else id(im) for im in images)


def _next_batch(todo: list[Any], start: int, size: int, whole_pages: bool) -> list[Any]:
    """Up to ``size`` samples from ``todo[start:]``; with ``whole_pages`` a page's run of
    consecutive same-image samples is not split unless it alone is larger than ``size``."""
    end = min(start + size, len(todo))
    if whole_pages and end < len(todo):
        key = _image_key(todo[end].images)
        cut = end
        while cut > start and _image_key(todo[cut - 1].images) == key:
            cut -= 1
        if cut > start:  # the page that straddles the boundary goes into the next batch
            end = cut
    return todo[start:end]


def _image_token_id(processor: Any) -> int | None:
    tid = getattr(processor, "image_token_id", None)
    if tid is None and getattr(processor, "image_token", None):
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return tid


def _ids(inputs: dict[str, Any]) -> list[list[int]]:
    """Each row's real token ids (padding dropped)."""
    return [row[m.bool()].tolist() for row, m in zip(inputs["input_ids"], inputs["attention_mask"])]


def _ids_from_rep(
    tok: Any, image_token: str, rep_prompt: str, rep_ids: list[int], prompts: list[str]
) -> list[list[int]] | None:
    """Token ids of ``prompts`` (same images as the representative) without running the image
    processor again: the representative's ids up to a special token that all prompts share
    after their last image, then each prompt's own text tokenized.

    Special tokens split the text before BPE, so what follows one is tokenized on its own; the
    representative's own ids must come out the same this way, else None (process each prompt).
    """
    common = len(os.path.commonprefix([rep_prompt, *prompts]))
    last_image = rep_prompt.rfind(image_token)
    specials = [str(t) for t in tok.added_tokens_decoder.values() if t.special]
    ends = [i + len(sp) for sp in specials for i in _find_all(rep_prompt, sp)]
    # the character after the split is shared too (tokens that strip whitespace stay alike)
    ends = [
        e for e in ends if e < common and (last_image < 0 or e >= last_image + len(image_token))
    ]
    if last_image < 0 or not ends:
        return None
    cut = max(ends)
    tail = list(tok(rep_prompt[cut:], add_special_tokens=False)["input_ids"])
    head = len(rep_ids) - len(tail)
    if head <= 0 or rep_ids[head:] != tail:
        return None
    return [
        rep_ids[:head] + list(tok(q[cut:], add_special_tokens=False)["input_ids"]) for q in prompts
    ]


def _find_all(text: str, sub: str) -> Iterator[int]:
    i = text.find(sub)
    while i >= 0:
        yield i
        i = text.find(sub, i + 1)


def _page_plan(
    host: ModelHost, batch: list[Any], prompts: list[str], pad: int
) -> tuple[dict[str, Any], list[int], list[list[int]]]:
    """Prefix inputs (one row per page with its images), each sample's prefix row, and each
    sample's suffix tokens: a page's prefix is its utterances' longest common token prefix, if
    that holds every image token; otherwise (or for a lone sample) each prompt but its last
    token is its own prefix."""
    keys = [_image_key(s.images) for s in batch]
    groups: list[list[int]] = []
    for u, key in enumerate(keys):
        if groups and keys[groups[-1][0]] == key:
            groups[-1].append(u)
        else:
            groups.append([u])
    firsts = [g[0] for g in groups]
    loaded = {u: load_images(batch[u].images) for u in firsts}
    enc = encode_prompts(
        host.processor, host.family, [prompts[u] for u in firsts], [loaded[u] for u in firsts]
    )
    first_ids = _ids(enc)
    image_id = _image_token_id(host.processor)
    image_token = getattr(host.processor, "image_token", None) or ""
    ids: dict[int, list[int]] = {}
    plan: list[tuple[int, int]] = []  # (representative, prefix length) per prefix row
    owner = [0] * len(batch)
    for g, members in enumerate(groups):
        got = (
            _ids_from_rep(
                host.tokenizer,
                image_token,
                prompts[members[0]],
                first_ids[g],
                [prompts[u] for u in members],
            )
            if len(members) > 1
            else None
        )
        if got is None:  # lone sample, or ids not derivable: each prompt is its own prefix
            for u in members:
                owner[u] = len(plan)
                plan.append((u, -1))
            continue
        n = min(common_prefix(got), min(len(x) for x in got) - 1)
        last_image = max((i for x in got for i, t in enumerate(x) if t == image_id), default=-1)
        for u, x in zip(members, got):
            ids[u] = x
            if n <= last_image:  # the image features enter in the prefix pass only
                owner[u] = len(plan)
                plan.append((u, -1))
            else:
                owner[u] = owner[members[0]] if u != members[0] else len(plan)
                if u == members[0]:
                    plan.append((u, n))
    reps = [u for u, _ in plan]
    if reps != firsts:  # some prompts are their own prefix: encode those with their images
        enc = encode_prompts(
            host.processor,
            host.family,
            [prompts[u] for u in reps],
            [loaded.get(u) or load_images(batch[u].images) for u in reps],
        )
    rep_ids = _ids(enc)
    for (u, _), x in zip(plan, rep_ids):
        ids.setdefault(u, x)
    keep = [len(ids[u]) - 1 if n < 0 else n for u, n in plan]
    suffixes = [ids[u][keep[owner[u]] :] for u in range(len(batch))]
    return cut_rows(enc, keep, pad), owner, suffixes


def _score_batch(
    host: ModelHost,
    model: Any,
    batch: list[Any],
    conts: list[list[list[int]]],
    prompts: list[str],
    *,
    pad: int,
    chunk: int,
    page_cache: bool,
) -> list[list[Any]]:
    """Scores of a batch of samples; with ``page_cache`` each run of same-image samples shares
    one encoding of its longest common token prefix (:func:`scoring.score_shared_prefix`), and
    its images are loaded and processed once."""
    keys = [_image_key(s.images) for s in batch]
    if not page_cache or len(set(keys)) == len(keys):  # nothing shared: plain batched prompts
        inputs = encode_prompts(
            host.processor, host.family, prompts, [load_images(s.images) for s in batch]
        )
        return score_labels_batch(model, inputs, conts, pad, chunk=chunk)
    prefix_inputs, owner, suffixes = _page_plan(host, batch, prompts, pad)
    return score_shared_prefix(model, prefix_inputs, owner, suffixes, conts, pad, chunk=chunk)


def run_likelihood(
    host: ModelHost,
    variant: Variant,
    samples: list[Any],
    cache: PredictionCache,
    split_hash: str,
    *,
    append_eot: bool = False,
    max_labels: int | None = None,
    batch_size: int = 8,
    page_cache: bool = True,
    chunk: int = 64,
    progress: bool = True,
    on_batch: BatchHook | None = None,
    label: str | None = None,
) -> int:
    """Score every candidate answer of every uncached sample; returns how many were scored.

    ``max_labels`` None scores each label as the whole answer (end-of-turn text after it when
    ``append_eot``); an integer scores every label set up to that size (:mod:`.scoring`), always
    closed by the end-of-turn text (a complete "Fear" is not the prefix of "Fear, Surprise"), and
    records the candidates' label indices as ``sets``.

    ``batch_size`` prompts share one forward pass (left-padded) and their candidates one more
    (``chunk`` candidates packed in a row; :func:`scoring.score_labels_batch`); with
    ``page_cache`` consecutive samples with the same images (one comic page's utterances) are
    kept in one batch and share the encoding of their common prompt prefix. None of these
    changes a score beyond float rounding (tests check 1e-4), so none is part of the cache key.
    A CUDA out-of-memory halves ``batch_size`` (at 1, ``chunk``) and retries the batch; the
    smaller size stays for the rest of the run. ``label``: the progress phase (default
    ``score <variant>``; the runner names the evaluation set too).
    """
    todo = _uncached(cache, split_hash, samples)
    if not todo:
        return 0
    tok = host.tokenizer
    eot = answer_suffix(host.family, tok) if append_eot or max_labels is not None else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    done = 0
    known: dict[tuple, list[list[int]]] = {}  # candidate tokens by answer context
    # left padding: every prompt ends in the last column, where its first answer token is read
    old_side, tok.padding_side = tok.padding_side, "left"
    try:
        with (
            host.activate(variant) as model,
            phase(label or f"score {variant.name}", len(todo), enabled=progress) as bar,
        ):
            while done < len(todo):
                batch = _next_batch(todo, done, batch_size, page_cache)
                prompts, conts, sets = [], [], []
                for s in batch:
                    prompt = render_prompt(host.processor, s.messages, host.family)
                    prefix = answer_prefix(host.processor, s.messages)  # as training encodes
                    answers, cand = candidate_answers(list(s.label_set), max_labels)
                    prompts.append(prompt)
                    # 63 tokenizer calls a prompt otherwise; prompts ending alike share them
                    key = (answer_context(tok, prompt), prefix, tuple(answers))
                    if key not in known:
                        known[key] = continuation_ids(
                            tok, key[0], [prefix + a for a in answers], eot
                        )
                    conts.append(known[key])
                    sets.append(cand)
                try:
                    scores = _score_batch(
                        host,
                        model,
                        batch,
                        conts,
                        prompts,
                        pad=pad,
                        chunk=chunk,
                        page_cache=page_cache,
                    )
                except torch.cuda.OutOfMemoryError:
                    if batch_size == 1 and chunk == 1:
                        raise
                    scores = None  # retried below, once this frame's tensors are released
                if scores is None:  # fewer prompts a pass first, then fewer candidates a row
                    if batch_size > 1:
                        batch_size //= 2
                    else:
                        chunk //= 2
                    warnings.warn(
                        f"{variant.name}: CUDA out of memory; retrying with batch size "
                        f"{batch_size}, chunk {chunk}",
                        stacklevel=2,
                    )
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
                    continue
                records = []
                for s, sc, cand in zip(batch, scores, sets):
                    rec: dict[str, Any] = {
                        "id": s.id,
                        "scores": [[x.logprob, x.n_tokens] for x in sc],
                    }
                    if cand is not None:
                        rec["sets"] = [list(c) for c in cand]
                    records.append(rec)
                cache.add(split_hash, records)
                done += len(batch)
                bar.advance(len(batch))
                if on_batch is not None:
                    on_batch(done)
    finally:
        tok.padding_side = old_side
    return done


@torch.inference_mode()
def run_generation(
    host: ModelHost,
    variant: Variant,
    samples: list[Any],
    cache: PredictionCache,
    split_hash: str,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    progress: bool = True,
    on_batch: BatchHook | None = None,
    label: str | None = None,
) -> int:
    """Greedy answers of every uncached sample (left-padded batches); returns how many.
    ``label``: the progress phase (default ``score <variant>``)."""
    todo = _uncached(cache, split_hash, samples)
    if not todo:
        return 0
    tok = host.tokenizer
    old_side, tok.padding_side = tok.padding_side, "left"  # new tokens line up at the end
    done = 0
    try:
        with (
            host.activate(variant) as model,
            phase(label or f"score {variant.name}", len(todo), enabled=progress) as bar,
        ):
            device = next(model.parameters()).device
            for batch in _batches(todo, batch_size):
                inputs = encode_prompts(
                    host.processor,
                    host.family,
                    [render_prompt(host.processor, s.messages, host.family) for s in batch],
                    [load_images(s.images) for s in batch],
                )
                inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
                out = model.generate(
                    **inputs,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                )
                new = out[:, inputs["input_ids"].shape[1] :]
                texts = tok.batch_decode(new, skip_special_tokens=True)
                cache.add(split_hash, [{"id": s.id, "text": t} for s, t in zip(batch, texts)])
                done += len(batch)
                bar.advance(len(batch))
                if on_batch is not None:
                    on_batch(done)
    finally:
        tok.padding_side = old_side
    return done
