"""One schema for every params file: unknown keys and bad values fail before any work starts. A params file chooses
the world (model, data, judge), never the code path; ``load_params`` takes a path or a preset name (``params/<name>.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from medcomp.files import content_hash
from medcomp.numerics import resolve_mode
from medcomp.validation import UniqueKeyLoader, describe, key_paths, looks_like_variable_name, merge_overrides, secret_like_keys  # noqa: F401 (re-exported)
from medcomp.knowledge import DISEASES_BY_SLUG, QUESTIONS

REPO_ROOT = Path(__file__).resolve().parent.parent
PRESETS_DIR = REPO_ROOT / "params"

Dtype = Literal["float32", "float16", "bfloat16"]


class ParamsError(ValueError):
    """A params file is missing, unreadable or invalid; the message names the file and the key."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EmbeddedPretrainingParams(Strict):
    """LLaVA-1.5's pretraining in miniature (``medcomp.pretraining``), run once by ``bootstrap``; images from the dataset
    generator with their own seed, with visual captions only."""
    images_per_disease: int = Field(400, ge=2, le=10000)
    image_size: int = Field(96, ge=16, le=1024)
    seed: int = Field(1000, description="must differ from data.synthetic.seed")
    vision_steps: int = Field(600, ge=1, le=100000)
    vision_batch_size: int = Field(64, ge=2, le=4096)
    vision_learning_rate: float = Field(1e-3, gt=0, le=1.0)
    stage1_steps: int = Field(80, ge=1, le=100000)
    stage1_batch_size: int = Field(8, ge=1, le=512)
    stage1_learning_rate: float = Field(3e-3, gt=0, le=1.0)


class EmbeddedModelParams(Strict):
    """How the offline LLaVA is assembled when ``model.id`` starts with ``embedded:``."""
    image_size: int = Field(64, ge=16, le=448)
    patch_size: int = Field(16, ge=2, le=32)
    vision_layers: int = Field(4, ge=2, le=24)
    vision_hidden_size: int = Field(192, ge=32, le=1024)
    seed: int | None = Field(None, description="the tower's initialisation; None: the run's seed")
    pretraining: EmbeddedPretrainingParams | None = Field(None, description="None: tower and projector stay random")


class ModelParams(Strict):
    id: str = Field("llava-hf/llava-1.5-7b-hf", min_length=1, description="hub id, local path, or embedded:<name>")
    dtype: Dtype = "float16"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    gpus: int = Field(1, ge=1, le=16, description="GPUs one model is split over on CUDA (medcomp.placement); Kaggle gives two T4s")
    embedded: EmbeddedModelParams = EmbeddedModelParams()


class SyntheticDataParams(Strict):
    train_per_disease: int = Field(30, ge=1, le=2000)
    test_per_disease: int = Field(5, ge=1, le=500)
    image_size: int = Field(96, ge=16, le=1024)
    seed: int = 0


class FolderRule(Strict):
    disease: str
    folder: str
    pattern: str


class DataParams(Strict):
    root: str = Field("/kaggle/input/dermnet", description="DermNet root with train/ and test/, or 'synthetic'")
    diseases: tuple[str, ...] = tuple(DISEASES_BY_SLUG)
    folder_rules: tuple[FolderRule, ...] | None = None
    max_train_images_per_disease: int | None = Field(None, ge=1)
    test_images: int = Field(39, ge=1, le=10000)
    validation_per_disease: int = Field(0, ge=0, le=1000, description="validation images per disease, pixel-disjoint from train and test: "
                                        "root/validation/ if present, else held out of train (seeded); synthetic roots draw them after test")
    synthetic: SyntheticDataParams = SyntheticDataParams()

    @model_validator(mode="after")
    def _known_diseases(self) -> "DataParams":
        unknown = [d for d in self.diseases if d not in DISEASES_BY_SLUG]
        if unknown:
            raise ValueError(f"unknown disease(s) {unknown}; allowed: {sorted(DISEASES_BY_SLUG)}")
        if len(set(self.diseases)) < 2:
            raise ValueError("at least two distinct diseases are needed")
        return self


class LoraParams(Strict):
    r: int = Field(8, ge=1, le=256)
    alpha: int = Field(32, ge=1, le=1024)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FinetuneParams(Strict):
    quantization: Literal["nf4", "none"] = "nf4"
    multi_turn: bool = Field(True, description="one sequence per image holding its question/answer turns (the paper's format)")
    compute_dtype: Dtype = "float16"
    lora: LoraParams = LoraParams()
    fully_trained_modules: tuple[Literal["vision_tower", "multi_modal_projector"], ...] = ()
    epochs: float = Field(1.0, gt=0, le=100)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(4, ge=1, le=512)
    gradient_accumulation_steps: int = Field(1, ge=1, le=512)
    learning_rate: float = Field(2e-4, gt=0, le=1.0)
    modules_learning_rate: float = Field(1e-3, gt=0, le=1.0, description="for fully_trained_modules")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    gradient_checkpointing: bool = False
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(100, ge=1, description="checkpoint interval; an interrupted run resumes from the last one")



BatchSize = Annotated[int, Field(ge=1, le=512)] | Literal["auto"]


class EvaluationParams(Strict):
    max_new_tokens: int = Field(64, ge=1, le=2048)
    batch_size: BatchSize = Field(16, description="generation batch; 'auto': the largest the T4 plan fits (medcomp.plan)")
    sample_answers: int = Field(6, ge=0, le=1000)


PAPER_PRUNING_LEVELS = (0.0, 2 / 32, 4 / 32, 7 / 32, 8 / 32, 9 / 32, 10 / 32)  # Table 1: layers of 32


class ImportanceParams(Strict):
    """02_layer_importance: the paper's prune-one-block criterion and its baselines (section 3.2)."""
    calibration_size: int = Field(16, ge=1, le=10000, description="training conversations sampled (seeded)")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="answer length of the sweep's generations")
    batch_size: BatchSize = Field(16, description="generation batch; 'auto': the largest the T4 plan fits (medcomp.plan)")
    protect_first: int = Field(2, ge=0, le=64, description="first blocks never pruned (paper: blocks 1 and 2)")
    protect_last: int = Field(1, ge=0, le=64, description="last blocks never pruned (paper: block 32)")
    sentence_model: str = Field("packaged", min_length=1, description="'packaged' (offline copy) or a hub id of all-MiniLM-L6-v2")


class PruningParams(Strict):
    """03_prune: which ranking removes layers, and how many, as fractions of the depth."""
    ranking: Literal["similarity", "magnitude", "block_influence", "perplexity", "authors"] = "similarity"
    levels: tuple[float, ...] = Field(PAPER_PRUNING_LEVELS, min_length=1, description="fractions of the decoder layers to remove")
    magnitude_level: float = Field(7 / 32, ge=0, lt=1, description="the level also pruned by the magnitude ranking (Table 5)")
    example_index: int = Field(0, ge=0, description="the test image answered at every level (Figure B2)")

    @model_validator(mode="after")
    def _levels_are_fractions(self) -> "PruningParams":
        if any(not 0 <= level < 1 for level in self.levels):
            raise ValueError(f"every level is a fraction of the layers in [0, 1); got {list(self.levels)}")
        if list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels must be distinct and increasing; got {list(self.levels)}")
        if self.magnitude_level not in self.levels:
            raise ValueError(f"magnitude_level {self.magnitude_level} must be one of levels {list(self.levels)}")
        return self


class RecoveryParams(Strict):
    """04_sft_pruned: QLoRA SFT of pruned models (section 3.3). ``levels``: fractions of the depth (Table 2: 7 and 9 of
    32 removed); ``magnitude``: 03's magnitude-pruned model recovered too (Table 5's baseline)."""
    levels: tuple[float, ...] = Field((7 / 32, 9 / 32), min_length=1, description="pruning levels to recover, fractions of the depth")
    magnitude: bool = True
    finetune: FinetuneParams = FinetuneParams(lora=LoraParams(r=16, alpha=8))

    @model_validator(mode="after")
    def _levels_are_fractions(self) -> "RecoveryParams":
        if any(not 0 < level < 1 for level in self.levels) or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"levels must be distinct, increasing fractions in (0, 1); got {list(self.levels)}")
        return self


QuantizationMethod = Literal["awq", "rtn", "bnb"]


class QuantizationParams(Strict):
    """05_quantize: 4-bit PTQ of the decoder (section 3.4) per role: ``finetuned``, ``pruned`` (the first recovery level
    before SFT), ``recovered`` (04's but the magnitude baseline), ``pipeline_ablations`` (the first recovered level
    only), ``recovered_magnitude`` (Table 5). The defaults cover every cell of Tables 3, 4 and 5."""
    group_size: int = Field(64, description="paper: 64 for every method")
    calibration_size: int = Field(8, ge=1, le=4096, description="AWQ calibration conversations from the training set (seeded), images included")
    finetuned: tuple[QuantizationMethod, ...] = ("awq", "bnb")
    pruned: tuple[QuantizationMethod, ...] = ("awq",)
    recovered: tuple[QuantizationMethod, ...] = ("awq", "bnb")
    pipeline_ablations: tuple[QuantizationMethod, ...] = Field(("rtn",), description="further methods for the first recovered level only (Table 5)")
    recovered_magnitude: tuple[QuantizationMethod, ...] = ("awq",)
    figure_layer_fraction: float = Field(30 / 32, gt=0, le=1, description="Figure 4's decoder layer as a fraction of depth (paper: 30 of 32)")

    @model_validator(mode="after")
    def _supported(self) -> "QuantizationParams":
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128 (the AWQ GEMM kernels'); got {self.group_size}")
        return self


class BeyondParams(Strict):
    """08_beyond: 4-bit models that keep the finetune, for the finetuned model and the first recovered level
    (issue 31; docs/beyond.md). Adapters train on 05's ``grid`` checkpoint of each with ``recipe``."""
    grid: Literal["awq", "rtn"] = Field("awq", description="05's 4-bit checkpoint the adapters train against (it must be in quantization.finetuned/recovered)")
    gptq: bool = Field(True, description="GPTQ (GPTQModel, group size 64, natural order), stored as int4: the other standard 4-bit method")
    qalora: bool = Field(True, description="QA-LoRA: group-pooled adapter, folded exactly into the 4-bit offsets (no adapter served)")
    lora_on_grid: bool = Field(True, description="an ordinary LoRA trained against the 4-bit grid, served unmerged")
    qlora_deployment: bool = Field(True, description="the nf4 base as trained on + the unmerged adapter (keeps the finetune)")
    quantize_then_recover: tuple[Literal["awq", "rtn"], ...] = Field((), description="04's recovery SFT through peft's AWQ layers on the 4-bit pruned model (slow)")
    recipe: FinetuneParams | None = Field(None, description="the adapters' training; None = recovery.finetune (04's recipe, unchanged)")
    distill_from: str | None = Field("finetuned", description="teacher of the distilled recoveries of the first level (issue 32; real path: finetuned-qlora, "
                                     "nf4, fits a T4); None = no distillation")
    distill_alphas: tuple[float, ...] = Field((1.0, 0.5), description="weights of the KL term, one recovery each (1: distillation alone)")
    distill_temperature: float = Field(2.0, gt=0, le=20)
    distill_top_k: int = Field(64, ge=1, le=1_000_000, description="teacher tokens kept per answer position (their mass is reported)")
    iterative_pruning: bool = Field(True, description="SLEB: re-rank after each removal (02's perplexity replay); recovered with 04's recipe if its blocks differ")
    replacement_steps: int = Field(300, ge=0, le=100_000, description="LLM-Streamline: one block trained (error per token, Adam) in place of the most similar "
                                   "contiguous run one block longer than 04's level, then 04's recovery; 0 = off")
    replacement_learning_rate: float = Field(1e-3, gt=0, le=1, description="Adam's; choose it by the block's error on validation (08 shows it)")
    replacement_samples: int = Field(64, ge=1, le=100_000, description="training conversations whose hidden states it learns from (batches of 02's size)")


class BenchmarkParams(Strict):
    """06_benchmark: memory and latency of every registered variant, measured the same way for all.

    Latency is greedy decoding of one fixed test image + question with exactly ``new_tokens`` new
    tokens (end-of-turn suppressed), after ``warmup`` untimed runs, the median of ``repeats`` timed runs;
    prefill (the prompt with its image, to the first token) is reported apart from decode.
    """
    new_tokens: int = Field(16, ge=2, le=1024, description="tokens forced per timed run")
    warmup: int = Field(1, ge=1, le=20, description="untimed runs first; the first one is the memory measurement")
    repeats: int = Field(3, ge=1, le=50, description="timed runs per variant; the median is reported")
    example_index: int = Field(1, ge=0, description="the test item timed (default: the first image's features question)")
    resident: Literal["all", "one"] = Field("all", description="'all': every variant loaded at once, runs interleaved round by round; "
                                            "'one': one variant in memory at a time (a GPU), its runs back to back")
    variants: tuple[str, ...] | None = Field(None, description="variants to measure; None = every registered one")
    bandwidth_gb_s: float = Field(320.0, gt=0, description="memory bandwidth of the target GPU for the bound (T4: 320 GB/s)")


class ProxyJudgeParams(Strict):
    """The offline judge's similarity thresholds (all-MiniLM-L6-v2 cosine between answer and reference)."""
    sentence_model: str = Field("packaged", min_length=1)
    excellent: float = Field(0.75, gt=0, le=1)
    helpful: float = Field(0.55, gt=0, le=1)
    partial: float = Field(0.35, gt=0, le=1)

    @model_validator(mode="after")
    def _ordered(self) -> "ProxyJudgeParams":
        if not self.partial < self.helpful < self.excellent:
            raise ValueError(f"thresholds must rise: partial < helpful < excellent; got {self.partial}, {self.helpful}, {self.excellent}")
        return self


class JudgeParams(Strict):
    """07_judge: the paper's 1-4 LLM judge (Appendix A). The API key is never a param: ``api_key_env`` names its variable."""
    backend: Literal["openai", "transformers", "proxy"] = "openai"
    model: str = Field("Qwen/Qwen2.5-32B-Instruct", min_length=1, description="served model name (openai) or hub id/path (transformers)")
    base_url: str = Field("http://localhost:8000/v1", pattern=r"^https?://", description="OpenAI-compatible endpoint (e.g. `vllm serve`)")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="NAME of the environment variable holding the key; never the key itself")
    concurrency: int = Field(8, ge=1, le=256)
    timeout_seconds: float = Field(120.0, gt=0, le=3600)
    max_retries: int = Field(4, ge=0, le=20, description="on 408/409/429/5xx and connection errors, with exponential backoff")
    parse_retries: int = Field(2, ge=0, le=10, description="re-asks when a reply has no unambiguous rating")
    max_tokens: int = Field(512, ge=16, le=8192)
    temperature: float = Field(0.0, ge=0, le=2)
    proxy: ProxyJudgeParams = ProxyJudgeParams()
    bootstrap_samples: int = Field(2000, ge=100, le=100000, description="resamples of the items for 95 % confidence intervals")
    figure5_item: int = Field(1, ge=0, description="the test item of Figure 5 (default: the first image's features question)")

    @model_validator(mode="after")
    def _no_secrets(self) -> "JudgeParams":
        # the messages never repeat the value: it may be a key pasted into the wrong field
        if self.api_key_env is not None and not looks_like_variable_name(self.api_key_env):
            raise ValueError("api_key_env must be the NAME of an environment variable in capitals (e.g. OPENAI_API_KEY), "
                             "never the key itself; value not shown")
        from urllib.parse import urlsplit

        parts = urlsplit(self.base_url)
        if parts.username or parts.password:
            raise ValueError("base_url must not carry credentials (user:password@); put the key in the environment variable "
                             "api_key_env names; value not shown")
        return self


class RuntimeParams(Strict):
    threads: int = Field(2, ge=1, le=256, description="torch threads for training and generation")
    numerics: Literal["auto", "default", "pinned", "portable"] = Field("default", description="CPU kernels (medcomp.numerics): 'pinned' caps ATen, MKL, oneDNN at AVX2 (Intel's bits); "
                                                                       "'portable' MKL on SSE2 besides (AMD honours it; GEMMs ~2.7x slower); 'auto' pinned on Intel, else default")
    timing_threads: int = Field(1, ge=1, le=256, description="torch threads while timing (1 keeps CPU timings steady)")
    cache_dir: str | None = Field(None, description="built embedded models and datasets; default $MEDCOMP_CACHE or ~/.cache/medcomp")
    scratch_dir: str | None = Field(None, description="heavy model folders (merged, pruned, 4-bit) go here instead of the run folder; "
                                    "those a later session lacks are rebuilt from their recipe (medcomp.stages.materialise)")

    def numerics_mode(self) -> str:
        """The mode this run computes in on this CPU: ``numerics`` with "auto" resolved by vendor."""
        return resolve_mode(self.numerics)

    def cache_path(self) -> Path:
        import os

        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("MEDCOMP_CACHE", Path.home() / ".cache" / "medcomp"))


class SweepParams(Strict):
    """``medcomp sweep``: where its points run (``medcomp.executors``); each key can be given on the command line."""
    executor: Literal["inline", "local", "slurm"] = Field("inline", description="inline: here, one after another; local: here, in parallel; slurm: a job each")
    max_parallel: int = Field(2, ge=1, le=1024, description="points at once (local); one GPU each where there are GPUs")
    partition: str | None = Field(None, description="Slurm partition; None = the cluster's default")
    time_minutes: int = Field(120, ge=1, le=100000, description="Slurm time limit of one point")
    gpus_per_point: int = Field(0, ge=0, le=16, description="GPUs of one point's job")
    cpus_per_point: int = Field(2, ge=1, le=256, description="CPUs of one point's job")
    mem_gb: int = Field(16, ge=1, le=4096, description="memory of one point's job, GB")


class Params(Strict):
    run_name: str = Field(..., pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$", description="a plain folder name under reports/")
    world: Literal["embedded", "real"] = Field(..., description="labels every report: embedded results are a small model's")
    seed: int = 0
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    finetune: FinetuneParams = FinetuneParams()
    evaluation: EvaluationParams = EvaluationParams()
    importance: ImportanceParams = ImportanceParams()
    pruning: PruningParams = PruningParams()
    recovery: RecoveryParams = RecoveryParams()
    quantization: QuantizationParams = QuantizationParams()
    beyond: BeyondParams = BeyondParams()
    benchmark: BenchmarkParams = BenchmarkParams()
    judge: JudgeParams = JudgeParams()
    runtime: RuntimeParams = RuntimeParams()
    sweep: SweepParams = SweepParams()

    @model_validator(mode="after")
    def _pretraining_images_are_not_the_datasets(self) -> "Params":
        pretraining = self.model.embedded.pretraining
        if pretraining is not None and self.data.root == "synthetic" and pretraining.seed == self.data.synthetic.seed:
            raise ValueError(f"model.embedded.pretraining.seed equals data.synthetic.seed ({pretraining.seed}): "
                             "pretraining images must come from their own seed, disjoint from train and test")
        return self

    @model_validator(mode="after")
    def _no_secret_anywhere(self) -> "Params":
        if found := secret_like_keys(self.model_dump(mode="json")):  # params reach the manifest and every report
            raise ValueError(f"{', '.join(found)}: holds what looks like an API key; keys live only in the environment "
                             "(judge.api_key_env names the variable); value not shown")
        return self

    @model_validator(mode="after")
    def _indices_within_the_test_set(self) -> "Params":
        items = self.data.test_images * len(QUESTIONS)
        for key, value, limit, what in (("judge.figure5_item", self.judge.figure5_item, items, "test items"),
                                        ("benchmark.example_index", self.benchmark.example_index, items, "test items"),
                                        ("pruning.example_index", self.pruning.example_index, self.data.test_images, "features questions")):
            if value >= limit:
                raise ValueError(f"{key} is {value}, but the test set has {limit} {what} "
                                 f"({self.data.test_images} images x {len(QUESTIONS)} questions): use 0-{limit - 1}")
        if self.benchmark.variants is not None and "finetuned" not in self.benchmark.variants:
            raise ValueError("benchmark.variants must include 'finetuned': every ratio in 06 and 07 is to it")
        return self

    def fingerprint(self) -> str:
        """Stable hash of every setting: a stage is reused only under identical params."""
        return content_hash(self.model_dump(mode="json"), 16)


def resolve_params_path(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        return path
    return PRESETS_DIR / f"{name_or_path}.yaml"


def _read(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ParamsError(f"params file {path} not found (presets: {sorted(p.stem for p in PRESETS_DIR.glob('*.yaml'))})")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of keys, not {type(raw).__name__}")
    return raw


def load_params(name_or_path: str | Path, overrides: dict[str, Any] | None = None) -> Params:
    """Read, merge ``overrides`` (nested dicts) and validate; raise ParamsError naming file and key. A file whose
    ``base:`` names another params file or preset holds only the keys it changes in that one."""
    path = resolve_params_path(name_or_path)
    raw = _read(path)
    if "base" in raw:
        raw = merge_overrides(_read(resolve_params_path(raw.pop("base"))), raw)
    merged = merge_overrides(raw, overrides or {})
    try:
        return Params.model_validate(merged)
    except ValidationError as error:
        source = str(path) + (" with overrides of " + ", ".join(key_paths(overrides)) if overrides else "")  # keys only: values may be secrets
        raise ParamsError(describe(error, source)) from None
