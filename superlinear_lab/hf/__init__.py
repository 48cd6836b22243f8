"""superlinear_lab.hf: superlinear attention inside Hugging Face transformers models (needs the ``hf`` extra).

    import superlinear_lab.hf as hf
    hf.register()                                    # "superlinear" becomes an attn_implementation
    model = hf.convert(model, SpanConfig.default())  # in place; {layer: SpanConfig} or layers=[...] also work
    with model.trace() as tr:                        # a RoutingTrace, same contract as the project's own model
        model(ids)
    session = Session(hf.HFModel(model), max_len=4096)   # sessions, snapshots, views
    hf.retrofit(model, cfg, ids, "runs/retro")       # distil Q1 so it matches the dense model

Nothing here downloads: models are built from configs or loaded from local directories (``local_files_only``).
"""
from .attention import (LayerState, SearchQueryProjection, attention_forward, check_supported, convert,
                        converted_layers, dense, register, set_backend)
from .model import HFKVCache, HFModel
from .pattern import attention_pattern, bertviz_attention
from .distill import RetrofitSettings, from_pretrained, heldout_loss, retrofit, save_pretrained

__all__ = ["register", "convert", "dense", "set_backend", "converted_layers", "check_supported", "LayerState",
           "SearchQueryProjection", "attention_forward", "HFModel", "HFKVCache", "attention_pattern",
           "bertviz_attention", "retrofit", "RetrofitSettings", "save_pretrained",
           "from_pretrained", "heldout_loss"]
