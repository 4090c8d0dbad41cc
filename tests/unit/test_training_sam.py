"""The SAM segmenter: shapes, adapters, frozen backbone, SAM checkpoint loading, AdamW state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedseg.errors import InputError
from fedseg.training.sam import (
    SAM_CONFIGS,
    Adapter,
    SamSegmenter,
    build_sam_segmenter,
    is_frozen_backbone,
    load_sam_weights,
    read_checkpoint,
    sam_config,
)

TINY = SAM_CONFIGS["tiny"]


def _sam_style_checkpoint(config, seed: int = 7) -> dict[str, torch.Tensor]:
    """Random tensors under SAM's key names for `config`, as segment-anything's Sam would save them:
    every encoder/decoder tensor, the full prompt encoder and the IoU head, no adapters, no class head."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        plain = SamSegmenter(config, 1, 2)   # no adapters
    state = {k: torch.randn(v.shape, generator=g) for k, v in plain.state_dict().items() if not k.startswith("mask_decoder.class_head")}
    d = config.prompt_embed_dim
    # parts of SAM the prompt-free model does not use
    for i in range(4):
        state[f"prompt_encoder.point_embeddings.{i}.weight"] = torch.randn(1, d, generator=g)
    state["prompt_encoder.not_a_point_embed.weight"] = torch.randn(1, d, generator=g)
    state["prompt_encoder.mask_downscaling.0.weight"] = torch.randn(4, 1, 2, 2, generator=g)
    for i, (n, k) in enumerate([(d, 256), (256, 256), (256, 4)]):
        state[f"mask_decoder.iou_prediction_head.layers.{i}.weight"] = torch.randn(k, n, generator=g)
        state[f"mask_decoder.iou_prediction_head.layers.{i}.bias"] = torch.randn(k, generator=g)
    return state


def test_vit_b_has_sams_parameter_count() -> None:
    with torch.device("meta"):
        model = SamSegmenter(SAM_CONFIGS["vit_b"], 1, 2)
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("image_encoder."))
    assert encoder == 89_670_912   # segment-anything's ImageEncoderViT for vit_b
    names = set(model.state_dict())
    assert "image_encoder.blocks.2.attn.rel_pos_h" in names and "image_encoder.neck.3.bias" in names
    assert "mask_decoder.output_hypernetworks_mlps.3.layers.2.weight" in names
    assert "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix" in names


def test_forward_resizes_and_handles_channels_and_3d() -> None:
    model = build_sam_segmenter(TINY, 1, 3, seed=0)
    assert model(torch.randn(2, 1, 40, 52)).shape == (2, 3, 40, 52)
    assert model(torch.randn(1, 1, 3, 32, 32)).shape == (1, 3, 3, 32, 32)   # 3D patch, slice by slice
    two_channels = build_sam_segmenter(TINY, 2, 2, seed=0)
    assert two_channels(torch.randn(1, 2, 64, 64)).shape == (1, 2, 64, 64)
    assert "input_proj.weight" in two_channels.state_dict()


def test_seeded_build_is_deterministic_and_leaves_the_global_rng() -> None:
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    a = build_sam_segmenter(TINY, 1, 2, adapters=True, seed=5).state_dict()
    assert torch.equal(torch.rand(1), expected)
    b = build_sam_segmenter(TINY, 1, 2, adapters=True, seed=5).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adapter_is_msa_bottleneck_and_starts_as_identity() -> None:
    adapter = Adapter(64)
    assert adapter.D_fc1.weight.shape == (16, 64) and adapter.D_fc2.weight.shape == (64, 16)
    x = torch.randn(3, 64)
    assert torch.equal(adapter(x), x)                              # skip connection, zero output layer
    assert torch.equal(Adapter(64, skip_connect=False)(x), torch.zeros(3, 64))
    # a model with fresh adapters computes the same as the plain model with the same weights
    plain = build_sam_segmenter(TINY, 1, 2, seed=1)
    adapted = build_sam_segmenter(TINY, 1, 2, adapters=True, seed=1)
    adapted.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(adapted(x), plain(x))


def test_frozen_backbone_gets_no_gradient_and_is_not_in_the_state() -> None:
    model = build_sam_segmenter(TINY, 1, 2, adapters=True, freeze_backbone=True, seed=0)
    model(torch.randn(2, 1, 64, 64)).sum().backward()
    for name, p in model.named_parameters():
        if is_frozen_backbone(name):
            assert p.grad is None, name
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any(".Space_Adapter." in n for n in trained) and any(".MLP_Adapter." in n for n in trained)
    assert any(n.startswith("mask_decoder.transformer.") for n in trained)
    state = model.state_dict()
    assert not any(is_frozen_backbone(k) for k in state)
    # the state alone restores the model (the backbone comes from the build)
    other = build_sam_segmenter(TINY, 1, 2, adapters=True, freeze_backbone=True, seed=0)
    other.load_state_dict(state)
    with pytest.raises(RuntimeError):
        other.load_state_dict({k: v for k, v in state.items() if not k.startswith("mask_decoder.class_head")})


def test_sam_checkpoint_loads_with_only_adapters_and_head_missing(tmp_path: Path) -> None:
    checkpoint = _sam_style_checkpoint(TINY)
    path = tmp_path / "sam_tiny.pth"
    torch.save(checkpoint, path)   # SAM's format: torch.save of a plain dict of tensors
    model = build_sam_segmenter(TINY, 1, 2, adapters=True, freeze_backbone=True, checkpoint=path, seed=0)
    report = model.checkpoint_report
    assert "\n" not in report
    full = model.all_tensors()
    missing = {n for n in full if n not in checkpoint}
    assert missing and all(".Space_Adapter." in n or ".MLP_Adapter." in n or n.startswith("mask_decoder.class_head.") for n in missing)
    assert "missing" in report and "Space_Adapter" in report and "class_head" in report
    assert "unexpected 12" in report and "iou_prediction_head" in report and "point_embeddings" in report
    for name, value in checkpoint.items():
        if name in full:
            assert torch.equal(full[name], value), name
    # safetensors is accepted too, and gives the same model
    from safetensors.torch import save_file

    save_file(checkpoint, str(tmp_path / "sam_tiny.safetensors"))
    again = build_sam_segmenter(TINY, 1, 2, adapters=True, freeze_backbone=True, checkpoint=tmp_path / "sam_tiny.safetensors", seed=0)
    assert all(torch.equal(again.all_tensors()[k], v) for k, v in full.items())


def test_checkpoint_at_another_image_size_is_interpolated(tmp_path: Path) -> None:
    checkpoint = _sam_style_checkpoint(TINY)
    model = build_sam_segmenter(sam_config("tiny", image_size=96), 1, 2, seed=0)
    report = load_sam_weights(model, checkpoint, tmp_path / "x.pth")
    assert "image_encoder.pos_embed" in report.resized
    assert model.image_encoder.pos_embed.shape == (1, 12, 12, 64)
    assert model(torch.randn(1, 1, 96, 96)).shape == (1, 2, 96, 96)


def test_bad_checkpoints_are_input_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="cannot read"):
        read_checkpoint(tmp_path / "junk.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(InputError, match="not a SAM checkpoint"):
        read_checkpoint(tmp_path / "list.pth")
    wrong = _sam_style_checkpoint(TINY)
    wrong["image_encoder.blocks.0.mlp.lin1.weight"] = torch.zeros(7, 64)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(InputError, match="another SAM variant"):
        build_sam_segmenter(TINY, 1, 2, checkpoint=tmp_path / "wrong.pth")
    torch.save(_sam_style_checkpoint(TINY), tmp_path / "ok.pth")
    with pytest.raises(InputError, match="sha256"):
        build_sam_segmenter(TINY, 1, 2, checkpoint=tmp_path / "ok.pth", checkpoint_sha256="0" * 64)


def test_sam_config_validation() -> None:
    with pytest.raises(InputError, match="unknown SAM configuration"):
        sam_config("vit_x")
    with pytest.raises(InputError, match="multiple of the patch size"):
        sam_config("tiny", image_size=70)
