"""Checkpoint folders: only whole safetensors load, and no save writes non-finite weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from xopd_core.errors import CheckpointError
from xopd_core.models.checkpoint import (
    INDEX,
    load_causal_lm,
    require_finite_weights,
    require_safetensors_checkpoint,
    save_checkpoint,
    weights_blob,
    weights_sha256,
)


def tiny_lm() -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    return Qwen2ForCausalLM(config).eval()


def test_a_save_refuses_non_finite_weights_and_keeps_the_previous_checkpoint(
    tmp_path: Path,
) -> None:
    model = tiny_lm()
    out = tmp_path / "ckpt"
    good = save_checkpoint(model, out, savers=[], resolved_config={})
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"ckpt/model\.safetensors: 1 weight tensor"):
        save_checkpoint(model, out, savers=[], resolved_config={})
    assert weights_sha256(out) == good
    assert json.loads((out / "xopd.json").read_text())["weights_sha256"] == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left


def test_only_a_whole_safetensors_checkpoint_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    save_checkpoint(tiny_lm(), out, savers=[], resolved_config={})
    weights = out / "model.safetensors"
    assert require_safetensors_checkpoint(out) == [weights]
    require_finite_weights(out)
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-10])
    with pytest.raises(CheckpointError, match=rf"^{weights}: truncated or padded"):
        weights_sha256(out)
    weights.write_bytes(whole[:5])
    with pytest.raises(CheckpointError, match=rf"^{weights}: not a readable safetensors"):
        require_safetensors_checkpoint(out)
    torch.save({"w": torch.zeros(2)}, out / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match=r"no safetensors weights \(it holds pytorch_model"):
        require_safetensors_checkpoint(out)
    with pytest.raises(CheckpointError, match=r"nowhere: checkpoint folder not found"):
        require_safetensors_checkpoint(tmp_path / "nowhere")


def test_non_finite_weights_on_disk_are_found(tmp_path: Path) -> None:
    tmp_path.joinpath("m").mkdir()
    save_file({"a": torch.ones(2), "b": torch.tensor([1.0, -float("inf")])},
              str(tmp_path / "m" / "model.safetensors"))  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"1 weight tensor\(s\) hold NaN or infinity \(e\.g\. b\)"
    ):
        require_finite_weights(tmp_path / "m")


def test_a_sharded_checkpoint_is_checked_shard_by_shard_and_hashes_as_one_file(
    tmp_path: Path,
) -> None:
    """Real models arrive sharded (`model.safetensors.index.json` + shards): accepted, each
    shard checked whole, and the weights hash equals the single-file save of the same model."""
    model = tiny_lm()
    single = tmp_path / "single"
    save_checkpoint(model, single, savers=[], resolved_config={})
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="1KB")
    files = require_safetensors_checkpoint(sharded)
    assert len(files) > 1 and {f.parent for f in files} == {sharded}
    assert weights_sha256(sharded) == weights_sha256(single)
    require_finite_weights(sharded)
    assert isinstance(load_causal_lm(sharded), Qwen2ForCausalLM)
    index = sharded / INDEX
    mapping = json.loads(index.read_text())
    files[-1].write_bytes(files[-1].read_bytes()[:-4])
    with pytest.raises(CheckpointError, match=rf"^{files[-1]}: truncated or padded"):
        weights_sha256(sharded)
    files[-1].unlink()
    with pytest.raises(CheckpointError, match=rf"^{files[-1]}: a shard .* lists is missing"):
        require_safetensors_checkpoint(sharded)
    name = next(iter(mapping["weight_map"]))
    mapping["weight_map"][name] = "../outside.safetensors"
    index.write_text(json.dumps(mapping))
    with pytest.raises(CheckpointError, match=r"shard '\.\./outside\.safetensors' is not a"):
        require_safetensors_checkpoint(sharded)
    index.write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"^{index}: not a readable safetensors index"):
        require_safetensors_checkpoint(sharded)


def test_every_rank_makes_the_weights_save_checkpoint_writes(tiny_student, tmp_path: Path) -> None:
    """`weights_blob` (what a vLLM engine's sync sends) holds the tensors `save_checkpoint`
    writes, names included (Qwen2-Audio's, where transformers renames at load and drops the
    tied head), on rank 1 of a torch.distributed group too, where save_pretrained writes
    nothing; non-finite weights are refused."""
    from safetensors.torch import load

    from xopd_core.distributed import run_ranks
    from xopd_core.models.families import load_student

    model, _ = load_student(tiny_student.summary.checkpoint)
    save_checkpoint(model, tmp_path / "whole", savers=[], resolved_config={})
    want = load_file(str(tmp_path / "whole" / "model.safetensors"))

    def each(rank: int, ranks: int) -> None:
        (tmp_path / f"rank{rank}").write_bytes(weights_blob(model))

    run_ranks(each, 2)
    for rank in (0, 1):
        got = load((tmp_path / f"rank{rank}").read_bytes())
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    model.get_input_embeddings().weight.data[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="the weights to send: 1 weight tensor"):
        weights_blob(model)
