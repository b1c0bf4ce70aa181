import pytest
import torch

from llamarun.errors import RequestError
from llamarun.sampling import SamplingParams, apply_penalties, logits_to_probs, sample


def test_greedy_variants_give_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    g = torch.Generator().manual_seed(1)
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), best)
    assert torch.equal(sample(logits, SamplingParams(top_k=1)), best)
    assert torch.equal(sample(logits, SamplingParams(top_p=1e-6), g), best)
    assert torch.equal(sample(logits, SamplingParams(min_p=1.0), g), best)


def test_top_k_with_ties_keeps_exactly_k():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0]])
    probs = logits_to_probs(logits, SamplingParams(top_k=3))
    assert (probs > 0).sum().item() == 3
    assert probs[0, 4] == 0 and probs[0, 0] == 0


def test_same_seed_same_tokens():
    logits = torch.randn(1, 100)
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = [sample(logits, SamplingParams(), g1).item() for _ in range(20)]
    b = [sample(logits, SamplingParams(), g2).item() for _ in range(20)]
    assert a == b


def test_frequencies_follow_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log().expand(10000, 4)
    ids = sample(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=4).float() / 10000
    torch.testing.assert_close(freq, probs, atol=0.02, rtol=0)


def test_top_p_keeps_smallest_set_reaching_mass():
    probs = logits_to_probs(torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log(), SamplingParams(top_p=0.6))
    assert (probs[0] > 0).tolist() == [True, True, False, False]


def test_repetition_and_frequency_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0])
    seen = torch.tensor([0, 1])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), seen, None)
    assert out.tolist() == [1.0, -4.0, 1.0]
    out = apply_penalties(
        logits,
        SamplingParams(frequency_penalty=0.5, presence_penalty=1.0),
        None,
        torch.tensor([2, 2]),
    )
    assert out.tolist() == [2.0, -2.0, -1.0]


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 2}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_new_tokens": -1}, "max_new_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"presence_penalty": 3}, "presence_penalty"),
    ],
)
def test_out_of_range_values_name_the_parameter(kwargs, param):
    with pytest.raises(RequestError, match=param) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
