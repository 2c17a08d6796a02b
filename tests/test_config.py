import json
import math

import pytest

from dsv2_jax.commands.info import parameter_counts
from dsv2_jax.config import ConfigError, ModelConfig, to_hf_dict

ORIGINAL_DIALECT = {  # as in the published DeepSeek-V2-Lite config.json (trimmed to the fields we read)
    "model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16, "num_key_value_heads": 16,
    "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
    "moe_layer_freq": 1, "topk_method": "gready", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "aux_loss_alpha": 0.001, "seq_aux": True,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "bos_token_id": 100000, "eos_token_id": 100001, "tie_word_embeddings": False, "attention_bias": False,
}


def test_presets_match_the_paper():
    v2, lite = ModelConfig.preset("deepseek-v2"), ModelConfig.preset("deepseek-v2-lite")
    # YaRN softmax scale: (128+64)^-0.5 * m^2 with m = 0.1*0.707*ln(40)+1.
    m = 0.1 * 0.707 * math.log(40) + 1
    assert v2.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert m * m == pytest.approx(1.5896, abs=1e-4)
    assert v2.latent_cache_dim * v2.num_hidden_layers == 34560
    counts = parameter_counts(v2)
    assert round(counts["total"] / 1e9) == 236 and round(counts["active"] / 1e9) == 21
    assert round(parameter_counts(lite)["total"] / 1e9, 1) == 15.7
    assert lite.q_lora_rank is None and lite.topk_method == "greedy"
    ModelConfig.preset("tiny")


def test_both_hf_dialects_give_the_same_config(tmp_path):
    original = ModelConfig.from_hf(ORIGINAL_DIALECT)
    assert original.topk_method == "greedy"  # the "gready" typo
    assert (original.rope_type, original.rope_factor, original.mscale_all_dim) == ("yarn", 40.0, 0.707)
    assert original == ModelConfig.preset("deepseek-v2-lite")
    v5 = to_hf_dict(original)
    assert "rope_scaling" not in v5 and v5["rope_parameters"]["rope_type"] == "yarn"
    (tmp_path / "config.json").write_text(json.dumps(v5))
    assert ModelConfig.from_hf(tmp_path) == original
    rope_type_key = dict(ORIGINAL_DIALECT, rope_scaling=dict(ORIGINAL_DIALECT["rope_scaling"], rope_type="yarn"))
    del rope_type_key["rope_scaling"]["type"]
    assert ModelConfig.from_hf(rope_type_key) == original


@pytest.mark.parametrize("change, field", [
    (dict(n_routed_experts=10, n_group=4), "n_group"),
    (dict(topk_method="best"), "topk_method"),
    (dict(topk_group=9, n_group=8), "topk_group"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(num_experts_per_tok=200), "num_experts_per_tok"),
    (dict(moe_impl="fast"), "moe_impl"),
])
def test_validation_names_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.preset("deepseek-v2").replace(**change)


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="config.json not found"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON"):
        ModelConfig.from_hf(tmp_path)
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.from_dict({"hidden_sise": 3})
    with pytest.raises(ConfigError, match="rope type 'dynamic'"):
        ModelConfig.from_hf(dict(ORIGINAL_DIALECT, rope_scaling={"type": "dynamic", "factor": 2}))
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("deepseek-v9")
