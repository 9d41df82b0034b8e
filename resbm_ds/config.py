"""One typed configuration object for a ResBM run, loaded from YAML/JSON with `key=value` overrides.

The config is data (GPT-NeoX style): `Config` groups the model, the bottleneck, the pipeline layout,
training and data settings, plus the DeepSpeed JSON it is launched with. `Config.validate()` checks
every value *before* any process group starts and raises `ConfigError` naming the key, the value and
what is allowed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from .cli import ConfigError
from .system import is_, path_kind

PRESET_DIR = Path(__file__).parent / "configs"
PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent


@dataclass
class ModelConfig:
    """A Llama-style decoder-only transformer."""
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None        # grouped-query attention; None = num_heads
    intermediate_size: int | None = None   # SwiGLU width; None = 8/3 * hidden, rounded up to 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # N(0, embed_std) token embedding; None = init_std. At 0.02 the tokens' own directions (norm
    # ~0.3 at H=256) are swamped within ~10 AdamW steps by the one direction every row moves in while
    # the unigram is learned, and a boundary that reads the stream only through a norm (no identity
    # path) then sends one constant code: resbm_ds/model/boundary.py, init.
    embed_std: float | None = None
    attention_bias: bool = False           # biases on q/k/v_proj (Qwen2); o_proj never has one
    init_from_hf: str | None = None        # a transformers save_pretrained dir: load its weights

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size or 64 * -(-(8 * self.hidden_size // 3) // 64)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


BOUNDARY_METHODS = ("resbm", "none", "bottleneck-noskip", "subspace")   # the last two: model/baselines.py
IDENTITY_PATHS = ("slice", "orthonormal", "none")
BOUNDARY_INITS = ("identity", "normal")
DECODERS = ("linear", "mlp")
DECODER_NORMS = ("rms", "none")
TOKEN_CHANNELS = ("auto", "none", "learned", "frozen", "lowrank", "hashed")
TOKEN_ID_TRANSPORTS = ("sent", "local")
OPTIMIZERS = ("adamw", "muon", "sgd")   # sgd: plain SGD, linear in the gradient (tests/test_sync.py)
DATA_SOURCES = ("local", "hub")
TOKENIZERS = ("sentencepiece-train", "sentencepiece", "hf")
MUON_NS_METHODS = ("standard", "gram")

# The one table of wire dtypes: name -> bytes per value ("model" = the model's own dtype).
# The one dtype table: names in configs -> torch dtypes (bytes: `.itemsize`).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WIRE_DTYPES = ("model", *DTYPES)
DENSE_REFERENCE = "bf16"     # headline ratios compare with a dense bf16 boundary, as the paper's do
ID_CHANNEL_METHODS = ("subspace",)   # methods whose boundary always sends the token ids
INT16_MAX_VOCAB = 2 ** 15             # ids below this cross as int16, larger vocabularies as int32
CODEC_SCALE_BYTES = 2                 # a codec's per-token scale (bf16; wire/codecs.py)
CODEC_BITS = {"int8": 8, "fp8": 8, "int4": 4, "int2": 2}   # bits per code value of each wire codec


def codec_row_bytes(width: int, codec: str) -> int:
    """Bytes on the wire for one row (one token) of `width` values under a wire codec: the values
    packed (two 4-bit / four 2-bit values a byte, the last byte padded), then the row's scale. The
    one formula behind `Config.wire_bytes_per_token` and the codecs' payload shape (wire/codecs.py)."""
    return -(-width * CODEC_BITS[codec] // 8) + CODEC_SCALE_BYTES


def id_wire_bytes(vocab_size: int) -> int:
    """Bytes per token id on the wire: int16 where the vocabulary fits, else int32."""
    return 2 if vocab_size <= INT16_MAX_VOCAB else 4


@dataclass
class BottleneckConfig:
    """What sits at every segment boundary (and so at every pipeline stage boundary).

    `segments` is a property of the model: the layers are split into this many segments with a
    bottleneck between consecutive ones, whatever the number of pipeline stages it runs on.
    The ResBM switches (`init`, `decoder`, `decoder_norm`, `token_channel`) are described in
    model/boundary.py. The defaults are what the convergence suite measured best (docs/results.md); the paper's
    form is init=normal token_channel=none.
    """
    method: str = "resbm"          # resbm | none (uncompressed: the full hidden state crosses)
    #                                | bottleneck-noskip (SWARM) | subspace (Subspace Models); model/baselines.py
    segments: int = 2
    width: int | None = None       # h, the code width; None = hidden_size // ratio
    ratio: int = 32                # H / h, used when width is None
    identity: str = "slice"        # low-rank identity path: slice | orthonormal | none (ablation)
    wire_dtype: str = "model"      # dtype of the code on the wire; "model" = the model's dtype
    init: str = "identity"         # identity: a fresh boundary is P^T P x | normal: N(0, init_std) (paper)
    decoder: str = "linear"        # linear: W_d norm(b) | mlp: W_2 silu(W_1 norm(b))
    decoder_width: int | None = None   # mlp hidden width; None = model.hidden_size
    decoder_norm: str = "rms"      # rms: D sees RMSNorm(b) | none: D sees b (RMSNorm of h=1 is sign(b))
    token_channel: str = "auto"    # auto (resbm: learned, others: none) | none | learned | frozen | lowrank | hashed:
    #                                the ids cross too and a table local to the receiving stage adds T[ids]
    token_rank: int = 32           # rank of the lowrank token table
    token_buckets: int = 4096      # rows of the hashed token table (B x H, whatever the vocabulary)
    # zero: a learned table starts at 0 under init=identity (the boundary starts as exactly P^T P x)
    # | normal: N(0, init_std), so the next segment's stream starts full-rank (measured: the zero table
    # feeds a rank-h stream to the next RMSNorm, pre-clip grad norm 73 in the first 10 steps vs 3.9)
    table_init: str = "zero"
    token_ids: str = "sent"        # how the token channel's decoders get the ids: sent (they cross every
    #                                stage boundary with the code) | local (each stage reads them from its
    #                                own copy of the data: 0 bytes on the wire; model/local_ids.py)


@dataclass
class PipelineConfig:
    stages: int = 2


@dataclass
class TrainConfig:
    steps: int = 200
    optimizer: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1      # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    # optimizer=muon: Muon for the hidden matrices (block and bottleneck Linear weights), AdamW with
    # lr/betas/weight_decay above for everything else. Defaults are Keller Jordan's Muon
    # (github.com/KellerJordan/Muon, also torch.optim.Muon's "original" scaling): lr 0.02 in units of
    # spectral norm per step, times sqrt(max(1, rows/cols)); Nesterov momentum 0.95; 5 Newton-Schulz
    # steps with coefficients (3.4445, -4.7750, 2.0315); no weight decay.
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0
    muon_ns_method: str = "standard"   # standard (Keller Jordan's quintic) | gram (DeepSpeed's Gram NS)
    eval_every: int = 50
    eval_batches: int = 4          # micro-batches per evaluation; 0: the whole validation split (local text)
    save_every: int = 100
    log_every: int = 1
    out_dir: str = "runs/default"
    keep_last: int = 0             # checkpoints to keep (the newest N); 0 keeps all
    # A step whose loss or gradient norm is not finite is never applied (no rank steps its optimizer)
    # and never saved: `skip` goes on, up to max_skipped_steps such steps in a row, then stops; `stop`
    # stops at the first. A loss >= ln(vocab_size) with a zero gradient norm for divergence_steps
    # steps in a row (a diverged model: saturated, nothing left to learn from) stops the run too, as
    # does a parameter RMS above max_param_rms (exploding weights; a healthy model stays near its
    # init, 0.02-1; 0 turns the check off).
    nonfinite: str = "skip"
    max_skipped_steps: int = 3
    divergence_steps: int = 3
    max_param_rms: float = 1000.0
    # Weights only, from another run: RUN_DIR (its latest checkpoint) or RUN_DIR/checkpoints/TAG,
    # into any stage / data-parallel layout of the same model; the optimizer and step start fresh.
    init_from: str | None = None


@dataclass
class TrackingConfig:
    """Experiment trackers, all on the training-step axis, logged from rank 0 through each library's
    own API: TensorBoard (torch.utils.tensorboard, in OUT/tensorboard), Weights & Biases and MLflow
    (`pip install 'resbm-ds[track]'`). Each gets the resolved config, the git commit and the package
    versions. W&B honours WANDB_MODE / WANDB_DIR (wandb_mode=offline writes OUT/wandb); MLflow
    defaults to a local SQLite store, sqlite:///OUT/mlflow.db."""
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "resbm-ds"
    wandb_mode: str | None = None       # online | offline | disabled; None: wandb's default / WANDB_MODE
    mlflow: bool = False
    mlflow_uri: str | None = None       # None: sqlite:///OUT/mlflow.db
    experiment: str = "resbm-ds"        # MLflow experiment
    run_name: str | None = None         # None: the name of train.out_dir


@dataclass
class DataConfig:
    source: str = "local"          # local | hub
    train_path: str | None = None  # local: file(s); None = the fetched default corpus
    val_path: str | None = None
    hub_name: str = "allenai/c4"
    hub_config: str | None = "en"
    hub_revision: str | None = None          # a dataset commit / tag / branch to pin (None: the default branch)
    hub_split: str = "train"
    hub_val_split: str = "validation"
    text_field: str = "text"
    seq_len: int = 128
    tokenizer: str = "sentencepiece-train"   # sentencepiece-train | sentencepiece | hf
    tokenizer_path: str | None = None
    tokenizer_revision: str | None = None    # tokenizer=hf from the hub: the revision to pin


WIRE_CODECS = ("none", *CODEC_BITS)


@dataclass
class WireConfig:
    """What happens on the wire between pipeline stages: a codec (resbm_ds/wire/codecs.py) and an emulated
    slow link (resbm_ds/wire/link.py). Both work at DeepSpeed's p2p layer, under any boundary method."""
    codec: str = "none"            # none | int8 | fp8 (e4m3 bits in uint8) | int4 | int2 (packed):
    #                                per-row (per token) scaled
    codec_backward: bool = False   # also encode the gradients sent back (default: forward only)
    link_bandwidth_mbps: float | None = None   # emulated link in Mbit/s (1e6 bit/s); None = unlimited
    link_latency_ms: float = 0.0   # one-way latency added to every transfer
    link_full_duplex: bool = False  # False: both directions share the bandwidth (the paper's accounting)

    @property
    def link_emulated(self) -> bool:
        return self.link_bandwidth_mbps is not None or self.link_latency_ms > 0

    def validate(self):
        _choice("wire.codec", self.codec, WIRE_CODECS)
        if self.link_bandwidth_mbps is not None and not self.link_bandwidth_mbps > 0:
            raise ConfigError("wire.link_bandwidth_mbps", self.link_bandwidth_mbps,
                              "must be > 0 (Mbit/s), or empty for an unlimited link")
        if not self.link_latency_ms >= 0:
            raise ConfigError("wire.link_latency_ms", self.link_latency_ms, "must be >= 0 (milliseconds)")


SYNC_METHODS = ("allreduce", "diloco", "sparseloco")
SYNC_BITS = (2, 4, 8)
# outer lr / momentum when sync.outer_lr / sync.outer_momentum are empty: DiLoCo's Nesterov SGD
# (arXiv 2311.08105), SparseLoCo's plain step, error feedback in place of momentum (arXiv 2508.15706)
SYNC_OUTER_DEFAULTS = {"diloco": (0.7, 0.9), "sparseloco": (1.0, 0.0)}


@dataclass
class SyncConfig:
    """Data parallelism across sites (resbm_ds/sync.py). A site is one complete pipeline, launched as
    its own DeepSpeed world; sync.sites > 1 joins the same (stage, data-parallel rank) of every site
    in an outer loop that talks only every `inner_steps` steps. `allreduce` is one site, ZeRO inside.

    diloco: the pseudo-gradient theta_start - theta averaged over sites, then an outer (Nesterov) SGD
    step. sparseloco: the same with error feedback, each site sending only the top `topk` values of
    every `chunk` of its pseudo-gradient, quantised to `bits` bits."""
    method: str = "allreduce"          # allreduce | diloco | sparseloco
    sites: int = 1
    site_rank: int = 0                 # this site's index, 0 .. sites-1
    master_addr: str = "127.0.0.1"     # where site 0's first rank listens for the sites' rendezvous
    master_port: int = 29400
    inner_steps: int = 30              # H: optimizer steps between outer syncs
    outer_lr: float | None = None      # None: diloco 0.7, sparseloco 1.0
    outer_momentum: float | None = None   # None: diloco 0.9, sparseloco 0.0
    nesterov: bool = True
    chunk: int = 4096                  # sparseloco: values per chunk (<= 65536: uint16 indices)
    topk: int = 64                     # sparseloco: values kept per chunk (64 / 4096 = 1.6%)
    bits: int = 2                      # sparseloco: bits per kept value (2 | 4 | 8)
    error_decay: float = 0.95          # sparseloco: error feedback e <- error_decay * e + delta
    timeout_s: int | None = None       # each outer collective; None: runtime.dist_timeout_s

    def outer(self) -> tuple[float, float]:
        """(outer lr, outer momentum), the method's defaults where empty."""
        lr, mom = SYNC_OUTER_DEFAULTS.get(self.method, (1.0, 0.0))
        return (lr if self.outer_lr is None else self.outer_lr,
                mom if self.outer_momentum is None else self.outer_momentum)

    def validate(self):
        _choice("sync.method", self.method, SYNC_METHODS)
        for key in ("sites", "inner_steps", "chunk", "topk"):
            if getattr(self, key) < 1:
                raise ConfigError(f"sync.{key}", getattr(self, key), "must be >= 1")
        if not 0 <= self.site_rank < self.sites:
            raise ConfigError("sync.site_rank", self.site_rank, f"must be in [0, sync.sites={self.sites})")
        if self.method == "allreduce" and self.sites > 1:
            raise ConfigError("sync.method", self.method, f"allreduce is one site; with sync.sites={self.sites} "
                              "use diloco or sparseloco")
        if not 0 < self.master_port < 65536:
            raise ConfigError("sync.master_port", self.master_port, "must be a TCP port, 1..65535")
        lr, mom = self.outer()
        if not lr > 0:
            raise ConfigError("sync.outer_lr", self.outer_lr, "must be > 0")
        if not 0 <= mom < 1:
            raise ConfigError("sync.outer_momentum", self.outer_momentum, "must be in [0, 1)")
        if self.chunk > 65536:
            raise ConfigError("sync.chunk", self.chunk, "must be <= 65536 (indices cross as uint16)")
        if self.topk > self.chunk:
            raise ConfigError("sync.topk", self.topk, f"must be <= sync.chunk ({self.chunk})")
        _choice("sync.bits", self.bits, SYNC_BITS)
        if not 0 <= self.error_decay <= 1:
            raise ConfigError("sync.error_decay", self.error_decay, "must be in [0, 1]")
        if self.timeout_s is not None and self.timeout_s < 1:
            raise ConfigError("sync.timeout_s", self.timeout_s, "must be >= 1 (seconds), or empty")


# The runtime keys an environment variable may set (Slurm templates and netem set them for every rank).
RUNTIME_ENV = {"dist_timeout_s": "RESBM_DIST_TIMEOUT", "strict_layout": "RESBM_STRICT_LAYOUT",
               "net_iface": "RESBM_NET_IFACE"}


@dataclass
class RuntimeConfig:
    """How a run meets its machines; nothing here changes what it trains, so --resume may change it.
    Each key may also come from its environment variable (RESBM_DIST_TIMEOUT, RESBM_STRICT_LAYOUT,
    RESBM_NET_IFACE: RUNTIME_ENV), checked as the key is, which wins over the config file; a command-line override wins over both. The resolved values are written to config.yaml."""
    dist_timeout_s: int = 300      # how long a rank waits for its peers: rendezvous, each collective, each step
    strict_layout: bool = False    # Slurm: a node holding several stages, or a stage spanning nodes, is an error
    net_iface: str = ""            # record this interface's kernel byte counters per step (netem.py)

    def validate(self):
        if self.dist_timeout_s < 1:
            raise ConfigError(_runtime_key("dist_timeout_s"), self.dist_timeout_s, "must be >= 1 (seconds)")
        if self.net_iface and not (Path("/sys/class/net") / self.net_iface).is_dir():
            have = sorted(p.name for p in Path("/sys/class/net").iterdir()) if Path("/sys/class/net").is_dir() else []
            raise ConfigError(_runtime_key("net_iface"), self.net_iface, f"no such network interface here (have: {have})")


def _runtime_key(name: str) -> str:
    env = RUNTIME_ENV[name]
    return f"runtime.{name} ({env})" if env in os.environ else f"runtime.{name}"


def _runtime_from_env(raw: dict):
    """Put the runtime keys set in the environment into `raw`, parsed as their override would be."""
    for name, env in RUNTIME_ENV.items():
        text = os.environ.get(env)
        if text is None or text.strip() == "":
            continue
        value = read_yaml(text.strip(), env, text) if name != "net_iface" else text.strip()
        if name == "strict_layout" and value in (0, 1):
            value = bool(value)
        value = _coerce(value, typing.get_type_hints(RuntimeConfig)[name], f"{env} (runtime.{name})")
        section = raw.setdefault("runtime", {})
        if not isinstance(section, dict):
            raise ConfigError("runtime", section, "must be a mapping")
        section[name] = value


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    wire: WireConfig = field(default_factory=WireConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    seed: int = 1234
    # The DeepSpeed config: a path to a JSON file (e.g. ds_configs/cpu_fp32.json) or a dict.
    # Precision, ZeRO stage, micro-batch size, gradient accumulation and clipping live here.
    deepspeed: typing.Any = "ds_configs/cpu_fp32.json"

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
    def code_width(self) -> int:
        """h: the number of values per token that cross each boundary."""
        if self.bottleneck.method == "none":
            return self.model.hidden_size
        return self.bottleneck.width or self.model.hidden_size // self.bottleneck.ratio

    @property
    def model_elem_bytes(self) -> int:
        return DTYPES[self.precision].itemsize

    @property
    def wire_elem_bytes(self) -> int:
        """Bytes of one code value on the wire: bottleneck.wire_dtype, else the model's dtype."""
        w = self.bottleneck.wire_dtype
        return DTYPES[w].itemsize if w in DTYPES else self.model_elem_bytes

    @property
    def sends_token_ids(self) -> bool:
        """Whether the token ids cross the stage boundaries (with the code, counted by the meter)."""
        b = self.bottleneck
        return b.method in ID_CHANNEL_METHODS or (self.token_channel != "none" and b.token_ids == "sent")

    @property
    def token_channel(self) -> str:
        """bottleneck.token_channel with `auto` resolved: learned for ResBM, none for the others."""
        b = self.bottleneck
        if b.token_channel == "auto":
            return "learned" if b.method == "resbm" else "none"
        return b.token_channel

    @property
    def wire_bytes_per_token(self) -> tuple[int, int]:
        """(forward, backward) bytes per token at each boundary that crosses stages, as the meter
        counts them: the code (h values in the wire dtype, or under a wire codec `codec_row_bytes`),
        plus the token ids forward where they cross (no gradient comes back for them; none cross with
        bottleneck.token_ids=local). The one
        prediction that tests/test_wire_bytes.py checks against the meter."""
        h, w = self.code_width, self.wire
        dense_code = h * self.wire_elem_bytes
        coded = codec_row_bytes(h, w.codec) if w.codec != "none" else dense_code
        ids = id_wire_bytes(self.model.vocab_size) if self.sends_token_ids else 0
        return coded + ids, (coded if w.codec_backward else dense_code)

    def dense_bytes_per_token(self, reference: str = DENSE_REFERENCE) -> int:
        """Bytes per token per direction of an uncompressed boundary: H values in `reference`
        ("model" = the model's own dtype)."""
        return self.model.hidden_size * (DTYPES[reference].itemsize if reference in DTYPES else self.model_elem_bytes)

    def compression_ratio(self, reference: str = DENSE_REFERENCE, per_token=None) -> float:
        """Dense bytes per token per direction / bytes sent per token in the busier direction:
        against dense bf16 by default, `reference="model"` for the model's dtype.
        `per_token` = measured (forward, backward) bytes per token; default: the prediction."""
        return self.dense_bytes_per_token(reference) / max(per_token or self.wire_bytes_per_token)

    # ---- validation -----------------------------------------------------------------------
    def validate(self, world_size: int | None = None) -> "Config":
        """Reject every invalid value with a message naming the key; returns self."""
        m, b, S = self.model, self.bottleneck, self.pipeline.stages
        _positive(self, ["model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads",
                         "model.max_seq_len", "bottleneck.segments", "bottleneck.ratio",
                         "pipeline.stages", "train.steps", "data.seq_len"])
        if m.hidden_size % m.num_heads:
            raise ConfigError("model.hidden_size", m.hidden_size,
                              f"must be divisible by model.num_heads ({m.num_heads})")
        if m.head_dim % 2:
            raise ConfigError("model.hidden_size", m.hidden_size,
                              f"head size hidden_size/num_heads = {m.head_dim} must be even for RoPE")
        if m.num_kv_heads is not None and (m.num_kv_heads < 1 or m.num_heads % m.num_kv_heads):
            raise ConfigError("model.num_kv_heads", m.num_kv_heads,
                              f"must be >= 1 and divide model.num_heads ({m.num_heads})")
        _choice("bottleneck.method", b.method, BOUNDARY_METHODS)
        _choice("bottleneck.identity", b.identity, IDENTITY_PATHS)
        _choice("bottleneck.wire_dtype", b.wire_dtype, WIRE_DTYPES)
        _choice("bottleneck.init", b.init, BOUNDARY_INITS)
        _choice("bottleneck.decoder", b.decoder, DECODERS)
        _choice("bottleneck.decoder_norm", b.decoder_norm, DECODER_NORMS)
        _choice("bottleneck.token_channel", b.token_channel, TOKEN_CHANNELS)
        _choice("bottleneck.table_init", b.table_init, ("zero", "normal"))
        _choice("bottleneck.token_ids", b.token_ids, TOKEN_ID_TRANSPORTS)
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
        self.wire.validate()
        self.sync.validate()
        self.runtime.validate()
        self._validate_model_numbers()
        self._validate_data()
        self._validate_train()
        self._validate_tracking()
        self._validate_deepspeed(world_size)
        self._validate_optimizer()
        return self

    def _validate_model_numbers(self):
        m = self.model
        if not m.norm_eps > 0:
            raise ConfigError("model.norm_eps", m.norm_eps, "must be > 0 (RMSNorm divides by sqrt(mean + eps))")
        if not m.init_std >= 0:
            raise ConfigError("model.init_std", m.init_std, "must be >= 0")
        if m.embed_std is not None and not m.embed_std >= 0:
            raise ConfigError("model.embed_std", m.embed_std, "must be >= 0, or empty (= model.init_std)")
        if not m.rope_theta > 0:
            raise ConfigError("model.rope_theta", m.rope_theta, "must be > 0")
        if self.seed < 0:
            raise ConfigError("seed", self.seed, "must be an integer >= 0")

    def _validate_data(self):
        d = self.data
        _choice("data.source", d.source, DATA_SOURCES)
        _choice("data.tokenizer", d.tokenizer, TOKENIZERS)
        if d.tokenizer != "sentencepiece-train" and not d.tokenizer_path:
            raise ConfigError("data.tokenizer_path", d.tokenizer_path,
                              f"data.tokenizer={d.tokenizer} needs it: "
                              + ("the .model file" if d.tokenizer == "sentencepiece"
                                 else "a local transformers directory or a hub name"))
        if d.tokenizer == "sentencepiece" and not Path(d.tokenizer_path).expanduser().is_file():
            raise ConfigError("data.tokenizer_path", d.tokenizer_path, "no such sentencepiece .model file")
        if d.tokenizer == "hf" and d.tokenizer_path.startswith(("/", "./", "../", "~")) \
                and not Path(d.tokenizer_path).expanduser().is_dir():
            raise ConfigError("data.tokenizer_path", d.tokenizer_path, "no such transformers tokenizer directory")

    def _validate_train(self):
        t = self.train
        if not all(0 <= b < 1 for b in t.betas):
            raise ConfigError("train.betas", list(t.betas), "both must be in [0, 1)")
        for key in ("eval_every", "save_every", "log_every", "max_skipped_steps", "divergence_steps"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key}", getattr(t, key), "must be an integer >= 1")
        if t.eval_batches < 0:
            raise ConfigError("train.eval_batches", t.eval_batches, "must be >= 0 (0: the whole validation split)")
        if t.keep_last < 0:
            raise ConfigError("train.keep_last", t.keep_last, "must be >= 0 (0 keeps every checkpoint)")
        if not t.max_param_rms >= 0:
            raise ConfigError("train.max_param_rms", t.max_param_rms, "must be >= 0 (0 turns the check off)")
        _choice("train.nonfinite", t.nonfinite, ("skip", "stop"))
        if not 0 <= t.min_lr_ratio <= 1:
            raise ConfigError("train.min_lr_ratio", t.min_lr_ratio, "must be in [0, 1]")
        if t.warmup_steps < 0:
            raise ConfigError("train.warmup_steps", t.warmup_steps, "must be >= 0")
        if t.init_from is not None and not Path(t.init_from).exists():
            raise ConfigError("train.init_from", t.init_from,
                              "no such run or checkpoint directory (RUN_DIR or RUN_DIR/checkpoints/TAG)")

    def _validate_tracking(self):
        k = self.tracking
        _choice("tracking.wandb_mode", k.wandb_mode, (None, "online", "offline", "disabled"))
        for flag, module, extra in (("wandb", "wandb", "track"), ("mlflow", "mlflow", "track")):
            if getattr(k, flag):
                if importlib.util.find_spec(module) is None:
                    raise ConfigError(f"tracking.{flag}", True,
                                      f"needs the {module} package: pip install 'resbm-ds[{extra}]'")
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
        t = self.train
        _choice("train.optimizer", t.optimizer, OPTIMIZERS)
        for key in ("lr", "muon_lr"):
            if not getattr(t, key) > 0:
                raise ConfigError(f"train.{key}", getattr(t, key), "must be > 0")
        for key in ("weight_decay", "muon_weight_decay"):
            if getattr(t, key) < 0:
                raise ConfigError(f"train.{key}", getattr(t, key), "must be >= 0")
        if not 0 <= t.muon_momentum < 1:
            raise ConfigError("train.muon_momentum", t.muon_momentum, "must be in [0, 1)")
        _choice("train.muon_ns_method", t.muon_ns_method, MUON_NS_METHODS)
        if t.optimizer != "muon":
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
        return dataclasses.asdict(self)


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
    cfg = _build(Config, raw, "")
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
    return _build(Config, raw, "")


def _set_nested(raw: dict, keys: list[str], value, full_key: str):
    if keys[0] == "deepspeed" and len(keys) > 1 and isinstance(raw.get("deepspeed", "x"), str):
        # Override inside the DeepSpeed JSON: load it first so the rest of the file is kept.
        raw["deepspeed"] = load_ds_json(raw.get("deepspeed", Config.deepspeed))
    node = raw
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(full_key, value, f"'{k}' is not a section")
    node[keys[-1]] = value


def _build(cls, raw, prefix):
    if not isinstance(raw, dict):
        raise ConfigError(prefix.rstrip(".") or "config", raw, "must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - names
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(prefix + k, raw[k], f"unknown key; allowed in this section: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def _coerce(value, hint, key):
    if hint is typing.Any:
        return value
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(key, value, f"must not be empty (type {_tname(hint)})")
    if type(None) in args:   # Optional[X]
        hint = next(a for a in args if a is not type(None))
        args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(key, value, f"must be a list of {len(args)} values")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):   # YAML reads 3e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ConfigError(key, value, f"must be of type {_tname(hint)}")


def _tname(hint) -> str:
    return getattr(hint, "__name__", str(hint))


def _positive(cfg: Config, keys: list[str]):
    for key in keys:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value < 1:
            raise ConfigError(key, value, "must be >= 1")


def _choice(key, value, allowed):
    if value not in allowed:
        raise ConfigError(key, value, f"allowed: {list(allowed)}")
