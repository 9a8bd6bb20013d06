"""Typed configuration: one YAML file plus dotted command-line overrides.

    cfg = load_config("configs/ml100k.yaml", ["data.min_interactions=5"])

Unknown keys and wrong types raise ConfigError naming the dotted key.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recray.errors import ConfigError

Format = Literal["movielens", "amazon2014", "steam", "goodreads", "table"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TableColumns(Strict):
    """Column names of a generic Parquet/CSV log (format: table)."""
    user_id: str = "user_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    rating: str | None = None
    title: str = "title"
    categories: str | None = "categories"
    categories_sep: str = "|"      # CSV only: how a categories cell lists several


class DataConfig(Strict):
    format: Format = "movielens"
    input: str | None = None            # None: the embedded MovieLens-100k (recray fetch)
    catalog: str | None = None          # format table: the item file (else `input` holds titles)
    columns: TableColumns = Field(default_factory=TableColumns)
    noun: str = "movie"                 # "movie", "book", "game", "album": goes into the prompt
    # article_first: "Usual Suspects, The (1995)" is shown to the model (prompts, answers,
    # grounding) as "The Usual Suspects (1995)", the form pretraining saw; the catalog keeps
    # the stored form as source_title. source: titles as the source stores them.
    title_form: Literal["article_first", "source"] = "article_first"
    min_interactions: int = Field(10, ge=1)
    history_len: int = Field(10, ge=1)
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    n_train: int = Field(4096, ge=1)
    n_valid: int = Field(512, ge=1)
    n_test: int = Field(1000, ge=1)
    n_groups: int = Field(10, ge=1)
    exclude_categories: list[str] = ["unknown"]   # never a fairness group (MovieLens "unknown")
    seed: int = 0
    on_bad_rows: Literal["error", "drop"] = "error"   # drop: count and report instead of stopping
    partitions: int | None = Field(None, ge=1)  # user hash partitions; None: 2 x cluster CPUs

    @model_validator(mode="after")
    def _split_sums_to_one(self):
        if abs(sum(self.split) - 1.0) > 1e-6 or min(self.split) <= 0:
            raise ValueError("data.split must be three positive fractions summing to 1")
        return self


class RayConfig(Strict):
    address: str | None = None          # None: RAY_ADDRESS if set, else a local instance
    num_cpus: int | None = None         # local instance only


class LoraConfig(Strict):
    """PEFT LoRA adapter; enabled: false trains all weights (full fine-tuning)."""
    enabled: bool = True
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"   # every attention and MLP projection


class ScalingConfig(Strict):
    """Ray Train workers: the same code runs 2 CPU workers here and N GPU workers on a cluster."""
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)   # used only when use_gpu


class DeepSpeedConfig(Strict):
    """ZeRO through TRL's `deepspeed=` argument; stage null means plain DDP (no DeepSpeed)."""
    stage: Literal[0, 1, 2, 3] | None = None
    offload_optimizer: bool = False           # ZeRO optimizer state on CPU (compiles cpu_adam once)
    config_file: str | None = None            # a DeepSpeed JSON merged over the generated one


class StepConfig(Strict):
    """One training step of the loop (in-loop SFT, DPO): paper lr 2e-5, 1 epoch."""
    learning_rate: float = Field(2e-5, gt=0)
    epochs: float = Field(1, gt=0)


class InitialSftConfig(StepConfig):
    """The initial SFT (pi_0, = BIGRec): paper lr 3e-4, 4 epochs."""
    learning_rate: float = Field(3e-4, gt=0)
    epochs: float = Field(4, gt=0)


class RoseConfig(Strict):
    """RosePO's smoothing ε_x = eps_max·σ(−(log π_ref(y_w) − log π_ref(y_l)) / temperature)."""
    eps_max: float = Field(0.2, ge=0, lt=0.5)   # ε ≥ 0.5 would reward the negative
    temperature: float = Field(1.0, gt=0)


class GdrtConfig(Strict):
    """GDRT (seed-methods.md §2): π_0's SFT as group DRO over answer tokens grouped by how
    predictable they are without the user (a_t under a scorer, terciles)."""
    # q = softmax(L̄ / tau): ∞ group-balanced, 0 worst group; 0.25 chosen on valid
    # (tune/sweep-gdrt.yaml, docs/results/sweep-gdrt)
    tau: float = Field(0.25, gt=0)
    groups: int = Field(3, ge=2)            # global quantile groups of a_t
    ema: float = Field(0.9, ge=0, lt=1)     # decay of the group losses q is computed from
    scorer: str | None = None               # a BIGRec π_0 adapter (or model) folder; None: train one


class TrainConfig(Strict):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on GPU and on CPUs with bf16 in hardware
    # Paper defaults: initial SFT 3e-4 x 4 epochs; in-loop SFT and DPO 2e-5 x 1 epoch.
    sft: InitialSftConfig = Field(default_factory=InitialSftConfig)
    sft_loop: StepConfig = Field(default_factory=StepConfig)
    dpo: StepConfig = Field(default_factory=StepConfig)
    beta: float = Field(0.1, gt=0)
    max_negatives: int | None = Field(None, ge=1)   # use at most this many rejected answers per prompt
    # How DPO scores a prompt's N rejected answers: softmax (S-DPO, SPRec's), mean_reward
    # (DMPO: chosen reward against their mean reward), both DPO for N = 1; or rosepo
    # (RosePO: DPO pairs with a personalised label smoothing, train.rosepo).
    multi_negative_loss: Literal["softmax", "mean_reward", "rosepo"] = "softmax"
    rosepo: RoseConfig = Field(default_factory=RoseConfig)
    gdrt: GdrtConfig = Field(default_factory=GdrtConfig)   # loop.method=gdrt
    # DPO computes each prompt once for all its answers (a block attention mask; sdpa or
    # eager attention); false: one row per answer, TRL's layout (1 + N prompt passes).
    dpo_shared_prompt: bool = True
    # TRL's fused LM head projects only the labelled (answer) positions on a CPU too, as it
    # does on GPUs; false: TRL's CPU behaviour, every position (the same loss, ~2x the work).
    compact_lm_head: bool = True
    reweight: bool = False                 # IFairLRS RW: per-sample SFT weights from group shares
    max_length: int = Field(512, ge=8)     # prompt + answer tokens; history is cut from the left
    per_device_batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(5, ge=1)
    save_steps: int = Field(50, ge=1)      # Ray Train checkpoint every this many optimizer steps
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=0)     # worker-group restarts from the last checkpoint
    storage_path: str | None = None        # Ray Train checkpoints; None: <output>/checkpoints
    keep_checkpoint_files: bool = False    # keep <storage>/ after a successful fit
    # LoRA: also write model/ (the adapter merged into its base, for export); the loop and
    # generation read only adapter/, so by default no step pays for a merged copy.
    merge_adapter: bool = False
    seed: int = 0
    trust_remote_code: bool = False


class DecodingConfig(Strict):
    """How answers are decoded: greedy (1 answer), beam (width, number returned), sample (n)."""
    mode: Literal["greedy", "beam", "sample"] = "greedy"
    num_beams: int = Field(4, ge=1)         # beam: width
    num_return: int = Field(1, ge=1)        # beam: answers returned, best first (<= num_beams)
    n: int = Field(1, ge=1)                 # sample: answers per prompt
    temperature: float = Field(1.0, gt=0)   # sample
    top_p: float = Field(1.0, gt=0, le=1)   # sample
    max_new_tokens: int = Field(32, ge=1)   # a title line is short; decoding stops at its end
    seed: int = 0                           # sample
    # D3's α: weight of a text-free recommender's log-prior over the titles each token leads
    # to (greedy/beam over the catalog's titles; loop.method=d3 gives it SASRec's)
    prior_weight: float = Field(0.0, ge=0)

    @model_validator(mode="after")
    def _returns_fit_beams(self):
        if self.num_return > self.num_beams:
            raise ValueError("generate.decoding.num_return must not exceed num_beams")
        return self

    @property
    def num_candidates(self) -> int:
        return {"greedy": 1, "beam": self.num_return, "sample": self.n}[self.mode]


class GenerateConfig(Strict):
    """Generation (negatives and evaluation): backend, actor pool, decoding, negatives."""
    backend: Literal["auto", "vllm", "hf"] = "auto"   # auto: vllm where it is installed
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    actors: int = Field(1, ge=1)            # engines in the pool, one per Ray actor
    cpus_per_actor: float = Field(1, ge=0)  # Ray CPUs reserved per actor
    gpus_per_actor: float = Field(0, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)        # vllm, GPU
    threads_per_actor: int | None = Field(None, ge=1) # CPU compute threads; None: cores // actors
    batch_size: int = Field(64, ge=1)       # prompts per Ray Data batch (one engine call)
    max_model_len: int = Field(1024, ge=16) # prompt + answer tokens; longer prompts are shortened
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: as train.precision
    hf_max_sequences: int = Field(64, ge=1) # hf: sequences (prompts x beams) per generate call
    max_lora_rank: int = Field(16, ge=1)    # vllm: largest adapter rank it accepts
    vllm_kvcache_gb: int = Field(2, ge=1)   # vllm CPU: VLLM_CPU_KVCACHE_SPACE
    vllm_threads_bind: str = "nobind"       # vllm CPU: nobind | per-actor | auto | "0-1"
    vllm_reserved_cpus: int = Field(0, ge=0)          # vllm CPU: VLLM_CPU_NUM_OF_RESERVED_CPU
    enforce_eager: bool | None = None       # vllm; None: eager on CPU (compiling does not pay)
    max_restarts: int = Field(3, ge=0)      # per actor, after its process dies
    max_attempts: int = Field(4, ge=1)      # per batch, across actors
    start_timeout_s: float = Field(900, gt=0)
    # negatives (spec §3)
    n_negatives: int = Field(1, ge=1)       # N; 2N candidates are decoded
    # random: SPRec-RN, DMPO, SDPO; semantic: the catalog titles nearest the target (RosePO)
    source: Literal["self", "random", "semantic"] = "self"
    random_ratio: float = Field(0.0, ge=0, le=1)  # rho: share of self-play negatives made random
    ground: bool = False                    # replace each negative by its nearest catalog title
    fill_short: bool = True                 # top up rows short of N with random catalog items
    # Every answer an exact catalog title: decoding follows a prefix tree over the catalog's
    # tokenised answers (greedy and beam; both backends). Applies to negatives and evaluation.
    constrain_to_catalog: bool = False


class RerankConfig(Strict):
    """IFairLRS re-ranking after grounding (recray.evaluate.rerank): π from GU@k on valid,
    λ chosen on valid from `lambdas`, both applied to test."""
    enabled: bool = False
    k: int = Field(5, ge=1)                 # K_r: 5, or 1 when the target metric is MGU@1
    lambdas: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.5, 1.0],
                                 min_length=1)
    ndcg_guard: float = Field(0.95, gt=0, le=1)   # keep NDCG@5 >= this × NDCG@5 at λ = 0
    # π's fixed-point rounds at the chosen λ (seed-methods.md §1.3 step 5); 1: π from the
    # plain ranking only
    rounds: int = Field(1, ge=1, le=3)


class EvaluateConfig(Strict):
    """Spec §4: one answer per prompt (greedy, as the reference code; beam is a setting),
    grounded to the catalog."""
    decoding: DecodingConfig = Field(default_factory=DecodingConfig)
    embedder: Literal["sentence", "hidden"] = "sentence"   # MiniLM, or the LLM's last hidden state
    splits: list[Literal["valid", "test"]] = Field(   # evaluated after every iteration
        default_factory=lambda: ["valid", "test"], min_length=1)
    limit: int | None = Field(None, ge=1)                      # first N samples of each split
    rerank: RerankConfig = Field(default_factory=RerankConfig)


class LoopConfig(Strict):
    """The self-play loop (spec §3); `method` picks the baseline or ablation."""
    method: Literal["sprec", "bigrec", "sprec-nodpo", "sprec-nosft", "sprec-rn", "dmpo",
                    "sdpo", "rosepo", "rw", "gdrt", "ufo", "d3", "mostpop", "random", "sasrec", "mostpop-general", "alpharec",
                    "alpharec-reweight", "bifair", "bifair-separate", "bifair-noentropy",
                    "bifair-eq11"] = "sprec"
    base_model: str | None = None           # HF safetensors folder; None: the embedded SmolLM2
    init_from: str | None = None            # an earlier run whose π_0 (and its evaluation) to reuse
    iterations: int = Field(5, ge=0)        # T
    samples_per_iteration: int = Field(2048, ge=1)   # n_t, drawn from the train subset
    # dmpo's objective (seed-methods.md §5.3): mean_reward (one sigmoid against the mean
    # rejected reward) or mean_pairs (the mean of k separate DPO pair losses)
    dmpo_form: Literal["mean_reward", "mean_pairs"] = "mean_reward"
    seed: int = 0


class UfoConfig(Strict):
    """UFO-like (seed 001; seed-methods.md §3.3, every value a [CHOICE]): the judger's weights
    from group-exposure unfairness of the policy's own answers, and the corrector's rule."""
    eta: float = Field(1.0, ge=0)           # SFT weights exp(−η u_g / s)
    kappa: float = Field(1.0, ge=0)         # pair weights 1 + κ·max(0, u_g / s)
    rho: float = Field(0.0, ge=0)           # share of the base model's prior P_g in u_g (> 0 probes it)
    clip: float = Field(10.0, ge=1)         # both kinds of weight clipped to [1/clip, clip]
    stop_ratio: float = Field(0.5, ge=0)    # stop once valid MGU@5 <= stop_ratio × π_0's
    max_hr_drop: float = Field(0.1, ge=0, le=1)   # revert a step that loses more valid HR@10


class SasrecConfig(Strict):
    """The SASRec reference row (spec §4; paper App. C): item-ID self-attention over the
    history, trained on the train subset, early-stopped on the valid subset."""
    hidden: int = Field(64, ge=1)           # paper: embedding size 64
    blocks: int = Field(2, ge=1)
    heads: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1) # paper
    learning_rate: float = Field(4e-3, gt=0)   # paper: Adam 4e-3
    batch_size: int = Field(128, ge=1)
    max_epochs: int = Field(200, ge=1)
    patience: int = Field(20, ge=1)         # epochs without a better valid NDCG@5
    seed: int = 0


class BifairConfig(Strict):
    """BiFair's table (seed 003; seed-methods.md §4): a recommender over the item titles'
    embeddings (AlphaRec without the graph, or Linear), its re-weighted baseline and BiFair,
    trained on Ray; every unset value of the seed is a [CHOICE] of seed-methods.md §4.3."""
    # sequential: the prompt samples of every recray method, trained on the WHOLE train
    # split; general: the seed's protocol (ratings >= min_rating, per-user random 4:3:3)
    protocol: Literal["sequential", "general"] = "general"
    groups: Literal["pop", "genre"] = "pop"     # the groups fairness is over (one run each)
    # Z_0: the grounding's sentence embedder over the titles (cached), or the base LLM's
    # last hidden state (seed: SFR-Embedding-Mistral-7B, not available offline)
    embedder: Literal["sentence", "hidden"] = "sentence"
    projector: Literal["mlp", "linear"] = "mlp" # AlphaRec's 2-layer MLP, or one matrix
    hidden: int = Field(256, ge=1)              # the MLP's hidden width
    dim: int = Field(64, ge=1)                  # behaviour space [003:L248]
    graph_layers: int = Field(0, ge=0)          # LightGCN layers (general protocol only)
    temperature: float = Field(0.15, gt=0)      # InfoNCE τ on cosine scores [003:L248]
    negatives: int = Field(256, ge=1)           # sampled per batch [003:L247]
    batch_size: int = Field(1024, ge=1)         # seed: 4096 [003:L510]
    lr_theta: float = Field(5e-4, gt=0)         # Adam, the projector
    lr_z: float = Field(1e-4, gt=0)             # AdamW, the item representations
    weight_decay_z: float = Field(0.1, ge=0)    # [003:L248]
    xi: float | None = Field(None, gt=0)        # the unrolled step; None: lr_theta
    zeta: float = Field(0.1, ge=0, le=1)        # mix with uniform: a minimum weight per group
    fw_iterations: int = Field(25, ge=1)        # Frank-Wolfe steps (Alg. 2)
    max_epochs: int = Field(100, ge=1)
    patience: int = Field(10, ge=1)             # epochs without a better valid Recall@20
    min_rating: float = 3.0                     # general protocol [003:L220]
    min_user_interactions: int = Field(20, ge=1)   # general protocol, after the rating filter
    seed: int = 0


class TrackingConfig(Strict):
    """Per-iteration metrics beside metrics.jsonl, for the tools people already watch runs in."""
    tensorboard: bool = True                # <run>/tensorboard
    mlflow: bool = True
    mlflow_uri: str | None = None           # None: sqlite:///<runs folder>/mlflow.db
    experiment: str = "recray"


class Config(Strict):
    data: DataConfig = Field(default_factory=DataConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)
    sasrec: SasrecConfig = Field(default_factory=SasrecConfig)
    ufo: UfoConfig = Field(default_factory=UfoConfig)
    bifair: BifairConfig = Field(default_factory=BifairConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, object]]:
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw != "" else None))
    return parsed


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def read_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping, or a ConfigError naming the file."""
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return tree


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    tree = read_yaml(path) if path is not None else {}
    return build_config(tree, parse_overrides(overrides or []))


def given_tree(cfg: Config) -> dict:
    """The settings given (YAML and overrides) as a tree, without the defaults: what a
    config is rebuilt from (build_config) where it must mean the same again. A full dump
    would mark every key as given, so a method's own defaults (recray.methods.method_config: DMPO's
    k, D3's decoding) would no longer apply."""
    return cfg.model_dump(mode="json", exclude_unset=True)


def build_config(tree: dict, values: Iterable[tuple[str, object]] = ()) -> Config:
    """A config tree (as in a YAML file) with dotted (key, value) pairs set on a copy of it;
    the sweeps set typed values this way (a float such as 1e-05 is not one in YAML 1.1)."""
    tree = copy.deepcopy(tree)
    for key, value in values:
        _set_dotted(tree, key, value)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


# What makes two runs' π_0 the same model (loop.init_from compares them with the methods'
# switches applied), what makes two evaluations of a model the same (with the engine's
# backend), and what the loop's steps add to π_0 (a report averages runs of one method as
# replicates only where all of these but the seeds, every key named `seed`, agree).
INITIAL_POLICY_KEYS = ("data", "loop.base_model", "train.lora", "train.sft", "train.reweight",
                       "train.max_length", "train.seed", "train.per_device_batch_size",
                       "train.gradient_accumulation_steps", "train.scaling.num_workers",
                       "train.scaling.use_gpu", "train.precision", "train.warmup_ratio",
                       "train.weight_decay", "train.deepspeed")
EVALUATION_KEYS = ("generate.max_model_len", "generate.constrain_to_catalog", "evaluate.decoding",
                   "evaluate.embedder", "evaluate.limit", "evaluate.rerank")
LOOP_STEP_KEYS = ("loop.method", "loop.iterations", "loop.samples_per_iteration",
                  "loop.dmpo_form", "train.sft_loop", "train.dpo", "train.beta",
                  "train.max_negatives", "train.multi_negative_loss", "train.rosepo",
                  "train.dpo_shared_prompt", "generate.decoding", "generate.n_negatives",
                  "generate.random_ratio", "generate.fill_short", "ufo")


def pick(tree: dict, dotted: str):
    """The value at a dotted key of a config dump (None where a level is missing)."""
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested config dump as {dotted key: value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
