import pytest
import torch
from safetensors.torch import save_file

from flora.training.config import ModelConfig
from flora.training.models import ModelError, build_model, head_prefix, init_from_checkpoint, remap_head

from .conftest import make_checkpoint


def test_remap_head_copies_rows_by_species_name():
    source_mapping = {"Quercus ilex": 0, "Olea europaea": 1, "Pinus pinea": 2}
    target_mapping = {"Pinus pinea": 0, "Cistus albidus": 1, "Quercus ilex": 2}
    source = {"head.weight": torch.arange(12.0).reshape(3, 4), "head.bias": torch.tensor([10.0, 11.0, 12.0])}
    target = {
        "head.weight": torch.full((3, 4), -1.0),
        "head.bias": torch.full((3,), -1.0),
        "other": torch.ones(1),
    }
    head, copied = remap_head(source, target, "head", source_mapping, target_mapping)
    assert copied == 2 and set(head) == {"head.weight", "head.bias"}
    assert head["head.weight"][0].tolist() == source["head.weight"][2].tolist()  # Pinus pinea
    assert head["head.weight"][2].tolist() == source["head.weight"][0].tolist()  # Quercus ilex
    assert head["head.weight"][1].tolist() == [-1.0] * 4  # unknown to the source: fresh init kept
    assert head["head.bias"].tolist() == [12.0, -1.0, 10.0]


def test_init_from_copies_the_backbone_and_maps_the_head():
    torch.manual_seed(0)
    global_map = {f"species {i}": i for i in range(6)}
    regional_map = {"species 4": 0, "species 1": 1, "new species": 2}
    source = build_model(ModelConfig(name="test_vit"), 6, 32)
    checkpoint = make_checkpoint(model=source.state_dict(), class_mapping=global_map)
    target = build_model(ModelConfig(name="test_vit"), 3, 32)
    fresh_new_row = target.state_dict()["head.weight"][2].clone()
    report = init_from_checkpoint(target, checkpoint, regional_map)
    assert report["species_copied"] == 2 and report["species_new"] == 1 and head_prefix(target) == "head"
    t, s = target.state_dict(), source.state_dict()
    assert torch.equal(t["blocks.0.attn.qkv.weight"], s["blocks.0.attn.qkv.weight"])
    assert torch.equal(t["head.weight"][0], s["head.weight"][4]) and torch.equal(
        t["head.bias"][1], s["head.bias"][1]
    )
    assert torch.equal(t["head.weight"][2], fresh_new_row)
    with torch.no_grad():  # the regional model scores its species 4 exactly as the global one did
        x = torch.randn(2, 3, 32, 32)
        assert torch.allclose(target.eval()(x)[:, 0], source.eval()(x)[:, 4], atol=1e-5)


def test_init_from_refuses_another_architecture():
    source = build_model(ModelConfig(name="test_vit"), 4, 32)
    target = build_model(ModelConfig(name="test_vit2"), 4, 32)
    with pytest.raises(ModelError, match="init_from"):
        init_from_checkpoint(
            target,
            make_checkpoint(model=source.state_dict(), class_mapping={str(i): i for i in range(4)}),
            {str(i): i for i in range(4)},
        )


def test_pretrained_weights_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    imagenet = build_model(ModelConfig(name="test_vit"), 1000, 160)  # timm's default size and head
    path = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()}, str(path))
    torch.manual_seed(2)
    model = build_model(ModelConfig(name="test_vit", pretrained=True, pretrained_path=str(path)), 7, 64)
    state = model.state_dict()
    assert torch.equal(state["blocks.1.mlp.fc1.weight"], imagenet.state_dict()["blocks.1.mlp.fc1.weight"])
    assert state["head.weight"].shape == (7, imagenet.state_dict()["head.weight"].shape[1])  # new head
    assert state["pos_embed"].shape[1] < imagenet.state_dict()["pos_embed"].shape[1]  # resampled to 64 px


def test_offline_without_a_weights_file_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="pretrained_path"):
        build_model(ModelConfig(name="test_vit", pretrained=True), 3, 32)
    with pytest.raises(ModelError, match="no such file"):
        build_model(
            ModelConfig(name="test_vit", pretrained=True, pretrained_path="/nonexistent.safetensors"), 3, 32
        )
    with pytest.raises(ModelError, match="no model"):
        build_model(ModelConfig(name="vit_imaginary_patch3"), 3, 32)


def test_cnn_ignores_the_image_size():
    model = build_model(ModelConfig(name="test_efficientnet"), 5, 48)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 5)
