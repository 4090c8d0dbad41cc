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


def test_memory_refresh_clusters_every_class_into_its_own_prototype():
    """A rare class (10 lesion voxels among 2000) still gets a prototype whose value is the mean
    of its voxels; every key space gets its own rows, slots numbered on."""
    from fedseg.training.mixmfl_trainer import prototype_batch

    rng = np.random.default_rng(0)
    classes = np.array([0] * 2000 + [1] * 10)
    values = np.where(classes[:, None] == 1, [0.0, 5.0], [3.0, 0.0]) + rng.normal(0, 0.01, (2010, 2))
    shared_keys = np.where(classes[:, None] == 1, [1.0, 1.0], [-1.0, 1.0]) + rng.normal(0, 0.01, (2010, 2))
    other_keys = -shared_keys
    rows = prototype_batch([(SHARED_KEY, shared_keys), (tailored_key(2), other_keys)], values, classes, 2,
                           np.random.default_rng(1), round_index=3, site_number=4)
    assert rows.shape == (4, 4 + 2 * 2)
    assert rows[:, 0].tolist() == [3] * 4 and rows[:, 1].tolist() == [4] * 4 and rows[:, 2].tolist() == [0, 1, 2, 3]
    assert rows[:, 3].tolist() == [SHARED_KEY] * 2 + [tailored_key(2)] * 2
    lesion_value = values[classes == 1].mean(0)
    for source in (SHARED_KEY, tailored_key(2)):
        mine = rows[rows[:, 3] == source]
        found = [r for r in mine if np.allclose(r[6:], lesion_value, atol=1e-6)]
        assert len(found) == 1, mine[:, 6:]
        keys = shared_keys if source == SHARED_KEY else other_keys
        np.testing.assert_allclose(found[0][4:6], keys[classes == 1].mean(0), atol=1e-6)
        background = [r for r in mine if np.allclose(r[6:], [3.0, 0.0], atol=0.01)]
        assert len(background) == 1


def _tiny_net(present, seed=0):
    torch.manual_seed(seed)
    return MixMFLNet(SPEC, 3, SEQS, 2, present=present)


def test_decoupling_losses_are_finite_switchable_and_reach_the_right_encoders():
    from fedseg.training.mixmfl_trainer import decoupling_losses

    net = _tiny_net([0, 2])
    x = torch.randn(2, 4, 16, 16, 16)
    _, aux = net(x, return_aux=True)
    cls, triplet = decoupling_losses(net, aux, classifier=True, triplet=True, margin=1.0)
    assert torch.isfinite(cls) and torch.isfinite(triplet)
    assert 0.5 < cls.item() < 3.0          # 4-way cross-entropy at initialisation, near ln 4
    off = decoupling_losses(net, aux, classifier=False, triplet=False, margin=1.0)
    assert off[0].item() == 0.0 and off[1].item() == 0.0
    # the classifier loss reaches both kinds of encoder; the triplet loss the shared one (its
    # anchors) and the tailored ones (through the negatives' fusion)
    for loss in (cls, triplet):
        grads = torch.autograd.grad(loss, [net.shared.stages[-1].convs[0].conv.weight,
                                           net.tailored["T2"].stages[-1].convs[0].conv.weight], retain_graph=True)
        assert all(g.abs().sum() > 0 for g in grads)


def test_entropy_of_pre_norm_features_follows_their_scale():
    """The triplet loss sees pre-norm bottlenecks: scaling the shared encoder's last
    convolution moves their entropy by log(scale) per channel (after the norm it could not)."""
    from fedseg.training.mixmfl_network import entropy_profile

    net = _tiny_net([0, 1])
    x = torch.randn(1, 4, 16, 16, 16)
    with torch.no_grad():
        _, before = net(x, return_aux=True)
        net.shared.stages[-1].convs[-1].conv.weight.mul_(3.0)
        net.shared.stages[-1].convs[-1].conv.bias.mul_(3.0)
        _, after = net(x, return_aux=True)
    shift = entropy_profile(after["shared_raw"][0]) - entropy_profile(before["shared_raw"][0])
    torch.testing.assert_close(shift, torch.full_like(shift, float(np.log(3.0))), atol=1e-3, rtol=0)
    # the normalised features the decoder sees are unchanged
    torch.testing.assert_close(after["shared"][0], before["shared"][0], atol=1e-4, rtol=1e-4)


def test_modality_classifier_learns_tailored_features_and_not_shared_ones():
    """Two sequences with different textures: a few steps of the decoupling loss teach the
    classifier to tell the tailored representations apart (accuracy well above chance), while
    the gradient reversal keeps it from telling the shared ones apart (without the reversal
    it does: accuracy 1.0 on both)."""
    from fedseg.training.mixmfl_trainer import decoupling_losses

    net = _tiny_net([0, 1], seed=1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)

    def batch(n=4):
        smooth = torch.nn.functional.avg_pool3d(torch.randn(n, 1, 16, 16, 16, generator=gen), 5, 1, 2) * 4
        rough = torch.randn(n, 1, 16, 16, 16, generator=gen)
        return torch.cat([smooth, rough, torch.zeros(n, 2, 16, 16, 16)], dim=1)

    for _ in range(20):
        _, aux = net(batch(2), return_aux=True)
        cls, _ = decoupling_losses(net, aux, classifier=True, triplet=False, margin=1.0)
        opt.zero_grad()
        cls.backward()
        opt.step()
    with torch.no_grad():
        _, aux = net(batch(12), return_aux=True)
        def accuracy(kind):
            preds = [net.classify(aux[kind][m]).argmax(1) for m in (0, 1)]
            return float(torch.cat([(p == m).float() for p, m in zip(preds, (0, 1))]).mean())
        tailored, shared = accuracy("tailored_raw"), accuracy("shared_raw")
    assert tailored >= 0.9, tailored
    assert shared <= 0.6, shared       # no better than chance (0.5): reversal, not learning
