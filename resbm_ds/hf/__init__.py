"""Hugging Face `transformers` interop: Llama / Qwen2 / Mistral configs and weights in, and back out.

    config_from_hf(dir)                  a resbm-ds Config whose model section is the transformers one
    init_pipeline_from_hf(module, cfg)   build_engine's hook: each stage reads only its own layers
    from_hf(dir)                         the same network on one process (ResBMForCausalLM)
    save_hf(model, out_dir)              a consolidated model -> a `save_pretrained` directory: plain
                                         Llama/Qwen2/Mistral when uncompressed, else model_type `resbm`
    ResBMHFConfig, ResBMHFForCausalLM    ResBM as a transformers model (modeling.py), registered with
                                         AutoConfig / AutoModelForCausalLM by `import resbm_ds.hf`

Our layers use Hugging Face's Llama names, so a transformers tensor maps to a pipeline layer by
name alone: `model.layers.{i}.X` is `X` of the block with layer_id i, `model.embed_tokens.weight`
the embedding, `model.norm.weight` the final norm, `lm_head.weight` the head. The three families
share these names; Qwen2 adds q/k/v biases (`model.attention_bias`). ResBM encoders/decoders have
no Llama counterpart: loading from a Llama they keep their own initialisation, and a model with
them exports as the `resbm` model type, the whole single-process twin under `resbm.layers.XX.*`.

Anything in a transformers config that our network does not compute the same way (RoPE scaling,
a sliding window shorter than the sequence, MLP or o_proj biases, another activation, ...) raises
`UnsupportedHFConfig` naming the field, rather than loading weights into a different network.

Modules: configs.py (configs both ways, and the checks), weights.py (weights both ways),
modeling.py (the `resbm` transformers model), __main__.py (the CLI).

CLI: `python -m resbm_ds.hf config DIR [--config BASE] [key=value ...]` prints a run config (YAML)
for `python -m resbm_ds.train --config`, with the model section and `model.init_from_hf` filled in.
"""
from .modeling import register

register()
