"""An openk2 Hugging Face folder as a GGUF file for llama.cpp, so that `bench/decode.py` runs llama.cpp
on the very weights openk2 decodes (the bench extra: `pip install llama-cpp-python gguf`).

The conversion, written with the `gguf` library (llama.cpp's own Python writer) for llama.cpp's
`deepseek2` architecture, the one its converter targets for DeepSeek-V3 / Kimi-K2 folders:
- hyper-parameters from config.json: MLA as one key/value head (key length kv_lora_rank +
  qk_rope_head_dim, value length kv_lora_rank, and the per-head MLA lengths), YaRN, sigmoid routing
  with groups, the leading dense layers, shared experts, routed_scaling_factor, norm_topk_prob;
- tensors renamed by gguf's name map for the architecture; `kv_b_proj` split into `attn_k_b` (each
  head's no-RoPE key rows, transposed) and `attn_v_b`, as llama.cpp's absorbed MLA reads them; routed
  experts stacked per layer; the router's correction bias as `exp_probs_b.bias`; vectors (norms,
  bias) and the router in fp32, matrices bf16;
- a placeholder vocabulary (byte-level GPT-2 model, one merge): the bench feeds token ids and never
  text, so only the ids, BOS and EOS need to exist.
Quantized files come from llama.cpp's own quantizer on that BF16 file (`quantize`): Q8_0, Q4_K_M.

    .venv/bin/python -m bench.gguf HF_FOLDER OUT.gguf [--quantize q8_0|q4_k_m]
"""

import argparse
import contextlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

FTYPES = {"bf16": 32, "q8_0": 7, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_*


# gguf writer method <- config.json field, where the value passes as it is
FIELDS = {"block_count": "num_hidden_layers", "context_length": "max_position_embeddings",
          "embedding_length": "hidden_size", "feed_forward_length": "intermediate_size",
          "head_count": "num_attention_heads", "layer_norm_rms_eps": "rms_norm_eps", "rope_freq_base": "rope_theta",
          "vocab_size": "vocab_size", "leading_dense_block_count": "first_k_dense_replace",
          "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank", "value_length": "kv_lora_rank",
          "value_length_mla": "v_head_dim", "rope_dimension_count": "qk_rope_head_dim",
          "expert_feed_forward_length": "moe_intermediate_size", "expert_count": "n_routed_experts",
          "expert_used_count": "num_experts_per_tok", "expert_shared_count": "n_shared_experts",
          "expert_group_count": "n_group", "expert_group_used_count": "topk_group",
          "expert_weights_scale": "routed_scaling_factor"}


def _hparams(writer, c: dict) -> None:
    import gguf
    w = writer
    for method, field in FIELDS.items():
        getattr(w, "add_" + method)(c[field])
    w.add_head_count_kv(1)  # MLA decodes as one shared latent "head"
    w.add_key_length(c["kv_lora_rank"] + c["qk_rope_head_dim"])
    w.add_key_length_mla(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
    if c.get("norm_topk_prob"):
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    rope = c.get("rope_scaling") or {}
    if rope.get("type", rope.get("rope_type")) == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
        # llama.cpp's deepseek2 reads mscale_all_dim this way (0.1 · value: its log multiplier)
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])


def _vocab(writer, c: dict) -> None:
    import gguf
    # GPT-2's byte-to-character map: printable bytes are themselves, the rest shift past 255
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(sorted(set(range(256)) - set(keep)))}
    tokens = [chars[b] for b in range(256)] + [chars[32] * 2]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), c["vocab_size"])]
    types = [gguf.TokenType.NORMAL] * 257 + [gguf.TokenType.UNUSED] * (c["vocab_size"] - 257)
    for i in (c["bos_token_id"], c["eos_token_id"]):
        types[i] = gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([f"{chars[32]} {chars[32]}"])
    writer.add_bos_token_id(c["bos_token_id"])
    writer.add_eos_token_id(c["eos_token_id"])
    writer.add_add_bos_token(False)


def _tensors(folder: Path, c: dict):
    """(gguf name, tensor) of the folder's weights, renamed, split and stacked for llama.cpp."""
    import gguf
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, c["num_hidden_layers"])
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            weights.update({k: f.get_tensor(k) for k in f.keys()})
    H, nope, vdim = c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        kv_b = weights.pop(p + "self_attn.kv_b_proj.weight").view(H, nope + vdim, -1)
        weights[p + "self_attn.k_b_proj.weight"] = kv_b[:, :nope].transpose(1, 2).contiguous()  # [H, R, nope]
        weights[p + "self_attn.v_b_proj.weight"] = kv_b[:, nope:].contiguous()  # [H, vdim, R]
        if p + "mlp.gate.e_score_correction_bias" in weights:
            yield f"blk.{layer}.exp_probs_b.bias", weights.pop(p + "mlp.gate.e_score_correction_bias").float()
            for proj in ("gate_proj", "up_proj", "down_proj"):
                stack = [weights.pop(f"{p}mlp.experts.{e}.{proj}.weight") for e in range(c["n_routed_experts"])]
                weights[f"{p}mlp.experts.{proj}.weight"] = torch.stack(stack)
    for name, t in weights.items():
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ValueError(f"no GGUF name for {name}")
        yield new, t.float() if t.dim() == 1 or new.endswith("ffn_gate_inp.weight") else t.bfloat16()


def write_gguf(folder: str | Path, out: str | Path) -> Path:
    """The HF folder's bf16 weights as a BF16 GGUF file (see the module doc)."""
    import gguf
    folder, out = Path(folder), Path(out)
    c = json.loads((folder / "config.json").read_text())
    writer = gguf.GGUFWriter(str(out), "deepseek2")
    writer.add_name(folder.name)
    writer.add_file_type(FTYPES["bf16"])
    _hparams(writer, c)
    _vocab(writer, c)
    for name, t in _tensors(folder, c):
        if t.dtype == torch.bfloat16:
            writer.add_tensor(name, t.view(torch.int16).numpy(), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, t.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


@contextlib.contextmanager
def quiet():
    """llama.cpp's C-level logging (to fds 1 and 2) silenced for the block."""
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1), os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def quantize(src: str | Path, out: str | Path, ftype: str, threads: int = 2) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python): BF16 GGUF -> Q8_0 or Q4_K_M."""
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = FTYPES[ftype], threads
    with quiet():
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params)
    if failed:
        raise RuntimeError(f"llama.cpp could not quantize {src} to {ftype}")
    return Path(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder")
    ap.add_argument("out")
    ap.add_argument("--quantize", choices=["q8_0", "q4_k_m"])
    args = ap.parse_args()
    if args.quantize:
        bf16 = write_gguf(args.folder, args.out + ".bf16.tmp")
        quantize(bf16, args.out, args.quantize)
        bf16.unlink()
    else:
        write_gguf(args.folder, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
