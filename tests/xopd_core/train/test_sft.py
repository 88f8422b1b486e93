"""The supervised loss: response tokens only, averaged over tokens or over examples."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from xopd_core.errors import NonFiniteTrainingError
from xopd_core.train.sft import (
    IGNORE,
    LossTerms,
    cpu_has_bf16_units,
    micro_batches,
    response_nll,
    response_nll_terms,
    train_steps,
    weighted_by_group,
)


def test_response_nll_means_by_hand() -> None:
    """Two examples over a 2-token vocabulary with uniform logits except one confident
    position: example 0 labels 3 tokens, example 1 labels 1 token."""
    logits = torch.zeros(2, 5, 2)
    logits[1, 3] = torch.tensor([0.0, math.log(3.0)])  # p(token 1) = 3/4 at position 3
    labels = torch.full((2, 5), IGNORE)
    labels[0, 2:5] = torch.tensor([0, 1, 0])  # predicted from positions 1..3: p = 1/2 each
    labels[1, 4] = 1  # predicted from position 3: p = 3/4
    half, three_quarters = -math.log(0.5), -math.log(0.75)
    by_token = (3 * half + three_quarters) / 4
    by_example = (half + three_quarters) / 2
    assert math.isclose(float(response_nll(logits, labels)), by_token, rel_tol=1e-6)
    assert math.isclose(float(response_nll(logits, labels, "examples")), by_example, rel_tol=1e-6)


def test_unlabelled_examples_do_not_count() -> None:
    logits = torch.zeros(3, 4, 2)
    labels = torch.full((3, 4), IGNORE)
    labels[1, 2] = 0
    expected = -math.log(0.5)
    assert math.isclose(float(response_nll(logits, labels, "examples")), expected, rel_tol=1e-6)
    nothing = torch.full((3, 4), IGNORE)
    for mean_over in ("tokens", "examples"):
        assert float(response_nll(logits, nothing, mean_over)) == 0.0  # type: ignore[arg-type]


def _fit(precision: str) -> tuple[list[float], torch.Tensor, set[torch.dtype]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(8, 16), torch.nn.Linear(16, 8))
    # Learnable from the current token alone: each sequence counts up modulo 8.
    starts = torch.randint(0, 8, (32, 1), generator=torch.Generator().manual_seed(1))
    ids = (starts + torch.arange(6)) % 8
    seen: set[torch.dtype] = set()

    def loss_of(idx: list[int]) -> LossTerms:
        logits = model(ids[idx])
        seen.add(logits.dtype)
        return response_nll_terms(logits, ids[idx])

    losses = train_steps(
        list(model.parameters()),
        [6] * 32,
        loss_of,
        steps=40,
        batch_size=8,
        lr=0.05,
        warmup=0,
        seed=0,
        precision=precision,  # type: ignore[arg-type]
    )
    return losses, model[1].weight.detach().clone(), seen


def test_bf16_precision_trains_under_autocast_with_float32_weights() -> None:
    losses, weight, seen = _fit("bf16")
    assert seen == {torch.bfloat16}
    assert weight.dtype == torch.float32
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    again, weight_again, _ = _fit("bf16")
    assert again == losses and torch.equal(weight_again, weight)  # deterministic
    _, exact_weight, seen_exact = _fit("float32")
    assert seen_exact == {torch.float32}
    assert not torch.equal(exact_weight, weight)


def test_bf16_units_are_read_from_the_cpu_flags(tmp_path: Path) -> None:
    def flags(line: str) -> Path:
        path = tmp_path / f"cpuinfo{len(list(tmp_path.iterdir()))}"
        path.write_text(f"processor\t: 0\nflags\t\t: {line}\n\nprocessor\t: 1\n")
        return path

    assert cpu_has_bf16_units(flags("fpu sse avx512f amx_bf16 amx_tile")) is True
    assert cpu_has_bf16_units(flags("fpu avx512f avx512_bf16")) is True
    assert cpu_has_bf16_units(flags("fpu sse sse2 avx2 avx512f")) is False
    assert cpu_has_bf16_units(tmp_path / "absent") is None


def test_bf16_on_a_cpu_without_bf16_units_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import xopd_core.train.sft as sft

    monkeypatch.setattr(sft, "cpu_has_bf16_units", lambda: False)
    with caplog.at_level("WARNING", logger="xopd_core.train.sft"):
        _fit("bf16")
    assert "without AMX or AVX512-BF16" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="xopd_core.train.sft"):
        _fit("float32")
    assert caplog.text == ""


def test_micro_batches_cover_the_batch_in_length_order() -> None:
    lengths = [5, 1, 9, 3, 7, 2, 8]
    parts = micro_batches([0, 2, 4, 6, 1, 3], lengths, 4)
    assert parts == [[1, 3, 0, 4], [6, 2]]
    assert micro_batches([0, 2, 4], lengths, None) == [[0, 2, 4]]
    assert micro_batches([0, 2, 4], lengths, 8) == [[0, 2, 4]]


@pytest.mark.parametrize("mean_over", ["tokens", "examples"])
def test_micro_batches_take_the_one_pass_step(mean_over: str) -> None:
    """A batch run in parts of 3 (whose labelled-token counts differ) takes the step one pass
    over the batch takes, to float rounding; dividing each part by its own count would not."""
    starts = torch.randint(0, 8, (24, 1), generator=torch.Generator().manual_seed(2))
    ids = (starts + torch.arange(7)) % 8
    lengths = [2 + i % 6 for i in range(24)]
    labels = ids.clone()
    for i, n in enumerate(lengths):
        labels[i, n:] = IGNORE

    def fit(size: int | None, per_part_mean: bool = False) -> tuple[list[float], torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(8, 16), torch.nn.Linear(16, 8))

        def loss_of(idx: list[int]) -> LossTerms:
            terms = response_nll_terms(model(ids[idx]), labels[idx], mean_over)  # type: ignore[arg-type]
            if per_part_mean:  # the classic accumulation bug: each part its own mean
                return LossTerms(terms.total / terms.count, 1.0)
            return terms

        losses = train_steps(
            list(model.parameters()),
            lengths,
            loss_of,
            steps=6,
            batch_size=8,
            lr=0.05,
            warmup=0,
            seed=0,
            micro_batch_size=size,
        )
        return losses, model[1].weight.detach().clone()

    whole, whole_w = fit(None)
    parts, parts_w = fit(3)
    assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(whole, parts, strict=True))
    assert torch.allclose(whole_w, parts_w, atol=1e-5)
    _, wrong_w = fit(3, per_part_mean=True)
    assert (wrong_w - whole_w).abs().max() > 1e-3


def test_weighted_by_group_gives_each_group_its_share() -> None:
    groups = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    picked = weighted_by_group(groups, {"a": 1.0, "b": 1.0, "c": 2.0}, seed=0)
    assert len(picked) == len(groups)
    got = Counter(groups[i] for i in picked)
    assert got == {"a": 25, "b": 25, "c": 50}
    # A share below the group's size is a subset without repeats; above it, every example
    # comes before any comes twice (c: 10 examples, 50 draws -> each exactly 5 times).
    a_picks = [i for i in picked if groups[i] == "a"]
    assert len(set(a_picks)) == 25
    assert Counter(i for i in picked if groups[i] == "c") == {i: 5 for i in range(90, 100)}
    assert weighted_by_group(groups, {"a": 1.0, "b": 1.0, "c": 2.0}, seed=0) == picked
    assert weighted_by_group(groups, {"a": 1.0, "b": 1.0, "c": 2.0}, seed=1) != picked


def test_weighted_by_group_names_missing_and_unknown_groups() -> None:
    with pytest.raises(ValueError, match=r"no weight for group\(s\) \['c'\]"):
        weighted_by_group(["a", "b", "c"], {"a": 1.0, "b": 1.0}, seed=0)
    with pytest.raises(ValueError, match=r"\['d'\] that no example has"):
        weighted_by_group(["a", "b"], {"a": 1.0, "b": 1.0, "d": 1.0}, seed=0)
    with pytest.raises(ValueError, match="must be positive"):
        weighted_by_group(["a", "b"], {"a": 1.0, "b": 0.0}, seed=0)


def test_a_non_finite_loss_stops_supervised_training_before_the_update() -> None:
    """The teacher and student stages train through `train_steps`: a NaN (here in the data's
    logits from step 3 on) stops them naming the step, with the weights of step 2."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(8, 16), torch.nn.Linear(16, 8))
    ids = torch.arange(6).repeat(8, 1) % 8
    calls: list[int] = []
    kept: dict[str, torch.Tensor] = {}

    def loss_of(idx: list[int]) -> LossTerms:
        calls.append(1)
        logits = model(ids[idx])
        if len(calls) > 2:
            logits = logits * float("nan")
        return response_nll_terms(logits, ids[idx])

    def snapshot(step: int, loss: float) -> None:
        kept.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    with pytest.raises(NonFiniteTrainingError, match=r"^step 3: non-finite loss \(nan\)"):
        train_steps(list(model.parameters()), [6] * 8, loss_of, steps=5, batch_size=8,
                    lr=0.05, warmup=0, seed=0, on_step=snapshot)  # fmt: skip
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
