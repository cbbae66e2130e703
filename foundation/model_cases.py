"""Whole tiny models: a decoder-only (or vision-language) architecture's configuration, a LoRA configuration as an
mlx-lm user writes it, and the tokens, drawn by Hypothesis and built in code (nothing is downloaded).

A case holds no weights: the reference side makes them (transformers initialises the model from `seed` and saves it
to a directory, which both sides load through their own loading paths), and the adapters are drawn here from `seed`,
in float32 (as mlx-lm creates them, and as peft keeps them on a half-precision model), once for both sides.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from foundation.dtypes import BY_NAME, FLOAT32, DType
from foundation.memo import built_once
from foundation.quantization import AVAILABLE, Quantization

DENSE_ARCHITECTURES = ("llama", "qwen2", "qwen3")
MIXTURE_ARCHITECTURES = ("qwen3_moe",)
"""Whose blocks' feed-forward part is a mixture of experts: a router (``mlp.gate``) picks each token's
`ModelCase.experts_per_token` of `ModelCase.experts` experts (mlx-lm's ``switch_mlp``, transformers' ``experts``)."""
TEXT_ARCHITECTURES = DENSE_ARCHITECTURES + MIXTURE_ARCHITECTURES
"""Decoder-only architectures that mlx-lm and transformers both implement, by their ``model_type``."""
VISION_LANGUAGE_ARCHITECTURES = ("idefics3",)
"""Vision-language models that mlx-vlm and transformers both implement, whose language part (a dense Llama behind a
vision tower, SmolVLM's architecture) takes LoRA; mlx-lm loads none. Their cases run on tokens alone."""
ARCHITECTURES = TEXT_ARCHITECTURES + VISION_LANGUAGE_ARCHITECTURES

LANGUAGE_ARCHITECTURES = {"idefics3": "llama"}
"""The text architecture of a vision-language model's language part."""
LANGUAGE_ROOTS = {"idefics3": "model.text_model."}
"""Where transformers keeps a vision-language model's language part, whose blocks a case names as a text model's
(``model.layers.1.self_attn.q_proj``)."""
MLX_VLM_ROOT = "language_model."
"""Where mlx-vlm keeps a model's language part: a text model's module names are mlx-lm's behind it
(``language_model.model.layers.1...``), a vision-language model's without mlx-lm's ``model.``
(``language_model.layers.1...``)."""

LINEAR_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
"""The linear layers of a dense block, by their path in it: mlx-lm's ``keys``, what its default adapts."""

EXPERT_KEYS = ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj", "mlp.switch_mlp.down_proj")
"""A mixture's experts, by mlx-lm's path in a block: a `SwitchLinear` per projection, its weight (experts, out, in)."""

MIXTURE_KEYS = LINEAR_KEYS[:4] + ("mlp.gate",) + EXPERT_KEYS
"""The layers mlx-lm can adapt in a mixture-of-experts block (and its default adapts): attention's, the router's,
the experts'."""


ADAPTER_SCALES = (0.02, 0.1, 0.5)
"""The bounds adapters are drawn within, those at least 16 roundings of the case's dtype: in bfloat16, adapters within
±0.02 on weights of standard deviation 0.02 move the logits less than rounding does, and such a case sees no error of
the glue (a missing layer's adapter, a wrong scale) that the float32 and float16 cases do not."""


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA configuration as an mlx-lm user writes it (``adapter_config.json``, ``mlx_lm.lora``'s config)."""

    fine_tune_type: str
    """``lora`` or ``dora``."""
    num_layers: int
    """Adapt the last `num_layers` blocks."""
    rank: int
    scale: float
    """mlx-lm's scale: the LoRA term is ``scale * (x A^T) B^T``, peft's ``lora_alpha / r``."""
    keys: tuple[str, ...] | None
    """The block's layers to adapt, by path (`ModelCase.block_keys`); None: mlx-lm's default, every linear layer (and
    every layer of experts)."""
    dropout: float = 0.0

    def adapter_config(self) -> dict:
        """What mlx-lm writes to (and `load_adapters` reads from) ``adapter_config.json``."""
        parameters = {"rank": self.rank, "scale": self.scale, "dropout": self.dropout}
        if self.keys is not None:
            parameters["keys"] = list(self.keys)
        return {"fine_tune_type": self.fine_tune_type, "num_layers": self.num_layers, "lora_parameters": parameters}


@dataclass(frozen=True, eq=False)
class ModelCase:
    """One tiny model, its adapters and its input. Cases compare by identity (`foundation.memo` keeps what is
    built from one with it)."""

    architecture: str
    dtype: DType
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    lora: LoraSettings
    batch: int
    length: int
    seed: int
    adapter_scale: float
    """The adapters' entries are drawn uniformly within ±`adapter_scale`."""
    rope_theta: float = 10000.0
    rope_parameters_only: bool = False
    """Whether ``config.json`` is as transformers 5 saves it (the rotary base only under ``rope_parameters``); else
    with the keys transformers 4 wrote too (`foundation.model_files.transformers_4_keys`), as most published
    checkpoints have them."""
    initializer_range: float = 0.02
    """The standard deviation transformers draws the weights with: its default, or larger for attention that is
    far from uniform."""
    experts: int = 0
    """A mixture's experts per block (`intermediate` is each expert's hidden size); 0: a dense architecture."""
    experts_per_token: int = 0
    norm_topk_prob: bool = False
    """Whether the router's chosen probabilities are divided by their sum."""
    quantization: Quantization | None = None
    """How MLX's copy of the model is quantized (``mlx_lm.convert -q``: every linear layer and embedding whose rows the
    group size divides), or None: the model as transformers saved it."""

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def mixture(self) -> bool:
        return self.architecture in MIXTURE_ARCHITECTURES

    @property
    def vision_language(self) -> bool:
        return self.architecture in VISION_LANGUAGE_ARCHITECTURES

    def language_model(self) -> ModelCase:
        """A vision-language case's language part as the text model it is (a Llama of the same configuration, seed
        and adapters), for a package that implements no vision-language model; any other case itself."""
        if not self.vision_language:
            return self
        return shared(dataclasses.replace(self, architecture=LANGUAGE_ARCHITECTURES[self.architecture]))

    def reference_name(self, name: str) -> str:
        """transformers' name of the case's module or weight `name` (as mlx-lm names a text model's:
        ``model.layers.1.self_attn.q_proj``)."""
        root = LANGUAGE_ROOTS.get(self.architecture)
        return root + name.removeprefix("model.") if root and name.startswith("model.") else name

    @property
    def block_keys(self) -> tuple[str, ...]:
        """The layers of a block mlx-lm can adapt, by path: what its default (``keys`` unset) adapts."""
        return MIXTURE_KEYS if self.mixture else LINEAR_KEYS

    @property
    def adapted_keys(self) -> tuple[str, ...]:
        """The layers of each adapted block that the LoRA configuration adapts."""
        return self.block_keys if self.lora.keys is None else self.lora.keys

    def hf_config(self) -> dict:
        """The model's ``config.json`` as transformers writes it for this architecture; a vision-language model's
        language part under ``text_config``, beside a small vision tower of as many blocks (whose layers' names and
        indices a careless mapping would adapt too)."""
        if self.vision_language:
            vision = {
                "hidden_size": 16,
                "intermediate_size": 32,
                "num_hidden_layers": self.layers,
                "num_attention_heads": 2,
            }
            return {
                "model_type": self.architecture,
                "text_config": self._text_config() | {"model_type": LANGUAGE_ARCHITECTURES[self.architecture]},
                "vision_config": vision | {"image_size": 28, "patch_size": 14},
                "scale_factor": 1,
                "tie_word_embeddings": self.tied,
            }
        return self._text_config()

    def _text_config(self) -> dict:
        mixture = {
            "num_experts": self.experts,
            "num_experts_per_tok": self.experts_per_token,
            "moe_intermediate_size": self.intermediate,
            "norm_topk_prob": self.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
        return (mixture if self.mixture else {}) | {
            "model_type": self.architecture,
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": 64,
            "rms_norm_eps": 1e-6,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tied,
            "initializer_range": self.initializer_range,
        }

    @property
    def adapted_layers(self) -> range:
        """The blocks mlx-lm adapts: the last `num_layers`."""
        return range(max(self.layers - self.lora.num_layers, 0), self.layers)

    def dims(self, key: str) -> tuple[int, int]:
        """(in, out) of a block's linear layer (of each expert, for a layer of experts)."""
        kv = self.kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (self.hidden, self.hidden),
            "self_attn.k_proj": (self.hidden, kv),
            "self_attn.v_proj": (self.hidden, kv),
            "self_attn.o_proj": (self.hidden, self.hidden),
            "mlp.gate_proj": (self.hidden, self.intermediate),
            "mlp.up_proj": (self.hidden, self.intermediate),
            "mlp.down_proj": (self.intermediate, self.hidden),
            "mlp.gate": (self.hidden, self.experts),
            "mlp.switch_mlp.gate_proj": (self.hidden, self.intermediate),
            "mlp.switch_mlp.up_proj": (self.hidden, self.intermediate),
            "mlp.switch_mlp.down_proj": (self.intermediate, self.hidden),
        }[key]

    @functools.cached_property
    def adapters(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per adapted layer (``model.layers.3.self_attn.q_proj``), A (r, in) and B (out, r), float32: peft's layouts
        of a linear layer; a layer of experts has one pair per expert, A (experts, r, in) and B (experts, out, r)."""
        rng = np.random.default_rng(self.seed)
        found = {}
        for layer in self.adapted_layers:
            for key in self.adapted_keys:
                inputs, outputs = self.dims(key)
                experts = (self.experts,) if key in EXPERT_KEYS else ()
                a = rng.uniform(-self.adapter_scale, self.adapter_scale, (*experts, self.lora.rank, inputs))
                b = rng.uniform(-self.adapter_scale, self.adapter_scale, (*experts, outputs, self.lora.rank))
                found[f"model.layers.{layer}.{key}"] = (a.astype(np.float32), b.astype(np.float32))
        return found

    @property
    def dora(self) -> bool:
        return self.lora.fine_tune_type == "dora"

    @functools.cached_property
    def tokens(self) -> np.ndarray:
        return np.random.default_rng(self.seed + 1).integers(0, self.vocab, (self.batch, self.length))

    def describe(self) -> dict:
        described = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        described["dtype"] = self.dtype.name
        described["lora"] = dataclasses.asdict(self.lora)
        described["quantization"] = self.quantization and self.quantization.describe()
        described["kind"] = "model"
        return described

    @classmethod
    def from_description(cls, description: dict) -> ModelCase:
        fields = {f.name for f in dataclasses.fields(cls)}
        named = {name: value for name, value in description.items() if name in fields}
        lora = dict(description["lora"])
        lora["keys"] = None if lora["keys"] is None else tuple(lora["keys"])
        quantization = description.get("quantization")
        quantization = quantization and Quantization(**quantization)
        lora = LoraSettings(**lora)
        return cls(**{**named, "dtype": BY_NAME[description["dtype"]], "lora": lora, "quantization": quantization})


def lora_settings(layers: int, mixture: bool = False) -> st.SearchStrategy[LoraSettings]:
    """A LoRA configuration of a model of `layers` blocks: LoRA or DoRA on a dense model; LoRA on a mixture of experts
    (neither mlx-lm's `SwitchLinear` nor peft's ``target_parameters`` take DoRA)."""
    paths = MIXTURE_KEYS if mixture else LINEAR_KEYS
    keys = st.none() | st.lists(st.sampled_from(paths), min_size=1, unique=True).map(tuple)
    return st.builds(
        LoraSettings,
        fine_tune_type=st.just("lora") if mixture else st.sampled_from(["lora", "dora"]),
        num_layers=st.integers(1, layers),
        rank=st.integers(1, 8),
        scale=st.sampled_from([20.0, 2.0, 1.0, 0.5, 10.0, 0.3]),
        keys=keys,
    )


def shared(case: ModelCase) -> ModelCase:
    """The case drawn with these parameters earlier in the current scope, if any (`foundation.memo.share_cases`): the
    subjects of one check draw the same cases, and what is built from a case (the model files, the oracle, the
    reference's orders) is built once for all of them."""
    parameters = tuple((f.name, getattr(case, f.name)) for f in dataclasses.fields(case))
    return built_once(("model", parameters), lambda: case)


@st.composite
def model_cases(draw: st.DrawFn, dtype: DType = FLOAT32, quantized: str | None = None) -> ModelCase:
    """A tiny model of one of `ARCHITECTURES` in `dtype`, with LoRA on some of its last blocks; with `quantized` (a
    `Quantization.kind`), a dense text model whose MLX copy is quantized in that kind, of widths its group size
    divides (hidden and intermediate sizes 32 or 64). A vision-language model's embeddings are not tied: mlx-vlm's
    idefics3 always has an output layer of its own."""
    layers = draw(st.integers(1, 3))
    if quantized is None:
        architecture = draw(st.sampled_from(ARCHITECTURES))
        heads, head_dim = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([4, 8, 16]))
        intermediate, quantization = draw(st.integers(4, 48)), None
    else:
        architecture = draw(st.sampled_from(DENSE_ARCHITECTURES))
        heads, head_dim = draw(st.sampled_from([(2, 16), (4, 8), (4, 16)]))
        intermediate = draw(st.sampled_from([32, 64]))
        fitting = [q for q in AVAILABLE if q.kind == quantized and (heads * head_dim) % q.group_size == 0]
        quantization = draw(st.sampled_from([q for q in fitting if intermediate % q.group_size == 0]))
    mixture = architecture in MIXTURE_ARCHITECTURES
    experts = draw(st.integers(2, 6)) if mixture else 0
    return shared(
        ModelCase(
            architecture=architecture,
            dtype=dtype,
            layers=layers,
            heads=heads,
            kv_heads=draw(st.sampled_from([k for k in (1, 2, 4) if heads % k == 0])),
            head_dim=head_dim,
            intermediate=intermediate,
            vocab=draw(st.integers(8, 64)),
            tied=draw(st.booleans()) and architecture not in VISION_LANGUAGE_ARCHITECTURES,
            lora=draw(lora_settings(layers, mixture)),
            batch=draw(st.integers(1, 2)),
            length=draw(st.integers(1, 8)),
            seed=draw(st.integers(0, 2**31 - 1)),
            adapter_scale=draw(st.sampled_from([s for s in ADAPTER_SCALES if s >= 16 * dtype.unit_roundoff])),
            rope_theta=draw(st.sampled_from([10000.0, 500000.0, 1000000.0])),
            initializer_range=draw(st.sampled_from([0.02, 0.2])),
            experts=experts,
            experts_per_token=draw(st.integers(1, min(experts, 3))) if mixture else 0,
            norm_topk_prob=draw(st.booleans()) if mixture else False,
            quantization=quantization,
        )
    )
