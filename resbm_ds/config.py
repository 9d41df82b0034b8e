"""One typed configuration object for a ResBM run, loaded from YAML/JSON with `key=value` overrides.

The config is data (GPT-NeoX style): `Config` groups the model, the bottleneck, the pipeline layout,
training and data settings, plus the DeepSpeed JSON it is launched with. Each section is a pydantic
model (`Section`): types, ranges (`Field(ge=...)`) and choices (`Literal[...]`) are the schema,
checked as a config is built; `Config.validate()` checks them again, then the keys against each other
and what the machine must have, all *before* any process group starts. Every error is one
`ConfigError` naming the key, the value and what is allowed; `config_error` is the one translation of
a pydantic error (ours or DeepSpeed's) into it.
"""
from __future__ import annotations

import json
import os
import typing
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator
from pydantic.fields import FieldInfo

from .cli import ConfigError
from .system import is_, path_kind
from .wire_bytes import (CODEC_BITS, DENSE_REFERENCE, DTYPES, boundary_bytes_per_token, dense_bytes_per_token,
                         id_dtype, id_wire_bytes)

PRESET_DIR = Path(__file__).parent / "configs"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


class Section(BaseModel):
    """A config section: typed keys, no unknown ones, and types checked as strictly as YAML allows.

    Strict: an int key takes an int (not True, not "3", not 2.0), a str key a str, a bool key a bool.
    Two exceptions, both what YAML needs: a float key also takes an int or a number written as text
    (YAML 1.1 reads `3e-4` as a string), and a tuple key takes a list. Ranges (`Field(ge=...)`) and
    choices (`Literal[...]`) are checked as the section is built; what one key cannot say alone (one
    key against another, files, installed packages) is `Config.validate`'s.

    Assignment is not validated (`cfg.data.tokenizer = "hf"` just sets it): `Config.validate` checks
    every key again, so a config changed after loading is checked once, with the same messages."""
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=False)

    @field_validator("*", mode="before")
    @classmethod
    def _as_yaml_reads_it(cls, value, info):
        hint = _bare(cls.model_fields[info.field_name].annotation)
        if hint is float:
            return _float(value)
        args = typing.get_args(hint)
        if typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_float(v) if a is float else v for v, a in zip(value, args))
        return value


def _float(value):
    """A float key's value: ints (not bools) and numbers written as text become floats."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _bare(hint):
    """The annotation without Optional: `int | None` -> int."""
    args = typing.get_args(hint)
    if type(None) in args and typing.get_origin(hint) is not typing.Literal:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return hint


def allowed_values(section: type[BaseModel], key: str) -> list:
    """The values a choice key allows (its Literal's), None first where it may be empty."""
    hint = section.model_fields[key].annotation
    values = list(typing.get_args(_bare(hint)))
    return [None, *values] if type(None) in typing.get_args(hint) else values


class ModelConfig(Section):
    """A Llama-style decoder-only transformer."""
    vocab_size: int = Field(4096, ge=1)
    hidden_size: int = Field(256, ge=1)
    num_layers: int = Field(4, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, description="grouped-query attention; None = num_heads")
    intermediate_size: int | None = Field(None, description="SwiGLU width; None = 8/3 * hidden, rounded up to 64")
    max_seq_len: int = Field(256, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0, json_schema_extra={"hint": " (RMSNorm divides by sqrt(mean + eps))"})
    tie_embeddings: bool = False
    init_std: float = Field(0.02, ge=0)
    embed_std: float | None = Field(
        None, ge=0, json_schema_extra={"hint": ", or empty (= model.init_std)"},
        description="N(0, embed_std) token embedding; None = init_std. At 0.02 the tokens' own directions (norm "
        "~0.3 at H=256) are swamped within ~10 AdamW steps by the one direction every row moves in while "
        "the unigram is learned, and a boundary that reads the stream only through a norm (no identity "
        "path) then sends one constant code: resbm_ds/model/boundary.py, init.")
    attention_bias: bool = Field(False, description="biases on q/k/v_proj (Qwen2); o_proj never has one")
    init_from_hf: str | None = Field(None, description="a transformers save_pretrained dir: load its weights")

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 64 * -(-(8 * self.hidden_size // 3) // 64)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


ID_CHANNEL_METHODS = ("subspace",)   # methods whose boundary always sends the token ids


class BottleneckConfig(Section):
    """What sits at every segment boundary (and so at every pipeline stage boundary).

    `segments` is a property of the model: the layers are split into this many segments with a
    bottleneck between consecutive ones, whatever the number of pipeline stages it runs on.
    The ResBM switches (`init`, `decoder`, `decoder_norm`, `token_channel`) are described in
    model/boundary.py. The defaults are what the convergence suite measured best (docs/results.md); the paper's
    form is init=normal token_channel=none.
    """
    method: Literal["resbm", "none", "bottleneck-noskip", "subspace"] = Field(
        "resbm", description="resbm | none (uncompressed: the full hidden state crosses) | bottleneck-noskip (SWARM) "
        "| subspace (Subspace Models); model/baselines.py")
    segments: int = Field(2, ge=1)
    width: int | None = Field(None, description="h, the code width; None = hidden_size // ratio")
    ratio: int = Field(32, ge=1, description="H / h, used when width is None")
    identity: Literal["slice", "orthonormal", "none"] = Field(
        "slice", description="low-rank identity path: slice | orthonormal | none (ablation)")
    wire_dtype: Literal["model", "fp32", "bf16", "fp16"] = Field(
        "model", description='dtype of the code on the wire; "model" = the model\'s dtype')
    init: Literal["identity", "normal"] = Field(
        "identity", description="identity: a fresh boundary is P^T P x | normal: N(0, init_std) (paper)")
    decoder: Literal["linear", "mlp"] = Field("linear", description="linear: W_d norm(b) | mlp: W_2 silu(W_1 norm(b))")
    decoder_width: int | None = Field(None, ge=1, json_schema_extra={"hint": ", or empty"},
                                      description="mlp hidden width; None = model.hidden_size")
    decoder_norm: Literal["rms", "none"] = Field(
        "rms", description="rms: D sees RMSNorm(b) | none: D sees b (RMSNorm of h=1 is sign(b))")
    token_channel: Literal["auto", "none", "learned", "frozen", "lowrank", "hashed"] = Field(
        "auto", description="auto (resbm: hashed, others: none) | none | learned | frozen | lowrank | hashed: "
        "a table local to the receiving stage adds T[ids] (the ids as token_ids says)")
    token_rank: int = Field(32, description="rank of the lowrank token table")
    token_buckets: int = Field(4096, description="rows of the hashed token table (B x H, whatever the vocabulary)")
    table_init: Literal["zero", "normal"] = Field(
        "zero", description="zero: a learned table starts at 0 under init=identity (the boundary starts as exactly "
        "P^T P x) | normal: N(0, init_std), so the next segment's stream starts full-rank (measured: the zero "
        "table feeds a rank-h stream to the next RMSNorm, pre-clip grad norm 73 in the first 10 steps vs 3.9)")
    token_ids: Literal["auto", "sent", "local"] = Field(
        "auto", description="how the token channel's decoders get the ids: auto (local where there is a token "
        "channel) | sent (they cross every stage boundary with the code) | local (each stage reads them from its "
        "own copy of the data: 0 bytes on the wire; model/local_ids.py)")


def resolve_switches(d: dict, spec: "ModelSpec") -> dict:
    """`d` (a dumped spec or config) with bottleneck.token_channel and token_ids as `spec` resolves
    them: a saved run, an export or a compared result then says what it was built with, and a later
    change of what `auto` means shows as a changed setting instead of silently changing the model."""
    d["bottleneck"].update(token_channel=spec.token_channel, token_ids=spec.token_ids)
    return d


class ModelSpec(BaseModel):
    """What the network is, and nothing about how it is trained or launched (as nanoGPT's GPTConfig,
    torchtitan's model args): the model and bottleneck sections, the seed its layers initialise from
    and the dtype it computes in, with the values model code derives from them. Model code
    (resbm_ds/model/, hf/, export.py) takes this, never the run's `Config`, which gives it as
    `Config.spec`; a transformers export stores only this. Frozen, and built from copies of the
    sections: a config changed later does not change the spec of a model already built."""
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    model: ModelConfig = Field(default_factory=ModelConfig)
    bottleneck: BottleneckConfig = Field(default_factory=BottleneckConfig)
    seed: int = 1234
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"   # the dtype the model computes in (DTYPES)

    @property
    def code_width(self) -> int:
        """h: the number of values per token that cross each boundary."""
        if self.bottleneck.method == "none":
            return self.model.hidden_size
        return self.bottleneck.width or self.model.hidden_size // self.bottleneck.ratio

    @property
    def token_channel(self) -> str:
        """bottleneck.token_channel with `auto` resolved: a hashed table for ResBM (its size does not
        grow with the vocabulary: within 5% of a stage at the paper's shape, docs/results.md), none for
        the others."""
        b = self.bottleneck
        if b.token_channel == "auto":
            return "hashed" if b.method == "resbm" else "none"
        return b.token_channel

    @property
    def token_ids(self) -> str:
        """bottleneck.token_ids with `auto` resolved: local where a token channel reads them (0 bytes on
        the wire, the same function), sent otherwise (methods whose layers carry the ids send them)."""
        b = self.bottleneck
        if b.token_ids == "auto":
            return "local" if self.token_channel != "none" and b.method not in ID_CHANNEL_METHODS else "sent"
        return b.token_ids

    @property
    def sends_token_ids(self) -> bool:
        """Whether the token ids cross the stage boundaries (with the code, counted by the meter)."""
        b = self.bottleneck
        return b.method in ID_CHANNEL_METHODS or (self.token_channel != "none" and self.token_ids == "sent")

    @property
    def model_dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    @property
    def wire_dtype(self) -> torch.dtype | None:
        """The code's dtype on the wire (bottleneck.wire_dtype); None = the model's dtype."""
        return DTYPES.get(self.bottleneck.wire_dtype)

    @property
    def id_dtype(self) -> torch.dtype:
        """The token ids' dtype on the wire: `id_wire_bytes` wide."""
        return id_dtype(self.model.vocab_size)

    @property
    def model_elem_bytes(self) -> int:
        return self.model_dtype.itemsize

    @property
    def wire_elem_bytes(self) -> int:
        """Bytes of one code value on the wire: bottleneck.wire_dtype, else the model's dtype."""
        return (self.wire_dtype or self.model_dtype).itemsize

    def to_dict(self) -> dict:
        """Every key, with `auto` switches written as what they resolve to (`resolve_switches`)."""
        return resolve_switches(self.model_dump(), self)

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelSpec":
        """A spec from `to_dict()`'s output, or from a whole `Config.to_dict()` (exports written
        before the spec existed carry the run's whole config), checked key by key."""
        if not isinstance(raw, dict) or set(raw) <= set(cls.model_fields):
            try:
                return cls.model_validate(raw)
            except ValidationError as e:
                raise config_error(e, cls) from None
        return config_from_dict(raw).spec


class PipelineConfig(Section):
    stages: int = Field(2, ge=1)


class TrainConfig(Section):
    steps: int = Field(200, ge=1)
    optimizer: Literal["adamw", "muon", "sgd"] = Field(
        "adamw", description="sgd: plain SGD, linear in the gradient (tests/test_sync.py)")
    lr: float = Field(3e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    muon_lr: float = Field(
        0.02, gt=0,
        description="optimizer=muon: Muon for the hidden matrices (block and bottleneck Linear weights), AdamW "
        "with lr/betas/weight_decay above for everything else. Defaults are Keller Jordan's Muon "
        "(github.com/KellerJordan/Muon, also torch.optim.Muon's \"original\" scaling): lr 0.02 in units of "
        "spectral norm per step, times sqrt(max(1, rows/cols)); Nesterov momentum 0.95; 5 Newton-Schulz "
        "steps with coefficients (3.4445, -4.7750, 2.0315); no weight decay.")
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_weight_decay: float = Field(0.0, ge=0)
    muon_ns_method: Literal["standard", "gram"] = Field(
        "standard", description="standard (Keller Jordan's quintic) | gram (DeepSpeed's Gram NS)")
    eval_every: int = Field(50, ge=1, json_schema_extra={"says": "must be an integer >= 1"})
    eval_batches: int = Field(4, ge=0, json_schema_extra={"hint": " (0: the whole validation split)"},
                              description="micro-batches per evaluation; 0: the whole validation split (local text)")
    save_every: int = Field(100, ge=1, json_schema_extra={"says": "must be an integer >= 1"})
    log_every: int = Field(1, ge=1, json_schema_extra={"says": "must be an integer >= 1"})
    out_dir: str = "runs/default"
    keep_last: int = Field(0, ge=0, json_schema_extra={"hint": " (0 keeps every checkpoint)"},
                           description="checkpoints to keep (the newest N); 0 keeps all")
    nonfinite: Literal["skip", "stop"] = Field(
        "skip", description="A step whose loss or gradient norm is not finite is never applied (no rank steps its "
        "optimizer) and never saved: `skip` goes on, up to max_skipped_steps such steps in a row, then stops; "
        "`stop` stops at the first. A loss >= ln(vocab_size) with a zero gradient norm for divergence_steps "
        "steps in a row (a diverged model: saturated, nothing left to learn from) stops the run too, as does a "
        "parameter RMS above max_param_rms (exploding weights; a healthy model stays near its init, 0.02-1; 0 "
        "turns the check off).")
    max_skipped_steps: int = Field(3, ge=1, json_schema_extra={"says": "must be an integer >= 1"})
    divergence_steps: int = Field(3, ge=1, json_schema_extra={"says": "must be an integer >= 1"})
    max_param_rms: float = Field(1000.0, ge=0, json_schema_extra={"hint": " (0 turns the check off)"})
    init_from: str | None = Field(
        None, description="Weights only, from another run: RUN_DIR (its latest checkpoint) or "
        "RUN_DIR/checkpoints/TAG, into any stage / data-parallel layout of the same model; the optimizer and "
        "step start fresh.")


class TrackingConfig(Section):
    """Experiment trackers, all on the training-step axis, logged from rank 0 through each library's
    own API: TensorBoard (torch.utils.tensorboard, in OUT/tensorboard), Weights & Biases and MLflow
    (`pip install 'resbm-ds[track]'`). Each gets the resolved config, the git commit and the package
    versions. W&B honours WANDB_MODE / WANDB_DIR (wandb_mode=offline writes OUT/wandb); MLflow
    defaults to a local SQLite store, sqlite:///OUT/mlflow.db."""
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "resbm-ds"
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="online | offline | disabled; None: wandb's default / WANDB_MODE")
    mlflow: bool = False
    mlflow_uri: str | None = Field(None, description="None: sqlite:///OUT/mlflow.db")
    experiment: str = Field("resbm-ds", description="MLflow experiment")
    run_name: str | None = Field(None, description="None: the name of train.out_dir")


class DataConfig(Section):
    source: Literal["local", "hub"] = Field("local", description="local | hub")
    train_path: str | None = Field(None, description="local: file(s); None = the fetched default corpus")
    val_path: str | None = None
    hub_name: str = "allenai/c4"
    hub_config: str | None = "en"
    hub_revision: str | None = Field(
        None, description="a dataset commit / tag / branch to pin (None: the default branch)")
    hub_split: str = "train"
    hub_val_split: str = "validation"
    text_field: str = "text"
    seq_len: int = Field(128, ge=1)
    tokenizer: Literal["sentencepiece-train", "sentencepiece", "hf"] = Field(
        "sentencepiece-train", description="sentencepiece-train | sentencepiece | hf")
    tokenizer_path: str | None = None
    tokenizer_revision: str | None = Field(None, description="tokenizer=hf from the hub: the revision to pin")


class WireConfig(Section):
    """What happens on the wire between pipeline stages: a codec (resbm_ds/wire/codecs.py) and an emulated
    slow link (resbm_ds/wire/link.py). Both work at DeepSpeed's p2p layer, under any boundary method."""
    codec: Literal["none", "int8", "fp8", "int4", "int2"] = Field(
        "none", description="none | int8 | fp8 (e4m3 bits in uint8) | int4 | int2 (packed): per-row (per token) scaled")
    codec_backward: bool = Field(False, description="also encode the gradients sent back (default: forward only)")
    link_bandwidth_mbps: float | None = Field(
        None, gt=0, json_schema_extra={"hint": " (Mbit/s), or empty for an unlimited link"},
        description="emulated link in Mbit/s (1e6 bit/s); None = unlimited")
    link_latency_ms: float = Field(0.0, ge=0, json_schema_extra={"hint": " (milliseconds)"},
                                   description="one-way latency added to every transfer")
    link_full_duplex: bool = Field(
        False, description="False: both directions share the bandwidth (the paper's accounting)")

    @property
    def link_emulated(self) -> bool:
        return self.link_bandwidth_mbps is not None or self.link_latency_ms > 0


# the choices that name the dtype and codec tables: one list of names
assert allowed_values(BottleneckConfig, "wire_dtype") == ["model", *DTYPES]
assert allowed_values(WireConfig, "codec") == ["none", *CODEC_BITS]

# outer lr / momentum when sync.outer_lr / sync.outer_momentum are empty: DiLoCo's Nesterov SGD
# (arXiv 2311.08105), SparseLoCo's plain step, error feedback in place of momentum (arXiv 2508.15706)
SYNC_OUTER_DEFAULTS = {"diloco": (0.7, 0.9), "sparseloco": (1.0, 0.0)}


class SyncConfig(Section):
    """Data parallelism across sites (resbm_ds/sync.py). A site is one complete pipeline, launched as
    its own DeepSpeed world; sync.sites > 1 joins the same (stage, data-parallel rank) of every site
    in an outer loop that talks only every `inner_steps` steps. `allreduce` is one site, ZeRO inside.

    diloco: the pseudo-gradient theta_start - theta averaged over sites, then an outer (Nesterov) SGD
    step. sparseloco: the same with error feedback, each site sending only the top `topk` values of
    every `chunk` of its pseudo-gradient, quantised to `bits` bits."""
    method: Literal["allreduce", "diloco", "sparseloco"] = Field(
        "allreduce", description="allreduce | diloco | sparseloco")
    sites: int = Field(1, ge=1)
    site_rank: int = Field(0, description="this site's index, 0 .. sites-1")
    master_addr: str = Field("127.0.0.1", description="where site 0's first rank listens for the sites' rendezvous")
    master_port: int = Field(29400, gt=0, lt=65536, json_schema_extra={"says": "must be a TCP port, 1..65535"})
    inner_steps: int = Field(30, ge=1, description="H: optimizer steps between outer syncs")
    outer_lr: float | None = Field(None, gt=0, description="None: diloco 0.7, sparseloco 1.0")
    outer_momentum: float | None = Field(None, ge=0, lt=1, description="None: diloco 0.9, sparseloco 0.0")
    nesterov: bool = True
    chunk: int = Field(4096, ge=1, description="sparseloco: values per chunk (<= 65536: uint16 indices)")
    topk: int = Field(64, ge=1, description="sparseloco: values kept per chunk (64 / 4096 = 1.6%)")
    bits: Literal[2, 4, 8] = Field(2, description="sparseloco: bits per kept value (2 | 4 | 8)")
    error_decay: float = Field(0.95, ge=0, le=1, description="sparseloco: error feedback e <- error_decay * e + delta")
    timeout_s: int | None = Field(None, ge=1, json_schema_extra={"hint": " (seconds), or empty"},
                                  description="each outer collective; None: runtime.dist_timeout_s")

    def outer(self) -> tuple[float, float]:
        """(outer lr, outer momentum), the method's defaults where empty."""
        lr, mom = SYNC_OUTER_DEFAULTS.get(self.method, (1.0, 0.0))
        return (lr if self.outer_lr is None else self.outer_lr,
                mom if self.outer_momentum is None else self.outer_momentum)

    def validate(self):
        """What one key cannot say alone (the ranges and choices are checked as the section is built)."""
        if not 0 <= self.site_rank < self.sites:
            raise ConfigError("sync.site_rank", self.site_rank, f"must be in [0, sync.sites={self.sites})")
        if self.method == "allreduce" and self.sites > 1:
            raise ConfigError("sync.method", self.method, f"allreduce is one site; with sync.sites={self.sites} "
                              "use diloco or sparseloco")
        if self.chunk > 65536:
            raise ConfigError("sync.chunk", self.chunk, "must be <= 65536 (indices cross as uint16)")
        if self.topk > self.chunk:
            raise ConfigError("sync.topk", self.topk, f"must be <= sync.chunk ({self.chunk})")


# The runtime keys an environment variable may set (Slurm templates and netem set them for every rank).
RUNTIME_ENV = {"dist_timeout_s": "RESBM_DIST_TIMEOUT", "strict_layout": "RESBM_STRICT_LAYOUT",
               "net_iface": "RESBM_NET_IFACE"}


class RuntimeConfig(Section):
    """How a run meets its machines; nothing here changes what it trains, so --resume may change it.
    Each key may also come from its environment variable (RESBM_DIST_TIMEOUT, RESBM_STRICT_LAYOUT,
    RESBM_NET_IFACE: RUNTIME_ENV), checked as the key is, which wins over the config file; a command-line override wins over both. The resolved values are written to config.yaml."""
    dist_timeout_s: int = Field(
        300, ge=1, json_schema_extra={"hint": " (seconds)"},
        description="how long a rank waits for its peers: rendezvous, each collective, each step")
    strict_layout: bool = Field(
        False, description="Slurm: a node holding several stages, or a stage spanning nodes, is an error")
    net_iface: str = Field("", description="record this interface's kernel byte counters per step (netem.py)")


def runtime_key(name: str) -> str:
    """How an error names a runtime key: with its environment variable when that set it."""
    env = RUNTIME_ENV[name]
    return f"runtime.{name} ({env})" if env in os.environ else f"runtime.{name}"


def _runtime_from_env(raw: dict):
    """Put the runtime keys set in the environment into `raw`, parsed as their override would be and
    checked for their type here (their range with the rest of the config)."""
    for name, env in RUNTIME_ENV.items():
        text = os.environ.get(env)
        if text is None or text.strip() == "":
            continue
        value = read_yaml(text.strip(), env, text) if name != "net_iface" else text.strip()
        if name == "strict_layout" and value in (0, 1):
            value = bool(value)
        hint = RuntimeConfig.model_fields[name].annotation
        try:
            TypeAdapter(hint, config=ConfigDict(strict=True)).validate_python(value)
        except ValidationError as e:
            raise config_error(e, key=f"{env} (runtime.{name})", field=RuntimeConfig.model_fields[name]) from None
        section = raw.setdefault("runtime", {})
        if not isinstance(section, dict):
            raise ConfigError("runtime", section, "must be a mapping")
        section[name] = value


class Config(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    bottleneck: BottleneckConfig = Field(default_factory=BottleneckConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    wire: WireConfig = Field(default_factory=WireConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    seed: int = Field(1234, ge=0, json_schema_extra={"says": "must be an integer >= 0"})
    deepspeed: typing.Any = Field(
        "ds_configs/cpu_fp32.json",
        description="The DeepSpeed config: a path to a JSON file (e.g. ds_configs/cpu_fp32.json) or a dict. "
        "Precision, ZeRO stage, micro-batch size, gradient accumulation and clipping live here.")

    # ---- derived values -------------------------------------------------------------------
    @property
    def ds(self) -> dict:
        return self.deepspeed if isinstance(self.deepspeed, dict) else load_ds_json(self.deepspeed)

    @property
    def precision(self) -> str:
        ds = self.ds
        if ds.get("bf16", {}).get("enabled"):
            return "bf16"
        if ds.get("fp16", {}).get("enabled"):
            return "fp16"
        return "fp32"

    @property
    def zero_stage(self) -> int:
        return int(self.ds.get("zero_optimization", {}).get("stage", 0))

    @property
    def micro_batch_size(self) -> int:
        return int(self.ds.get("train_micro_batch_size_per_gpu", 1))

    @property
    def grad_accum_steps(self) -> int:
        return int(self.ds.get("gradient_accumulation_steps", 1))

    @property
    def spec(self) -> ModelSpec:
        """The model alone (model, bottleneck, seed, precision): what model code is built from."""
        return ModelSpec(model=self.model.model_copy(deep=True), bottleneck=self.bottleneck.model_copy(deep=True),
                         seed=self.seed, precision=self.precision)

    # the model's own derived values, as the spec computes them
    code_width = property(lambda self: self.spec.code_width, doc=ModelSpec.code_width.__doc__)
    token_channel = property(lambda self: self.spec.token_channel, doc=ModelSpec.token_channel.__doc__)
    token_ids = property(lambda self: self.spec.token_ids, doc=ModelSpec.token_ids.__doc__)
    sends_token_ids = property(lambda self: self.spec.sends_token_ids, doc=ModelSpec.sends_token_ids.__doc__)
    model_elem_bytes = property(lambda self: self.spec.model_elem_bytes)
    wire_elem_bytes = property(lambda self: self.spec.wire_elem_bytes, doc=ModelSpec.wire_elem_bytes.__doc__)

    @property
    def wire_bytes_per_token(self) -> tuple[int, int]:
        """(forward, backward) bytes per token at each boundary that crosses stages, as the meter
        counts them: the code (h values in the wire dtype, or under a wire codec `codec_row_bytes`),
        plus the token ids forward where they cross (no gradient comes back for them; none cross with
        bottleneck.token_ids=local). The one
        prediction that tests/test_wire_bytes.py checks against the meter (wire_bytes.py)."""
        spec = self.spec
        ids = id_wire_bytes(spec.model.vocab_size) if spec.sends_token_ids else 0
        return boundary_bytes_per_token(spec.code_width, spec.wire_elem_bytes, self.wire.codec,
                                        self.wire.codec_backward, ids)

    def dense_bytes_per_token(self, reference: str = DENSE_REFERENCE) -> int:
        """Bytes per token per direction of an uncompressed boundary: H values in `reference`
        ("model" = the model's own dtype)."""
        return dense_bytes_per_token(self.model.hidden_size, reference, self.model_elem_bytes)

    def compression_ratio(self, reference: str = DENSE_REFERENCE, per_token=None) -> float:
        """Dense bytes per token per direction / bytes sent per token in the busier direction:
        against dense bf16 by default, `reference="model"` for the model's dtype.
        `per_token` = measured (forward, backward) bytes per token; default: the prediction."""
        return self.dense_bytes_per_token(reference) / max(per_token or self.wire_bytes_per_token)

    # ---- validation -----------------------------------------------------------------------
    def validate(self, world_size: int | None = None) -> "Config":
        """Reject every invalid value with a message naming the key; returns self. Each key alone
        (type, range, choice: the schema) is checked again, then the keys against each other. The
        config alone: what the machine must have (files, packages, interfaces) is launch.check_machine's."""
        try:
            type(self).model_validate(self.model_dump())
        except ValidationError as e:
            raise _invalid(e) from None
        m, b, S = self.model, self.bottleneck, self.pipeline.stages
        if m.hidden_size % m.num_heads:
            raise ConfigError("model.hidden_size", m.hidden_size,
                              f"must be divisible by model.num_heads ({m.num_heads})")
        if m.head_dim % 2:
            raise ConfigError("model.hidden_size", m.hidden_size,
                              f"head size hidden_size/num_heads = {m.head_dim} must be even for RoPE")
        if m.num_kv_heads is not None and (m.num_kv_heads < 1 or m.num_heads % m.num_kv_heads):
            raise ConfigError("model.num_kv_heads", m.num_kv_heads,
                              f"must be >= 1 and divide model.num_heads ({m.num_heads})")
        self._validate_boundary_switches()
        if b.method != "none":
            if b.width is not None and not 1 <= b.width < m.hidden_size:
                raise ConfigError("bottleneck.width", b.width,
                                  f"must be >= 1 and < model.hidden_size ({m.hidden_size})")
            if b.width is None and (b.ratio < 2 or m.hidden_size % b.ratio):
                raise ConfigError("bottleneck.ratio", b.ratio,
                                  f"must be >= 2 and divide model.hidden_size ({m.hidden_size})")
        if b.method == "subspace":
            if m.tie_embeddings:
                raise ConfigError("model.tie_embeddings", m.tie_embeddings,
                                  "bottleneck.method=subspace needs untied embeddings (false): its token "
                                  "embedding is a trainable part in span(U) plus a frozen random table")
            if b.segments < 2:
                raise ConfigError("bottleneck.segments", b.segments,
                                  "bottleneck.method=subspace needs >= 2 (the last segment is left "
                                  "unconstrained; with one segment nothing is compressed: use method=none)")
            if m.init_from_hf:
                raise ConfigError("model.init_from_hf", m.init_from_hf,
                                  "not with bottleneck.method=subspace (its projections are W = U Z, not "
                                  "full matrices); leave it empty")
        if b.segments > m.num_layers:
            raise ConfigError("bottleneck.segments", b.segments,
                              f"at most model.num_layers ({m.num_layers}): each segment needs a block")
        if S > m.num_layers:
            raise ConfigError("pipeline.stages", S,
                              f"more stages than layers (model.num_layers={m.num_layers})")
        if b.segments % S:
            raise ConfigError("pipeline.stages", S,
                              f"stage cuts must fall on bottleneck boundaries: bottleneck.segments "
                              f"({b.segments}) must be a multiple of pipeline.stages; allowed: "
                              f"{[d for d in range(1, b.segments + 1) if b.segments % d == 0]}")
        if self.data.seq_len > m.max_seq_len:
            raise ConfigError("data.seq_len", self.data.seq_len,
                              f"at most model.max_seq_len ({m.max_seq_len})")
        self.sync.validate()
        self._validate_data()
        self._validate_train()
        self._validate_tracking()
        self._validate_deepspeed(world_size)
        self._validate_optimizer()
        return self

    def _validate_data(self):
        d = self.data
        if d.tokenizer != "sentencepiece-train" and not d.tokenizer_path:
            raise ConfigError("data.tokenizer_path", d.tokenizer_path,
                              f"data.tokenizer={d.tokenizer} needs it: "
                              + ("the .model file" if d.tokenizer == "sentencepiece"
                                 else "a local transformers directory or a hub name"))

    def _validate_train(self):
        t = self.train
        if not all(0 <= b < 1 for b in t.betas):
            raise ConfigError("train.betas", list(t.betas), "both must be in [0, 1)")

    def _validate_tracking(self):
        """DeepSpeed's own monitors are refused: the trackers of `tracking.*` replace them."""
        for key in ("wandb", "tensorboard", "csv_monitor", "comet"):
            section = self.ds.get(key)
            if isinstance(section, dict) and section.get("enabled"):
                raise ConfigError(f"deepspeed.{key}.enabled", True,
                                  "DeepSpeed's monitors log by sample count, which drops the per-step "
                                  f"resbm metrics; use tracking.{'tensorboard' if key == 'csv_monitor' else key}"
                                  "=true instead (metrics.jsonl is the CSV)")

    def _validate_boundary_switches(self):
        """Combinations that would be silently ignored."""
        m, b = self.model, self.bottleneck
        if b.method == "none" and b.wire_dtype != "model":
            raise ConfigError("bottleneck.wire_dtype", b.wire_dtype,
                              "has no effect with bottleneck.method=none (the hidden state crosses in the "
                              "model's dtype); leave it 'model'")
        if b.method != "resbm":
            # bottleneck-noskip honours decoder_norm=none (the default keeps SWARM's LayerNorm)
            noskip_switches = {"decoder_norm": ("none",)}
            for key, default in (("init", "identity"), ("decoder", "linear"), ("decoder_width", None),
                                 ("decoder_norm", "rms")):
                if b.method == "bottleneck-noskip" and getattr(b, key) in noskip_switches.get(key, ()):
                    continue
                if getattr(b, key) != default:
                    raise ConfigError(f"bottleneck.{key}", getattr(b, key),
                                      f"a ResBM switch; not with bottleneck.method={b.method}")
            if b.token_channel not in ("auto", "none") and b.method != "none":
                raise ConfigError("bottleneck.token_channel", b.token_channel,
                                  f"only with bottleneck.method=resbm (or none, as the control); not {b.method}")
        if b.decoder_width is not None and b.decoder_width < 1:
            raise ConfigError("bottleneck.decoder_width", b.decoder_width, "must be >= 1, or empty")
        if self.token_channel == "hashed" and b.token_buckets < 1:
            raise ConfigError("bottleneck.token_buckets", b.token_buckets, "must be >= 1")
        if self.token_channel == "lowrank" and not 1 <= b.token_rank < m.hidden_size:
            raise ConfigError("bottleneck.token_rank", b.token_rank,
                              f"must be >= 1 and < model.hidden_size ({m.hidden_size})")
        if b.token_ids == "local" and b.method in ID_CHANNEL_METHODS:
            raise ConfigError("bottleneck.token_ids", b.token_ids,
                              f"not with bottleneck.method={b.method}, whose layers carry the ids in the stream")
        if b.token_ids == "local" and self.token_channel == "none":
            raise ConfigError("bottleneck.token_ids", b.token_ids,
                              "local has nothing to read the ids: set bottleneck.token_channel")
        if self.token_channel != "none":
            if b.segments < 2:
                raise ConfigError("bottleneck.segments", b.segments,
                                  "bottleneck.token_channel needs >= 2 segments (a boundary)")

    def train_flops_per_token(self) -> float:
        """Model FLOPs of one training token (forward + backward = 3x forward): 6 per weight of every
        matrix multiply (blocks, LM head, boundary projections) plus causal attention's
        6 * num_layers * seq_len * hidden_size (QK^T and AV, half the T x T matrix, times 3). The
        token-channel tables are lookups, not multiplies."""
        m, T = self.model, self.data.seq_len
        H, kv = m.hidden_size, m.kv_heads * m.head_dim
        block = H * H * 2 + H * kv * 2 + 3 * H * m.ffn_size
        boundary = 0 if self.bottleneck.method == "none" else 2 * H * self.code_width * (self.bottleneck.segments - 1)
        return 6.0 * (m.num_layers * block + H * m.vocab_size + boundary) + 6.0 * m.num_layers * T * H

    @property
    def tied_allreduce_bytes(self) -> int:
        """Bytes per step of the tied embedding's gradient all-reduce between the first and the last
        stage (0 unless tied across stages): traffic outside the boundary, counted by the wire meter
        as `other` (wire/meter.py) and paid on an emulated link (wire/link.py)."""
        if not self.model.tie_embeddings or self.pipeline.stages < 2:
            return 0
        return self.model.vocab_size * self.model.hidden_size * self.model_elem_bytes

    def _validate_optimizer(self):
        """Muon only where DeepSpeed really runs it (measured in tests/test_optim.py)."""
        if self.train.optimizer != "muon":
            return
        ds = self.ds
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ConfigError("deepspeed.zero_optimization.stage", 0,
                              "train.optimizer=muon with bf16 needs ZeRO stage 1 (any data-parallel "
                              "size, 1 included): at stage 0 DeepSpeed's BF16_Optimizer takes the step, "
                              "and it refuses Muon under pipeline parallelism")
        accum = ds.get("data_types", {}).get("grad_accum_dtype")
        if self.precision == "bf16" and accum in ("fp32", "float32", "float"):
            raise ConfigError("deepspeed.data_types.grad_accum_dtype", accum,
                              "not with train.optimizer=muon and bf16: fp32 accumulation moves the step "
                              "to DeepSpeed's BF16_Optimizer, which refuses Muon under pipeline "
                              "parallelism; leave it out")
        clip = ds.get("gradient_clipping", 0.0)
        if self.zero_stage == 1 and clip:
            raise ConfigError("deepspeed.gradient_clipping", clip,
                              "must be 0 with train.optimizer=muon at ZeRO stage 1: DeepSpeed's ZeRO-1 "
                              "Muon orthogonalises the gradient before clipping, so the clip shrinks "
                              "the Muon step itself (to ~2% of train.muon_lr on the test model) and "
                              "mis-scales the AdamW one; set deepspeed.gradient_clipping=0 (Muon's "
                              "update has a fixed size anyway), or use fp32 with ZeRO stage 0")

    def _validate_deepspeed(self, world_size):
        ds = self.ds
        if self.zero_stage not in (0, 1):
            raise ConfigError("deepspeed.zero_optimization.stage", self.zero_stage,
                              "ZeRO stage 2/3 are incompatible with pipeline parallelism; use 0 or 1")
        if self.precision == "fp16":
            raise ConfigError("deepspeed.fp16.enabled", True, "fp16 is not supported; use bf16 or fp32")
        for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
            if key in ds and (not isinstance(ds[key], int) or ds[key] < 1):
                raise ConfigError(f"deepspeed.{key}", ds[key], "must be an integer >= 1")
        clip = ds.get("gradient_clipping", 0.0)
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
            raise ConfigError("deepspeed.gradient_clipping", clip, "must be a number >= 0 (0: no clipping)")
        for key in ("optimizer", "scheduler"):
            if key in ds:
                raise ConfigError(f"deepspeed.{key}", ds[key],
                                  "not allowed: resbm-ds builds the optimizer and LR schedule from train.*")
        if world_size is not None:
            if world_size % self.pipeline.stages:
                hint = ("; a single process needs pipeline.stages=1, or start the stages with a launcher: "
                        "deepspeed --num_gpus N / torchrun --nproc_per_node N -m resbm_ds.train ..."
                        if world_size == 1 else "")
                raise ConfigError("pipeline.stages", self.pipeline.stages,
                                  f"must divide the world size ({world_size} processes){hint}")
            dp = world_size // self.pipeline.stages
            tbs = ds.get("train_batch_size")
            if tbs is not None and tbs != self.micro_batch_size * self.grad_accum_steps * dp:
                raise ConfigError("deepspeed.train_batch_size", tbs,
                                  f"must equal micro_batch ({self.micro_batch_size}) x grad_accum "
                                  f"({self.grad_accum_steps}) x data-parallel size ({dp}); or leave it out")

    # ---- loading ----------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Every key with its value (plain, JSON-able values; betas a tuple), sections as dicts, with
        `auto` switches written as what they resolve to (`resolve_switches`)."""
        return resolve_switches(self.model_dump(), self.spec)


def load_ds_json(path: str) -> dict:
    p = resolve_path(path)
    if not p.is_file():
        raise ConfigError("deepspeed", path, f"no such DeepSpeed JSON file ({p})")
    try:
        ds = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError("deepspeed", str(p), f"not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError("deepspeed", str(p), f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if not isinstance(ds, dict):
        raise ConfigError("deepspeed", str(p), f"must hold a JSON object, not a {type(ds).__name__}")
    return ds


def resolve_path(path: str | os.PathLike) -> Path:
    """Relative paths are tried from the working directory, then from the package (its data:
    ds_configs/*.json, so an installed package finds them), then from the repository root."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    for root in (PACKAGE_DIR, REPO_ROOT):
        if (root / p).exists():
            return root / p
    return p


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Load a YAML/JSON file (or a preset name from resbm_ds/configs), then apply `a.b=value`."""
    raw: dict = {}
    if path:
        p = resolve_path(path)
        if not p.exists() and (PRESET_DIR / f"{path}.yaml").exists():
            p = PRESET_DIR / f"{path}.yaml"
        if not p.is_file():
            presets = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
            raise ConfigError("--config", path, f"{is_(path_kind(p))}, not a file or a preset; presets: {presets}")
        raw = read_yaml(p, "--config", str(p)) or {}
        if not isinstance(raw, dict):
            raise ConfigError("--config", str(p), f"must hold a mapping of sections (model:, train:, ...), "
                                                  f"not a {type(raw).__name__}")
    _runtime_from_env(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or "" in key.split("."):
            raise ConfigError("override", item, "must look like section.key=value")
        _set_nested(raw, key.split("."), read_yaml(value, key, value), key)
    cfg = _from_raw(raw)
    if isinstance(cfg.deepspeed, str):   # freeze the DeepSpeed JSON into the config object
        cfg.deepspeed = load_ds_json(cfg.deepspeed)
    return cfg


def read_yaml(source, key: str, shown: str):
    """YAML from a file (Path) or an override's value (str); a syntax error names key and position."""
    try:
        return yaml.safe_load(source.read_text(encoding="utf-8") if isinstance(source, Path) else source)
    except UnicodeDecodeError as e:
        raise ConfigError(key, shown, f"not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        hint = "" if isinstance(source, Path) else " (quote a string value: key='[text')"
        raise ConfigError(key, shown, f"not valid YAML: {problem}{where}{hint}") from None


def config_from_dict(raw: dict) -> Config:
    """A Config from `Config.to_dict()`'s output (as saved in exports), checked key by key."""
    return _from_raw(raw)


def _set_nested(raw: dict, keys: list[str], value, full_key: str):
    if keys[0] == "deepspeed" and len(keys) > 1 and isinstance(raw.get("deepspeed", "x"), str):
        # Override inside the DeepSpeed JSON: load it first so the rest of the file is kept.
        raw["deepspeed"] = load_ds_json(raw.get("deepspeed", Config.model_fields["deepspeed"].default))
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(full_key, value, f"'{k}' is not a section")
    node[keys[-1]] = value


def _from_raw(raw) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("config", raw, "must be a mapping")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise _invalid(e) from None


def _invalid(e: ValidationError) -> ConfigError:
    """Our schema's error: a runtime key names its environment variable where that is set."""
    return config_error(e, Config, rename=lambda key: runtime_key(key.split(".", 1)[1])
                        if key.startswith("runtime.") and key.split(".", 1)[1] in RUNTIME_ENV else key)


# ---- the one translator: pydantic's ValidationError -> our one-line ConfigError ----------------
RANGE_KINDS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def config_error(e: ValidationError, schema: type[BaseModel] | None = None, *, prefix: str = "",
                 note: str = "", key: str | None = None, field: FieldInfo | None = None,
                 rename=None) -> ConfigError:
    """The first error of a pydantic ValidationError as `invalid config: KEY=VALUE: ALLOWED`: the key
    from its `loc` (list indices dropped, after `prefix`), the value it got, and what is allowed,
    read from the field of `schema` it names: "allowed: [...]" for a Literal, "must be >= 1" for
    Field(ge=1) (a field's json_schema_extra "says" replaces that text, "hint" is added to it), "must be
    of type int", "must be a list of 2 values", "must not be empty (type int)", "must be a mapping",
    "unknown key; allowed in this section: [...]". Without a schema (DeepSpeed's models) the text is
    pydantic's own message, then `note`. `key` and `field` name the key and field directly (a value
    checked on its own); `rename` rewrites the key."""
    err = e.errors(include_url=False)[0]
    loc, kind, value = err["loc"], err["type"], err.get("input")
    # our keys drop list indices (train.betas); DeepSpeed's keep every step of the path
    names = [p for p in loc if isinstance(p, str)] if schema or field else [str(p) for p in loc]
    element = bool(loc) and isinstance(loc[-1], int)    # an item of a list / tuple
    owner = schema
    for name in names[:-1]:
        inner = _bare(owner.model_fields[name].annotation) if owner and name in owner.model_fields else None
        owner = inner if isinstance(inner, type) and issubclass(inner, BaseModel) else None
    if field is None and owner is not None and names:
        field = owner.model_fields.get(names[-1])
    key = key or prefix + ".".join(names) or "config"
    return ConfigError(rename(key) if rename else key, value, _allowed_text(kind, value, field, owner, element, err, note))


def _allowed_text(kind, value, field, owner, element, err, note) -> str:
    if kind == "extra_forbidden" and owner is not None:
        return f"unknown key; allowed in this section: {sorted(owner.model_fields)}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return "must be a mapping"
    if field is None:
        return f"{err['msg']}{note}"
    hint = field.annotation
    if value is None and not element and type(None) not in typing.get_args(hint):
        return f"must not be empty (type {_type_name(hint)})"
    bare = _bare(hint)
    if kind in RANGE_KINDS:
        return _range_text(field)
    if typing.get_origin(bare) is typing.Literal:
        values = typing.get_args(bare)
        types = tuple({type(v) for v in values})
        if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
            return f"allowed: {[None, *values] if bare is not hint else list(values)}"
    if typing.get_origin(bare) is tuple:
        args = typing.get_args(bare)
        if element:
            return f"must be of type {_type_name(args[min(err['loc'][-1], len(args) - 1)])}"
        return f"must be a list of {len(args)} values"
    return f"must be of type {_type_name(bare)}"


def _type_name(hint) -> str:
    hint = _bare(hint)
    if typing.get_origin(hint) is typing.Literal:
        hint = type(typing.get_args(hint)[0])
    return getattr(hint, "__name__", str(hint))


def _range_text(field: FieldInfo) -> str:
    """"must be >= 1", "must be in [0, 1)", ... from the field's bounds; its "says" / "hint" extras."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    if "says" in extra:
        return extra["says"]
    bounds = {name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}
    low = next(((op, bounds[op]) for op in ("ge", "gt") if op in bounds), None)
    high = next(((op, bounds[op]) for op in ("le", "lt") if op in bounds), None)
    symbol = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    if low and high:
        text = f"must be in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    else:
        op, bound = low or high
        text = f"must be {symbol[op]} {bound}"
    return text + extra.get("hint", "")
