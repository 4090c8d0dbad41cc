"""MDM-MixMFL network pieces: shapes with sequence subsets, gradient reversal, triplet loss,
memory retrieval and the FIFO prototype memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.planning.plans import NetworkSpec
from fedseg.training.mixmfl_network import (
    MixMFLNet,
    entropy_triplet_loss,
    grad_reverse,
    retrieve,
)
from fedseg.training.prototype_memory import (
    SHARED_KEY,
    empty_memory,
    fifo_merge,
    filled_rows,
    kmeans,
    prototype_rows,
    push,
    tailored_key,
)

SEQS = ["T1", "T1ce", "T2", "FLAIR"]
SPEC = NetworkSpec(
    n_stages=3,
    features_per_stage=[8, 16, 32],
    kernel_sizes=[[3, 3, 3]] * 3,
    strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
    n_conv_per_stage=[1, 1, 1],
    n_conv_per_stage_decoder=[1, 1],
)


@pytest.mark.parametrize("present", [[0], [0, 1], [2, 3], [1, 3], [0, 1, 2, 3]])
def test_network_output_shapes_for_any_subset_of_sequences(present):
    torch.manual_seed(0)
    net = MixMFLNet(SPEC, 3, SEQS, n_classes=3, present=present, memory_size=10)
    x = torch.randn(2, 4, 16, 16, 16)
    outputs, aux = net(x, return_aux=True)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    assert sorted(aux["tailored"]) == present and sorted(aux["shared"]) == present
    assert aux["shared_mean"].shape == (2, net.feature_dim, 4, 4, 4)
    net.deep_supervision = False
    assert net(x).shape == (2, 3, 16, 16, 16)


def test_absent_sequences_are_ignored_and_state_is_the_same_for_every_site():
    torch.manual_seed(0)
    a = MixMFLNet(SPEC, 3, SEQS, 3, present=[0, 1], memory_size=10)
    b = MixMFLNet(SPEC, 3, SEQS, 3, present=[2, 3], memory_size=10)
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    a.eval()
    x = torch.randn(1, 4, 16, 16, 16)
    y = x.clone()
    y[:, 2:] = torch.randn(1, 2, 16, 16, 16)   # change only sequences site a does not hold
    with torch.no_grad():
        assert torch.equal(a(x)[0], a(y)[0])


def test_missing_sequences_are_filled_from_the_memory_of_every_stage():
    torch.manual_seed(0)
    net = MixMFLNet(SPEC, 3, SEQS, 3, present=[0, 1], memory_size=10)
    net.eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        empty = net(x)[0]
        assert set(net.state_dict()) >= {f"memory.{k}.{s}" for k in SEQS for s in range(3)}
        for s in range(net.n_stages):
            width = net.memory_of(2, s).shape[1]
            d = (width - 4) // 2
            rows = prototype_rows(np.random.default_rng(s).normal(size=(4, d)), np.full((4, d), 5.0), 1, 1)
            net.set_memory(2, s, torch.from_numpy(push(empty_memory(10, d), rows)))
            # a filled memory changes the output through this stage's slot of the missing T2
            filled = net(x)[0]
            assert not torch.allclose(filled, empty)
            empty = filled
        _, aux = net(x, return_aux=True)
        assert sorted(aux["retrieved"]) == [2, 3]                    # both missing sequences retrieved
        assert torch.allclose(aux["retrieved"][2], torch.full_like(aux["retrieved"][2], 5.0))
        assert not aux["retrieved"][3].any()                          # FLAIR's memory is still empty
        net.use_memory = False
        assert not torch.allclose(net(x)[0], empty)                   # the switch turns retrieval off


@pytest.mark.parametrize("memory_query, uses_shared_rows", [("tailored", False), ("shared", True), ("both", True)])
def test_memory_query_chooses_the_key_spaces(memory_query, uses_shared_rows):
    torch.manual_seed(0)
    net = MixMFLNet(SPEC, 3, SEQS, 3, present=[2, 3], memory_size=10, memory_query=memory_query)
    net.eval()
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        empty = net(x)[0]
        for s in range(net.n_stages):
            d = (net.memory_of(0, s).shape[1] - 4) // 2
            rows = prototype_rows(np.ones((2, d)), np.full((2, d), 3.0), 1, 1, key_source=SHARED_KEY)
            net.set_memory(0, s, torch.from_numpy(push(empty_memory(10, d), rows)))
        assert torch.allclose(net(x)[0], empty) != uses_shared_rows
    with pytest.raises(ValueError, match="memory_query"):
        MixMFLNet(SPEC, 3, SEQS, 3, present=[2, 3], memory_query="nearest")


def test_gradient_reversal_flips_the_gradient():
    x = torch.randn(5, requires_grad=True)
    (grad_reverse(x, 1.0) * torch.arange(5.0)).sum().backward()
    assert torch.allclose(x.grad, -torch.arange(5.0))
    x.grad = None
    (grad_reverse(x, 0.5) ** 2).sum().backward()
    assert torch.allclose(x.grad, -0.5 * 2 * x.detach())
    assert torch.equal(grad_reverse(x), x)   # identity forward


def test_entropy_triplet_loss_orders_positives_before_negatives():
    torch.manual_seed(0)
    anchor = torch.randn(2, 4, 3, 3, 3)
    close = anchor * 1.01                          # almost the same spread per channel
    far = anchor * 10.0                            # entropy differs by log(10) per channel
    assert entropy_triplet_loss([anchor], [close], [far], margin=1.0).item() == 0.0
    # swapped roles: the positive is far, the negative close -> penalised by about log(10)
    swapped = entropy_triplet_loss([anchor], [far], [close], margin=1.0).item()
    assert swapped == pytest.approx(np.log(10) - np.log(1.01) + 1.0, rel=1e-3)
    # it has gradients for the encoders that produced the representations
    a = anchor.clone().requires_grad_(True)
    entropy_triplet_loss([a], [a * 3], [a * 1.1], margin=1.0).backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_retrieval_picks_the_prototype_with_the_most_similar_key():
    d = 4
    rows = prototype_rows(np.eye(2, d) * 3, np.array([[1.0, 0, 0, 0], [0, 0, 0, 5.0]]), round_index=1, site_number=1)
    memory = torch.from_numpy(push(empty_memory(5, d), rows))
    query = torch.zeros(1, d, 1, 1, 2)
    query[0, 0, 0, 0, 0] = 1.0    # voxel 0 looks like key 0
    query[0, 1, 0, 0, 1] = 2.0    # voxel 1 looks like key 1
    out = retrieve(memory, {SHARED_KEY: query}, temperature=0.01)
    assert torch.allclose(out[0, :, 0, 0, 0], torch.tensor([1.0, 0, 0, 0]), atol=1e-4)
    assert torch.allclose(out[0, :, 0, 0, 1], torch.tensor([0, 0, 0, 5.0]), atol=1e-4)
    assert torch.equal(retrieve(torch.zeros(5, 4 + 2 * d), {SHARED_KEY: query}), torch.zeros_like(query))   # empty memory


def test_retrieval_compares_each_query_with_keys_of_its_own_space():
    # Two prototypes with the same key vector, one keyed in the shared space, one in the
    # tailored space of sequence 1: which one a voxel retrieves depends on which space the
    # matching query comes from, and a site that cannot produce a space never sees its rows.
    d = 3
    key = np.array([[1.0, 0, 0]])
    rows = np.concatenate([
        prototype_rows(key, np.array([[7.0, 7, 7]]), 1, 1, key_source=SHARED_KEY, first_slot=0),
        prototype_rows(key, np.array([[-2.0, -2, -2]]), 1, 1, key_source=tailored_key(1), first_slot=1),
    ])
    memory = torch.from_numpy(push(empty_memory(4, d), rows))
    along, across = torch.zeros(1, d, 1, 1, 1), torch.zeros(1, d, 1, 1, 1)
    along[0, 0] = 1.0     # parallel to the key
    across[0, 1] = 1.0    # orthogonal to it
    only_shared = retrieve(memory, {SHARED_KEY: along}, temperature=0.01)
    assert torch.allclose(only_shared.flatten(), torch.full((d,), 7.0))
    both = retrieve(memory, {SHARED_KEY: across, tailored_key(1): along}, temperature=0.01)
    assert torch.allclose(both.flatten(), torch.full((d,), -2.0), atol=1e-3)
    assert torch.equal(retrieve(memory, {tailored_key(2): along}), torch.zeros_like(along))   # no such keys
    assert [r[3] for r in filled_rows(memory.numpy())] == [SHARED_KEY, tailored_key(1)]


def test_memory_fifo_merge_is_deterministic_deduplicated_and_truncated():
    d, capacity = 2, 5
    old = push(empty_memory(capacity, d), prototype_rows(np.ones((2, d)), np.ones((2, d)), 1, 1))
    site_a = push(old, prototype_rows(np.full((2, d), 2.0), np.full((2, d), 2.0), 2, 1))
    site_b = push(old, prototype_rows(np.full((3, d), 3.0), np.full((3, d), 3.0), 2, 2))
    site_c = old.copy()                       # a site that holds no such sequence sends it back unchanged
    merged = fifo_merge([site_a, site_b, site_c])
    assert merged.shape == (capacity, 4 + 2 * d)
    assert np.array_equal(fifo_merge([site_c, site_b, site_a]), merged)      # order-free
    rows = filled_rows(merged)
    # 2 old + 2 + 3 new = 7 distinct prototypes: the 5 newest kept, oldest first
    assert [tuple(r[:3]) for r in rows] == [(2, 1, 0), (2, 1, 1), (2, 2, 0), (2, 2, 1), (2, 2, 2)]
    assert np.all(rows[:2, 4:] == 2.0) and np.all(rows[2:, 4:] == 3.0)
    # with room to spare, nothing is dropped and the shared old rows count once
    assert len(filled_rows(fifo_merge([site_a, site_b, site_c], capacity=10))) == 7


def test_kmeans_separates_clear_clusters_deterministically():
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0, 0.1, (30, 2)), rng.normal(5, 0.1, (20, 2))])
    labels = kmeans(points, 2, np.random.default_rng(1))
    assert len(set(labels[:30])) == 1 and len(set(labels[30:])) == 1 and labels[0] != labels[-1]
    assert np.array_equal(labels, kmeans(points, 2, np.random.default_rng(1)))
    assert len(set(kmeans(points[:3], 10, np.random.default_rng(0)))) <= 3


def test_loss_terms_line_reports_each_terms_mean_and_weight():
    from types import SimpleNamespace

    from fedseg.training.mixmfl_trainer import MixMFLTrainer

    trainer = SimpleNamespace(term_sums={"seg": 1.0, "cls": 2.6, "triplet": 2.0}, term_steps=2, lambda_cls=0.5, lambda_triplet=1e-4)
    line = MixMFLTrainer.loss_terms_line(trainer, 3)
    assert line == "round 3: mean loss terms: segmentation 0.5000, classifier 1.3000 x λ1=0.5, triplet 1.0000 x λ2=0.0001"
    assert MixMFLTrainer.loss_terms_line(SimpleNamespace(term_steps=0), 3) is None
