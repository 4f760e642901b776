"""Tiny, randomly initialised VLMs of every family, built offline in a second for tests and demos.

Each is built from the family's transformers config classes (text hidden 64, 2 layers; a small
vision tower), with a byte-level BPE tokenizer trained locally on English + Japanese text and the
family's special tokens, the family's real processor class and chat template, and saved with
``save_pretrained`` so it reloads with ``AutoModelForImageTextToText`` / ``AutoProcessor``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from emomerge.merging.atomic import atomic_folder
from emomerge.merging.errors import InputError

from .families import FAMILIES, get_family

_CORPUS = [
    (
        "Which emotions does the speaker express? Choose one or more of: Anger, Disgust, Fear, Joy, "
        "Neutral, Sadness, Surprise. Answer with the labels separated by commas."
    ),
    (
        "Look at this artwork. Which emotion does it evoke most strongly? Calm, Excited, Contentment, "
        "Frustrated, Sad, Aroused, Alarmed, Bored, Happy, Annoyed, Tired, Glad."
    ),
    "Does the music match the image? yes - amusement, no. anger awe contentment excitement fear.",
    "この漫画のページで、登場人物は何をしていますか？簡潔に日本語で答えてください。",
    "赤い丸、青い四角、緑の三角、黄色い星。怒り、喜び、悲しみ、驚き、恐れ。はい、いいえ。",
    'These are the utterances on this comic page: [{"utterance": 1, "emotions": ["Joy"]}]',
    "You are a helpful assistant. USER: ASSISTANT: the quick brown fox jumps over the lazy dog.",
]

_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
)

#: Special tokens per family: (all specials, bos, eos, pad, image token key → token).
_SPECIALS: dict[str, dict[str, Any]] = {
    "qwen": dict(
        tokens=[
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<|vision_start|>",
            "<|vision_end|>",
            "<|vision_pad|>",
            "<|image_pad|>",
            "<|video_pad|>",
        ],
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        unk=None,
        extra={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    ),
    "mllama": dict(
        tokens=[
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|python_tag|>",
            "<|finetune_right_pad_id|>",
            "<|image|>",
        ],
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        unk=None,
        extra={"image_token": "<|image|>"},
    ),
    "llava": dict(
        tokens=["<unk>", "<s>", "</s>", "<pad>", "<image>", "[INST]", "[/INST]"],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        extra={"image_token": "<image>"},
    ),
    "pixtral": dict(
        tokens=[
            "<unk>",
            "<s>",
            "</s>",
            "<pad>",
            "[INST]",
            "[/INST]",
            "[IMG]",
            "[IMG_BREAK]",
            "[IMG_END]",
        ],
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        extra={
            "image_token": "[IMG]",
            "image_break_token": "[IMG_BREAK]",
            "image_end_token": "[IMG_END]",
        },
    ),
}
_TOKENIZER_KIND = {
    "qwen2_5_vl": "qwen",
    "qwen3_vl": "qwen",
    "mllama": "mllama",
    "llava": "llava",
    "llava_next": "llava",
    "pixtral": "pixtral",
}


def build_tokenizer(kind: str, vocab_size: int = 400):
    """A byte-level BPE trained on a few sentences, with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sp = _SPECIALS[kind]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=sp["tokens"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        pad_token=sp["pad"],
        unk_token=sp["unk"],
        extra_special_tokens=sp["extra"],
        clean_up_tokenization_spaces=False,
    )


def _ids(tok) -> dict[str, Any]:
    """Token ids the text config must agree with (defaults point at the real 150k vocabularies)."""
    return dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def _qwen2_5_vl(tok) -> tuple[Any, Any]:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIALS["qwen"]["tokens"]}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            **_TEXT,
            **_ids(tok),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
            },
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    px = dict(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14, merge_size=2)
    proc = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**px),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**px),
        chat_template=FAMILIES["qwen2_5_vl"].chat_template,
    )
    return config, proc


def _qwen3_vl(tok) -> tuple[Any, Any]:
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    ids = {t: tok.convert_tokens_to_ids(t) for t in _SPECIALS["qwen"]["tokens"]}
    config = Qwen3VLConfig(
        text_config=dict(
            **_TEXT,
            **_ids(tok),
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        ),
        # Three deepstack indexes: mergekit's Qwen3-VL definition hard-codes three
        # (docs/DESIGN.md, Facts).
        vision_config=dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1, 2],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    px = dict(
        size={"shortest_edge": 64 * 64, "longest_edge": 128 * 128}, patch_size=16, merge_size=2
    )
    proc = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**px),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(**px),
        chat_template=FAMILIES["qwen3_vl"].chat_template,
    )
    return config, proc


def _mllama(tok) -> tuple[Any, Any]:
    from transformers import MllamaConfig, MllamaImageProcessor, MllamaProcessor

    config = MllamaConfig(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            **_ids(tok),
            cross_attention_layers=[1],
            max_position_embeddings=2048,
        ),
        # Default supported_aspect_ratios: a shorter list breaks the processor
        # (docs/DESIGN.md, Facts).
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            image_size=28,
            patch_size=14,
            max_num_tiles=4,
            intermediate_layers_indices=[0],
            vision_output_dim=64,
        ),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    proc = MllamaProcessor(
        image_processor=MllamaImageProcessor(size={"height": 28, "width": 28}, max_image_tiles=4),
        tokenizer=tok,
        chat_template=FAMILIES["mllama"].chat_template,
    )
    return config, proc


def _clip_vision() -> dict[str, Any]:
    return dict(
        model_type="clip_vision_model",
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
    )


def _llava(tok) -> tuple[Any, Any]:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaProcessor

    config = LlavaConfig(
        text_config=dict(model_type="llama", **_TEXT, **_ids(tok)),
        vision_config=_clip_vision(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=16,
        projector_hidden_act="gelu",
    )
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=FAMILIES["llava"].chat_template,
    )
    return config, proc


def _llava_next(tok) -> tuple[Any, Any]:
    from transformers import LlavaNextConfig, LlavaNextImageProcessor, LlavaNextProcessor

    pinpoints = [[32, 32], [32, 64], [64, 32], [64, 64]]
    config = LlavaNextConfig(
        text_config=dict(model_type="mistral", **_TEXT, **_ids(tok), sliding_window=None),
        vision_config=_clip_vision(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=pinpoints,
        image_seq_length=16,
    )
    proc = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": 32},
            crop_size={"height": 32, "width": 32},
            image_grid_pinpoints=pinpoints,
        ),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=FAMILIES["llava_next"].chat_template,
    )
    return config, proc


def _pixtral(tok) -> tuple[Any, Any]:
    from transformers import LlavaConfig, PixtralImageProcessor, PixtralProcessor

    config = LlavaConfig(
        text_config=dict(model_type="mistral", **_TEXT, **_ids(tok), sliding_window=None),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            image_size=64,
            patch_size=16,
        ),
        image_token_id=tok.convert_tokens_to_ids("[IMG]"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
    )
    proc = PixtralProcessor(
        image_processor=PixtralImageProcessor(size={"longest_edge": 64}, patch_size=16),
        tokenizer=tok,
        patch_size=16,
        spatial_merge_size=1,
        chat_template=FAMILIES["pixtral"].chat_template,
    )
    return config, proc


_BUILDERS: dict[str, Callable[[Any], tuple[Any, Any]]] = {
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "mllama": _mllama,
    "llava": _llava,
    "llava_next": _llava_next,
    "pixtral": _pixtral,
}


def build_tiny_vlm(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a tiny random ``family`` model + processor to ``out_dir`` and return the path.

    The folder appears only when complete (written to a temporary sibling, then renamed).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    get_family(family)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: already exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(_TOKENIZER_KIND[family])
    config, processor = _BUILDERS[family](tok)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    with atomic_folder(out) as tmp:  # an empty folder at out is replaced
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out


#: The image-processor settings of the real checkpoints (their ``preprocessor_config.json`` /
#: ``processor_config.json`` on the hub), for resolution arithmetic without downloading them.
REAL_PROCESSORS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen2.5-VL-7B-Instruct (the 32B / 72B ship the same)
    "qwen2_5_vl": dict(
        hub="Qwen/Qwen2.5-VL-7B-Instruct",
        image=dict(
            min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2
        ),
    ),
    # Qwen/Qwen3-VL-8B-Instruct
    "qwen3_vl": dict(
        hub="Qwen/Qwen3-VL-8B-Instruct",
        image=dict(
            size={"shortest_edge": 65536, "longest_edge": 16777216},
            patch_size=16,
            merge_size=2,
            temporal_patch_size=2,
        ),
    ),
    # meta-llama/Llama-3.2-11B-Vision-Instruct (90B: the same)
    "mllama": dict(
        hub="meta-llama/Llama-3.2-11B-Vision-Instruct",
        image=dict(size={"height": 560, "width": 560}, max_image_tiles=4),
    ),
    # llava-hf/llava-1.5-7b-hf
    "llava": dict(
        hub="llava-hf/llava-1.5-7b-hf",
        image=dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
        processor=dict(
            patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1
        ),
    ),
    # llava-hf/llava-v1.6-mistral-7b-hf
    "llava_next": dict(
        hub="llava-hf/llava-v1.6-mistral-7b-hf",
        image=dict(
            size={"shortest_edge": 336},
            crop_size={"height": 336, "width": 336},
            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        ),
        processor=dict(
            patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1
        ),
    ),
    # mistral-community/pixtral-12b
    "pixtral": dict(
        hub="mistral-community/pixtral-12b",
        image=dict(size={"longest_edge": 1024}, patch_size=16),
        processor=dict(patch_size=16, spatial_merge_size=1),
    ),
}

_PROCESSOR_CLASSES = {
    "qwen2_5_vl": ("Qwen2_5_VLProcessor", "Qwen2VLImageProcessor", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("Qwen3VLProcessor", "Qwen2VLImageProcessor", "Qwen3VLVideoProcessor"),
    "mllama": ("MllamaProcessor", "MllamaImageProcessor", None),
    "llava": ("LlavaProcessor", "CLIPImageProcessor", None),
    "llava_next": ("LlavaNextProcessor", "LlavaNextImageProcessor", None),
    "pixtral": ("PixtralProcessor", "PixtralImageProcessor", None),
}


def real_processor(family: str) -> Any:
    """The family's processor with the real checkpoint's image settings (:data:`REAL_PROCESSORS`)
    and the tiny tokenizer: image-token counts as the real model's, offline, without weights."""
    import transformers

    get_family(family)
    real = REAL_PROCESSORS[family]
    proc_cls, image_cls, video_cls = (
        getattr(transformers, n) if n else None for n in _PROCESSOR_CLASSES[family]
    )
    parts: dict[str, Any] = dict(
        image_processor=image_cls(**real["image"]),
        tokenizer=build_tokenizer(_TOKENIZER_KIND[family]),
    )
    if video_cls is not None:
        parts["video_processor"] = video_cls(**real["image"])
    return proc_cls(
        **parts, **real.get("processor", {}), chat_template=FAMILIES[family].chat_template
    )
