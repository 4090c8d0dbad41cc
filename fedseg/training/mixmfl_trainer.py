"""MDM-MixMFL's local training: segmentation loss + decoupling losses, and memory refreshing.

Loss (paper eq. 3): L = L_seg + λ1·L_cls + λ2·L_triplet, with L_seg the plan's loss
(nnU-Net's Dice + CE with deep supervision), λ1 = 0.5, λ2 = 1e-4 by default.

- L_cls: cross-entropy of the modality classifier on the pre-norm bottleneck representation
  of every present sequence (its per-channel mean and entropy, see
  mixmfl_network.modality_statistics): tailored ones as they are, shared ones through a
  gradient-reversal layer, both labelled with their sequence. The classifier learns to tell
  sequences apart; the tailored encoders are pushed to be modality-specific, the shared
  encoder (reversed gradient) to be modality-invariant.
- L_triplet: the entropy triplet loss (mixmfl_network.entropy_triplet_loss) on pre-norm
  representations, where variance and so entropy can move: anchors = the shared ones,
  positives = fusion(shared_i, shared_j), negatives = fusion(shared_i, tailored_j), over all
  present i, j (fusion inputs are the normalised bottlenecks the decoder also sees).
- Memory: at the end of a round the site runs its training cases through the network,
  takes at every encoder stage the features of each present sequence m at class-balanced
  voxels (value: m's tailored features; key: the shared mean, and in a second batch of
  prototypes the tailored features of each other sequence the site holds), clusters
  [key, value] with k-means and pushes the centres into m's memory of that stage (FIFO);
  the coordinator merges all sites' memories. Switches `classifier`, `triplet`, `memory` turn the pieces off.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from fedseg.training.device import autocast, float32_outputs
from fedseg.training.mixmfl_network import MixMFLNet, entropy_triplet_loss, grad_reverse
from fedseg.training.prototype_memory import SHARED_KEY, kmeans, prototype_rows, push, tailored_key
from fedseg.training.recipes.params import MixMFLParams
from fedseg.training.round_loop import derived_seed
from fedseg.training.trainer import SiteTrainer
from fedseg.typed_params import parse_params

# Voxels per class (background, each label) fed to k-means per sequence: class-balanced so
# that the rare lesion voxels get prototypes of their own instead of being swamped by tissue.
VOXELS_PER_CLASS = 256


def decoupling_losses(net: MixMFLNet, aux: dict, classifier: bool, triplet: bool, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_cls, L_triplet) of one forward pass's `aux` (a term switched off is 0)."""
    present = net.present
    zero = aux["shared_mean"].new_zeros(())
    cls_loss, triplet_loss = zero, zero
    if classifier:
        raws, labels = [], []
        for m in present:
            batch = aux["tailored_raw"][m].shape[0]
            raws += [aux["tailored_raw"][m], grad_reverse(aux["shared_raw"][m])]
            labels += [m] * (2 * batch)
        logits = net.classify(torch.cat(raws))
        cls_loss = F.cross_entropy(logits, torch.tensor(labels, device=logits.device))
    if triplet:
        anchors = [aux["shared_raw"][m] for m in present]
        shared = [aux["shared"][m] for m in present]
        tailored = [aux["tailored"][m] for m in present]
        positives = [net.fuse_pair(a, b) for a in shared for b in shared]
        negatives = [net.fuse_pair(a, t) for a in shared for t in tailored]
        triplet_loss = entropy_triplet_loss(anchors, positives, negatives, margin)
    return cls_loss, triplet_loss


class MixMFLTrainer(SiteTrainer):
    """SiteTrainer with the decoupling losses and the end-of-round memory refresh."""

    def __init__(self, plans, site, network, **kwargs) -> None:
        super().__init__(plans, site, network, **kwargs)
        if not isinstance(network, MixMFLNet):
            raise TypeError("MixMFLTrainer trains a MixMFLNet")
        self.params = parse_params(MixMFLParams, plans.strategy.params)
        self.lambda_cls = float(self.params.lambda_cls) if self.params.classifier else 0.0
        self.lambda_triplet = float(self.params.lambda_triplet) if self.params.triplet else 0.0
        self.site_number = sorted(plans.sites).index(site) + 1
        self.last_terms: dict[str, float] = {}
        # Sums of each loss term over the round's steps: logged at the end of the round so a
        # user tuning λ1 / λ2 sees how large each weighted term is next to the segmentation loss.
        self.term_sums: dict[str, float] = {}
        self.term_steps = 0

    # -- losses --------------------------------------------------------------------------
    def decoupling_losses(self, aux: dict) -> tuple[torch.Tensor, torch.Tensor]:
        return decoupling_losses(self.network, aux, self.lambda_cls > 0, self.lambda_triplet > 0,
                                 float(self.params.triplet_margin))

    def train_step(self, batch: dict) -> float:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else target.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        # bfloat16 (--precision bf16) for the network only: every loss term in float32. The
        # default keeps this recipe in float32 on every device, as it always trained.
        with autocast(self.device, "bf16" if self.precision == "bf16" else "fp32"):
            outputs, aux = self.network(data, return_aux=True)
        outputs, aux = float32_outputs((outputs, aux))
        seg_loss = self.compute_loss(outputs, target)
        cls_loss, triplet_loss = self.decoupling_losses(aux)
        loss = seg_loss + self.lambda_cls * cls_loss + self.lambda_triplet * triplet_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
        self.optimizer.step()
        self.last_terms = {"seg": float(seg_loss.detach()), "cls": float(cls_loss.detach()),
                           "triplet": float(triplet_loss.detach())}
        for name, value in self.last_terms.items():
            self.term_sums[name] = self.term_sums.get(name, 0.0) + value
        self.term_steps += 1
        return float(loss.detach().cpu())

    def on_round_start(self, round_index: int) -> None:
        super().on_round_start(round_index)
        self.term_sums, self.term_steps = {}, 0

    def loss_terms_line(self, round_index: int) -> str | None:
        """'round r: mean loss terms ...': each term's mean over the round's steps (since a resume), with its weight."""
        if not self.term_steps:
            return None
        mean = {name: total / self.term_steps for name, total in self.term_sums.items()}
        return (f"round {round_index}: mean loss terms: segmentation {mean['seg']:.4f}, "
                f"classifier {mean['cls']:.4f} x λ1={self.lambda_cls:g}, "
                f"triplet {mean['triplet']:.4f} x λ2={self.lambda_triplet:g}")

    # -- memory --------------------------------------------------------------------------
    def on_round_end(self, round_index: int) -> None:
        line = self.loss_terms_line(round_index)
        if line is not None:
            self.log(line)
        if not self.params.memory or not self.train_cases:
            return
        net: MixMFLNet = self.network
        rng = np.random.default_rng(derived_seed(self.plans.seed, self.site, round_index, "prototypes"))
        for stage, (shared, tailored, classes) in enumerate(self.stage_features()):
            for m in net.present:
                # keys in the shared space, and in the tailored space of each other sequence
                # held here (what a site holding that sequence but not m will query with)
                key_spaces = [(SHARED_KEY, shared)] + [(tailored_key(q), tailored[q]) for q in net.present if q != m]
                rows = prototype_batch(key_spaces, tailored[m], classes, int(self.params.prototypes), rng,
                                       round_index, self.site_number)
                memory = net.memory_of(m, stage)
                updated = push(memory.detach().cpu().numpy(), rows)
                net.set_memory(m, stage, torch.from_numpy(updated).to(memory.device, memory.dtype))
        self.log(f"round {round_index}: pushed prototypes of {len(net.present)} sequence(s) x {net.n_stages} stage(s) to the memory")

    @torch.no_grad()
    def stage_features(self) -> list[tuple[np.ndarray, dict[int, np.ndarray], np.ndarray]]:
        """Per encoder stage: (shared keys (N, D), tailored values per present sequence (N, D), class per voxel (N,))."""
        net: MixMFLNet = self.network
        was_training = net.training
        net.eval()
        n = net.n_stages
        keys: list[list[np.ndarray]] = [[] for _ in range(n)]
        values: list[dict[int, list[np.ndarray]]] = [{m: [] for m in net.present} for _ in range(n)]
        classes: list[list[np.ndarray]] = [[] for _ in range(n)]
        patch = list(self.config.patch_size)
        try:
            for case in self.train_cases:
                data, seg = _centre_patch(case.data, patch), _centre_patch(np.maximum(case.seg, 0).astype(np.float32), patch)
                _, aux = net(torch.from_numpy(data)[None].to(self.device), return_aux=True)
                for s in range(n):
                    query = aux["stage_shared_mean"][s]
                    small = F.interpolate(torch.from_numpy(seg)[None], size=tuple(query.shape[2:]), mode="nearest")[0, 0]
                    keys[s].append(query[0].flatten(1).T.cpu().numpy())
                    for m in net.present:
                        values[s][m].append(aux["stage_tailored"][m][s][0].flatten(1).T.cpu().numpy())
                    classes[s].append(small.flatten().numpy().astype(np.int64))
        finally:
            net.train(was_training)
        return [(np.concatenate(keys[s]), {m: np.concatenate(v) for m, v in values[s].items()}, np.concatenate(classes[s]))
                for s in range(n)]


def prototype_batch(
    key_spaces: list[tuple[int, np.ndarray]], values: np.ndarray, classes: np.ndarray, prototypes: int,
    rng: np.random.Generator, round_index: int, site_number: int,
) -> np.ndarray:
    """Memory rows one site writes for one sequence and stage in one round.

    values: the sequence's tailored features (N, D) at N voxels of class `classes` (N,);
    key_spaces: [(key source, keys (N, D) at the same voxels)]. Per key space: up to
    VOXELS_PER_CLASS voxels of every class, k-means (at most `prototypes` clusters) on the
    unit-normalised [key, value] pairs, one row per cluster holding the mean key and the mean
    value; slots are numbered on across the key spaces.
    """
    batches, slot = [], 0
    for source, keys in key_spaces:
        chosen = _balanced(classes, VOXELS_PER_CLASS, rng)
        k, v = keys[chosen], values[chosen]
        labels = kmeans(np.concatenate([_unit(k), _unit(v)], axis=1), prototypes, rng)
        clusters = np.unique(labels)
        centres_k = np.stack([k[labels == c].mean(0) for c in clusters])
        centres_v = np.stack([v[labels == c].mean(0) for c in clusters])
        batches.append(prototype_rows(centres_k, centres_v, round_index, site_number, source, slot))
        slot += len(centres_k)
    return np.concatenate(batches)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)


def _balanced(classes: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    chosen = []
    for c in np.unique(classes):
        idx = np.flatnonzero(classes == c)
        chosen.append(idx if len(idx) <= per_class else rng.choice(idx, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def _centre_patch(array: np.ndarray, patch: list[int]) -> np.ndarray:
    """The patch-sized centre of a (C, *spatial) array, zero-padded where the array is smaller."""
    spatial = array.shape[1:]
    if len(patch) == 2:          # 2D configuration: the middle slice
        array = array[:, spatial[0] // 2]
        spatial = array.shape[1:]
    out = np.zeros((array.shape[0], *patch), dtype=np.float32)
    src, dst = [], []
    for n, p in zip(spatial, patch):
        if n >= p:
            lo = (n - p) // 2
            src.append(slice(lo, lo + p))
            dst.append(slice(0, p))
        else:
            lo = (p - n) // 2
            src.append(slice(0, n))
            dst.append(slice(lo, lo + n))
    out[(slice(None), *dst)] = array[(slice(None), *src)]
    return np.ascontiguousarray(out)
